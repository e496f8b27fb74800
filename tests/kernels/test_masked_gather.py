"""masked_gather: the sync-free gather (with fused LayerNorm) against its float64 reference, every gradient."""

import pytest
import torch
from _testutil import DEVICE, assert_bitwise_reproducible, check_close, no_host_sync

import beit_kernels
from beit_kernels import reference
from beit_kernels.masked_gather import masked_gather_bwd, masked_gather_fwd


def padded_index(B, T, K, counts, generator, dtype=torch.int64):
    """[B, K] on DEVICE: counts[b] distinct ascending positions in [0, T) drawn on the CPU, then -1 padding."""
    rows = []
    for c in counts:
        pos = torch.randperm(T, generator=generator)[:c].sort().values
        rows.append(torch.cat((pos, torch.full((K - c,), -1, dtype=torch.int64))))
    return torch.stack(rows).to(DEVICE, dtype)


def randn(*shape, generator, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, generator=generator).to(DEVICE)


def run(fn, x, index, w, b, dtype, grad_out, eps=1e-6):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    out = fn(leaves[0], index, ln_weight=leaves[1], ln_bias=leaves[2], eps=eps)
    out.backward(grad_out.to(out.dtype))
    return out, [t.grad if t is not None else None for t in leaves]


CASES = [
    # B, T, D, K, counts, ln
    (3, 7, 40, 4, (3, 0, 4), "wb"),  # padded rows and an image with no masked row
    (3, 7, 40, 4, (0, 0, 0), "wb"),  # a batch with no masked row at all
    (3, 7, 40, 0, (0, 0, 0), "wb"),  # no row: nothing launches, the LayerNorm gradients are zeros
    (2, 197, 24, 9, (9, 5), "wb"),  # BEiT's token count (cls + 196), D not a power of two
    (3, 7, 40, 4, (2, 4, 1), "none"),  # plain gather
    (2, 5, 33, 3, (3, 2), "w"),  # LayerNorm without bias
    (2, 5, 33, 3, (1, 3), "b"),  # LayerNorm without weight
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,D,K,counts,ln", CASES)
def test_masked_gather_matches_reference(dtype, B, T, D, K, counts, ln):
    g = torch.Generator().manual_seed(1)
    x = randn(B, T, D, generator=g) * 2 + 0.5
    w = randn(D, generator=g) if "w" in ln else None
    b = randn(D, generator=g) if "b" in ln else None
    index = padded_index(B, T, K, counts, g)
    grad_out = randn(B * K, D, generator=g)
    rounded = [t.to(dtype).double() if t is not None else None for t in (x, w, b)]
    ref, ref_grads = run(reference.masked_gather, rounded[0], index, rounded[1], rounded[2], torch.float64, grad_out)
    got, grads = run(beit_kernels.masked_gather, x, index, w, b, dtype, grad_out)
    base, base_grads = run(reference.masked_gather, x, index, w, b, dtype, grad_out)
    assert got.dtype == dtype and got.shape == (B * K, D)
    check_close("out", got, ref, base, dtype)
    padding = (index < 0).reshape(-1)
    assert torch.equal(got[padding], torch.zeros_like(got[padding]))
    for name, gg, rg, bg in zip(("x", "ln_weight", "ln_bias"), grads, ref_grads, base_grads):
        assert (gg is None) == (rg is None), name
        if rg is not None:
            check_close(f"grad {name}", gg, rg, bg, dtype)


def test_int32_index_and_strided_x():
    g = torch.Generator().manual_seed(2)
    full = randn(3, 8, 40, generator=g)
    index = padded_index(3, 7, 4, (4, 2, 0), g, dtype=torch.int32).t().contiguous().t()  # column-major [B, K]
    w, b = randn(40, generator=g, dtype=torch.float32), randn(40, generator=g, dtype=torch.float32)
    grad_out = randn(12, 40, generator=g)
    full32, full64 = full.float().requires_grad_(), full.clone().requires_grad_()
    # [B, T, D] views with the cls row skipped: not contiguous over the batch
    got = beit_kernels.masked_gather(full32[:, 1:], index, ln_weight=w, ln_bias=b)
    ref = reference.masked_gather(full64[:, 1:], index, ln_weight=w.double(), ln_bias=b.double())
    check_close("out", got, ref, None, torch.float32)
    got.backward(grad_out.float())
    ref.backward(grad_out)
    check_close("grad x", full32.grad, full64.grad, None, torch.float32)


def test_only_gathered_rows_receive_gradient():
    g = torch.Generator().manual_seed(3)
    x = randn(2, 6, 16, generator=g, dtype=torch.float32).requires_grad_()
    index = torch.tensor([[1, 4, -1], [-1, -1, -1]], device=DEVICE)
    beit_kernels.masked_gather(x, index, ln_weight=torch.ones(16, device=DEVICE)).sum().mul(0).add(
        beit_kernels.masked_gather(x, index).square().sum()
    ).backward()
    touched = torch.zeros(2, 6, dtype=torch.bool, device=DEVICE)
    touched[0, 1] = touched[0, 4] = True
    assert torch.equal(x.grad[~touched], torch.zeros_like(x.grad[~touched]))
    torch.testing.assert_close(x.grad[touched], 2 * x.detach()[touched])


def test_eps_is_used():
    x = torch.zeros(1, 3, 8, device=DEVICE)
    x[0, 0, :4] = 1e-4  # variance 2.5e-9, far below eps=1: the output scales with the eps
    index = torch.tensor([[0]], device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    for eps in (1e-6, 1.0):
        got = beit_kernels.masked_gather(x, index, ln_weight=w, eps=eps)
        ref = reference.masked_gather(x.double(), index, ln_weight=w.double(), eps=eps)
        check_close(f"eps={eps}", got, ref, None, torch.float32)


def test_compiles_without_graph_break():
    g = torch.Generator().manual_seed(4)
    x = randn(2, 7, 24, generator=g, dtype=torch.float32).requires_grad_()
    w = randn(24, generator=g, dtype=torch.float32).requires_grad_()
    index = padded_index(2, 7, 3, (3, 1), g)

    def step(x, index):
        return beit_kernels.masked_gather(x, index, ln_weight=w).square().sum()

    torch.compile(step, backend="aot_eager", fullgraph=True)(x, index).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    step(x, index).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_opcheck_registrations():
    g = torch.Generator().manual_seed(5)
    x = randn(2, 7, 24, generator=g, dtype=torch.float32)
    index = padded_index(2, 7, 3, (3, 1), g)
    w, b = torch.ones(24, device=DEVICE), torch.zeros(24, device=DEVICE)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(masked_gather_fwd, (x, index, w, b, 1e-6, True), test_utils=checks)
    _, mean, rstd = masked_gather_fwd(x, index, w, None, 1e-6, True)
    dy = randn(6, 24, generator=g, dtype=torch.float32)
    x_perm = x.transpose(0, 1).contiguous().transpose(0, 1)  # dense, batch not outermost: grad_x is still contiguous
    torch.library.opcheck(masked_gather_bwd, (dy, x_perm, index, w, mean, rstd, True), test_utils=checks)


X = torch.zeros(2, 5, 8, device=DEVICE)
IDX = torch.tensor([[0, 1], [2, -1]], device=DEVICE)
# A bad index value is caught by a device-side assert: on CUDA it fires asynchronously and leaves the process's CUDA
# context unusable for every later test, so those cases run where it fires at once, in the interpreter (CPU tensors).
INTERPRETER_ONLY = pytest.mark.skipif(DEVICE.type == "cuda", reason="a failed device-side assert ends CUDA's context")


@pytest.mark.parametrize(
    "x,index,kw,err,match",
    [
        (torch.zeros(5, 8, device=DEVICE), IDX, {}, ValueError, r"\[B, T, D\]"),
        (X.long(), IDX, {}, TypeError, "fp32, fp16 or bf16"),
        (X, IDX.float(), {}, TypeError, "int32 or int64"),
        (X, IDX[:1], {}, ValueError, r"\[B, K\] with B=2"),
        (X, IDX[0], {}, ValueError, r"\[B, K\]"),
        (X.transpose(1, 2).contiguous().transpose(1, 2), IDX, {}, ValueError, "unit stride"),
        (X, IDX, dict(ln_weight=torch.ones(7, device=DEVICE)), ValueError, r"ln_weight must be \[8\]"),
        (X, IDX, dict(ln_bias=torch.ones(8, dtype=torch.int64, device=DEVICE)), TypeError, "ln_bias must be a float"),
        (X, IDX, dict(ln_weight=torch.ones(8, device=DEVICE), eps=0.0), ValueError, "eps must be positive"),
        # Values are checked on the device (no host sync); on the CPU the assert fires at once.
        *(
            pytest.param(x, index, {}, RuntimeError, "distinct positions", marks=INTERPRETER_ONLY)
            for x, index in [
                (X, torch.tensor([[0, 5], [2, -1]])),
                (X, torch.tensor([[0, -2], [2, -1]])),
                (X, torch.tensor([[3, 3], [2, -1]])),
                (X, torch.tensor([[0, 1], [4, 4]], dtype=torch.int32)),
                (X, torch.tensor([[0, 1, -1], [2, 1, -3]])),
                # Zero-width rows still check their index (the kernel launches with one masked lane).
                (torch.zeros(2, 5, 0), torch.tensor([[1, 1], [2, -1]])),
            ]
        ),
    ],
)
def test_bad_inputs_raise(x, index, kw, err, match):
    with pytest.raises(err, match=match):
        beit_kernels.masked_gather(x, index, **kw)


@pytest.mark.parametrize(
    "index",
    [
        torch.tensor([[3, 4], [3, 4]]),  # the same positions in two images
        torch.tensor([[-1, -1], [-1, -1]]),  # padding repeats
        torch.tensor([[4, 0], [-1, 2]]),  # distinct but not ascending
    ],
)
def test_valid_index_passes_the_device_check(index):
    x, index, w = torch.randn(2, 5, 8).to(DEVICE), index.to(DEVICE), torch.ones(8, device=DEVICE)
    out = beit_kernels.masked_gather(x, index, ln_weight=w)
    torch.testing.assert_close(out, reference.masked_gather(x, index, ln_weight=w))


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_forward_and_backward_are_bitwise_reproducible(dtype):
    """BEiT-B's gather of its masked tokens on a GPU (13 tokens in the interpreter, for time): the LayerNorm
    gradients' partial sums are added in a fixed order, so two runs agree bit for bit."""
    T, D, K, counts = (197, 768, 75, (75, 60, 71)) if DEVICE.type == "cuda" else (13, 40, 5, (5, 3, 4))
    g = torch.Generator().manual_seed(8)
    x, w, b = randn(3, T, D, generator=g), randn(D, generator=g), randn(D, generator=g)
    index = padded_index(3, T, K, counts, g)
    grad_out = randn(3 * K, D, generator=g)

    def step():
        out, grads = run(beit_kernels.masked_gather, x, index, w, b, dtype, grad_out)
        return [out.detach(), *grads]

    assert_bitwise_reproducible(step, ("out", "grad x", "grad ln_weight", "grad ln_bias"))


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 at BEiT-B shapes, and no host synchronisation


@pytest.mark.gpu
def test_gpu_bf16_beit_b_matches_reference():
    B, T, D, K = 256, 197, 768, 75
    g = torch.Generator().manual_seed(6)
    counts = torch.randint(40, K + 1, (B,), generator=g).tolist()
    index = padded_index(B, T, K, counts, g)
    x, w, b = (randn(*s, generator=g) for s in ((B, T, D), (D,), (D,)))
    grad_out = randn(B * K, D, generator=g)
    rounded = [t.to(torch.bfloat16).double() for t in (x, w, b)]
    ref, ref_grads = run(reference.masked_gather, *rounded[:1], index, *rounded[1:], torch.float64, grad_out)
    got, grads = run(beit_kernels.masked_gather, x, index, w, b, torch.bfloat16, grad_out)
    base, base_grads = run(reference.masked_gather, x, index, w, b, torch.bfloat16, grad_out)
    check_close("out", got, ref, base, torch.bfloat16)
    for name, gg, rg, bg in zip(("x", "ln_weight", "ln_bias"), grads, ref_grads, base_grads):
        check_close(f"grad {name}", gg, rg, bg, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_no_sync():
    B, T, D, K = 32, 197, 768, 75
    g = torch.Generator().manual_seed(7)
    index = padded_index(B, T, K, [K - (i % 7) for i in range(B)], g)
    x = torch.randn(B, T, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(D, device=DEVICE, requires_grad=True)
    b = torch.zeros(D, device=DEVICE, requires_grad=True)
    with no_host_sync():
        out = beit_kernels.masked_gather(x, index, ln_weight=w, ln_bias=b)
        out.float().square().mean().backward()
    assert torch.isfinite(x.grad.float()).all()
