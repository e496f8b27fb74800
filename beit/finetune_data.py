"""The fine-tuning trainer's data: the training and validation loaders its options describe.

``--data`` is opened by ``beit.data.open_classification_source`` (an ImageNet-style root with ``train/`` and
``val/``, a ``cifar-100-python`` folder, WebDataset shards, or one folder of classes split with ``--val-fraction``);
``--val-data`` names the validation set apart (shards, or a folder of classes), labelled by the training classes.
A validation class the training set lacks is an error before any work.
"""

from __future__ import annotations

import argparse

from beit.data.classification import Cifar100Source, ImageFolderSource, WebDatasetSource, open_classification_source
from beit.data.classification_loader import build_classification_loader
from beit.data.loader import dali_available
from beit.distributed import Dist

FORMATS = {"folder": ImageFolderSource, "cifar100": Cifar100Source, "webdataset": WebDatasetSource}


def build_loaders(args: argparse.Namespace, d: Dist, train_loader: bool = True):
    """(training loader, validation loader, number of classes) of this rank's shards; the training loader is None
    without ``train_loader`` (evaluation only: the training set is listed for its classes, not validated)."""
    threads = max(1, args.num_workers)
    train = open_classification_source(args.data, "train", val_fraction=args.val_fraction, seed=args.seed,
                                       num_threads=threads)  # fmt: skip
    _check_format(train, args.data_format, args.data)
    val_spec = args.val_data or args.data
    val = open_classification_source(val_spec, "val", classes=train.classes, val_fraction=args.val_fraction,
                                     seed=args.seed, num_threads=threads)  # fmt: skip
    _check_format(val, args.data_format, val_spec)
    if val.num_classes > train.num_classes:
        raise ValueError(f"the validation set {val_spec} has {val.num_classes} classes, the training set "
                         f"{train.num_classes}")  # fmt: skip
    backend = args.loader
    if backend == "auto":  # as beit-pretrain's --loader auto: DALI where it is installed, else the PIL loader
        backend = "dali" if dali_available() else "pil"
    # DALI runs on the training device; the PIL loader on the CPU, its batches pinned for a GPU.
    device = "gpu" if d.device.type == "cuda" and backend == "dali" else "cpu"
    rand_augment = None if str(args.rand_augment).lower() == "none" else args.rand_augment
    common = dict(image_size=args.image_size, backend=backend, device=device,
                  num_threads=threads, seed=args.seed, shard_id=d.rank, num_shards=d.world_size,
                  normalization=args.normalization, on_bad_file=args.on_bad_file,
                  pin_memory=d.device.type == "cuda")  # fmt: skip
    if train_loader:
        train_loader = build_classification_loader(train, args.batch_size, train=True, rand_augment=rand_augment,
                                                   repeated_aug=args.repeated_aug, **common)  # fmt: skip
    else:
        train_loader = None
    val_loader = build_classification_loader(val, args.batch_size, train=False, crop_pct=args.crop_pct, **common)
    return train_loader, val_loader, train.num_classes


def _check_format(source, data_format: str, spec) -> None:
    if data_format != "auto" and not isinstance(source, FORMATS[data_format]):
        raise ValueError(f"--data-format {data_format}, but {spec} is {type(source).__name__}")

