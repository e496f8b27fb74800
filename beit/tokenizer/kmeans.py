"""An offline visual tokenizer: mini-batch k-means over the 8x8 patches of the 112 px view.

THIS IS NOT THE PAPER'S TOKENIZER. BEiT's targets are the codes of the DALL-E dVAE, a 54M-parameter network
trained on hundreds of millions of images, whose 8x8-pixel tokens each see a wide receptive field (its deepest
layers cover far more than the 8x8 patch) and encode shapes and textures. This tokenizer assigns each 8x8 patch,
on its own, to the nearest of ``vocab_size`` centroids in raw pixel space (mapped to [0.1, 0.9] as for the dVAE):
its tokens describe colour, brightness and coarse gradients of one patch and nothing else. Pretraining with it
predicts quantised local colour/texture rather than DALL-E codes, so losses, masked-token accuracies and
fine-tuning results are not comparable with the paper's, and representations are expected to be weaker. It exists
so a machine without the (often failing) download of ``encoder.pkl`` can still run the whole pipeline: tests,
demos, throughput work. For results that mean anything against the paper, use ``dalle:encoder.pkl``.

Fitting (``beit-tokenizer fit --data DIR --vocab-size N --out FILE``):
  * images: every .jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff/.ppm/.pgm file under DIR (any folder tree), read with
    PIL and converted to RGB;
  * views: BEiT's second view, a random resized crop (area 8-100 %, aspect 3/4-4/3, 10 tries then a centre crop),
    cropped then resized to 112 px with Lanczos (``beit.data.transforms``, as the reference loader's tokenizer
    view), flipped with probability 1/2; colour jitter is left out (it only widens the colour distribution the
    codebook must cover). Each epoch draws new crops;
  * patches: [0, 1] pixels through ``map_pixels`` then cut into 8x8x3 = 192-value vectors (channel-major);
  * initialisation: ``vocab_size`` distinct patches drawn at random from about three times as many;
  * updates: Sculley's mini-batch k-means (each centroid is the running mean of every patch ever assigned to it);
    centroids whose count falls below 1 % of the largest are moved onto patches drawn in proportion to their
    squared error, every 10 batches during the first three quarters of the run.
Everything random comes from ``--seed`` (crops from (seed, epoch, image index), so the number of loader workers
does not matter): on the CPU the result is bitwise reproducible; on a GPU, float atomics in the centroid sums
make it reproducible up to rounding.

The file is safetensors: one tensor ``codebook`` [vocab_size, 3 * 8 * 8] (fp32) and string metadata (format,
vocab_size, patch_size, input_size, channels, seed, epochs, image count, quantisation errors, date, versions).
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from beit.data import list_images, random_resized_crop_box, resized_crop
from beit.tokenizer.common import (
    VisualTokenizer,
    as_path,
    check_images,
    check_positions,
    map_pixels,
    patchify,
    scatter_positions,
    sniff_weights_file,
)

FORMAT = "beit-kmeans-tokenizer"
FORMAT_VERSION = "1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
EXPECTED_FILE = "a k-means tokenizer file (.safetensors written by 'beit-tokenizer fit')"


def nearest_centroid(
    x: torch.Tensor, codebook: torch.Tensor, codebook_sq: torch.Tensor | None = None, chunk_rows: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid (int64 [N]) and the squared distance to it ([N]) for rows x [N, D]."""
    if codebook_sq is None:
        codebook_sq = codebook.pow(2).sum(1)
    n = x.shape[0]
    idx = torch.empty(n, dtype=torch.long, device=x.device)
    d2 = torch.empty(n, dtype=x.dtype, device=x.device)
    # Chunks bound the [rows, vocab] score matrix (8192 x 8192 fp32 = 256 MiB).
    for s in range(0, n, chunk_rows):
        xs = x[s : s + chunk_rows]
        scores = torch.addmm(codebook_sq, xs, codebook.t(), alpha=-2)  # rows, vocab: |c|^2 - 2 x.c
        best, i = scores.min(dim=1)
        idx[s : s + chunk_rows] = i
        d2[s : s + chunk_rows] = (best + xs.pow(2).sum(1)).clamp_min_(0)
    return idx, d2


class MiniBatchKMeans:
    """Sculley's mini-batch k-means (WWW 2010) with sklearn-style reassignment of starved centroids."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        reassign_ratio: float = 0.01,
    ):
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        self.vocab_size, self.dim = vocab_size, dim
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.reassign_ratio = reassign_ratio
        self.centroids: torch.Tensor | None = None
        self.counts = torch.zeros(vocab_size, dtype=torch.float64, device=self.device)

    def init_from(self, patches: torch.Tensor) -> None:
        """Forgy initialisation from distinct rows: duplicates (flat patches repeat exactly) would start dead."""
        patches = torch.unique(patches.to(self.device, torch.float32), dim=0)  # sorted: deterministic
        if patches.shape[0] < self.vocab_size:
            raise ValueError(
                f"only {patches.shape[0]} distinct patches to initialise {self.vocab_size} centroids: use more "
                "images or a smaller vocabulary"
            )
        pick = torch.randperm(patches.shape[0], generator=self.generator, device=self.device)[: self.vocab_size]
        self.centroids = patches[pick].clone()
        self.counts.zero_()

    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return nearest_centroid(x, self.centroids)

    def partial_fit(self, x: torch.Tensor, reassign: bool = False) -> torch.Tensor:
        """One update with rows x [N, dim]; returns the batch's mean squared error per value *before* the update
        (a 0-d tensor: no host sync)."""
        if self.centroids is None:
            raise RuntimeError("call init_from before partial_fit")
        x = x.to(self.device, torch.float32)
        idx, d2 = self.assign(x)
        batch_counts = torch.bincount(idx, minlength=self.vocab_size)
        sums = torch.zeros_like(self.centroids).index_add_(0, idx, x)
        self.counts += batch_counts
        # Running mean of everything assigned so far: c += (sum - m c) / n, i.e. a per-sample rate of 1/n.
        rate = (1.0 / self.counts.clamp_min(1)).to(torch.float32)[:, None]
        self.centroids += (sums - batch_counts[:, None].to(torch.float32) * self.centroids) * rate
        if reassign:
            self._reassign(x, d2)
        return d2.mean() / self.dim

    def _reassign(self, x: torch.Tensor, d2: torch.Tensor) -> int:
        low = self.counts < self.reassign_ratio * self.counts.max()
        n_low = min(int(low.sum()), x.shape[0])
        if n_low == 0:
            return 0
        low_idx = low.nonzero().squeeze(1)[:n_low]
        # Draw badly served patches preferentially (the k-means++ rule); the epsilon keeps all-zero errors legal.
        picks = torch.multinomial(d2 + 1e-12, n_low, replacement=False, generator=self.generator)
        self.centroids[low_idx] = x[picks]
        kept = self.counts[~low]
        # Start them at the smallest surviving count so one batch neither freezes nor flings them.
        self.counts[low_idx] = kept.min() if kept.numel() else 1.0
        return n_low

    def quantization_error(self, x: torch.Tensor) -> float:
        """Mean squared error per value of rows x [N, dim] against the current centroids."""
        _, d2 = self.assign(x.to(self.device, torch.float32))
        return (d2.mean() / self.dim).item()


class KMeansTokenizer(VisualTokenizer):
    """Nearest-centroid tokens of the 8x8 patches of map_pixels'd images (see the module docstring)."""

    def __init__(
        self,
        codebook: torch.Tensor,
        *,
        patch_size: int = 8,
        input_size: int = 112,
        in_channels: int = 3,
        metadata: dict[str, str] | None = None,
    ):
        super().__init__()
        dim = in_channels * patch_size * patch_size
        if codebook.dim() != 2 or codebook.shape[1] != dim or codebook.shape[0] < 2:
            raise ValueError(
                f"codebook must have shape [vocab_size >= 2, {in_channels}*{patch_size}*{patch_size} = {dim}], "
                f"got {list(codebook.shape)}"
            )
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.vocab_size = codebook.shape[0]
        self.patch_size, self.input_size, self.in_channels = patch_size, input_size, in_channels
        self.register_buffer("codebook", codebook.detach().float().contiguous())
        self.register_buffer("codebook_sq", self.codebook.pow(2).sum(1), persistent=False)
        self.metadata = dict(metadata or {})
        self.chunk_rows = 8192

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, (H/8)*(W/8)] (int64, raster order) of images [B, 3, H, W] passed through map_pixels.
        Distances are computed in fp32 whatever the input dtype (about 1 % of the dVAE's work). With
        ``positions`` [B, K] (-1 padding) the ids elsewhere are -1, as the interface says (all are computed: the
        search is cheap)."""
        check_images(images, self.in_channels, self.patch_size, self.check_range)
        self.check_device(images)
        b = images.shape[0]
        x = patchify(images.float(), self.patch_size)  # B, N, D
        n = x.shape[1]
        if positions is not None:
            positions = check_positions(positions, b, n, images.device)
        idx, _ = nearest_centroid(x.reshape(b * n, -1), self.codebook, self.codebook_sq, self.chunk_rows)
        idx = idx.view(b, n)
        if positions is None:
            return idx
        return scatter_positions(idx.gather(1, positions.clamp(min=0)), positions, n)

    @torch.no_grad()
    def quantization_error(self, images: torch.Tensor) -> float:
        """Mean squared error per value between the patches of ``images`` and their centroids."""
        check_images(images, self.in_channels, self.patch_size, self.check_range)
        self.check_device(images)
        x = patchify(images.float(), self.patch_size).flatten(0, 1)  # B*N, D
        _, d2 = nearest_centroid(x, self.codebook, self.codebook_sq, self.chunk_rows)
        return (d2.mean() / x.shape[1]).item()

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        path = as_path(path)
        meta = {
            **{k: str(v) for k, v in self.metadata.items()},
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vocab_size": str(self.vocab_size),
            "patch_size": str(self.patch_size),
            "input_size": str(self.input_size),
            "channels": str(self.in_channels),
            "pixel_space": "map_pixels: [0, 1] -> [0.1, 0.9]",
            "patch_layout": "channel, row, column",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        save_file({"codebook": self.codebook.detach().cpu().contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, path)  # never leave a half-written file under the final name

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> KMeansTokenizer:
        from safetensors import SafetensorError, safe_open

        path = as_path(path)
        sniff_weights_file(path, EXPECTED_FILE)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            with open(path, "rb") as fh:
                head = fh.read(2)
            hint = ""
            if head in (b"PK", b"\x80\x02"):
                hint = " It is a torch file (the DALL-E encoder.pkl? load it with the spec dalle:PATH)."
            raise ValueError(f"{path} is not a safetensors file ({e}); expected {EXPECTED_FILE}.{hint}") from None
        if meta.get("format") != FORMAT:
            hint = " (DALL-E encoder weights? use dalle:PATH)" if "blocks.input.w" in tensors else ""
            raise ValueError(
                f"{path} is a safetensors file but not a k-means tokenizer{hint}: metadata format is "
                f"{meta.get('format')!r}, tensors {sorted(tensors)[:5]}; expected {EXPECTED_FILE}"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has k-means format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        if set(tensors) != {"codebook"}:
            raise ValueError(f"{path} holds tensors {sorted(tensors)}, expected only 'codebook'")
        try:
            vocab, patch, size, ch = (int(meta[k]) for k in ("vocab_size", "patch_size", "input_size", "channels"))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: missing or malformed metadata ({e}); expected {EXPECTED_FILE}") from None
        cb = tensors["codebook"]
        if list(cb.shape) != [vocab, ch * patch * patch]:
            raise ValueError(
                f"{path}: codebook has shape {list(cb.shape)}, but its metadata (vocab_size={vocab}, "
                f"channels={ch}, patch_size={patch}) requires [{vocab}, {ch * patch * patch}]"
            )
        if not torch.is_floating_point(cb) or not torch.isfinite(cb).all():
            raise ValueError(f"{path}: the codebook is not finite floating point ({cb.dtype})")
        tok = cls(cb, patch_size=patch, input_size=size, in_channels=ch, metadata=meta)
        return tok.to(device) if device is not None else tok


# ----------------------------------------------------------------------------------------------------------------
# Fitting from a folder of images


class ImageViews(torch.utils.data.Dataset):
    """uint8 [3, size, size] views; the crop of image i in epoch e depends only on (seed, e, i)."""

    def __init__(self, paths: list[Path], size: int, seed: int, epoch: int):
        self.paths, self.size, self.seed, self.epoch = paths, size, seed, epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except Exception as e:  # PIL raises several types for unreadable files
            raise ValueError(f"cannot read image {path}: {e}") from None
        # The epoch offset keeps the initialisation draws (epoch -1) apart from the training ones.
        rng = np.random.default_rng([self.seed, self.epoch + 1, i])
        box = random_resized_crop_box(im.width, im.height, rng)  # BEiT's RandomResizedCrop
        im = resized_crop(im, box, self.size, Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(im, dtype=np.uint8)  # H, W, 3
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _batches(
    paths: list[Path], order: Iterable[int], size: int, seed: int, epoch: int, batch_size: int, workers: int, pin: bool
):
    return torch.utils.data.DataLoader(
        ImageViews(paths, size, seed, epoch),
        batch_size=batch_size,
        sampler=list(order),
        num_workers=workers,
        pin_memory=pin,
    )


def fit_kmeans_tokenizer(
    data: str | os.PathLike,
    vocab_size: int = 8192,
    out: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    epochs: int = 1,
    batch_size: int = 64,
    input_size: int = 112,
    patch_size: int = 8,
    device: torch.device | str | None = None,
    workers: int | None = None,
    max_images: int | None = None,
    progress: bool = True,
) -> KMeansTokenizer:
    """Fit a :class:`KMeansTokenizer` on the images under ``data`` (see the module docstring) and save it to
    ``out`` when given. ``batch_size`` counts images (each gives (input_size/patch_size)^2 patches)."""
    from tqdm.auto import tqdm

    if vocab_size < 2 or epochs < 1 or batch_size < 1:
        raise ValueError(
            f"need vocab_size >= 2, epochs >= 1, batch_size >= 1; got {vocab_size}, {epochs}, {batch_size}"
        )
    if input_size % patch_size:
        raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be at least 1 (or left out for every image), got {max_images}")
    if out is not None and not str(out).endswith(".safetensors"):
        raise ValueError(f"--out {out}: the tokenizer is written as safetensors; give a path ending in .safetensors")
    root = as_path(data)
    if not root.exists():
        raise FileNotFoundError(f"--data {root} is not a folder; expected a folder (tree) of images")
    try:
        paths = [Path(p) for p in list_images(root, extensions=IMAGE_EXTENSIONS)]
    except ValueError:  # an empty folder or list, or no image among the files: said in this command's words
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}") from None
    if max_images is not None and max_images < len(paths):
        keep = np.random.default_rng([seed, 0]).permutation(len(paths))[:max_images]
        paths = [paths[i] for i in sorted(keep)]
    n = len(paths)
    tokens_per_image = (input_size // patch_size) ** 2
    if n * tokens_per_image < vocab_size:
        raise ValueError(
            f"{n} images give {n * tokens_per_image} patches per epoch, fewer than vocab_size={vocab_size}: "
            "use more images or a smaller vocabulary"
        )
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    pin = device.type == "cuda"
    dim = 3 * patch_size * patch_size
    km = MiniBatchKMeans(vocab_size, dim, seed=seed, device=device)

    def to_patches(u8: torch.Tensor) -> torch.Tensor:
        x = map_pixels(u8.to(device, non_blocking=True).float() / 255)
        return patchify(x, patch_size).reshape(-1, dim)  # B*N, 3*p*p

    # Initialise from about three vocabularies' worth of patches (sklearn's init_size is 3x the batch).
    n_init = min(n, math.ceil(3 * vocab_size / tokens_per_image))
    init_order = np.random.default_rng([seed, 1]).permutation(n)[:n_init].tolist()
    init = [to_patches(b) for b in _batches(paths, init_order, input_size, seed, -1, batch_size, workers, pin)]
    km.init_from(torch.cat(init))
    del init

    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    reassign_every, reassign_until = 10, int(0.75 * total)
    first_error = None
    bar = tqdm(total=total, desc="k-means", unit="batch", disable=not progress)
    step = 0
    for epoch in range(epochs):
        order = np.random.default_rng([seed, 2, epoch]).permutation(n).tolist()
        err_sum = torch.zeros((), dtype=torch.float64, device=device)
        for u8 in _batches(paths, order, input_size, seed, epoch, batch_size, workers, pin):
            reassign = step % reassign_every == reassign_every - 1 and step < reassign_until
            err = km.partial_fit(to_patches(u8), reassign=reassign)
            err_sum += err * u8.shape[0]
            if first_error is None:
                first_error = err.item()
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(mse=f"{err.item():.3g}")  # one sync every 10 batches
        last_epoch_error = (err_sum / n).item()
    bar.close()

    metadata = {
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "n_images": n,
        "data": str(as_path(data).resolve()),
        "preprocessing": "random resized crop (scale 0.08-1, ratio 3/4-4/3), lanczos, hflip 0.5, map_pixels",
        "quantization_error_first_batch": f"{first_error:.6g}",
        "quantization_error_last_epoch": f"{last_epoch_error:.6g}",
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "note": "not the paper's DALL-E tokenizer; see beit/tokenizer/kmeans.py",
    }
    tok = KMeansTokenizer(
        km.centroids.cpu(), patch_size=patch_size, input_size=input_size, in_channels=3, metadata=metadata
    )
    if out is not None:
        tok.save(out)
    return tok
