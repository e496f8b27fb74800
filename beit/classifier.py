"""The BEiT image classifier, faithful to the official fine-tuning model (unilm ``beit/modeling_finetune.py``,
``VisionTransformer``), configured as ``run_class_finetuning.py`` builds it by default: a relative position bias
table in every block, no absolute position embedding, layer scale, mean pooling.

    images [B, 3, H, W] --Conv2d(p, stride p)--> [B, N, D]       N = (H/p)(W/p): 196 at 224 px, 576 at 384 px
    x = cat(cls_token, x) (+ pos_embed)                           [B, N+1, D]
    x = blocks(x)                                                 each block with its own bias table (or a shared one)
    mean pooling (default):  f = fc_norm(mean(x[:, 1:]))          LayerNorm eps 1e-6; ``norm`` is the identity
    cls pooling:             f = norm(x)[:, 0]
    logits = head(f)                                              [B, num_classes]; head initialised x ``init_scale``

Parameter names are the official ones (``blocks.N.attn.relative_position_bias_table``, ``fc_norm``, ``head``), so
official fine-tuned checkpoints load unchanged. ``impl`` is the MIM model's switch (ref / sdpa / triton / auto):
"triton" runs our attention (the per-block bias gradient reduced in-kernel), the fused patch embedding with the cls
token, and the blocks' fused glue (``beit.mim_plans.fused_blocks``, unless ``fused_glue`` is off).

``create_classifier(name, num_classes=1000, **overrides)`` builds a registered model (``list_classifiers()``);
``beit.load_pretrained(classifier, checkpoint)`` fills it from a pretraining checkpoint (ours, unilm, Hugging Face).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from beit.mim_plans import fused_blocks
from beit.model import (
    EncoderApi,
    PatchEmbed,
    RelativePositionBias,
    _default_impl,
    build_blocks,
    check_images,
    checked_config,
    fix_init_weight,
    init_module,
    trunc_normal_,
)
from beit_kernels.backend import resolve_impl


@dataclass
class ClassifierConfig:
    """Hyper-parameters of the official ``VisionTransformer``; defaults are BEiT-B/16 at 224 px as fine-tuned."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    init_values: float | None = 0.1
    attn_head_dim: int | None = None
    use_abs_pos_emb: bool = False
    use_rel_pos_bias: bool = True
    use_shared_rel_pos_bias: bool = False
    use_mean_pooling: bool = True
    init_scale: float = 0.001
    layer_norm_eps: float = 1e-6
    init_std: float = 0.02
    impl: str = "auto"
    fused_glue: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class VisionTransformer(EncoderApi, nn.Module):
    """BEiT for image classification (the official fine-tuning class, same name and parameters)."""

    def __init__(self, config: ClassifierConfig | None = None, **kwargs):
        super().__init__()
        config = checked_config(ClassifierConfig, config, kwargs)
        if config.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no head), got {config.num_classes}")
        self.config = config
        self.num_classes = config.num_classes
        self.num_features = self.embed_dim = dim = config.embed_dim

        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, dim)
        num_patches = self.patch_embed.num_patches
        window_size = self.patch_embed.patch_shape

        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim)) if config.use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(p=config.drop_rate)
        self.rel_pos_bias = (
            RelativePositionBias(window_size, config.num_heads) if config.use_shared_rel_pos_bias else None
        )
        self.blocks = build_blocks(config, window_size)
        eps = config.layer_norm_eps
        self.norm = nn.Identity() if config.use_mean_pooling else nn.LayerNorm(dim, eps=eps)
        self.fc_norm = nn.LayerNorm(dim, eps=eps) if config.use_mean_pooling else None
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- initialisation, as the official constructor does it, in the same order --------------------------------
    def init_weights(self) -> None:
        std = self.config.init_std
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=std)
        trunc_normal_(self.cls_token, std=std)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=std)
        self.apply(lambda m: init_module(m, std))
        fix_init_weight(self.blocks)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(self.config.init_scale)
                self.head.bias.mul_(self.config.init_scale)

    @torch.no_grad()
    def reset_classifier(self, num_classes: int) -> None:
        """A new head for ``num_classes`` classes (0: none), initialised as the constructor does."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        device = self.cls_token.device
        self.num_classes = self.config.num_classes = num_classes
        if num_classes == 0:
            self.head = nn.Identity()
            return
        self.head = nn.Linear(self.embed_dim, num_classes, device=device)
        trunc_normal_(self.head.weight, std=self.config.init_std)
        self.head.weight.mul_(self.config.init_scale)
        nn.init.zeros_(self.head.bias)

    # -- API --------------------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor, impl: str) -> torch.Tensor:
        if impl == "triton":
            import beit_kernels

            proj = self.patch_embed.proj
            # [B, N+1, D]: the projection, the cls token and the position embedding in one kernel
            x = beit_kernels.patch_embed(x, proj.weight, proj.bias, cls_token=self.cls_token, pos_embed=self.pos_embed)
            return self.pos_drop(x)
        x = self.patch_embed(x)  # [B, N, D]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [B, N+1, D]
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, rel_pos_bias=rel_pos_bias)
        return x

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Every token after the blocks, before any final norm: [B, N+1, D], cls first."""
        check_images(x, self.patch_embed, "create_classifier")
        impl = resolve_impl(self.impl, x.device)
        x = self._embed(x, impl)
        if impl == "triton" and self.config.fused_glue:
            return fused_blocks(self, x)
        return self._run_blocks(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The features [B, D] of the tokens [B, N+1, D]: fc_norm of the patch tokens' mean, or norm of cls."""
        if self.fc_norm is not None:
            return self.fc_norm(self.norm(x)[:, 1:].mean(1))
        return self.norm(x[:, 0])  # LayerNorm is per token: normalising the cls token alone is the same

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features [B, D] the head reads."""
        return self.pool(self.forward_tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] (features [B, D] when the model has no head)."""
        return self.head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------------------------
# Registry: the official modeling_finetune.py names.

_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5)
_CLASSIFIER_ARGS: dict[str, dict] = {
    "beit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "beit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "beit_base_patch16_224": dict(_BASE),
    "beit_base_patch16_384": dict(_BASE, img_size=384),
    "beit_large_patch16_224": dict(_LARGE),
    "beit_large_patch16_384": dict(_LARGE, img_size=384),
    "beit_large_patch16_512": dict(_LARGE, img_size=512),
}


def list_classifiers() -> list[str]:
    return sorted(_CLASSIFIER_ARGS)


def classifier_image_size(name: str) -> int:
    """The input size a registered classifier is built for by default."""
    if name not in _CLASSIFIER_ARGS:
        raise ValueError(f"unknown classifier {name!r}: available are {', '.join(list_classifiers())}")
    return int(_CLASSIFIER_ARGS[name].get("img_size", 224))


def create_classifier(name: str, num_classes: int = 1000, **overrides) -> VisionTransformer:
    """Build a registered BEiT classifier (``list_classifiers()``), with any ``ClassifierConfig`` field overridden by
    keyword (``img_size=384``, ``drop_path_rate=0.1``, ``use_mean_pooling=False``, ``impl="triton"``, ...).

    ``impl`` defaults to the environment variable ``BEIT_IMPL``, else "auto". Any image size that is a multiple of
    the patch size works; the relative position tables are sized for its grid."""
    if name not in _CLASSIFIER_ARGS:
        raise ValueError(f"unknown classifier {name!r}: available are {', '.join(list_classifiers())}")
    known = {f.name for f in fields(ClassifierConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(
            f"unknown option(s) for {name}: {', '.join(unknown)}; ClassifierConfig fields are {sorted(known)}"
        )
    args = dict(_CLASSIFIER_ARGS[name], num_classes=num_classes, **overrides)
    if args.get("impl") is None:
        args["impl"] = _default_impl()
    if args["impl"] == "triton":
        resolve_impl("triton")
    return VisionTransformer(ClassifierConfig(**args))


def classifier_from_config(config: dict, **overrides) -> VisionTransformer:
    """A classifier from a ``ClassifierConfig.to_dict()`` (as fine-tuning checkpoints record it), fields overridden
    by keyword; unknown keys are an error naming them."""
    known = {f.name for f in fields(ClassifierConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"not a classifier configuration: unknown field(s) {', '.join(unknown)}")
    args = dict(config, **overrides)
    if isinstance(args.get("img_size"), list):
        args["img_size"] = tuple(args["img_size"])
    return VisionTransformer(ClassifierConfig(**args))
