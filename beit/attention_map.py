"""``beit-attention-map CKPT IMAGE --out maps.png``: the last layer's self-attention over an image (the paper's
Figure 6), for a MIM pretraining checkpoint or a fine-tuned classifier.

The attention probabilities of the last block, with the official math (unilm ``modeling_finetune.Attention``):

    h = norm1(x)                        x [B, N+1, D]: the last block's input, cls first
    q, k = split(h W_qkv^T + (q_bias, 0, v_bias))                     [B, H, N+1, hd] each
    A = softmax(q * scale @ k^T + table_bias + shared_bias, dim=-1)    [B, H, N+1, N+1]

where table_bias is the block's own relative position table looked up by its ``relative_position_index`` (the
classifier's default) and shared_bias the model's ``rel_pos_bias()`` (the MIM model's default), each present only
when the model has it. The probabilities are computed here, in fp32, from the last block's input, whatever
``impl`` the model runs: the fused paths (sdpa, triton) never form them.

A panel of the figure shows, for one query token, its attention over the N patch keys (the cls key left out),
averaged over the heads, scaled to [0, 1] between its minimum and maximum (so the colours are relative to the
panel: a panel says where a token looks most, not how sharply), upsampled bilinearly to the image and laid over
it as a heat map (dark blue: the minimum, dark red: the maximum); the first panel is the cls token's query, the
others the chosen reference patches (row, col), each outlined.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from beit.checkpoint import peek_checkpoint
from beit.classifier import VisionTransformer, classifier_from_config
from beit.data.files import check_image, to_rgb
from beit.data.transforms import NORMALIZATIONS
from beit.model import VisionTransformerForMaskedImageModeling, check_images
from beit_kernels.backend import resolve_impl
from beit_kernels.nn import lookup_relative_position_bias

FINETUNE_KIND = "beit-finetune"
PRETRAIN_KIND = "beit-pretrain"
# Default normalisation when a checkpoint records none: what each kind is trained with by default (beit-pretrain's
# --normalization default; the official fine-tuning recipe's inception mean and std).
DEFAULT_NORMALIZATION = {"mim": "imagenet", "classifier": "inception"}
# Heat colours from no attention to the most, interpolated linearly (a jet-like map: blue, cyan, yellow, red).
HEAT = np.array([(0, 0, 128), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (128, 0, 0)], dtype=np.float64)
OVERLAY_ALPHA = 0.5  # panel = (1 - alpha) * image + alpha * heat colour
OUTLINE = (0, 255, 0)
PANEL_MIN = 224  # panels are drawn at least this many pixels on their longer side
COLUMNS = 4  # panels a row


# ----------------------------------------------------------------------------------------------------------------
# The attention probabilities


def _last_block_input(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, shared_bias): the last block's input [B, N+1, D] and the shared relative position bias [H, N+1, N+1]
    (None without one), the embedding and blocks[:-1] run as the model runs them."""
    if isinstance(model, VisionTransformerForMaskedImageModeling):
        check_images(images, model.patch_embed, "create_model")
        x = model._embed(images, None)  # no mask: every patch is seen
    elif isinstance(model, VisionTransformer):
        check_images(images, model.patch_embed, "create_classifier")
        x = model._embed(images, resolve_impl(model.impl, images.device))
    else:
        raise TypeError(f"expected a BEiT model, got {type(model).__name__}")
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    for blk in model.blocks[:-1]:
        x = blk(x, rel_pos_bias=shared)
    return x, shared


def last_layer_attention(model, images: torch.Tensor) -> torch.Tensor:
    """The last block's attention probabilities [B, H, N+1, N+1] (query, key; token 0 is cls, token 1 + r*Ww + c
    the patch at row r, column c), fp32, each row summing to 1. See the module's docstring for the math.

    ``images`` [B, C, H, W] normalised, of the model's size. Run without gradients, in eval mode (no dropout, no
    drop path); the model's training flag is restored."""
    if not isinstance(model, (VisionTransformerForMaskedImageModeling, VisionTransformer)):
        raise TypeError(
            "expected a BEiT (beit.model.VisionTransformerForMaskedImageModeling or beit.classifier.VisionTransformer)"
            f", got {type(model).__name__}"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x, shared = _last_block_input(model, images)
            blk = model.blocks[-1]
            attn = blk.attn
            h = blk.norm1(x).float()
            B, N, _ = h.shape
            qkv_bias = None
            if attn.q_bias is not None:
                qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias)).float()
            qkv = F.linear(h, attn.qkv.weight.float(), qkv_bias)
            qkv = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, H, N+1, hd]
            q, k = qkv[0] * attn.scale, qkv[1]
            logits = q @ k.transpose(-2, -1)  # [B, H, N+1, N+1]
            if attn.relative_position_bias_table is not None:
                table = attn.relative_position_bias_table.float()
                logits = logits + lookup_relative_position_bias(table, attn.relative_position_index).unsqueeze(0)
            if shared is not None:
                logits = logits + shared.float()
            return logits.softmax(dim=-1)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------
# The figure


def check_patches(ref_patches, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """The reference patches as (row, col) pairs inside the ``grid`` (rows, cols); a clear error otherwise."""
    gh, gw = grid
    out = []
    for p in ref_patches:
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(v, (int, np.integer)) for v in p)):
            raise ValueError(f"a reference patch is a (row, col) pair of integers, got {p!r}")
        r, c = int(p[0]), int(p[1])
        if not (0 <= r < gh and 0 <= c < gw):
            raise ValueError(
                f"reference patch ({r}, {c}) is outside the {gh}x{gw} patch grid (rows 0-{gh - 1}, cols 0-{gw - 1})"
            )
        out.append((r, c))
    return out


def _heat(values: np.ndarray) -> np.ndarray:
    """[h, w] in [0, 1] -> [h, w, 3] float RGB along ``HEAT``."""
    stops = np.linspace(0.0, 1.0, len(HEAT))
    return np.stack([np.interp(values, stops, HEAT[:, ch]) for ch in range(3)], axis=-1)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1
        return ImageFont.load_default()


def draw_attention_maps(
    image_pil,
    attn,
    ref_patches,
    grid: tuple[int, int],
    path: str | os.PathLike,
    *,
    panel_size: int | None = None,
) -> list[tuple[int, int, int, int]]:
    """Write a PNG of attention panels to ``path``: the cls token's map first, then one per reference patch.

    ``image_pil``: the image the model saw (after its resize and crop), any size; ``attn``: one image's
    probabilities [H, N+1, N+1] or [1, H, N+1, N+1] (``last_layer_attention``); ``ref_patches``: (row, col)
    pairs inside ``grid`` = (rows, cols), N = rows * cols. Panel for query token t: m = mean over heads of
    attn[:, t, 1:], reshaped [rows, cols], scaled to (m - min m) / (max m - min m) (0 where m is flat),
    upsampled bilinearly (``align_corners=False``: a patch's value sits at its centre) to the panel, coloured
    along ``HEAT`` and blended with the image at ``OVERLAY_ALPHA``. ``panel_size``: the panels' longer side in
    pixels (default: the image's, at least ``PANEL_MIN``). Panels go ``COLUMNS`` a row, each under its caption.
    Returns the panels' boxes (left, top, right, bottom) in the written image, cls first."""
    from PIL import Image, ImageDraw

    gh, gw = (int(v) for v in grid)
    patches = check_patches(ref_patches, (gh, gw))
    a = torch.as_tensor(attn).detach().float().cpu()
    if a.dim() == 4 and a.shape[0] == 1:
        a = a[0]
    n = gh * gw + 1
    if a.dim() != 3 or tuple(a.shape[1:]) != (n, n):
        raise ValueError(
            f"attn must be [heads, {n}, {n}] for a {gh}x{gw} grid (or [1, heads, ...]), got {tuple(a.shape)}"
        )
    if not torch.isfinite(a).all():
        raise ValueError("attn holds non-finite values")
    if not isinstance(image_pil, Image.Image):
        raise TypeError(f"image_pil must be a PIL image, got {type(image_pil).__name__}")

    w0, h0 = image_pil.size
    side = panel_size if panel_size is not None else max(w0, h0, PANEL_MIN)
    if side < 8:
        raise ValueError(f"panel_size must be at least 8 pixels, got {side}")
    scale = side / max(w0, h0)
    pw, ph = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    base = np.asarray(to_rgb(image_pil).resize((pw, ph), Image.BICUBIC), dtype=np.float64)

    mean = a.mean(0)  # [N+1, N+1], averaged over heads
    queries = [("[CLS]", 0, None)] + [(f"patch ({r}, {c})", 1 + r * gw + c, (r, c)) for r, c in patches]
    font = _font(14)
    caption_h = 24
    gap = 8
    cols = min(COLUMNS, len(queries))
    rows = math.ceil(len(queries) / cols)
    canvas = Image.new("RGB", (cols * (pw + gap) + gap, rows * (ph + caption_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    boxes = []
    for i, (caption, t, rc) in enumerate(queries):
        m = mean[t, 1:].reshape(1, 1, gh, gw)
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-30)  # a flat map stays at 0
        up = F.interpolate(m.double(), size=(ph, pw), mode="bilinear", align_corners=False)[0, 0]
        heat = _heat(up.clamp(0, 1).numpy())
        panel = Image.fromarray(np.rint((1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * heat).astype(np.uint8), "RGB")
        left = gap + (i % cols) * (pw + gap)
        top = gap + (i // cols) * (ph + caption_h + gap) + caption_h
        canvas.paste(panel, (left, top))
        draw.text((left + pw // 2, top - 4), caption, fill=(20, 20, 20), font=font, anchor="mb")
        if rc is not None:
            r, c = rc
            x0, x1 = left + round(c * pw / gw), left + round((c + 1) * pw / gw) - 1
            y0, y1 = top + round(r * ph / gh), top + round((r + 1) * ph / gh) - 1
            draw.rectangle([x0, y0, x1, y1], outline=OUTLINE, width=2)
        boxes.append((left, top, left + pw, top + ph))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return boxes


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and images


def load_model(path: str | os.PathLike, model_name: str | None = None, image_size: int | None = None):
    """(model, kind, recorded normalisation or None) from a checkpoint, in eval mode with ``impl="ref"``.

    A dict with ``"kind": "beit-finetune"`` is one of our fine-tuning checkpoints: a classifier rebuilt from its
    ``model_config`` and loaded strictly from its ``model``. Anything else goes through
    ``beit.export.model_from_checkpoint``: our pretraining checkpoints and exports, or (with ``model_name``) an
    official or Hugging Face MIM checkpoint. ``image_size`` builds the model for that input size instead of the
    checkpoint's; its position tables must then fit the new grid."""
    from beit.export import model_from_checkpoint

    overrides = {"impl": "ref"}
    if image_size is not None:
        overrides["img_size"] = image_size
    ckpt = peek_checkpoint(path)  # mapped: the MIM path reads the file again in model_from_checkpoint
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    kind = ckpt.get("kind")
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if kind not in (None, PRETRAIN_KIND, FINETUNE_KIND):
        raise ValueError(f"{path} is a {kind!r} checkpoint: expected {PRETRAIN_KIND} or {FINETUNE_KIND}")
    try:
        if kind == FINETUNE_KIND:
            cfg, sd = ckpt.get("model_config"), ckpt.get("model")
            if not isinstance(cfg, dict) or not isinstance(sd, dict):
                raise ValueError(f"{path} is a {FINETUNE_KIND} checkpoint without its model_config and model")
            model = classifier_from_config(cfg, **overrides)
            model.load_state_dict(sd)
            kind = "classifier"
        else:
            model = model_from_checkpoint(path, model_name, **overrides)
            kind = "mim"
    except (RuntimeError, ValueError, TypeError) as e:
        if image_size is None:
            raise
        raise ValueError(
            f"{e} (with --image-size {image_size}: the checkpoint's weights, its position tables among them, must "
            "fit a model built for that size; leave --image-size out to use the checkpoint's own)"
        ) from e
    return model.eval(), kind, args.get("normalization")


def load_image(path: str | os.PathLike, size: tuple[int, int]):
    """The image at ``path`` as 8-bit RGB, its shorter side resized (bicubic) so that it covers ``size`` = (height,
    width), then centre-cropped to it. A file that is missing, not an image or damaged is a clear error."""
    from PIL import Image

    problem = check_image(str(path))
    if problem is not None:
        raise ValueError(f"bad image file {path}: {problem}")
    try:
        with Image.open(path) as im:
            im = to_rgb(im)
            im.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"bad image file {path}: {type(e).__name__}: {e}") from e
    h, w = size
    W, H = im.size
    s = max(w / W, h / H)
    rw, rh = max(w, round(W * s)), max(h, round(H * s))
    im = im.resize((rw, rh), Image.BICUBIC)
    left, top = (rw - w) // 2, (rh - h) // 2
    return im.crop((left, top, left + w, top + h))


def to_tensor(image, normalization: str) -> torch.Tensor:
    """A PIL RGB image as a normalised [1, 3, H, W] float tensor: (pixel / 255 - mean) / std per channel."""
    mean, std = NORMALIZATIONS[normalization]
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)


def default_patches(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """The centre patch and the centres of the top-left and bottom-right quarters."""
    gh, gw = grid
    return [(gh // 2, gw // 2), (gh // 4, gw // 4), ((3 * gh) // 4, (3 * gw) // 4)]


def _parse_patch(text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"--patches takes ROW,COL pairs such as 3,4; got {text!r}") from None


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("beit-attention-map", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a beit-pretrain or beit-finetune checkpoint, or an export (see --model)")
    p.add_argument("image")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--patches", nargs="+", metavar="ROW,COL", help="reference patches (default: three spread out)")
    p.add_argument("--image-size", type=int, help="the model's input size (default: the checkpoint's)")
    p.add_argument(
        "--normalization",
        choices=tuple(NORMALIZATIONS),
        help="default: the checkpoint's, else inception for classifiers and imagenet for MIM models",
    )
    p.add_argument("--model", help="architecture, for checkpoints without model_config (see beit.list_models())")
    args = p.parse_args(argv)
    try:
        patches = [_parse_patch(s) for s in args.patches] if args.patches else None
        if args.image_size is not None and args.image_size <= 0:
            raise ValueError(f"--image-size must be positive, got {args.image_size}")
        if Path(args.out).suffix.lower() != ".png":
            raise ValueError(f"--out must name a .png file, got {args.out}")
        problem = check_image(args.image)
        if problem is not None:
            raise ValueError(f"bad image file {args.image}: {problem}")
        model, kind, recorded = load_model(args.checkpoint, args.model, args.image_size)
        norm = args.normalization or recorded or DEFAULT_NORMALIZATION[kind]
        if norm not in NORMALIZATIONS:
            raise ValueError(f"{args.checkpoint} records normalization {norm!r}; pass --normalization")
        grid = model.patch_embed.patch_shape
        patches = check_patches(patches if patches is not None else default_patches(grid), grid)
        image = load_image(args.image, model.patch_embed.img_size)
        attn = last_layer_attention(model, to_tensor(image, norm))[0]
        draw_attention_maps(image, attn, patches, grid, args.out)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        print(f"beit-attention-map: error: {_one_line(e)}", file=sys.stderr)
        return 2
    where = ", ".join(f"({r}, {c})" for r, c in patches)
    print(f"{args.out}: last-layer attention of a {kind} model ({norm} normalisation), cls and patches {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
