"""The reference BEiT for masked image modeling, faithful to the official implementation.

This is ``VisionTransformerForMaskedImageModeling`` of microsoft/unilm ``beit/modeling_pretrain.py`` with the
building blocks of ``beit/modeling_finetune.py``, configured as ``run_beit_pretraining.py`` builds it by default:
one relative position bias shared by all blocks, no absolute position embedding, layer scale 0.1.

    images [B, 3, H, W] --Conv2d(p, stride p)--> [B, N, D]          N = (H/p)(W/p), 196 at 224 px
    x = x * (1 - w) + mask_token * w                                 w = bool_masked_pos[..., None]
    x = cat(cls_token, x) (+ pos_embed)                              [B, N+1, D]
    x = blocks(x, rel_pos_bias)                                      pre-norm, layer scale, drop path
    x = norm(x)[:, 1:]                                               LayerNorm eps 1e-6
    logits = lm_head(x[bool_masked_pos])                             [num_masked, vocab], (image, patch) order

Parameter names are those of the official checkpoints (``patch_embed.proj``, ``attn.qkv``, ``q_bias``, ``v_bias``,
``gamma_1``, ``rel_pos_bias.relative_position_bias_table``, ``lm_head``), so they load without renaming.

The implementation is one switch per model, ``impl``:
    "ref"    the official code path: explicit softmax attention, Conv2d patch embedding, boolean gather, Linear head.
    "sdpa"   ``F.scaled_dot_product_attention`` with the relative position bias as ``attn_mask``.
    "triton" our Triton kernels (``beit_kernels``); available once the kernels are installed. In
             ``forward_mim_loss`` the blocks' glue is fused too (``BeitConfig.fused_glue``, on by default).
    "auto"   the fastest one available for the input's device.
``create_model(impl=None)`` reads the default from the environment variable ``BEIT_IMPL`` (else "auto"); an
explicit keyword wins over the environment.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from beit.mim_plans import static_mim_loss
from beit_kernels.backend import IMPLS, resolve_impl
from beit_kernels.nn import (  # noqa: F401  (re-exported: the model's building blocks live with the kernels)
    Attention,
    RelativePositionBias,
    gen_relative_position_index,
    num_relative_distance,
)

# ----------------------------------------------------------------------------------------------------------------
# Implementation switch (the rules live in beit_kernels.backend, so the drop-in modules follow them too)


def _default_impl() -> str:
    impl = os.environ.get("BEIT_IMPL", "auto").strip().lower() or "auto"
    if impl not in IMPLS:
        raise ValueError(f"environment variable BEIT_IMPL={impl!r} is not one of {', '.join(IMPLS)}")
    return impl


# ----------------------------------------------------------------------------------------------------------------
# Initialisation and small layers


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Normal(0, std) truncated to [-std, std], in place.

    The official wrapper cuts at plus or minus one std (a=-std, b=std), not timm's default of plus or minus 2.
    Sampled by the inverse CDF, as timm 0.3.2 (the official dependency) did: torch 2.13's ``nn.init.trunc_normal_``
    rejection-samples: create_model("beit_base_patch16_224") took 8.0 s with it on 2 CPU cores, 0.8 s with this.
    """
    if tensor.is_meta:
        return tensor
    lo, hi = (1.0 + math.erf(-1.0 / math.sqrt(2.0))) / 2.0, (1.0 + math.erf(1.0 / math.sqrt(2.0))) / 2.0
    tensor.uniform_(2 * lo - 1, 2 * hi - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0))
    return tensor.clamp_(min=-std, max=std)


def keep_draw(batch: int, keep_prob: float, dtype: torch.dtype, device) -> torch.Tensor:
    """The official drop-path draw: one uniform per sample, floored to 1 (keep, probability ``keep_prob``) or 0.
    Shared by ``drop_path`` and the fused path, so both consume the generator alike."""
    return (keep_prob + torch.rand(batch, dtype=dtype, device=device)).floor_()


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample: zero the residual branch of a whole sample with probability ``drop_prob``."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # [B, 1, 1]: one draw per sample
    random_tensor = keep_draw(x.shape[0], keep_prob, x.dtype, x.device).view(shape)
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def sample_scale(self, batch: int, dtype: torch.dtype, device) -> torch.Tensor | None:
        """What ``forward`` multiplies a batch's branch by, as a per-sample scale [B] (0 or 1/keep_prob) drawn as
        ``forward`` draws it; None when every sample is kept (p = 0, or eval mode). For fused kernels that take
        the scale instead of the module."""
        if self.drop_prob == 0.0 or not self.training:
            return None
        keep = 1 - self.drop_prob
        return keep_draw(batch, keep, dtype, device).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The official Mlp applies dropout only after fc2.
        return self.drop(self.fc2(self.act(self.fc1(x))))


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


class PatchEmbed(nn.Module):
    """Image to patch embedding: Conv2d with kernel = stride = patch size, flattened to [B, N, D]."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        img_size, patch_size = _pair(img_size), _pair(patch_size)
        for s, p in zip(img_size, patch_size):
            if s % p != 0 or s <= 0:
                raise ValueError(f"image size {img_size} is not a positive multiple of the patch size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.patch_shape = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.patch_shape[0] * self.patch_shape[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, Hp, Wp] -> [B, Hp*Wp, D]


def check_images(x, patch_embed: PatchEmbed, factory: str) -> None:
    """A clear error for images the model cannot take: not a float [B, C, H, W] tensor of the model's size.
    ``factory`` names the function that builds the model at another size."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != patch_embed.in_chans:
        raise ValueError(f"images must be [B, {patch_embed.in_chans}, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"images must be a float tensor (normalised), got {x.dtype}")
    if tuple(x.shape[2:]) != patch_embed.img_size:
        h, w = patch_embed.img_size
        raise ValueError(
            f"image size {x.shape[2]}x{x.shape[3]} does not match the model's {h}x{w}; "
            f"build the model with {factory}(..., img_size=({x.shape[2]}, {x.shape[3]}))"
        )


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (``gamma_1``, ``gamma_2``) and drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        window_size: tuple[int, int] | None = None,
        attn_head_dim: int | None = None,
        eps: float = 1e-6,
        impl: str = "auto",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
            window_size=window_size,
            attn_head_dim=attn_head_dim,
            impl=impl,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        if init_values is not None and init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1, self.gamma_2 = None, None

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
            x = x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        return x


def build_blocks(config, window_size: tuple[int, int]) -> nn.ModuleList:
    """The official stack of ``config.depth`` blocks (``BeitConfig`` or ``ClassifierConfig``): drop path rising
    linearly to ``drop_path_rate``, and a relative position table of each block's own when ``use_rel_pos_bias``."""
    dpr = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()  # official rule
    return nn.ModuleList(
        [
            Block(
                dim=config.embed_dim,
                num_heads=config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                qk_scale=config.qk_scale,
                drop=config.drop_rate,
                attn_drop=config.attn_drop_rate,
                drop_path=dpr[i],
                init_values=config.init_values,
                window_size=window_size if config.use_rel_pos_bias else None,
                attn_head_dim=config.attn_head_dim,
                eps=config.layer_norm_eps,
                impl=config.impl,
            )
            for i in range(config.depth)
        ]
    )


def init_module(m: nn.Module, std: float) -> None:
    """The official ``_init_weights``: truncated normal Linear and Conv2d weights, zero biases, unit LayerNorms."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        trunc_normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@torch.no_grad()
def fix_init_weight(blocks) -> None:
    """The official rescaling of each block's output projections by 1 / sqrt(2 * layer id)."""
    for layer_id, block in enumerate(blocks, start=1):
        block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


# ----------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class BeitConfig:
    """Hyper-parameters of ``VisionTransformerForMaskedImageModeling``; defaults are BEiT-B/16 as pretrained."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 8192
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
    use_rel_pos_bias: bool = False
    use_shared_rel_pos_bias: bool = True
    layer_norm_eps: float = 1e-6
    init_std: float = 0.02
    impl: str = "auto"
    # With impl "triton": the blocks' glue (residual add, layer scale, drop path and the next LayerNorm; fc1's bias
    # and GELU) in our fused kernels; False leaves it to PyTorch (or to torch.compile around our ops).
    fused_glue: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def checked_config(config_cls, config, kwargs: dict):
    """A model's configuration: ``config``, or a ``config_cls`` built from the constructor's keyword arguments (not
    both), its ``impl`` and its width's split into heads checked."""
    if config is None:
        config = config_cls(**kwargs)
    elif kwargs:
        raise TypeError(f"pass either a {config_cls.__name__} or keyword arguments, not both")
    if config.impl not in IMPLS:
        raise ValueError(f"unknown impl {config.impl!r}: expected one of {', '.join(IMPLS)}")
    if config.embed_dim % config.num_heads != 0 and config.attn_head_dim is None:
        raise ValueError(f"embed_dim {config.embed_dim} is not divisible by num_heads {config.num_heads}")
    return config


class EncoderApi:
    """What both BEiT models answer alike (they hold ``config``, ``blocks`` and ``patch_embed``): the
    implementation switch, the layer count for layer-wise lr decay, the official weight-decay exclusions."""

    @property
    def impl(self) -> str:
        return self.config.impl

    def set_impl(self, impl: str) -> None:
        """Switch every attention of the model to ``impl`` (one of ``IMPLS``)."""
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}: expected one of {', '.join(IMPLS)}")
        if impl == "triton":
            resolve_impl(impl)  # raises a clear error when the kernels are absent
        self.config.impl = impl
        for block in self.blocks:
            block.attn.impl = impl

    def get_num_layers(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        # As the official model: mask_token and the relative position table do get weight decay.
        return {"pos_embed", "cls_token"}

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches


class VisionTransformerForMaskedImageModeling(EncoderApi, nn.Module):
    """BEiT for masked image modeling (the official class, same name and parameters)."""

    def __init__(self, config: BeitConfig | None = None, **kwargs):
        super().__init__()
        config = checked_config(BeitConfig, config, kwargs)
        self.config = config
        self.num_features = self.embed_dim = config.embed_dim
        dim = config.embed_dim

        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, dim)
        num_patches = self.patch_embed.num_patches
        window_size = self.patch_embed.patch_shape

        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim)) if config.use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(p=config.drop_rate)

        self.rel_pos_bias = (
            RelativePositionBias(window_size, config.num_heads) if config.use_shared_rel_pos_bias else None
        )
        self.blocks = build_blocks(config, window_size)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(dim, config.vocab_size)
        self.init_weights()

    # -- initialisation, as the official constructor does it, in the same order --------------------------------
    def init_weights(self) -> None:
        std = self.config.init_std
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=std)
        trunc_normal_(self.cls_token, std=std)
        trunc_normal_(self.mask_token, std=std)
        trunc_normal_(self.lm_head.weight, std=std)
        self.apply(lambda m: init_module(m, std))
        fix_init_weight(self.blocks)

    # -- API --------------------------------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> torch.Tensor | None:
        check_images(x, self.patch_embed, "create_model")
        if bool_masked_pos is None:
            return None
        if not isinstance(bool_masked_pos, torch.Tensor):
            raise TypeError(f"bool_masked_pos must be a torch.Tensor, got {type(bool_masked_pos).__name__}")
        if bool_masked_pos.dtype != torch.bool:
            raise TypeError(f"bool_masked_pos must have dtype torch.bool, got {bool_masked_pos.dtype}")
        B = x.shape[0]
        hp, wp = self.patch_embed.patch_shape
        if bool_masked_pos.dim() == 3 and tuple(bool_masked_pos.shape) == (B, hp, wp):
            bool_masked_pos = bool_masked_pos.flatten(1)  # [B, Hp, Wp] -> [B, N]
        if tuple(bool_masked_pos.shape) != (B, self.num_patches):
            raise ValueError(
                f"bool_masked_pos must be [B, {self.num_patches}] (or [B, {hp}, {wp}]) with B={B}, "
                f"got shape {tuple(bool_masked_pos.shape)}"
            )
        if bool_masked_pos.device != x.device:
            raise ValueError(f"bool_masked_pos is on {bool_masked_pos.device} but the images are on {x.device}")
        return bool_masked_pos

    def _embed(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, N, D]
        batch_size, seq_len, _ = x.shape
        if bool_masked_pos is not None:
            mask_token = self.mask_token.expand(batch_size, seq_len, -1)
            w = bool_masked_pos.unsqueeze(-1).type_as(mask_token)  # [B, N, 1]
            x = x * (1 - w) + mask_token * w
        cls_tokens = self.cls_token.expand(batch_size, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)  # [B, N+1, D]
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self._run_blocks(x))

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """The normalised tokens [B, N+1, D], cls first; masked patches are replaced by the mask token."""
        bool_masked_pos = self._check_inputs(x, bool_masked_pos)
        return self._encode(self._embed(x, bool_masked_pos))

    def forward(
        self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None, return_all_tokens: bool = False
    ) -> torch.Tensor:
        """Logits of the masked positions [num_masked, vocab] in row-major (image, patch) order, or of every patch
        [B, N, vocab] with ``return_all_tokens=True``."""
        if bool_masked_pos is None and not return_all_tokens:
            raise ValueError("forward needs bool_masked_pos (or return_all_tokens=True)")
        bool_masked_pos = self._check_inputs(x, bool_masked_pos)
        x = self._encode(self._embed(x, bool_masked_pos))[:, 1:]  # drop cls: [B, N, D]
        if return_all_tokens:
            return self.lm_head(x)
        # Boolean gather: the official path (a device-to-host sync and a data-dependent shape).
        return self.lm_head(x[bool_masked_pos])

    # -- the pretraining loss ----------------------------------------------------------------------------------
    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks without the final norm (which the MIM loss applies to the masked rows only)."""
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, rel_pos_bias=rel_pos_bias)
        return x

    def _check_mim_inputs(self, images, bool_masked_pos, mask_index, tokens):
        if bool_masked_pos is None:
            raise ValueError("forward_mim_loss needs bool_masked_pos")
        bool_masked_pos = self._check_inputs(images, bool_masked_pos)
        B, N = bool_masked_pos.shape
        for name, t, shape in (("mask_index", mask_index, None), ("tokens", tokens, (B, N))):
            if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name} must be an int32 or int64 tensor")
            if t.dim() != 2 or t.shape[0] != B or (shape is not None and tuple(t.shape) != shape):
                want = f"[{B}, {N}]" if shape is not None else f"[{B}, K]"
                raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
            if t.device != images.device:
                raise ValueError(f"{name} is on {t.device} but the images are on {images.device}")
        # The blend follows bool_masked_pos and the gather follows mask_index: they must agree. Checked on the
        # device, so no step waits for the host (a mismatch fails the step at the next synchronisation).
        picked = bool_masked_pos.gather(1, mask_index.clamp(0, N - 1).long())  # [B, K]
        agree = ((mask_index < 0) | picked).all() & ((mask_index >= 0).sum(1) == bool_masked_pos.sum(1)).all()
        torch._assert_async(agree, "mask_index must list exactly the positions of bool_masked_pos (-1 padding)")
        return bool_masked_pos

    def forward_mim_loss(
        self, images: torch.Tensor, bool_masked_pos: torch.Tensor, mask_index: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The BEiT pretraining loss: (loss, num_correct, num_valid), 0-d tensors (fp32 loss, int64 counts).

        ``images`` [B, 3, H, W] float; ``bool_masked_pos`` [B, N] bool; ``mask_index`` [B, K] its padded index
        (``beit.masking.mask_to_index``: ascending, -1 padding); ``tokens`` [B, N] the tokenizer's visual tokens.
        loss = mean cross-entropy of lm_head(norm(x)) on the masked patches against their tokens; num_correct
        counts the masked patches whose argmax is their token (the MIM accuracy), num_valid the masked patches.

        impl "ref": the official computation (boolean gather, Linear, CrossEntropy; syncs with the host, and a
        batch with no masked patch gives NaN, as the official code). "sdpa": the same in PyTorch with static shapes
        and no sync (padded gather, norm on the masked rows, cross-entropy with ignore_index on the padding).
        "triton": fused kernels (patch embedding with the blend and cls, gather with the final LayerNorm, chunked
        linear cross-entropy); no sync. Without a masked patch the last two give a zero loss and zero gradients.
        The model holds the official computation; the execution plans of "sdpa" and "triton" live in
        ``beit.mim_plans``.
        """
        bool_masked_pos = self._check_mim_inputs(images, bool_masked_pos, mask_index, tokens)
        impl = resolve_impl(self.impl, images.device)
        if impl == "ref":
            x = self._encode(self._embed(images, bool_masked_pos))[:, 1:]  # drop cls: [B, N, D]
            logits = self.lm_head(x[bool_masked_pos])  # [num_masked, V]
            labels = tokens[bool_masked_pos].long()
            loss = torch.nn.functional.cross_entropy(logits, labels)
            num_correct = (logits.argmax(dim=-1) == labels).sum()
            return loss.float(), num_correct, bool_masked_pos.sum()
        return static_mim_loss(self, images, bool_masked_pos, mask_index, tokens, impl)


Beit = VisionTransformerForMaskedImageModeling


# ----------------------------------------------------------------------------------------------------------------
# Registry

_MODEL_ARGS: dict[str, dict] = {
    "beit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "beit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "beit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "beit_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
}
# The official registry names of unilm's modeling_pretrain.py.
_ALIASES = {
    "beit_base_patch16_224_8k_vocab": "beit_base_patch16_224",
    "beit_large_patch16_224_8k_vocab": "beit_large_patch16_224",
}


def list_models() -> list[str]:
    return sorted(_MODEL_ARGS)


def create_model(name: str, **overrides) -> VisionTransformerForMaskedImageModeling:
    """Build a registered BEiT (``list_models()``), with any ``BeitConfig`` field overridden by keyword.

    ``impl`` defaults to the environment variable ``BEIT_IMPL``, else "auto".
    """
    key = _ALIASES.get(name, name)
    if key not in _MODEL_ARGS:
        raise ValueError(f"unknown model {name!r}: available models are {', '.join(list_models())}")
    known = {f.name for f in fields(BeitConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown option(s) for {name}: {', '.join(unknown)}; BeitConfig fields are {sorted(known)}")
    args = dict(_MODEL_ARGS[key], **overrides)
    if args.get("impl") is None:
        args["impl"] = _default_impl()
    if args["impl"] == "triton":
        resolve_impl("triton")
    return VisionTransformerForMaskedImageModeling(BeitConfig(**args))
