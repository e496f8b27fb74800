"""Plain-PyTorch references of every public op of ``beit_kernels``, with the same signatures.

Tests compare the Triton kernels against these (usually in float64), benchmarks time them as the baseline, and
the CPU path of the model runs them. They favour clarity and exactness over speed; each says where it upcasts.
"""

from __future__ import annotations

import torch

# ----------------------------------------------------------------------------------------------------------------
# attention (beit_kernels/attention.py)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, *, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale * q @ k^T + bias) @ v with an explicit [B, H, N, N] softmax; math in fp32 (fp64 stays fp64),
    result in q's dtype. q, k, v [B, H, N, D]; bias broadcastable to [B, H, N, N]."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (q.to(compute) * scale) @ k.to(compute).transpose(-2, -1)  # [B, H, N, N]
    if bias is not None:
        s = s + bias.to(compute)
    return (s.softmax(dim=-1) @ v.to(compute)).to(q.dtype)


def attention_qkvpacked(
    qkv: torch.Tensor, bias: torch.Tensor | None = None, *, scale: float | None = None
) -> torch.Tensor:
    """``attention`` on qkv [B, N, 3, H, D] split into q, k, v; returns [B, N, H, D]."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, N, D] each
    return attention(q, k, v, bias, scale=scale).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# patch_embed, masked_gather, linear_cross_entropy (beit_kernels/patch_embed.py, beit_kernels/masked_gather.py,
# beit_kernels/linear_cross_entropy.py)


def _ref_channel(v, device: torch.device) -> torch.Tensor:
    t = v if isinstance(v, torch.Tensor) else torch.tensor([float(x) for x in v])
    return t.to(device=device, dtype=torch.float64).view(1, 3, 1, 1)


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
    """Normalise, Conv2d (kernel = stride = p), the official mask blend, cls concat, + pos_embed: [B, T, D].

    Normalisation runs in float64 and the result is cast to the weight's dtype (the Conv2d then runs in it, or in
    the autocast dtype); the output is in the autocast dtype when autocast is on, else the weight's dtype.
    """
    x = images.permute(0, 3, 1, 2) if images.dtype == torch.uint8 else images  # [B, H, W, 3] -> [B, 3, H, W]
    if mean is not None:
        x = (x.to(torch.float64) - _ref_channel(mean, x.device)) / _ref_channel(std, x.device)
    x = x.to(weight.dtype)
    p = weight.shape[-1]
    x = torch.nn.functional.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)  # [B, D, Hp, Wp] -> [B, N, D]
    B, N, D = x.shape
    if mask is not None:
        mask = mask.reshape(B, N)
        w = mask.unsqueeze(-1).type_as(mask_token)  # [B, N, 1]
        x = x * (1 - w) + mask_token.reshape(1, 1, D).expand(B, N, -1) * w
    if cls_token is not None:
        x = torch.cat((cls_token.reshape(1, 1, D).expand(B, -1, -1).to(x.dtype), x), dim=1)  # [B, N+1, D]
    if pos_embed is not None:
        x = x + pos_embed
    out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else weight.dtype
    return x.to(out_dtype)


def masked_gather(
    x: torch.Tensor,
    index: torch.Tensor,
    *,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``x[b, index[b, k]]`` as [B K, D], zero rows where index is -1, LayerNorm (in fp32, or float64 for float64
    input) when ``ln_weight`` or ``ln_bias`` is given; output in x's dtype. Sync-free: torch.gather on a clamped
    index, with the range checked on the device."""
    B, T, D = x.shape
    K = index.shape[1]
    torch._assert_async(((index >= -1) & (index < T)).all(), f"index values must lie in [-1, {T})")
    valid = (index >= 0).unsqueeze(-1)  # [B, K, 1]
    rows = x.gather(1, index.clamp(min=0).long().unsqueeze(-1).expand(B, K, D))  # [B, K, D]
    if ln_weight is not None or ln_bias is not None:
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = ln_weight.to(compute) if ln_weight is not None else None
        b = ln_bias.to(compute) if ln_bias is not None else None
        rows = torch.nn.functional.layer_norm(rows.to(compute), (D,), w, b, eps).to(x.dtype)
    rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    return rows.reshape(B * K, D)  # [B, K, D] -> [B K, D]


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
    """``F.linear`` then cross-entropy on the full [M, V] logits (upcast to fp32, or kept in float64), summed and
    divided by max(n_valid, 1) for "mean" (0, not NaN, when no row is valid); ``chunk_size`` is accepted for the
    signature and ignored. Returns the loss, or (loss, num_correct, num_valid) with ``return_counts=True``."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    logits = torch.nn.functional.linear(x, weight, bias)  # [M, V]
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid = target != ignore_index
    loss = torch.nn.functional.cross_entropy(
        logits.to(compute), target.long(), ignore_index=ignore_index, reduction="sum"
    )
    num_valid = valid.sum()
    if reduction == "mean":
        loss = loss / num_valid.clamp(min=1).to(compute)
    if not return_counts:
        return loss
    num_correct = ((logits.argmax(dim=-1) == target) & valid).sum()
    return loss, num_correct, num_valid


# ----------------------------------------------------------------------------------------------------------------
# add_layer_norm, bias_gelu (beit_kernels/layer_norm.py, beit_kernels/bias_gelu.py)


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
    """``h = x + sample_scale[b] * gamma * branch`` in PyTorch's promoted dtype, cast to x's dtype; then
    ``y = F.layer_norm(h)`` in fp32 (float64 stays float64), cast to ``y_dtype`` (default x's dtype). Returns
    (h, y), h being x itself when branch is None."""
    h = x
    if branch is not None:
        r = branch if gamma is None else gamma * branch
        if sample_scale is not None:
            r = r * sample_scale.view(-1, *([1] * (r.dim() - 1)))  # [B, 1, 1]: one scale per sample
        h = (x + r).to(x.dtype)
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    w = weight.to(compute) if weight is not None else None
    b = bias.to(compute) if bias is not None else None
    y = torch.nn.functional.layer_norm(h.to(compute), (h.shape[-1],), w, b, eps)
    return h, y.to(y_dtype if y_dtype is not None else x.dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Exact (erf) GELU of ``x + bias`` with PyTorch's type promotion, in x's dtype."""
    z = x + bias if bias is not None else x
    return torch.nn.functional.gelu(z).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# conv_epilogue (beit_kernels/conv_epilogue.py)


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
    """The unfused chain: bias add (bias cast to x's dtype), ``torch.add(residual + residual_bias, t, alpha=gain)``,
    ``max_pool2d(., 2)``, ``relu``, each op rounding to x's dtype (float64 stays float64). Returns (out or None,
    relu in ``relu_dtype``), channels_last; ``inplace`` copies the first of them into x and returns x there."""

    def channel(v: torch.Tensor) -> torch.Tensor:
        return v.to(x.dtype).view(1, -1, 1, 1)  # [1, C, 1, 1]

    t = x + channel(bias) if bias is not None else x
    if residual is not None:
        r = residual + channel(residual_bias) if residual_bias is not None else residual
        t = torch.add(r, t, alpha=gain)
    if pool:
        t = torch.nn.functional.max_pool2d(t, 2)
    relu = torch.relu(t).to(relu_dtype if relu_dtype is not None else x.dtype)
    out = t.contiguous(memory_format=torch.channels_last) if return_out else None
    relu = relu.contiguous(memory_format=torch.channels_last)
    if inplace:
        if return_out:
            out = x.copy_(out)
        else:
            relu = x.copy_(relu)
    return out, relu
