"""masked_gather: the sync-free gather (with fused LayerNorm) against its float64 reference, every gradient."""

import pytest
import torch
from _testutil import check_close, no_host_sync

import beit_kernels
from beit_kernels import reference
from beit_kernels.masked_gather import masked_gather_bwd, masked_gather_fwd


def padded_index(B, T, K, counts, generator, dtype=torch.int64):
    """[B, K]: counts[b] distinct ascending positions in [0, T), then -1 padding."""
    rows = []
    for c in counts:
        pos = torch.randperm(T, generator=generator)[:c].sort().values
        rows.append(torch.cat((pos, torch.full((K - c,), -1, dtype=torch.int64))))
    return torch.stack(rows).to(dtype)


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
    x = torch.randn(B, T, D, dtype=torch.float64, generator=g) * 2 + 0.5
    w = torch.randn(D, dtype=torch.float64, generator=g) if "w" in ln else None
    b = torch.randn(D, dtype=torch.float64, generator=g) if "b" in ln else None
    index = padded_index(B, T, K, counts, g)
    grad_out = torch.randn(B * K, D, dtype=torch.float64, generator=g)
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
    full = torch.randn(3, 8, 40, generator=g, dtype=torch.float64)
    index = padded_index(3, 7, 4, (4, 2, 0), g, dtype=torch.int32).t().contiguous().t()  # column-major [B, K]
    w, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    grad_out = torch.randn(12, 40, generator=g, dtype=torch.float64)
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
    x = torch.randn(2, 6, 16, generator=g, requires_grad=True)
    index = torch.tensor([[1, 4, -1], [-1, -1, -1]])
    beit_kernels.masked_gather(x, index, ln_weight=torch.ones(16)).sum().mul(0).add(
        beit_kernels.masked_gather(x, index).square().sum()
    ).backward()
    touched = torch.zeros(2, 6, dtype=torch.bool)
    touched[0, 1] = touched[0, 4] = True
    assert torch.equal(x.grad[~touched], torch.zeros_like(x.grad[~touched]))
    torch.testing.assert_close(x.grad[touched], 2 * x.detach()[touched])


def test_eps_is_used():
    x = torch.zeros(1, 3, 8)
    x[0, 0, :4] = 1e-4  # variance 2.5e-9, far below eps=1: the output scales with the eps
    index = torch.tensor([[0]])
    for eps in (1e-6, 1.0):
        got = beit_kernels.masked_gather(x, index, ln_weight=torch.ones(8), eps=eps)
        ref = reference.masked_gather(x.double(), index, ln_weight=torch.ones(8, dtype=torch.float64), eps=eps)
        check_close(f"eps={eps}", got, ref, None, torch.float32)


def test_compiles_without_graph_break():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, 24, generator=g, requires_grad=True)
    w = torch.randn(24, generator=g, requires_grad=True)
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
    x = torch.randn(2, 7, 24, generator=g)
    index = padded_index(2, 7, 3, (3, 1), g)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(masked_gather_fwd, (x, index, torch.ones(24), torch.zeros(24), 1e-6, True), test_utils=checks)
    _, mean, rstd = masked_gather_fwd(x, index, torch.ones(24), None, 1e-6, True)
    dy = torch.randn(6, 24, generator=g)
    x_perm = x.transpose(0, 1).contiguous().transpose(0, 1)  # dense, batch not outermost: grad_x is still contiguous
    torch.library.opcheck(masked_gather_bwd, (dy, x_perm, index, torch.ones(24), mean, rstd, True), test_utils=checks)


X = torch.zeros(2, 5, 8)
IDX = torch.tensor([[0, 1], [2, -1]])


@pytest.mark.parametrize(
    "x,index,kw,err,match",
    [
        (torch.zeros(5, 8), IDX, {}, ValueError, r"\[B, T, D\]"),
        (X.long(), IDX, {}, TypeError, "fp32, fp16 or bf16"),
        (X, IDX.float(), {}, TypeError, "int32 or int64"),
        (X, IDX[:1], {}, ValueError, r"\[B, K\] with B=2"),
        (X, IDX[0], {}, ValueError, r"\[B, K\]"),
        (X.transpose(1, 2).contiguous().transpose(1, 2), IDX, {}, ValueError, "unit stride"),
        (X, IDX, dict(ln_weight=torch.ones(7)), ValueError, r"ln_weight must be \[8\]"),
        (X, IDX, dict(ln_bias=torch.ones(8, dtype=torch.int64)), TypeError, "ln_bias must be a float"),
        (X, IDX, dict(ln_weight=torch.ones(8), eps=0.0), ValueError, "eps must be positive"),
        # Values are checked on the device (no host sync); on the CPU the assert fires at once.
        (X, torch.tensor([[0, 5], [2, -1]]), {}, RuntimeError, "distinct positions"),
        (X, torch.tensor([[0, -2], [2, -1]]), {}, RuntimeError, "distinct positions"),
        (X, torch.tensor([[3, 3], [2, -1]]), {}, RuntimeError, "distinct positions"),
        (X, torch.tensor([[0, 1], [4, 4]], dtype=torch.int32), {}, RuntimeError, "distinct positions"),
        (X, torch.tensor([[0, 1, -1], [2, 1, -3]]), {}, RuntimeError, "distinct positions"),
        # Zero-width rows still check their index (the kernel launches with one masked lane).
        (torch.zeros(2, 5, 0), torch.tensor([[1, 1], [2, -1]]), {}, RuntimeError, "distinct positions"),
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
    x = torch.randn(2, 5, 8)
    out = beit_kernels.masked_gather(x, index, ln_weight=torch.ones(8))
    torch.testing.assert_close(out, reference.masked_gather(x, index, ln_weight=torch.ones(8)))


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 at BEiT-B shapes, and no host synchronisation


@pytest.mark.gpu
def test_gpu_bf16_beit_b_matches_reference():
    B, T, D, K = 256, 197, 768, 75
    g = torch.Generator().manual_seed(6)
    counts = torch.randint(40, K + 1, (B,), generator=g).tolist()
    index = padded_index(B, T, K, counts, g).cuda()
    x, w, b = (torch.randn(*s, dtype=torch.float64, generator=g).cuda() for s in ((B, T, D), (D,), (D,)))
    grad_out = torch.randn(B * K, D, dtype=torch.float64, generator=g).cuda()
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
    index = padded_index(B, T, K, [K - (i % 7) for i in range(B)], g).cuda()
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(D, device="cuda", requires_grad=True)
    b = torch.zeros(D, device="cuda", requires_grad=True)
    with no_host_sync():
        out = beit_kernels.masked_gather(x, index, ln_weight=w, ln_bias=b)
        out.float().square().mean().backward()
    assert torch.isfinite(x.grad.float()).all()
