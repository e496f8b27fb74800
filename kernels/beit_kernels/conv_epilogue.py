"""The elementwise tail of a convolution, fused: bias, residual add, 2x2 max-pool and ReLU in one pass (inference).

Math (x [B, C, H, W] a convolution's output without its bias; every step rounded to x's dtype, as the unfused
PyTorch chain rounds each op's result):

    t    = x + bias                                   bias rounded to x's dtype first, as autocast casts it
    out  = (residual + residual_bias) + gain * t      with a residual (one rounding, as torch.add(r, t, alpha=gain))
    out  = t                                          without one
    out  = max_pool2d(out, 2)                         with ``pool`` (floor: odd trailing rows and columns dropped)
    relu = max(out, 0)                                in ``relu_dtype`` (default x's dtype); NaN stays NaN

This is the glue of a ResNet-style encoder such as the DALL-E dVAE's: after each hidden 3x3 convolution the bias
add and the ReLU (PyTorch's cuDNN path adds a convolution's bias in a pass of its own), and at the end of each
residual block the bias of the last convolution, the bias of the 1x1 identity convolution, the scaled residual add,
the next block's ReLU and, at the end of a group, the max-pool. The unfused chain reads and writes the block's
full-resolution output four to six times; this reads x and the residual once and writes out and relu once (at a
quarter of the size when pooling). Both out and relu are returned because a residual encoder needs both: out for
the next identity path, relu for the next residual path.

Shapes, dtypes and layout:
    x              [B, C, H, W], fp32, fp16 or bf16, channels_last memory (``x.is_contiguous(memory_format=
                   torch.channels_last)``): what a convolution gives on channels_last input and weights.
    bias, residual_bias   [C] float or None; rounded to x's dtype before use.
    residual       None or [B, C, H, W] in x's dtype and layout.
    gain           a float; only with a residual (without one it must be 1).
    out            [B, C, H, W] ([B, C, H/2, W/2] pooled) channels_last in x's dtype, or None (``return_out``
                   False: only relu is written).
    relu           the same shape, channels_last, in ``relu_dtype``.
    ``inplace``    writes the first returned tensor (out, or relu without out) into x's memory: no allocation, for a
                   convolution output nobody else reads. Not with ``pool`` (the sizes differ).

Limits: inference only, no backward (the tokenizer it serves is frozen); an input that requires grad under grad
mode is refused. Tiles: ``beit_kernels.tuning`` (entries ``conv_epilogue.epi`` and ``conv_epilogue.epi_pool``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from beit_kernels import tuning
from beit_kernels.backend import call_op, cdiv, check_kernel_device, check_vector

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _pixel_value(x_ptr, r_ptr, pix, cols, mask, C, bias, rbias, gain,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RES_BIAS: tl.constexpr):  # fmt: skip
    """out before pooling, in fp32, at pixels ``pix`` [BLOCK_P] and channels ``cols`` [BLOCK_C], rounded to x's
    dtype after each step as the unfused chain rounds."""
    offs = pix[:, None] * C + cols[None, :]
    dt = x_ptr.dtype.element_ty
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v = (v + bias[None, :]).to(dt).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES_BIAS:
            r = (r + rbias[None, :]).to(dt).to(tl.float32)
        v = (r + gain * v).to(dt).to(tl.float32)
    return v


@triton.jit
def _conv_epilogue_kernel(
    x_ptr,  # [B, H, W, C] memory
    b_ptr,
    r_ptr,  # [B, H, W, C] memory
    rb_ptr,
    out_ptr,  # [B, OH, OW, C] memory
    relu_ptr,  # [B, OH, OW, C] memory
    P,  # output pixels: B * OH * OW
    C,
    H,
    W,
    OH,
    OW,
    gain,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_RES_BIAS: tl.constexpr,
    POOL: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pix = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (pix < P)[:, None] & col_ok[None, :]
    dt = x_ptr.dtype.element_ty
    bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    rbias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(dt).to(tl.float32)
    if HAS_RES_BIAS:
        rbias = tl.load(rb_ptr + cols, mask=col_ok, other=0.0).to(dt).to(tl.float32)
    if POOL:
        ow = pix % OW
        rest = pix // OW
        oh = rest % OH
        b = rest // OH
        top_left = (b * H + 2 * oh) * W + 2 * ow  # [BLOCK_P] input pixel of the window's first tap
        v = _pixel_value(x_ptr, r_ptr, top_left, cols, mask, C, bias, rbias, gain, HAS_BIAS, HAS_RES, HAS_RES_BIAS)
        for tap in tl.static_range(1, 4):
            src = top_left + (tap // 2) * W + (tap % 2)
            u = _pixel_value(x_ptr, r_ptr, src, cols, mask, C, bias, rbias, gain, HAS_BIAS, HAS_RES, HAS_RES_BIAS)
            v = tl.maximum(v, u, propagate_nan=tl.PropagateNan.ALL)  # max_pool2d propagates NaN
    else:
        v = _pixel_value(x_ptr, r_ptr, pix, cols, mask, C, bias, rbias, gain, HAS_BIAS, HAS_RES, HAS_RES_BIAS)
    offs = pix[:, None] * C + cols[None, :]
    if WRITE_OUT:
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)
    relu = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(relu_ptr + offs, relu.to(relu_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Host launchers


def _channels_last_empty(like: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, device=like.device, dtype=dtype, memory_format=torch.channels_last)


def _conv_epilogue_op(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    residual_bias: torch.Tensor | None,
    gain: float,
    pool: bool,
    out: torch.Tensor | None,
    relu_out: torch.Tensor,
) -> None:
    """Writes out (when given) and relu_out, both channels_last of the output size. The public function may pass
    x itself as either (``inplace``): every program reads its own tile of x before writing it, and under
    torch.compile the functionalised op writes a copy, so x's aliasing is not declared in the schema."""
    B, C, H, W = x.shape
    OH, OW = relu_out.shape[2], relu_out.shape[3]
    P = B * OH * OW
    if P == 0 or C == 0:
        return
    block_p, block_c, warps = tuning.conv_epilogue_tile(C, pool)
    _conv_epilogue_kernel[(cdiv(P, block_p), cdiv(C, block_c))](
        x,
        bias if bias is not None else x,
        residual if residual is not None else x,
        residual_bias if residual_bias is not None else x,
        out if out is not None else relu_out,
        relu_out,
        P,
        C,
        H,
        W,
        OH,
        OW,
        float(gain),
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        HAS_RES_BIAS=residual_bias is not None,
        POOL=pool,
        WRITE_OUT=out is not None,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=warps,
    )


conv_epilogue_op = torch.library.custom_op(
    "beit_kernels::conv_epilogue", _conv_epilogue_op, mutates_args=("out", "relu_out")
)


@conv_epilogue_op.register_fake
def _(x, bias, residual, residual_bias, gain, pool, out, relu_out):
    return None


def _validate(x, bias, residual, residual_bias, gain, pool, relu_dtype, inplace):
    """Clear errors for bad input before any launch."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"conv_epilogue: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"conv_epilogue: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"conv_epilogue: x must be fp32, fp16 or bf16, got {x.dtype}")
    check_kernel_device("conv_epilogue", x)
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(
            "conv_epilogue: x must be channels_last (x.contiguous(memory_format=torch.channels_last)), got strides "
            f"{x.stride()} for shape {tuple(x.shape)}"
        )
    C = x.shape[1]
    check_vector("conv_epilogue", "bias", bias, C, x.device)
    check_vector("conv_epilogue", "residual_bias", residual_bias, C, x.device)
    if residual is None:
        if residual_bias is not None:
            raise ValueError("conv_epilogue: residual_bias needs a residual")
        if gain != 1.0:
            raise ValueError(f"conv_epilogue: gain scales x with a residual; without one it must be 1, got {gain}")
    else:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"conv_epilogue: residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                f"conv_epilogue: residual must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                f"({tuple(residual.shape)}, {residual.dtype}, {residual.device})"
            )
        if not residual.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"conv_epilogue: residual must be channels_last, got strides {residual.stride()}")
    if relu_dtype is not None and relu_dtype not in _DTYPES:
        raise TypeError(f"conv_epilogue: relu_dtype must be fp32, fp16, bf16 or None, got {relu_dtype}")
    if inplace and pool:
        raise ValueError("conv_epilogue: inplace cannot pool (the output is a quarter of x's size)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, residual, residual_bias)):
        raise RuntimeError(
            "conv_epilogue is inference only (it has no backward): call it under torch.no_grad(), or detach"
        )


# ----------------------------------------------------------------------------------------------------------------
# Public function


def conv_epilogue(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    residual: torch.Tensor | None = None,
    residual_bias: torch.Tensor | None = None,
    gain: float = 1.0,
    pool: bool = False,
    return_out: bool = True,
    relu_dtype: torch.dtype | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(out, relu(out)) for a convolution's output x without its bias; see the module docstring for the math.

    ``return_out=False`` returns (None, relu) and writes no out. ``inplace`` puts the first returned tensor in x's
    memory (then x itself is returned in that place)."""
    _validate(x, bias, residual, residual_bias, gain, pool, relu_dtype, inplace)
    B, C, H, W = x.shape
    shape = (B, C, H // 2, W // 2) if pool else (B, C, H, W)
    relu_dtype = relu_dtype if relu_dtype is not None else x.dtype
    if inplace and not return_out and relu_dtype != x.dtype:
        raise ValueError(f"conv_epilogue: an in-place relu keeps x's dtype {x.dtype}, got relu_dtype {relu_dtype}")
    out = (x if inplace else _channels_last_empty(x, shape, x.dtype)) if return_out else None
    relu = x if inplace and not return_out else _channels_last_empty(x, shape, relu_dtype)
    bias, residual_bias = (t.contiguous() if t is not None else None for t in (bias, residual_bias))
    call_op(conv_epilogue_op, _conv_epilogue_op, x, bias, residual, residual_bias, float(gain), bool(pool), out, relu)
    return out, relu
