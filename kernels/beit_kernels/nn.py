"""Drop-in PyTorch modules built on the kernels: BEiT's attention and relative position bias.

``Attention`` has the parameters and names of the official BEiT attention (``qkv``, ``q_bias``, ``v_bias``,
``proj``, optional per-layer ``relative_position_bias_table``), so other ViTs and official checkpoints can adopt
it unchanged. Its ``impl`` picks the path: "ref" (the official code, explicit softmax), "sdpa"
(``F.scaled_dot_product_attention`` with the bias as ``attn_mask``), "triton" (``beit_kernels.attention``, with
the bias gradient reduced over the batch in-kernel), or "auto" (``beit_kernels.resolve_impl``: triton on sm80+
GPUs, else sdpa).

The relative position table has (2Wh-1)(2Ww-1)+3 rows: one per relative offset inside the window plus the three
cls entries (cls->token, token->cls, cls->cls), indexed as the official code does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from beit_kernels.backend import resolve_impl


def attention_qkvpacked(qkv, bias=None, *, scale=None):
    # Imported on first use: the Triton kernel module needs triton, which only Linux has.
    from beit_kernels.attention import attention_qkvpacked as triton_attention_qkvpacked

    return triton_attention_qkvpacked(qkv, bias, scale=scale)


def gen_relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """The official [N+1, N+1] index into the (2Wh-1)(2Ww-1)+3 row table, cls rows included (N = Wh*Ww)."""
    wh, ww = window_size
    num_relative_distance = (2 * wh - 1) * (2 * ww - 1) + 3
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))  # [2, Wh, Ww]
    coords = coords.flatten(1)  # [2, N], row-major over (h, w)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()  # [N, N, 2]
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    index = torch.zeros((wh * ww + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    # The three cls entries, assigned in the official order (the corner is written last).
    index[0, 0:] = num_relative_distance - 3  # cls -> token
    index[0:, 0] = num_relative_distance - 2  # token -> cls
    index[0, 0] = num_relative_distance - 1  # cls -> cls
    return index


def num_relative_distance(window_size: tuple[int, int]) -> int:
    return (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3


def lookup_relative_position_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    n = index.shape[0]
    bias = table[index.view(-1)].view(n, n, -1)  # [N+1, N+1, H]
    return bias.permute(2, 0, 1).contiguous()  # [H, N+1, N+1]


class RelativePositionBias(nn.Module):
    """The relative position bias shared by all blocks: ``forward()`` returns [H, N+1, N+1]."""

    def __init__(self, window_size: tuple[int, int], num_heads: int):
        super().__init__()
        self.window_size = tuple(window_size)
        self.num_relative_distance = num_relative_distance(self.window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
        # Not persistent: it is derived from the window, and official checkpoints' copies are dropped on load.
        self.register_buffer("relative_position_index", gen_relative_position_index(self.window_size), persistent=False)

    def forward(self) -> torch.Tensor:
        return lookup_relative_position_bias(self.relative_position_bias_table, self.relative_position_index)


# ----------------------------------------------------------------------------------------------------------------
# Attention and blocks


class Attention(nn.Module):
    """BEiT attention: qkv without bias plus learned q and v biases (the k bias is a constant zero), and an optional
    relative position bias table of its own (``window_size`` given) besides the shared one passed to ``forward``."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window_size: tuple[int, int] | None = None,
        attn_head_dim: int | None = None,
        impl: str = "auto",
    ):
        super().__init__()
        self.num_heads = num_heads
        head_dim = attn_head_dim if attn_head_dim is not None else dim // num_heads
        all_head_dim = head_dim * num_heads
        self.head_dim = head_dim
        self.scale = qk_scale or head_dim**-0.5
        self.impl = impl

        self.qkv = nn.Linear(dim, all_head_dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = None
            self.v_bias = None

        if window_size is not None:
            self.window_size = tuple(window_size)
            self.num_relative_distance = num_relative_distance(self.window_size)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
            self.register_buffer(
                "relative_position_index", gen_relative_position_index(self.window_size), persistent=False
            )
        else:
            self.window_size = None
            self.relative_position_bias_table = None
            self.relative_position_index = None

        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(all_head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        impl = resolve_impl(self.impl, x.device)
        if impl == "ref":
            qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
            q, k, v = qkv[0], qkv[1], qkv[2]  # as the official code indexes them
        else:
            # The official indexing gives each of q, k, v a zero-filled [3, B, H, N, hd] gradient holding its slice,
            # which autograd adds up, then a copy back to [B, N, 3, H, hd]: by count, about 3 GB of memory traffic
            # a BEiT-B block at batch 256 in bf16. unbind's backward is one stack of dq, dk, dv into qkv's layout
            # (0.5 GB), and the triton path's packed attention writes them there itself.
            qkv = qkv.reshape(B, N, 3, self.num_heads, -1)  # [B, N, 3, H, hd]
            if impl == "sdpa":
                q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, N, hd] views

        table_bias = None
        if self.relative_position_bias_table is not None:
            table_bias = lookup_relative_position_bias(
                self.relative_position_bias_table, self.relative_position_index
            )  # [H, N, N]

        if impl == "ref":
            # The official code path, operation for operation (the two biases are added one after the other).
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)  # [B, H, N, N]
            if table_bias is not None:
                attn = attn + table_bias.unsqueeze(0)
            if rel_pos_bias is not None:
                attn = attn + rel_pos_bias
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        elif impl == "sdpa":
            bias = table_bias
            if rel_pos_bias is not None:
                bias = rel_pos_bias if bias is None else bias + rel_pos_bias
            if bias is not None:
                # SDPA wants a float mask in the query's dtype (bf16 or fp16 under autocast).
                bias = bias.to(q.dtype)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
            )
        elif impl == "triton":
            bias = table_bias
            if rel_pos_bias is not None:
                bias = rel_pos_bias if bias is None else bias + rel_pos_bias
            if self.training and self.attn_drop.p > 0:
                raise ValueError("impl='triton' attention has no attention dropout; set attn_drop_rate=0")
            x = attention_qkvpacked(qkv, bias, scale=self.scale)  # [B, N, H, hd], contiguous
            return self.proj_drop(self.proj(x.reshape(B, N, -1)))
        else:
            raise ValueError(f"unknown impl {impl!r}")
        x = x.transpose(1, 2).reshape(B, N, -1)  # [B, H, N, hd] -> [B, N, H*hd]
        return self.proj_drop(self.proj(x))
