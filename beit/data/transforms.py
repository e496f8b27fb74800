"""The augmentation's pieces and constants, shared by the loaders and the tokenizers: the normalisations, the
RandomResizedCrop box and its crop-and-resize (the reference loader's views and the k-means tokenizer's), the PIL
colour jitter and DALL-E's pixel mapping (``map_pixels``, ``LOGIT_LAPLACE_EPS``).

The official BEiT augmentation (unilm ``beit/datasets.py``) per sample: one RandomResizedCrop box (scale 0.08-1,
ratio 3/4-4/3), horizontal flip p=0.5, ColorJitter(0.4, 0.4, 0.4); the box resized bicubic for the model's view
and Lanczos for the tokenizer's, which then goes through DALL-E's ``map_pixels`` ([0, 1] -> [0.1, 0.9]).
"""

from __future__ import annotations

import math

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": (INCEPTION_MEAN, INCEPTION_STD)}
# DALL-E's logit-Laplace epsilon: map_pixels squeezes [0, 1] into [eps, 1 - eps] (dall_e/utils.py).
LOGIT_LAPLACE_EPS = 0.1
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.4  # brightness, contrast and saturation factors ~ U(1 - 0.4, 1 + 0.4), as torchvision's ColorJitter
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, what PIL's convert("L") and torchvision use


def normalize(hwc: torch.Tensor, normalization: str) -> torch.Tensor:
    """An [H, W, 3] uint8 image as [3, H, W] float32, scaled to [0, 1] and normalised with ``normalization``'s
    mean and std (a key of ``NORMALIZATIONS``)."""
    mean, std = NORMALIZATIONS[normalization]
    x = hwc.permute(2, 0, 1).float().div_(255)  # HWC -> CHW
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [0.1, 0.9], the DALL-E encoder's input range. Accepts any float tensor of shape [..., C, H, W]."""
    if not torch.is_floating_point(x):
        raise TypeError(f"map_pixels expects a float tensor in [0, 1], got {x.dtype} (convert uint8 with x / 255)")
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`map_pixels`, clamped to [0, 1]."""
    if not torch.is_floating_point(x):
        raise TypeError(f"unmap_pixels expects a float tensor, got {x.dtype}")
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale=CROP_SCALE, ratio=CROP_RATIO
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w), ten tries then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img, box: tuple[int, int, int, int], size: int, resample):
    """The ``box`` (top, left, height, width, as ``random_resized_crop_box`` gives it) of a PIL image, resized to
    ``size`` x ``size`` with ``resample``. Crop, then resize, as torchvision's resized_crop: a resize with ``box=``
    would let the filter reach past the box's edges."""
    top, left, h, w = box
    return img.crop((left, top, left + w, top + h)).resize((size, size), resample)


def color_jitter(img, rng: np.random.Generator, strength: float = JITTER):
    """torchvision's ColorJitter(strength, strength, strength) on a PIL image: factors ~ U(1 - s, 1 + s) applied
    in a random order."""
    from PIL import ImageEnhance

    factors = rng.uniform(1 - strength, 1 + strength, size=3)
    ops = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for k in rng.permutation(3):
        img = ops[k](img).enhance(float(factors[k]))
    return img
