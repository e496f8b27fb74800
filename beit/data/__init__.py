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
``device="cpu"`` without DALI or with ``backend="reference"``, the reference loader. Both read image files (a
folder, a file list) or WebDataset tar shards (``train-{000000..000009}.tar``: labels ignored, samples named
``SHARD.tar:KEY``), and share the validation of bad samples and the per-epoch, per-rank sample order, so they see
the same samples in the same order.

Sharding: every epoch draws one permutation of all files (seeded by ``seed`` and the epoch, the same on every
rank), pads it by repeating its first files to a multiple of ``num_shards * batch_size`` and deals it out
round-robin, so each file is seen exactly once per epoch across ranks and every rank takes ``len(loader)`` steps.
The augmentation and mask seeds depend on (seed, rank, epoch): ranks differ, and an epoch is reproducible on its
own (``set_epoch(3)`` on a fresh loader gives the batches of epoch 3 of an uninterrupted run), because the DALI
pipeline is rebuilt per epoch.

The native DALI operators (``csrc/dali_ops``, built by the top-level ``CMakeLists.txt`` on first use into
``~/.cache/beit`` unless ``beit/_native/libbeit_dali_ops.so`` was installed; ``BEIT_NO_DALI_PLUGIN=1`` opts out,
``BEIT_DALI_PLUGIN=/path/lib.so`` uses a prebuilt one) draw the masks inside the pipeline and, on the CPU, fuse
colour jitter, flip and normalisation into one pass; without them, the Python ``MaskingGenerator`` feeds the masks
through an external source and DALI's own operators do the colour work.

``beit-make-synthetic OUT --num-images N --classes C`` (or ``python -m beit.data``) writes a procedurally generated
ImageFolder (``main``).

The modules:
    files       listing, image signature sniffing, validation, ``BadImageError``
    order       per-epoch, per-rank sample order, shards, seed mixing
    transforms  normalisations, the RandomResizedCrop box, colour jitter, DALL-E's map_pixels and epsilon
    base        what the loaders share (``LoaderBase``: source, validation, order; the PIL loaders' DataLoader
                epoch), the masking options
    plugin      build (CMake) and load of the native DALI operators, their environment variables and cache
    dali        the DALI pipeline and ``DaliLoader``, and the pieces both DALI loaders build their pipelines from
    reference   the PIL reference loader (``ReferenceDataset``, ``ReferenceLoader``)
    loader      ``build_loader``, ``dali_available``, ``resolve_backend``
    synthetic   the synthetic data set and ``beit-make-synthetic``
    classification, classification_loader   the labelled sources (also the pretraining ones: ``open_image_source``)
                and the fine-tuning loaders
This package re-exports their public names.
"""

from beit.data.base import OUTPUT_DTYPES, EpochDataset, LoaderBase, mask_config
from beit.data.dali import DaliLoader, dali_masks
from beit.data.files import (
    IMAGE_EXTENSIONS,
    SUPPORTED_FORMATS,
    BadImageError,
    check_image,
    find_undecodable,
    list_images,
    to_rgb,
    validate_images,
)
from beit.data.loader import build_loader, dali_available, resolve_backend
from beit.data.order import epoch_order, mix_seeds, resolve_shards
from beit.data.plugin import (
    CACHE_ENV,
    PLUGIN_ENV_DISABLE,
    PLUGIN_ENV_PATH,
    REPO_ROOT,
    build_dali_plugin,
    load_dali_plugin,
    require_dali,
)
from beit.data.reference import ReferenceDataset, ReferenceLoader
from beit.data.synthetic import class_colour_axes, main, make_synthetic, synthetic_image
from beit.data.transforms import (
    CROP_RATIO,
    CROP_SCALE,
    GRAY_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    JITTER,
    LOGIT_LAPLACE_EPS,
    NORMALIZATIONS,
    color_jitter,
    map_pixels,
    random_resized_crop_box,
    resized_crop,
    unmap_pixels,
)

__all__ = [
    "CACHE_ENV",
    "CROP_RATIO",
    "CROP_SCALE",
    "GRAY_WEIGHTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "JITTER",
    "LOGIT_LAPLACE_EPS",
    "NORMALIZATIONS",
    "OUTPUT_DTYPES",
    "PLUGIN_ENV_DISABLE",
    "PLUGIN_ENV_PATH",
    "REPO_ROOT",
    "SUPPORTED_FORMATS",
    "BadImageError",
    "DaliLoader",
    "EpochDataset",
    "LoaderBase",
    "ReferenceDataset",
    "ReferenceLoader",
    "build_dali_plugin",
    "build_loader",
    "check_image",
    "class_colour_axes",
    "color_jitter",
    "dali_available",
    "dali_masks",
    "epoch_order",
    "find_undecodable",
    "list_images",
    "load_dali_plugin",
    "main",
    "make_synthetic",
    "map_pixels",
    "mask_config",
    "mix_seeds",
    "random_resized_crop_box",
    "require_dali",
    "resolve_backend",
    "resized_crop",
    "resolve_shards",
    "synthetic_image",
    "to_rgb",
    "unmap_pixels",
    "validate_images",
]

# Fine-tuning and evaluation data: labelled sources (class folders, CIFAR-100, WebDataset shards) and their loaders.
from beit.data.classification import (  # noqa: E402
    UNLABELLED,
    Cifar100Source,
    ClassificationSource,
    ImageFolderSource,
    WebDatasetSource,
    expand_braces,
    open_classification_source,
    open_image_source,
    read_cifar_pickle,
    split_holdout,
)
from beit.data.classification_loader import (  # noqa: E402
    DEFAULT_RAND_AUGMENT,
    ClassificationLoader,
    DaliClassificationLoader,
    PilClassificationLoader,
    RandAugmentSpec,
    build_classification_loader,
    default_crop_pct,
    eval_resize_size,
    resize_center_crop,
)

__all__ += [
    "DEFAULT_RAND_AUGMENT",
    "ClassificationLoader",
    "Cifar100Source",
    "ClassificationSource",
    "UNLABELLED",
    "DaliClassificationLoader",
    "ImageFolderSource",
    "PilClassificationLoader",
    "RandAugmentSpec",
    "WebDatasetSource",
    "build_classification_loader",
    "default_crop_pct",
    "eval_resize_size",
    "expand_braces",
    "open_classification_source",
    "open_image_source",
    "read_cifar_pickle",
    "resize_center_crop",
    "split_holdout",
]
