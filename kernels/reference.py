"""Plain-PyTorch references of every public op of ``beit_kernels``, with the same signatures.

Tests compare the Triton kernels against these (usually in float64), benchmarks time them as the baseline, and
the CPU path of the model runs them. They favour clarity and exactness over speed; each says where it upcasts.
"""

from __future__ import annotations

import torch

# ----------------------------------------------------------------------------------------------------------------
# attention (kernels/attention.py)


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


# ----------------------------------------------------------------------------------------------------------------
# patch_embed, masked_gather, linear_cross_entropy (kernels/patch_embed.py, kernels/masked_gather.py,
# kernels/linear_cross_entropy.py)
