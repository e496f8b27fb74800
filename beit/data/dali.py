"""The DALI loader: one pipeline per epoch (or per resumed or restarted stretch of one) over this rank's files in
order, decoding with nvJPEG / the hardware decoder and augmenting on the GPU (``device="gpu"``) or on the CPU.

Per sample: one RandomResizedCrop box decoded once (ROI decode) and resized twice (bicubic to ``image_size``,
Lanczos to ``tokenizer_size``), colour jitter on both views with the same factors, flip, normalisation, and the
blockwise mask (the native operator or the Python generator through an external source). Every operator has an
explicit seed derived from (seed, rank, epoch, start step), so an epoch is reproducible on its own.

Both DALI loaders (this one and the fine-tuning one) build their pipelines from the pieces here: ``pipeline_def``,
``op_seeds``, ``sample_input`` (DALI's file reader for image files, an external source for tar members' bytes or
decoded pixels) and ``pipeline_batches``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import numpy as np
import torch

from beit.data.base import OUTPUT_DTYPES, LoaderBase, mask_config
from beit.data.classification import ClassificationSource
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


def pipeline_def(loader: LoaderBase, seed: int, **options):
    """DALI's ``pipeline_def`` for a loader's pipeline: its batch size, threads and device, the pipeline seed from
    ``seed``, two batches prefetched; ``options`` add to these."""
    dali = require_dali()
    return dali.pipeline_def(
        batch_size=loader.batch_size,
        num_threads=loader.num_threads,
        device_id=torch.cuda.current_device() if loader.device == "gpu" else None,
        seed=seed % 2**31,
        prefetch_queue_depth=2,
        **options,
    )


def op_seeds(seed: int):
    """``op_seed(k)``, the explicit seed of a pipeline's operator ``k``, drawn from ``seed``: DALI's automatic
    seeds depend on how many operators precede each, so a change to the graph would move every later draw."""

    def op_seed(k: int) -> int:
        return mix_seeds(seed, k) % 2**31

    return op_seed


def sample_codes(sel: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The code each sample carries through a pipeline: its file index in the loader, -(index + 1) for padding."""
    return np.where(ok, sel, -sel - 1).astype(np.int64)


class SampleFeed:
    """External-source callback: batch ``info.iteration`` of the samples ``positions`` of ``source``, as (samples,
    codes [B, 1] int64). Samples are encoded bytes (1-D uint8) or decoded [H, W, 3] uint8 pixels. The batch
    depends only on its number, so DALI's prefetching cannot reorder anything."""

    def __init__(self, source: ClassificationSource, positions: np.ndarray, codes: np.ndarray, batch_size: int):
        self.source, self.positions, self.codes, self.batch_size = source, positions, codes, batch_size

    def __call__(self, info):
        lo = info.iteration * self.batch_size
        if lo >= len(self.positions):
            raise StopIteration
        sel = self.positions[lo : lo + self.batch_size]
        if self.source.kind == "pixels":
            samples = [self.source.pixels[p] for p in sel]
        else:
            samples = [np.frombuffer(self.source.read(int(p)), dtype=np.uint8) for p in sel]
        return samples, self.codes[lo : lo + self.batch_size].reshape(-1, 1)


def sample_input(fn, source: ClassificationSource, positions: np.ndarray, codes: np.ndarray, batch_size: int):
    """The (sample, code) nodes of a pipeline over the samples ``positions`` of ``source`` in order, ``codes``
    (``sample_codes``) riding along: DALI's file reader (named "Reader") for image files, an external source
    (``SampleFeed``) for encoded bytes (tar members) or decoded pixels."""
    if source.kind == "files":
        files = [source.files[int(p)] for p in positions]
        return fn.readers.file(files=files, labels=codes.tolist(), random_shuffle=False, name="Reader")
    layout = ["HWC" if source.kind == "pixels" else "", ""]
    feed = SampleFeed(source, positions, codes, batch_size)
    return fn.external_source(source=feed, num_outputs=2, batch=True, batch_info=True, layout=layout)


def pipeline_batches(pipe, outputs: list[str], source: ClassificationSource) -> Iterator[dict]:
    """The batches of a pipeline whose input is ``sample_input``, as dicts of its ``outputs``; the last output, the
    samples' codes, becomes ``index`` (the file index in the loader) and ``valid``. The file reader gives the
    length of the stretch; an external source ends it by raising StopIteration."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    reader = dict(reader_name="Reader") if source.kind == "files" else {}
    for (out,) in DALIGenericIterator(pipe, outputs, last_batch_policy=LastBatchPolicy.PARTIAL, **reader):
        code = out.pop(outputs[-1]).reshape(-1).long()
        out["index"] = torch.where(code >= 0, code, -code - 1)
        out["valid"] = code >= 0
        yield out


def _dali_pipeline(
    loader: DaliLoader,
    positions: np.ndarray,
    codes: np.ndarray,
    seed: int,
    fused: bool = False,
    arithmetic_contrast: bool = False,
):
    """The pipeline over the samples ``positions`` (source positions) in order, ``codes`` (``sample_codes``) riding
    along. ``fused``: colour jitter, flip and normalisation by the plugin's ``beit_color_normalize`` (CPU only).
    ``arithmetic_contrast`` runs the GPU variant of the contrast step on the CPU, so that tests without a GPU check
    its graph."""
    require_dali()
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    gpu = loader.device == "gpu"
    mean, std = NORMALIZATIONS[loader.normalization]
    eps = LOGIT_LAPLACE_EPS
    op_seed = op_seeds(seed)

    @pipeline_def(loader, seed)
    def pipe():
        encoded, label = sample_input(fn, loader.source, positions, codes, loader.batch_size)
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

    OUTPUTS = ("images", "tokenizer_images", "bool_masked_pos", "mask_index", "code")

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
        sel, ok = order[start * self.batch_size :], valid[start * self.batch_size :]
        pipe = _dali_pipeline(
            self,
            self.positions[sel],
            sample_codes(sel, ok),
            self._epoch_seed(start, restart),
            self.fused_color,
            self._arithmetic_contrast,
        )
        dtype = OUTPUT_DTYPES[self.output_dtype]
        for out in pipeline_batches(pipe, list(self.OUTPUTS), self.source):
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
                # Rebuild from this step with the same step count: the bad samples' slots become padding.
                self._on_decode_failure(e, order, valid, step)
                restart += 1
