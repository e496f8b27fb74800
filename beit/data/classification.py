"""Labelled images for fine-tuning and evaluation: ImageNet-style class folders, CIFAR-100 in its official python
format and WebDataset tar shards, as *sources* that the classification loaders (``beit.data.classification_loader``)
read.

A source holds N samples in a fixed order; sample ``i`` (0 <= i < N) has
    labels[i]   int64 in [0, num_classes): class ``classes[labels[i]]``
    names[i]    the string that names it in messages: its path, ``SHARD.tar:KEY`` or ``.../train[17]``
and is read according to the source's ``kind``:
    "files"     ``files[i]``, an image file (DALI's file reader; ``validate_images`` checks it up front)
    "encoded"   ``read(i)``, the encoded image's bytes (JPEG, PNG, BMP or WebP), from a tar shard
    "pixels"    ``pixels[i]``, [H, W, 3] uint8 RGB, already decoded (CIFAR: [N, 32, 32, 3])
``image(i)`` gives any sample as an 8-bit RGB PIL image (the PIL loader's path).

The formats:
    class folders   ``root/<class>/**/<file>``: classes are the sorted names of ``root``'s subfolders, a file's label
                    the index of the folder it lies in. Folders are walked recursively, symlinked class folders
                    followed (``files.list_images``). An ImageNet layout ``data/train/<class>`` and
                    ``data/val/<class>`` labels val by the *train* classes: a val class that train lacks is an error
                    naming it, found before any file is listed; train classes missing from val are fine. One folder
                    alone (no val) can be split per class with ``split_holdout``.
    CIFAR-100       ``cifar-100-python/{train,test,meta}``: pickled dicts of bytes keys, ``b"data"`` uint8
                    [N, 3072] (a row is R, G, B planes of 32x32, row-major), ``b"fine_labels"`` (100 classes),
                    ``b"coarse_labels"`` (20), ``b"filenames"``; ``meta`` has the class names. They are read by a
                    restricted unpickler that resolves only what numpy arrays need and refuses any other global
                    (a pickle can name any callable, and unpickling calls it), naming the file.
    WebDataset      uncompressed tar shards, given as ``/data/train-{000000..000099}.tar`` (brace expansion:
                    numeric ranges, zero-padded to the width of the first bound when it has leading zeros or both
                    bounds have the same width, and comma lists), a list of paths or a folder of ``.tar`` files
                    (sorted). A sample is the members sharing a key: the member's path up to the first dot of its
                    basename. The image is the ``jpg``, ``jpeg``, ``png`` or ``webp`` member, the label the ``cls``
                    member (a decimal integer as text); other members are ignored. A sample without an image or a
                    label, with two images, or with an unreadable label is a bad sample named ``SHARD:KEY``
                    (``bad_samples``; the loaders skip it with a warning or stop, as with bad files). Shards are
                    indexed once (member offsets) so that any order reads them by seeking: compressed shards
                    (``.tar.gz``) cannot be read that way and are refused. Pretraining reads the same shards
                    unlabelled (``open_image_source``): the ``cls`` members are not read, and a sample needs only
                    its image.

Sources own no transform: the loaders apply the training or evaluation transforms and decide, with
``on_bad_file``, what happens to bad samples.
"""

from __future__ import annotations

import io
import os
import pickle
import posixpath
import re
import tarfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from beit.data.files import MAX_PIXELS, check_image, check_many, find_undecodable, list_images, to_rgb
from beit.data.order import mix_seeds

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
WDS_LABEL_EXTENSION = "cls"
CIFAR_LABELS = {"fine": 100, "coarse": 20}
UNLABELLED = "unlabelled"  # the one class of the pretraining sources (``open_image_source``)


class ClassificationSource:
    """N labelled samples in a fixed order (see the module docstring); subclasses say how a sample is read."""

    kind = ""

    def __init__(self, labels, classes: Sequence[str], names: Sequence[str], description: str):
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.classes = [str(c) for c in classes]
        self.names = list(names)
        self.description = description
        self.bad_samples: list[tuple[str, str]] = []  # set aside while indexing (no image, no label, ...)
        if len(self.names) != self.labels.size:
            raise ValueError(f"{description}: {len(self.names)} names for {self.labels.size} labels")
        if not self.classes:
            raise ValueError(f"{description}: no classes")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            i = int(np.flatnonzero((self.labels < 0) | (self.labels >= len(self.classes)))[0])
            raise ValueError(
                f"{description}: label {int(self.labels[i])} of {self.names[i]} is outside the "
                f"{len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return int(self.labels.size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, {len(self)} samples, {self.num_classes} classes)"

    def image(self, i: int):
        """Sample ``i`` as an 8-bit RGB PIL image; raises when it cannot be decoded."""
        raise NotImplementedError

    def undecodable(self, positions: Sequence[int]) -> list[tuple[str, str]]:
        """(name, reason) for each of ``positions`` that cannot be decoded in full: how a loader names the sample
        its pipeline failed on."""
        bad = []
        for i in dict.fromkeys(int(p) for p in positions):
            try:
                self.image(i).load()
            except Exception as e:  # any decoder error names a bad sample
                bad.append((self.names[i], f"{type(e).__name__}: {e}"))
        return bad

    def check(self, num_threads: int = 4, max_pixels: int | None = MAX_PIXELS) -> list[str | None]:
        """Per sample, why it cannot be used (None when it looks decodable): the loaders' up-front validation."""
        return [None] * len(self)


class ImageFolderSource(ClassificationSource):
    """Image files with labels: ``from_folder`` reads a class-folder tree, the constructor takes lists."""

    kind = "files"

    def __init__(self, files: Sequence[str | os.PathLike], labels, classes: Sequence[str], description: str = ""):
        self.files = [os.fspath(f) for f in files]
        super().__init__(labels, classes, self.files, description or f"{len(self.files)} image files")

    @classmethod
    def from_folder(cls, root: str | os.PathLike, classes: Sequence[str] | None = None) -> ImageFolderSource:
        """The class folders under ``root``. ``classes`` (the training set's, for a validation folder) fixes the
        labels: a subfolder of ``root`` not among them is an error naming it, raised before any file is listed.
        Files lying directly in ``root`` belong to no class: left out with a warning naming them."""
        root = Path(root)
        found = class_folders(root)
        if classes is None:
            classes = found
        else:
            classes = [str(c) for c in classes]
            extra = sorted(set(found) - set(classes))
            if extra:
                shown = ", ".join(extra[:20]) + (f" ... ({len(extra)} in all)" if len(extra) > 20 else "")
                raise ValueError(
                    f"{str(root)!r} holds class folders that the training classes lack: {shown}; a classifier "
                    f"trained on the {len(classes)} training classes cannot predict them"
                )
        index = {c: k for k, c in enumerate(classes)}
        files, labels, stray = [], [], []
        for f in list_images(root):
            parts = Path(os.path.relpath(f, root)).parts
            if len(parts) < 2:
                stray.append(f)
                continue
            files.append(f)
            labels.append(index[parts[0]])
        if stray:
            warnings.warn(
                f"{str(root)!r}: leaving out {len(stray)} files outside any class folder: {'; '.join(stray[:20])}",
                stacklevel=2,
            )
        if not files:
            raise ValueError(f"the class folders of {str(root)!r} hold no files")
        empty = sorted(set(found) - {classes[k] for k in set(labels)})
        if empty:
            warnings.warn(f"{str(root)!r}: class folders without files: {', '.join(empty[:20])}", stacklevel=2)
        return cls(files, labels, classes, description=str(root))

    def image(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return to_rgb(im)

    def undecodable(self, positions: Sequence[int]) -> list[tuple[str, str]]:
        return find_undecodable([self.files[int(p)] for p in dict.fromkeys(int(p) for p in positions)])


def open_image_source(data, *, num_threads: int = 4) -> ClassificationSource:
    """Images without labels, for pretraining, as one class (every label 0, of class ``UNLABELLED``): WebDataset
    tar shards where ``data`` is a shard spec (``is_shard_spec``: .tar paths, braces allowed, or a folder of .tar
    files; ``WebDatasetSource`` with ``labelled=False``, indexed in ``num_threads`` threads), else the image files
    ``files.list_images`` finds (a folder searched recursively, class subfolders or not; a text file list; a list
    of paths)."""
    if is_shard_spec(data):
        return WebDatasetSource(data, num_threads=num_threads, labelled=False)
    files = list_images(data)
    desc = "" if isinstance(data, (list, tuple)) else os.fspath(data)
    return ImageFolderSource(files, np.zeros(len(files), dtype=np.int64), [UNLABELLED], description=desc)


def class_folders(root: str | os.PathLike) -> list[str]:
    """The sorted names of ``root``'s subfolders (symlinks to folders included, hidden ones left out): the classes
    of a class-folder tree. No subfolder is an error."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"class folder root {str(root)!r} does not exist or is not a folder")
    names = sorted(e.name for e in os.scandir(root) if not e.name.startswith(".") and e.is_dir())
    if not names:
        raise ValueError(f"{str(root)!r} has no class subfolders (expected {root}/<class>/<image files>)")
    return names


def split_holdout(
    files: Sequence, labels, val_fraction: float, seed: int = 0
) -> tuple[tuple[list, np.ndarray], tuple[list, np.ndarray]]:
    """A deterministic held-out split, stratified per class: ((train_files, train_labels), (val_files,
    val_labels)), each in the input order. Class ``c`` with n samples gives round(n * val_fraction) of them to
    val, at least 1 when n >= 2 and never all of them (a class of one sample stays in train); which ones is a
    permutation seeded by (seed, c), so the split depends on neither the other classes nor the platform."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(files) != labels.size:
        raise ValueError(f"split_holdout: {len(files)} files but {labels.size} labels")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    is_val = np.zeros(labels.size, dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = members.size
        k = min(max(int(round(n * val_fraction)), 1 if n >= 2 else 0), n - 1)
        chosen = np.random.default_rng(mix_seeds(seed, int(c), 0x4E1D)).permutation(n)[:k]
        is_val[members[chosen]] = True
    train = [f for f, v in zip(files, is_val) if not v], labels[~is_val]
    val = [f for f, v in zip(files, is_val) if v], labels[is_val]
    return train, val


# ---------------------------------------------------------------------------------------------------- CIFAR-100


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles written by Python 3 use it for bytes, limited to latin-1."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}: only latin-1 text is accepted")
    return text.encode("latin1")


def _numpy_globals() -> dict:
    """What pickled numpy arrays refer to, under numpy 1's and numpy 2's module names."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
    # Protocol 5 pickles (the default from Python 3.14) rebuild arrays from a buffer.
    if hasattr(numeric, "_frombuffer"):
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(mod, "_frombuffer")] = numeric._frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves the globals numpy arrays need and refuses every other one, before it could be called."""

    def __init__(self, f, path: str):
        super().__init__(f, encoding="bytes")  # Python 2 str -> bytes, as the CIFAR page's own snippet reads them
        self.path = path
        self.allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"{self.path}: refusing to unpickle {module}.{name}: a CIFAR file holds only numpy arrays, lists, "
                "numbers and strings (unpickling other globals can run arbitrary code)"
            )
        return found


def read_cifar_pickle(path: str | os.PathLike) -> dict:
    """One CIFAR python file as a dict with str keys, read without executing pickled code (see the module
    docstring). A refused global or a malformed file is a ValueError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, path).load()
    except pickle.UnpicklingError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(path) else f"{path} is not a CIFAR python file ({msg})") from None
    except Exception as e:  # truncated or malformed pickles fail in assorted ways; an allowed callable's bad args too
        raise ValueError(f"{path} is not a CIFAR python file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected the dict of a CIFAR python file")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _names(values, path: str, key: str) -> list[str]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (bytes, str)) for v in values):
        raise ValueError(f"{path}: {key!r} must be a list of strings")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values]


class Cifar100Source(ClassificationSource):
    """CIFAR-100's ``train`` or ``test`` file, decoded: ``pixels`` [N, 32, 32, 3] uint8 RGB."""

    kind = "pixels"

    def __init__(self, pixels: np.ndarray, labels, classes: Sequence[str], description: str):
        self.pixels = pixels
        super().__init__(labels, classes, [f"{description}[{i}]" for i in range(len(pixels))], description)

    @classmethod
    def load(cls, root: str | os.PathLike, split: str = "train", label_kind: str = "fine") -> Cifar100Source:
        """``root``: the ``cifar-100-python`` folder or a folder holding it. ``split``: "train", or "test" (also
        called "val"). ``label_kind``: "fine" (100 classes) or "coarse" (20). Class names come from ``meta`` when
        it is there, else are the label numbers."""
        if label_kind not in CIFAR_LABELS:
            raise ValueError(f"label_kind must be 'fine' or 'coarse', got {label_kind!r}")
        split = {"val": "test"}.get(split, split)
        if split not in ("train", "test"):
            raise ValueError(f"CIFAR-100 split must be 'train' or 'test' ('val'), got {split!r}")
        folder = find_cifar100(root)
        if folder is None:
            raise FileNotFoundError(f"no CIFAR-100 python files (train, test, meta) in {os.fspath(root)!r}")
        path = str(folder / split)
        d = read_cifar_pickle(path)
        data, labels = d.get("data"), d.get(f"{label_kind}_labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
            raise ValueError(f"{path}: 'data' must be a uint8 array [N, 3072] (32x32 RGB planes), got {got}")
        if labels is None:
            raise ValueError(f"{path} has no '{label_kind}_labels'")
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.shape != (data.shape[0],):
            raise ValueError(
                f"{path}: '{label_kind}_labels' must be {data.shape[0]} integers, got {labels.dtype} "
                f"{list(labels.shape)}"
            )
        num = CIFAR_LABELS[label_kind]
        classes = [str(k) for k in range(num)]
        meta_path = folder / "meta"
        if meta_path.exists():
            meta = read_cifar_pickle(meta_path)
            key = f"{label_kind}_label_names"
            if key not in meta:
                raise ValueError(f"{meta_path} has no {key!r}")
            classes = _names(meta[key], str(meta_path), key)
            if len(classes) != num:
                raise ValueError(f"{meta_path}: {len(classes)} {label_kind} class names, CIFAR-100 has {num}")
        bad = np.flatnonzero((labels < 0) | (labels >= num))
        if bad.size:
            raise ValueError(f"{path}: label {int(labels[bad[0]])} of sample {int(bad[0])} is outside 0..{num - 1}")
        pixels = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # planes -> [N, H, W, C]
        return cls(pixels, labels, classes, path)

    def image(self, i: int):
        from PIL import Image

        return Image.fromarray(self.pixels[i], "RGB")


def find_cifar100(root: str | os.PathLike) -> Path | None:
    """The folder holding CIFAR-100's ``train`` and ``test`` files: ``root`` itself or ``root/cifar-100-python``."""
    root = Path(root)
    for folder in (root, root / "cifar-100-python"):
        if (folder / "train").is_file() and (folder / "test").is_file():
            return folder
    return None


# ---------------------------------------------------------------------------------------------------- WebDataset

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(spec: str) -> list[str]:
    """Shell-style brace expansion of a shard spec: ``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar;
    ``{x,y}`` lists; several groups multiply. An unbalanced or empty group is an error naming the spec."""
    m = _BRACE.search(spec)
    if m is None:
        if "{" in spec or "}" in spec:
            raise ValueError(f"shard spec {spec!r} has an unbalanced brace")
        return [spec]
    body, head, tail = m.group(1), spec[: m.start()], spec[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        if int(b) < int(a):
            raise ValueError(f"shard spec {spec!r}: the range {{{body}}} runs backwards")
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        items = [str(k).zfill(width) for k in range(int(a), int(b) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(f"shard spec {spec!r}: {{{body}}} is neither a range {{A..B}} nor a list {{x,y}}")
    return [s for item in items for s in expand_braces(head + item + tail)]


def resolve_shards_spec(spec) -> list[str]:
    """The tar files a WebDataset spec names: a brace pattern, a list of paths (each may hold braces), or a
    folder (its ``.tar`` files, sorted). Each must exist: a missing one is an error naming it."""
    if isinstance(spec, (list, tuple)):
        paths = [p for s in spec for p in expand_braces(os.fspath(s))]
    else:
        spec = os.fspath(spec)
        if os.path.isdir(spec):
            paths = sorted(str(p) for p in Path(spec).iterdir() if p.name.endswith(".tar") and p.is_file())
            if not paths:
                raise ValueError(f"folder {spec!r} holds no .tar shards")
        else:
            paths = expand_braces(spec)
    if not paths:
        raise ValueError("the shard list is empty")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard {missing[0]!r} does not exist{more}")
    return paths


def is_shard_spec(spec) -> bool:
    """Whether ``spec`` looks like WebDataset shards: .tar paths (braces allowed) or a folder of .tar files. A flat
    folder that mixes .tar files with others is an error: neither reading would be all of it."""
    if isinstance(spec, (list, tuple)):
        return bool(spec) and all(os.fspath(s).endswith(".tar") for s in spec)
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        if class_like(spec):
            return False
        files = [p.name for p in Path(spec).iterdir() if p.is_file() and not p.name.startswith(".")]
        tars = [f for f in files if f.endswith(".tar")]
        if tars and len(tars) < len(files):  # reading either kind alone would silently drop the other
            others = sorted(set(files) - set(tars))
            raise ValueError(
                f"{spec} holds both .tar shards ({len(tars)}) and other files ({len(others)}, e.g. {others[0]}): "
                "give the shards or the images a folder of their own"
            )
        return bool(tars)
    return spec.endswith(".tar")


def class_like(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` has non-hidden subfolders (a class-folder tree rather than a folder of shards)."""
    with os.scandir(folder) as entries:  # closed even when any() stops early
        return any(not e.name.startswith(".") and e.is_dir() for e in entries)


def _index_shard(path: str, labelled: bool = True) -> tuple[list[tuple[str, int, int, int]], list[tuple[str, str]]]:
    """One shard's samples as (key, image offset, image size, label), in member order, and its bad samples as
    (``SHARD:KEY``, reason). Unlabelled (``labelled=False``), the ``cls`` members are not read and every label is
    0: a sample needs only its image."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00":
        raise ValueError(f"shard {path!r} is compressed: it must be a plain .tar, so that samples are read by seeking")
    entries: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = posixpath.basename(m.name)
                if base.startswith(".") or "." not in base:
                    continue  # hidden files (e.g. macOS ._ twins) and extension-less members belong to no field
                stem, ext = base.split(".", 1)
                key = posixpath.join(posixpath.dirname(m.name), stem)
                e = entries.setdefault(key, {"images": [], "label": None, "error": None})
                ext = ext.lower()
                if ext in WDS_IMAGE_EXTENSIONS:
                    e["images"].append((ext, m.offset_data, m.size))
                elif ext == WDS_LABEL_EXTENSION and labelled:
                    text = tf.extractfile(m).read()
                    try:
                        e["label"] = int(text.decode("ascii").strip())
                    except (UnicodeDecodeError, ValueError):
                        e["error"] = f"label {text[:20]!r} is not a decimal integer"
    except tarfile.TarError as err:
        raise ValueError(f"shard {path!r} is not a readable tar file ({err})") from None
    samples, bad = [], []
    for key, e in entries.items():
        name = f"{path}:{key}"
        if e["error"]:
            bad.append((name, e["error"]))
        elif not e["images"]:
            bad.append((name, f"no image ({', '.join(WDS_IMAGE_EXTENSIONS)})"))
        elif len(e["images"]) > 1:
            bad.append((name, f"{len(e['images'])} images ({', '.join(x[0] for x in e['images'])}), expected one"))
        elif labelled and e["label"] is None:
            bad.append((name, f"no label ({WDS_LABEL_EXTENSION})"))
        elif labelled and e["label"] < 0:
            bad.append((name, f"negative label {e['label']}"))
        else:
            _, offset, size = e["images"][0]
            samples.append((key, offset, size, e["label"] if labelled else 0))
    return samples, bad


class WebDatasetSource(ClassificationSource):
    """Samples of WebDataset tar shards (see the module docstring), read by seeking to their image members."""

    kind = "encoded"

    def __init__(
        self, shards, *, classes: Sequence[str] | int | None = None, num_threads: int = 4, labelled: bool = True
    ):
        """``shards``: a spec (see ``resolve_shards_spec``). ``classes``: the class names or their number (a
        validation set takes the training set's); by default the labels' maximum plus one, named by number. Every
        shard is indexed (member headers and the ``cls`` members are read) when the source is made.
        ``labelled=False`` (pretraining): labels are ignored, ``cls`` members not read, and a sample needs only its
        image; every label is 0, of one class, ``UNLABELLED``."""
        if not labelled and classes is not None:
            raise ValueError("an unlabelled shard source has one class: pass no classes")
        self.shards = resolve_shards_spec(shards)
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            indexed = list(pool.map(lambda path: _index_shard(path, labelled), self.shards))
        shard_of, offsets, sizes, labels, names, bad = [], [], [], [], [], []
        for s, (samples, shard_bad) in enumerate(indexed):
            bad.extend(shard_bad)
            for key, offset, size, label in samples:
                shard_of.append(s)
                offsets.append(offset)
                sizes.append(size)
                labels.append(label)
                names.append(f"{self.shards[s]}:{key}")
        if not names:
            first = f" (the first bad sample: {bad[0][0]}: {bad[0][1]})" if bad else ""
            raise ValueError(f"the {len(self.shards)} shards hold no usable samples{first}")
        if not labelled:
            classes = [UNLABELLED]
        elif classes is None:
            classes = max(labels) + 1
        if isinstance(classes, int):
            classes = [str(k) for k in range(classes)]
        self.shard_of = np.asarray(shard_of, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        desc = self.shards[0] if len(self.shards) == 1 else f"{len(self.shards)} shards from {self.shards[0]}"
        super().__init__(labels, classes, names, desc)
        self.bad_samples = bad

    def read(self, i: int) -> bytes:
        """The encoded image of sample ``i``."""
        with open(self.shards[self.shard_of[i]], "rb") as f:
            f.seek(int(self.offsets[i]))
            data = f.read(int(self.sizes[i]))
        if len(data) != self.sizes[i]:
            raise OSError(f"{self.names[i]}: the shard ends inside the image ({len(data)} of {self.sizes[i]} bytes)")
        return data

    def image(self, i: int):
        from PIL import Image

        with Image.open(io.BytesIO(self.read(i))) as im:
            return to_rgb(im)

    def check(self, num_threads: int = 4, max_pixels: int | None = MAX_PIXELS) -> list[str | None]:
        """Per sample, ``files.check_image`` of its image's bytes (each image is read in full once)."""

        def one(i):
            try:
                return check_image(self.read(i), max_pixels)
            except OSError as e:
                return f"unreadable ({e})"

        return check_many(one, range(len(self)), num_threads)


# ---------------------------------------------------------------------------------------------------- entry point


def open_classification_source(
    data,
    split: str = "train",
    *,
    classes: Sequence[str] | int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    cifar_labels: str = "fine",
    num_threads: int = 4,
) -> ClassificationSource:
    """The ``split`` ("train" or "val") of the data set at ``data``, whichever format it is in:
        CIFAR-100       a ``cifar-100-python`` folder or its parent: ``train``, or ``test`` for "val"
        WebDataset      a shard spec (pattern, list, folder of .tar files): the shards themselves, whatever split
        ImageNet style  a folder with ``train/`` (and ``val/``): that split's class folders, labelled by the train
                        classes; ``train/`` and ``val/`` may each be a folder of .tar shards instead
        one folder      class folders without ``train/``: all of it, or with ``val_fraction`` its part of
                        ``split_holdout(files, labels, val_fraction, seed)``
    ``classes``: the class names (or their number) to label by, for a validation set opened on its own; a
    class-folder validation set checks its folders against them (or against ``train/``'s) before listing files."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not isinstance(data, (list, tuple)):
        path = Path(data)
        if not path.exists() and "{" not in os.fspath(data):
            raise FileNotFoundError(f"data set {os.fspath(data)!r} does not exist")
        if path.is_dir() and find_cifar100(path) is not None:
            return Cifar100Source.load(path, split, cifar_labels)
    if is_shard_spec(data):
        return WebDatasetSource(data, classes=classes, num_threads=num_threads)
    path = Path(data)
    if (path / "train").is_dir():
        folder = path / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{str(path)!r} has no {split}/ folder")
        if is_shard_spec(folder):
            return WebDatasetSource(folder, classes=classes, num_threads=num_threads)
        if classes is None and split == "val":
            classes = class_folders(path / "train")
        return ImageFolderSource.from_folder(folder, classes=_class_names(classes))
    if val_fraction is None:
        if split == "val":
            raise ValueError(
                f"{str(path)!r} has no train/ and val/ folders: pass val_fraction to hold out part of it as the "
                "validation set"
            )
        return ImageFolderSource.from_folder(path, classes=_class_names(classes))
    whole = ImageFolderSource.from_folder(path, classes=_class_names(classes))
    train, val = split_holdout(whole.files, whole.labels, val_fraction, seed)
    files, labels = train if split == "train" else val
    desc = f"{path} ({split} part of a {val_fraction:g} hold-out split, seed {seed})"
    return ImageFolderSource(files, labels, whole.classes, description=desc)


def _class_names(classes: Sequence[str] | int | None) -> list[str] | None:
    if classes is None:
        return None
    if isinstance(classes, int):
        raise ValueError("class folders are labelled by class names: pass the training set's classes, not a count")
    return [str(c) for c in classes]
