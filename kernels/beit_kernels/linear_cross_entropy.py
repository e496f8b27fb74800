"""Fused linear + cross-entropy for the MIM head: the [M, V] logits never exist at once.

Math (x [M, D], weight [V, D], bias [V], target [M]; valid rows are those with target != ignore_index):

    z[m, :]   = x[m] @ weight^T + bias                                 logits of one row
    loss[m]   = logsumexp(z[m]) - z[m, target[m]]                      0 on ignored rows
    loss      = sum_m loss[m] / max(n_valid, 1)    (reduction="mean"; "sum" skips the division)
    dz[m, v]  = (softmax(z[m])[v] - [v == target[m]]) * s              s = 1 / max(n_valid, 1) or 1; 0 if ignored
    dx        = dz @ weight,   dweight = dz^T @ x,   dbias = sum_m dz[m]
    correct   = #{m valid : argmax_v z[m, v] == target[m]}             first maximum on ties, as torch.argmax

Design (as Liger-Kernel's fused linear cross-entropy): the rows are processed in chunks of C. For each chunk the
logits come from cuBLAS (``torch.addmm``, in the input dtype); one Triton program per row makes an online
logsumexp and argmax pass over V, writes the row's loss and correct flag, and a second pass overwrites the logits
in place with dz / s (softmax minus one-hot, in [-1, 1]). dx for the chunk and the chunk's contribution to dweight
(fp32 accumulator) and dbias then come from two more GEMMs. All gradients are computed in the forward, without the
mean's 1/n_valid; the backward multiplies them by the incoming scalar gradient times s, in fp32, with n_valid read
on the device (no host sync). The 1/n_valid waits for the backward because in fp16 it would underflow: at BEiT's
n_valid = 9600 and V = 8192 a non-target dz is about 1e-8, below fp16's smallest subnormal, so the softmax part of
every gradient would round to 0 before a GradScaler's 2**16 could lift it. With no valid row, the loss is 0 and
every gradient is 0 (n_valid is clamped to 1 and every dz is 0), never NaN.

Memory (derived, BEiT-B at B=256: M = 19200, V = 8192, D = 768, bf16): the unfused Linear + CrossEntropy holds the
[M, V] logits (315 MB), their fp32 upcast and log-softmax under autocast (629 MB each) and a same-size gradient;
here one [C, V] chunk (C = 8192 by default: 134 MB, see ``default_chunk_size``) plus the saved dx [M, D] (29 MB)
and fp32 dweight (25 MB; two of them for a moment while a chunk is added on CUDA, where cuBLAS sums bf16 products
straight into fp32).

Shapes and dtypes:
    x [M, D], weight [V, D], bias [V] or None: fp32, fp16 or bf16 (under autocast all run in the autocast dtype).
    target [M] int32 or int64 in [0, V) or ignore_index (checked on the device, no sync).
    Returns the fp32 loss (0-d); with ``return_counts=True`` also (num_correct, num_valid), 0-d int64 tensors.
Limits: reduction "mean" or "sum" (no per-row "none": the gradients are computed in the forward). fp32 logits
follow ``torch.backends.cuda.matmul.allow_tf32``. No double backward (the gradients are not differentiable).
The gradients are rounded to the input dtype (dx; each chunk's dweight GEMM too where cuBLAS cannot return fp32)
before the backward scales them by the upstream gradient over n_valid, in fp32: one extra rounding of dx.
"""

import torch
import triton
import triton.language as tl

from beit_kernels import tuning
from beit_kernels.backend import add_t_matmul_fp32, call_op, check_kernel_device, next_power_of_2

# ----------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _ce_rows_kernel(
    z_ptr,  # [C, V] logits of the chunk; overwritten with dz when COMPUTE_GRAD
    target_ptr,
    loss_ptr,  # fp32 [C]
    correct_ptr,  # int32 [C]
    V,
    s_z,
    ignore_index,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * s_z
    offs = tl.arange(0, BLOCK_V)
    # Vectors of one repeated value: the interpreter (Triton 3.9) mishandles masks mixing scalars and
    # vectors, so per-row scalars are kept as [BLOCK_V] broadcasts and reduced at the end.
    t = tl.load(target_ptr + row + offs * 0).to(tl.int64)
    valid = (t != ignore_index) & (t >= 0) & (t < V)
    t = tl.where(valid, t, 0)

    m = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)  # running max, per lane
    s = tl.zeros([BLOCK_V], dtype=tl.float32)  # running sum of exp(z - m), per lane
    best = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)  # per-lane max value
    best_i = tl.zeros([BLOCK_V], dtype=tl.int32)  # per-lane first index of that max
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        # A lane still at -inf (no element yet) subtracts 0 instead: exp(-inf - 0) = 0, where -inf - -inf is NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(z - m_safe)
        m = m_new
        better = z > best  # strict: an earlier index keeps a tie
        best_i = tl.where(better, cols.to(tl.int32), best_i)
        best = tl.where(better, z, best)
    row_max = tl.max(m, axis=0)
    sum_exp = tl.sum(s * tl.exp(m - row_max), axis=0)
    lse = row_max + tl.log(sum_exp)
    # Row argmax: the smallest index among the lanes that hold the row maximum.
    top = tl.max(best, axis=0)
    arg = tl.min(tl.where(best == top, best_i, 2147483647), axis=0)

    z_t = tl.load(z_row + t, mask=valid, other=0.0).to(tl.float32)  # [BLOCK_V] copies of z[row, target]
    loss = tl.where(valid, lse - z_t, 0.0)
    correct = (valid & (arg == t)).to(tl.int32)
    first = offs == 0
    tl.store(loss_ptr + row + offs * 0, loss, mask=first)
    tl.store(correct_ptr + row + offs * 0, correct, mask=first)

    if COMPUTE_GRAD:
        scale = tl.where(valid, 1.0, 0.0)  # the mean's 1/n_valid comes in the backward, in fp32 (module doc)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            ok = cols < V
            z = tl.load(z_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
            g = (tl.exp(z - lse) - tl.where(cols == t, 1.0, 0.0)) * scale
            tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------------
# Host launchers


def default_chunk_size(M: int, V: int, D: int) -> int:
    """Rows per chunk (a power of two) when ``chunk_size`` is not given: ``tuning.cross_entropy_chunk``, all M rows
    where their logits fit in the table's ``max_logits`` elements, else the most rows that fit. Fewer, larger
    chunks make fewer, larger cuBLAS products; the cap bounds the logits held at once. Unlike Liger's rule
    (M / ceil(V / D) rows), it ignores D."""
    return tuning.cross_entropy_chunk(M, V)


def _linear_cross_entropy_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    mean: bool,
    need_grad_x: bool,
    need_grad_w: bool,
    need_grad_b: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss fp32 [], grad_x [M, D] or [0], grad_weight fp32 [V, D] or [0], grad_bias fp32 [V] or [0],
    num_correct int64 [], num_valid int64 []); the gradients are the sum's (for a mean, divide them by
    max(num_valid, 1))."""
    M, D = x.shape
    V = weight.shape[0]
    dev = x.device
    target = target.contiguous()  # the kernel reads one target per row at unit stride
    compute_grad = need_grad_x or need_grad_w or need_grad_b
    # The custom op is opaque, so autocast would otherwise re-cast inside it; the caller already chose the dtype.
    with torch.autocast(dev.type, enabled=False):
        valid = target != ignore_index
        torch._assert_async(
            (~valid | ((target >= 0) & (target < V))).all(),
            f"linear_cross_entropy: targets must lie in [0, {V}) or equal ignore_index={ignore_index}",
        )
        n_valid = valid.sum()  # int64 on the device
        # The row kernel stores the loss and the count of every row of every chunk.
        loss_rows = torch.empty(M, device=dev, dtype=torch.float32)
        correct = torch.empty(M, device=dev, dtype=torch.int32)
        grad_x = torch.empty(M if need_grad_x else 0, D, device=dev, dtype=x.dtype)
        grad_w = torch.zeros(V if need_grad_w else 0, D, device=dev, dtype=torch.float32)
        grad_b = torch.zeros(V if need_grad_b else 0, device=dev, dtype=torch.float32)
        ce = tuning.get("linear_cross_entropy.ce")
        wt = weight.t()
        for start in range(0, M, chunk_size):
            end = min(start + chunk_size, M)
            xc = x[start:end]  # [C, D]
            if bias is not None:
                z = torch.addmm(bias, xc, wt)  # [C, V]
            else:
                z = xc @ wt
            _ce_rows_kernel[(end - start,)](
                z,
                target[start:end],
                loss_rows[start:end],
                correct[start:end],
                V,
                z.stride(0),
                ignore_index,
                COMPUTE_GRAD=compute_grad,
                BLOCK_V=min(ce["BLOCK_V"], next_power_of_2(V)),
                num_warps=ce["num_warps"],
            )
            if not compute_grad:
                continue
            # z now holds dz [C, V].
            if need_grad_x:
                torch.mm(z, weight, out=grad_x[start:end])
            if need_grad_w:
                grad_w = add_t_matmul_fp32(grad_w, z, xc)
            if need_grad_b:
                grad_b += z.sum(0, dtype=torch.float32)
        loss = loss_rows.sum()
        if mean:
            loss = loss / n_valid.clamp(min=1)  # int64 promotes to fp32 inside the division
    return loss, grad_x, grad_w, grad_b, correct.sum(dtype=torch.int64), n_valid


linear_cross_entropy_fwd = torch.library.custom_op(
    "beit_kernels::linear_cross_entropy_fwd", _linear_cross_entropy_fwd, mutates_args=()
)


@linear_cross_entropy_fwd.register_fake
def _(x, weight, bias, target, ignore_index, mean, need_grad_x, need_grad_w, need_grad_b, chunk_size):
    M, D = x.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32)
    i64 = dict(dtype=torch.int64)
    return (
        x.new_empty((), **f32),
        x.new_empty(M if need_grad_x else 0, D),
        x.new_empty(V if need_grad_w else 0, D, **f32),
        x.new_empty(V if need_grad_b else 0, **f32),
        x.new_empty((), **i64),
        x.new_empty((), **i64),
    )


def _validate(x, weight, bias, target, reduction, chunk_size):
    """Clear errors for bad input before any launch (target values are checked on the device)."""
    for name, t in (("x", x), ("weight", weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [M, D], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [V, D] with D={x.shape[1]}, got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one class (V >= 1)")
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be fp32, fp16 or bf16, got {t.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError("bias must be a float tensor [V] or None")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if target.dim() != 1 or target.shape[0] != x.shape[0]:
        raise ValueError(f"target must be [M] with M={x.shape[0]}, got shape {tuple(target.shape)}")
    if target.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"target must be int32 or int64, got {target.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("target", target)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    check_kernel_device("linear_cross_entropy", x)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


# ----------------------------------------------------------------------------------------------------------------
# Autograd


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index, mean, chunk_size):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        loss, gx, gw, gb, num_correct, num_valid = call_op(
            linear_cross_entropy_fwd, _linear_cross_entropy_fwd,
            x, weight, bias, target, ignore_index, mean, need_x, need_w, need_b, chunk_size,
        )  # fmt: skip
        ctx.save_for_backward(gx, gw, gb, num_valid)
        ctx.mean = mean
        ctx.needs = (need_x, need_w, need_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(num_correct, num_valid)
        return loss, num_correct, num_valid

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved gradients are constants to autograd: no double backward
    def backward(ctx, grad_loss, _grad_correct, _grad_valid):
        gx, gw, gb, num_valid = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs
        w_dt, b_dt = ctx.dtypes
        # The forward computed the sum's gradients for a unit upstream gradient; scale them (no sync), in fp32: a
        # GradScaler's 2**16 is inf in fp16, and the mean's 1/n_valid would underflow there (module doc).
        g = grad_loss.float()
        if ctx.mean:
            g = g / num_valid.clamp(min=1)  # int64 promotes to fp32 inside the division
        return (
            (gx.float() * g).to(gx.dtype) if need_x else None,
            (gw * g).to(w_dt) if need_w else None,
            (gb * g).to(b_dt) if need_b else None,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_counts: bool = False,
    chunk_size: int | None = None,
):
    """``cross_entropy(x @ weight^T + bias, target)`` without the full logits; see the module docstring.

    Returns the fp32 loss, or (loss, num_correct, num_valid) with ``return_counts=True``: the valid rows whose
    argmax equals the target, and the valid rows (0-d int64 tensors on x's device; no sync).
    ``chunk_size`` (rows per chunk) defaults to ``default_chunk_size(M, V, D)``.
    """
    _validate(x, weight, bias, target, reduction, chunk_size)
    dev_type = x.device.type
    if torch.is_autocast_enabled(dev_type):
        # As autocast does for F.linear: the GEMMs run in the autocast dtype; the casts carry the gradients back.
        dt = torch.get_autocast_dtype(dev_type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    else:
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            raise TypeError(
                f"x, weight and bias must share a dtype outside autocast, got {x.dtype}, {weight.dtype}, "
                f"{bias.dtype if bias is not None else None}"
            )
    M, D = x.shape
    V = weight.shape[0]
    chunk = chunk_size if chunk_size is not None else default_chunk_size(M, V, D)
    loss, num_correct, num_valid = LinearCrossEntropyFunction.apply(
        x, weight, bias, target, int(ignore_index), reduction == "mean", chunk
    )
    if return_counts:
        return loss, num_correct, num_valid
    return loss
