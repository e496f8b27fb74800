"""What both tokenizers share: the pixel mapping (``map_pixels``, ``unmap_pixels`` and ``LOGIT_LAPLACE_EPS``,
defined with the data pipeline in ``beit.data.transforms``), the input checks, patch extraction and the file
sniffing.

Both tokenizers take the 112 px view after ``map_pixels`` (values in [0.1, 0.9]), as the official BEiT data
pipeline produces it, so the trainer can swap one for the other without touching its data.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch
import torch.nn as nn

from beit.data.transforms import LOGIT_LAPLACE_EPS, map_pixels, unmap_pixels
from beit.fileformat import refuse_non_weights

__all__ = [
    "LOGIT_LAPLACE_EPS",
    "VisualTokenizer",
    "as_path",
    "check_images",
    "check_positions",
    "map_pixels",
    "patchify",
    "scatter_positions",
    "sniff_weights_file",
    "unmap_pixels",
]

# Resampling (lanczos, bicubic) of a mapped image may overshoot [0.1, 0.9] a little; anything further out was not
# mapped (ImageNet-normalised tensors go negative, raw [0, 1] images have dark and bright pixels).
_RANGE_SLACK = 0.02


def check_images(images: torch.Tensor, channels: int, patch_size: int, check_range: bool) -> None:
    """Refuse what would tokenize silently wrong: wrong rank, channels, dtype, a size that is not a multiple of the
    patch, and (with ``check_range``, one device-to-host sync) values outside the mapped range."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor [B, {channels}, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(f"images must have shape [B, {channels}, H, W], got {list(images.shape)}")
    if not torch.is_floating_point(images):
        raise TypeError(f"images must be float (after map_pixels), got {images.dtype}")
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size or h == 0 or w == 0:
        raise ValueError(f"image height and width must be positive multiples of {patch_size}, got {h}x{w}")
    if check_range and images.numel():
        lo, hi = torch.aminmax(images.detach())
        lo, hi = lo.item(), hi.item()
        if lo < LOGIT_LAPLACE_EPS - _RANGE_SLACK or hi > 1 - LOGIT_LAPLACE_EPS + _RANGE_SLACK:
            raise ValueError(
                f"image values span [{lo:.3g}, {hi:.3g}]; the tokenizer expects images in [0, 1] passed through "
                "map_pixels (range [0.1, 0.9]), not normalised or 0-255 images "
                "(pass check_range=False to skip this check)"
            )


def check_positions(positions: torch.Tensor, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """The ``positions`` argument of ``get_codebook_indices``: int [B, K] on the images' device, token indices in
    raster order, -1 padding (``beit.masking.mask_to_index``'s). Returned as int64. The values are checked on the
    device (``torch._assert_async``: no host sync; on CUDA a bad value fails at the next synchronisation)."""
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError("positions must be an int32 or int64 tensor [B, K]")
    if positions.dim() != 2 or positions.shape[0] != batch:
        raise ValueError(f"positions must be [{batch}, K], got shape {tuple(positions.shape)}")
    if positions.shape[1] > num_tokens:
        raise ValueError(f"positions lists {positions.shape[1]} tokens of an image that has {num_tokens}")
    if positions.device != device:
        raise ValueError(f"positions are on {positions.device} but the images are on {device}")
    if positions.numel():
        torch._assert_async(
            ((positions >= -1) & (positions < num_tokens)).all(),
            f"positions must be -1 (padding) or token indices in [0, {num_tokens})",
        )
    return positions.long()


def scatter_positions(ids: torch.Tensor, positions: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """ids [B, K] of the tokens at ``positions`` [B, K] (negative: padding) -> [B, num_tokens] int64, -1 where no
    id was computed. Padding rows land in a spare column, so they cannot overwrite a real position."""
    B = ids.shape[0]
    out = torch.full((B, num_tokens + 1), -1, dtype=torch.int64, device=ids.device)
    index = torch.where(positions >= 0, positions, num_tokens)
    out.scatter_(1, index, ids.long())
    return out[:, :num_tokens].contiguous()


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p]: patches in raster order (as the dVAE's flattened logits), each
    flattened channel-major (c, row, column)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)  # B, C, H/p, p, W/p, p
    x = x.permute(0, 2, 4, 1, 3, 5)  # B, H/p, W/p, C, p, p
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def sniff_weights_file(path: Path, expected: str) -> None:
    """Refuse a missing file, or one that is evidently not weights (HTML page, wget log, empty), before reading it;
    every message says what was expected."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {expected}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected {expected}")
    try:
        refuse_non_weights(path)
    except ValueError as e:
        raise ValueError(f"{e}; expected {expected}") from None


class VisualTokenizer(nn.Module):
    """The interface the trainer relies on: ``vocab_size``, ``input_size`` (the side of the view it tokenizes),
    ``patch_size`` (pixels per token side) and ``get_codebook_indices(images, positions=None)``: int64
    [B, (H/8)*(W/8)] token ids in raster order; given ``positions`` [B, K] (the masked patches, -1 padding), only
    those ids need be computed, and the others are -1 (BEiT's loss reads the masked patches' tokens alone)."""

    vocab_size: int
    input_size: int
    patch_size: int = 8
    in_channels: int = 3

    def __init__(self) -> None:
        super().__init__()
        # One host sync per call; a trainer that has validated its pipeline may switch it off.
        self.check_range = True

    def check_device(self, images: torch.Tensor) -> None:
        ref = next(itertools.chain(self.buffers(), self.parameters()))
        if images.device != ref.device:
            raise ValueError(
                f"images are on {images.device} but the tokenizer is on {ref.device}: move one with .to(device)"
            )

    def num_tokens(self, height: int, width: int | None = None) -> int:
        width = height if width is None else width
        return (height // self.patch_size) * (width // self.patch_size)


def as_path(path: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(path)))
