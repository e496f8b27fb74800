"""What both loaders share (``LoaderBase``): the options' checks, the file list and its validation, the shard, the
per-epoch order and the bookkeeping of files that fail to decode; and the masking options (``mask_config``)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

from beit.data.files import MAX_PIXELS, BadImageError, list_images, validate_images
from beit.data.order import epoch_order, mix_seeds, resolve_shards
from beit.data.transforms import NORMALIZATIONS
from beit.masking import MaskingGenerator

OUTPUT_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def mask_config(masking: dict | None) -> dict:
    """``MaskingGenerator`` options: the official defaults updated by ``masking``, checked before any work."""
    cfg = dict(input_size=14, num_masking_patches=75, min_num_patches=16, max_num_patches=None, min_aspect=0.3)
    cfg.update(masking or {})
    unknown = set(cfg) - {"input_size", "num_masking_patches", "min_num_patches", "max_num_patches", "min_aspect"}
    if unknown:
        raise ValueError(f"unknown masking options {sorted(unknown)}")
    MaskingGenerator(**cfg)  # validates the configuration before any work
    return cfg


class LoaderBase:
    """What both loaders share: files, validation, sharding, epoch order."""

    def __init__(
        self,
        data_dir,
        batch_size: int,
        *,
        num_threads: int,
        seed: int,
        shard_id: int | None,
        num_shards: int | None,
        image_size: int,
        tokenizer_size: int,
        output_dtype: str,
        normalization: str,
        on_bad_file: str,
        masking: dict | None,
        shuffle: bool,
        validate: bool,
        max_pixels: int | None = MAX_PIXELS,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_threads <= 0:
            raise ValueError(f"num_threads must be positive, got {num_threads}")
        if output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {list(OUTPUT_DTYPES)}, got {output_dtype!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
        if on_bad_file not in ("skip", "error"):
            raise ValueError(f"on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
        if max_pixels is not None and max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
        if image_size <= 0 or tokenizer_size <= 0:
            raise ValueError(f"image sizes must be positive, got {image_size} and {tokenizer_size}")
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.seed = seed
        self.shard_id, self.num_shards = resolve_shards(shard_id, num_shards)
        self.image_size = image_size
        self.tokenizer_size = tokenizer_size
        self.output_dtype = output_dtype
        self.normalization = normalization
        self.on_bad_file = on_bad_file
        self.mask_cfg = mask_config(masking)
        self.shuffle = shuffle
        files = list_images(data_dir)
        if validate:
            self.files, self.bad_files = validate_images(files, on_bad_file, num_threads, max_pixels)
        else:
            self.files, self.bad_files = files, []
        self._index = {f: i for i, f in enumerate(self.files)}
        self._failed: set[int] = set()  # files that passed validation but failed to decode ("skip")
        self.epoch = 0

    def __len__(self) -> int:
        per_step = self.batch_size * self.num_shards
        return (len(self.files) + per_step - 1) // per_step

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentations the next iteration produces (iterating again without
        calling this repeats the same epoch, as with torch's DistributedSampler)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict]:
        return self.iter_from(0)

    def iter_from(self, step: int) -> Iterator[dict]:
        """The current epoch's batches from batch ``step`` on: a run resumed mid-epoch neither repeats nor skips a
        sample. The reference loader then gives exactly the batches of an uninterrupted run (its randomness is
        seeded per sample); the DALI pipeline draws the remaining augmentations from a seed of its own."""
        if not 0 <= step <= len(self):
            raise ValueError(f"step {step} is outside the epoch's {len(self)} batches")
        return self._iterate(step)

    def epoch_order(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return epoch_order(
            len(self.files),
            self.batch_size,
            epoch=self.epoch if epoch is None else epoch,
            seed=self.seed,
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            shuffle=self.shuffle,
        )

    def _this_epoch(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's order for the current epoch, with files that failed to decode earlier (``skip``) replaced
        by padding. ``files`` itself never changes: every rank must draw the same permutation."""
        order, valid = self.epoch_order()
        if self._failed:
            self._replace(order, valid, self._failed, 0)
        return order, valid

    def _replace(self, order: np.ndarray, valid: np.ndarray, bad: set[int], start: int) -> None:
        """Give the slots of ``bad`` files from ``start`` on to good files, as padding (in place)."""
        good = [i for i in range(len(self.files)) if i not in bad]
        if not good:
            raise BadImageError(f"every file failed to decode (the last: {self.files[max(bad)]})")
        for j in range(start, order.size):
            if int(order[j]) in bad:
                order[j], valid[j] = good[(j * 7919) % len(good)], False

    def _epoch_seed(self, *extra: int) -> int:
        return mix_seeds(self.seed, self.shard_id, self.epoch, *extra)

    def _skip_runtime_failure(self, path: str, reason: str) -> None:
        self.bad_files.append((path, reason))
        self._failed.add(self._index[path])
        warnings.warn(f"skipping a file that failed to decode: {path}: {reason}", stacklevel=4)
