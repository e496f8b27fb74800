"""The DALI loader: one pipeline per epoch (or per resumed or restarted stretch of one) over this rank's files in
order, decoding with nvJPEG / the hardware decoder and augmenting on the GPU (``device="gpu"``) or on the CPU.

Per sample: one RandomResizedCrop box decoded once (ROI decode) and resized twice (bicubic to ``image_size``,
Lanczos to ``tokenizer_size``), colour jitter on both views with the same factors, flip, normalisation, and the
blockwise mask (the native operator or the Python generator through an external source). Every operator has an
explicit seed derived from (seed, rank, epoch, start step), so an epoch is reproducible on its own.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import numpy as np
import torch

from beit.data.base import OUTPUT_DTYPES, LoaderBase, mask_config
from beit.data.files import BadImageError, find_undecodable
from beit.data.order import mix_seeds
from beit.data.plugin import load_dali_plugin, require_dali
from beit.data.transforms import CROP_RATIO, CROP_SCALE, JITTER, LOGIT_LAPLACE_EPS, NORMALIZATIONS
from beit.masking import MaskingGenerator, mask_to_index


def _empty_padding_masks(batch: dict) -> None:
    """Empty the masks of the padding samples (``valid`` False; the dict's entries are replaced): no masked patch,
    no loss term."""
    pad = (~batch["valid"]).to(batch["bool_masked_pos"].device)[:, None]  # [B, 1]
    batch["bool_masked_pos"] = batch["bool_masked_pos"] & ~pad
    batch["mask_index"] = batch["mask_index"].masked_fill(pad.to(batch["mask_index"].device), -1)


class _PythonMasks:
    """External-source callback: one batch of masks from ``MaskingGenerator`` with its own seeded stream."""

    def __init__(self, cfg: dict, batch_size: int, seed: int):
        self.gen = MaskingGenerator(**cfg, rng=random.Random(seed))
        self.batch_size = batch_size
        self.k = self.gen.num_masking_patches

    def __call__(self):
        masks = np.stack([self.gen().reshape(-1) for _ in range(self.batch_size)])  # [B, H, W] -> [B, N]
        index = mask_to_index(torch.from_numpy(masks), self.k).numpy()
        return masks, index


def dali_masks(num_masks: int, *, seed: int = 0, native: bool = True, batch_size: int = 64, **masking) -> np.ndarray:
    """Draw masks through a DALI pipeline (the native operator, or with ``native=False`` the Python fallback) as
    [num_masks, H, W] bool: what the loader uses, exposed for the statistical tests."""
    dali = require_dali()
    from nvidia.dali import fn

    cfg = mask_config(masking)
    if native and not load_dali_plugin():
        raise RuntimeError("the native mask operator is not available")

    @dali.pipeline_def(batch_size=batch_size, num_threads=2, device_id=None, seed=seed % 2**31)
    def pipe():
        return tuple(_mask_nodes(fn, cfg, batch_size, seed, native))

    p = pipe()
    p.build()
    out = []
    while sum(len(o) for o in out) < num_masks:
        masks, _ = p.run()
        out.append(np.array(masks.as_tensor()))
    h, w = MaskingGenerator(**cfg).get_shape()
    return np.concatenate(out)[:num_masks].reshape(num_masks, h, w)  # [M, N] -> [M, H, W]


def _mask_nodes(fn, cfg: dict, batch_size: int, seed: int, native: bool):
    gen = MaskingGenerator(**cfg)
    if native:
        return fn.beit_mask_generator(
            height=gen.height,
            width=gen.width,
            num_masking_patches=gen.num_masking_patches,
            min_num_patches=gen.min_num_patches,
            max_num_patches=gen.max_num_patches,
            min_aspect=math.exp(gen.log_aspect_ratio[0]),
            max_aspect=math.exp(gen.log_aspect_ratio[1]),
            seed=seed % 2**31,
        )
    return fn.external_source(source=_PythonMasks(cfg, batch_size, seed), num_outputs=2, batch=True)


def _dali_pipeline(
    loader: DaliLoader,
    files: list[str],
    labels: list[int],
    seed: int,
    fused: bool = False,
    arithmetic_contrast: bool = False,
):
    """The pipeline over ``files`` in order. ``fused``: colour jitter, flip and normalisation by the plugin's
    ``beit_color_normalize`` (CPU only). ``arithmetic_contrast`` runs the GPU variant of the contrast step on the
    CPU, so that tests without a GPU check its graph."""
    dali = require_dali()
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    gpu = loader.device == "gpu"
    mean, std = NORMALIZATIONS[loader.normalization]
    eps = LOGIT_LAPLACE_EPS

    def op_seed(k: int) -> int:
        # Explicit per-operator seeds: DALI's automatic ones depend on how many operators precede each.
        return mix_seeds(seed, k) % 2**31

    @dali.pipeline_def(
        batch_size=loader.batch_size,
        num_threads=loader.num_threads,
        device_id=torch.cuda.current_device() if gpu else None,
        seed=seed % 2**31,
        prefetch_queue_depth=2,
    )
    def pipe():
        encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader")
        # One box, decoded once (ROI decode), resized twice: the official two-picture RandomResizedCrop.
        crop = fn.decoders.image_random_crop(
            encoded,
            device="mixed" if gpu else "cpu",
            output_type=types.RGB,
            random_area=list(CROP_SCALE),
            random_aspect_ratio=list(CROP_RATIO),
            num_attempts=10,
            seed=op_seed(1),
        )
        s, t = loader.image_size, loader.tokenizer_size
        # uint8 out, as PIL's resizes give (overshoot clipped); float resizes are slower on the CPU.
        big = fn.resize(crop, size=[s, s], interp_type=types.INTERP_CUBIC, antialias=True)
        small = fn.resize(crop, size=[t, t], interp_type=types.INTERP_LANCZOS3, antialias=True)
        # Colour jitter after the crop and resize, with the same factors on both views. torchvision's three
        # PIL ops: contrast blends with the image's mean grey level (measured once, on the small view),
        # brightness scales, saturation blends with the grey image (DALI's hsv saturation scales the YIQ
        # chroma, the same blend). The order is fixed (contrast, brightness, saturation) where torchvision
        # draws one; the factors have its distribution. DALI has no bfloat16: float32 here, cast by the loader.
        b = fn.random.uniform(range=[1 - JITTER, 1 + JITTER], seed=op_seed(2))
        c = fn.random.uniform(range=[1 - JITTER, 1 + JITTER], seed=op_seed(3))
        sat = fn.random.uniform(range=[1 - JITTER, 1 + JITTER], seed=op_seed(4))
        flip = fn.random.coin_flip(probability=0.5, seed=op_seed(5))
        gray = fn.color_space_conversion(small, image_type=types.RGB, output_type=types.GRAY)
        center = fn.reductions.mean(gray, dtype=types.FLOAT)
        tok_mean, tok_std = [-eps / (1 - 2 * eps)] * 3, [1 / (1 - 2 * eps)] * 3  # (x - m) / s = (1 - 2 eps) x + eps
        out_type = {"uint8": types.UINT8, "float16": types.FLOAT16}.get(loader.output_dtype, types.FLOAT)
        if fused:
            jitter = dict(brightness=b, contrast=c, saturation=sat, contrast_center=center)
            mirror = fn.cast(flip, dtype=types.INT32)
            images = fn.beit_color_normalize(
                big, **jitter, mirror=mirror, mean=list(mean), std=list(std), dtype=out_type
            )
            tok = fn.beit_color_normalize(small, **jitter, mirror=mirror, mean=tok_mean, std=tok_std)
        else:
            if gpu or arithmetic_contrast:
                # On the GPU the centre is a GPU tensor, which cannot be an operator argument: arithmetic instead.
                c_dev = c.gpu() if gpu else c

                def adjust(x):
                    x = dmath.clamp(c_dev * (x - center) + center, 0.0, 255.0)
                    return fn.brightness_contrast(fn.cast(x, dtype=types.UINT8), brightness=b)

            else:

                def adjust(x):
                    return fn.brightness_contrast(x, brightness=b, contrast=c, contrast_center=center)

            big, small = (fn.hsv(adjust(x), saturation=sat) for x in (big, small))
            if loader.output_dtype == "uint8":
                images = fn.crop_mirror_normalize(big, mirror=flip, dtype=types.UINT8, output_layout="HWC")
            else:
                images = fn.crop_mirror_normalize(
                    big,
                    mirror=flip,
                    mean=[255 * m for m in mean],
                    std=[255 * v for v in std],
                    dtype=out_type,
                    output_layout="CHW",
                )
            tok = fn.crop_mirror_normalize(
                small, mirror=flip, mean=[0.0], std=[255.0], scale=1 - 2 * eps, shift=eps, dtype=types.FLOAT,
                output_layout="CHW",
            )  # fmt: skip
        masks, index = _mask_nodes(fn, loader.mask_cfg, loader.batch_size, mix_seeds(seed, 0x3A5C), loader.native_masks)
        if gpu:
            masks, index, label = masks.gpu(), index.gpu(), label.gpu()
        return images, tok, masks, index, label

    p = pipe()
    p.build()
    return p


class DaliLoader(LoaderBase):
    """The DALI pipeline as an iterable of batch dicts (see the module docstring); ``build_loader`` makes one."""

    OUTPUTS = ("images", "tokenizer_images", "bool_masked_pos", "mask_index", "label")

    def __init__(self, data_dir, batch_size: int, *, device: str = "gpu", pin_memory: bool = False, **kw):
        require_dali()
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("device='gpu' needs CUDA; use device='cpu' on this machine")
        super().__init__(data_dir, batch_size, **kw)
        self.device = device
        self.pin_memory = pin_memory and device == "cpu"
        self.native_masks = load_dali_plugin()
        # The fused colour operator is a CPU operator; a GPU pipeline keeps its colour work on the GPU.
        self.fused_color = self.native_masks and device == "cpu"
        self._arithmetic_contrast = False

    def _iter_from(self, order: np.ndarray, valid: np.ndarray, start: int, restart: int) -> Iterator[dict]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        # The reader's label carries the file index; padding is encoded as -(index + 1).
        sel, ok = order[start * self.batch_size :], valid[start * self.batch_size :]
        files = [self.files[i] for i in sel]
        labels = [int(i) if v else -int(i) - 1 for i, v in zip(sel, ok)]
        pipe = _dali_pipeline(
            self, files, labels, self._epoch_seed(start, restart), self.fused_color, self._arithmetic_contrast
        )
        it = DALIGenericIterator(
            pipe, list(self.OUTPUTS), reader_name="Reader", last_batch_policy=LastBatchPolicy.PARTIAL
        )
        dtype = OUTPUT_DTYPES[self.output_dtype]
        for (out,) in it:
            label = out.pop("label").reshape(-1).long()
            out["index"] = torch.where(label >= 0, label, -label - 1)
            out["valid"] = label >= 0
            out["bool_masked_pos"] = out["bool_masked_pos"].bool()
            _empty_padding_masks(out)
            if self.pin_memory:  # a copy from pageable memory to a GPU makes the host wait for it
                out = {k: v.pin_memory() for k, v in out.items()}
            if out["images"].dtype != dtype:
                out["images"] = out["images"].to(dtype)
            yield out

    def _iterate(self, step: int) -> Iterator[dict]:
        order, valid = self._this_epoch()
        restart = 0
        while step < len(self):
            try:
                for batch in self._iter_from(order, valid, step, restart):
                    yield batch
                    step += 1
                return
            except RuntimeError as e:
                if "Critical error in pipeline" not in str(e) and "Failed to decode" not in str(e):
                    raise
                # The pipeline prefetches: the failing sample lies in the next few batches.
                window = order[step * self.batch_size : (step + 4) * self.batch_size]
                culprits = find_undecodable([self.files[i] for i in dict.fromkeys(window.tolist())])
                if not culprits or self.on_bad_file == "error":
                    # One line: the file and the cause (the pipeline's own report stays in the exception chain).
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    names = "; ".join(f"{f}: {r}" for f, r in culprits) or "could not tell which file: " + first
                    raise BadImageError(f"decoding failed: {names}") from e
                for f, r in culprits:
                    self._skip_runtime_failure(f, r)
                # Rebuild from this step with the same step count: the bad files' slots become padding.
                self._replace(order, valid, self._failed, step * self.batch_size)
                restart += 1
