"""``build_loader``, the entry point: the DALI loader, or the PIL reference loader on the CPU without DALI or when
asked for. Both share the source (image files or tar shards), the validation of bad samples and the per-epoch,
per-rank sample order, so they see the same samples in the same order. ``resolve_backend`` is the choice of loader
that ``build_classification_loader`` makes too."""

from __future__ import annotations

import warnings

from beit.data.dali import DaliLoader
from beit.data.files import MAX_PIXELS
from beit.data.plugin import require_dali
from beit.data.reference import ReferenceLoader


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: str, pil_name: str) -> str:
    """The loader a ``backend`` choice gives on ``device`` ("gpu" or "cpu"): "dali", or ``pil_name``, the PIL
    loader's name ("reference" for pretraining, "pil" for fine-tuning). "auto" takes DALI when it can be imported
    or the device is the GPU, where only DALI runs, else the PIL loader, with a warning. Raises before any work on
    an unknown choice, on the PIL loader asked to run on the GPU, and on DALI missing (saying how to install it)."""
    if backend not in ("auto", "dali", pil_name):
        raise ValueError(f"backend must be 'auto', 'dali' or {pil_name!r}, got {backend!r}")
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    if backend == "auto":
        backend = "dali" if device == "gpu" or dali_available() else pil_name
        if backend == pil_name:
            warnings.warn(f"NVIDIA DALI is not installed: using the PIL loader (backend={pil_name!r})", stacklevel=3)
    if backend == pil_name and device == "gpu":
        raise ValueError(
            f"the PIL loader (backend={pil_name!r}) runs on the CPU: pass device='cpu' (pin_memory=True for a GPU "
            "consumer)"
        )
    if backend == "dali":
        require_dali()  # raises, saying how to install it
    return backend


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
    max_pixels: int | None = MAX_PIXELS,
):
    """The BEiT pretraining loader: an iterable of batch dicts with ``len()`` steps per epoch and ``set_epoch``.

    Batch keys (tensors on the pipeline's device): ``images`` [B, 3, S, S] in ``output_dtype`` (or [B, S, S, 3]
    uint8), ``tokenizer_images`` [B, 3, T, T] float32 in [0.1, 0.9], ``bool_masked_pos`` [B, N] bool,
    ``mask_index`` [B, K] int64 (-1 padding), ``index`` [B] int64 (position in ``loader.files``) and ``valid``
    [B] bool (False for the samples that pad the last step so that all ranks take the same number of steps).

    ``data_dir``: an ImageFolder (class subfolders, labels ignored), a flat folder, a text file list or a list of
    paths; or WebDataset tar shards (``"shards/train-{000000..000009}.tar"``, a list of .tar paths, or a folder of
    .tar files: ``classification.open_image_source``), read by seeking to each sample's image member (labels
    ignored; a sample without an image is a bad sample named ``SHARD.tar:KEY``, as ``loader.files`` names every
    sample), with the order, sharding, bad-sample handling and resume of files. ``device="gpu"`` decodes with
    nvJPEG / the hardware decoder and augments on the GPU (DALI); ``"cpu"`` runs the DALI CPU pipeline, or the
    reference loader (PIL + torch DataLoader, ``num_threads`` workers) when DALI is absent or
    ``backend="reference"`` (``resolve_backend``).

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
    pageable memory makes the host wait for it, and ``non_blocking=True`` does not help). ``max_pixels``
    (default 64 megapixels, ``beit.data.files.MAX_PIXELS``; None: no limit): validation treats an image with more
    pixels as a bad file, read from its header before any decoding (a small PNG can decode to gigabytes); with
    ``validate=False`` it is not checked.
    """
    backend = resolve_backend(backend, device, "reference")
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
        max_pixels=max_pixels,
    )
    if backend == "reference":
        return ReferenceLoader(data_dir, batch_size, pin_memory=pin_memory, **kw)
    return DaliLoader(data_dir, batch_size, device=device, pin_memory=pin_memory, **kw)
