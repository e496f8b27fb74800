"""The fine-tuning and evaluation loaders over a classification source (``beit.data.classification``): the DALI
pipeline (GPU, or the same graph on the CPU) and a PIL loader for machines without DALI.

Batches are dicts, every batch full (static shapes):
    images  [B, 3, S, S] float32, normalised with ``normalization``'s mean/std (on the GPU for DALI on the GPU)
    labels  [B] int64, the class index of each sample
    index   [B] int64, the sample's position in ``loader.source``
    valid   [B] bool, False for padding: the samples that fill the last batches so that every rank takes
            ``len(loader)`` steps. They are real samples repeated (their labels are right) and must be left out of
            the loss and of every count, so that each sample weighs once an epoch or is evaluated once.
with ``labels``, ``index`` and ``valid`` on the same device as ``images``.

Transforms (unilm ``beit/datasets.py`` ``build_transform``, with timm's ``create_transform`` for training):
    train   RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bicubic) to S x S, horizontal flip p=0.5, RandAugment
            (timm's spec string, default ``rand-m9-mstd0.5-inc1``), normalisation. Random erasing, mixup and cutmix
            are the trainer's (on the GPU), not the loader's.
    eval    the shorter side resized to int(S / crop_pct) bicubic, the centre S x S cropped, normalisation;
            crop_pct defaults to 0.875 (224/256) below 384 px and 1.0 from 384 px (the shorter side resized to S,
            then the centre crop). The official code's other branch, for S <= 32 (no resize; a padded random crop
            in training), is not provided: such sizes are refused.

Order and sharding, as in pretraining (``order.epoch_order``): training draws one permutation per epoch, the same
on every rank, padded to a multiple of ``num_shards * batch_size`` and dealt round-robin, so each sample is seen
once per epoch across ranks; evaluation takes the samples in order, dealt the same way, so the ranks' valid
samples are disjoint and together are every sample exactly once.

Repeated augmentation (training, ``repeated_aug`` k > 1; DeiT's ``RASampler``, which the paper uses and the official
script lacks): the epoch's permutation (the same as without it) has each sample repeated k times in a row, then is
dealt round-robin as above, and each rank keeps only ``num_samples // (num_shards * batch_size)`` batches. An epoch
thus has about as many steps as without repetition (rounded down to whole steps: ``len(loader)``) and sees about
1/k of the samples, each k times (the last one kept possibly fewer) with its own augmentation (each copy has its
own slot, hence its own draws). The k copies of a sample go to k different ranks when ``num_shards >= k``; on
fewer ranks, copies share a rank in consecutive slots, the same batch or two adjacent ones (on one rank, all k in a
row). No slot is padding there, so ``valid`` is False only for samples that fail to decode.

With or without repetition, ``set_epoch(e)`` then ``iter_from(k)`` gives batches k, k+1, ... of epoch e exactly as
an uninterrupted iteration of that epoch does, on a fresh loader too:
    PIL   every sample draws its randomness from (seed, rank, epoch, slot), independent of where iteration starts
          and of the number of worker processes;
    DALI  DALI's random operators draw from per-pipeline streams, so a pipeline covers a fixed stretch of the
          epoch (the whole epoch, or ``segment_batches`` batches) with a seed from (seed, rank, epoch, stretch);
          resuming inside a stretch runs it from its start and drops the batches before the resume point. A
          resume thus decodes up to an epoch (or a segment) in vain, once; shorter segments bound that at the
          price of a pipeline build per segment (about a second of host time with RandAugment's graph).

Bad samples (as in pretraining): checked up front (``files.validate_images`` for files, ``files.check_image`` of tar
members' bytes, the index's bad samples), then left out with a warning naming them (``on_bad_file="skip"``, listed in
``loader.bad_files``) or an error naming the first (``"error"``); one that still fails to decode later becomes
padding (``valid`` False) with a warning, or stops with an error naming it.

RandAugment: the DALI path runs timm's operation list built from DALI's own augmentations
(``nvidia.dali.auto_aug``: ``timm_rand_augment_suite``) through DALI's ``apply_rand_augment``, each of the N
layers applied with probability 0.5 as in timm; it differs from timm in drawing no magnitude noise (``mstd``),
in bilinear rather than bicubic warps and in one grey fill level (see ``RandAugmentSpec`` and the README's
"Fine-tuning data"). The PIL path uses timm's ``rand_augment_transform`` with the official hyperparameters when
timm is installed, and refuses a RandAugment request without it.
"""

from __future__ import annotations

import contextlib
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from beit.data.base import EpochDataset, LoaderBase
from beit.data.classification import ClassificationSource, open_classification_source
from beit.data.dali import op_seeds, pipeline_batches, pipeline_def, sample_codes, sample_input
from beit.data.files import MAX_PIXELS
from beit.data.loader import resolve_backend
from beit.data.order import mix_seeds
from beit.data.plugin import require_dali
from beit.data.transforms import (
    CROP_RATIO,
    CROP_SCALE,
    NORMALIZATIONS,
    normalize,
    random_resized_crop_box,
    resized_crop,
)

DEFAULT_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
DALI_MAGNITUDE_BINS = 101  # timm's magnitude scale 0..10 in steps of 0.1: bin = 10 * M
TRANSLATE_PCT = 0.45  # timm's relative translation at magnitude 10 (``translate_pct``)
INSTALL_HINT = "install DALI (pip install -e '.[dali]') or timm, or pass rand_augment=None"


def default_crop_pct(image_size: int) -> float:
    """The official evaluation crop: 224/256 below 384 px, 1.0 (resize only) from 384 px."""
    return 224 / 256 if image_size < 384 else 1.0


def eval_resize_size(image_size: int, crop_pct: float | None = None) -> int:
    """The shorter side before the centre crop: int(image_size / crop_pct)."""
    return int(image_size / (default_crop_pct(image_size) if crop_pct is None else crop_pct))


def resize_center_crop(img, image_size: int, crop_pct: float | None = None):
    """The evaluation transform on a PIL image, as torchvision's Resize(int(S / crop_pct), bicubic) and
    CenterCrop(S): the shorter side to int(S / crop_pct) (the longer one scaled and truncated; an image already
    that size is left alone), then the centre S x S (offsets rounded)."""
    from PIL import Image

    size = eval_resize_size(image_size, crop_pct)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_long = int(size * long / short)
        img = img.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)
    w, h = img.size
    top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
    return img.crop((left, top, left + image_size, top + image_size))


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's RandAugment spec ``rand-m{M}-n{N}-mstd{S}-inc{0|1}`` (any order; timm's defaults M=10, N=2,
    mstd 0, inc 0). On DALI: N layers of DALI's ``apply_rand_augment`` over ``timm_rand_augment_suite(inc)`` at
    magnitude bin 10 M of 101, which maps to timm's M / 10 of each range (bin k of K is low + k / (K - 1) of the
    way to high). DALI's magnitude is one number for the whole batch: ``mstd`` (timm's per-operation
    N(M, mstd) noise) is parsed but not applied there."""

    spec: str
    magnitude: float = 10.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False

    @classmethod
    def parse(cls, spec: str) -> RandAugmentSpec:
        parts = str(spec).split("-")
        if parts[0] != "rand":
            raise ValueError(f"rand_augment {spec!r}: expected timm's 'rand-m9-mstd0.5-inc1' form")
        values: dict[str, str] = {}
        for p in parts[1:]:
            m = re.fullmatch(r"(mstd|inc|m|n)(\d+(?:\.\d+)?)", p)
            if m is None:
                raise ValueError(
                    f"rand_augment {spec!r}: unsupported part {p!r} (supported: m<magnitude>, n<ops>, "
                    "mstd<std>, inc<0|1>)"
                )
            values[m.group(1)] = m.group(2)
        mag = float(values.get("m", 10))
        if not 0 <= mag <= 10:
            raise ValueError(f"rand_augment {spec!r}: magnitude m must lie in 0..10 (timm clips it there)")
        if abs(mag * 10 - round(mag * 10)) > 1e-9:
            raise ValueError(f"rand_augment {spec!r}: magnitude m must be a multiple of 0.1")
        n = values.get("n", "2")
        if not n.isdigit():
            raise ValueError(f"rand_augment {spec!r}: n (the number of operations) must be an integer")
        inc = values.get("inc", "0")
        if inc not in ("0", "1"):
            raise ValueError(f"rand_augment {spec!r}: inc must be 0 or 1")
        return cls(str(spec), mag, int(n), float(values.get("mstd", 0)), inc == "1")

    @property
    def dali_bin(self) -> int:
        return int(round(self.magnitude * 10))


def _timm_rand_augment(spec: RandAugmentSpec, image_size: int, normalization: str):
    """timm's RandAugment with the official hyperparameters (timm ``create_transform``: translate_const 45 % of
    the size, fill with the mean colour, bicubic), or an ImportError saying what to install."""
    try:
        from timm.data.auto_augment import rand_augment_transform
    except ImportError as e:
        raise ImportError(
            f"RandAugment ({spec.spec}) on the PIL path needs timm, which is not installed: {INSTALL_HINT}"
        ) from e
    from PIL import Image

    mean = NORMALIZATIONS[normalization][0]
    hparams = dict(
        translate_const=int(image_size * TRANSLATE_PCT),
        img_mean=tuple(min(255, round(255 * x)) for x in mean),
        interpolation=Image.Resampling.BICUBIC,
    )
    return rand_augment_transform(spec.spec, hparams)


class ClassificationLoader(LoaderBase):
    """What both classification loaders share: the source, its validation, the transforms' options. ``files``
    holds the names of the usable samples (positions ``positions`` of the source)."""

    def __init__(
        self,
        source: ClassificationSource,
        batch_size: int,
        *,
        train: bool,
        image_size: int,
        num_threads: int,
        seed: int,
        shard_id: int | None,
        num_shards: int | None,
        normalization: str,
        rand_augment: str | None,
        crop_pct: float | None,
        on_bad_file: str,
        validate: bool,
        max_pixels: int | None,
        pin_memory: bool,
        repeated_aug: int = 1,
    ):
        if not isinstance(source, ClassificationSource):
            raise TypeError(f"source must be a ClassificationSource, got {type(source).__name__}")
        if image_size <= 32:
            raise ValueError(
                f"image_size={image_size}: sizes of 32 px and below (the official code's no-resize branch) are not "
                "supported; fine-tune at 48 px or more (BEiT fine-tunes CIFAR-100 at 224)"
            )
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
        _check_repeated_aug(repeated_aug, train)
        self.repeated_aug = int(repeated_aug)
        self.train = bool(train)
        self.normalization = normalization
        self.image_size = image_size
        self.rand_augment = RandAugmentSpec.parse(rand_augment) if (rand_augment and self.train) else None
        self._check_backend()  # a missing dependency fails before the source is validated
        self.crop_pct = default_crop_pct(image_size) if crop_pct is None else float(crop_pct)
        self.resize_size = eval_resize_size(image_size, self.crop_pct)
        super().__init__(
            source,
            batch_size,
            num_threads=num_threads,
            seed=seed,
            shard_id=shard_id,
            num_shards=num_shards,
            image_size=image_size,
            tokenizer_size=image_size,  # no tokenizer view here
            output_dtype="float32",
            normalization=normalization,
            on_bad_file=on_bad_file,
            masking=None,
            shuffle=self.train,
            validate=validate,
            max_pixels=max_pixels,
        )
        self.pin_memory = pin_memory
        self.classes = list(source.classes)
        self.num_classes = source.num_classes

    def _check_backend(self) -> None:
        """Raise when this backend cannot apply the requested transforms (called before any work)."""

    @property
    def num_samples(self) -> int:
        """The usable samples: without repeated augmentation, the valid entries of one epoch over all ranks."""
        return len(self.files)


def _check_repeated_aug(repeated_aug, train: bool) -> None:
    if isinstance(repeated_aug, bool) or not isinstance(repeated_aug, (int, np.integer)) or repeated_aug < 1:
        raise ValueError(f"repeated_aug must be a positive integer (1: off), got {repeated_aug!r}")
    if repeated_aug > 1 and not train:
        raise ValueError(
            f"repeated_aug={repeated_aug} is for training: evaluation must see every sample exactly once "
            "(pass repeated_aug=1 for evaluation loaders)"
        )


# ---------------------------------------------------------------------------------------------------- PIL


class _PilEpoch(EpochDataset):
    """One rank's epoch from slot ``start`` on with the training or evaluation transforms; slot ``j`` draws its
    randomness from (seed, j)."""

    def __getitem__(self, j: int) -> dict:
        from PIL import Image

        ld = self.loader
        j += self.start
        i, valid, img, failure = self._open(j)
        if ld.train:
            rng = np.random.default_rng(mix_seeds(self.seed, j))
            box = random_resized_crop_box(img.width, img.height, rng)
            img = resized_crop(img, box, ld.image_size, Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if ld.rand_augment_transform is not None:
                img = _seeded(ld.rand_augment_transform, img, mix_seeds(self.seed, j, 0x2A))
        else:
            img = resize_center_crop(img, ld.image_size, ld.crop_pct)
        pos = int(ld.positions[i])
        return {
            "images": normalize(torch.from_numpy(np.asarray(img).copy()), ld.normalization),
            "labels": torch.tensor(int(ld.source.labels[pos]), dtype=torch.int64),
            "index": torch.tensor(pos, dtype=torch.int64),
            "valid": torch.tensor(valid),
            "decode_failure": failure,
        }


def _seeded(transform, img, seed: int):
    """``transform(img)`` with Python's and numpy's global generators (timm's RandAugment draws from both) seeded
    by ``seed``, and restored afterwards: the caller's own draws are unaffected."""
    state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 (timm draws from the legacy global)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    try:
        return transform(img)
    finally:
        random.setstate(state)
        np.random.set_state(np_state)  # noqa: NPY002


class PilClassificationLoader(ClassificationLoader):
    """The transforms with PIL (and timm's RandAugment) in a torch DataLoader: ``num_threads`` worker processes,
    in-process when it is 1."""

    backend = "pil"

    def __init__(self, source, batch_size: int, **kw):
        self.rand_augment_transform = None
        super().__init__(source, batch_size, **kw)
        self.device = "cpu"

    def _check_backend(self) -> None:
        if self.rand_augment is not None:
            self.rand_augment_transform = _timm_rand_augment(self.rand_augment, self.image_size, self.normalization)

    def _iterate(self, step: int) -> Iterator[dict]:
        order, valid = self._this_epoch()
        ds = _PilEpoch(self, order, valid, self._epoch_seed(), start=step * self.batch_size)
        yield from self._dataloader_batches(ds)


# ---------------------------------------------------------------------------------------------------- DALI


def _dali_pipeline(loader: DaliClassificationLoader, positions: np.ndarray, codes: np.ndarray, seed: int):
    """The pipeline over the samples ``positions`` (source positions) in order; ``codes`` carry each sample's loader
    file index, -(index + 1) for padding, through the pipeline."""
    require_dali()
    from nvidia.dali import fn, types

    gpu = loader.device == "gpu"
    kind = loader.source.kind
    s = loader.image_size
    mean, std = NORMALIZATIONS[loader.normalization]
    ra = loader.rand_augment
    op_seed = op_seeds(seed)

    # RandAugment selects its operations with conditionals.
    @pipeline_def(loader, seed, enable_conditionals=ra is not None)
    def pipe():
        data, code = sample_input(fn, loader.source, positions, codes, loader.batch_size)
        decoder = "mixed" if gpu else "cpu"
        if not loader.train:  # evaluation's geometry, from the host-side samples (operator arguments live there)
            shape = (fn.shapes if kind == "pixels" else fn.peek_image_shape)(data, dtype=types.INT64)
        if kind == "pixels" and gpu:
            data = data.gpu()
        norm = dict(mean=[255 * m for m in mean], std=[255 * v for v in std], dtype=types.FLOAT, output_layout="CHW")
        if loader.train:
            crop = dict(random_area=list(CROP_SCALE), random_aspect_ratio=list(CROP_RATIO), num_attempts=10)
            if kind == "pixels":
                images = fn.random_resized_crop(
                    data, size=[s, s], interp_type=types.INTERP_CUBIC, antialias=True, seed=op_seed(1), **crop
                )
            else:
                # The box decoded alone (ROI decode), then resized; uint8 out, as PIL's resize gives.
                images = fn.decoders.image_random_crop(
                    data, device=decoder, output_type=types.RGB, seed=op_seed(1), **crop
                )
                images = fn.resize(images, size=[s, s], interp_type=types.INTERP_CUBIC, antialias=True)
            if ra is not None:
                fill = int(round(255 * sum(mean) / 3))  # one grey level: DALI's warps take no fill colour
                images = _dali_rand_augment(fn, types, images, ra, s, fill, op_seed)
            # The flip comes after RandAugment here, in the normalising pass, where timm flips before it: the same
            # distribution, since every geometric operation's sign is drawn at random and colour operations
            # commute with a flip.
            flip = fn.random.coin_flip(probability=0.5, seed=op_seed(2))
            out = fn.crop_mirror_normalize(images, mirror=flip, **norm)
        else:
            # torchvision's geometry in integers, from each image's shape (before decoding): DALI's own
            # resize_shorter rounds the longer side and its centre crop rounds offsets half up, each a pixel off.
            (height, width), (top, left) = _eval_geometry(fn, types, shape, loader.resize_size, s)
            images = data if kind == "pixels" else fn.decoders.image(data, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_x=width, resize_y=height, interp_type=types.INTERP_CUBIC, antialias=True)
            start = fn.cast(fn.stack(top, left), dtype=types.INT32)
            out = fn.crop_mirror_normalize(fn.slice(images, start=start, shape=[s, s], axis_names="HW"), **norm)
        if gpu:
            code = code.gpu()
        return out, code

    with _quiet_dali_deprecations():
        p = pipe()
        p.build()
    return p


@contextlib.contextmanager
def _quiet_dali_deprecations():
    """Drop DALI's deprecation warnings (RandAugment's suite calls operators by their old experimental names, four
    warnings a build). DALI issues them under its own ``simplefilter("default")``, which overrides any filter of
    ours, so they are dropped where they are shown; every other warning is shown as before."""
    show = warnings.showwarning

    def filtered(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeprecationWarning) and "is now deprecated" in str(message):
            return
        show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores showwarning on exit
        warnings.showwarning = filtered
        yield


def timm_rand_augment_suite(increasing: bool) -> list:
    """timm's RandAugment operations (``_RAND_INCREASING_TRANSFORMS`` for inc1, ``_RAND_TRANSFORMS`` for inc0), in
    timm's order, as DALI augmentations with timm's magnitude ranges: AutoContrast, Equalize, Invert, Rotate
    (30 degrees), Posterize (inc1: 4 down to 0 bits kept, DALI keeping at least 1; inc0: 0 up to 4), Solarize
    (inc1: threshold 256 down to 0; inc0: up), SolarizeAdd (up to 110), Color, Contrast, Brightness, Sharpness
    (inc1: factor 1 +- 0.9 M/10, sign drawn; inc0: 0.1 + 1.8 M/10), ShearX/Y (0.3, sign drawn), TranslateX/YRel
    (45 % of the size, sign drawn). DALI's own suites differ: an Identity operation, no Invert or SolarizeAdd,
    and posterize keeping 8 down to 4 bits."""
    from nvidia.dali.auto_aug import augmentations as a

    if increasing:
        posterize = a.posterize.augmentation((4, 0), False, a.poster_mask_uint8)
        solarize = a.solarize.augmentation((256, 0))
        enhance = [op.augmentation((0, 0.9), True, a.shift_enhance_range) for op in (a.color, a.contrast, a.brightness)]
        sharpness = a.sharpness.augmentation((0, 0.9), True, a.sharpness_kernel)
    else:
        posterize = a.posterize.augmentation((0, 4), False, a.poster_mask_uint8)
        solarize = a.solarize.augmentation((0, 256))
        enhance = [op.augmentation((0.1, 1.9), False, None) for op in (a.color, a.contrast, a.brightness)]
        sharpness = a.sharpness.augmentation((0.1, 1.9), False, a.sharpness_kernel_shifted)
    return [
        a.auto_contrast,
        a.equalize,
        a.invert,
        a.rotate.augmentation((0, 30), True),
        posterize,
        solarize,
        a.solarize_add.augmentation((0, 110)),
        *enhance,
        sharpness,
        a.shear_x.augmentation((0, 0.3), True),
        a.shear_y.augmentation((0, 0.3), True),
        a.translate_x.augmentation((0, TRANSLATE_PCT), True),
        a.translate_y.augmentation((0, TRANSLATE_PCT), True),
    ]


def _dali_rand_augment(fn, types, images, ra: RandAugmentSpec, size: int, fill: int, op_seed):
    """timm's RandAugment with DALI's operations: ``ra.num_ops`` layers, each applying with probability 0.5 (timm's
    per-operation probability) one operation drawn uniformly, with replacement, from
    ``timm_rand_augment_suite`` at magnitude M (DALI's ``apply_rand_augment``: bin 10 M of 101). Warps are
    bilinear (DALI's warps offer no bicubic) and fill with one grey level. Called inside a pipeline with
    conditionals enabled."""
    from nvidia.dali.auto_aug.rand_augment import apply_rand_augment

    suite = timm_rand_augment_suite(ra.increasing)
    for layer in range(ra.num_ops):
        if fn.random.coin_flip(probability=0.5, seed=op_seed(10 + 2 * layer)):
            images = apply_rand_augment(
                suite,
                images,
                1,
                ra.dali_bin,
                num_magnitude_bins=DALI_MAGNITUDE_BINS,
                seed=op_seed(11 + 2 * layer),
                shape=[size, size],
                fill_value=fill,
                interp_type=types.INTERP_LINEAR,
            )
    return images


def _eval_geometry(fn, types, shape, size: int, crop: int):
    """DALI nodes for the evaluation transform's sizes and crop offsets from an image's [H, W, C] int64 ``shape``,
    exactly as ``resize_center_crop`` computes them: ((new height, new width) float, (top, left) int64)."""
    import nvidia.dali.math as dmath

    h, w = shape[0], shape[1]
    portrait = fn.cast(w <= h, dtype=types.INT64)
    long = (size * dmath.max(h, w)) // dmath.min(h, w)  # int(size * long / short), in integers
    new_w = portrait * size + (1 - portrait) * long
    new_h = portrait * long + (1 - portrait) * size

    def half_to_even(d):  # Python's round(d / 2) for d >= 0
        k = d // 2
        return k + (d - 2 * k) * (k - 2 * (k // 2))

    sizes = (fn.cast(new_h, dtype=types.FLOAT), fn.cast(new_w, dtype=types.FLOAT))
    return sizes, (half_to_even(new_h - crop), half_to_even(new_w - crop))


class DaliClassificationLoader(ClassificationLoader):
    """The DALI pipeline over a classification source: file sources through DALI's file reader, tar shards
    (encoded bytes) and CIFAR (pixels) through an external source that reads them in the epoch's order."""

    backend = "dali"

    def __init__(self, source, batch_size: int, *, device: str = "gpu", segment_batches: int | None = None, **kw):
        require_dali()
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("device='gpu' needs CUDA; use device='cpu' on this machine")
        if segment_batches is not None and segment_batches <= 0:
            raise ValueError(f"segment_batches must be positive or None, got {segment_batches}")
        super().__init__(source, batch_size, **kw)
        self.device = device
        self.pin_memory = self.pin_memory and device == "cpu"
        self.segment_batches = segment_batches
        out = torch.device("cuda", torch.cuda.current_device()) if device == "gpu" else torch.device("cpu")
        self._positions_t = torch.from_numpy(self.positions).to(out)
        self._labels_t = torch.from_numpy(self.source.labels).to(out)

    def _stretch(self, order: np.ndarray, valid: np.ndarray, lo: int, hi: int, seed: int) -> Iterator[dict]:
        """Batches ``lo`` to ``hi`` (exclusive) of the epoch from one pipeline seeded with ``seed``."""
        b = self.batch_size
        sel, ok = order[lo * b : hi * b], valid[lo * b : hi * b]
        pipe = _dali_pipeline(self, self.positions[sel], sample_codes(sel, ok), seed)
        for out in pipeline_batches(pipe, ["images", "code"], self.source):
            index = self._positions_t[out["index"]]
            batch = {"images": out["images"], "labels": self._labels_t[index], "index": index, "valid": out["valid"]}
            if self.pin_memory:  # a copy from pageable memory to a GPU makes the host wait for it
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yield batch

    def _iterate(self, step: int) -> Iterator[dict]:
        order, valid = self._this_epoch()
        n = len(self)
        # Training: fixed segments, each its own pipeline and seed, so that any start gives the same batches.
        # Evaluation draws nothing at random: one pipeline from the start step.
        seg = (self.segment_batches or n) if self.train else n
        while step < n:
            lo = (step // seg) * seg if self.train else step
            hi = min(lo + seg, n)
            try:
                for k, batch in enumerate(self._stretch(order, valid, lo, hi, self._epoch_seed(lo)), start=lo):
                    if k < step:
                        continue  # before the resume point: drawn so that the later batches keep their draws
                    yield batch
                    step = k + 1
            except RuntimeError as e:
                self._on_decode_failure(e, order, valid, step)  # the stretch then runs again from its start


# ---------------------------------------------------------------------------------------------------- entry point


def build_classification_loader(
    source,
    batch_size: int,
    *,
    train: bool,
    image_size: int = 224,
    backend: str = "auto",
    device: str = "cpu",
    num_threads: int = 4,
    seed: int = 0,
    shard_id: int | None = None,
    num_shards: int | None = None,
    normalization: str = "inception",
    rand_augment: str | None = DEFAULT_RAND_AUGMENT,
    crop_pct: float | None = None,
    on_bad_file: str = "skip",
    pin_memory: bool = False,
    validate: bool = True,
    max_pixels: int | None = MAX_PIXELS,
    classes: Sequence[str] | int | None = None,
    val_fraction: float | None = None,
    segment_batches: int | None = None,
    repeated_aug: int = 1,
) -> ClassificationLoader:
    """A fine-tuning (``train=True``) or evaluation loader: an iterable of batch dicts (see the module docstring)
    with ``len()`` steps per epoch, ``set_epoch(e)``, ``iter_from(k)``, ``num_classes``, ``classes``,
    ``num_samples`` and ``bad_files``.

    ``source``: a ``ClassificationSource``, or a path or shard spec opened with ``open_classification_source``
    (the "train" split for training, "val" for evaluation; ``classes``, ``val_fraction`` and ``seed`` go to it).
    ``backend``: "dali" (``device`` "gpu": mixed decoding and augmentation on the GPU; "cpu": the same graph on
    the CPU), "pil", or "auto" (``loader.resolve_backend``: DALI when it can be imported or ``device`` is "gpu",
    else the PIL loader with a warning). ``normalization``: "inception" (mean = std = 0.5,
    BEiT's fine-tuning default) or "imagenet". ``rand_augment``: timm's spec string, or None; training only.
    ``crop_pct``: evaluation's crop fraction (default 0.875 below 384 px, 1.0 from 384 px). ``shard_id`` /
    ``num_shards`` default to torch.distributed's rank and world size when it is initialised. ``on_bad_file``,
    ``validate``, ``max_pixels``, ``pin_memory``: as ``beit.data.build_loader``. ``segment_batches``: DALI
    training's pipeline length in batches (None: one pipeline per epoch; see the module docstring).
    ``repeated_aug``: repeated augmentation's k (1: off; training only, evaluation refuses more): each epoch keeps
    ``num_samples // (batch_size * num_shards)`` steps of the permutation with every sample repeated k times in a
    row, dealt round-robin over the ranks (DeiT's RASampler; see the module docstring). It needs at least
    ``batch_size * num_shards`` usable samples.
    """
    backend = resolve_backend(backend, device, "pil")
    _check_repeated_aug(repeated_aug, train)
    if rand_augment is not None and train:
        spec = RandAugmentSpec.parse(rand_augment)  # a bad spec fails before any listing
        if backend == "pil":
            _timm_rand_augment(spec, image_size, normalization)  # timm missing fails before any listing
    if not isinstance(source, ClassificationSource):
        source = open_classification_source(
            source, "train" if train else "val", classes=classes, val_fraction=val_fraction, seed=seed,
            num_threads=num_threads,
        )  # fmt: skip
    kw = dict(
        train=train,
        image_size=image_size,
        num_threads=num_threads,
        seed=seed,
        shard_id=shard_id,
        num_shards=num_shards,
        normalization=normalization,
        rand_augment=rand_augment,
        crop_pct=crop_pct,
        on_bad_file=on_bad_file,
        validate=validate,
        max_pixels=max_pixels,
        pin_memory=pin_memory,
        repeated_aug=repeated_aug,
    )
    if backend == "pil":
        return PilClassificationLoader(source, batch_size, **kw)
    return DaliClassificationLoader(source, batch_size, device=device, segment_batches=segment_batches, **kw)
