"""BEiT pretraining data: a DALI pipeline for the two views and the masks, a PyTorch/PIL reference loader, and a
synthetic data set.

Per sample, both loaders produce the official BEiT augmentation (unilm ``beit/datasets.py``):
    one RandomResizedCrop box (scale 0.08-1, ratio 3/4-4/3), horizontal flip p=0.5, ColorJitter(0.4, 0.4, 0.4)
    images            the box resized to ``image_size`` bicubic, normalised (ImageNet or Inception mean/std),
                      [B, 3, S, S] float, or [B, S, S, 3] uint8 with ``output_dtype="uint8"``
    tokenizer_images  the same box resized to ``tokenizer_size`` Lanczos, DALL-E ``map_pixels``: [0, 1] -> [0.1, 0.9],
                      [B, 3, T, T] float32
    bool_masked_pos   [B, N] bool blockwise mask (``beit.masking`` algorithm), N = masking grid cells (196)
    mask_index        [B, K] int64 masked positions, ascending, -1 padding, K = ``num_masking_patches`` (75)
    index, valid      [B] int64 position of the file in ``loader.files`` and [B] bool, False for padding samples,
                      whose mask is empty (no masked patch, ``mask_index`` all -1) so that no loss counts them: each
                      file weighs once per epoch, though a batch stays full for static shapes

``build_loader`` returns the DALI loader (``device="gpu"``: nvJPEG / hardware decode and GPU augmentation) or, on
``device="cpu"`` without DALI or with ``backend="reference"``, the reference loader. Both share the file list, the
validation of bad files and the per-epoch, per-rank sample order, so they see the same files in the same order.

Sharding: every epoch draws one permutation of all files (seeded by ``seed`` and the epoch, the same on every
rank), pads it by repeating its first files to a multiple of ``num_shards * batch_size`` and deals it out
round-robin, so each file is seen exactly once per epoch across ranks and every rank takes ``len(loader)`` steps.
The augmentation and mask seeds depend on (seed, rank, epoch): ranks differ, and an epoch is reproducible on its
own (``set_epoch(3)`` on a fresh loader gives the batches of epoch 3 of an uninterrupted run), because the DALI
pipeline is rebuilt per epoch (a fraction of a second on the CPU; not yet timed on a GPU).

The native DALI operators (``csrc/dali_ops``, built by the top-level ``CMakeLists.txt`` on first use into
``~/.cache/beit`` unless ``beit/_native/libbeit_dali_ops.so`` was installed; ``BEIT_NO_DALI_PLUGIN=1`` opts out,
``BEIT_DALI_PLUGIN=/path/lib.so`` uses a prebuilt one) draw
the masks inside the pipeline and, on the CPU, fuse colour jitter, flip and normalisation into one pass; without
them, the Python ``MaskingGenerator`` feeds the masks through an external source and DALI's own operators do the
colour work.

``beit-make-synthetic OUT --num-images N --classes C`` writes a procedurally generated ImageFolder (``main``).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from beit.masking import MaskingGenerator, mask_to_index

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": (INCEPTION_MEAN, INCEPTION_STD)}
LOGIT_LAPLACE_EPS = 0.1  # DALL-E map_pixels: x -> (1 - 2 eps) x + eps
OUTPUT_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.4  # brightness, contrast and saturation factors ~ U(1 - 0.4, 1 + 0.4), as torchvision's ColorJitter
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, what PIL's convert("L") and torchvision use

# DALI decodes these (checked with nvidia-dali 2.4: GIF is not decodable, TIFF not tested); the reference loader
# is held to the same set so both loaders see the same files.
SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

PLUGIN_ENV_DISABLE = "BEIT_NO_DALI_PLUGIN"
PLUGIN_ENV_PATH = "BEIT_DALI_PLUGIN"
CACHE_ENV = "BEIT_CACHE_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent


class BadImageError(RuntimeError):
    """An image file that cannot be read or decoded (the message names it)."""


# --------------------------------------------------------------------------------------------------------------
# Files: discovery, validation, per-epoch order
# --------------------------------------------------------------------------------------------------------------


def list_images(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The image files of an ImageFolder (class subfolders, labels ignored) or flat folder, searched recursively and
    sorted; of a text file list (one path per line, relative paths taken from the list's folder, ``#`` comments);
    or of a Python sequence of paths. Files with a non-image extension in folders are included so that validation
    reports them rather than silently dropping them, except hidden files."""
    if isinstance(source, (list, tuple)):
        files = [os.fspath(p) for p in source]
        if not files:
            raise ValueError("the file list is empty")
        return files
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {str(path)!r} does not exist")
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        files = [str(p if Path(p).is_absolute() else path.parent / p) for p in lines if p and not p.startswith("#")]
        if not files:
            raise ValueError(f"file list {str(path)!r} names no files")
        return files
    files = sorted(
        str(p)
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise ValueError(f"data folder {str(path)!r} holds no files")
    return files


def _sniff(head: bytes) -> str | None:
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def check_image(path: str) -> str | None:
    """Why ``path`` cannot be used, or None when it looks decodable.

    Cheap (a few KiB read per file): the signature, the header as PIL parses it, and the end-of-image marker of
    JPEG and PNG files, which is what truncation removes. A file corrupted in the middle passes; the loaders then
    name it when decoding fails."""
    from PIL import Image

    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            fmt = _sniff(head)
            if fmt is None:
                return "not an image (unknown file signature)"
            if fmt not in SUPPORTED_FORMATS:
                return f"unsupported image format {fmt} (supported: {', '.join(SUPPORTED_FORMATS)})"
            f.seek(max(0, size - 4096))
            tail = f.read()
        # Decoders tolerate bytes after the end marker, so look for it near the end rather than at the very end.
        if fmt == "JPEG" and b"\xff\xd9" not in tail:
            return "truncated JPEG (no end-of-image marker)"
        if fmt == "PNG" and b"IEND" not in tail[-64:]:
            return "truncated PNG (no IEND chunk)"
        with Image.open(path) as im:
            w, h = im.size
        if w < 1 or h < 1:
            return f"degenerate size {w}x{h}"
    except OSError as e:
        return f"unreadable ({type(e).__name__}: {e})"
    except Exception as e:  # PIL raises assorted types on garbage headers; any of them means "bad file"
        return f"bad image header ({type(e).__name__}: {e})"
    return None


def validate_images(
    files: Sequence[str], on_bad_file: str = "skip", num_threads: int = 4
) -> tuple[list[str], list[tuple[str, str]]]:
    """Split ``files`` into usable files and (file, reason) pairs. ``on_bad_file="error"`` raises on the first bad
    file (in list order), naming it; ``"skip"`` warns once, naming the files. An empty result is an error."""
    if on_bad_file not in ("skip", "error"):
        raise ValueError(f"on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        reasons = list(pool.map(check_image, files, chunksize=256))
    bad = [(f, r) for f, r in zip(files, reasons) if r is not None]
    if bad and on_bad_file == "error":
        f, r = bad[0]
        more = f" (and {len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise BadImageError(f"bad image file {f}: {r}{more}; pass on_bad_file='skip' to leave such files out")
    if bad:
        shown = "; ".join(f"{f}: {r}" for f, r in bad[:20])
        more = f"; ... and {len(bad) - 20} more (loader.bad_files lists all)" if len(bad) > 20 else ""
        warnings.warn(
            f"skipping {len(bad)} of {len(files)} files that cannot be decoded: {shown}{more}", stacklevel=5
        )  # the caller of build_loader
    good = [f for f, r in zip(files, reasons) if r is None]
    if not good:
        raise ValueError(f"no decodable images among {len(files)} files (first: {files[0]})")
    return good, bad


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms, unlike hash())."""
    digest = hashlib.blake2b(b",".join(str(int(v)).encode() for v in values), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_order(
    num_files: int, batch_size: int, *, epoch: int, seed: int, shard_id: int, num_shards: int, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """This rank's samples for one epoch: file indices [steps * batch_size] int64 and a validity flag (False for the
    padding that evens out the ranks). Across ranks, the valid entries are a permutation of range(num_files)."""
    if num_files <= 0:
        raise ValueError("no files to order")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} must lie in [0, num_shards={num_shards})")
    perm = np.random.default_rng(_mix(seed, epoch, 0x5EED)).permutation(num_files) if shuffle else np.arange(num_files)
    per_step = batch_size * num_shards
    steps = -(-num_files // per_step)
    pad = steps * per_step - num_files
    # Padding repeats the first files of the permutation (np.resize cycles when pad exceeds num_files).
    order = np.concatenate([perm, np.resize(perm, pad)]).astype(np.int64)
    valid = np.arange(order.size) < num_files
    return order[shard_id::num_shards], valid[shard_id::num_shards]


def _empty_padding_masks(batch: dict) -> None:
    """Empty the masks of the padding samples (``valid`` False; the dict's entries are replaced): no masked patch,
    no loss term."""
    pad = (~batch["valid"]).to(batch["bool_masked_pos"].device)[:, None]  # [B, 1]
    batch["bool_masked_pos"] = batch["bool_masked_pos"] & ~pad
    batch["mask_index"] = batch["mask_index"].masked_fill(pad.to(batch["mask_index"].device), -1)


def _resolve_shards(shard_id: int | None, num_shards: int | None) -> tuple[int, int]:
    if shard_id is None or num_shards is None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        shard_id = shard_id if shard_id is not None else (dist.get_rank() if initialised else 0)
        num_shards = num_shards if num_shards is not None else (dist.get_world_size() if initialised else 1)
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
    return shard_id, num_shards


def _mask_config(masking: dict | None) -> dict:
    cfg = dict(input_size=14, num_masking_patches=75, min_num_patches=16, max_num_patches=None, min_aspect=0.3)
    cfg.update(masking or {})
    unknown = set(cfg) - {"input_size", "num_masking_patches", "min_num_patches", "max_num_patches", "min_aspect"}
    if unknown:
        raise ValueError(f"unknown masking options {sorted(unknown)}")
    MaskingGenerator(**cfg)  # validates the configuration before any work
    return cfg


class _LoaderBase:
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
        if image_size <= 0 or tokenizer_size <= 0:
            raise ValueError(f"image sizes must be positive, got {image_size} and {tokenizer_size}")
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.seed = seed
        self.shard_id, self.num_shards = _resolve_shards(shard_id, num_shards)
        self.image_size = image_size
        self.tokenizer_size = tokenizer_size
        self.output_dtype = output_dtype
        self.normalization = normalization
        self.on_bad_file = on_bad_file
        self.mask_cfg = _mask_config(masking)
        self.shuffle = shuffle
        files = list_images(data_dir)
        if validate:
            self.files, self.bad_files = validate_images(files, on_bad_file, num_threads)
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
        return _mix(self.seed, self.shard_id, self.epoch, *extra)

    def _skip_runtime_failure(self, path: str, reason: str) -> None:
        self.bad_files.append((path, reason))
        self._failed.add(self._index[path])
        warnings.warn(f"skipping a file that failed to decode: {path}: {reason}", stacklevel=4)


# --------------------------------------------------------------------------------------------------------------
# Native operators (masks, fused colour): build on first use, load, or fall back
# --------------------------------------------------------------------------------------------------------------

_PLUGIN_STATE: dict = {}


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "beit")


def _dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "NVIDIA DALI is not installed: pip install nvidia-dali-cuda130 (CUDA 13) or nvidia-dali-cuda120, "
            "or use the reference loader (build_loader(..., device='cpu', backend='reference'))"
        ) from e
    import nvidia.dali as dali

    return dali


def build_dali_plugin(cache_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Build the DALI operator plugin (``fn.beit_mask_generator``, ``fn.beit_color_normalize``) with CMake into
    ``cache_dir`` (default ``~/.cache/beit/dali_plugin/<key>``, the key covering the sources and the DALI version)
    and return the library's path. Raises with the build log's tail on failure."""
    dali = _dali()
    src_dir = REPO_ROOT / "csrc" / "dali_ops"
    sources = sorted(src_dir.glob("*.cc"))
    cmake_lists = REPO_ROOT / "CMakeLists.txt"
    if not sources or not cmake_lists.exists():
        raise FileNotFoundError(f"plugin sources not found next to the package ({src_dir}, {cmake_lists})")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise FileNotFoundError("cmake is not on PATH")
    blob = b"".join(f.read_bytes() for f in [*sources, cmake_lists]) + dali.__version__.encode()
    key = hashlib.sha256(blob).hexdigest()[:16]
    out = Path(cache_dir) if cache_dir is not None else _cache_dir() / "dali_plugin" / key
    lib = out / "libbeit_dali_ops.so"
    if lib.exists() and not force:
        return lib
    out.mkdir(parents=True, exist_ok=True)
    # Ranks of one job start together: one builds, the others wait on the lock and find the library.
    with open(out / ".lock", "w") as lock:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists() and not force:
            return lib
        build = out / "build"
        cmds = [
            [cmake, "-S", str(REPO_ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
             f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}"],
            [cmake, "--build", str(build), "--target", "beit_dali_ops", "-j", str(min(4, os.cpu_count() or 1))],
        ]  # fmt: skip
        for cmd in cmds:
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                log = (res.stdout + res.stderr).strip().splitlines()[-15:]
                raise RuntimeError(f"building the DALI mask plugin failed ({' '.join(cmd)}):\n" + "\n".join(log))
        if not lib.exists():
            raise RuntimeError(f"the plugin build finished but {lib} is missing")
    return lib


def load_dali_plugin() -> bool:
    """Load the native operators once per process: True when ``fn.beit_mask_generator`` and
    ``fn.beit_color_normalize`` are available. Where they cannot be built or loaded, warns once (one line) and
    returns False: the Python mask generator and DALI's own colour operators take over."""
    if "loaded" in _PLUGIN_STATE:
        return _PLUGIN_STATE["loaded"]
    if os.environ.get(PLUGIN_ENV_DISABLE, "0") not in ("", "0"):
        _PLUGIN_STATE["loaded"] = False
        return False
    try:
        from nvidia.dali import plugin_manager

        # A library that an install step placed in the package is used as is; otherwise build from the sources.
        packaged = Path(__file__).resolve().parent / "_native" / "libbeit_dali_ops.so"
        lib = os.environ.get(PLUGIN_ENV_PATH) or (packaged if packaged.exists() else build_dali_plugin())
        plugin_manager.load_library(str(lib))
        from nvidia.dali import fn

        missing = [op for op in ("beit_mask_generator", "beit_color_normalize") if not hasattr(fn, op)]
        if missing:
            raise RuntimeError(f"{lib} lacks the operators {missing} (a stale build?)")
        _PLUGIN_STATE["loaded"], _PLUGIN_STATE["path"] = True, str(lib)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"DALI plugin unavailable ({first}); masks come from the Python generator, colour ops from DALI's own",
            stacklevel=4,
        )
        _PLUGIN_STATE["loaded"] = False
    return _PLUGIN_STATE["loaded"]


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
    dali = _dali()
    from nvidia.dali import fn

    cfg = _mask_config(masking)
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


# --------------------------------------------------------------------------------------------------------------
# DALI loader
# --------------------------------------------------------------------------------------------------------------


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
    dali = _dali()
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    gpu = loader.device == "gpu"
    mean, std = NORMALIZATIONS[loader.normalization]
    eps = LOGIT_LAPLACE_EPS

    def op_seed(k: int) -> int:
        # Explicit per-operator seeds: DALI's automatic ones depend on how many operators precede each.
        return _mix(seed, k) % 2**31

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
        # uint8 out, as PIL's resizes give (overshoot clipped); float resizes cost a third more on the CPU.
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
        masks, index = _mask_nodes(fn, loader.mask_cfg, loader.batch_size, _mix(seed, 0x3A5C), loader.native_masks)
        if gpu:
            masks, index, label = masks.gpu(), index.gpu(), label.gpu()
        return images, tok, masks, index, label

    p = pipe()
    p.build()
    return p


class DaliLoader(_LoaderBase):
    """The DALI pipeline as an iterable of batch dicts (see the module docstring); ``build_loader`` makes one."""

    OUTPUTS = ("images", "tokenizer_images", "bool_masked_pos", "mask_index", "label")

    def __init__(self, data_dir, batch_size: int, *, device: str = "gpu", pin_memory: bool = False, **kw):
        _dali()
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
                culprits = _find_undecodable([self.files[i] for i in dict.fromkeys(window.tolist())])
                if not culprits or self.on_bad_file == "error":
                    names = "; ".join(f"{f}: {r}" for f, r in culprits) or "could not tell which file: " + str(e)
                    raise BadImageError(f"decoding failed: {names}") from e
                for f, r in culprits:
                    self._skip_runtime_failure(f, r)
                # Rebuild from this step with the same step count: the bad files' slots become padding.
                self._replace(order, valid, self._failed, step * self.batch_size)
                restart += 1


def _find_undecodable(files: Sequence[str]) -> list[tuple[str, str]]:
    from PIL import Image

    bad = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.convert("RGB").load()
        except Exception as e:  # any decoder error names a bad file
            bad.append((f, f"{type(e).__name__}: {e}"))
    return bad


# --------------------------------------------------------------------------------------------------------------
# Reference loader: PIL + torch DataLoader, the official transforms
# --------------------------------------------------------------------------------------------------------------


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


def color_jitter(img, rng: np.random.Generator, strength: float = JITTER):
    """torchvision's ColorJitter(strength, strength, strength) on a PIL image: factors ~ U(1 - s, 1 + s) applied
    in a random order."""
    from PIL import ImageEnhance

    factors = rng.uniform(1 - strength, 1 + strength, size=3)
    ops = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for k in rng.permutation(3):
        img = ops[k](img).enhance(float(factors[k]))
    return img


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
                return i, bool(self.valid[j]), im.convert("RGB"), ""
        except Exception as e:
            report = f"{files[i]}\0{type(e).__name__}: {e}"
            if self.loader.on_bad_file == "error":
                raise BadImageError(f"decoding failed: {files[i]}: {type(e).__name__}: {e}") from e
            # Keep the batch full: the next file takes the slot as padding. The report travels with the sample
            # because warnings raised in DataLoader workers never reach the main process.
            for k in range(1, len(files)):
                try:
                    with Image.open(files[(i + k) % len(files)]) as im:
                        return (i + k) % len(files), False, im.convert("RGB"), report
                except Exception:  # another bad file: try the next one
                    continue
            raise BadImageError(f"no file of the data set decodes (first failure: {files[i]}: {e})") from e

    def __getitem__(self, j: int) -> dict:
        from PIL import Image

        ld = self.loader
        j += self.start
        rng = np.random.default_rng(_mix(self.seed, j))
        i, valid, img, failure = self._open(j)
        # The official order: jitter the full image, flip, then one box resized twice.
        img = color_jitter(img, rng)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        top, left, h, w = random_resized_crop_box(img.width, img.height, rng)
        # Crop, then resize (torchvision's resized_crop): resize(box=...) would let the filter reach past the box.
        img = img.crop((left, top, left + w, top + h))
        big = img.resize((ld.image_size, ld.image_size), Image.Resampling.BICUBIC)
        small = img.resize((ld.tokenizer_size, ld.tokenizer_size), Image.Resampling.LANCZOS)
        big = torch.from_numpy(np.asarray(big).copy())  # [S, S, 3] uint8
        if ld.output_dtype != "uint8":
            big = big.permute(2, 0, 1).float().div_(255)  # HWC -> CHW
            big = ((big - self.mean) / self.std).to(OUTPUT_DTYPES[ld.output_dtype])
        small = torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).float().div_(255)
        small = small * (1 - 2 * LOGIT_LAPLACE_EPS) + LOGIT_LAPLACE_EPS
        mask = MaskingGenerator(**ld.mask_cfg, rng=random.Random(_mix(self.seed, j, 0x3A5C)))()
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


class ReferenceLoader(_LoaderBase):
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
            for batch in batches:
                for report in batch.pop("decode_failure"):
                    if report:
                        path, reason = report.split("\0", 1)
                        self._skip_runtime_failure(path, reason)
                yield batch
        finally:
            # Stop the workers when the epoch ends, by an error too. An error raised in a worker keeps the iterator
            # alive through its traceback's frames, and its workers would idle until the garbage collector ran
            # its shutdown, seen to cost a 5 s join timeout a worker when that fell inside another loader's start.
            shutdown = getattr(batches, "_shutdown_workers", None)  # absent without worker processes
            if shutdown is not None:
                shutdown()


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_loader(
    data_dir,
    batch_size: int,
    *,
    device: str = "gpu",
    num_threads: int = 4,
    seed: int = 0,
    shard_id: int | None = None,
    num_shards: int | None = None,
    image_size: int = 224,
    tokenizer_size: int = 112,
    output_dtype: str = "float32",
    normalization: str = "imagenet",
    on_bad_file: str = "skip",
    masking: dict | None = None,
    backend: str = "auto",
    shuffle: bool = True,
    validate: bool = True,
    pin_memory: bool = False,
):
    """The BEiT pretraining loader: an iterable of batch dicts with ``len()`` steps per epoch and ``set_epoch``.

    Batch keys (tensors on the pipeline's device): ``images`` [B, 3, S, S] in ``output_dtype`` (or [B, S, S, 3]
    uint8), ``tokenizer_images`` [B, 3, T, T] float32 in [0.1, 0.9], ``bool_masked_pos`` [B, N] bool,
    ``mask_index`` [B, K] int64 (-1 padding), ``index`` [B] int64 (position in ``loader.files``) and ``valid``
    [B] bool (False for the samples that pad the last step so that all ranks take the same number of steps).

    ``data_dir``: an ImageFolder (class subfolders, labels ignored), a flat folder, a text file list or a list of
    paths. ``device="gpu"`` decodes with nvJPEG / the hardware decoder and augments on the GPU (DALI); ``"cpu"``
    runs the DALI CPU pipeline, or the reference loader (PIL + torch DataLoader, ``num_threads`` workers) when DALI
    is absent or ``backend="reference"``.

    Augmentation (unilm ``DataAugmentationForBEiT``): ColorJitter(0.4, 0.4, 0.4), horizontal flip p=0.5, and one
    RandomResizedCrop box (scale 0.08-1, ratio 3/4-4/3) resized to ``image_size`` bicubic (normalised with
    ``normalization``'s mean/std, or uint8 HWC when ``output_dtype="uint8"``) and to ``tokenizer_size`` Lanczos
    (DALL-E map_pixels, [0.1, 0.9]). In the DALI pipeline the colour jitter runs after the crop and resize, on
    both views with the same factors: the factors have the official distribution, and jittering 224 + 112 px
    views is far cheaper than the full image; its three ops run in a fixed order (contrast, brightness,
    saturation) rather than torchvision's random order. The reference loader keeps the official order (jitter on
    the full image, flip, crop).

    ``masking``: ``MaskingGenerator`` options (default input_size=14, num_masking_patches=75, min_num_patches=16,
    min_aspect=0.3). ``on_bad_file``: "skip" leaves out (and warns about, naming them) files that cannot be
    decoded, listed in ``loader.bad_files``; "error" raises naming the file. A data set with no usable image is
    an error. ``validate=False`` skips the up-front header check (for data sets known to be clean); bad files are
    then found when decoding fails. ``shard_id``/``num_shards`` default to torch.distributed's global rank and
    world size when initialised. ``pin_memory``: CPU batches in page-locked memory (for a CUDA consumer: a copy from
    pageable memory makes the host wait for it, and ``non_blocking=True`` does not help).
    """
    if backend not in ("auto", "dali", "reference"):
        raise ValueError(f"backend must be 'auto', 'dali' or 'reference', got {backend!r}")
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    kw = dict(
        num_threads=num_threads,
        seed=seed,
        shard_id=shard_id,
        num_shards=num_shards,
        image_size=image_size,
        tokenizer_size=tokenizer_size,
        output_dtype=output_dtype,
        normalization=normalization,
        on_bad_file=on_bad_file,
        masking=masking,
        shuffle=shuffle,
        validate=validate,
    )
    if backend == "reference" or (backend == "auto" and device == "cpu" and not dali_available()):
        if device == "gpu":
            raise ValueError("the reference loader runs on the CPU: pass device='cpu'")
        if backend == "auto":
            warnings.warn("NVIDIA DALI is not installed: using the reference PIL loader", stacklevel=2)
        return ReferenceLoader(data_dir, batch_size, pin_memory=pin_memory, **kw)
    return DaliLoader(data_dir, batch_size, device=device, pin_memory=pin_memory, **kw)


# --------------------------------------------------------------------------------------------------------------
# Synthetic data set
# --------------------------------------------------------------------------------------------------------------


def synthetic_image(rng: np.random.Generator, width: int = 500, height: int = 375, axis: np.ndarray | None = None):
    """A procedurally generated PIL image: a gradient or noise texture background with random ellipses,
    rectangles, polygons and lines, sometimes stripes and blur. Colours are uniform in RGB, or with ``axis`` (an
    RGB direction, largest component 1) mid-grey plus or minus a random 35-100 % of the way along it."""
    from PIL import Image, ImageDraw, ImageFilter

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(3)

    def colour():
        if axis is None:
            return rng.uniform(0, 255, 3)
        return 127.5 + rng.choice((-1.0, 1.0)) * rng.uniform(0.35, 1.0) * 127.5 * axis

    c0, c1 = colour(), colour()
    if kind == 0:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy) / (width + height) + 0.5
    elif kind == 1:  # sinusoidal texture
        fx, fy = rng.uniform(0.01, 0.15, 2)
        t = 0.5 + 0.5 * np.sin(fx * xx + rng.uniform(0, 6)) * np.cos(fy * yy + rng.uniform(0, 6))
    else:  # smooth noise: coarse random grid upsampled
        coarse = rng.random((rng.integers(3, 12), rng.integers(3, 12))).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    t = np.clip(t, 0, 1)[..., None]
    bg = (c0 * (1 - t) + c1 * t + rng.normal(0, rng.uniform(0, 12), (height, width, 3))).clip(0, 255)
    img = Image.fromarray(bg.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 15)):
        color = tuple(int(v) for v in np.clip(colour(), 0, 255))
        x0, y0 = rng.integers(-50, width), rng.integers(-50, height)
        x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)
        shape = rng.integers(4)
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif shape == 2:
            pts = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(rng.integers(3, 7))]
            draw.polygon(pts, fill=color)
        else:
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(1, 12)))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3))))
    return img


def class_colour_axes(classes: int) -> np.ndarray:
    """[classes, 3] colour axes through mid-grey: achromatic, red-cyan, green-magenta, blue-yellow, then seeded
    random directions. Each scaled so its largest component is 1."""
    fixed = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64)
    extra = np.random.default_rng(12345).normal(size=(max(classes - 4, 0), 3))
    axes = np.concatenate([fixed, extra])[:classes]
    return axes / np.abs(axes).max(1, keepdims=True)


def make_synthetic(
    out: str | os.PathLike,
    num_images: int,
    classes: int = 10,
    *,
    seed: int = 0,
    size: tuple[int, int] = (500, 375),
    gray_fraction: float = 0.1,
    png_fraction: float = 0.1,
) -> list[str]:
    """Write ``num_images`` synthetic images into ``out/class_XXX/`` (an ImageFolder): JPEG at quality 75-95, a
    ``gray_fraction`` of grayscale ones and a ``png_fraction`` of PNGs; sizes vary by up to 20% around ``size``.
    Deterministic for a seed. Returns the paths written.

    Image n goes to class n % classes, whose colours all lie on that class's axis through mid-grey
    (``class_colour_axes``), symmetric about it: every class has the same expected mean colour, so a linear
    function of the mean pixel separates them poorly, while an encoder that knows which colours its patches hold
    separates them well. That is the linear probe's test of the demo: what MIM on k-means tokens teaches, a random
    encoder lacks (numbers in beit.linprobe)."""
    if num_images <= 0 or classes <= 0:
        raise ValueError(f"num_images and classes must be positive, got {num_images} and {classes}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    paths = []
    axes = class_colour_axes(classes)
    for c in range(classes):
        (out / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for n in range(num_images):
        w = int(size[0] * rng.uniform(0.8, 1.2))
        h = int(size[1] * rng.uniform(0.8, 1.2))
        img = synthetic_image(rng, w, h, axes[n % classes])
        if rng.random() < gray_fraction:
            img = img.convert("L")
        folder = out / f"class_{n % classes:03d}"
        if rng.random() < png_fraction:
            path = folder / f"img_{n:06d}.png"
            img.save(path)
        else:
            path = folder / f"img_{n:06d}.jpg"
            img.save(path, quality=int(rng.integers(75, 96)))
        paths.append(str(path))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``beit-make-synthetic``: write a synthetic ImageFolder."""
    p = argparse.ArgumentParser(prog="beit-make-synthetic", description=make_synthetic.__doc__)
    p.add_argument("out", help="output folder (class subfolders are created in it)")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    args = p.parse_args(argv)
    paths = make_synthetic(args.out, args.num_images, args.classes, seed=args.seed, size=(args.width, args.height))
    print(f"wrote {len(paths)} images in {args.classes} classes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
