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

from beit.data.base import OUTPUT_DTYPES, LoaderBase
from beit.data.files import BadImageError, to_rgb
from beit.data.order import mix_seeds
from beit.data.transforms import NORMALIZATIONS, color_jitter, map_pixels, random_resized_crop_box, resized_crop
from beit.masking import MaskingGenerator, mask_to_index


class ReferenceDataset(torch.utils.data.Dataset):
    """One rank's epoch: sample ``j`` is file ``order[j]`` with randomness seeded by (seed, j), so the output does
    not depend on the number of workers."""

    def __init__(self, loader: ReferenceLoader, order: np.ndarray, valid: np.ndarray, seed: int, start: int = 0):
        # ``start``: the first sample of the epoch this dataset serves (a resumed epoch); seeds stay per epoch slot.
        self.loader, self.order, self.valid, self.seed, self.start = loader, order, valid, seed, start
        mean, std = NORMALIZATIONS[loader.normalization]
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.order) - self.start

    def _open(self, j: int):
        """(file index, valid, RGB image, failure report); the report is "" unless the file failed to decode."""
        from PIL import Image

        files = self.loader.files
        i = int(self.order[j])
        try:
            with Image.open(files[i]) as im:
                return i, bool(self.valid[j]), to_rgb(im), ""
        except Exception as e:
            report = f"{files[i]}\0{type(e).__name__}: {e}"
            if self.loader.on_bad_file == "error":
                raise BadImageError(f"decoding failed: {files[i]}: {type(e).__name__}: {e}") from e
            # Keep the batch full: the next file takes the slot as padding. The report travels with the sample
            # because warnings raised in DataLoader workers never reach the main process.
            for k in range(1, len(files)):
                try:
                    with Image.open(files[(i + k) % len(files)]) as im:
                        return (i + k) % len(files), False, to_rgb(im), report
                except Exception:  # another bad file: try the next one
                    continue
            raise BadImageError(f"no file of the data set decodes (first failure: {files[i]}: {e})") from e

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
            big = big.permute(2, 0, 1).float().div_(255)  # HWC -> CHW
            big = ((big - self.mean) / self.std).to(OUTPUT_DTYPES[ld.output_dtype])
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
        workers = self.num_threads if self.num_threads > 1 else 0
        dl = torch.utils.data.DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
            # Its own generator: a DataLoader otherwise draws its base seed from the global torch RNG, which would
            # make the model's random draws (drop path) depend on where an epoch's iteration started.
            generator=torch.Generator().manual_seed(self._epoch_seed() % 2**63),
        )
        batches = iter(dl)
        try:
            try:
                for batch in batches:
                    for report in batch.pop("decode_failure"):
                        if report:
                            path, reason = report.split("\0", 1)
                            self._skip_runtime_failure(path, reason)
                    yield batch
            except BadImageError as e:
                # A worker's error reaches here as the worker's whole traceback; its own message (one line, naming
                # the file and the cause) is the traceback's last line.
                lines = str(e).strip().splitlines()
                if len(lines) > 1:
                    raise BadImageError(lines[-1].split("BadImageError: ", 1)[-1]) from None
                raise
        finally:
            # Stop the workers when the epoch ends, by an error too. An error raised in a worker keeps the iterator
            # alive through its traceback's frames, and its workers would idle until the garbage collector ran
            # its shutdown; falling inside another loader's start-up, that shutdown waits out a join timeout per
            # worker.
            shutdown = getattr(batches, "_shutdown_workers", None)  # absent without worker processes
            if shutdown is not None:
                shutdown()
