"""The reference loader: the official transforms with PIL in a torch DataLoader (``num_threads`` worker
processes; in-process when it is 1), for machines without DALI and wherever the official transforms are wanted
as they are.

It keeps the official order: colour jitter on the full image (torchvision's random order of the three
operations), flip, then one RandomResizedCrop box cropped and resized twice. Sample ``j`` of an epoch draws all
its randomness from (seed, rank, epoch, j), so the output depends neither on the number of workers nor on the
step an epoch's iteration starts from.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch

from beit.data.base import OUTPUT_DTYPES, EpochDataset, LoaderBase
from beit.data.order import mix_seeds
from beit.data.transforms import color_jitter, map_pixels, normalize, random_resized_crop_box, resized_crop
from beit.masking import MaskingGenerator, mask_to_index


class ReferenceDataset(EpochDataset):
    """One rank's epoch with the official transforms: sample ``j`` is file ``order[j]`` with randomness seeded by
    (seed, j), so the output does not depend on the number of workers."""

    def __getitem__(self, j: int) -> dict:
        from PIL import Image

        ld = self.loader
        j += self.start
        rng = np.random.default_rng(mix_seeds(self.seed, j))
        i, valid, img, failure = self._open(j)
        # The official order: jitter the full image, flip, then one box resized twice.
        img = color_jitter(img, rng)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        box = random_resized_crop_box(img.width, img.height, rng)
        big = resized_crop(img, box, ld.image_size, Image.Resampling.BICUBIC)
        small = resized_crop(img, box, ld.tokenizer_size, Image.Resampling.LANCZOS)
        big = torch.from_numpy(np.asarray(big).copy())  # [S, S, 3] uint8
        if ld.output_dtype != "uint8":
            big = normalize(big, ld.normalization).to(OUTPUT_DTYPES[ld.output_dtype])  # CHW
        small = map_pixels(torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).float().div_(255))  # CHW
        mask = MaskingGenerator(**ld.mask_cfg, rng=random.Random(mix_seeds(self.seed, j, 0x3A5C)))()
        mask = torch.from_numpy(mask.reshape(-1))  # [H, W] -> [N]
        if not valid:  # drawn all the same, so the valid samples' draws do not depend on where the padding falls
            mask = torch.zeros_like(mask)
        return {
            "images": big,
            "tokenizer_images": small,
            "bool_masked_pos": mask,
            "mask_index": mask_to_index(mask[None], ld.mask_cfg["num_masking_patches"])[0],
            "index": torch.tensor(i, dtype=torch.int64),
            "valid": torch.tensor(valid),
            "decode_failure": failure,
        }


class ReferenceLoader(LoaderBase):
    """The official transforms with PIL, ``num_threads`` DataLoader worker processes (0 means in-process)."""

    def __init__(self, data_dir, batch_size: int, *, pin_memory: bool = False, **kw):
        super().__init__(data_dir, batch_size, **kw)
        self.device = "cpu"
        self.pin_memory = pin_memory

    def _iterate(self, step: int) -> Iterator[dict]:
        order, valid = self._this_epoch()
        ds = ReferenceDataset(self, order, valid, self._epoch_seed(), start=step * self.batch_size)
        yield from self._dataloader_batches(ds)
