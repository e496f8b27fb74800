"""Blockwise masking, the official BEiT algorithm (unilm ``beit/masking_generator.py``), on current NumPy.

Per call, blocks are added until ``num_masking_patches`` cells are masked or a block cannot be placed:
    target area  ~ U(min_num_patches, max_mask)              max_mask = min(remaining, max_num_patches)
    aspect       ~ exp(U(log min_aspect, log max_aspect))   max_aspect defaults to 1 / min_aspect
    h, w         = round(sqrt(area * aspect)), round(sqrt(area / aspect))
    top, left    ~ randint(0, H - h), randint(0, W - w)      inclusive bounds, only when h < H and w < W
A block is kept when it adds between 1 and ``max_mask`` new cells; ten attempts per block; the call stops when a
block adds nothing. So a mask holds at most ``num_masking_patches`` cells (75 of 196 by default, about 38%) and
sometimes fewer. Random numbers come from Python's ``random`` (the official code's source, so a seeded
``random.Random`` reproduces the official masks draw for draw).

The batch helpers produce what the model and the kernels take: ``bool_masked_pos`` [B, N] and a padded index
[B, K] of masked patch positions (ascending, -1 for padding, K = ``num_masking_patches``), which lets the masked
rows be gathered with a static shape and no device-to-host synchronisation.
"""

from __future__ import annotations

import math
import numbers
import random

import numpy as np
import torch


def _as_int(name: str, value) -> int:
    # bool is an int subclass, but True as a patch count is a slip, not a count; floats would be truncated
    # silently by the native DALI operator, which takes ints.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    return int(value)


def _as_finite_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value):
        # The log-uniform aspect draw turns inf or nan into a nan block side, which fails only at the first draw.
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


class MaskingGenerator:
    def __init__(
        self,
        input_size: int | tuple[int, int] = 14,
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        rng: random.Random | int | None = None,
    ):
        # Every check runs before any state is set: a bad value otherwise surfaces only at the first draw
        # (``math domain error``), or never, as masks that are silently empty.
        grid = tuple(input_size) if isinstance(input_size, (tuple, list)) else (input_size, input_size)
        if len(grid) != 2:
            raise ValueError(f"input_size must be an int or a (height, width) pair, got {input_size!r}")
        height, width = (_as_int("input_size", s) for s in grid)
        if height <= 0 or width <= 0:
            raise ValueError(f"input_size must be positive, got {input_size!r}")
        num_patches = height * width
        num_masking_patches = _as_int("num_masking_patches", num_masking_patches)
        # 0 stays allowed: no block is drawn and every mask is empty, a legitimate setting for evaluation.
        if not 0 <= num_masking_patches <= num_patches:
            raise ValueError(
                f"num_masking_patches={num_masking_patches} must lie in [0, {num_patches}] for a {height}x{width} grid"
            )
        min_num_patches = _as_int("min_num_patches", min_num_patches)
        # 0 draws zero-area blocks that only waste attempts; a negative minimum gives negative target areas, whose
        # square root fails at the first draw.
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        # A block's area is drawn from U(min_num_patches, max_mask), max_mask = min(remaining budget, max_num_patches).
        # Above the budget (or above max_num_patches) the bounds swap: every block is smaller than the stated minimum
        # and a share of the masks comes out empty (measured on 14x14: 11% for min 16 with a budget of 10, 69% for
        # min 100 with 75, 13% for min 16 with max 10). The swap on the last, partial block is the official algorithm
        # and stays.
        if num_masking_patches > 0 and min_num_patches > num_masking_patches:
            raise ValueError(
                f"min_num_patches={min_num_patches} exceeds num_masking_patches={num_masking_patches}: "
                f"the smallest block must fit in the budget (min_num_patches <= num_masking_patches)"
            )
        # None means no cap beyond the budget, checked above; with a budget of 0 it resolves to 0, which is unused.
        if max_num_patches is not None:
            max_num_patches = _as_int("max_num_patches", max_num_patches)
            if max_num_patches < min_num_patches:
                raise ValueError(
                    f"max_num_patches={max_num_patches} is below min_num_patches={min_num_patches}: "
                    f"expected min_num_patches <= max_num_patches, or None for the budget (num_masking_patches)"
                )
        # A block is placed only when its rounded sides stay below the grid's, round(sqrt(area * aspect)) < height
        # and round(sqrt(area / aspect)) < width, so its area is at most (height - 0.5) * (width - 0.5): a minimum
        # above that never draws a block, and every mask comes out empty.
        if num_masking_patches > 0 and min_num_patches > (height - 0.5) * (width - 0.5):
            raise ValueError(
                f"min_num_patches={min_num_patches} is too large a block for a {height}x{width} grid: at most "
                f"{math.floor((height - 0.5) * (width - 0.5))} patches fit in one block"
            )
        min_aspect = _as_finite_real("min_aspect", min_aspect)
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be positive, got {min_aspect}")
        if max_aspect is None:
            max_aspect = 1 / min_aspect
            if max_aspect < min_aspect:
                raise ValueError(
                    f"min_aspect={min_aspect} is above 1, so the default max_aspect=1/min_aspect={max_aspect:g} is "
                    f"below it: pass min_aspect <= 1, or an explicit max_aspect >= min_aspect"
                )
        else:
            max_aspect = _as_finite_real("max_aspect", max_aspect)
            if max_aspect < min_aspect:
                raise ValueError(
                    f"max_aspect={max_aspect} is below min_aspect={min_aspect}: expected max_aspect >= min_aspect, "
                    f"or None for 1/min_aspect"
                )

        self.height, self.width = height, width
        self.num_patches = num_patches
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        # None draws from the global ``random`` module, as the official code does; an int seeds a private stream.
        self.rng = random.Random(rng) if isinstance(rng, int) else (rng if rng is not None else random)

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}, {self.width} -> [{self.min_num_patches} ~ {self.max_num_patches}], "
            f"max = {self.num_masking_patches}, {self.log_aspect_ratio[0]:.3f} ~ {self.log_aspect_ratio[1]:.3f})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: int) -> int:
        rng = self.rng
        delta = 0
        for _attempt in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]  # a view: writing it writes the mask
                num_new = h * w - int(block.sum())
                if 0 < num_new <= max_mask_patches:
                    block[...] = True
                    delta += num_new
                if delta > 0:
                    break
        return delta

    def __call__(self) -> np.ndarray:
        """One mask: a [height, width] bool array with at most ``num_masking_patches`` True cells."""
        mask = np.zeros(self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask


def mask_to_index(bool_masked_pos: torch.Tensor, num_indices: int) -> torch.Tensor:
    """Positions of the masked patches, ascending, padded with -1: [B, N] bool -> [B, num_indices] int64.

    No host synchronisation: the count check runs on the device (``torch._assert_async``), so a mask with more
    than ``num_indices`` masked patches fails the step rather than being truncated.
    """
    if not isinstance(bool_masked_pos, torch.Tensor) or bool_masked_pos.dtype != torch.bool:
        raise TypeError("bool_masked_pos must be a torch.bool tensor")
    if bool_masked_pos.dim() != 2:
        raise ValueError(f"bool_masked_pos must be [B, N], got shape {tuple(bool_masked_pos.shape)}")
    if num_indices < 0:
        raise ValueError(f"num_indices must be >= 0, got {num_indices}")
    B, N = bool_masked_pos.shape
    torch._assert_async(
        (bool_masked_pos.sum(dim=1) <= num_indices).all(),
        f"a mask has more than num_indices={num_indices} masked patches",
    )
    pos = torch.arange(N, device=bool_masked_pos.device).expand(B, N)
    # Masked positions sort first (keys 0..N-1), unmasked ones after them (keys N..2N-1).
    key = torch.where(bool_masked_pos, pos, pos + N)
    index = key.sort(dim=1).values[:, : min(num_indices, N)]
    index = torch.where(index < N, index, torch.full_like(index, -1))
    if num_indices > N:
        index = torch.cat((index, index.new_full((B, num_indices - N), -1)), dim=1)
    return index


def generate_masks(
    generator: MaskingGenerator, batch_size: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch_size`` masks: ``bool_masked_pos`` [B, N] bool and the padded index [B, K] int64 (-1 padding),
    K = ``generator.num_masking_patches``."""
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    masks = np.stack([generator() for _ in range(batch_size)]) if batch_size else np.zeros((0, *generator.get_shape()))
    bool_masked_pos = torch.from_numpy(masks.reshape(batch_size, -1).astype(bool))  # [B, H, W] -> [B, N]
    index = mask_to_index(bool_masked_pos, generator.num_masking_patches)
    if device is not None:
        bool_masked_pos, index = bool_masked_pos.to(device), index.to(device)
    return bool_masked_pos, index
