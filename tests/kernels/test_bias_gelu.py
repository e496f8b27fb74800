"""bias_gelu: bias add fused with the exact GELU, against its float64 reference, both gradients."""

import pytest
import torch
from _testutil import DEVICE, assert_bitwise_reproducible, check_close, no_host_sync

import beit_kernels
from beit_kernels import reference
from beit_kernels.bias_gelu import bias_gelu_bwd, bias_gelu_fwd


def run(fn, x, bias, dtype, grad_out):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, bias)]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out, [t.grad if t is not None else None for t in leaves]


CASES = [
    # x shape, bias
    ((3, 13, 72), True),  # [B, N, D], D not a power of two
    ((2, 197, 48), True),  # BEiT's token count
    ((5, 600), True),  # D wider than one column block: several column programs
    ((3, 13, 72), False),  # GELU alone
    ((40,), True),  # one row
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,has_bias", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_bias_gelu_matches_reference(dtype, shape, has_bias):
    g = torch.Generator().manual_seed(1)
    D = shape[-1]
    x = (torch.randn(*shape, dtype=torch.float64, generator=g) * 3).to(DEVICE)  # reaches both tails of erf
    bias = torch.randn(D, dtype=torch.float64, generator=g).to(DEVICE) if has_bias else None
    grad_out = torch.randn(*shape, dtype=torch.float64, generator=g).to(DEVICE)
    rounded = [t.to(dtype).double() if t is not None else None for t in (x, bias)]
    ref, ref_grads = run(reference.bias_gelu, *rounded, torch.float64, grad_out)
    got, grads = run(beit_kernels.bias_gelu, x, bias, dtype, grad_out)
    base, base_grads = run(reference.bias_gelu, x, bias, dtype, grad_out)
    assert got.dtype == dtype and got.shape == shape
    check_close("out", got, ref, base, dtype)
    for name, gg, rg, bg in zip(("x", "bias"), grads, ref_grads, base_grads):
        assert (gg is None) == (rg is None), name
        if rg is not None:
            assert gg.dtype == dtype, name
            check_close(f"grad {name}", gg, rg, bg, dtype)


def test_strided_rows_and_fp32_bias_with_half_x():
    """A column slice (rows strided, no copy), a non-collapsible view (copied), and the autocast case of an fp32
    bias parameter with half activations: gradients come back in each input's own dtype."""
    g = torch.Generator().manual_seed(2)
    full = torch.randn(3, 14, 80, dtype=torch.float64, generator=g).to(DEVICE)
    bias = torch.randn(72, dtype=torch.float64, generator=g).to(DEVICE)
    grad_out = torch.randn(3, 13, 72, dtype=torch.float64, generator=g).to(DEVICE)
    for view in (lambda t: t[:, 1:, :72], lambda t: t[:, :13, :72].transpose(0, 1)):
        x = full.float().requires_grad_()
        out = beit_kernels.bias_gelu(view(x), bias.float())
        expect = grad_out if out.shape == grad_out.shape else grad_out.transpose(0, 1)
        out.backward(expect.float())
        x64, b64 = full.clone().requires_grad_(), bias.clone().requires_grad_()
        ref = reference.bias_gelu(view(x64), b64)
        ref.backward(expect)
        check_close("out", out, ref, None, torch.float32)
        check_close("grad x", x.grad, x64.grad, None, torch.float32)
    xh = full[:, :13, :72].half().requires_grad_()
    bf = bias.float().requires_grad_()
    out = beit_kernels.bias_gelu(xh, bf)
    out.backward(grad_out.half())
    assert out.dtype == xh.grad.dtype == torch.float16 and bf.grad.dtype == torch.float32
    xr, br = xh.detach().double().requires_grad_(), bias.clone().requires_grad_()
    reference.bias_gelu(xr, br).backward(grad_out.half().double())
    assert (bf.grad.double() - br.grad).abs().max() <= 1e-3 * br.grad.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_forward_and_backward_are_bitwise_reproducible(dtype):
    """BEiT-B's MLP at its 197 tokens on a GPU (13 in the interpreter, for time): the bias gradient's partial sums
    are added in a fixed order, so two runs agree bit for bit."""
    N, D = (197, 3072) if DEVICE.type == "cuda" else (13, 72)
    g = torch.Generator().manual_seed(3)
    x, bias = torch.randn(3, N, D, generator=g).to(DEVICE), torch.randn(D, generator=g).to(DEVICE)
    grad_out = torch.randn(3, N, D, generator=g, dtype=torch.float64).to(DEVICE)

    def step():
        out, grads = run(beit_kernels.bias_gelu, x, bias, dtype, grad_out)
        return [out.detach(), *grads]

    assert_bitwise_reproducible(step, ("out", "grad x", "grad bias"))


def test_compiles_without_graph_break():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, 24, generator=g).to(DEVICE).requires_grad_()
    bias = torch.randn(24, generator=g).to(DEVICE).requires_grad_()

    def step(x):
        return beit_kernels.bias_gelu(x * 2, bias).square().sum()

    torch.compile(step, backend="aot_eager", fullgraph=True)(x).backward()
    gx, gb = x.grad.clone(), bias.grad.clone()
    x.grad = bias.grad = None
    step(x).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gb, bias.grad)


def test_opcheck_registrations():
    g = torch.Generator().manual_seed(5)
    x, bias, dy = (torch.randn(*s, generator=g).to(DEVICE) for s in ((2, 7, 24), (24,), (2, 7, 24)))
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(bias_gelu_fwd, (x, bias), test_utils=checks)
    torch.library.opcheck(bias_gelu_fwd, (x[:, 1:], None), test_utils=checks)
    torch.library.opcheck(bias_gelu_bwd, (dy, x, bias), test_utils=checks)
    torch.library.opcheck(bias_gelu_bwd, (dy, x, None), test_utils=checks)


X = torch.zeros(2, 5, 8, device=DEVICE)


@pytest.mark.parametrize(
    "x,bias,err,match",
    [
        (torch.zeros((), device=DEVICE), None, ValueError, "at least one dimension"),
        (X.double(), None, TypeError, "fp32, fp16 or bf16"),
        (X.transpose(1, 2), None, ValueError, "unit stride"),
        (X, torch.zeros(7, device=DEVICE), ValueError, r"bias must be \[8\]"),
        (X, torch.zeros(8, dtype=torch.int32, device=DEVICE), TypeError, "bias must be a float"),
        (X, torch.zeros(8, device="meta"), ValueError, "bias is on meta"),
        ([[0.0]], None, TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise(x, bias, err, match):
    with pytest.raises(err, match=match):
        beit_kernels.bias_gelu(x, bias)


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 at BEiT-B's MLP shape, and no host synchronisation


@pytest.mark.gpu
@pytest.mark.parametrize("loop_stages", [None, 3])
def test_gpu_bf16_beit_b_matches_reference(tuned, loop_stages):
    tuned({"bias_gelu.bwd": {"loop_stages": loop_stages}})
    g = torch.Generator().manual_seed(6)
    x = torch.randn(32, 197, 3072, dtype=torch.float64, generator=g).to(DEVICE) * 3
    bias = torch.randn(3072, dtype=torch.float64, generator=g).to(DEVICE)
    grad_out = torch.randn(32, 197, 3072, dtype=torch.float64, generator=g).to(DEVICE)
    dt = torch.bfloat16
    ref, ref_grads = run(reference.bias_gelu, x.to(dt).double(), bias.to(dt).double(), torch.float64, grad_out)
    got, grads = run(beit_kernels.bias_gelu, x, bias, dt, grad_out)
    base, base_grads = run(reference.bias_gelu, x, bias, dt, grad_out)
    check_close("out", got, ref, base, dt)
    for name, gg, rg, bg in zip(("x", "bias"), grads, ref_grads, base_grads):
        check_close(f"grad {name}", gg, rg, bg, dt)


@pytest.mark.gpu
def test_gpu_no_sync():
    x = torch.randn(32 * 197, 3072, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(3072, device=DEVICE, requires_grad=True)
    with no_host_sync():
        beit_kernels.bias_gelu(x, bias).float().square().mean().backward()
    assert torch.isfinite(bias.grad).all()
