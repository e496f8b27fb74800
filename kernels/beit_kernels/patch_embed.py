"""Fused patch embedding: normalise -> patchify -> linear -> mask-token blend -> cls prepend -> position embedding.

Math (p = patch size, N = (H/p)(W/p) patches, K = 3 p p, T = N + 1 with a cls token, else N):

    pix[b, c, h, w]  = images[b, c, h, w] * scale[c] + shift[c]        scale = 1/std, shift = -mean/std (fp32)
    P[b, n, k]       = pix[b, c, hp p + i, wp p + j]                    k = (c, i, j) in Conv2d weight order
    x[b, n, :]       = P[b, n, :] @ weight.view(D, K)^T + bias          fp32 accumulation
    x[b, n, :]       = x * (1 - w) + mask_token * w                     w = mask[b, n], the official blend, literally
    out[b, 1 + n, :] = x[b, n, :] (+ pos_embed[0, 1 + n, :])            the blend comes before the position embedding
    out[b, 0, :]     = cls_token (+ pos_embed[0, 0, :])

This is what the official ``PatchEmbed`` (Conv2d with kernel = stride = p) followed by BEiT's mask blend, cls
concat and ``+ pos_embed`` compute, in one kernel: the forward is a GEMM whose A operand (the patches) is gathered
from the image in registers, with the normalisation applied on load, and whose epilogue does the bias, the blend,
the cls row and the position embedding. Every intermediate stays in fp32 and is rounded once, on store.

Backward: ``dW = dX_p^T @ P`` (dX_p = dY on patch rows times (1 - w)) recomputes the patches from the image in the
same way instead of keeping the [B N, K] patch matrix (77 MB in bf16 at BEiT-B, B=256). The rows are split over
programs (split-K over the B N axis), each writing an fp32 partial that the host sums; the same kernel also
reduces the bias gradient (sum of dX_p) and the mask-token gradient (sum of dY w). cls and pos_embed gradients are
plain column sums of dY.

Shapes and dtypes:
    images     uint8 [B, H, W, 3] (channels last, values 0..255, as DALI hands them), or fp32/fp16/bf16 [B, 3, H, W];
               any strides. The images get no gradient (images that require one are refused).
    weight     [D, 3, p, p] (Conv2d layout), bias [D] or None; float.
    mask       bool [B, N] (or [B, H/p, W/p]); needs mask_token [1, 1, D] (or [D]), which is ignored without mask.
    cls_token  [1, 1, D] or None; pos_embed [1, T, D] or None.
    mean, std  3 per-channel values (tensors or iterables; in 0..255 units for uint8 images), both or neither;
               a zero std is refused when given as numbers (a device tensor's values are not read: that would sync).
    out        [B, T, D] in the autocast dtype when autocast is on for the images' device, else weight.dtype.
Gradients: weight, bias, mask_token, cls_token, pos_embed (in their own dtypes).

Limits: square patches, 3 channels; H and W multiples of p. fp32 GEMMs follow ``torch.backends.cudnn.allow_tf32``
(as Conv2d does, TF32 by default on Ampere+); fp16/bf16 GEMMs accumulate in fp32. Mean and std given as Python
sequences are copied to the device on each call (a host-to-device copy): pass device tensors in a training loop.
Tiles: ``beit_kernels.tuning`` (entries ``patch_embed.fwd`` and ``patch_embed.bwd``). The weight gradient can also
run as a cuBLAS GEMM on materialised patches (``patch_embed.bwd``'s ``weight_grad``, off by default).
"""

import math

import torch
import triton
import triton.language as tl

from beit_kernels import tuning
from beit_kernels.backend import add_t_matmul_fp32, call_op, cdiv, check_interpreter_dtype, check_kernel_device

# ----------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _load_patches(
    img_ptr,
    scale_ptr,
    shift_ptr,
    b,
    hp,
    wp,
    row_ok,
    offs_k,
    K,
    s_ib,
    s_ic,
    s_ih,
    s_iw,
    P: tl.constexpr,
    NORM: tl.constexpr,
):
    """[BLOCK_M, BLOCK_K] patch pixels in fp32, normalised; zero outside the valid rows and the K range."""
    c = offs_k // (P * P)
    rem = offs_k % (P * P)
    i = rem // P
    j = rem % P
    k_ok = offs_k < K
    row_off = b.to(tl.int64) * s_ib + (hp * P).to(tl.int64) * s_ih + (wp * P).to(tl.int64) * s_iw
    col_off = c.to(tl.int64) * s_ic + i.to(tl.int64) * s_ih + j.to(tl.int64) * s_iw
    ok = row_ok[:, None] & k_ok[None, :]
    pix = tl.load(img_ptr + row_off[:, None] + col_off[None, :], mask=ok, other=0).to(tl.float32)
    if NORM:
        sc = tl.load(scale_ptr + c, mask=k_ok, other=0.0)
        sh = tl.load(shift_ptr + c, mask=k_ok, other=0.0)
        pix = tl.where(ok, pix * sc[None, :] + sh[None, :], 0.0)
    return pix


@triton.jit
def _patch_embed_fwd_kernel(
    img_ptr,
    w_ptr,
    b_ptr,
    mask_ptr,
    mtok_ptr,
    cls_ptr,
    pos_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    M,  # B * T output rows
    T,
    WP,  # patches per image row
    D,
    K,
    s_ib,
    s_ic,
    s_ih,
    s_iw,
    s_wd,
    s_wk,
    s_mb,
    s_mn,
    P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_CLS: tl.constexpr,
    HAS_POS: tl.constexpr,
    NORM: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Feature tiles vary fastest, so the programs sharing a row block (the same patches) run together and read
    # the image through L2 once rather than once per feature tile. One grid axis: no 65535 limit on row blocks.
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_n = pid % num_n
    pid_m = pid // num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < D
    b = offs_m // T
    t = offs_m % T
    n = t - HAS_CLS  # patch index; -1 on cls rows
    is_patch = m_ok & (n >= 0)
    n_c = tl.where(is_patch, n, 0)
    hp = n_c // WP
    wp = n_c % WP
    cdt = out_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = _load_patches(
            img_ptr, scale_ptr, shift_ptr, b, hp, wp, is_patch, offs_k, K, s_ib, s_ic, s_ih, s_iw, P, NORM
        )
        w_ok = (offs_k < K)[:, None] & n_ok[None, :]
        w = tl.load(w_ptr + offs_k[:, None] * s_wk + offs_n[None, :] * s_wd, mask=w_ok, other=0.0)
        acc = tl.dot(a.to(cdt), w.to(cdt), acc, input_precision=DOT_PREC)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_MASK:
        wgt = tl.load(mask_ptr + b.to(tl.int64) * s_mb + n_c * s_mn, mask=is_patch, other=0).to(tl.float32)
        mtok = tl.load(mtok_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * (1.0 - wgt[:, None]) + mtok[None, :] * wgt[:, None]
    if HAS_CLS:
        cls = tl.load(cls_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = tl.where(is_patch[:, None], acc, cls[None, :])
    if HAS_POS:
        pos = tl.load(pos_ptr + t[:, None] * D + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc += pos.to(tl.float32)
    out_off = offs_m.to(tl.int64)[:, None] * D + offs_n[None, :]
    tl.store(out_ptr + out_off, acc.to(cdt), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _patch_embed_bwd_kernel(
    img_ptr,
    dy_ptr,
    mask_ptr,
    scale_ptr,
    shift_ptr,
    dw_ptr,  # fp32 [S, D, K] partials
    db_ptr,  # fp32 [S, D] partials of the bias gradient
    dmt_ptr,  # fp32 [S, D] partials of the mask-token gradient
    MP,  # B * N patch rows
    N,
    T,
    WP,
    D,
    K,
    rows_per_split,
    s_ib,
    s_ic,
    s_ih,
    s_iw,
    s_mb,
    s_mn,
    P: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_CLS: tl.constexpr,
    NORM: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    d_ok = offs_d < D
    cdt = dy_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_m = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, MP)
    for r0 in range(row_start, row_end, BLOCK_M):
        offs_r = r0 + tl.arange(0, BLOCK_M)
        r_ok = offs_r < row_end
        b = offs_r // N
        n = offs_r % N
        hp = n // WP
        wp = n % WP
        t = n + HAS_CLS
        dy_off = (b.to(tl.int64) * T + t)[:, None] * D + offs_d[None, :]
        dy = tl.load(dy_ptr + dy_off, mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if HAS_MASK:
            wgt = tl.load(mask_ptr + b.to(tl.int64) * s_mb + n * s_mn, mask=r_ok, other=0).to(tl.float32)
            acc_m += tl.sum(dy * wgt[:, None], axis=0)
            dy = dy * (1.0 - wgt[:, None])  # exact: the weight is 0 or 1
        acc_b += tl.sum(dy, axis=0)
        a = _load_patches(img_ptr, scale_ptr, shift_ptr, b, hp, wp, r_ok, offs_k, K, s_ib, s_ic, s_ih, s_iw, P, NORM)
        acc = tl.dot(tl.trans(dy.to(cdt)), a.to(cdt), acc, input_precision=DOT_PREC)
    base = pid_s.to(tl.int64) * D
    tl.store(dw_ptr + (base + offs_d[:, None]) * K + offs_k[None, :], acc, mask=d_ok[:, None] & (offs_k < K)[None, :])
    # Only one column of programs writes the bias and mask-token partials (all compute them: it is cheap).
    if pid_k == 0:
        tl.store(db_ptr + base + offs_d, acc_b, mask=d_ok)
        if HAS_MASK:
            tl.store(dmt_ptr + base + offs_d, acc_m, mask=d_ok)


# ----------------------------------------------------------------------------------------------------------------
# Host launchers


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow Conv2d's TF32 switch; fp16/bf16 operands ignore the setting, so they keep the default."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def _image_strides(images: torch.Tensor) -> tuple[int, int, int, int]:
    """(b, c, h, w) strides of either layout."""
    if images.dtype == torch.uint8:
        sb, sh, sw, sc = images.stride()  # [B, H, W, 3]
        return sb, sc, sh, sw
    return tuple(images.stride())  # [B, 3, H, W]


def _image_hw(images: torch.Tensor) -> tuple[int, int]:
    return (images.shape[1], images.shape[2]) if images.dtype == torch.uint8 else (images.shape[2], images.shape[3])


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter runs programs one by one; a couple of splits exercise the partial sums


def _patch_embed_fwd(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    mask_token: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Launch the forward on validated inputs (see ``_validate``); returns [B, T, D] in ``out_dtype``."""
    B = images.shape[0]
    D, _, p, _ = weight.shape
    H, W = _image_hw(images)
    WP = W // p
    N = (H // p) * WP
    has_cls = cls_token is not None
    T = N + int(has_cls)
    K = 3 * p * p
    out = torch.empty(B, T, D, device=images.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    w2 = weight.reshape(D, K)  # [D, 3, p, p] -> [D, K], k = (c, i, j)
    # The epilogue indexes these small parameters densely.
    bias, mask_token, cls_token, pos_embed = (
        t.contiguous() if t is not None else None for t in (bias, mask_token, cls_token, pos_embed)
    )
    s_ib, s_ic, s_ih, s_iw = _image_strides(images)
    mask_u8 = mask.view(torch.uint8) if mask is not None else None
    dummy = out  # never dereferenced: the constexpr flags switch those loads off
    tile = tuning.get("patch_embed.fwd")
    grid = (cdiv(D, tile["BLOCK_N"]) * cdiv(B * T, tile["BLOCK_M"]),)
    _patch_embed_fwd_kernel[grid](
        images,
        w2,
        bias if bias is not None else dummy,
        mask_u8 if mask is not None else dummy,
        mask_token if mask_token is not None else dummy,
        cls_token if has_cls else dummy,
        pos_embed if pos_embed is not None else dummy,
        scale if scale is not None else dummy,
        shift if shift is not None else dummy,
        out,
        B * T,
        T,
        WP,
        D,
        K,
        s_ib,
        s_ic,
        s_ih,
        s_iw,
        w2.stride(0),
        w2.stride(1),
        mask_u8.stride(0) if mask is not None else 0,
        mask_u8.stride(1) if mask is not None else 0,
        P=p,
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
        HAS_CLS=int(has_cls),  # an int: it offsets the token index
        HAS_POS=pos_embed is not None,
        NORM=scale is not None,
        DOT_PREC=_dot_precision(out_dtype),
        **tile,
    )
    return out


patch_embed_fwd = torch.library.custom_op("beit_kernels::patch_embed_fwd", _patch_embed_fwd, mutates_args=())


@patch_embed_fwd.register_fake
def _(images, weight, bias, mask, mask_token, cls_token, pos_embed, scale, shift, out_dtype):
    D, _, p, _ = weight.shape
    H, W = _image_hw(images)
    T = (H // p) * (W // p) + int(cls_token is not None)
    return images.new_empty(images.shape[0], T, D, dtype=out_dtype)


def _patch_embed_bwd(
    grad_out: torch.Tensor,
    images: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    has_cls: bool,
    weight_grad: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 gradients (weight [D, 3, p, p], bias [D], mask_token [D], cls [D], pos [T, D]) from grad_out [B, T, D];
    ``weight_grad`` picks the weight gradient's GEMM (tuning entry ``patch_embed.bwd``)."""
    grad_out = grad_out.contiguous()
    B, T, D = grad_out.shape
    p = weight.shape[2]
    grad_pos = grad_out.sum(0, dtype=torch.float32)  # [T, D]
    grad_cls = grad_pos[0] if has_cls else grad_pos.new_zeros(D)
    if weight_grad == "cublas":
        dw, db, dmt = _weight_grads_cublas(grad_out, images, mask, scale, shift, has_cls, p)
        return dw, db, dmt, grad_cls.clone(), grad_pos
    if weight_grad != "triton":
        raise ValueError(f"weight_grad must be 'triton' or 'cublas', got {weight_grad!r}")
    H, W = _image_hw(images)
    WP = W // p
    N = (H // p) * WP
    K = 3 * p * p
    f32 = dict(device=grad_out.device, dtype=torch.float32)
    MP = B * N
    tile = {k: v for k, v in tuning.get("patch_embed.bwd").items() if k != "weight_grad"}
    block_m = tile["BLOCK_M"]
    tiles = cdiv(D, tile["BLOCK_D"]) * cdiv(K, tile["BLOCK_K"])
    # Enough row splits for about four programs per SM, but at least one BLOCK_M of rows in each.
    splits = max(1, min(cdiv(4 * _num_sms(grad_out.device), tiles), cdiv(max(MP, 1), block_m)))
    rows_per_split = cdiv(cdiv(max(MP, 1), splits), block_m) * block_m
    splits = cdiv(max(MP, 1), rows_per_split)
    # A launch stores every element of the weight and bias partials, and of the mask token's with a mask.
    launch = MP > 0 and D > 0
    dw = (torch.empty if launch else torch.zeros)(splits, D, K, **f32)
    db = (torch.empty if launch else torch.zeros)(splits, D, **f32)
    dmt = (torch.empty if launch and mask is not None else torch.zeros)(splits, D, **f32)
    if launch:
        s_ib, s_ic, s_ih, s_iw = _image_strides(images)
        mask_u8 = mask.view(torch.uint8) if mask is not None else None
        grid = (cdiv(D, tile["BLOCK_D"]), cdiv(K, tile["BLOCK_K"]), splits)
        _patch_embed_bwd_kernel[grid](
            images,
            grad_out,
            mask_u8 if mask is not None else dw,
            scale if scale is not None else dw,
            shift if shift is not None else dw,
            dw,
            db,
            dmt,
            MP,
            N,
            T,
            WP,
            D,
            K,
            rows_per_split,
            s_ib,
            s_ic,
            s_ih,
            s_iw,
            mask_u8.stride(0) if mask is not None else 0,
            mask_u8.stride(1) if mask is not None else 0,
            P=p,
            HAS_MASK=mask is not None,
            HAS_CLS=int(has_cls),  # an int: it offsets the token index
            NORM=scale is not None,
            DOT_PREC=_dot_precision(grad_out.dtype),
            **tile,
        )
    return dw.sum(0).view(D, 3, p, p), db.sum(0), dmt.sum(0), grad_cls.clone(), grad_pos


def _weight_grads_cublas(grad_out, images, mask, scale, shift, has_cls: bool, p: int):
    """(weight [D, 3, p, p], bias [D], mask_token [D]) gradients, fp32, with the patches materialised and the
    weight gradient one GEMM (``backend.add_t_matmul_fp32``); the same math as ``_patch_embed_bwd_kernel``."""
    B, T, D = grad_out.shape
    H, W = _image_hw(images)
    HP, WP = H // p, W // p
    N = HP * WP
    pix = images.permute(0, 3, 1, 2) if images.dtype == torch.uint8 else images  # [B, 3, H, W]
    pix = pix.float()
    if scale is not None:
        pix = pix * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1)
    # [B, 3, HP, p, WP, p] -> [B, HP, WP, 3, p, p] -> [B N, K], K in Conv2d weight order (c, i, j)
    patches = pix.reshape(B, 3, HP, p, WP, p).permute(0, 2, 4, 1, 3, 5).reshape(B * N, 3 * p * p)
    patches = patches.to(grad_out.dtype)
    dy = grad_out[:, int(has_cls) :].reshape(B * N, D)  # [B N, D]: the patch rows
    if mask is not None:
        w = mask.reshape(B * N, 1).to(dy.dtype)  # 0 or 1
        dmt = (dy * w).sum(0, dtype=torch.float32)
        dy = dy * (1 - w)  # exact: the weight is 0 or 1
    else:
        dmt = dy.new_zeros(D, dtype=torch.float32)
    db = dy.sum(0, dtype=torch.float32)
    dw = add_t_matmul_fp32(dy.new_zeros(D, 3 * p * p, dtype=torch.float32), dy, patches)
    return dw.view(D, 3, p, p), db, dmt


patch_embed_bwd = torch.library.custom_op("beit_kernels::patch_embed_bwd", _patch_embed_bwd, mutates_args=())


@patch_embed_bwd.register_fake
def _(grad_out, images, weight, mask, scale, shift, has_cls, weight_grad="triton"):
    B, T, D = grad_out.shape
    f32 = dict(dtype=torch.float32)
    return (
        grad_out.new_empty(weight.shape, **f32),
        grad_out.new_empty(D, **f32),
        grad_out.new_empty(D, **f32),
        grad_out.new_empty(D, **f32),
        grad_out.new_empty(T, D, **f32),
    )


def _channel_values(v, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        if v.numel() != 3:
            raise ValueError(
                f"{name} must hold 3 per-channel numbers, got a {v.dtype} tensor of shape {tuple(v.shape)}"
            )
        if v.device != device:
            raise ValueError(f"{name} is on {v.device} but the images are on {device}")
        return v.reshape(3).to(torch.float64)
    try:  # a list, a tuple, a numpy array: any iterable of three numbers
        vals = [float(x) for x in v]
    except (TypeError, ValueError):
        vals = None
    if vals is None or len(vals) != 3:
        raise ValueError(f"{name} must be 3 per-channel numbers, got {v!r}")
    if name == "std" and any(x == 0 or not math.isfinite(x) for x in vals):
        raise ValueError(f"std must be finite and non-zero, got {vals}")
    return torch.tensor(vals, dtype=torch.float64, device=device)


def _param(t, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the images are on {device}")
    if tuple(t.shape) != shape and not (name == "mask_token" and tuple(t.shape) == shape[-1:]):
        raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")
    return t


def _validate(images, weight, bias, mask, mask_token, cls_token, pos_embed, mean, std):
    """Clear errors for bad input, before any launch; returns the normalised inputs."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D ([B, H, W, 3] uint8 or [B, 3, H, W] float), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        if images.shape[3] != 3:
            raise ValueError(f"uint8 images must be channels-last [B, H, W, 3], got shape {tuple(images.shape)}")
    elif images.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        if images.shape[1] != 3:
            raise ValueError(f"float images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    else:
        raise TypeError(f"images must be uint8 or float (fp32, fp16, bf16), got {images.dtype}")
    if images.requires_grad and torch.is_grad_enabled():  # the backward gives none: refuse rather than drop it
        raise ValueError("images must not require grad: patch_embed computes no image gradient (detach them)")
    device = images.device
    check_kernel_device("patch_embed", images)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError("weight must be a float tensor [D, 3, p, p]")
    if weight.dim() != 4 or weight.shape[1] != 3 or weight.shape[2] != weight.shape[3] or weight.shape[2] < 1:
        raise ValueError(f"weight must be [D, 3, p, p] (the Conv2d layout), got shape {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but the images are on {device}")
    D, p = weight.shape[0], weight.shape[2]
    H, W = _image_hw(images)
    if H % p or W % p or H == 0 or W == 0:
        raise ValueError(f"image size {H}x{W} is not a positive multiple of the patch size {p}")
    B, N = images.shape[0], (H // p) * (W // p)
    bias = _param(bias, "bias", (D,), device)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a torch.bool tensor [B, N]")
        if mask.dim() == 3 and tuple(mask.shape) == (B, H // p, W // p):
            mask = mask.flatten(1)  # [B, Hp, Wp] -> [B, N]
        if tuple(mask.shape) != (B, N):
            raise ValueError(
                f"mask must be [B, N] = [{B}, {N}] for {H}x{W} images and patch {p} (or [{B}, {H // p}, {W // p}]), "
                f"got shape {tuple(mask.shape)}"
            )
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but the images are on {device}")
        if mask_token is None:
            raise ValueError("mask needs mask_token [1, 1, D]")
    mask_token = _param(mask_token, "mask_token", (1, 1, D), device)
    cls_token = _param(cls_token, "cls_token", (1, 1, D), device)
    T = N + int(cls_token is not None)
    pos_embed = _param(pos_embed, "pos_embed", (1, T, D), device)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    scale = shift = None
    if mean is not None:
        mean = _channel_values(mean, "mean", device)
        std = _channel_values(std, "std", device)
        scale = (1.0 / std).to(torch.float32)
        shift = (-mean / std).to(torch.float32)
    if images.dtype == torch.float64:
        raise TypeError("float64 images are not supported by the Triton kernel; use fp32, fp16, bf16 or uint8")
    if weight.dtype == torch.float64:
        raise TypeError("float64 weights are not supported by the Triton kernel; use fp32, fp16 or bf16")
    compute = _out_dtype(images.device, weight.dtype)
    check_interpreter_dtype("patch_embed", images.device, images.dtype, weight.dtype, compute)
    return images, weight, bias, mask, mask_token, cls_token, pos_embed, scale, shift


def _out_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight_dtype


# ----------------------------------------------------------------------------------------------------------------
# Autograd


class PatchEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, weight, bias, mask, mask_token, cls_token, pos_embed, scale, shift, out_dtype):
        out = call_op(patch_embed_fwd, _patch_embed_fwd, images, weight, bias, mask, mask_token, cls_token, pos_embed,
                      scale, shift, out_dtype)  # fmt: skip
        ctx.save_for_backward(images, weight, mask, scale, shift)
        ctx.has = (bias is not None, mask is not None, cls_token is not None, pos_embed is not None)
        # Chosen when the forward runs, so a graph captured around it keeps its choice.
        ctx.weight_grad = tuning.get("patch_embed.bwd")["weight_grad"]
        ctx.meta = tuple(
            (t.dtype, t.shape) if t is not None else None for t in (bias, mask_token, cls_token, pos_embed)
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        images, weight, mask, scale, shift = ctx.saved_tensors
        has_bias, has_mask, has_cls, has_pos = ctx.has
        dw, db, dmt, dcls, dpos = call_op(patch_embed_bwd, _patch_embed_bwd, grad_out, images, weight, mask, scale,
                                          shift, has_cls, ctx.weight_grad)  # fmt: skip
        need = ctx.needs_input_grad

        def cast(g, meta):
            return g.reshape(meta[1]).to(meta[0])

        b_meta, mt_meta, cls_meta, pos_meta = ctx.meta
        return (
            None,
            dw.to(weight.dtype) if need[1] else None,
            cast(db, b_meta) if has_bias and need[2] else None,
            None,
            cast(dmt, mt_meta) if has_mask and need[4] else None,
            cast(dcls, cls_meta) if has_cls and need[5] else None,
            cast(dpos, pos_meta) if has_pos and need[6] else None,
            None,
            None,
            None,
        )


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    mean=None,
    std=None,
) -> torch.Tensor:
    """Patch embedding with the BEiT mask blend, cls token and position embedding fused: [B, T, D].

    See the module docstring for the math, shapes and dtypes. ``mask_token``, ``cls_token`` and ``pos_embed`` may
    be [1, 1, D] / [1, T, D] (the model's parameter shapes); mask_token may also be [D].
    """
    images, weight, bias, mask, mask_token, cls_token, pos_embed, scale, shift = _validate(
        images, weight, bias, mask, mask_token, cls_token, pos_embed, mean, std
    )
    out_dtype = _out_dtype(images.device, weight.dtype)
    if mask_token is not None and mask is None:
        mask_token = None  # no mask: nothing is blended
    if mask_token is not None:
        mask_token = mask_token.reshape(-1)  # [1, 1, D] -> [D]
    return PatchEmbedFunction.apply(
        images, weight, bias, mask, mask_token, cls_token, pos_embed, scale, shift, out_dtype
    )
