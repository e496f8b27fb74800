"""Memory-efficient attention with a learnable additive bias and its gradient, reduced over the batch in-kernel.

Math (per batch b and head h; q, k, v are [N, D]):
    S = scale * q @ k^T + bias[b, h]          [N, N], bias broadcast from its own shape
    P = softmax(S, dim=-1),  O = P @ v
Backward, with Delta = rowsum(dO * O):
    dV = P^T @ dO,   dP = dO @ v^T,   dS = P * (dP - Delta)
    dq = scale * dS @ k,   dk = scale * dS^T @ q,   dbias = dS summed over every broadcast dimension

Shapes and dtypes:
    q, k, v   [B, H, N, D], one dtype (float16, bfloat16 or float32) and one device, last dimension contiguous
              (unless D = 1); other strides are free, so q, k, v split from a packed [B, N, 3, H, D] qkv need no
              copy.
    bias      None, or a float16, bfloat16 or float32 tensor broadcastable to [B, H, N, N] ([H, N, N],
              [1, H, N, N], [B, H, N, N], ...); it may require grad.
    scale     defaults to D ** -0.5.
    output    [B, H, N, D] in q's dtype; its memory is laid out as [B, N, H, D], so the usual
              ``o.transpose(1, 2).reshape(B, N, H * D)`` that follows is free.
    N >= 1 (197 at 224 px, 577 at 384 px); 1 <= D <= 256 (D is padded to a power of two >= 16 in registers).
    ``attention_qkvpacked`` takes qkv [B, N, 3, H, D] (a qkv projection's output, reshaped) and returns
    [B, N, H, D]; its backward writes dq, dk, dv into one dqkv of qkv's layout, where q, k, v split by the caller
    get three gradients that autograd stacks into qkv's layout (a copy of all three).

Design:
    Forward: one program per (query block, b*h); online softmax over key blocks (FlashAttention 2); saves only
    O and a per-row log-sum-exp (base 2, fp32): no N x N tensor is kept for backward.
    Backward: two kernels that recompute P from the log-sum-exp.
      _attn_bwd_dq_kernel: one program per (query block, b*h); also writes Delta.
      _attn_bwd_dkdv_kernel: one program per (key block, h, batch group); it loops over the batches of its group
        and over query blocks, accumulating dk, dv per batch and adding dS into its own column of an fp32 bias
        gradient buffer of shape [G, H, N, N] (G groups of batches; G = B when the bias has a batch dimension).
        The host sums the G partial buffers and reduces to the bias's own shape. No atomics anywhere: every output
        element has one writer and a fixed summation order, so results are bitwise reproducible for a given
        device, batch size and dtype (there is no ``deterministic`` switch because there is nothing to switch).
        When the bias is broadcast over the batch, G <= B // 2: no [B, H, N, N] tensor is ever allocated.
      _attn_bwd_dkdv_allq_kernel (tuning entry ``attention.dkdv_all_queries``, N <= 256, half precision,
        D <= 64; by default on sm90 only): the same with every query in one tile, so each program keeps its columns
        of the bias gradient in registers across the group's batches and stores them once, where the other reads,
        adds and writes them back (with a barrier) for every batch and query block.
      _attn_bwd_fused_kernel (tuning entry ``attention.bwd_fused``, N <= 256, half precision, D <= 64, a block
        with 160 KiB of shared memory; off by default): the
        whole backward in one kernel, one program per (h, batch group), every query in one tile: per batch it walks
        the key blocks, computing P, dP, dS once for dq, dk, dv and the bias gradient (five products a tile against
        the two kernels' seven), dq summed in registers, the bias gradient read, added and written back per tile.
    fp32 inputs use IEEE fp32 dot products (not TF32), so fp32 results match PyTorch's fp32 math.
    Tiles and the choice of backward kernel come from ``beit_kernels.tuning`` (fixed, not autotuned).

Limits: self-attention only (q, k, v share N); no dropout and no causal mask (BEiT needs neither); a bias that
broadcasts over heads but not over the batch gets a [B, H, N, N] fp32 partial gradient before the reduction.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from beit_kernels import tuning
from beit_kernels.backend import (
    call_op,
    cdiv,
    check_interpreter_dtype,
    check_kernel_device,
    fill_programs,
    next_power_of_2,
)

LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # a is cast to b's dtype (P and dS are fp32 tiles); fp32 inputs take IEEE products, not TF32, so fp32 results
    # match PyTorch's fp32 math.
    if IEEE:
        c = tl.dot(a.to(b.dtype), b, input_precision="ieee")
    else:
        c = tl.dot(a.to(b.dtype), b)
    return c


@triton.jit
def _load_rows(base, offs, stride, offs_d, mask_rows, D):
    """A [rows, BLOCK_D] tile of a [N, D] matrix with row stride ``stride``; rows and columns past the end are 0."""
    return tl.load(base + offs[:, None] * stride + offs_d[None, :], mask=mask_rows[:, None] & (offs_d < D)[None, :],
                   other=0.0)  # fmt: skip


@triton.jit
def _store_rows(base, offs, stride, offs_d, mask_rows, D, value):
    """Store ``value``, a [rows, BLOCK_D] tile, into a [N, D] matrix with row stride ``stride``; rows and columns
    past the end are left alone."""
    tl.store(base + offs[:, None] * stride + offs_d[None, :], value, mask=mask_rows[:, None] & (offs_d < D)[None, :])


@triton.jit
def _scores(q, k, bias_base, offs_m, offs_n, mask_m, mask_n, s_bm, s_bn, qk_scale,
            HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Base-2 logits of a [BLOCK_M, BLOCK_N] tile: (scale * q @ k^T + bias) * log2(e)."""
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    if HAS_BIAS:
        bias = tl.load(
            bias_base + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        s += bias.to(tl.float32) * 1.4426950408889634
    return s


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, lse_ptr,  #
    s_qb, s_qh, s_qn,  #
    s_kb, s_kh, s_kn,  #
    s_vb, s_vh, s_vn,  #
    s_bb, s_bh, s_bm, s_bn,  #
    s_ob, s_oh, s_on,  #
    H, N, D, qk_scale,  #
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  #
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    q = _load_rows(q_ptr + b * s_qb + h * s_qh, offs_m, s_qn, offs_d, mask_m, D)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    bias_base = bias_ptr + b * s_bb + h * s_bh

    # Row max and row sum of the online softmax, in base 2 (exp2 is the fast path).
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k = _load_rows(k_base, offs_n, s_kn, offs_d, mask_n, D)
        s = _scores(q, k, bias_base, offs_m, offs_n, mask_m, mask_n, s_bm, s_bn, qk_scale, HAS_BIAS, IEEE)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose keys so far are all -inf (a masking bias) still has m = -inf, and exp2(-inf - -inf) is NaN:
        # subtract 0 there instead, so its terms stay 0 until a finite score arrives.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, offs_n, s_vn, offs_d, mask_n, D)
        acc = acc * alpha[:, None] + _dot(p, v, IEEE)
        m_i = m_new
    acc = acc / l_i[:, None]
    _store_rows(o_ptr + b * s_ob + h * s_oh, offs_m, s_on, offs_d, mask_m, D,
               acc.to(o_ptr.dtype.element_ty))  # fmt: skip
    tl.store(lse_ptr + pid_bh * N + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,  #
    s_qb, s_qh, s_qn,  #
    s_kb, s_kh, s_kn,  #
    s_vb, s_vh, s_vn,  #
    s_bb, s_bh, s_bm, s_bn,  #
    s_ob, s_oh, s_on,  #
    s_dob, s_doh, s_don,  #
    s_dqb, s_dqh, s_dqn,  #
    H, N, D, qk_scale, sm_scale,  #
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  #
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    q = _load_rows(q_ptr + b * s_qb + h * s_qh, offs_m, s_qn, offs_d, mask_m, D)
    do = _load_rows(do_ptr + b * s_dob + h * s_doh, offs_m, s_don, offs_d, mask_m, D)
    o = _load_rows(o_ptr + b * s_ob + h * s_oh, offs_m, s_on, offs_d, mask_m, D)
    # Delta = rowsum(dO * O): computed here, where dO and O are loaded anyway, and stored for the dk/dv kernel.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh * N + offs_m, delta, mask=mask_m)
    lse = tl.load(lse_ptr + pid_bh * N + offs_m, mask=mask_m, other=0.0)

    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    bias_base = bias_ptr + b * s_bb + h * s_bh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k = _load_rows(k_base, offs_n, s_kn, offs_d, mask_n, D)
        v = _load_rows(v_base, offs_n, s_vn, offs_d, mask_n, D)
        s = _scores(q, k, bias_base, offs_m, offs_n, mask_m, mask_n, s_bm, s_bn, qk_scale, HAS_BIAS, IEEE)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
        dq += _dot(ds, k, IEEE)
    _store_rows(dq_ptr + b * s_dqb + h * s_dqh, offs_m, s_dqn, offs_d, mask_m, D,
               (dq * sm_scale).to(dq_ptr.dtype.element_ty))  # fmt: skip


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dbias_ptr,  #
    s_qb, s_qh, s_qn,  #
    s_kb, s_kh, s_kn,  #
    s_vb, s_vh, s_vn,  #
    s_bb, s_bh, s_bm, s_bn,  #
    s_dob, s_doh, s_don,  #
    s_dkb, s_dkh, s_dkn,  #
    s_dvb, s_dvh, s_dvn,  #
    s_dbg, s_dbh, s_dbm,  #
    B, H, N, D, batches_per_group, qk_scale, sm_scale,  #
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, IEEE: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  #
):  # fmt: skip
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    b_start = g * batches_per_group
    b_end = tl.minimum(b_start + batches_per_group, B)
    dbias_base = dbias_ptr + g * s_dbg + h * s_dbh
    for b in range(b_start, b_end):
        k = _load_rows(k_ptr + b * s_kb + h * s_kh, offs_n, s_kn, offs_d, mask_n, D)
        v = _load_rows(v_ptr + b * s_vb + h * s_vh, offs_n, s_vn, offs_d, mask_n, D)
        bias_base = bias_ptr + b * s_bb + h * s_bh
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        row = (b * H + h) * N
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < N
            q = _load_rows(q_ptr + b * s_qb + h * s_qh, offs_m, s_qn, offs_d, mask_m, D)
            do = _load_rows(do_ptr + b * s_dob + h * s_doh, offs_m, s_don, offs_d, mask_m, D)
            lse = tl.load(lse_ptr + row + offs_m, mask=mask_m, other=0.0)
            delta = tl.load(delta_ptr + row + offs_m, mask=mask_m, other=0.0)
            s = _scores(q, k, bias_base, offs_m, offs_n, mask_m, mask_n, s_bm, s_bn, qk_scale, HAS_BIAS,
                        IEEE)  # fmt: skip
            mask_mn = mask_m[:, None] & mask_n[None, :]
            p = tl.where(mask_mn, tl.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
            dv += _dot(tl.trans(p), do, IEEE)
            ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
            dk += _dot(tl.trans(ds), q, IEEE)
            if BIAS_GRAD:
                # This program alone owns these columns of group g's partial gradient, so a plain
                # read-add-write is race-free; the barrier orders it against the next batch's read of the same
                # tile, which Triton may lay out across other threads of the block.
                dbias_ptrs = dbias_base + offs_m[:, None] * s_dbm + offs_n[None, :]
                tl.store(dbias_ptrs, tl.load(dbias_ptrs, mask=mask_mn, other=0.0) + ds, mask=mask_mn)
                tl.debug_barrier()
        _store_rows(dk_ptr + b * s_dkb + h * s_dkh, offs_n, s_dkn, offs_d, mask_n, D,
                   (dk * sm_scale).to(dk_ptr.dtype.element_ty))  # fmt: skip
        _store_rows(dv_ptr + b * s_dvb + h * s_dvh, offs_n, s_dvn, offs_d, mask_n, D,
                   dv.to(dv_ptr.dtype.element_ty))  # fmt: skip


@triton.jit
def _attn_bwd_dkdv_allq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dbias_ptr,  #
    s_qb, s_qh, s_qn,  #
    s_kb, s_kh, s_kn,  #
    s_vb, s_vh, s_vn,  #
    s_bb, s_bh, s_bm, s_bn,  #
    s_dob, s_doh, s_don,  #
    s_dkb, s_dkh, s_dkn,  #
    s_dvb, s_dvh, s_dvn,  #
    s_dbg, s_dbh, s_dbm,  #
    B, H, N, D, batches_per_group, qk_scale, sm_scale,  #
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, IEEE: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  #
):  # fmt: skip
    """``_attn_bwd_dkdv_kernel`` for N <= BLOCK_M: every query in one tile, so a batch is one step and the bias
    gradient of this program's [N, BLOCK_N] columns sums over the group's batches in registers, stored once at
    the end: no read-add-write of the partial buffer, and no barrier, per step. The tile's math repeats that
    kernel's on purpose: in a shared helper, ptxas allocates the default kernel's registers worse (several times
    the spills on sm90), and that kernel is the default everywhere but sm90."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_m = offs_m < N
    mask_mn = mask_m[:, None] & mask_n[None, :]
    b_start = g * batches_per_group
    b_end = tl.minimum(b_start + batches_per_group, B)
    dbias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for b in range(b_start, b_end):
        k = _load_rows(k_ptr + b * s_kb + h * s_kh, offs_n, s_kn, offs_d, mask_n, D)
        v = _load_rows(v_ptr + b * s_vb + h * s_vh, offs_n, s_vn, offs_d, mask_n, D)
        q = _load_rows(q_ptr + b * s_qb + h * s_qh, offs_m, s_qn, offs_d, mask_m, D)
        do = _load_rows(do_ptr + b * s_dob + h * s_doh, offs_m, s_don, offs_d, mask_m, D)
        row = (b * H + h) * N
        lse = tl.load(lse_ptr + row + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + row + offs_m, mask=mask_m, other=0.0)
        s = _scores(q, k, bias_ptr + b * s_bb + h * s_bh, offs_m, offs_n, mask_m, mask_n, s_bm, s_bn,
                    qk_scale, HAS_BIAS, IEEE)  # fmt: skip
        p = tl.where(mask_mn, tl.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
        dv = _dot(tl.trans(p), do, IEEE)
        ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
        dk = _dot(tl.trans(ds), q, IEEE)
        if BIAS_GRAD:
            dbias += ds
        _store_rows(dk_ptr + b * s_dkb + h * s_dkh, offs_n, s_dkn, offs_d, mask_n, D,
                   (dk * sm_scale).to(dk_ptr.dtype.element_ty))  # fmt: skip
        _store_rows(dv_ptr + b * s_dvb + h * s_dvh, offs_n, s_dvn, offs_d, mask_n, D,
                   dv.to(dv_ptr.dtype.element_ty))  # fmt: skip
    if BIAS_GRAD:
        dbias_ptrs = dbias_ptr + g * s_dbg + h * s_dbh + offs_m[:, None] * s_dbm + offs_n[None, :]
        tl.store(dbias_ptrs, dbias, mask=mask_mn)


@triton.jit
def _attn_bwd_fused_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, dbias_ptr,  #
    s_qb, s_qh, s_qn,  #
    s_kb, s_kh, s_kn,  #
    s_vb, s_vh, s_vn,  #
    s_bb, s_bh, s_bm, s_bn,  #
    s_ob, s_oh, s_on,  #
    s_dob, s_doh, s_don,  #
    s_dqb, s_dqh, s_dqn,  #
    s_dkb, s_dkh, s_dkn,  #
    s_dvb, s_dvh, s_dvn,  #
    s_dbg, s_dbh, s_dbm,  #
    B, H, N, D, batches_per_group, qk_scale, sm_scale,  #
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, IEEE: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DKDV_T: tl.constexpr,  #
):  # fmt: skip
    """The whole backward in one kernel for N <= BLOCK_M: one program per (h, batch group) walks its batches and,
    per batch, the key blocks, with every query in one tile. q, dO and o_ptr are read once per batch (the two-kernel
    path reads q and dO once per key block, k and v once per query block) and P, dP, dS are computed once (the
    dq kernel recomputes them): five products a tile instead of seven. dq sums over the key blocks in registers.
    The bias gradient of each [N, BLOCK_N] tile adds into the group's fp32 partial buffer: the group's first batch
    stores it (the buffer needs no zeroing), the others read, add and write it back, then a barrier orders that
    against the next batch's read, which Triton may lay out across other threads of the block."""
    h = tl.program_id(0)
    g = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    b_start = g * batches_per_group
    b_end = tl.minimum(b_start + batches_per_group, B)
    dbias_base = dbias_ptr + g * s_dbg + h * s_dbh
    for b in range(b_start, b_end):
        q = _load_rows(q_ptr + b * s_qb + h * s_qh, offs_m, s_qn, offs_d, mask_m, D)
        do = _load_rows(do_ptr + b * s_dob + h * s_doh, offs_m, s_don, offs_d, mask_m, D)
        o = _load_rows(o_ptr + b * s_ob + h * s_oh, offs_m, s_on, offs_d, mask_m, D)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # [BLOCK_M]
        lse = tl.load(lse_ptr + (b * H + h) * N + offs_m, mask=mask_m, other=0.0)
        bias_base = bias_ptr + b * s_bb + h * s_bh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            mask_mn = mask_m[:, None] & mask_n[None, :]
            k = _load_rows(k_ptr + b * s_kb + h * s_kh, offs_n, s_kn, offs_d, mask_n, D)
            v = _load_rows(v_ptr + b * s_vb + h * s_vh, offs_n, s_vn, offs_d, mask_n, D)
            s = _dot(q, tl.trans(k), IEEE) * qk_scale
            if HAS_BIAS:
                # Offsets in 32 bits, then one pointer add (here and for the bias gradient): a [BLOCK_M, BLOCK_N]
                # tile of 64-bit pointers takes more registers and spills.
                bias_offs = offs_m[:, None] * s_bm + offs_n[None, :] * s_bn
                s += tl.load(bias_base + bias_offs, mask=mask_mn, other=0.0).to(tl.float32) * 1.4426950408889634
            p = tl.where(mask_mn, tl.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
            # With DKDV_T, dv and dk as their transposes, [BLOCK_D, BLOCK_N] = [D, N] x [N, BLOCK_N]: dO and q are
            # then left operands, which Hopper's tensor cores read from shared memory, rather than right operands of
            # a 16-row product, which Triton keeps in registers across the key loop. Products in this order: p dies
            # before dq's product, which keeps fewer tiles live.
            if DKDV_T:
                dv_t = tl.dot(tl.trans(do), p.to(do.dtype))
            else:
                dv = _dot(tl.trans(p), do, IEEE)
            ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
            if DKDV_T:
                dk_t = tl.dot(tl.trans(q), ds.to(q.dtype))
            else:
                dk = _dot(tl.trans(ds), q, IEEE)
            dq = tl.dot(ds.to(k.dtype), k, dq)  # accumulates in place: no second [BLOCK_M, BLOCK_D] fp32 tile
            if DKDV_T:
                mask_dn = (offs_d < D)[:, None] & mask_n[None, :]
                tl.store(
                    dk_ptr + b * s_dkb + h * s_dkh + offs_n[None, :] * s_dkn + offs_d[:, None],
                    (dk_t * sm_scale).to(dk_ptr.dtype.element_ty),
                    mask=mask_dn,
                )
                tl.store(
                    dv_ptr + b * s_dvb + h * s_dvh + offs_n[None, :] * s_dvn + offs_d[:, None],
                    dv_t.to(dv_ptr.dtype.element_ty),
                    mask=mask_dn,
                )
            else:
                _store_rows(dk_ptr + b * s_dkb + h * s_dkh, offs_n, s_dkn, offs_d, mask_n, D,
                           (dk * sm_scale).to(dk_ptr.dtype.element_ty))  # fmt: skip
                _store_rows(dv_ptr + b * s_dvb + h * s_dvh, offs_n, s_dvn, offs_d, mask_n, D,
                           dv.to(dv_ptr.dtype.element_ty))  # fmt: skip
            if BIAS_GRAD:
                dbias_ptrs = dbias_base + (offs_m[:, None] * s_dbm + offs_n[None, :])
                # As a [BLOCK_N] vector: the interpreter takes no scalar condition in a mask.
                not_first = tl.full([BLOCK_N], b, tl.int32) > b_start
                prev = tl.load(dbias_ptrs, mask=mask_mn & not_first[None, :], other=0.0)
                tl.store(dbias_ptrs, prev + ds, mask=mask_mn)
                tl.debug_barrier()
        _store_rows(dq_ptr + b * s_dqb + h * s_dqh, offs_m, s_dqn, offs_d, mask_m, D,
                   (dq * sm_scale).to(dq_ptr.dtype.element_ty))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Host launchers

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _validate(q, k, v, bias):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"attention: q, k, v must have one shape [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    _validate_tensors(q, k, v, tuple(q.shape), bias)


def _validate_tensors(q, k, v, shape, bias):
    """``_validate`` past the shapes, for q, k, v of [B, H, N, D] ``shape``. ``attention_qkvpacked`` passes its qkv
    as all three: its views share its dtype, device and last stride, so checking qkv checks them (without making
    the views)."""
    if q.dtype not in _DTYPES:
        raise TypeError(f"attention: dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    check_kernel_device("attention", q)
    check_interpreter_dtype("attention", q.device, q.dtype)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:  # a single feature has no stride to honour
            raise ValueError(f"attention: {name}'s last dimension must be contiguous (stride 1), got {t.stride()}")
    B, H, N, D = shape
    if N < 1 or B < 1 or H < 1:
        raise ValueError(f"attention: empty input of shape {shape}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dimension {D} is not supported (1 to {MAX_HEAD_DIM})")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"attention: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype not in _DTYPES:
            raise TypeError(f"attention: bias dtype {bias.dtype} is not supported; use float16, bfloat16 or float32")
        if bias.device != q.device:
            raise ValueError(f"attention: bias is on {bias.device} but q is on {q.device}")
        if bias.dim() > 4:
            raise ValueError(f"attention: bias of shape {tuple(bias.shape)} has more than 4 dimensions")
        # Broadcasts to exactly [B, H, N, N]: each dimension, aligned from the right, 1 or the target's (what
        # torch.broadcast_shapes(...) == (B, H, N, N) says, without its symbolic-shape machinery on the host).
        target = (B, H, N, N)
        if not all(s == 1 or s == n for s, n in zip(reversed(bias.shape), reversed(target))):
            raise ValueError(f"attention: bias of shape {tuple(bias.shape)} does not broadcast to [B, H, N, N] = "
                             f"{[B, H, N, N]}")  # fmt: skip


def _bias_view(bias: torch.Tensor | None, B: int, H: int, N: int, like: torch.Tensor):
    """The bias expanded to [B, H, N, N] (broadcast dimensions get stride 0) and its four strides."""
    if bias is None:
        return like, (0, 0, 0, 0)
    view = bias.expand(B, H, N, N)
    return view, view.stride()


def attention_fwd(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns O [B, H, N, D] (memory [B, N, H, D]) and the base-2 LSE [B, H, N]."""
    B, H, N, D = q.shape
    o = torch.empty((B, N, H, D), device=q.device, dtype=q.dtype).permute(0, 2, 1, 3)  # [B, H, N, D] view
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    bias_v, sb = _bias_view(bias, B, H, N, q)
    cfg = tuning.attention_tile("fwd", D, q.dtype, tuning.shared_memory(q.device))
    grid = (cdiv(N, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, bias_v, o, lse,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *sb,
        *o.stride()[:3],
        H, N, D, scale * LOG2E,
        HAS_BIAS=bias is not None, IEEE=q.dtype == torch.float32,
        BLOCK_D=max(16, next_power_of_2(D)),
        **cfg,
    )  # fmt: skip
    return o, lse


def _num_groups(B: int, H: int, n_blocks: int, device: torch.device, batch_broadcast: bool, scale: float = 1,
                per_sm: int = 4) -> int:  # fmt: skip
    """How many batch groups the dk/dv kernel uses: enough programs to fill the GPU (``per_sm`` a multiprocessor,
    times ``scale``), few enough partial bias buffers to stay far below [B, H, N, N]."""
    if not batch_broadcast or B == 1:
        return B
    if device.type == "cuda":
        target = fill_programs(device, per_sm)
    else:
        target = 2 * n_blocks * H  # the interpreter: two groups, so the grouping path is exercised
    groups = round(max(1, math.ceil(target / (n_blocks * H))) * scale)
    return max(1, min(groups, B // 2))


def attention_bwd(do, q, k, v, bias, o, lse, scale: float, bias_grad: bool, packed: bool = False):
    """Launch the backward kernels; returns dq, dk, dv [B, H, N, D] (memory [B, N, H, D] each) and the bias
    gradient in the bias's own shape and dtype (an empty tensor when ``bias_grad`` is False). With ``packed``, one
    tensor dqkv [B, N, 3, H, D] in place of the three (they are its slices), and the bias gradient."""
    B, H, N, D = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    if packed:
        dqkv = torch.empty((B, N, 3, H, D), device=q.device, dtype=q.dtype)
        dq, dk, dv = _split_packed(dqkv)  # [B, H, N, D] views
    else:
        dq, dk, dv = (torch.empty((B, N, H, D), device=q.device, dtype=q.dtype).permute(0, 2, 1, 3)
                      for _ in range(3))  # fmt: skip
    fused = tuning.attention_backward(N, D, q.dtype, q.device) == "fused"
    launch = _launch_fused_bwd if fused else _launch_two_kernel_bwd
    dbias_partial = launch(do, q, k, v, bias, o, lse, dq, dk, dv, scale, bias_grad)
    grads = (dqkv,) if packed else (dq, dk, dv)
    if not bias_grad:
        return *grads, torch.empty(0, device=q.device, dtype=q.dtype)
    if _batch_broadcast(bias):
        dbias = dbias_partial.sum(0, keepdim=True)  # [G, H, N, N] -> [1, H, N, N], in a fixed order
    else:
        dbias = dbias_partial  # G == B: one partial per batch, already [B, H, N, N]
    return *grads, dbias.sum_to_size(bias.shape).to(bias.dtype)


def _partial_bias_grad(groups: int, H: int, N: int, bias_grad: bool, zeroed: bool, device) -> torch.Tensor:
    """The fp32 [G, H, N, N] buffer the dk/dv kernels sum the bias gradient into (a dummy without one)."""
    if not bias_grad:
        return torch.empty((1, 1, 1, 1), device=device, dtype=torch.float32)
    return (torch.zeros if zeroed else torch.empty)((groups, H, N, N), device=device, dtype=torch.float32)


def _group_sizes(B: int, groups: int) -> tuple[int, int]:
    """(batches per group, groups) with no empty group."""
    per_group = math.ceil(B / groups)
    return per_group, math.ceil(B / per_group)


def _batch_broadcast(bias: torch.Tensor | None) -> bool:
    """Whether the bias is shared over the batch by its shape, so its gradient sums over batch groups. By shape, not
    by stride: a bias of batch size B that is an expanded view (stride 0) still gets one gradient per batch, which
    autograd then sums through the expand."""
    return bias is not None and (bias.dim() < 4 or bias.shape[0] == 1)


def _launch_fused_bwd(do, q, k, v, bias, o, lse, dq, dk, dv, scale, bias_grad) -> torch.Tensor:
    """``_attn_bwd_fused_kernel`` on a (H, groups) grid; returns the bias gradient's [G, H, N, N] partials."""
    B, H, N, D = q.shape
    bias_v, sb = _bias_view(bias, B, H, N, q)
    cfg = tuning.attention_tile("fused", D, q.dtype, tuning.shared_memory(q.device))
    cfg["BLOCK_M"] = max(16, next_power_of_2(N))
    per_sm, group_scale = tuning.attention_groups("fused")
    broadcast = _batch_broadcast(bias)
    groups = _num_groups(B, H, 1, q.device, broadcast, group_scale, per_sm) if bias_grad else B
    per_group, groups = _group_sizes(B, groups)
    # Every element of a group's partial is stored by its first batch: no zeroing.
    dbias_partial = _partial_bias_grad(groups, H, N, bias_grad, False, q.device)
    _attn_bwd_fused_kernel[(H, groups)](
        q, k, v, bias_v, o, do, lse, dq, dk, dv, dbias_partial,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *sb,
        *o.stride()[:3],
        *do.stride()[:3],
        *dq.stride()[:3],
        *dk.stride()[:3],
        *dv.stride()[:3],
        *dbias_partial.stride()[:3],
        B, H, N, D, per_group, scale * LOG2E, scale,
        HAS_BIAS=bias is not None, BIAS_GRAD=bias_grad, IEEE=False, BLOCK_D=max(16, next_power_of_2(D)),
        **cfg,
    )  # fmt: skip
    return dbias_partial


def _launch_two_kernel_bwd(do, q, k, v, bias, o, lse, dq, dk, dv, scale, bias_grad) -> torch.Tensor:
    """The dq kernel, then a dk/dv kernel; returns the bias gradient's [G, H, N, N] partials."""
    B, H, N, D = q.shape
    bias_v, sb = _bias_view(bias, B, H, N, q)
    block_d = max(16, next_power_of_2(D))
    ieee = q.dtype == torch.float32
    shared = tuning.shared_memory(q.device)
    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    cfg = tuning.attention_tile("dq", D, q.dtype, shared)
    _attn_bwd_dq_kernel[(cdiv(N, cfg["BLOCK_M"]), B * H)](
        q, k, v, bias_v, o, do, lse, delta, dq,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *sb,
        *o.stride()[:3],
        *do.stride()[:3],
        *dq.stride()[:3],
        H, N, D, scale * LOG2E, scale,
        HAS_BIAS=bias is not None, IEEE=ieee, BLOCK_D=block_d, **cfg,
    )  # fmt: skip

    all_queries = tuning.attention_all_queries(N, D, q.dtype, q.device)
    kind = "dkdv_allq" if all_queries else "dkdv"
    cfg = tuning.attention_tile(kind, D, q.dtype, shared)
    if all_queries:
        cfg["BLOCK_M"] = max(16, next_power_of_2(N))
    n_blocks = cdiv(N, cfg["BLOCK_N"])
    per_sm, group_scale = tuning.attention_groups(kind)
    broadcast = _batch_broadcast(bias)
    groups = _num_groups(B, H, n_blocks, q.device, broadcast, group_scale, per_sm) if bias_grad else B
    per_group, groups = _group_sizes(B, groups)
    # The all-queries kernel stores every element of its partial once; the other adds into it.
    dbias_partial = _partial_bias_grad(groups, H, N, bias_grad, not all_queries, q.device)
    kernel = _attn_bwd_dkdv_allq_kernel if all_queries else _attn_bwd_dkdv_kernel
    kernel[(n_blocks, H, groups)](
        q, k, v, bias_v, do, lse, delta, dk, dv, dbias_partial,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *sb,
        *do.stride()[:3],
        *dk.stride()[:3],
        *dv.stride()[:3],
        *dbias_partial.stride()[:3],
        B, H, N, D, per_group, scale * LOG2E, scale,
        HAS_BIAS=bias is not None, BIAS_GRAD=bias_grad, IEEE=ieee, BLOCK_D=block_d, **cfg,
    )  # fmt: skip
    return dbias_partial


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration: opaque custom ops, so torch.compile traces a model around them without a graph break


def _attention_fwd_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, bias, scale)


_attention_fwd_op = torch.library.custom_op("beit_kernels::attention_fwd", _attention_fwd_impl, mutates_args=())


@_attention_fwd_op.register_fake
def _(q, k, v, bias, scale):
    B, H, N, D = q.shape
    o = q.new_empty((B, N, H, D)).permute(0, 2, 1, 3)
    return o, q.new_empty((B, H, N), dtype=torch.float32)


def _attention_bwd_impl(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(do, q, k, v, bias, o, lse, scale, bias_grad)


_attention_bwd_op = torch.library.custom_op("beit_kernels::attention_bwd", _attention_bwd_impl, mutates_args=())


@_attention_bwd_op.register_fake
def _(do, q, k, v, bias, o, lse, scale, bias_grad):
    B, H, N, D = q.shape

    def like_q():
        return q.new_empty((B, N, H, D)).permute(0, 2, 1, 3)

    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty((0,))
    return like_q(), like_q(), like_q(), dbias


def _attention_bwd_packed_impl(
    do: torch.Tensor,
    qkv: torch.Tensor,
    bias: torch.Tensor | None,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of ``attention_qkvpacked``: (dqkv [B, N, 3, H, D], dbias); do and o are [B, H, N, D]."""
    q, k, v = _split_packed(qkv)
    return attention_bwd(do, q, k, v, bias, o, lse, scale, bias_grad, packed=True)


_attention_bwd_packed_op = torch.library.custom_op(
    "beit_kernels::attention_bwd_packed", _attention_bwd_packed_impl, mutates_args=()
)


@_attention_bwd_packed_op.register_fake
def _(do, qkv, bias, o, lse, scale, bias_grad):
    dbias = bias.new_empty(bias.shape) if bias_grad else qkv.new_empty((0,))
    return qkv.new_empty(qkv.shape), dbias


# ----------------------------------------------------------------------------------------------------------------
# Autograd


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        o, lse = call_op(_attention_fwd_op, _attention_fwd_impl, q, k, v, bias, scale)
        ctx.save_for_backward(q, k, v, bias, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, bias, o, lse = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = call_op(_attention_bwd_op, _attention_bwd_impl, do, q, k, v, bias, o, lse, ctx.scale,
                                     bias_grad)  # fmt: skip
        return dq, dk, dv, (dbias if bias_grad else None), None


class AttentionPackedFunction(torch.autograd.Function):
    """Attention on a packed qkv [B, N, 3, H, D]: the backward writes dq, dk, dv straight into one dqkv of that
    layout, where three separate gradients would be stacked into it by autograd (a copy of all three)."""

    @staticmethod
    def forward(ctx, qkv, bias, scale):
        q, k, v = _split_packed(qkv)
        o, lse = call_op(_attention_fwd_op, _attention_fwd_impl, q, k, v, bias, scale)
        ctx.save_for_backward(qkv, bias, o, lse)
        ctx.scale = scale
        return o.transpose(1, 2)  # [B, N, H, D], contiguous: o's memory is laid out so

    @staticmethod
    def backward(ctx, do):
        qkv, bias, o, lse = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[1]
        dqkv, dbias = call_op(_attention_bwd_packed_op, _attention_bwd_packed_impl,
                              do.transpose(1, 2), qkv, bias, o, lse, ctx.scale, bias_grad)  # fmt: skip
        # do: [B, N, H, D] -> [B, H, N, D] view
        return dqkv, (dbias if bias_grad else None), None


def _split_packed(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, N, D], views of qkv [B, N, 3, H, D]."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return q, k, v


# ----------------------------------------------------------------------------------------------------------------
# Public function


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, *, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale * q @ k^T + bias) @ v for q, k, v [B, H, N, D]; differentiable in q, k, v and the bias.

    See the module docstring for shapes, dtypes, memory and reproducibility.
    """
    _validate(q, k, v, bias)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return AttentionFunction.apply(q, k, v, bias, float(scale))


def attention_qkvpacked(
    qkv: torch.Tensor, bias: torch.Tensor | None = None, *, scale: float | None = None
) -> torch.Tensor:
    """``attention`` on a packed qkv [B, N, 3, H, D] (a qkv projection's output reshaped, the layout of
    flash-attn's ``flash_attn_qkvpacked_func``); returns [B, N, H, D], contiguous, so ``out.reshape(B, N, H * D)``
    is free. Differentiable in qkv and the bias; the gradient of qkv comes as one tensor of qkv's shape, with no
    stacking copy. bias broadcasts to [B, H, N, N] as in ``attention``."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"attention_qkvpacked: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention_qkvpacked: qkv must be [B, N, 3, H, D], got shape {tuple(qkv.shape)}")
    B, N, _, H, D = qkv.shape
    _validate_tensors(qkv, qkv, qkv, (B, H, N, D), bias)
    if scale is None:
        scale = qkv.shape[-1] ** -0.5
    return AttentionPackedFunction.apply(qkv, bias, float(scale))
