"""What the loaders share (``LoaderBase``): the options' checks, the file list and its validation, the shard, the
per-epoch order and the bookkeeping of files that fail to decode; the PIL loaders' epoch in a torch DataLoader
(``EpochDataset``, ``LoaderBase._dataloader_batches``); and the masking options (``mask_config``)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

from beit.data.classification import ClassificationSource, open_image_source
from beit.data.files import MAX_PIXELS, BadImageError, set_aside, validate_images
from beit.data.order import epoch_order, mix_seeds, repeated_steps, resolve_shards
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
    """What the loaders share: the source and its validation, sharding, epoch order. ``data_dir``: a
    ``ClassificationSource`` (fine-tuning), or what ``open_image_source`` opens (pretraining). ``source`` holds
    the samples, ``positions`` [M] int64 the source positions of the usable ones and ``files`` their names."""

    repeated_aug = 1  # repeated augmentation's k (``order.epoch_order``'s ``repeats``): a fine-tuning option

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
        if isinstance(data_dir, ClassificationSource):
            self.source = data_dir
        else:
            self.source = open_image_source(data_dir, num_threads=num_threads)
        if self.repeated_aug > 1:  # the source's size bounds the usable count: too few fails before validating
            repeated_steps(len(self.source), batch_size, self.num_shards, self.repeated_aug)
        self.positions, self.bad_files = self._validate(num_threads, max_pixels, validate)
        self.files = [self.source.names[p] for p in self.positions]  # the usable samples' names
        if self.repeated_aug > 1:
            repeated_steps(len(self.files), batch_size, self.num_shards, self.repeated_aug)
        self._index = {f: i for i, f in enumerate(self.files)}
        self._failed: set[int] = set()  # files that passed validation but failed to decode ("skip")
        self.epoch = 0

    def __len__(self) -> int:
        if self.repeated_aug > 1:
            return repeated_steps(len(self.files), self.batch_size, self.num_shards, self.repeated_aug)
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
        """This rank's (file indices, valid) for an epoch (default: the current one), with ``repeated_aug``'s
        repetition (``order.epoch_order``'s ``repeats``)."""
        return epoch_order(
            len(self.files),
            self.batch_size,
            epoch=self.epoch if epoch is None else epoch,
            seed=self.seed,
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            shuffle=self.shuffle,
            repeats=self.repeated_aug,
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

    def _validate(self, num_threads: int, max_pixels: int | None, validate: bool):
        """(source positions of the usable samples [M] int64, (name, reason) of the others): the index's bad
        samples, then those the up-front check sets aside (``validate``). "error" raises on the first, naming it;
        "skip" warns, naming them."""
        source, on_bad_file = self.source, self.on_bad_file
        if validate and source.kind == "files":
            _, bad = validate_images(source.files, on_bad_file, num_threads, max_pixels)  # warns or raises itself
            out = {f for f, _ in bad}
            return np.asarray([i for i, f in enumerate(source.files) if f not in out], dtype=np.int64), bad
        bad = list(source.bad_samples)
        reasons = source.check(num_threads, max_pixels) if validate else [None] * len(source)
        bad += [(name, r) for name, r in zip(source.names, reasons) if r is not None]
        skipping = f"skipping {len(bad)} bad samples of {source.description}"
        set_aside(bad, on_bad_file, first="bad sample", noun="samples", skipping=skipping, stacklevel=5)
        keep = np.asarray([i for i, r in enumerate(reasons) if r is None], dtype=np.int64)
        if keep.size == 0:
            raise ValueError(f"no usable samples in {source.description}")
        return keep, bad

    def _on_decode_failure(self, e: RuntimeError, order: np.ndarray, valid: np.ndarray, step: int) -> None:
        """After a DALI pipeline's error at batch ``step``: re-raise ``e`` unless it is a decode failure; name the
        samples the pipeline failed on (it prefetches: they lie in the next few batches), then raise naming them
        ("error", or when none can be named), or make their slots padding from ``step`` on, so that the pipeline
        can be built again from there with the same step count."""
        if "Critical error in pipeline" not in str(e) and "Failed to decode" not in str(e):
            raise e
        window = order[step * self.batch_size : (step + 4) * self.batch_size]
        culprits = self.source.undecodable(self.positions[list(dict.fromkeys(window.tolist()))])
        if not culprits or self.on_bad_file == "error":
            # One line: the sample and the cause (the pipeline's own report stays in the exception chain).
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            names = "; ".join(f"{f}: {r}" for f, r in culprits) or "could not tell which sample: " + first
            raise BadImageError(f"decoding failed: {names}") from e
        for name, reason in culprits:
            self._skip_runtime_failure(name, reason)
        self._replace(order, valid, self._failed, step * self.batch_size)

    def image(self, i: int):
        """Sample ``i`` of ``files`` (source position ``positions[i]``) as an 8-bit RGB PIL image; raises when it
        cannot be decoded."""
        return self.source.image(int(self.positions[i]))

    def _dataloader_batches(self, ds: EpochDataset) -> Iterator[dict]:
        """The batches of ``ds`` from a torch DataLoader with ``num_threads`` worker processes (in-process when it
        is 1), recording the decode failures its samples report and stopping the workers when the epoch ends."""
        workers = self.num_threads if self.num_threads > 1 else 0
        dl = torch.utils.data.DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=self.pin_memory,
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
                            self._skip_runtime_failure(*report.split("\0", 1))
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


class EpochDataset(torch.utils.data.Dataset):
    """One rank's epoch for a PIL loader's DataLoader, from slot ``start`` on: slot ``j`` is file ``order[j]`` of
    ``loader.files``, read with ``loader.image``, and draws its randomness from (``seed``, j), so the output depends
    neither on the number of workers nor on the slot the epoch's iteration starts from. Subclasses transform."""

    def __init__(self, loader: LoaderBase, order: np.ndarray, valid: np.ndarray, seed: int, start: int = 0):
        self.loader, self.order, self.valid, self.seed, self.start = loader, order, valid, seed, start

    def __len__(self) -> int:
        return len(self.order) - self.start

    def _open(self, j: int):
        """(file index, valid, RGB image, failure report) of slot ``j``; the report is "" unless the file failed
        to decode ("skip"), when the next file that decodes takes the slot as padding."""
        ld = self.loader
        n = len(ld.files)
        i = int(self.order[j])
        try:
            return i, bool(self.valid[j]), ld.image(i), ""
        except Exception as e:
            if ld.on_bad_file == "error":
                raise BadImageError(f"decoding failed: {ld.files[i]}: {type(e).__name__}: {e}") from e
            # Keep the batch full. The report travels with the sample because warnings raised in DataLoader
            # workers never reach the main process.
            report = f"{ld.files[i]}\0{type(e).__name__}: {e}"
            for k in range(1, n):
                try:
                    return (i + k) % n, False, ld.image((i + k) % n), report
                except Exception:  # another bad sample: try the next one
                    continue
            raise BadImageError(f"no sample of the data set decodes (first failure: {ld.files[i]}: {e})") from e
