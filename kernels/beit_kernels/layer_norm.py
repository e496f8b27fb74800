"""Residual add (with layer scale and drop path) fused with the LayerNorm that follows it, and its gradient.

Math (x, branch [B, N, D]; rows r = b N + n; s = sample_scale):

    h[b, n, :] = x[b, n, :] + s[b] * gamma * branch[b, n, :]        (h = x when branch is None)
    y[b, n, :] = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias    (biased variance, as nn.LayerNorm)

This is the glue between the branches of a pre-norm ViT block, ``x = x + drop_path(gamma * branch)`` followed by
``norm(x)``: one read of x and branch, one write of h and y, instead of the four to six passes the separate ops
make. Drop path is a per-sample scale: s[b] = 0 for a dropped sample, 1 / keep_prob for a kept one (the caller
draws it, so this op is deterministic). The LayerNorm statistics are taken of h as stored (rounded to its dtype),
exactly as the unfused chain does, so the backward (which reloads h) and the forward see the same input.

Backward, with xhat = (h - mean) * rstd, wdy = weight * dy and means over the D features:

    dh       = grad_h + rstd * (wdy - xhat * mean(xhat * wdy) - mean(wdy))
    dx       = dh,     dbranch = s[b] * gamma * dh
    dgamma   = sum over rows of s[b] * branch * dh,   dweight = sum of dy * xhat,   dbias = sum of dy

The forward saves only the per-row mean and 1/std (fp32) besides h (the next block's input, kept anyway) and, when
gamma takes a gradient, branch (as ``gamma * branch`` in PyTorch does). The backward runs a fixed number of
programs, each looping over row tiles and keeping fp32 partial sums of dgamma, dweight and dbias in its own row of
a [G, D] buffer that the host sums: no atomics, so gradients are bitwise reproducible for a given device and shape.

Shapes and dtypes:
    x            [B, N, D] fp32, fp16 or bf16; any strides with a unit stride on D.
    branch       [B, N, D] or None, fp32, fp16 or bf16 (it may differ from x's: under autocast the residual
                 stream is fp32 and the branch, a Linear's output, bf16); any strides with a unit stride on D.
    gamma        [D] float or None (1); needs branch.
    weight, bias [D] float or None each (1 and 0).
    sample_scale [B] float or None (1); needs branch; gets no gradient (one that requires it is refused).
    h            [B, N, D] contiguous, in x's dtype: the residual stream keeps its dtype (PyTorch would promote
                 ``bf16 x + fp32 gamma * branch`` to fp32; pass an fp32 x for an fp32 stream). ``x`` itself (no
                 copy) when branch is None.
    y            [B, N, D] contiguous, in ``y_dtype`` (default x's dtype; pass the autocast dtype to feed the next
                 Linear without the cast autocast would add). Statistics and every per-row step in fp32.
Gradients: x, branch, gamma, weight, bias, each in its own dtype; either of grad_h and grad_y may be absent.

Limits: D <= 4096 (a row is one block of registers; wider rows spill in the backward). Tiles: ``beit_kernels.tuning``
(entries ``layer_norm.fwd`` and ``layer_norm.bwd``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from beit_kernels import tuning
from beit_kernels.backend import call_op, cdiv, check_kernel_device, check_vector, persistent_programs

_MAX_D = 4096
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _add_ln_fwd_kernel(
    x_ptr,
    br_ptr,
    g_ptr,
    s_ptr,
    w_ptr,
    b_ptr,
    h_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    R,
    N,
    D,
    s_xb,
    s_xn,
    s_bb,
    s_bn,
    eps,
    HAS_BRANCH: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    b = rows // N
    n = rows % N
    h = tl.load(x_ptr + (b * s_xb + n * s_xn)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        br = tl.load(br_ptr + (b * s_bb + n * s_bn)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            br = br * tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            br = br * tl.load(s_ptr + b, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        h = (h + br).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * D + cols[None, :], h, mask=mask)
        # Normalise h as stored, as the unfused chain does and as the backward sees it.
        h = h.to(tl.float32)
    mean = tl.sum(h, axis=1) / D
    hc = tl.where(mask, h - mean[:, None], 0.0)
    var = tl.sum(hc * hc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    y = hc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add_ln_bwd_kernel(
    dh_ptr,  # [R, D] contiguous
    dy_ptr,  # [R, D] contiguous
    h_ptr,
    br_ptr,
    g_ptr,
    s_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,  # [R, D] contiguous
    dbr_ptr,  # [R, D] contiguous
    dg_ptr,  # fp32 [G, D] partials
    dw_ptr,  # fp32 [G, D] partials
    db_ptr,  # fp32 [G, D] partials
    R,
    N,
    D,
    n_tiles,
    s_hb,
    s_hn,
    s_bb,
    s_bn,
    HAS_DH: tl.constexpr,
    HAS_DY: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_W: tl.constexpr,
    WRITE_DX: tl.constexpr,
    WRITE_DBR: tl.constexpr,
    GAMMA_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
    JOINT_SUMS: tl.constexpr,
):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        g = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    # [BLOCK_M, BLOCK_D] accumulators, reduced over rows once at the end. Column sums per tile (into [BLOCK_D]) cost
    # fewer registers but three cross-warp reductions through shared memory, with barriers, every BLOCK_M rows,
    # which made the backward much slower.
    acc_w = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # LOOP_STAGES None: the loop without the attribute, which the compiler does not pipeline (ptxas shows no
    # prefetch); 2 or more asks it to prefetch later tiles' loads through shared memory.
    for tile in tl.range(pid, n_tiles, G, num_stages=LOOP_STAGES):
        rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < R
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * D + cols[None, :]
        b = rows // N
        n = rows % N
        dh = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if HAS_DY:
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + (b * s_hb + n * s_hn)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
            wdy = dy
            if HAS_W:
                wdy = dy * w[None, :]
            if JOINT_SUMS:
                # Both row sums in one reduction: one exchange between warps (and its barriers) instead of two.
                s1, s2 = tl.reduce((xhat * wdy, wdy), 1, _add_pair)
                c1 = s1 / D
                c2 = s2 / D
            else:
                c1 = tl.sum(xhat * wdy, axis=1) / D
                c2 = tl.sum(wdy, axis=1) / D
            dh = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            acc_w += dy * xhat  # dy and xhat are 0 outside the mask
            acc_b += dy
        if HAS_DH:
            dh += tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if WRITE_DX:
            tl.store(dx_ptr + offs, dh.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_BRANCH:
            if HAS_SCALE:
                dh = dh * tl.load(s_ptr + b, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            if GAMMA_GRAD:
                br = tl.load(br_ptr + (b * s_bb + n * s_bn)[:, None] + cols[None, :], mask=mask, other=0.0)
                acc_g += dh * br.to(tl.float32)
            if WRITE_DBR:
                if HAS_GAMMA:
                    dh = dh * g[None, :]
                tl.store(dbr_ptr + offs, dh.to(dbr_ptr.dtype.element_ty), mask=mask)
    part = pid.to(tl.int64) * D + cols
    if HAS_DY:
        tl.store(dw_ptr + part, tl.sum(acc_w, axis=0), mask=col_ok)
        tl.store(db_ptr + part, tl.sum(acc_b, axis=0), mask=col_ok)
    if GAMMA_GRAD:
        tl.store(dg_ptr + part, tl.sum(acc_g, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------------------------
# Host launchers


def _add_layer_norm_fwd(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    gamma: torch.Tensor | None,
    sample_scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    y_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (h [B, N, D] in x's dtype, empty when branch is None; y [B, N, D] in y_dtype; mean, rstd [B N] fp32)."""
    B, N, D = x.shape
    R = B * N
    h = x.new_empty(x.shape if branch is not None else (0,))
    y = x.new_empty(x.shape, dtype=y_dtype)
    mean = x.new_empty(R, dtype=torch.float32)
    rstd = x.new_empty(R, dtype=torch.float32)
    if R == 0 or D == 0:
        return h, y, mean, rstd
    block_m, block_d, warps = tuning.layer_norm_tile(D, backward=False)
    dummy = mean
    _add_ln_fwd_kernel[(cdiv(R, block_m),)](
        x,
        branch if branch is not None else dummy,
        gamma if gamma is not None else dummy,
        sample_scale if sample_scale is not None else dummy,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        h if branch is not None else dummy,
        y,
        mean,
        rstd,
        R,
        N,
        D,
        x.stride(0),
        x.stride(1),
        branch.stride(0) if branch is not None else 0,
        branch.stride(1) if branch is not None else 0,
        eps,
        HAS_BRANCH=branch is not None,
        HAS_GAMMA=gamma is not None,
        HAS_SCALE=sample_scale is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return h, y, mean, rstd


add_layer_norm_fwd = torch.library.custom_op("beit_kernels::add_layer_norm_fwd", _add_layer_norm_fwd, mutates_args=())


@add_layer_norm_fwd.register_fake
def _(x, branch, gamma, sample_scale, weight, bias, eps, y_dtype):
    R = x.shape[0] * x.shape[1]
    h = x.new_empty(x.shape if branch is not None else (0,))
    f32 = dict(dtype=torch.float32)
    return h, x.new_empty(x.shape, dtype=y_dtype), x.new_empty(R, **f32), x.new_empty(R, **f32)


def _add_layer_norm_bwd(
    grad_h: torch.Tensor | None,
    grad_y: torch.Tensor | None,
    h: torch.Tensor,
    branch: torch.Tensor | None,
    gamma: torch.Tensor | None,
    sample_scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_branch: bool,
    branch_dtype: torch.dtype,
    need_x: bool,
    need_branch: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_x in h's dtype, grad_branch in branch_dtype, grad_gamma, grad_weight, grad_bias [D] fp32).

    ``h`` is the LayerNorm input (x when there is no branch); ``branch`` is passed only when gamma takes a
    gradient. Outputs that are not wanted (need_* False, no branch, no gamma gradient, no grad_y) are empty."""
    B, N, D = h.shape
    R = B * N
    grad_h = grad_h.contiguous() if grad_h is not None else None
    grad_y = grad_y.contiguous() if grad_y is not None else None
    need_branch = need_branch and has_branch
    gamma_grad = has_branch and branch is not None and gamma is not None
    has_dy = grad_y is not None
    grad_x = h.new_empty(h.shape if need_x else (0,))
    grad_branch = h.new_empty(h.shape if need_branch else (0,), dtype=branch_dtype)
    block_m, block_d, warps = tuning.layer_norm_tile(max(D, 1), backward=True)
    bwd = tuning.get("layer_norm.bwd")
    n_tiles = cdiv(R, block_m)
    programs = persistent_programs(n_tiles, h.device, bwd["programs_per_sm"])
    f32 = dict(device=h.device, dtype=torch.float32)
    launch = R > 0 and D > 0 and (has_dy or grad_h is not None)
    # Every launched program stores its whole row of the partials it computes; without a launch they sum to zero.
    alloc = torch.empty if launch else torch.zeros
    dg = alloc(programs if gamma_grad else 0, D, **f32)
    dw = alloc(programs if has_dy else 0, D, **f32)
    db = alloc(programs if has_dy else 0, D, **f32)
    if launch:
        dummy = mean
        _add_ln_bwd_kernel[(programs,)](
            grad_h if grad_h is not None else dummy,
            grad_y if has_dy else dummy,
            h,
            branch if gamma_grad else dummy,
            gamma if gamma is not None else dummy,
            sample_scale if sample_scale is not None else dummy,
            weight if weight is not None else dummy,
            mean,
            rstd,
            grad_x if need_x else dummy,
            grad_branch if need_branch else dummy,
            dg if gamma_grad else dummy,
            dw if has_dy else dummy,
            db if has_dy else dummy,
            R,
            N,
            D,
            n_tiles,
            h.stride(0),
            h.stride(1),
            branch.stride(0) if gamma_grad else 0,
            branch.stride(1) if gamma_grad else 0,
            HAS_DH=grad_h is not None,
            HAS_DY=has_dy,
            HAS_BRANCH=has_branch,
            HAS_GAMMA=gamma is not None,
            HAS_SCALE=sample_scale is not None,
            HAS_W=weight is not None,
            WRITE_DX=need_x,
            WRITE_DBR=need_branch,
            GAMMA_GRAD=gamma_grad,
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            LOOP_STAGES=bwd["loop_stages"],
            JOINT_SUMS=bwd["joint_sums"],
            num_warps=warps,
        )
    else:  # nothing to launch: empty rows, or no incoming gradient at all
        grad_x.zero_()
        grad_branch.zero_()
    # A fixed-order sum over the G partials; a fresh empty tensor each where absent (outputs must not alias).
    return (
        grad_x,
        grad_branch,
        dg.sum(0) if gamma_grad else dg.new_zeros(0),
        dw.sum(0) if has_dy else dw.new_zeros(0),
        db.sum(0) if has_dy else db.new_zeros(0),
    )


add_layer_norm_bwd = torch.library.custom_op("beit_kernels::add_layer_norm_bwd", _add_layer_norm_bwd, mutates_args=())


@add_layer_norm_bwd.register_fake
def _(grad_h, grad_y, h, branch, gamma, sample_scale, weight, mean, rstd, has_branch, branch_dtype, need_x,
      need_branch):  # fmt: skip
    D = h.shape[2]
    gamma_grad = has_branch and branch is not None and gamma is not None
    f32 = dict(dtype=torch.float32)
    return (
        h.new_empty(h.shape if need_x else (0,)),
        h.new_empty(h.shape if need_branch and has_branch else (0,), dtype=branch_dtype),
        h.new_empty(D if gamma_grad else 0, **f32),
        h.new_empty(D if grad_y is not None else 0, **f32),
        h.new_empty(D if grad_y is not None else 0, **f32),
    )


def _validate(x, branch, gamma, weight, bias, eps, sample_scale, y_dtype):
    """Clear errors for bad input before any launch."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"add_layer_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"add_layer_norm: x must be [B, N, D], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"add_layer_norm: x must be fp32, fp16 or bf16, got {x.dtype}")
    check_kernel_device("add_layer_norm", x)
    B, N, D = x.shape
    if D > _MAX_D:
        raise ValueError(f"add_layer_norm: D={D} is wider than the {_MAX_D} features a row block holds")
    if D > 1 and x.stride(2) != 1:
        raise ValueError(f"add_layer_norm: x must have a unit stride on its last dimension, got {x.stride()}")
    if branch is not None:
        if not isinstance(branch, torch.Tensor):
            raise TypeError(f"add_layer_norm: branch must be a torch.Tensor or None, got {type(branch).__name__}")
        if branch.shape != x.shape:
            raise ValueError(f"add_layer_norm: branch must have x's shape {tuple(x.shape)}, got {tuple(branch.shape)}")
        if branch.dtype not in _DTYPES:
            raise TypeError(f"add_layer_norm: branch must be fp32, fp16 or bf16, got {branch.dtype}")
        if branch.device != x.device:
            raise ValueError(f"add_layer_norm: branch is on {branch.device} but x is on {x.device}")
        if D > 1 and branch.stride(2) != 1:
            raise ValueError(f"add_layer_norm: branch must have a unit stride on its last dimension, got "
                             f"{branch.stride()}")  # fmt: skip
    elif gamma is not None or sample_scale is not None:
        raise ValueError("add_layer_norm: gamma and sample_scale scale the branch, so they need one (branch is None)")
    for name, t in (("gamma", gamma), ("weight", weight), ("bias", bias)):
        check_vector("add_layer_norm", name, t, D, x.device)
    check_vector("add_layer_norm", "sample_scale", sample_scale, B, x.device)
    if sample_scale is not None and sample_scale.requires_grad and torch.is_grad_enabled():
        raise ValueError("add_layer_norm: sample_scale gets no gradient (a drop-path draw); detach it")
    if not eps > 0:
        raise ValueError(f"add_layer_norm: eps must be positive, got {eps}")
    if y_dtype is not None and y_dtype not in _DTYPES:
        raise TypeError(f"add_layer_norm: y_dtype must be fp32, fp16, bf16 or None, got {y_dtype}")


# ----------------------------------------------------------------------------------------------------------------
# Autograd


class AddLayerNormFunction(torch.autograd.Function):
    """Outputs (h, y) with a branch, y alone without one (h is then x itself, outside this function)."""

    @staticmethod
    def forward(ctx, x, branch, gamma, weight, bias, sample_scale, eps, y_dtype):
        h, y, mean, rstd = call_op(add_layer_norm_fwd, _add_layer_norm_fwd, x, branch, gamma, sample_scale, weight,
                                  bias, eps, y_dtype)  # fmt: skip
        has_branch = branch is not None
        # Branch is kept only for gamma's gradient, as PyTorch's ``gamma * branch`` keeps it.
        gamma_grad = has_branch and gamma is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(
            h if has_branch else x, branch if gamma_grad else None, gamma, sample_scale, weight, mean, rstd
        )
        ctx.has_branch = has_branch
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (branch, gamma, weight, bias))
        ctx.set_materialize_grads(False)
        return (h, y) if has_branch else y

    @staticmethod
    def backward(ctx, *grads):
        grad_h, grad_y = grads if ctx.has_branch else (None, grads[0])
        if grad_h is None and grad_y is None:
            return (None,) * 8
        h, branch, gamma, sample_scale, weight, mean, rstd = ctx.saved_tensors
        br_dt, g_dt, w_dt, b_dt = ctx.dtypes
        need = ctx.needs_input_grad
        grad_x, grad_br, dg, dw, db = call_op(
            add_layer_norm_bwd,
            _add_layer_norm_bwd,
            grad_h,
            grad_y,
            h,
            branch,
            gamma,
            sample_scale,
            weight,
            mean,
            rstd,
            ctx.has_branch,
            br_dt if br_dt is not None else h.dtype,
            need[0],
            need[1],
        )
        has_dy = grad_y is not None
        return (
            grad_x if need[0] else None,
            grad_br if need[1] else None,
            dg.to(g_dt) if branch is not None else None,
            dw.to(w_dt) if w_dt is not None and need[3] and has_dy else None,
            db.to(b_dt) if b_dt is not None and need[4] and has_dy else None,
            None,
            None,
            None,
        )


# ----------------------------------------------------------------------------------------------------------------
# Public function


def add_layer_norm(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float = 1e-6,
    sample_scale: torch.Tensor | None = None,
    y_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + sample_scale[b] * gamma * branch`` and ``y = LayerNorm(h) * weight + bias``, returned as (h, y).

    With branch None this is a plain LayerNorm and h is x itself. Differentiable in x, branch, gamma, weight and
    bias; see the module docstring for shapes, dtypes and reproducibility.
    """
    _validate(x, branch, gamma, weight, bias, eps, sample_scale, y_dtype)
    y_dtype = y_dtype if y_dtype is not None else x.dtype
    weight, bias, gamma = (t.contiguous() if t is not None else None for t in (weight, bias, gamma))
    sample_scale = sample_scale.contiguous() if sample_scale is not None else None
    out = AddLayerNormFunction.apply(x, branch, gamma, weight, bias, sample_scale, float(eps), y_dtype)
    return out if branch is not None else (x, out)
