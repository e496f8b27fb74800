"""beit.data's classification sources and loaders: class folders (symlinked classes, val checked against train,
the hold-out split), CIFAR-100 python files (and a malicious pickle refused), WebDataset shards, batches through
DALI's CPU pipeline and the PIL path, the evaluation transform against PIL computed here, exact evaluation
sharding, resumed epochs, bad samples. CPU only; 40-70 px images, 48 px outputs."""

import io
import math
import os
import pickle
import random
import sys
import tarfile
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from beit.data import BadImageError, dali_available
from beit.data import classification as classification_module
from beit.data.classification import (
    Cifar100Source,
    ImageFolderSource,
    WebDatasetSource,
    expand_braces,
    open_classification_source,
    read_cifar_pickle,
    split_holdout,
)
from beit.data.classification_loader import (
    DEFAULT_RAND_AUGMENT,
    RandAugmentSpec,
    build_classification_loader,
    default_crop_pct,
    eval_resize_size,
)
from beit.data.order import epoch_order

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
BACKENDS = [pytest.param("dali", marks=needs_dali), "pil"]
S = 48  # output size; eval resizes the shorter side to int(48 / 0.875) = 54
CLASSES = ["ant", "bee", "cat", "dog"]  # "dog" is a symlink to a folder elsewhere


def _image(rng, w, h):
    # Smooth content plus noise: resampling differences stay small, crops still differ.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def _encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """train/{ant,bee,cat,dog->elsewhere} with 13 files, val/{ant,cat} with 5."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    (root / "elsewhere" / "dog").mkdir(parents=True)
    (root / "train").mkdir()
    os.symlink(root / "elsewhere" / "dog", root / "train" / "dog")
    for k in range(13):
        c = CLASSES[k % 4]
        folder = root / "train" / c
        folder.mkdir(exist_ok=True)
        ext = "jpg" if k % 2 else "png"
        _image(rng, 40 + 3 * k, 70 - 2 * k).save(folder / f"{k:02d}.{ext}", "JPEG" if ext == "jpg" else "PNG")
    for k in range(5):
        c = ("ant", "cat")[k % 2]
        (root / "val" / c).mkdir(parents=True, exist_ok=True)
        _image(rng, 50 + 5 * k, 44 + k).save(root / "val" / c / f"v{k}.png")
    return root


def _fake_cifar(folder, rng, n_train=10, n_test=7, protocol=pickle.DEFAULT_PROTOCOL):
    folder.mkdir(parents=True)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        d = {
            b"batch_label": f"{split} batch".encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [int(x) for x in rng.integers(0, 100, n)],
            b"coarse_labels": [int(x) for x in rng.integers(0, 20, n)],
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        with open(folder / split, "wb") as f:
            pickle.dump(d, f, protocol=protocol)
        data[split] = d
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return data


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return root, _fake_cifar(root / "cifar-100-python", np.random.default_rng(1))


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards of 5 samples; in shard 1, key b/s1_2 has no label and b/s1_4 no image."""
    root = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(2)
    images, labels = {}, {}
    for s in range(2):
        with tarfile.open(root / f"train-{s:06d}.tar", "w") as tf:
            for k in range(5):
                key = f"b/s{s}_{k}"
                fmt = ("JPEG", "PNG")[k % 2]
                data = _encode(_image(rng, 44 + k, 52), fmt)
                if (s, k) != (1, 4):
                    _add(tf, f"{key}.{'jpg' if fmt == 'JPEG' else 'png'}", data)
                    images[f"{root}/train-{s:06d}.tar:{key}"] = data
                _add(tf, f"{key}.json", b"{}")  # another field: ignored
                if (s, k) != (1, 2):
                    label = (3 * s + k) % 5
                    _add(tf, f"{key}.cls", f"{label}\n".encode())
                    labels[f"{root}/train-{s:06d}.tar:{key}"] = label
    return root, images, labels


def _batches(loader, start=0):
    # DALI may reuse its buffers on the next step: copy what is kept.
    return [{k: v.clone() for k, v in b.items()} for b in loader.iter_from(start)]


def _folder_label(path, root):
    return CLASSES.index(os.path.relpath(path, root).split(os.sep)[0])


# ---------------------------------------------------------------------------------------------------- sources


def test_class_folders_follow_symlinks_and_label_val_by_train_classes(imagenet):
    train = open_classification_source(imagenet, "train")
    assert isinstance(train, ImageFolderSource) and train.classes == CLASSES
    assert len(train) == 13
    assert [int(x) for x in train.labels] == [_folder_label(f, imagenet / "train") for f in train.files]
    assert sum(f.startswith(str(imagenet / "train" / "dog")) for f in train.files) == 3  # through the link
    val = open_classification_source(imagenet, "val")  # val lacks bee and dog: fine
    assert val.classes == CLASSES and len(val) == 5
    assert [int(x) for x in val.labels] == [_folder_label(f, imagenet / "val") for f in val.files]


def test_val_class_missing_from_train_is_an_error_before_listing(imagenet, tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "train" / "ant").mkdir(parents=True)
    (root / "val" / "zebra").mkdir(parents=True)
    (root / "val" / "yak").mkdir(parents=True)
    (root / "val" / "ant").mkdir(parents=True)

    def no_listing(*a, **k):
        raise AssertionError("files were listed before the class check")

    monkeypatch.setattr(classification_module, "list_images", no_listing)
    with pytest.raises(ValueError, match="training classes lack: yak, zebra"):
        open_classification_source(root, "val")
    with pytest.raises(ValueError, match="zebra"):
        build_classification_loader(root, 4, train=False, backend="pil")


def test_split_holdout_is_stratified_and_deterministic():
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    files = [f"f{i}" for i in range(labels.size)]
    (tf, tl), (vf, vl) = split_holdout(files, labels, 0.2, seed=3)
    assert sorted(tf + vf) == sorted(files) and not set(tf) & set(vf)
    # round(n * 0.2), at least one of a class with two or more, never a whole class.
    assert [int((vl == c).sum()) for c in range(4)] == [2, 1, 1, 0]
    assert all(int(labels[files.index(f)]) == lab for f, lab in zip(vf, vl))
    assert vf == [f for f in files if f in set(vf)]  # input order kept
    assert split_holdout(files, labels, 0.2, seed=3)[1][0] == vf
    assert any(split_holdout(files, labels, 0.2, seed=s)[1][0] != vf for s in range(4, 8))
    with pytest.raises(ValueError, match="val_fraction"):
        split_holdout(files, labels, 1.0)


def test_single_folder_with_holdout(imagenet):
    train = open_classification_source(imagenet / "train", "train", val_fraction=0.25, seed=1)
    val = open_classification_source(imagenet / "train", "val", val_fraction=0.25, seed=1)
    assert len(train) + len(val) == 13 and not set(train.files) & set(val.files)
    assert sorted(int(x) for x in val.labels) == [0, 1, 2, 3]  # 4, 3, 3, 3 files: one each
    with pytest.raises(ValueError, match="val_fraction"):
        open_classification_source(imagenet / "train", "val")


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar100_read_without_executing_code(tmp_path, protocol):
    data = _fake_cifar(tmp_path / "cifar-100-python", np.random.default_rng(4), protocol=protocol)
    src = open_classification_source(tmp_path, "train")
    assert isinstance(src, Cifar100Source)
    assert src.classes == [f"fine{i}" for i in range(100)]
    assert src.pixels.shape == (10, 32, 32, 3) and src.pixels.dtype == np.uint8
    raw = data["train"][b"data"]
    for i, (y, x, c) in enumerate([(0, 0, 0), (5, 31, 2), (31, 7, 1)]):
        assert src.pixels[i, y, x, c] == raw[i, c * 1024 + y * 32 + x]  # R, G, B planes, row-major
    assert np.asarray(src.image(3)).tolist() == src.pixels[3].tolist()
    assert src.labels.tolist() == data["train"][b"fine_labels"]
    test = Cifar100Source.load(tmp_path, "val", "coarse")
    assert test.labels.tolist() == data["test"][b"coarse_labels"] and test.classes[3] == "coarse3"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_cifar_pickle_is_refused_without_running(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _fake_cifar(folder, np.random.default_rng(5))
    marker = tmp_path / "pwned"
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"fine_labels": [0]}, f)
    with pytest.raises(ValueError, match=r"cifar-100-python/train: refusing to unpickle (posix|os)\.system"):
        open_classification_source(tmp_path, "train")
    assert not marker.exists()
    # An allowed callable with arguments that make no sense is an error naming the file, too.
    with open(folder / "train", "wb") as f:
        f.write(b"\x80\x02cnumpy\ndtype\nq\x00X\x03\x00\x00\x00zzzq\x01\x85q\x02Rq\x03.")
    with pytest.raises(ValueError, match="train is not a CIFAR python file"):
        read_cifar_pickle(folder / "train")
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"'data' must be a uint8 array \[N, 3072\]"):
        Cifar100Source.load(tmp_path)
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, f)
    with pytest.raises(ValueError, match="label 100 of sample 1 is outside 0..99"):
        Cifar100Source.load(tmp_path)


def test_webdataset_shards_read_back_with_labels_and_bad_samples(shards):
    root, images, labels = shards
    assert expand_braces("a-{08..10}-{x,y}.tar") == [f"a-{n}-{s}.tar" for n in ("08", "09", "10") for s in "xy"]
    src = open_classification_source(str(root / "train-{000000..000001}.tar"))
    assert isinstance(src, WebDatasetSource)
    good = [n for n in images if n in labels]
    assert src.names == good  # shard order, then member order
    assert src.labels.tolist() == [labels[n] for n in good] and src.classes == ["0", "1", "2", "3", "4"]
    assert [src.read(i) for i in range(len(src))] == [images[n] for n in good]
    assert src.bad_samples == [
        (f"{root}/train-000001.tar:b/s1_2", "no label (cls)"),
        (f"{root}/train-000001.tar:b/s1_4", "no image (jpg, jpeg, png, webp)"),
    ]
    assert open_classification_source(root).names == src.names  # a folder of shards
    assert WebDatasetSource([root / "train-000000.tar"], classes=7).num_classes == 7
    with pytest.raises(FileNotFoundError, match="train-000002.tar"):
        WebDatasetSource(str(root / "train-{000000..000002}.tar"))
    with pytest.raises(ValueError, match=r"label 3 of .*train-000000.tar:b/s0_3 is outside the 3 classes"):
        WebDatasetSource(root / "train-000000.tar", classes=3)


# ---------------------------------------------------------------------------------------------------- loaders


def _check_batches(batches, src, batch_size, loader):
    for b in batches:
        assert b["images"].shape == (batch_size, 3, S, S) and b["images"].dtype == torch.float32
        assert b["images"].min() >= -1 - 1e-5 and b["images"].max() <= 1 + 1e-5 and b["images"].std() > 0.1
        for key in ("labels", "index"):
            assert b[key].shape == (batch_size,) and b[key].dtype == torch.int64
        assert b["valid"].shape == (batch_size,) and b["valid"].dtype == torch.bool
        assert b["labels"].tolist() == [int(src.labels[i]) for i in b["index"]]
    seen = torch.cat([b["index"][b["valid"]] for b in batches]).tolist()
    assert sorted(seen) == sorted(int(p) for p in loader.positions)  # each usable sample once an epoch


@needs_dali
def test_dali_train_batches_with_rand_augment_and_resume(imagenet):
    """DALI's CPU pipeline with DALI's RandAugment: shapes, labels, every sample once; a fresh loader resumed at
    batch 1 and 3 (inside segments of 2 batches) gives the uninterrupted run's batches bitwise."""
    kw = dict(train=True, image_size=S, backend="dali", num_threads=2, seed=5, segment_batches=2)
    loader = build_classification_loader(imagenet, 4, **kw)
    assert loader.rand_augment == RandAugmentSpec.parse(DEFAULT_RAND_AUGMENT) and len(loader) == 4
    loader.set_epoch(1)
    full = _batches(loader)
    _check_batches(full, loader.source, 4, loader)
    fresh = build_classification_loader(imagenet, 4, **kw)
    fresh.set_epoch(1)
    for start in (1, 3):
        resumed = _batches(fresh, start)
        assert len(resumed) == 4 - start
        for a, b in zip(full[start:], resumed):
            assert all(torch.equal(a[k], b[k]) for k in a)


@needs_dali
@pytest.mark.parametrize("kind", ["cifar", "webdataset"])
def test_dali_reads_cifar_pixels_and_tar_bytes(kind, cifar, shards):
    src = Cifar100Source.load(cifar[0]) if kind == "cifar" else WebDatasetSource(shards[0])
    for train in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the shards' bad samples: tested elsewhere
            loader = build_classification_loader(
                src, 4, train=train, image_size=S, backend="dali", num_threads=2, rand_augment=None
            )
        _check_batches(_batches(loader), src, 4, loader)


@needs_dali
def test_dali_rand_augment_is_timms_operation_list_applied_with_probability_half():
    """With RandAugment and without it, the crop and flip draws are the same (explicit seeds): a sample comes out
    unchanged when neither of the 2 layers applied its operation, (1 - 0.5)^2 = 1/4 of them in timm."""
    from beit.data.classification_loader import timm_rand_augment_suite

    timm_inc = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]  # fmt: skip
    plain = [n.replace("Increasing", "").replace("Rel", "") for n in timm_inc]
    snake = ["".join("_" + c.lower() if c.isupper() else c for c in n).lstrip("_") for n in plain]
    assert [aug.name for aug in timm_rand_augment_suite(True)] == snake
    assert [aug.name for aug in timm_rand_augment_suite(False)] == snake
    n = 96
    yy, xx = np.mgrid[0:32, 0:32]
    pixels = np.stack([np.stack([xx * 7 + k, yy * 5 + 3 * k, (xx + yy) * 3 + k], -1) % 250 for k in range(n)])
    src = Cifar100Source(pixels.astype(np.uint8), np.zeros(n, np.int64), ["c"] * 100, "smooth")
    out = {}
    for ra in (DEFAULT_RAND_AUGMENT, None):
        loader = build_classification_loader(src, n, train=True, image_size=S, backend="dali", num_threads=2,
                                             rand_augment=ra)  # fmt: skip
        (batch,) = _batches(loader)
        out[ra] = batch["images"]
    unchanged = ((out[None] - out[DEFAULT_RAND_AUGMENT]).abs().flatten(1).amax(1) < 1e-6).float().mean().item()
    assert 0.1 < unchanged < 0.42, unchanged


@pytest.mark.gpu
@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["folder", "cifar", "webdataset"])
def test_dali_gpu_pipeline(kind, imagenet, cifar, shards):
    """Mixed decoding and augmentation on the GPU: batches on the GPU; evaluation within resampling noise of the
    CPU pipeline's."""
    src = {"folder": lambda: ImageFolderSource.from_folder(imagenet / "train"),
           "cifar": lambda: Cifar100Source.load(cifar[0]),
           "webdataset": lambda: WebDatasetSource(shards[0])}[kind]()  # fmt: skip
    kw = dict(image_size=S, backend="dali", num_threads=2, on_bad_file="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = build_classification_loader(src, 4, train=True, device="gpu", **kw)
        gpu = build_classification_loader(src, 4, train=False, device="gpu", **kw)
        cpu = build_classification_loader(src, 4, train=False, device="cpu", **kw)
    batches = _batches(train)
    assert all(v.is_cuda for b in batches for v in b.values())
    _check_batches([{k: v.cpu() for k, v in b.items()} for b in batches], src, 4, train)
    for g, c in zip(_batches(gpu), _batches(cpu)):
        assert torch.equal(g["index"].cpu(), c["index"]) and torch.equal(g["labels"].cpu(), c["labels"])
        assert (g["images"].cpu() - c["images"]).abs().mean() < 0.01


def test_pil_train_batches(imagenet):
    loader = build_classification_loader(
        imagenet, 4, train=True, image_size=S, backend="pil", num_threads=1, rand_augment=None
    )
    assert loader.num_classes == 4 and loader.classes == CLASSES and loader.num_samples == 13
    loader.set_epoch(0)
    e0 = _batches(loader)
    _check_batches(e0, loader.source, 4, loader)
    loader.set_epoch(1)
    e1 = _batches(loader)
    assert [b["index"].tolist() for b in e0] != [b["index"].tolist() for b in e1]  # a permutation per epoch


def _official_eval(img, size=S, crop_pct=0.875):
    """torchvision's Resize(int(size / crop_pct), bicubic) + CenterCrop(size) + Normalize(0.5, 0.5), with PIL."""
    target = int(size / crop_pct)
    w, h = img.size
    if w <= h:
        new = (target, int(target * h / w))
    else:
        new = (int(target * w / h), target)
    if min(w, h) != target:
        img = img.resize(new, Image.Resampling.BICUBIC)
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    x = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    return torch.from_numpy((x - 0.5) / 0.5).permute(2, 0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_transform_matches_pil_resize_and_centre_crop(imagenet, backend):
    loader = build_classification_loader(imagenet, 5, train=False, image_size=S, backend=backend, num_threads=2)
    assert loader.crop_pct == 0.875 and loader.resize_size == 54
    (batch,) = _batches(loader)
    assert batch["valid"].all()
    for img, i in zip(batch["images"], batch["index"].tolist()):
        with Image.open(loader.source.files[i]) as im:
            expected = _official_eval(im.convert("RGB"))
        diff = (img - expected).abs()
        if backend == "pil":
            assert diff.max() < 1e-5
        else:  # the same geometry, DALI's own bicubic resampling
            assert diff.mean() < 0.01, diff.mean()


def test_default_crop_pct_follows_the_official_code():
    assert default_crop_pct(224) == 0.875 and eval_resize_size(224) == 256
    assert default_crop_pct(384) == 1.0 and eval_resize_size(384) == 384
    assert eval_resize_size(224, 0.9) == 248


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_sharding_counts_every_sample_exactly_once(imagenet, backend):
    """13 samples, batch 4, 2 ranks: 2 steps each, 16 slots; the valid ones are each sample once."""
    src = ImageFolderSource.from_folder(imagenet / "train")
    per_rank = []
    for rank in range(2):
        loader = build_classification_loader(
            src, 4, train=False, image_size=S, backend=backend, num_threads=2, shard_id=rank, num_shards=2
        )
        assert len(loader) == 2
        batches = _batches(loader)
        assert len(batches) == 2 and all(b["images"].shape[0] == 4 for b in batches)
        per_rank.append(torch.cat([b["index"][b["valid"]] for b in batches]).tolist())
        assert all(b["labels"].tolist() == [int(loader.source.labels[i]) for i in b["index"]] for b in batches)
    # No shuffling: the samples in order, dealt round-robin.
    assert per_rank == [list(range(0, 13, 2)), list(range(1, 13, 2))]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(13))
    assert len(per_rank[0]) + len(per_rank[1]) == 13  # three padding slots, none counted


def test_pil_epoch_resumes_bitwise_from_a_fresh_loader(imagenet):
    kw = dict(train=True, image_size=S, backend="pil", rand_augment=None, seed=3)
    loader = build_classification_loader(imagenet, 4, num_threads=1, **kw)
    loader.set_epoch(2)
    full = _batches(loader)
    fresh = build_classification_loader(imagenet, 4, num_threads=2, **kw)  # worker processes: same batches
    fresh.set_epoch(2)
    resumed = _batches(fresh, 2)
    assert len(resumed) == 2
    for a, b in zip(full[2:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_file_is_skipped_with_a_warning_naming_it(imagenet, tmp_path, backend):
    root = tmp_path / "data"
    for c in ("ant", "bee"):
        (root / c).mkdir(parents=True)
        for f in (imagenet / "train" / c).iterdir():
            (root / c / f.name).write_bytes(f.read_bytes())
    jpg = next(f for f in (root / "bee").iterdir() if f.suffix == ".jpg")
    jpg.write_bytes(jpg.read_bytes()[:300])  # truncated
    kw = dict(train=True, image_size=S, backend=backend, num_threads=1, rand_augment=None)
    with pytest.warns(UserWarning, match=f"skipping 1 of 7 files .*{jpg.name}: truncated JPEG"):
        loader = build_classification_loader(root, 4, **kw)
    assert str(jpg) not in loader.files and loader.num_samples == 6
    _check_batches(_batches(loader), loader.source, 4, loader)
    with pytest.raises(BadImageError, match=f"bad image file {jpg}"):
        build_classification_loader(root, 4, on_bad_file="error", **kw)


def test_bad_tar_samples_are_skipped_or_stop_naming_shard_and_key(shards):
    kw = dict(train=False, image_size=S, backend="pil", num_threads=1)
    with pytest.warns(UserWarning, match=r"skipping 2 bad samples .*train-000001.tar:b/s1_2: no label"):
        loader = build_classification_loader(shards[0], 4, **kw)
    assert loader.num_samples == 8 and len(loader.bad_files) == 2
    with pytest.raises(BadImageError, match=r"bad sample .*train-000001.tar:b/s1_2: no label \(cls\)"):
        build_classification_loader(shards[0], 4, on_bad_file="error", **kw)


# ---------------------------------------------------------------------------------------------------- RandAugment


def test_rand_augment_spec_maps_onto_dali_bins():
    spec = RandAugmentSpec.parse("rand-m9-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_ops, spec.magnitude_std, spec.increasing) == (9.0, 2, 0.5, True)
    assert spec.dali_bin == 90  # bin 90 of 101 = 0.9 of the range, timm's 9 / 10
    assert RandAugmentSpec.parse("rand-n3-m5.5").dali_bin == 55 and not RandAugmentSpec.parse("rand-m5").increasing
    for bad, why in [("rand-m11", "0..10"), ("augmix-m5", "form"), ("rand-m9-w0", "unsupported part 'w0'"),
                     ("rand-m9-inc2", "inc must be"), ("rand-n2.5", "integer")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            RandAugmentSpec.parse(bad)


@pytest.mark.skipif("timm" in sys.modules or __import__("importlib").util.find_spec("timm"), reason="timm present")
def test_pil_rand_augment_without_timm_is_refused_before_work(imagenet, monkeypatch):
    monkeypatch.setattr(classification_module, "list_images", lambda *a, **k: pytest.fail("listed files"))
    with pytest.raises(ImportError, match=r"needs timm.*pip install -e '\.\[dali\]'.*rand_augment=None"):
        build_classification_loader(imagenet, 4, train=True, backend="pil")


def test_pil_rand_augment_calls_timm_with_official_hparams_and_seeds_it(imagenet, monkeypatch):
    """A stand-in for timm's module: the loader passes the spec and the official hyperparameters, and seeds
    Python's and numpy's global generators per sample (timm draws from both), restoring them afterwards."""
    calls = []

    def rand_augment_transform(spec, hparams):
        calls.append((spec, hparams))

        def transform(img):  # draws from both global generators, as timm's RandAugment does
            return img.rotate(random.random() * 90 + np.random.rand() * 90)  # noqa: NPY002

        return transform

    auto_augment = types.ModuleType("timm.data.auto_augment")
    auto_augment.rand_augment_transform = rand_augment_transform
    for name, mod in [("timm", types.ModuleType("timm")), ("timm.data", types.ModuleType("timm.data")),
                      ("timm.data.auto_augment", auto_augment)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, mod)
    kw = dict(train=True, image_size=S, backend="pil", num_threads=1, normalization="imagenet")
    loader = build_classification_loader(imagenet, 4, **kw)
    spec, hparams = calls[-1]
    assert spec == DEFAULT_RAND_AUGMENT
    assert hparams["translate_const"] == int(S * 0.45) and hparams["img_mean"] == (124, 116, 104)
    assert hparams["interpolation"] == Image.Resampling.BICUBIC
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002
    before = (random.random(), np.random.rand())  # noqa: NPY002
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002
    a = _batches(loader)
    assert (random.random(), np.random.rand()) == before  # noqa: NPY002
    b = _batches(build_classification_loader(imagenet, 4, **kw))
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b))
    plain = _batches(build_classification_loader(imagenet, 4, rand_augment=None, **kw))
    assert not torch.equal(a[0]["images"], plain[0]["images"])


def test_bad_arguments_fail_before_work(imagenet):
    with pytest.raises(ValueError, match="32 px and below"):
        build_classification_loader(imagenet, 4, train=False, image_size=32, backend="pil")
    with pytest.raises(ValueError, match="crop_pct"):
        build_classification_loader(imagenet, 4, train=False, image_size=S, crop_pct=1.5, backend="pil")
    with pytest.raises(ValueError, match="runs on the CPU"):
        build_classification_loader(imagenet, 4, train=False, backend="pil", device="gpu")
    with pytest.raises(ValueError, match="backend"):
        build_classification_loader(imagenet, 4, train=False, backend="timm")
    with pytest.raises(ValueError, match="unsupported part"):
        build_classification_loader(imagenet, 4, train=True, rand_augment="rand-m9-x1")


# ------------------------------------------------------------------------------------------------ repeated augmentation


def _ra_sampler(perm, repeats, num_replicas, rank, grid):
    """DeiT's RASampler.__iter__ (facebookresearch/deit samplers.py) transcribed with its 3 as ``repeats`` and its
    256 as ``grid``, over a given permutation."""
    n = len(perm)
    num_samples = int(math.ceil(n * repeats / num_replicas))
    total_size = num_samples * num_replicas
    num_selected_samples = int(math.floor(n // grid * grid / num_replicas))
    indices = [ele for ele in perm for _ in range(repeats)]
    indices += indices[: (total_size - len(indices))]
    assert len(indices) == total_size
    indices = indices[rank:total_size:num_replicas]
    assert len(indices) == num_samples
    return indices[:num_selected_samples]


def _ra_loader(imagenet, batch_size, **kw):
    kw = dict(train=True, image_size=S, backend="pil", num_threads=1, rand_augment=None, seed=7) | kw
    return build_classification_loader(imagenet, batch_size, **kw)


@pytest.mark.parametrize(("num_shards", "batch_size", "repeats"), [(1, 4, 2), (2, 2, 2), (2, 2, 3)])
def test_repeated_aug_epoch_is_deits_ra_sampler(imagenet, num_shards, batch_size, repeats):
    """13 samples: each rank's batches, in order, are RASampler's indices over the epoch's permutation (the one
    repeated_aug=1 deals out), cut to 13 // (batch_size * num_shards) whole steps."""
    src = ImageFolderSource.from_folder(imagenet / "train")
    plain = _ra_loader(src, 13, num_shards=1, shard_id=0)  # one batch of the whole permutation
    plain.set_epoch(4)
    (batch,) = _batches(plain)
    perm = batch["index"].tolist()
    assert sorted(perm) == list(range(13))
    steps = 13 // (batch_size * num_shards)
    seen = []
    for rank in range(num_shards):
        loader = _ra_loader(src, batch_size, num_shards=num_shards, shard_id=rank, repeated_aug=repeats)
        loader.set_epoch(4)
        assert len(loader) == steps
        batches = _batches(loader)
        assert len(batches) == steps and all(b["valid"].all() for b in batches)
        got = torch.cat([b["index"] for b in batches]).tolist()
        assert got == _ra_sampler(perm, repeats, num_shards, rank, batch_size * num_shards)
        assert all(b["labels"].tolist() == [int(src.labels[i]) for i in b["index"]] for b in batches)
        seen += got
    # The epoch's multiset: the permutation's first samples, each `repeats` times (the last kept one maybe fewer).
    kept = -(-len(seen) // repeats)
    expected = [p for p in perm[:kept] for _ in range(repeats)][: len(seen)]
    assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize(("num_shards", "repeats"), [(2, 2), (3, 3), (4, 2)])
def test_repeated_aug_copies_go_to_different_ranks(imagenet, num_shards, repeats):
    """With at least as many ranks as copies, every kept sample appears `repeats` times, each on another rank."""
    src = ImageFolderSource.from_folder(imagenet / "train")
    ranks_of: dict[int, list[int]] = {}
    for rank in range(num_shards):
        loader = _ra_loader(src, 1, num_shards=num_shards, shard_id=rank, repeated_aug=repeats)
        order, valid = loader.epoch_order(2)
        assert valid.all() and order.size == 13 // num_shards
        for i in order.tolist():
            ranks_of.setdefault(i, []).append(rank)
    total = sum(len(r) for r in ranks_of.values())
    assert total == 13 // num_shards * num_shards
    full = [r for r in ranks_of.values() if len(r) == repeats]
    assert len(full) == total // repeats  # only a last, cut-off sample may have fewer copies
    assert all(len(r) <= repeats for r in ranks_of.values())
    assert all(len(set(r)) == len(r) for r in ranks_of.values())  # never two copies on one rank


def test_repeated_aug_one_is_todays_order_and_batches(imagenet):
    src = ImageFolderSource.from_folder(imagenet / "train")
    for rank in range(2):
        default = _ra_loader(src, 4, num_shards=2, shard_id=rank)
        one = _ra_loader(src, 4, num_shards=2, shard_id=rank, repeated_aug=1)
        for e in (0, 3):
            expected = epoch_order(13, 4, epoch=e, seed=7, shard_id=rank, num_shards=2, shuffle=True)
            for got in (default.epoch_order(e), one.epoch_order(e)):
                assert all(np.array_equal(g, x) for g, x in zip(got, expected))
        assert len(one) == len(default) == 2
        one.set_epoch(1)
        default.set_epoch(1)
        for a, b in zip(_batches(default), _batches(one), strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_repeated_aug_resumes_bitwise_and_copies_differ(imagenet):
    """repeated_aug=3 on one rank: 13 // 4 = 3 steps; a fresh loader (with workers) resumed at batch 1 gives the
    uninterrupted run's batches; the copies of a sample share the rank but not their augmentation."""
    kw = dict(repeated_aug=3, rand_augment=None, seed=3)
    loader = _ra_loader(imagenet, 4, **kw)
    assert len(loader) == 3
    loader.set_epoch(2)
    full = _batches(loader)
    assert len(full) == 3
    fresh = _ra_loader(imagenet, 4, num_threads=2, **kw)
    fresh.set_epoch(2)
    resumed = _batches(fresh, 1)
    assert len(resumed) == 2
    for a, b in zip(full[1:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    index = torch.cat([b["index"] for b in full])
    images = torch.cat([b["images"] for b in full])
    assert index.tolist()[:3] == [index[0].item()] * 3  # one rank: the copies in a row
    for i in index.unique().tolist():
        copies = images[index == i]
        assert all(not torch.equal(copies[0], c) for c in copies[1:])


@needs_dali
def test_dali_repeated_aug_takes_the_same_samples_as_pil(imagenet):
    src = ImageFolderSource.from_folder(imagenet / "train")
    kw = dict(num_shards=2, shard_id=1, repeated_aug=2)
    pil = _ra_loader(src, 2, **kw)
    dali = _ra_loader(src, 2, backend="dali", num_threads=2, segment_batches=2, **kw)
    assert len(dali) == len(pil) == 3
    for ld in (pil, dali):
        ld.set_epoch(5)
    full = _batches(dali)
    assert [b["index"].tolist() for b in full] == [b["index"].tolist() for b in _batches(pil)]
    resumed = _batches(dali, 1)
    for a, b in zip(full[1:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_repeated_aug_bad_arguments_fail_before_work(imagenet):
    with pytest.raises(ValueError, match="repeated_aug=2 is for training"):
        build_classification_loader(imagenet, 4, train=False, image_size=S, backend="pil", repeated_aug=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="repeated_aug must be a positive integer"):
            _ra_loader(imagenet, 4, repeated_aug=bad)
    with pytest.raises(ValueError, match="only 13"):  # 13 samples, steps of 2 x 7
        _ra_loader(imagenet, 7, num_shards=2, shard_id=0, repeated_aug=2)
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        epoch_order(13, 4, epoch=0, seed=0, shard_id=0, num_shards=1, repeats=0)


def test_a_folder_mixing_shards_and_images_is_refused(tmp_path):
    from PIL import Image

    from beit.data.classification import is_shard_spec

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "b.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="both .tar shards"):
        is_shard_spec(tmp_path)
    (tmp_path / "a.png").unlink()
    assert is_shard_spec(tmp_path)
