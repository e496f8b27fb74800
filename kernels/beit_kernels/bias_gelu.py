"""Bias add fused with the exact (erf) GELU, and its gradient with the bias gradient reduced in the same pass.

Math (x [..., D] seen as [M, D], bias [D]):

    z   = x + bias
    out = GELU(z) = z * Phi(z) = 0.5 z (1 + erf(z / sqrt(2)))
    dz  = dout * (Phi(z) + z * phi(z)),    phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
    dx  = dz,    dbias = sum over the M rows of dz

This is the middle of a ViT MLP, ``fc2(GELU(fc1(y)))``, with fc1 run without its bias: one read of x and one write
of the output, and in backward one read of x and dout, one write of dx, with dbias summed as dx is made instead of
in another pass over dx. Only x (and bias) are saved, as the GELU of the unfused chain saves its input; z is
recomputed. Every step runs in fp32 and rounds once, on store.

Backward: programs tile the [M, D] gradient as (column block, row group): each program keeps one column block and
loops over the row tiles of its group, accumulating dz in fp32 registers; it writes one row of a [G, D] fp32
partial buffer, which the host sums. No atomics: dbias is bitwise reproducible for a given device and shape.

Shapes and dtypes:
    x       [..., D] (at least 1-D), fp32, fp16 or bf16; the last dimension contiguous. Leading dimensions that do
            not collapse into one row stride are copied first (``reshape``).
    bias    [D] float or None, any float dtype (an fp32 parameter with bf16 x is the autocast case).
    out     x's shape, contiguous, in x's dtype. Gradients: x in its dtype, bias in its own dtype.

Erf: ``tl.erf`` (fp32), in Triton since 2.x, in 3.6 and 3.9, and in the interpreter (via ``math.erf``).
Tiles: ``beit_kernels.tuning`` (entries ``bias_gelu.fwd`` and ``bias_gelu.bwd``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from beit_kernels import tuning
from beit_kernels.backend import call_op, cdiv, check_kernel_device, check_vector, fill_programs

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _gelu_parts(z):
    """(Phi(z), phi(z)) in fp32: the normal CDF and density."""
    cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    return cdf, pdf


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr,
    b_ptr,
    out_ptr,
    M,
    D,
    s_xm,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows < M)[:, None] & col_ok[None, :]
    z = tl.load(x_ptr + rows[:, None] * s_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    cdf, _ = _gelu_parts(z)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], (z * cdf).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    dy_ptr,  # [M, D] contiguous
    x_ptr,
    b_ptr,
    dx_ptr,  # [M, D] contiguous
    db_ptr,  # fp32 [G, D] partials
    M,
    D,
    s_xm,
    n_row_tiles,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    grp = tl.program_id(1)
    G = tl.num_programs(1)
    col_ok = cols < D
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    # Elementwise fp32 accumulator, reduced over rows once at the end: no cross-thread reduction per tile.
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # LOOP_STAGES None: the loop without the attribute, which the compiler does not pipeline (ptxas shows no
    # prefetch); 2 or more asks it to prefetch later tiles' loads through shared memory.
    for tile in tl.range(grp, n_row_tiles, G, num_stages=LOOP_STAGES):
        rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < M)[:, None] & col_ok[None, :]
        z = tl.load(x_ptr + rows[:, None] * s_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += bias[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        cdf, pdf = _gelu_parts(z)
        dz = dy * (cdf + z * pdf)
        tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dz.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            acc += dz  # dy is 0 outside the mask, so is dz
    if HAS_BIAS:
        tl.store(db_ptr + grp.to(tl.int64) * D + cols, tl.sum(acc, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------------------------
# Host launchers


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [M, D] with a unit column stride: a view when the leading dimensions collapse, else a copy."""
    return x.reshape(-1, x.shape[-1])


def _bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GELU(x + bias) in x's dtype, contiguous, x's shape."""
    out = x.new_empty(x.shape)
    x2 = _rows(x)
    M, D = x2.shape
    if M == 0 or D == 0:
        return out
    block_m, block_d, warps = tuning.bias_gelu_tile(D, backward=False)
    _bias_gelu_fwd_kernel[(cdiv(M, block_m), cdiv(D, block_d))](
        x2,
        bias if bias is not None else out,
        out,
        M,
        D,
        x2.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return out


bias_gelu_fwd = torch.library.custom_op("beit_kernels::bias_gelu_fwd", _bias_gelu_fwd, mutates_args=())


@bias_gelu_fwd.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


def _bias_gelu_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_x in x's dtype, contiguous; grad_bias [D] fp32, empty without a bias)."""
    grad_out = grad_out.contiguous()
    grad_x = x.new_empty(x.shape)
    x2 = _rows(x)
    M, D = x2.shape
    block_m, block_d, warps = tuning.bias_gelu_tile(max(D, 1), backward=True)
    n_row_tiles = cdiv(M, block_m)
    n_col_tiles = cdiv(D, block_d)
    if x.device.type == "cuda":
        groups = cdiv(fill_programs(x.device), max(n_col_tiles, 1))
    else:
        groups = 2  # the interpreter runs programs one by one; two exercise the partial sums
    groups = max(1, min(groups, n_row_tiles))
    # Each launched (column block, group) program stores its part of the group's row of partials.
    alloc = torch.empty if M > 0 and D > 0 else torch.zeros
    db = alloc(groups if bias is not None else 0, D, device=x.device, dtype=torch.float32)
    if M > 0 and D > 0:
        _bias_gelu_bwd_kernel[(n_col_tiles, groups)](
            grad_out,
            x2,
            bias if bias is not None else db,
            grad_x,
            db,
            M,
            D,
            x2.stride(0),
            n_row_tiles,
            HAS_BIAS=bias is not None,
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            LOOP_STAGES=tuning.get("bias_gelu.bwd")["loop_stages"],
            num_warps=warps,
        )
    # A fixed-order sum over the G partials.
    return grad_x, db.sum(0) if bias is not None else db.new_zeros(0)


bias_gelu_bwd = torch.library.custom_op("beit_kernels::bias_gelu_bwd", _bias_gelu_bwd, mutates_args=())


@bias_gelu_bwd.register_fake
def _(grad_out, x, bias):
    return x.new_empty(x.shape), x.new_empty(x.shape[-1] if bias is not None else 0, dtype=torch.float32)


def _validate(x, bias):
    """Clear errors for bad input before any launch."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"bias_gelu: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("bias_gelu: x must have at least one dimension ([..., D])")
    if x.dtype not in _DTYPES:
        raise TypeError(f"bias_gelu: x must be fp32, fp16 or bf16, got {x.dtype}")
    check_kernel_device("bias_gelu", x)
    D = x.shape[-1]
    if D > 1 and x.stride(-1) != 1:
        raise ValueError(f"bias_gelu: x must have a unit stride on its last dimension, got {x.stride()}")
    check_vector("bias_gelu", "bias", bias, D, x.device)


# ----------------------------------------------------------------------------------------------------------------
# Autograd


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        out = call_op(bias_gelu_fwd, _bias_gelu_fwd, x, bias)
        ctx.save_for_backward(x, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, bias = ctx.saved_tensors
        grad_x, grad_bias = call_op(bias_gelu_bwd, _bias_gelu_bwd, grad_out, x, bias)
        need = ctx.needs_input_grad
        return grad_x if need[0] else None, grad_bias.to(bias.dtype) if bias is not None and need[1] else None


# ----------------------------------------------------------------------------------------------------------------
# Public function


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Exact (erf) GELU of ``x + bias`` for x [..., D], bias [D] or None; differentiable in x and the bias.

    See the module docstring for dtypes and reproducibility.
    """
    _validate(x, bias)
    return BiasGeluFunction.apply(x, bias.contiguous() if bias is not None else None)
