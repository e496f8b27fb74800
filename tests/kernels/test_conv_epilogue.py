"""conv_epilogue: bias, residual add, 2x2 max-pool and ReLU after a convolution, against the unfused chain."""

import math

import pytest
import torch
from _testutil import DEVICE, no_host_sync

import beit_kernels
from beit_kernels import reference
from beit_kernels.backend import interpreting

CL = torch.channels_last


def make(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)
    return t.contiguous(memory_format=CL) if t.dim() == 4 else t


# name -> keyword arguments besides x; "res" and "rbias" are filled in with tensors
MODES = {
    "bias_relu_inplace": dict(return_out=False, inplace=True),  # a hidden convolution
    "bias_out_relu": dict(),  # the input convolution: out for the identity path, relu for the residual path
    "block_tail": dict(res=True, rbias=True, gain=1 / 64),  # a block with a 1x1 identity convolution
    "block_tail_identity_inplace": dict(res=True, gain=1 / 64, inplace=True),
    "block_tail_pool": dict(res=True, rbias=True, gain=1 / 64, pool=True),
    "last_block_fp32_relu": dict(res=True, gain=1 / 64, return_out=False, relu_dtype=torch.float32),
    "no_bias": dict(bias=False),
}
SHAPES = [(3, 5, 7, 9), (2, 130, 4, 6), (1, 64, 6, 7)]  # odd channels and sides; two channel blocks; odd width


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_unfused_chain_bitwise(dtype, shape, mode):
    """Each step rounds as the unfused chain does, and the gains are powers of two: equal bit for bit (bf16 under
    the interpreter excepted)."""
    spec = dict(MODES[mode])
    C = shape[1]
    kwargs = {}
    bias = make((C,), torch.float32, 1) if spec.pop("bias", True) else None  # fp32 parameters, as under autocast
    if spec.pop("res", False):
        kwargs["residual"] = make(shape, dtype, 2, scale=4.0)
    if spec.pop("rbias", False):
        kwargs["residual_bias"] = make((C,), torch.float32, 3)
    kwargs.update(spec)
    x = make(shape, dtype, 0, scale=3.0)
    x_ref = x.clone()
    out, relu = beit_kernels.conv_epilogue(x, bias, **kwargs)
    ref_out, ref_relu = reference.conv_epilogue(x_ref, bias, **kwargs)
    assert (out is None) == (ref_out is None)
    for got, want in ((out, ref_out), (relu, ref_relu)):
        if want is None:
            continue
        assert got.shape == want.shape and got.dtype == want.dtype
        assert got.is_contiguous(memory_format=CL)
        err = (got.double() - want.double()).abs().max().item()
        if dtype == torch.bfloat16 and interpreting():
            # Triton's interpreter casts fp32 to bf16 by truncation where GPUs round to nearest even (Triton 3.9):
            # within a few bf16 steps here, bit for bit on a GPU.
            assert err <= 2**-5 * want.double().abs().max().item(), err
        else:
            assert torch.equal(got, want), err
    if kwargs.get("inplace"):
        first = out if out is not None else relu
        assert first.data_ptr() == x.data_ptr()
    else:
        assert torch.equal(x, x_ref)  # x untouched


def test_any_gain_against_float64():
    """A gain that is not a power of two: fp32 within rounding of the float64 chain."""
    shape = (3, 6, 5, 7)
    x, res = make(shape, torch.float32, 0), make(shape, torch.float32, 1)
    bias, rbias = make((6,), torch.float32, 2), make((6,), torch.float32, 3)
    out, relu = beit_kernels.conv_epilogue(x, bias, residual=res, residual_bias=rbias, gain=0.3, pool=True)
    ref_out, ref_relu = reference.conv_epilogue(x.double(), bias.double(), residual=res.double(),
                                                residual_bias=rbias.double(), gain=0.3, pool=True)  # fmt: skip
    assert (out.double() - ref_out).abs().max() <= 1e-6
    assert (relu.double() - ref_relu).abs().max() <= 1e-6


def test_nan_propagates_through_pool_and_relu():
    x = make((1, 3, 4, 4), torch.float32, 0)
    x[0, 1, 2, 3] = math.nan
    out, relu = beit_kernels.conv_epilogue(x, None, pool=True)
    ref_out, ref_relu = reference.conv_epilogue(x, None, pool=True)
    assert torch.isnan(out[0, 1, 1, 1]) and torch.isnan(relu[0, 1, 1, 1])
    assert torch.equal(out.nan_to_num(7.0), ref_out.nan_to_num(7.0))
    assert torch.equal(relu.nan_to_num(7.0), ref_relu.nan_to_num(7.0))


def test_custom_op_passes_opcheck():
    x, res = make((2, 5, 6, 6), torch.float32, 0), make((2, 5, 6, 6), torch.float32, 1)
    bias, rbias = make((5,), torch.float32, 2), make((5,), torch.float32, 3)
    for pool in (False, True):
        shape = (2, 5, 3, 3) if pool else (2, 5, 6, 6)
        out = torch.empty(shape, device=DEVICE).contiguous(memory_format=CL)
        relu = torch.empty(shape, device=DEVICE).contiguous(memory_format=CL)
        args = (x, bias, res, rbias, 0.5, pool, out, relu)
        torch.library.opcheck(torch.ops.beit_kernels.conv_epilogue.default, args)


def test_empty_batch():
    x = make((0, 4, 6, 6), torch.float32, 0)
    out, relu = beit_kernels.conv_epilogue(x, None, pool=True)
    assert out.shape == relu.shape == (0, 4, 3, 3)


def test_bad_input_is_refused_before_any_work():
    x = make((2, 4, 6, 6), torch.float32, 0)
    res = make((2, 4, 6, 6), torch.float32, 1)
    cases = [
        (ValueError, "channels_last", lambda: beit_kernels.conv_epilogue(x.contiguous(), None)),
        (ValueError, r"\[B, C, H, W\]", lambda: beit_kernels.conv_epilogue(x[0], None)),
        (TypeError, "fp32, fp16 or bf16", lambda: beit_kernels.conv_epilogue(x.double(), None)),
        (ValueError, "bias must be", lambda: beit_kernels.conv_epilogue(x, torch.zeros(5, device=DEVICE))),
        (ValueError, "residual must match", lambda: beit_kernels.conv_epilogue(x, None, residual=res.half())),
        (ValueError, "residual must be channels_last",
         lambda: beit_kernels.conv_epilogue(x, None, residual=res.contiguous())),
        (ValueError, "needs a residual",
         lambda: beit_kernels.conv_epilogue(x, None, residual_bias=torch.zeros(4, device=DEVICE))),
        (ValueError, "must be 1", lambda: beit_kernels.conv_epilogue(x, None, gain=0.5)),
        (ValueError, "cannot pool", lambda: beit_kernels.conv_epilogue(x, None, pool=True, inplace=True)),
        (ValueError, "keeps x's dtype", lambda: beit_kernels.conv_epilogue(
            x, None, return_out=False, inplace=True, relu_dtype=torch.float16)),
        (RuntimeError, "inference only",
         lambda: beit_kernels.conv_epilogue(x, torch.zeros(4, device=DEVICE, requires_grad=True))),
    ]  # fmt: skip
    before = x.clone()
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    assert torch.equal(x, before)
    with torch.no_grad():  # the same tensor is fine without grad mode
        beit_kernels.conv_epilogue(x, torch.zeros(4, device=DEVICE, requires_grad=True))


@pytest.mark.gpu
def test_gpu_bf16_no_sync_and_graph_capture():
    shape = (3, 256, 28, 28)
    x, res = make(shape, torch.bfloat16, 0), make(shape, torch.bfloat16, 1)
    bias = make((256,), torch.float32, 2)
    with no_host_sync():
        out, relu = beit_kernels.conv_epilogue(x, bias, residual=res, gain=1 / 64, pool=True)
    ref_out, ref_relu = reference.conv_epilogue(x, bias, residual=res, gain=1 / 64, pool=True)
    assert torch.equal(out, ref_out) and torch.equal(relu, ref_relu)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_relu = beit_kernels.conv_epilogue(x, bias, residual=res, gain=1 / 64, pool=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g_out, ref_out) and torch.equal(g_relu, ref_relu)
