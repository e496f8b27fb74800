"""The data set's files: listing (folders, file lists, sequences), the image signature sniff, the up-front
validation that sets bad files aside, and the decode check that names a file a pipeline failed on."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The formats DALI decodes (nvidia-dali 2.4 cannot decode GIF; TIFF is left out, untested); the reference loader is
# held to the same set so both loaders see the same files.
SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")
# The default pixel limit (``max_pixels``): 64 megapixels (8192 x 8192), some 300 times an average ImageNet image
# (about 400 x 350) and far above its largest, under PIL's own decompression-bomb limit (89 megapixels); one
# 8-bit RGB image that size decodes to 192 MiB.
MAX_PIXELS = 64 * 2**20
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


class BadImageError(RuntimeError):
    """An image file that cannot be read or decoded (the message names it)."""


def list_images(
    source: str | os.PathLike | Sequence[str | os.PathLike], *, extensions: Sequence[str] | None = None
) -> list[str]:
    """The image files of an ImageFolder (class subfolders, labels ignored) or flat folder, searched recursively and
    sorted; of a text file list (one path per line, relative paths taken from the list's folder, ``#`` comments);
    or of a Python sequence of paths. Files with a non-image extension in folders are included so that validation
    reports them rather than silently dropping them, except hidden files.

    ``extensions`` (e.g. ``(".jpg", ".png")``, compared case-insensitively) keeps only the files whose names end
    with one of them, whatever the source, for a caller that reads the files without validating them. An empty
    result is an error."""
    if isinstance(source, (list, tuple)):
        files = [os.fspath(p) for p in source]
        if not files:
            raise ValueError("the file list is empty")
        where = "the file list"
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"data source {str(path)!r} does not exist")
        if path.is_file():
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            files = [str(p if Path(p).is_absolute() else path.parent / p) for p in lines if p and not p.startswith("#")]
            if not files:
                raise ValueError(f"file list {str(path)!r} names no files")
        else:
            files = _walk_files(path)
            if not files:
                raise ValueError(f"data folder {str(path)!r} holds no files")
        where = repr(str(path))
    if extensions is not None:
        suffixes = tuple(e.lower() for e in extensions)
        files = [f for f in files if f.lower().endswith(suffixes)]
        if not files:
            raise ValueError(f"no files ending in {', '.join(extensions)} in {where}")
    return files


def to_rgb(im):
    """``im`` (a PIL image) as 8-bit RGB, as DALI's decoder gives it. 16-bit grey (modes "I;16*", and "I", which
    is how PIL may open a 16-bit grey PNG) is scaled to 8 bits by round(v / 257), DALI's scaling, where PIL's own
    ``convert("RGB")`` clips at 255 and turns a full-range image white; values outside 0..65535 are clipped. PIL
    opens 16-bit RGB(A) PNGs as 8-bit RGB(A) (the high byte: within 1 of DALI's rounding). 32-bit float pixels
    (mode "F") have no agreed scale: refused, naming the mode (``check_image`` sets such files aside)."""
    import numpy as np
    from PIL import Image

    if im.mode == "F":
        raise ValueError("unsupported pixel mode F (32-bit float)")
    if im.mode == "I" or im.mode.startswith("I;16"):
        v = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        return Image.fromarray(((v + 128) // 257).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def _walk_files(root: Path) -> list[str]:
    """The files under ``root``, hidden files and folders left out, sorted. Symlinked folders are followed (a data
    set assembled from links to class folders elsewhere), each real folder listed once: a link to a folder already
    listed (an ancestor: a loop; or a second link to the same folder) is skipped, with one warning naming them.
    Symlinked files are listed; broken links are not."""
    seen = {_dir_key(root)}
    skipped = []
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            sub = os.path.join(dirpath, d)
            key = _dir_key(sub)
            if key is None:
                continue
            if key in seen:
                skipped.append(f"{sub} -> {os.path.realpath(sub)}")
                continue
            seen.add(key)
            keep.append(d)
        dirnames[:] = keep
        names = (f for f in filenames if not f.startswith("."))
        files.extend(str(Path(dirpath, f)) for f in names if os.path.isfile(os.path.join(dirpath, f)))
    if skipped:
        warnings.warn(
            f"data folder {str(root)!r}: skipping {len(skipped)} symlinked folders already listed through another "
            f"path (a link to an ancestor, or a second link to one folder): {'; '.join(skipped[:20])}",
            stacklevel=4,
        )
    return sorted(files)


def _dir_key(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of the folder ``path`` leads to, links followed; None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _image_format(head: bytes) -> str | None:
    """The format a file's first bytes announce ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF"), or None."""
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


def check_image(image: str | os.PathLike | bytes, max_pixels: int | None = MAX_PIXELS) -> str | None:
    """Why ``image`` cannot be used, or None when it looks decodable. ``image`` is a file's path, or an encoded
    image's bytes (a tar member). An image of more than ``max_pixels`` pixels (None: no limit of ours) is refused
    from its header, before any decoding, as is one that PIL's own decompression-bomb check refuses.

    Cheap (a file: a few KiB read): the signature, the header as PIL parses it, and the end-of-image marker of JPEG
    and PNG images, which is what truncation removes. An image corrupted in the middle passes; the loaders then
    name it when decoding fails."""
    from PIL import Image

    encoded = isinstance(image, (bytes, bytearray, memoryview))
    try:
        if encoded:
            data = bytes(image)
            size, head, tail = len(data), data[:16], data[-4096:]
        else:
            size = os.path.getsize(image)
            with open(image, "rb") as f:
                head = f.read(16)
                f.seek(max(0, size - 4096))
                tail = f.read()
        if size == 0:
            return "empty image" if encoded else "empty file"
        fmt = _image_format(head)
        if fmt is None:
            return "not an image (unknown file signature)"
        if fmt not in SUPPORTED_FORMATS:
            return f"unsupported image format {fmt} (supported: {', '.join(SUPPORTED_FORMATS)})"
        # Decoders tolerate bytes after the end marker, so look for it near the end rather than at the very end.
        if fmt == "JPEG" and b"\xff\xd9" not in tail:
            return "truncated JPEG (no end-of-image marker)"
        if fmt == "PNG" and b"IEND" not in tail[-64:]:
            return "truncated PNG (no IEND chunk)"
        with Image.open(io.BytesIO(data) if encoded else image) as im:
            (w, h), mode = im.size, im.mode
        if w < 1 or h < 1:
            return f"degenerate size {w}x{h}"
        if max_pixels is not None and w * h > max_pixels:
            return f"too large: {w}x{h} = {w * h} pixels, over max_pixels={max_pixels}"
        if mode == "F":
            return "unsupported pixel mode F (32-bit float)"
    except Image.DecompressionBombError as e:
        return f"too large ({e})"
    except OSError as e:  # for a path, the file system's errors too; for bytes, only PIL's
        return f"{'bad image header' if encoded else 'unreadable'} ({type(e).__name__}: {e})"
    except Exception as e:  # PIL raises assorted types on garbage headers; any of them means "bad image"
        return f"bad image header ({type(e).__name__}: {e})"
    return None


def check_many(check, items: Sequence, num_threads: int = 4) -> list[str | None]:
    """``check(item)`` for each of ``items`` (``check_image`` or a wrapper of it), in ``num_threads`` threads, with
    PIL's decompression-bomb warning silenced: the pixel check decides about such images. The warning filter is
    set here, once, because ``warnings.catch_warnings`` in several threads at once can leave a filter behind."""
    from PIL import Image

    with warnings.catch_warnings(), ThreadPoolExecutor(max(1, num_threads)) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return list(pool.map(check, items, chunksize=256))


def set_aside(
    bad: Sequence[tuple[str, str]], on_bad_file: str, *, first: str, noun: str, skipping: str, stacklevel: int
) -> None:
    """What happens to the (name, reason) pairs ``bad`` found up front: ``on_bad_file="error"`` raises
    ``BadImageError`` naming the first (``first`` names its kind, e.g. "bad image file"; ``noun`` the plural, e.g.
    "files"); ``"skip"`` warns once, ``skipping`` then the first 20 names with their reasons. ``stacklevel``
    counts from the caller."""
    if bad and on_bad_file == "error":
        name, reason = bad[0]
        more = f" (and {len(bad) - 1} more bad {noun})" if len(bad) > 1 else ""
        raise BadImageError(f"{first} {name}: {reason}{more}; pass on_bad_file='skip' to leave such {noun} out")
    if bad:
        shown = "; ".join(f"{name}: {reason}" for name, reason in bad[:20])
        more = f"; ... and {len(bad) - 20} more (loader.bad_files lists all)" if len(bad) > 20 else ""
        warnings.warn(f"{skipping}: {shown}{more}", stacklevel=stacklevel + 1)


def validate_images(
    files: Sequence[str], on_bad_file: str = "skip", num_threads: int = 4, max_pixels: int | None = MAX_PIXELS
) -> tuple[list[str], list[tuple[str, str]]]:
    """Split ``files`` into usable files and (file, reason) pairs. ``on_bad_file="error"`` raises on the first bad
    file (in list order), naming it; ``"skip"`` warns once, naming the files. An empty result is an error.
    ``max_pixels``: see ``check_image``."""
    if on_bad_file not in ("skip", "error"):
        raise ValueError(f"on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
    reasons = check_many(lambda f: check_image(f, max_pixels), files, num_threads)
    bad = [(f, r) for f, r in zip(files, reasons) if r is not None]
    skipping = f"skipping {len(bad)} of {len(files)} files that cannot be decoded"
    set_aside(bad, on_bad_file, first="bad image file", noun="files", skipping=skipping, stacklevel=5)
    good = [f for f, r in zip(files, reasons) if r is None]
    if not good:
        raise ValueError(f"no decodable images among {len(files)} files (first: {files[0]})")
    return good, bad


def find_undecodable(files: Sequence[str]) -> list[tuple[str, str]]:
    """(file, reason) for each of ``files`` that PIL cannot decode in full: how a loader names the file its
    pipeline failed on."""
    from PIL import Image

    bad = []
    for f in files:
        try:
            with Image.open(f) as im:
                to_rgb(im).load()
        except Exception as e:  # any decoder error names a bad file
            bad.append((f, f"{type(e).__name__}: {e}"))
    return bad
