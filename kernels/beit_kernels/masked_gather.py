"""Sync-free gather of the masked tokens, with an optional LayerNorm fused on the gathered rows.

Math (x [B, T, D], index [B, K], rows r = b K + k of the output):

    out[r, :] = LN(x[b, index[b, k], :])     if index[b, k] >= 0
    out[r, :] = 0                            if index[b, k] == -1 (padding)
    LN(v)     = (v - mean(v)) / sqrt(var(v) + eps) * ln_weight + ln_bias      (biased variance, as nn.LayerNorm)

BEiT's official head takes ``x[bool_masked_pos]``: a boolean gather whose output shape depends on the data, so
PyTorch synchronises with the host to size it. Here the output is [B K, D] for the padded index of
``beit.masking.mask_to_index`` (ascending positions, -1 padding), so nothing waits on the device and the step can be
captured in a CUDA graph. In pretraining the final LayerNorm only matters on the masked rows, so it is applied to
the K of them rather than to all T tokens.

Backward: the gradient of x is zero except on the gathered rows, where one kernel writes the LayerNorm input
gradient (from the saved per-row mean and 1/std) straight into a zeroed [B, T, D] buffer; the LayerNorm weight and
bias gradients are reduced per program into fp32 partials that the host sums. Nothing of size [B K, D] is saved.

Shapes and dtypes:
    x          [B, T, D] fp32, fp16 or bf16; any strides with a unit stride on D.
    index      [B, K] int32 or int64; values in [-1, T); positions within one image must be distinct (a duplicate
               would have two rows write one gradient row), which the ascending mask index guarantees.
    ln_weight  [D] or None, ln_bias [D] or None; the LayerNorm runs when either is given. Statistics in fp32.
    out        [B K, D] in x's dtype (a fused LayerNorm keeps the input dtype, unlike autocast's fp32 LayerNorm).

Value checks (index in [-1, T), no duplicates) run inside the forward kernel: each row range-checks its position
and claims it with an atomic increment of a zeroed [B, T] int32 scratch, so a second claim finds a nonzero count; a
bad row clears a one-element flag that ``torch._assert_async`` then checks. A bad index fails the step (on CUDA, at
the next synchronisation) instead of syncing every step to check it, in three small launches (the two buffers'
fills and the assert) rather than a sort and a dozen reductions; the kernels also clamp, so a bad index never
reads or writes out of bounds. Rows are up to 65536 features wide (one block per row).
"""

import torch
import triton
import triton.language as tl

from beit_kernels import tuning
from beit_kernels.backend import call_op, check_kernel_device, check_vector, next_power_of_2, persistent_programs

_MAX_D = 65536


# ----------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _masked_gather_fwd_kernel(
    x_ptr,
    idx_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    mean_ptr,
    rstd_ptr,
    seen_ptr,  # int32 [B, T], zeroed: how many rows claimed each position
    ok_ptr,  # int32 [1], one: cleared by a row whose index is out of range or claimed twice
    K,
    T,
    D,
    s_xb,
    s_xt,
    s_ib,
    s_ik,
    eps,
    HAS_LN: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // K
    k = row % K
    offs = tl.arange(0, BLOCK_D)
    d_ok = offs < D
    lane0 = offs == 0
    # The index is broadcast to a vector: the interpreter (Triton 3.9) turns `vector & scalar-bool` into
    # an integer mask that tl.load rejects.
    raw = tl.load(idx_ptr + b.to(tl.int64) * s_ib + k * s_ik).to(tl.int64) + tl.zeros([BLOCK_D], dtype=tl.int64)
    valid = (raw >= 0) & (raw < T)
    idx = tl.where(valid, raw, 0)
    # Lane 0 claims the position; the count it finds there is nonzero only for a duplicate within the image (the
    # other lanes' results are undefined and masked out of the flag's store).
    claimed = tl.atomic_add(seen_ptr + b.to(tl.int64) * T + idx, tl.full([BLOCK_D], 1, tl.int32), mask=lane0 & valid)
    bad = tl.where(valid, claimed != 0, raw != -1)
    tl.store(ok_ptr + offs * 0, tl.zeros([BLOCK_D], dtype=tl.int32), mask=lane0 & bad)
    x = tl.load(x_ptr + b.to(tl.int64) * s_xb + idx * s_xt + offs, mask=d_ok & valid, other=0.0).to(tl.float32)
    y = x
    if HAS_LN:
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(d_ok, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + offs, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + offs, mask=d_ok, other=0.0).to(tl.float32)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)
    y = tl.where(valid, y, 0.0)
    tl.store(out_ptr + row.to(tl.int64) * D + offs, y.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _masked_gather_bwd_kernel(
    x_ptr,
    idx_ptr,
    w_ptr,
    dy_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,  # [B, T, D] contiguous, zeroed
    dw_ptr,  # fp32 [G, D] partials
    db_ptr,  # fp32 [G, D] partials
    R,  # B * K rows
    K,
    T,
    D,
    s_xb,
    s_xt,
    s_ib,
    s_ik,
    HAS_LN: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_D)
    d_ok = offs < D
    acc_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=d_ok, other=0.0).to(tl.float32)
    for row_s in range(pid, R, G):
        # int64 vectors: the interpreter hands the loop variable over as a Python int.
        row = row_s + tl.zeros([BLOCK_D], dtype=tl.int64)
        b = row // K
        k = row % K
        idx = tl.load(idx_ptr + b * s_ib + k * s_ik).to(tl.int64)
        valid = (idx >= 0) & (idx < T)
        idx = tl.where(valid, idx, 0)
        ok = d_ok & valid
        dy = tl.load(dy_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
        dx = dy
        if HAS_LN:
            x = tl.load(x_ptr + b * s_xb + idx * s_xt + offs, mask=ok, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row)  # [BLOCK_D] copies of the row's statistic
            rstd = tl.load(rstd_ptr + row)
            xhat = tl.where(ok, (x - mean) * rstd, 0.0)
            wdy = dy
            if HAS_W:
                wdy = dy * w
            c1 = tl.sum(xhat * wdy, axis=0) / D
            c2 = tl.sum(wdy, axis=0) / D
            dx = (wdy - (xhat * c1 + c2)) * rstd
            acc_w += dy * xhat
            acc_b += dy
        dx_off = (b * T + idx) * D + offs
        tl.store(dx_ptr + dx_off, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if HAS_LN:
        tl.store(dw_ptr + pid.to(tl.int64) * D + offs, acc_w, mask=d_ok)
        tl.store(db_ptr + pid.to(tl.int64) * D + offs, acc_b, mask=d_ok)


# ----------------------------------------------------------------------------------------------------------------
# Host launchers


def _masked_gather_fwd(
    x: torch.Tensor,
    index: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
    has_ln: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out [B K, D], mean [B K] fp32, rstd [B K] fp32); mean and rstd are empty without LayerNorm."""
    B, T, D = x.shape
    K = index.shape[1]
    R = B * K
    out = x.new_empty(R, D)
    f32 = dict(device=x.device, dtype=torch.float32)
    mean = torch.empty(R if has_ln else 0, **f32)
    rstd = torch.empty(R if has_ln else 0, **f32)
    if R == 0:
        return out, mean, rstd
    seen = torch.zeros(B, T, device=x.device, dtype=torch.int32)
    ok = torch.ones(1, device=x.device, dtype=torch.int32)
    block_d = max(next_power_of_2(D), 1)  # D == 0 still launches: the rows' indices are checked
    _masked_gather_fwd_kernel[(R,)](
        x,
        index,
        ln_weight if ln_weight is not None else out,
        ln_bias if ln_bias is not None else out,
        out,
        mean if has_ln else out,
        rstd if has_ln else out,
        seen,
        ok,
        K,
        T,
        D,
        x.stride(0),
        x.stride(1),
        index.stride(0),
        index.stride(1),
        eps,
        HAS_LN=has_ln,
        HAS_W=ln_weight is not None,
        HAS_B=ln_bias is not None,
        BLOCK_D=block_d,
        num_warps=tuning.masked_gather_warps(block_d),
    )
    torch._assert_async(
        ok, f"masked_gather: index values must be -1 (padding) or distinct positions in [0, {T}) within each row"
    )
    return out, mean, rstd


# torch.library registration: opaque custom ops, so torch.compile traces a model around them without a graph break;
# eager calls skip the dispatcher (``backend.call_op``).
masked_gather_fwd = torch.library.custom_op("beit_kernels::masked_gather_fwd", _masked_gather_fwd, mutates_args=())


@masked_gather_fwd.register_fake
def _(x, index, ln_weight, ln_bias, eps, has_ln):
    R = x.shape[0] * index.shape[1]
    n = R if has_ln else 0
    return x.new_empty(R, x.shape[2]), x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


def _masked_gather_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    index: torch.Tensor,
    ln_weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_ln: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_x [B, T, D] in x's dtype, grad_ln_weight [D] fp32, grad_ln_bias [D] fp32; empty without LN)."""
    grad_out = grad_out.contiguous()
    B, T, D = x.shape
    K = index.shape[1]
    R = B * K
    grad_x = torch.zeros(B, T, D, device=x.device, dtype=x.dtype)
    programs = persistent_programs(R, x.device)
    f32 = dict(device=x.device, dtype=torch.float32)
    # Every launched program stores its row of the partials; without rows nothing is launched.
    alloc = torch.empty if R > 0 else torch.zeros
    dw = alloc(programs if has_ln else 0, D, **f32)
    db = alloc(programs if has_ln else 0, D, **f32)
    if R > 0 and D > 0:
        block_d = next_power_of_2(D)
        _masked_gather_bwd_kernel[(programs,)](
            x,
            index,
            ln_weight if ln_weight is not None else grad_x,
            grad_out,
            mean if has_ln else grad_x,
            rstd if has_ln else grad_x,
            grad_x,
            dw if has_ln else grad_x,
            db if has_ln else grad_x,
            R,
            K,
            T,
            D,
            x.stride(0),
            x.stride(1),
            index.stride(0),
            index.stride(1),
            HAS_LN=has_ln,
            HAS_W=ln_weight is not None,
            BLOCK_D=block_d,
            num_warps=tuning.masked_gather_warps(block_d),
        )
    if not has_ln:
        return grad_x, dw.new_zeros(0), db.new_zeros(0)
    return grad_x, dw.sum(0), db.sum(0)


masked_gather_bwd = torch.library.custom_op("beit_kernels::masked_gather_bwd", _masked_gather_bwd, mutates_args=())


@masked_gather_bwd.register_fake
def _(grad_out, x, index, ln_weight, mean, rstd, has_ln):
    n = x.shape[2] if has_ln else 0
    return x.new_empty(x.shape), x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


def _validate(x, index, ln_weight, ln_bias, eps):
    """Clear errors for bad input before any launch (values are checked on the device, see the module doc)."""
    if not isinstance(x, torch.Tensor) or not isinstance(index, torch.Tensor):
        raise TypeError("x and index must be torch.Tensors")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    if index.dim() != 2 or index.shape[0] != x.shape[0]:
        raise ValueError(f"index must be [B, K] with B={x.shape[0]}, got shape {tuple(index.shape)}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index must be int32 or int64, got {index.dtype}")
    if index.device != x.device:
        raise ValueError(f"index is on {index.device} but x is on {x.device}")
    check_kernel_device("masked_gather", x)
    B, T, D = x.shape
    if D > _MAX_D:
        raise ValueError(f"D={D} is wider than the {_MAX_D} features a row block holds")
    if D > 1 and x.stride(2) != 1:
        raise ValueError("x must have a unit stride on its last dimension")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_vector("masked_gather", name, t, D, x.device)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return (
        ln_weight.contiguous() if ln_weight is not None else None,
        ln_bias.contiguous() if ln_bias is not None else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Autograd


class MaskedGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, ln_weight, ln_bias, eps, has_ln):
        out, mean, rstd = call_op(masked_gather_fwd, _masked_gather_fwd, x, index, ln_weight, ln_bias, eps, has_ln)
        ctx.save_for_backward(x, index, ln_weight, mean, rstd)
        ctx.has_ln = has_ln
        ctx.param_dtypes = (
            ln_weight.dtype if ln_weight is not None else None,
            ln_bias.dtype if ln_bias is not None else None,
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, index, ln_weight, mean, rstd = ctx.saved_tensors
        grad_x, dw, db = call_op(masked_gather_bwd, _masked_gather_bwd, grad_out, x, index, ln_weight, mean, rstd,
                                 ctx.has_ln)  # fmt: skip
        w_dt, b_dt = ctx.param_dtypes
        need = ctx.needs_input_grad
        return (
            grad_x if need[0] else None,
            None,
            dw.to(w_dt) if w_dt is not None and need[2] else None,
            db.to(b_dt) if b_dt is not None and need[3] else None,
            None,
            None,
        )


def masked_gather(
    x: torch.Tensor,
    index: torch.Tensor,
    *,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Rows ``x[b, index[b, k]]`` as [B K, D] (zero rows for -1 padding), with LayerNorm fused when ``ln_weight`` or
    ``ln_bias`` is given. No host synchronisation; see the module docstring."""
    ln_weight, ln_bias = _validate(x, index, ln_weight, ln_bias, eps)
    has_ln = ln_weight is not None or ln_bias is not None
    return MaskedGatherFunction.apply(x, index, ln_weight, ln_bias, float(eps), has_ln)
