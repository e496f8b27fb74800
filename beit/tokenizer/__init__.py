"""Visual tokenizers: the targets of BEiT's masked image modeling.

Two kinds, chosen by a spec string (``load_tokenizer(spec)``, the trainer's ``--tokenizer``):

``dalle:PATH``
    The paper's tokenizer, the DALL-E dVAE encoder (8192 codes, 14x14 tokens of the 112 px view), read from
    OpenAI's ``encoder.pkl`` without the ``dall_e`` package and without running code from the file
    (:mod:`beit.tokenizer.dalle`). bf16/fp16 autocast, channels_last and ``torch.compile`` are options.
``kmeans:PATH``
    An offline tokenizer built by ``beit-tokenizer fit`` (:mod:`beit.tokenizer.kmeans`): mini-batch k-means over
    the raw 8x8 patches of the same view. It is NOT the paper's tokenizer: its tokens encode the colour and
    coarse texture of one patch, so pretraining with it is not comparable with the paper's results (losses,
    accuracies and fine-tuning numbers will differ, representations are expected to be weaker). It exists for
    machines that cannot download the DALL-E weights: tests, demos, throughput work.

Both take images [B, 3, H, W] already passed through :func:`map_pixels` ([0, 1] -> [0.1, 0.9]) and return
``get_codebook_indices(images)`` as int64 [B, (H/8)*(W/8)] in raster order (``get_codebook_indices(images,
positions)`` computes the tokens at positions [B, K] only, -1 elsewhere: the trainer passes the masked patches'
index); both expose ``vocab_size`` and ``input_size`` (112).

Command line::

    beit-tokenizer fit --data DIR --vocab-size 8192 --out kmeans8192.safetensors [--epochs 2] [--seed 0]
    beit-tokenizer info dalle:encoder.pkl
"""

from __future__ import annotations

import argparse
import sys

import torch

from beit.tokenizer.common import LOGIT_LAPLACE_EPS, VisualTokenizer, map_pixels, patchify, unmap_pixels
from beit.tokenizer.dalle import (
    DalleEncoder,
    RestrictedUnpickler,
    dalle_encoder_from_state_dict,
    load_dalle_encoder,
    read_dalle_state_dict,
)
from beit.tokenizer.kmeans import KMeansTokenizer, MiniBatchKMeans, fit_kmeans_tokenizer, nearest_centroid

KINDS = ("dalle", "kmeans")

__all__ = [
    "KINDS",
    "LOGIT_LAPLACE_EPS",
    "DalleEncoder",
    "KMeansTokenizer",
    "MiniBatchKMeans",
    "RestrictedUnpickler",
    "VisualTokenizer",
    "dalle_encoder_from_state_dict",
    "fit_kmeans_tokenizer",
    "load_dalle_encoder",
    "load_tokenizer",
    "main",
    "map_pixels",
    "nearest_centroid",
    "patchify",
    "read_dalle_state_dict",
    "unmap_pixels",
]


def load_tokenizer(
    spec: str,
    device: torch.device | str | None = None,
    *,
    precision: str = "auto",
    channels_last: bool | None = None,
    compile: bool | dict = False,
    check_range: bool = True,
    fused: bool | str = "auto",
) -> VisualTokenizer:
    """A frozen tokenizer from ``"dalle:PATH"`` or ``"kmeans:PATH"``, on ``device`` (CPU when None).

    ``precision`` ("auto": bf16 on sm80+, fp16 on older GPUs, fp32 on CPU), ``channels_last`` (None: on CUDA
    only), ``compile`` and ``fused`` (the glue in ``beit_kernels.conv_epilogue``: "auto", True or False; see
    ``DalleEncoder.configure``) apply to the DALL-E encoder; the k-means tokenizer always computes distances in fp32.
    ``check_range`` makes every call verify that its input went through map_pixels (one host sync per call)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"tokenizer spec must be 'dalle:PATH' or 'kmeans:PATH', got {spec!r}")
    kind, path = spec.split(":", 1)
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r} in {spec!r}: expected 'dalle:PATH' or 'kmeans:PATH'")
    if not path:
        raise ValueError(f"tokenizer spec {spec!r} has no path after '{kind}:'")
    device = torch.device(device) if device is not None else None
    if kind == "dalle":
        if channels_last is None:
            channels_last = device is not None and device.type == "cuda"
        return load_dalle_encoder(
            path,
            device,
            precision=precision,
            channels_last=channels_last,
            compile=compile,
            check_range=check_range,
            fused=fused,
        )
    tok = KMeansTokenizer.load(path, device=device)
    tok.check_range = check_range
    return tok


def _describe(tok: VisualTokenizer) -> dict[str, str]:
    info = {
        "kind": type(tok).__name__,
        "vocab_size": str(tok.vocab_size),
        "input_size": str(tok.input_size),
        "tokens per image": f"{tok.num_tokens(tok.input_size)} ({tok.input_size // tok.patch_size} per side)",
        "parameters": f"{sum(t.numel() for t in tok.state_dict().values()):,}",
    }
    if isinstance(tok, DalleEncoder):
        info.update({k: str(v) for k, v in tok.config.items()})
    if isinstance(tok, KMeansTokenizer):
        info.update({f"meta {k}": v for k, v in sorted(tok.metadata.items())})
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beit-tokenizer", description="Fit or inspect BEiT visual tokenizers.")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser(
        "fit",
        help="fit a k-means tokenizer on a folder of images (not the paper's tokenizer: see beit.tokenizer.kmeans)",
    )
    fit.add_argument("--data", required=True, help="folder (tree) of images")
    fit.add_argument("--vocab-size", type=int, default=8192, help="number of codes (default 8192, as DALL-E)")
    fit.add_argument("--out", required=True, help="output .safetensors file")
    fit.add_argument("--epochs", type=int, default=1, help="passes over the images, new random crops each (default 1)")
    fit.add_argument("--batch-size", type=int, default=64, help="images per k-means update (default 64)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--input-size", type=int, default=112, help="side of the tokenized view (default 112)")
    fit.add_argument("--max-images", type=int, default=None, help="use a seeded random subset of this many images")
    fit.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    fit.add_argument("--workers", type=int, default=None, help="image decoding processes (default min(4, cpus))")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")
    info = sub.add_parser("info", help="describe a tokenizer given by its spec (dalle:PATH or kmeans:PATH)")
    info.add_argument("spec")
    args = parser.parse_args(argv)

    try:
        if args.command == "fit":
            tok = fit_kmeans_tokenizer(
                args.data,
                args.vocab_size,
                args.out,
                seed=args.seed,
                epochs=args.epochs,
                batch_size=args.batch_size,
                input_size=args.input_size,
                device=args.device,
                workers=args.workers,
                max_images=args.max_images,
                progress=not args.no_progress,
            )
            m = tok.metadata
            print(
                f"wrote {args.out}: {tok.vocab_size} codes from {m['n_images']} images, {m['epochs']} epoch(s); "
                f"quantisation error (MSE per value) first batch {m['quantization_error_first_batch']}, "
                f"last epoch {m['quantization_error_last_epoch']}"
            )
            print(f"use it with the tokenizer spec kmeans:{args.out} (not the paper's DALL-E tokenizer)")
        else:
            tok = load_tokenizer(args.spec)
            d = _describe(tok)
            width = max(len(k) for k in d)
            for k, v in d.items():
                print(f"{k:<{width}}  {v}")
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError, RuntimeError) as e:
        print(f"beit-tokenizer: error: {e}", file=sys.stderr)
        return 2
    return 0
