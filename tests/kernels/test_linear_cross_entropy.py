"""linear_cross_entropy: the chunked fused head loss against its float64 reference: loss, counts, every gradient."""

import pytest
import torch
from _testutil import DEVICE, assert_bitwise_reproducible, check_close, no_host_sync
from torch.utils._python_dispatch import TorchDispatchMode

import beit_kernels
from beit_kernels import reference
from beit_kernels.linear_cross_entropy import default_chunk_size, linear_cross_entropy_fwd


def make(M, D, V, *, n_ignored=2, bias=True, seed=0, ignore_index=-100, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, dtype=torch.float64, generator=g)
    w = torch.randn(V, D, dtype=torch.float64, generator=g) * D**-0.5 * 3
    b = torch.randn(V, dtype=torch.float64, generator=g) if bias else None
    target = torch.randint(0, V, (M,), generator=g)
    target[torch.randperm(M, generator=g)[:n_ignored]] = ignore_index
    return [t.to(device) if t is not None else None for t in (x, w, b, target)]


def run(fn, x, w, b, target, dtype, *, upstream=1.0, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    loss, num_correct, num_valid = fn(*leaves, target, return_counts=True, **kw)
    (loss * upstream).backward()
    return (loss, num_correct, num_valid), [t.grad if t is not None else None for t in leaves]


CASES = [
    # M, D, V, n_ignored, bias, chunk_size, reduction
    (13, 40, 300, 2, True, 5, "mean"),  # several chunks, the last one short; V not a multiple of the block
    (13, 40, 300, 2, False, None, "sum"),  # no bias, the default chunk
    (7, 24, 2500, 1, True, 4, "mean"),  # V over one 2048-wide block, not a multiple of it
    (6, 40, 97, 6, True, 4, "mean"),  # no valid row: zero loss and zero gradients, not NaN
    (5, 40, 97, 4, True, 2, "mean"),  # exactly one valid row: the mean divides by 1
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,D,V,n_ignored,bias,chunk_size,reduction", CASES)
def test_linear_cross_entropy_matches_reference(dtype, M, D, V, n_ignored, bias, chunk_size, reduction):
    x, w, b, target = make(M, D, V, n_ignored=n_ignored, bias=bias)
    # The gradients are rounded to the input dtype in the forward and scaled by the upstream gradient in the
    # backward: an exact scaling for a power of two (1, or a GradScaler scale), one more rounding otherwise. So
    # low precision is compared at a power of two (where plain PyTorch's roundings are the same), fp32 at 2.5.
    upstream = 2.5 if dtype == torch.float32 else 2.0
    kw = dict(reduction=reduction, chunk_size=chunk_size, upstream=upstream)
    rounded = [t.to(dtype).double() if t is not None else None for t in (x, w, b)]
    ref, ref_grads = run(reference.linear_cross_entropy, *rounded, target, torch.float64, **kw)
    got, grads = run(beit_kernels.linear_cross_entropy, x, w, b, target, dtype, **kw)
    base, base_grads = run(reference.linear_cross_entropy, x, w, b, target, dtype, **kw)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    check_close("loss", got[0], ref[0], base[0], dtype)
    assert got[2].item() == M - n_ignored == ref[2].item()
    assert got[1].item() == ref[1].item()
    for name, gg, rg, bg in zip(("x", "weight", "bias"), grads, ref_grads, base_grads):
        assert (gg is None) == (rg is None), name
        if rg is None:
            continue
        assert gg.dtype == dtype
        check_close(f"grad {name}", gg, rg, bg, dtype)
    if n_ignored == M:
        assert got[0].item() == 0.0
        assert all(torch.count_nonzero(gg) == 0 for gg in grads if gg is not None)


def test_num_correct_counts_first_argmax():
    M, D, V = 9, 8, 50
    g = torch.Generator().manual_seed(1)
    w = torch.randn(V, D, generator=g).to(DEVICE)
    target = torch.randint(0, V, (M,), generator=g).to(DEVICE)
    x = w[target] * 4  # row m's logit is largest at its own target (with high probability: checked below)
    x[3] = 0.0  # all logits zero (no bias): ties everywhere, argmax is class 0
    target[3] = 0
    x[4] = 0.0
    target[4] = 1  # tie, but the first maximum is class 0: not correct
    target[5] = -100  # ignored rows never count
    loss, correct, valid = beit_kernels.linear_cross_entropy(x, w, None, target, return_counts=True, chunk_size=4)
    logits = x @ w.t()
    expected = ((logits.argmax(-1) == target) & (target != -100)).sum().item()
    assert correct.item() == expected and expected >= 5
    assert valid.item() == M - 1


def test_custom_ignore_index_and_strided_int32_target():
    x, w, b, target = make(11, 16, 70, n_ignored=3, ignore_index=7)
    target = torch.stack((target, target.flip(0)), dim=1).to(torch.int32)[:, 0]  # [M] with stride 2
    assert target.stride() == (2,)
    ref = reference.linear_cross_entropy(x, w, b, target, ignore_index=7, return_counts=True)
    got = beit_kernels.linear_cross_entropy(x.float(), w.float(), b.float(), target, ignore_index=7, return_counts=True)
    check_close("loss", got[0], ref[0], None, torch.float32)
    assert got[1].item() == ref[1].item() and got[2].item() == ref[2].item() == 11 - 3


def test_no_grad_and_partial_grads():
    x, w, b, target = make(10, 16, 70)
    ref = reference.linear_cross_entropy(x, w, b, target)
    with torch.no_grad():
        got = beit_kernels.linear_cross_entropy(x.float(), w.float(), b.float(), target)
    check_close("loss", got, ref, None, torch.float32)
    xf = x.float().requires_grad_()  # only x needs a gradient: the weight gradient is not computed
    beit_kernels.linear_cross_entropy(xf, w.float(), b.float(), target).backward()
    x64 = x.clone().requires_grad_()
    reference.linear_cross_entropy(x64, w, b, target).backward()
    check_close("grad x", xf.grad, x64.grad, None, torch.float32)


def test_double_backward_is_refused_not_wrong():
    """The gradients come from the forward, constants to autograd: a second derivative would silently miss the
    Hessian term, so it must raise instead."""
    x, w, _, target = make(10, 16, 70)
    xf = x.float().requires_grad_()
    loss = beit_kernels.linear_cross_entropy(xf, w.float(), None, target)
    (gx,) = torch.autograd.grad(loss.square(), xf, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.square().sum().backward()


class KernelInputDtypes(TorchDispatchMode):
    """Records the dtypes of the tensors each beit_kernels op receives (what reaches the kernel)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "beit_kernels":
            self.calls.append((func.name(), [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def test_autocast_runs_in_the_autocast_dtype():
    x, w, b, target = make(12, 16, 70)
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    with KernelInputDtypes() as seen, torch.autocast(DEVICE.type, dtype=torch.float16):
        loss = beit_kernels.linear_cross_entropy(*leaves, target)
    # The kernel itself gets x, weight and bias in fp16 (a path ignoring autocast would pass them in fp32).
    fp16 = torch.float16
    assert seen.calls == [("beit_kernels::linear_cross_entropy_fwd", [fp16, fp16, fp16, torch.int64])], seen.calls
    with KernelInputDtypes() as plain:  # the spy reads what is passed: fp32 outside autocast
        beit_kernels.linear_cross_entropy(*(t.detach() for t in leaves), target)
    assert plain.calls == [("beit_kernels::linear_cross_entropy_fwd", [torch.float32] * 3 + [torch.int64])]
    loss.backward()
    assert loss.dtype == torch.float32 and all(t.grad.dtype == torch.float32 for t in leaves)
    ref = reference.linear_cross_entropy(x, w, b, target)
    assert abs(loss.item() - ref.item()) < 1e-2 * abs(ref.item())


def test_grad_scaler_scale_does_not_overflow_fp16():
    x, w, b, target = make(12, 16, 70)
    (_, ref_grads), (_, grads) = (
        run(fn, x, w, b, target, torch.float16, upstream=2.0**16)
        for fn in (reference.linear_cross_entropy, beit_kernels.linear_cross_entropy)
    )
    for name, gg, rg in zip(("x", "weight", "bias"), grads, ref_grads):
        assert torch.isfinite(gg).all(), name  # 2**16 itself is inf in fp16: the scaling must not pass through it
        torch.testing.assert_close(gg.float(), rg.float(), rtol=2e-2, atol=2e-3 * rg.float().abs().max().item())


def test_fp16_gradients_do_not_underflow_before_the_grad_scaler():
    """A confident head over many rows: each non-target dz / n_valid (about 1e-8) is below fp16's smallest
    subnormal, so folding the mean into the fp16 dz zeroed the gradient of every class no row targets, before the
    GradScaler's 2**16 could lift it (100% error there)."""
    M, V = 512, 64
    g = torch.Generator().manual_seed(9)
    target = torch.randint(0, V // 2, (M,), generator=g)  # classes V/2.. are no row's target
    x = torch.nn.functional.one_hot(target, V).double() + 0.01 * torch.randn(M, V, dtype=torch.float64, generator=g)
    x, target = x.to(DEVICE), target.to(DEVICE)
    w, b = 12 * torch.eye(V, dtype=torch.float64, device=DEVICE), torch.zeros(V, dtype=torch.float64, device=DEVICE)
    rounded = [t.half().double() for t in (x, w, b)]
    _, ref = run(reference.linear_cross_entropy, *rounded, target, torch.float64, upstream=2.0**16)
    _, base = run(reference.linear_cross_entropy, x, w, b, target, torch.float16, upstream=2.0**16)
    _, got = run(beit_kernels.linear_cross_entropy, x, w, b, target, torch.float16, upstream=2.0**16)
    untargeted = slice(V // 2, None)
    for name, i in (("x", 0), ("weight", 1), ("bias", 2)):
        rows = untargeted if i else slice(None)
        check_close(f"grad {name}", got[i][rows], ref[i][rows], base[i][rows], torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_forward_and_backward_are_bitwise_reproducible(dtype):
    """BEiT-B's MIM head (3 images of 75 masked tokens, its 8192 classes) in 4 chunks on a GPU, 9 rows of 97
    classes in 2 chunks in the interpreter (for time): the chunks' weight and bias gradients are added in a fixed
    order, so two runs agree bit for bit."""
    M, D, V, chunk = (3 * 75, 768, 8192, 64) if DEVICE.type == "cuda" else (9, 24, 97, 5)
    x, w, b, target = make(M, D, V, seed=3)

    def step():
        (loss, _, valid), grads = run(beit_kernels.linear_cross_entropy, x, w, b, target, dtype, chunk_size=chunk)
        assert valid.item() == M - 2
        return [loss.detach(), *grads]

    assert_bitwise_reproducible(step, ("loss", "grad x", "grad weight", "grad bias"))


def test_default_chunk_size_holds_at_most_2_26_logits():
    assert default_chunk_size(19200, 8192, 768) == 8192  # BEiT-B, B=256: three chunks
    assert default_chunk_size(4000, 8192, 768) == 4096  # fewer rows than fit: one chunk
    assert default_chunk_size(19200, 128256, 4096) == 512  # a large vocabulary: 512 * 128256 < 2**26
    assert default_chunk_size(1, 10, 100) == 1
    assert default_chunk_size(5, 1 << 30, 8) == 1


def test_compiles_without_graph_break():
    x, w, b, target = make(10, 16, 70)
    leaves = [t.float().requires_grad_() for t in (x, w, b)]

    def step(x, w, b, target):
        loss, correct, valid = beit_kernels.linear_cross_entropy(x, w, b, target, return_counts=True, chunk_size=4)
        return loss * 3.0, correct, valid

    loss, correct, valid = torch.compile(step, backend="aot_eager", fullgraph=True)(*leaves, target)
    loss.backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    loss2, correct2, valid2 = step(*leaves, target)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    assert correct.item() == correct2.item() and valid.item() == valid2.item()
    for g1, t in zip(grads, leaves):
        torch.testing.assert_close(g1, t.grad)


def test_opcheck_registrations():
    x, w, b, target = make(10, 16, 70)
    args = (x.float(), w.float(), b.float(), target, -100, True, True, True, True, 4)
    torch.library.opcheck(linear_cross_entropy_fwd, args, test_utils=("test_schema", "test_faketensor"))


X, W, B = torch.zeros(4, 8, device=DEVICE), torch.zeros(10, 8, device=DEVICE), torch.zeros(10, device=DEVICE)
TGT = torch.zeros(4, dtype=torch.int64, device=DEVICE)
# A bad target value is caught by a device-side assert: on CUDA it fires asynchronously and leaves the process's
# CUDA context unusable for every later test, so those cases run where it fires at once, in the interpreter.
INTERPRETER_ONLY = pytest.mark.skipif(DEVICE.type == "cuda", reason="a failed device-side assert ends CUDA's context")


@pytest.mark.parametrize(
    "args,kw,err,match",
    [
        ((X[0], W, B, TGT), {}, ValueError, r"x must be \[M, D\]"),
        ((X, W[:, :7], B, TGT), {}, ValueError, r"weight must be \[V, D\] with D=8"),
        ((X, W, B[:9], TGT), {}, ValueError, r"bias must be \[10\]"),
        ((X, W, B, TGT[:3]), {}, ValueError, r"target must be \[M\] with M=4"),
        ((X, W, B, TGT.float()), {}, TypeError, "int32 or int64"),
        ((X.long(), W, B, TGT), {}, TypeError, "fp32, fp16 or bf16"),
        ((X, W.half(), B, TGT), {}, TypeError, "share a dtype"),
        ((X, W, B, TGT), dict(reduction="none"), ValueError, "'mean' or 'sum'"),
        ((X, W, B, TGT), dict(chunk_size=0), ValueError, "chunk_size"),
        # Target values are checked on the device (no host sync); on the CPU the assert fires at once.
        *(
            pytest.param(args, {}, RuntimeError, r"targets must lie in \[0, 10\)", marks=INTERPRETER_ONLY)
            for args in ((X, W, B, torch.tensor([0, 1, 10, 2])), (X, W, B, torch.tensor([0, -1, 3, 2])))
        ),
    ],
)
def test_bad_inputs_raise(args, kw, err, match):
    with pytest.raises(err, match=match):
        beit_kernels.linear_cross_entropy(*args, **kw)


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 at BEiT-B shapes, and no host synchronisation


@pytest.mark.gpu
def test_gpu_bf16_beit_b_matches_reference():
    M, D, V = 256 * 75, 768, 8192
    x, w, b, target = make(M, D, V, n_ignored=M // 10)
    rounded = [t.to(torch.bfloat16).double() for t in (x, w, b)]
    ref, ref_grads = run(reference.linear_cross_entropy, *rounded, target, torch.float64)
    got, grads = run(beit_kernels.linear_cross_entropy, x, w, b, target, torch.bfloat16)
    base, base_grads = run(reference.linear_cross_entropy, x, w, b, target, torch.bfloat16)
    check_close("loss", got[0], ref[0], base[0], torch.bfloat16)
    assert got[2].item() == ref[2].item()
    # bf16 logits can reorder near-ties: the counts agree with plain bf16 PyTorch up to a few rows.
    assert abs(got[1].item() - base[1].item()) <= max(3, M // 1000)
    for name, gg, rg, bg in zip(("x", "weight", "bias"), grads, ref_grads, base_grads):
        check_close(f"grad {name}", gg, rg, bg, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_no_sync_and_empty_batch():
    M, D, V = 2048, 768, 8192
    x, w, b, target = make(M, D, V)
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    none_valid = torch.full_like(target, -100)
    with no_host_sync():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss, correct, valid = beit_kernels.linear_cross_entropy(*leaves, target, return_counts=True)
            empty = beit_kernels.linear_cross_entropy(*leaves, none_valid)
        (loss + empty).backward()
    assert empty.item() == 0.0 and torch.isfinite(loss)
    assert all(torch.isfinite(t.grad).all() for t in leaves)
