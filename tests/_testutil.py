"""Helpers shared by the tests (tests/conftest.py puts this folder on sys.path)."""

import contextlib

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode


@contextlib.contextmanager
def no_host_sync():
    """A region in which any CUDA operation that synchronises the host raises (set_sync_debug_mode "error"); the
    work queued before it is finished first, so it cannot be blamed on the region."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# The device of the kernel value tests: the GPU where there is one, so that they check the compiled kernels, else
# the CPU, where the kernels run in Triton's interpreter. Inputs are drawn on the CPU and moved here, so that both
# get the same values.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_bitwise_reproducible(step, names):
    """``step()`` runs a forward and backward from fixed inputs and returns its outputs and gradients (None for one
    not taken), named by ``names``; a second call must give the same bits, in memory of its own (the same buffer
    returned twice would be equal trivially)."""
    first, second = step(), step()
    assert len(first) == len(second) == len(names)
    for name, a, b in zip(names, first, second):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.numel() > 0 and a.data_ptr() != b.data_ptr(), name
        assert torch.isfinite(a).all() and a.count_nonzero() > 0, f"{name}: not finite, or all zero"
        assert torch.equal(a, b), f"{name}: differs between two runs on the same inputs"


def max_err(a, ref) -> float:
    return (a.double() - ref.double()).abs().max().item()


def check_close(name, got, ref64, baseline, dtype):
    """fp32: close to float64. Low precision: at most twice the error of plain PyTorch in the same dtype."""
    assert got.shape == ref64.shape, name
    if got.numel() == 0:
        return
    assert torch.isfinite(got).all(), name
    scale = ref64.abs().max().item() + 1e-12
    if dtype == torch.float32:
        assert max_err(got, ref64) <= 1e-5 * scale + 1e-6, f"{name}: {max_err(got, ref64)} (scale {scale})"
    else:
        tol = 2 * max_err(baseline, ref64) + 1e-4 * scale
        assert max_err(got, ref64) <= tol, f"{name}: {max_err(got, ref64)} > {tol}"


# Trainer tests (tests/beit/test_train.py, tests/beit/test_graphs.py): a tiny image folder, a fixed k-means
# codebook and the command line of a tiny run over them.
TRAIN_IMAGES = 40


def make_train_assets(root) -> tuple:
    """(data folder, tokenizer spec): TRAIN_IMAGES synthetic images in 2 classes and a 16-entry k-means tokenizer
    for a 32 px view."""
    from beit.data import make_synthetic
    from beit.tokenizer.kmeans import KMeansTokenizer

    make_synthetic(root / "data", num_images=TRAIN_IMAGES, classes=2, seed=0, size=(96, 72))
    g = torch.Generator().manual_seed(0)
    codebook = torch.rand(16, 3 * 8 * 8, generator=g) * 0.8 + 0.1  # map_pixels range
    tok = root / "tok.safetensors"
    KMeansTokenizer(codebook, patch_size=8, input_size=32).save(tok)
    return root / "data", f"kmeans:{tok}"


def tiny_run_args(assets, out, *extra, device: str = "cpu") -> list[str]:
    """beit-pretrain arguments for a 2-block BEiT-tiny at 64 px, batch 6, on ``device``; ``extra`` comes last."""
    data, tok = assets
    return [
        "--data", str(data), "--tokenizer", tok, "--output-dir", str(out),
        "--model", "beit_tiny_patch16_224", "--depth", "2", "--image-size", "64",
        "--batch-size", "6", "--num-mask-patches", "6", "--min-mask-patches", "2",
        "--loader", "reference", "--num-workers", "0", "--device", device,
        "--no-progress", "--log-interval", "5", "--lr", "1e-3", "--warmup-steps", "2",
        *extra,
    ]  # fmt: skip


def assert_same(x, y, where="checkpoint"):
    """Recursive bitwise equality of checkpoint contents (tensors, dicts, lists, tuples, plain values)."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and sorted(map(str, x)) == sorted(map(str, y)), where
        for k in x:
            assert_same(x[k], y[k], f"{where}[{k!r}]")
    elif isinstance(x, (list, tuple)):
        assert isinstance(y, (list, tuple)) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_same(u, v, f"{where}[{i}]")
    else:
        assert x == y, where


# Ops that make the host wait for a CUDA device: a value read back (item, bool, equal), or an output whose size
# depends on values (nonzero, masked_select, unique, boolean indexing). A captured step can contain none of them.
HOST_SYNC_OPS = {
    "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.allclose", "aten.nonzero",
    "aten.masked_select", "aten.unique", "aten._unique", "aten._unique2", "aten.unique_consecutive",
    "aten.unique_dim", "aten.bincount", "aten.repeat_interleave",
}  # fmt: skip


class HostSyncs(TorchDispatchMode):
    """Records the ops of a region that would synchronise the host on a CUDA device. On the CPU nothing waits, so
    this is how a CPU test sees them; boolean indexing counts, since it runs a nonzero inside the op.

    A ``torch.library`` custom op (every ``beit_kernels`` op) reaches a dispatch mode as one opaque op; its
    Python implementation is run here instead, with the mode on, so the ops inside it are watched too. Triton's
    launches themselves are not torch ops (in the interpreter they run on the tensors' memory), so they are
    not seen: on a GPU a launch does not wait for the device."""

    def __init__(self):
        super().__init__()
        self.found = []
        self.custom_ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        bool_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())
        )
        if name in HOST_SYNC_OPS or bool_index:
            self.found.append(name + (" (boolean index)" if bool_index else ""))
        opdef = OPDEFS.get(f"{func.namespace}::{func._opname}")
        if opdef is not None:
            self.custom_ops.append(name)
            with self:
                return opdef._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))
