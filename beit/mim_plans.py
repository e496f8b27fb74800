"""Execution plans of the MIM loss with static shapes: how ``forward_mim_loss`` runs under impl "sdpa" and
"triton", apart from the model, which keeps the official computation (impl "ref").

Both plans compute what the official one does, without a host synchronisation and with static shapes:

    labels = tokens.gather(1, mask_index)            [B, K], -100 where mask_index pads (-1)
    x      = blocks(embed(images, bool_masked_pos))  [B, N+1, D]
    feats  = norm(x[b, mask_index[b] + 1])           [B K, D], the masked rows only (cls skipped)
    loss   = cross_entropy(lm_head(feats), labels, ignore_index=-100), with the counts of correct and valid rows

"sdpa" runs it in PyTorch (the blocks with ``F.scaled_dot_product_attention``, the gather and head from
``beit_kernels.reference``); "triton" in our kernels: patch embedding fused with the mask blend and the cls token,
the blocks' glue fused (``fused_blocks``, unless ``BeitConfig.fused_glue`` is off), the gather fused with the
final LayerNorm, and the chunked linear cross-entropy. Kernel work changes this module, not the model.
"""

from __future__ import annotations

import torch

import beit_kernels
from beit_kernels import reference as kernel_reference

IGNORE_INDEX = -100


def static_mim_loss(model, images, bool_masked_pos, mask_index, tokens, impl: str):
    """(loss, num_correct, num_valid) of ``model`` (a ``VisionTransformerForMaskedImageModeling``) under ``impl``
    "sdpa" or "triton"; the inputs are already checked by ``forward_mim_loss``."""
    valid = mask_index >= 0
    labels = tokens.gather(1, mask_index.clamp(min=0).long())  # [B, K]
    labels = torch.where(valid, labels.long(), IGNORE_INDEX).reshape(-1)  # [B K], -100 on padding
    rows = torch.where(valid, mask_index + 1, -1)  # token positions: skip the cls row
    norm = dict(ln_weight=model.norm.weight, ln_bias=model.norm.bias, eps=model.norm.eps)
    if impl == "triton":
        proj = model.patch_embed.proj
        x = beit_kernels.patch_embed(
            images,
            proj.weight,
            proj.bias,
            mask=bool_masked_pos,
            mask_token=model.mask_token,
            cls_token=model.cls_token,
            pos_embed=model.pos_embed,
        )  # [B, N+1, D]
        x = model.pos_drop(x)
        x = fused_blocks(model, x) if model.config.fused_glue else model._run_blocks(x)
        feats = beit_kernels.masked_gather(x, rows, **norm)  # [B K, D]
        ops = beit_kernels
    else:
        x = model._run_blocks(model._embed(images, bool_masked_pos))
        feats = kernel_reference.masked_gather(x, rows, **norm)
        ops = kernel_reference
    return ops.linear_cross_entropy(
        feats, model.lm_head.weight, model.lm_head.bias, labels, ignore_index=IGNORE_INDEX, return_counts=True
    )


def fused_blocks(model, x: torch.Tensor) -> torch.Tensor:
    """The model's blocks without the final norm, with the glue in fused kernels: each residual add (layer scale,
    drop path) is fused with the LayerNorm that follows it, and fc1's bias with the GELU. The same math and the same
    random draws (drop path: one uniform per sample and branch, in the official order) as ``Block.forward``."""
    rel_pos_bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    act = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    # The official residual stream is fp32 under autocast (the fp32 gamma promotes the first add); keep it so.
    x = x.float() if act is not None else x
    blocks = model.blocks
    n1 = blocks[0].norm1
    _, y = beit_kernels.add_layer_norm(x, None, None, n1.weight, n1.bias, eps=n1.eps, y_dtype=act)
    h = x
    for i, blk in enumerate(blocks):
        a = blk.attn(y, rel_pos_bias=rel_pos_bias)
        n2 = blk.norm2
        scale = drop_scale(blk, a, blk.gamma_1)
        h, y = beit_kernels.add_layer_norm(
            h, a, blk.gamma_1, n2.weight, n2.bias, eps=n2.eps, sample_scale=scale, y_dtype=act
        )
        fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
        m = blk.mlp.drop(fc2(beit_kernels.bias_gelu(torch.nn.functional.linear(y, fc1.weight), fc1.bias)))
        scale = drop_scale(blk, m, blk.gamma_2)
        if i + 1 < len(blocks):
            n1 = blocks[i + 1].norm1
            h, y = beit_kernels.add_layer_norm(
                h, m, blk.gamma_2, n1.weight, n1.bias, eps=n1.eps, sample_scale=scale, y_dtype=act
            )
        else:
            # The final norm is applied to the masked rows only, by masked_gather: only h is wanted here. The
            # fused add still beats three elementwise passes (and their backwards) with its unused
            # normalisation; y gets no gradient, so the backward skips the LayerNorm part.
            h, _ = beit_kernels.add_layer_norm(h, m, blk.gamma_2, None, None, sample_scale=scale, y_dtype=act)
    return h


def drop_scale(blk, branch: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor | None:
    """The block's drop path as a per-sample scale [B] for a branch, in the dtype of ``gamma * branch``."""
    sample_scale = getattr(blk.drop_path, "sample_scale", None)  # nn.Identity when the block drops nothing
    if sample_scale is None:
        return None
    dtype = branch.dtype if gamma is None else torch.promote_types(branch.dtype, gamma.dtype)
    return sample_scale(branch.shape[0], dtype, branch.device)
