"""Batch augmentations of the fine-tuning recipe, on the batch's device: mixup / cutmix with soft targets, random
erasing, and the soft-target cross-entropy.

Semantics are timm's (``timm.data.mixup.Mixup`` in "batch" mode, ``timm.data.random_erasing.RandomErasing``), as
the official BEiT fine-tuning uses them:

* Mixup: lam ~ Beta(alpha, alpha); ``x' = lam * x + (1 - lam) * x.flip(0)``.
* CutMix: a box of ``int(H * sqrt(1 - lam)) x int(W * sqrt(1 - lam))`` around a uniform centre, clipped to the
  image, is pasted from ``x.flip(0)``; lam is then corrected to ``1 - box area / (H * W)``.
* Targets: the one-hot with label smoothing s over C classes (off = s / C, on = 1 - s + off), mixed the same way:
  ``t = lam * y + (1 - lam) * y.flip(0)``; every row sums to 1.
* Random erasing: per sample with probability p, up to 10 tries for a box of area fraction ~ U(min_area,
  max_area) and log aspect ratio ~ U(log min_aspect, log max_aspect) that fits, filled with N(0, 1) noise.

Every random choice of a box, a lam or a mode is drawn on the host from Python's global ``random`` module (the
trainer's checkpoints save and restore its state per rank, so a resumed run draws the same), never from a device
tensor: nothing here waits for the device. The noise of random erasing comes from torch's generator on the batch's
device. Random erasing belongs before mixup, as timm applies it per sample in the transform.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["MixParams", "Mixup", "RandomErasing", "one_hot_smoothed", "soft_target_cross_entropy"]


def _check_number(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


def _check_labels(labels: torch.Tensor, batch_size: int | None, num_classes: int, device: torch.device | None) -> None:
    """Dtype, shape and device on the host; the range on the device (``torch._assert_async``: on CUDA a bad label
    fails at the next synchronisation, on the CPU at once)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if labels.ndim != 1 or (batch_size is not None and labels.shape[0] != batch_size):
        raise ValueError(
            f"labels must have shape [{'B' if batch_size is None else batch_size}], got {list(labels.shape)}"
        )
    if device is not None and labels.device != device:
        raise ValueError(f"labels are on {labels.device}, the images on {device}")
    if labels.numel() > 0:
        in_range = ((labels >= 0) & (labels < num_classes)).all()
        torch._assert_async(in_range, f"labels must lie in [0, num_classes={num_classes})")


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """[B] integer labels -> [B, C] float32 on their device: ``smoothing / C`` off the label and
    ``1 - smoothing + smoothing / C`` on it (timm ``one_hot`` with ``mixup_target``'s values); rows sum to 1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    smoothing = _check_number("smoothing", smoothing, 0.0, 1.0, hi_open=True)
    _check_labels(labels, None, num_classes, None)
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), on)  # index [B, 1]


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_b( -sum_c target[b, c] * log_softmax(logits[b])[c] )`` for logits [B, C] (any float dtype, computed
    in float32) and a soft target [B, C]; a 0-d float32 tensor. With a smoothed one-hot target this equals
    ``F.cross_entropy(logits, labels, label_smoothing=s)``."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("logits and target must be tensors")
    if logits.ndim != 2 or target.shape != logits.shape:
        raise ValueError(
            f"logits must be [B, C] and target the same shape, got {list(logits.shape)} and {list(target.shape)}"
        )
    if not logits.dtype.is_floating_point or not target.dtype.is_floating_point:
        raise TypeError(f"logits and target must be floating, got {logits.dtype} and {target.dtype}")
    log_p = F.log_softmax(logits.float(), dim=-1)  # [B, C] fp32
    return torch.sum(-target.float() * log_p, dim=-1).mean()


# ----------------------------------------------------------------------------------------------------------------
# Mixup / CutMix


@dataclass(frozen=True)
class MixParams:
    """One batch's draw: ``lam`` the weight of the unflipped batch (after the cutmix box correction), ``cutmix``
    whether a box is pasted, ``box`` its rows ``[y0, y1)`` and columns ``[x0, x1)`` as ``(y0, y1, x0, x1)``."""

    lam: float
    cutmix: bool = False
    box: tuple[int, int, int, int] | None = None


class Mixup:
    """timm's ``Mixup`` in "batch" mode (one lam and one mode for the whole batch, the partner the flipped batch).

    With probability ``prob`` the batch is mixed: if both alphas are positive, cutmix with probability
    ``switch_prob`` (lam ~ Beta(cutmix_alpha, cutmix_alpha)) else mixup (lam ~ Beta(mixup_alpha, mixup_alpha));
    if one alpha is 0 the other mode is always used. Otherwise lam = 1 (the images unchanged, the targets the
    smoothed one-hot). The host draws in timm's order: the ``prob`` coin, the switch coin, lam, then the cutmix
    centre (row, column).

    ``__call__(images [B, 3, H, W] float, labels [B] int)`` returns ``(mixed images, targets [B, num_classes]
    float32)`` on the images' device: new tensors, or the images themselves when lam is 1; the inputs are never
    modified. B must be even (as timm: with an odd B the middle sample would be mixed with itself).
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
    ):
        self.mixup_alpha = _check_number("mixup_alpha", mixup_alpha, 0.0, math.inf, hi_open=True)
        self.cutmix_alpha = _check_number("cutmix_alpha", cutmix_alpha, 0.0, math.inf, hi_open=True)
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("Mixup needs mixup_alpha > 0 or cutmix_alpha > 0 (Mixup.from_args gives None then)")
        self.prob = _check_number("prob", prob, 0.0, 1.0)
        self.switch_prob = _check_number("switch_prob", switch_prob, 0.0, 1.0)
        self.label_smoothing = _check_number("label_smoothing", label_smoothing, 0.0, 1.0, hi_open=True)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes

    @classmethod
    def from_args(
        cls, mixup: float, cutmix: float, prob: float, switch_prob: float, smoothing: float, num_classes: int
    ) -> Mixup | None:
        """A Mixup, or None when both alphas are 0 (then plain cross-entropy with label smoothing applies)."""
        if mixup == 0 and cutmix == 0:
            return None
        return cls(mixup, cutmix, prob, switch_prob, smoothing, num_classes)

    def __repr__(self) -> str:
        return (
            f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, "
            f"switch_prob={self.switch_prob}, label_smoothing={self.label_smoothing}, num_classes={self.num_classes})"
        )

    def draw(self, height: int, width: int) -> MixParams:
        """The host-side draw for one batch of ``height x width`` images (Python ``random`` only)."""
        if random.random() >= self.prob:
            return MixParams(1.0)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = random.random() < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(random.betavariate(alpha, alpha))
        if lam == 1.0 or not use_cutmix:
            return MixParams(lam)
        # timm rand_bbox: a cut of sqrt(1 - lam) of each side around a uniform centre, clipped to the image.
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = random.randrange(height), random.randrange(width)
        y0, y1 = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
        x0, x1 = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        return MixParams(lam, True, (y0, y1, x0, x1))

    def _check(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor, got {type(images).__name__}")
        if images.ndim != 4 or not images.dtype.is_floating_point:
            raise ValueError(f"images must be a float [B, C, H, W] batch, got {images.dtype} {list(images.shape)}")
        batch_size = images.shape[0]
        if batch_size == 0 or batch_size % 2:
            raise ValueError(
                f"Mixup needs an even, non-zero batch size (the partner is the flipped batch), got {batch_size}"
            )
        _check_labels(labels, batch_size, self.num_classes, images.device)

    def apply(self, images: torch.Tensor, labels: torch.Tensor, params: MixParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix by a given draw (``draw`` or a test's)."""
        self._check(images, labels)
        if not 0.0 <= params.lam <= 1.0 or (params.cutmix and params.box is None):
            raise ValueError(f"params must hold a lam in [0, 1] and, for cutmix, a box; got {params}")
        return self._mix(images, labels, params)

    def _mix(self, images: torch.Tensor, labels: torch.Tensor, params: MixParams) -> tuple[torch.Tensor, torch.Tensor]:
        lam = params.lam
        y = one_hot_smoothed(labels, self.num_classes, self.label_smoothing)  # [B, C] fp32
        if lam == 1.0:
            return images, y
        target = y * lam + y.flip(0) * (1.0 - lam)
        if params.cutmix:
            y0, y1, x0, x1 = params.box
            mixed = images.clone()
            mixed[:, :, y0:y1, x0:x1] = images[:, :, y0:y1, x0:x1].flip(0)
        else:
            mixed = images * lam + images.flip(0) * (1.0 - lam)
        return mixed, target

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(images, labels)
        return self._mix(images, labels, self.draw(images.shape[-2], images.shape[-1]))


# ----------------------------------------------------------------------------------------------------------------
# Random erasing


class RandomErasing:
    """timm's ``RandomErasing`` on a normalised batch [B, C, H, W] on its device, every sample independently.

    For each sample, erased when ``random.random() <= probability``: ``count`` boxes (1, or uniform in
    [1, max_count]), each from up to 10 tries of area ``U(min_area, max_area) * H * W / count`` and aspect ratio
    ``exp(U(log min_aspect, log max_aspect))``, ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area /
    aspect))``, accepted when ``h < H`` and ``w < W``, at a uniform top-left corner; a sample whose 10 tries all
    fail stays as it is. The host draws in timm's order (Python ``random``), the fill on the device: ``"pixel"``
    per-pixel N(0, 1), ``"rand"`` N(0, 1) per (sample, channel), ``"const"`` zeros; in the images' dtype.

    The boxes go to the device as one small table (pinned and copied without blocking on CUDA) and become a mask,
    so a batch costs a fixed handful of kernels whatever its size. Returns a new tensor, or the images themselves
    when no sample is erased; the input is never modified.
    """

    def __init__(
        self,
        probability: float = 0.25,
        mode: str = "pixel",
        max_count: int = 1,
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        self.probability = _check_number("probability", probability, 0.0, 1.0)
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"mode must be 'pixel', 'rand' or 'const', got {mode!r}")
        self.mode = mode
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
            raise ValueError(f"max_count must be an int >= 1, got {max_count!r}")
        self.max_count = max_count
        self.min_area = _check_number("min_area", min_area, 0.0, 1.0, lo_open=True)
        self.max_area = _check_number("max_area", max_area, self.min_area, 1.0)
        self.min_aspect = _check_number("min_aspect", min_aspect, 0.0, math.inf, lo_open=True, hi_open=True)
        max_aspect = 1.0 / self.min_aspect if max_aspect is None else max_aspect
        self.max_aspect = _check_number("max_aspect", max_aspect, self.min_aspect, math.inf, hi_open=True)
        self.log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))

    def __repr__(self) -> str:
        return (
            f"RandomErasing(probability={self.probability}, mode={self.mode!r}, max_count={self.max_count}, "
            f"min_area={self.min_area}, max_area={self.max_area}, min_aspect={self.min_aspect}, "
            f"max_aspect={self.max_aspect})"
        )

    def draw_boxes(self, batch_size: int, height: int, width: int) -> list[list[tuple[int, int, int, int]]]:
        """Per sample, the list of its boxes ``(top, left, h, w)`` (empty: not erased); Python ``random`` only."""
        area = height * width
        boxes = []
        for _ in range(batch_size):
            sample = []
            boxes.append(sample)
            if random.random() > self.probability:
                continue
            count = 1 if self.max_count == 1 else random.randint(1, self.max_count)
            for _ in range(count):
                for _attempt in range(10):
                    target_area = random.uniform(self.min_area, self.max_area) * area / count
                    aspect = math.exp(random.uniform(*self.log_aspect))
                    h = int(round(math.sqrt(target_area * aspect)))
                    w = int(round(math.sqrt(target_area / aspect)))
                    if w < width and h < height:
                        top = random.randint(0, height - h)
                        left = random.randint(0, width - w)
                        sample.append((top, left, h, w))
                        break
        return boxes

    def apply(self, images: torch.Tensor, boxes: list[list[tuple[int, int, int, int]]]) -> torch.Tensor:
        """Erase the given boxes (``draw_boxes``' output for this batch)."""
        self._check(images)
        batch_size, channels, height, width = images.shape
        if len(boxes) != batch_size:
            raise ValueError(f"boxes lists {len(boxes)} samples, the batch has {batch_size}")
        if not any(boxes):
            return images
        k = max(len(b) for b in boxes)
        table = torch.zeros(batch_size, k, 4, dtype=torch.int32)  # [B, K, (top, left, h, w)]; h = w = 0: no box
        for i, sample in enumerate(boxes):
            if sample:
                table[i, : len(sample)] = torch.tensor(sample, dtype=torch.int32)
        if images.device.type == "cuda":
            table = table.pin_memory().to(images.device, non_blocking=True)
        else:
            table = table.to(images.device)
        top, left, h, w = (table[..., j, None, None] for j in range(4))  # each [B, K, 1, 1]
        rows = torch.arange(height, device=images.device, dtype=torch.int32).view(1, 1, height, 1)
        cols = torch.arange(width, device=images.device, dtype=torch.int32).view(1, 1, 1, width)
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # [B, K, H, W]
        mask = inside.any(dim=1, keepdim=True)  # [B, 1, H, W]
        if self.mode == "pixel":
            fill = torch.randn_like(images)
        elif self.mode == "rand":
            fill = torch.randn(batch_size, channels, 1, 1, dtype=images.dtype, device=images.device)
        else:
            fill = torch.zeros((), dtype=images.dtype, device=images.device)
        return torch.where(mask, fill, images)

    def _check(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor, got {type(images).__name__}")
        if images.ndim != 4 or not images.dtype.is_floating_point:
            raise ValueError(
                f"images must be a normalised float [B, C, H, W] batch, got {images.dtype} {list(images.shape)}"
            )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        batch_size, _, height, width = images.shape
        return self.apply(images, self.draw_boxes(batch_size, height, width))
