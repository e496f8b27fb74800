"""BEiT pretraining: ``beit-pretrain`` (also ``python -m beit.train``).

The step is the official engine's (unilm ``engine_for_pretraining.py``): the tokenizer labels the 112 px view
under no_grad, the model encodes the 224 px view with the masks, cross-entropy on the masked positions, backward,
gradient clipping, an AdamW step, and per-step learning-rate and weight-decay schedules (linear warm-up, cosine to
the minimum). Unlike the official engine, a step never synchronises with the host: loss, MIM accuracy, gradient
norm and the count of non-finite steps are accumulated on the device and read at log intervals only; a step whose
loss or gradients are not finite is skipped on the device (the fused AdamW step takes the GradScaler's found-inf
flag) and counted. So the step can also be captured once in a CUDA graph and replayed, tokenizer included
(``--cuda-graph``, one GPU: ``beit.graphs``).

Defaults reproduce the paper's BEiT-B/16 recipe on ImageNet-1k: 800 epochs, 2048 images per step (128 per GPU on
16 GPUs), lr 1.5e-3 (no batch-size scaling, as the official code), min lr 1e-5, 10 warm-up epochs, weight decay
0.05 with the official exclusions, betas (0.9, 0.999), clipping at 3.0, drop path 0.1, layer scale 0.1.

One GPU:
    beit-pretrain --data /data/imagenet/train --tokenizer dalle:/weights/encoder.pkl --output-dir runs/beit_b
One node, 8 GPUs (the global batch is batch size x GPUs x accumulation steps):
    torchrun --standalone --nproc_per_node=8 -m beit.train --data /data/imagenet/train \\
        --tokenizer dalle:/weights/encoder.pkl --batch-size 256 --output-dir runs/beit_b
Several nodes (run on every node; torchrun's c10d rendezvous, nothing home-made):
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 --rdzv-id=beit_b \\
        -m beit.train --data /data/imagenet/train --tokenizer dalle:/weights/encoder.pkl --batch-size 64
The demo (synthetic images, a k-means tokenizer fitted on them, a small BEiT, a few minutes on 2 CPU cores):
    beit-pretrain --demo

Options can also come from a YAML file (``--config run.yaml``, keys as the long option names with underscores);
command-line options override it. The resolved options are written to ``OUTPUT_DIR/args.yaml`` and into every
checkpoint. ``--resume auto`` (the default) continues from the newest checkpoint in the output folder, mid-epoch
included, without repeating or skipping samples.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

import beit
from beit.data import BadImageError
from beit.flops import peak_flops, tokenizer_flops_per_image, train_flops_per_image
from beit.optim import cosine_scheduler, fused_adamw
from beit_kernels.backend import native_bf16

CKPT_RE = re.compile(r"checkpoint-(\d+)\.pth$")
LOADERS = ("auto", "dali-gpu", "dali-cpu", "reference")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class TrainingError(RuntimeError):
    """A problem the user must fix (bad option, data, checkpoint): reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("beit-pretrain", description="BEiT masked image modeling pretraining.")
    p.add_argument("--config", help="YAML file of options (keys: long option names with underscores)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="beit_base_patch16_224", help="one of beit.list_models()")
    g.add_argument("--image-size", type=int, default=224, help="model view; the tokenizer view is half of it")
    g.add_argument("--depth", type=int, default=None, help="override the model's number of blocks")
    g.add_argument("--drop-path", type=float, default=0.1)
    g.add_argument("--layer-scale", type=float, default=None, help="layer scale init (model default: 0.1, 1e-5 large)")
    g.add_argument("--impl", default="auto", choices=beit.IMPLS, help="attention/kernels implementation")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    g.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="capture the whole step (tokenizer, forward, backward, clipping, AdamW, metrics) in a CUDA graph after "
        "3 eager steps and replay it: one GPU, --impl auto/sdpa/triton, not with --compile or torchrun",
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", help="image folder (ImageFolder or flat) or a text file list")
    g.add_argument("--tokenizer", help="visual tokenizer: dalle:PATH (encoder.pkl) or kmeans:PATH (.safetensors)")
    g.add_argument("--tokenizer-fused", default="auto", choices=("auto", "on", "off"),
                   help="the DALL-E encoder's glue in beit_kernels.conv_epilogue: auto = on CUDA (sm70+)")  # fmt: skip
    g.add_argument("--loader", default="auto", choices=LOADERS, help="auto: dali-gpu on CUDA, else dali-cpu/reference")
    g.add_argument("--num-workers", type=int, default=8, help="loader threads (DALI) or worker processes")
    g.add_argument("--normalization", default="imagenet", choices=("imagenet", "inception"))
    g.add_argument("--on-bad-file", default="skip", choices=("skip", "error"),
                   help="an unreadable or undecodable image: skip it with a warning naming it, or stop with an "
                   "error naming it (before training if its header is bad, else when it fails to decode)")  # fmt: skip
    g.add_argument("--num-mask-patches", type=int, default=75)
    g.add_argument("--min-mask-patches", type=int, default=16)
    g.add_argument("--max-mask-patches", type=int, default=None)
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=128, help="images per GPU (process) per micro-step")
    g.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="images per optimizer step over all GPUs; sets --batch-size to it / (GPUs x accum steps)",
    )
    g.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-steps per step")
    g.add_argument("--epochs", type=int, default=800)
    g.add_argument("--steps", type=int, default=0, help="total optimizer steps; overrides --epochs when > 0")
    g.add_argument("--lr", type=float, default=1.5e-3)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--warmup-epochs", type=float, default=10)
    g.add_argument("--warmup-steps", type=int, default=-1, help="overrides --warmup-epochs when >= 0")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--weight-decay-end", type=float, default=None, help="cosine end value (default: constant)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=3.0, help="max gradient norm; 0 disables clipping")
    g.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 where supported, fp16 on "
                   "older GPUs (with a gradient scaler), fp32 on CPU")  # fmt: skip
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/beit")
    g.add_argument("--resume", default="auto", help="auto (newest checkpoint in the output folder), none, or a path")
    g.add_argument("--ckpt-interval", type=int, default=0, help="also checkpoint every N steps (0: per epoch only)")
    g.add_argument("--keep-ckpts", type=int, default=3, help="how many checkpoints to keep")
    g.add_argument("--log-interval", type=int, default=50, help="steps between metric reads (the only host syncs)")
    g.add_argument("--max-nonfinite", type=int, default=10, help="stop after this many non-finite steps in a row")
    g.add_argument("--device", default="auto", help="auto, cuda or cpu")
    g.add_argument("--demo", action="store_true", help="synthetic data, a fitted k-means tokenizer, a small BEiT")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    # Fault injection for tests: make the loss non-finite at these global steps; interrupt (SIGINT) at a step.
    g.add_argument("--inject-nonfinite", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    g.add_argument("--inject-sigint", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    cfg = {}
    if known.config:
        cfg = _read_yaml(known.config)
        valid = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            parser.error(f"unknown option(s) in {known.config}: {', '.join(unknown)}")
        _check_config_values(parser, cfg, known.config)
        parser.set_defaults(**cfg)
    args = parser.parse_args(argv)
    if args.demo:
        _demo_defaults(args, sys.argv[1:] if argv is None else argv, set(cfg))
    _check_args(parser, args)
    return args


def _check_config_values(parser: argparse.ArgumentParser, cfg: dict, path: str) -> None:
    """A config file's values get the checks argparse gives the command line's (types, choices), which
    ``set_defaults`` skips: a ``precision: fp8`` must not quietly train in fp32."""
    actions = {a.dest: a for a in parser._actions}
    for key, v in cfg.items():
        a = actions[key]
        if v is None and a.default is None:  # an option that may be left unset
            continue
        problem = _config_value_problem(a, v)
        if problem:
            parser.error(f"{path}: {key}: {v!r} is not {problem}")


def _config_value_problem(a: argparse.Action, v) -> str | None:
    """What ``v`` should have been for option ``a``, or None when it fits."""
    if isinstance(a, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        return None if isinstance(v, bool) else "true or false"
    if a.type is int:
        check, want = (lambda x: isinstance(x, int) and not isinstance(x, bool)), "an integer"
    elif a.type is float:
        check, want = (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)), "a number"
    else:
        check, want = (lambda x: isinstance(x, str)), "a string"
    if a.nargs not in (None, "?"):  # a list option
        n = a.nargs if isinstance(a.nargs, int) else None
        if not isinstance(v, list) or (n is not None and len(v) != n) or not all(map(check, v)):
            return f"a list of {n or 'any number of'} values, each {want}"
        return None
    if a.choices is not None:
        return None if v in a.choices else f"one of {', '.join(map(str, a.choices))}"
    return None if check(v) else want


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TrainingError(f"cannot read the config file {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise TrainingError(f"{path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in cfg.items()}


DEMO = dict(
    model="beit_tiny_patch16_224",
    image_size=96,
    depth=4,
    batch_size=32,
    steps=200,
    warmup_steps=20,
    lr=2e-3,
    min_lr=1e-4,
    drop_path=0.0,
    num_mask_patches=14,
    min_mask_patches=4,
    log_interval=25,
    ckpt_interval=100,
    num_workers=2,
    output_dir="runs/demo",
)
# The demo's data and tokenizer, which are not options: args.yaml holds options only, so that it works as a --config.
DEMO_DATA = dict(
    images=400,
    # Sources a little larger than the 96 px views cropped from them: decoding 500 x 375 files would take the
    # second core from the training step for no better probe.
    image_size=(192, 144),
    vocab=64,
)


def _demo_defaults(args: argparse.Namespace, argv: list[str], configured: set[str]) -> None:
    """--demo changes the defaults the user did not set, on the command line or in the config file."""
    given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")} | configured
    for k, v in DEMO.items():
        if k not in given:
            setattr(args, k, v)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.model not in beit.list_models() and args.model not in ("beit_base_patch16_224_8k_vocab",
                                                                   "beit_large_patch16_224_8k_vocab"):  # fmt: skip
        parser.error(f"--model {args.model!r} is not one of {', '.join(beit.list_models())}")
    for name in ("batch_size", "accum_steps", "log_interval", "keep_ckpts", "max_nonfinite", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("lr", "min_lr", "warmup_epochs", "weight_decay", "clip_grad", "num_workers", "steps", "epochs",
                 "ckpt_interval"):  # fmt: skip
        v = getattr(args, name)
        if not (v >= 0 and math.isfinite(v)):  # NaN too
            parser.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if not (args.eps > 0 and math.isfinite(args.eps)):
        parser.error(f"--eps must be a finite number > 0, got {args.eps}")
    if not all(0 <= b < 1 for b in args.betas):
        parser.error(f"--betas must lie in [0, 1), got {' '.join(map(str, args.betas))}")
    if not 0 <= args.drop_path < 1:
        parser.error(f"--drop-path must lie in [0, 1), got {args.drop_path}")
    if args.weight_decay_end is not None and not args.weight_decay_end >= 0:
        parser.error(f"--weight-decay-end must be >= 0, got {args.weight_decay_end}")
    if args.layer_scale is not None and not args.layer_scale >= 0:
        parser.error(f"--layer-scale must be >= 0 (0: no layer scale), got {args.layer_scale}")
    for name in ("depth", "global_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output-dir {args.output_dir} exists and is not a folder")
    for a in parser._actions:  # the demo's defaults, too, meet the choices
        if a.choices is not None and getattr(args, a.dest, None) not in a.choices:
            parser.error(f"--{a.dest.replace('_', '-')} must be one of {', '.join(map(str, a.choices))}")
    if args.image_size % 16 != 0:
        # Patch 16 on the model view; the tokenizer view (half) then has stride-8 tokens on the same grid.
        parser.error(f"--image-size must be a multiple of 16, got {args.image_size}")
    # A step with no masked patch trains on nothing (the official code stops on its NaN loss; ours would give 0).
    if args.num_mask_patches < 1:
        parser.error(f"--num-mask-patches must be >= 1, got {args.num_mask_patches}")
    try:  # the generator's own checks: budget within the grid, block sizes that can be drawn
        beit.MaskingGenerator(args.image_size // 16, args.num_mask_patches, args.min_mask_patches,
                              args.max_mask_patches)  # fmt: skip
    except (TypeError, ValueError) as e:
        parser.error(f"--num-mask-patches, --min-mask-patches, --max-mask-patches: {e}")
    if args.epochs < 1 and args.steps < 1:
        parser.error("give --epochs or --steps (>= 1)")
    if not args.demo and (not args.data or not args.tokenizer):
        parser.error("--data and --tokenizer are required (or --demo)")
    if args.device not in ("auto", "cuda", "cpu") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be auto, cuda, cuda:N or cpu, got {args.device!r}")
    problem = _cuda_graph_problem(args, int(os.environ.get("WORLD_SIZE", "1")))
    if problem:
        parser.error(problem)


def _cuda_graph_problem(args: argparse.Namespace, world_size: int) -> str | None:
    """Why --cuda-graph cannot run with these options, or None. Checked when parsing, before any GPU work."""
    if not args.cuda_graph:
        return None
    if args.impl == "ref":
        return ("--cuda-graph cannot capture --impl ref: its boolean-mask gather has a data-dependent shape and "
                "waits for the host; use --impl auto, sdpa or triton")  # fmt: skip
    if args.compile:
        return ("--cuda-graph and --compile do not combine: the graph captures the whole step itself (the CUDA "
                "graphs of torch.compile mode='reduce-overhead' are not offered); drop one of them")  # fmt: skip
    if world_size > 1:
        return ("--cuda-graph runs on one GPU only: capturing DistributedDataParallel's all-reduce needs NCCL "
                "set up for graph capture and a long DDP warm-up that this trainer does not do")  # fmt: skip
    if args.device == "cpu" or not torch.cuda.is_available():
        return "--cuda-graph needs a CUDA device: CUDA graphs capture GPU work, and this run would be on the CPU"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str) -> Dist:
    """torchrun's env:// rendezvous when WORLD_SIZE > 1: NCCL on GPUs, gloo on CPUs; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise TrainingError("--device cuda but CUDA is not available")
    if want_cuda:
        device = torch.device(device_arg) if ":" in device_arg else torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", init_method="env://")
    return Dist(rank, world, local, device)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state(device: torch.device) -> dict:
    # NumPy's global generator is not saved: nothing here draws from it (the loaders seed their own).
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(state: dict, output_dir: Path, step: int, keep: int) -> Path:
    """Write atomically (temporary file, fsync, rename), then keep the newest ``keep`` checkpoints."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"checkpoint-{step:08d}.pth"
    tmp = output_dir / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        fd = os.open(output_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints in the folder, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | os.PathLike) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise TrainingError(f"checkpoint not found: {path}") from e
    except Exception as e:
        raise TrainingError(f"{path} is not a readable training checkpoint ({type(e).__name__}: {e})") from e
    missing = [k for k in ("model", "optimizer", "scaler", "step", "epoch", "batch_in_epoch", "args") if k not in ckpt]
    if missing:
        raise TrainingError(f"{path} is not a beit-pretrain checkpoint: it lacks {', '.join(missing)}")
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# Set-up


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 where the GPU has it, fp16 (with loss scaling) on older GPUs, fp32 on CPU."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if native_bf16(device) else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError("fp16 autocast needs CUDA; use --precision bf16 or fp32 on CPU")
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise TrainingError("this GPU has no bf16 (V100 and older): use --precision fp16")
    return precision


def resolve_loader(loader: str, device: torch.device) -> str:
    from beit.data import dali_available

    if loader == "auto":
        if dali_available():
            return "dali-gpu" if device.type == "cuda" else "dali-cpu"
        return "reference"
    if loader.startswith("dali") and not dali_available():
        raise TrainingError(f"--loader {loader} needs NVIDIA DALI: pip install -e '.[dali]'")
    if loader == "dali-gpu" and device.type != "cuda":
        raise TrainingError("--loader dali-gpu needs a CUDA device")
    return loader


class MIMStep(nn.Module):
    """The loss of a batch as a module forward, so DistributedDataParallel sees it: (loss, correct, valid)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, bool_masked_pos, mask_index, tokens):
        return self.model.forward_mim_loss(images, bool_masked_pos, mask_index, tokens)


def prepare_demo(args: argparse.Namespace, d: Dist) -> None:
    """Write the synthetic data set and fit a small k-means tokenizer on it (rank 0; others wait)."""
    out = Path(args.output_dir)
    data = out / "demo_data"
    tok = out / "demo_tokenizer.safetensors"
    if d.main:
        from beit.data import make_synthetic
        from beit.tokenizer.kmeans import fit_kmeans_tokenizer

        if args.data is None and not data.is_dir():
            make_synthetic(data, num_images=DEMO_DATA["images"], classes=4, seed=args.seed,
                           size=DEMO_DATA["image_size"])
        if args.tokenizer is None and not tok.is_file():
            fit_kmeans_tokenizer(
                args.data or data, vocab_size=DEMO_DATA["vocab"], out=tok, input_size=args.image_size // 2,
                seed=args.seed, progress=args.progress,
            )  # fmt: skip
    if d.enabled:
        dist.barrier()
    args.data = args.data or str(data)
    args.tokenizer = args.tokenizer or f"kmeans:{tok}"


# ----------------------------------------------------------------------------------------------------------------
# Training


class Metrics:
    """Device-side sums between log points: reading them is the only host synchronisation of the loop."""

    NAMES = ("loss", "correct", "valid", "grad_norm", "steps", "nonfinite")

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(len(self.NAMES), dtype=torch.float64, device=device)
        self.consecutive_nonfinite = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, loss, correct, valid, grad_norm, nonfinite):
        finite_loss = torch.where(nonfinite, torch.zeros_like(loss), loss)
        finite_norm = torch.where(nonfinite, torch.zeros_like(grad_norm), grad_norm)
        self.sums += torch.stack(
            [finite_loss.double(), correct.double(), valid.double(), finite_norm.double(),
             torch.ones((), dtype=torch.float64, device=self.device), nonfinite.double()]
        )  # fmt: skip
        # In place: a captured step (beit.graphs) updates this tensor by address on every replay.
        self.consecutive_nonfinite.copy_(torch.where(nonfinite, self.consecutive_nonfinite + 1, 0))

    def read(self, d: Dist) -> tuple[dict, int]:
        sums = self.sums.clone()
        consecutive = self.consecutive_nonfinite.clone()
        if d.enabled:
            dist.all_reduce(sums)
            dist.all_reduce(consecutive, op=dist.ReduceOp.MAX)
        s = dict(zip(self.NAMES, sums.tolist()))
        self.sums.zero_()
        good = max(s["steps"] - s["nonfinite"], 1)
        out = {
            "loss": s["loss"] / good,
            "mim_acc": s["correct"] / max(s["valid"], 1),
            "grad_norm": s["grad_norm"] / good,
            "nonfinite_steps": int(s["nonfinite"]),
        }
        return out, int(consecutive.item())


def forward_backward(
    step_module, tokenizer, batch: dict, device, amp, scaler, scale: float, inject_nan=False, loss_factor=None
):
    """One micro-batch: the tokenizer's labels under no_grad, the MIM loss under autocast, the scaled backward.
    Returns (loss, num_correct, num_masked) as device tensors: nothing here waits for the host.

    ``tokenizer`` None: the batch carries its ``tokens`` (benchmarks without the tokenizer). ``loss_factor``: a
    device scalar the loss is multiplied by, 1 or NaN, the fault injection of a captured step (set per replay)."""
    images = batch["images"].to(device, non_blocking=True)
    bool_masked_pos = batch["bool_masked_pos"].to(device, non_blocking=True)
    mask_index = batch["mask_index"].to(device, non_blocking=True)
    if tokenizer is None:
        tokens = batch["tokens"].to(device, non_blocking=True)
    else:
        tok_images = batch["tokenizer_images"].to(device, non_blocking=True)
        with torch.no_grad():
            # Only the masked patches' tokens are read by the loss: the tokenizer computes those (-1 elsewhere).
            tokens = tokenizer.get_codebook_indices(tok_images, positions=mask_index).flatten(1)  # [B, N]
    with amp:
        loss, correct, valid = step_module(images, bool_masked_pos, mask_index, tokens)
    if inject_nan:  # fault injection (tests)
        loss = loss * float("nan")
    if loss_factor is not None:
        loss = loss * loss_factor
    scaler.scale(loss * scale).backward()
    return loss.detach(), correct, valid


def optimizer_step(optimizer, scaler, clip_grad: float, precision: str, zero_grad: bool = True) -> torch.Tensor:
    """Unscale, clip, step, update, zero: the fused AdamW takes the scaler's found-inf flag and skips itself on a
    non-finite gradient, on the device. Returns the gradient norm before clipping (a device tensor).
    ``zero_grad=False`` leaves the gradients in place (a captured step keeps them in the graph's memory)."""
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if clip_grad > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    scaler.step(optimizer)
    if precision == "fp16":
        scaler.update()
    else:
        scaler.update(1.0)  # bf16/fp32: the scaler only carries the found-inf flag
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    return grad_norm


def record_step(metrics: Metrics, acc: tuple, grad_norm: torch.Tensor, accum_steps: int) -> None:
    """Add an optimizer step to the device-side metrics: ``acc`` is (loss, correct, masked) summed over the
    micro-batches; a step whose loss or gradient norm is not finite is counted, not averaged."""
    loss_sum, correct, valid = acc
    loss = loss_sum / accum_steps
    nonfinite = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    metrics.add(loss.float(), correct, valid, grad_norm.float(), nonfinite)


def train(args: argparse.Namespace, record_samples: bool = False) -> dict:
    """Run (or resume) a pretraining run; returns the final step, metrics, history and the model (and whether
    --cuda-graph captured the step). With ``record_samples`` the result also lists, per epoch, the data-set indices
    of the samples this rank saw."""
    d = init_distributed(args.device)
    if args.global_batch_size is not None:
        per = d.world_size * args.accum_steps
        if args.global_batch_size % per:
            raise TrainingError(
                f"--global-batch-size {args.global_batch_size} does not divide across {d.world_size} GPU(s) x "
                f"{args.accum_steps} accumulation step(s)"
            )
        args.batch_size = args.global_batch_size // per
    out_dir = Path(args.output_dir)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if args.demo:
        prepare_demo(args, d)
    precision = resolve_precision(args.precision, d.device)
    loader_kind = resolve_loader(args.loader, d.device)

    # Seed plus rank: ranks draw different drop paths; the data seeds are per rank inside the loader.
    torch.manual_seed(args.seed + d.rank)
    # Fixed shapes every step: let cuDNN time its algorithms once (the tokenizer's convolutions, Conv2d patch
    # embedding), as the official pretraining script does.
    torch.backends.cudnn.benchmark = d.device.type == "cuda"
    random.seed(args.seed + d.rank)

    from beit.data import build_loader
    from beit.tokenizer import load_tokenizer

    # check_range=False: its input check costs a host sync per call, and the loader's output is known to be mapped.
    try:
        fused = {"auto": "auto", "on": True, "off": False}[args.tokenizer_fused]
        tokenizer = load_tokenizer(args.tokenizer, device=d.device, check_range=False, fused=fused)
    except (OSError, ValueError) as e:
        raise TrainingError(f"--tokenizer {args.tokenizer}: {e}") from e
    tok_size = args.image_size // 2
    grid = args.image_size // 16
    if tokenizer.input_size is not None and tokenizer.input_size != tok_size and not args.demo:
        raise TrainingError(f"the tokenizer expects {tokenizer.input_size} px images but --image-size "
                            f"{args.image_size} gives a {tok_size} px tokenizer view")  # fmt: skip
    masking = dict(
        input_size=grid,
        num_masking_patches=args.num_mask_patches,
        min_num_patches=args.min_mask_patches,
        max_num_patches=args.max_mask_patches,
    )
    try:
        loader = build_loader(
            args.data,
            args.batch_size,
            device="gpu" if loader_kind == "dali-gpu" else "cpu",
            backend="reference" if loader_kind == "reference" else "dali",
            num_threads=max(1, args.num_workers),
            seed=args.seed,
            shard_id=d.rank,
            num_shards=d.world_size,
            image_size=args.image_size,
            tokenizer_size=tok_size,
            normalization=args.normalization,
            masking=masking,
            on_bad_file=args.on_bad_file,
            # CPU batches bound for a GPU: pinned, or each copy would make the host wait for the GPU's queue.
            pin_memory=d.device.type == "cuda" and loader_kind != "dali-gpu",
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise TrainingError(f"--data {args.data}: {e}") from e
    batches_per_epoch = len(loader)
    steps_per_epoch = batches_per_epoch // args.accum_steps
    if steps_per_epoch < 1:
        raise TrainingError(f"one epoch has {batches_per_epoch} batches per rank, fewer than --accum-steps "
                            f"{args.accum_steps}: lower the batch size or the accumulation")  # fmt: skip
    total_steps = args.steps if args.steps > 0 else args.epochs * steps_per_epoch
    warmup = args.warmup_steps if args.warmup_steps >= 0 else int(args.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total_steps)

    overrides = dict(img_size=args.image_size, vocab_size=tokenizer.vocab_size, drop_path_rate=args.drop_path,
                     impl=args.impl)  # fmt: skip
    if args.layer_scale is not None:
        overrides["init_values"] = args.layer_scale
    if args.depth is not None:
        overrides["depth"] = args.depth
    model = beit.create_model(args.model, **overrides).to(d.device)
    step_module: nn.Module = MIMStep(model)
    if d.enabled:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[d.device.index] if d.device.type == "cuda" else None
        )
    if args.compile:
        step_module = torch.compile(step_module)

    optimizer = fused_adamw(model, args.lr, args.weight_decay, args.betas, args.eps)
    # Fixed here, before a checkpoint replaces the group dicts: the groups the schedule decays.
    decay_groups = [i for i, g in enumerate(optimizer.param_groups) if g["weight_decay"] > 0]
    scaler = torch.amp.GradScaler(d.device.type, enabled=True, init_scale=2.0**16 if precision == "fp16" else 1.0)
    lr_schedule = cosine_scheduler(args.lr, args.min_lr, total_steps, warmup)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = cosine_scheduler(args.weight_decay, wd_end, total_steps)

    step, epoch, batch_in_epoch = 0, 0, 0
    data_record = _data_record(loader, d.world_size)
    resume = _find_resume(args, out_dir)
    if resume is not None:
        ckpt = load_checkpoint(resume)
        _check_compatible(ckpt, args, resume)
        _check_resume_point(ckpt, args, resume, data_record, out_dir)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise TrainingError(f"{resume} does not fit this model: {str(e).splitlines()[0]}") from e
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        rng = ckpt.get("rng", {}).get(str(d.rank))
        if rng is not None:
            _set_rng_state(rng, d.device)
        if d.main:
            print(f"resumed from {resume} at step {step} (epoch {epoch}, batch {batch_in_epoch})", flush=True)

    if d.main:
        _write_args(args, out_dir)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = (
        torch.autocast(d.device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    metrics = Metrics(d.device)
    graph_step = None
    if args.cuda_graph:
        from beit.graphs import CudaGraphStep

        # After the resume: the graph captures the optimizer's and the scaler's tensors by address.
        graph_step = CudaGraphStep(
            step_module, tokenizer, optimizer, scaler, metrics, amp=amp, precision=precision,
            clip_grad=args.clip_grad, accum_steps=args.accum_steps, decay_groups=decay_groups,
            scheduled_weight_decay=bool((wd_schedule != wd_schedule[0]).any()),
            fault_injection=bool(args.inject_nonfinite),
        )  # fmt: skip
    log_path = out_dir / "log.jsonl"
    history = []
    flops_img = train_flops_per_image(model.config, args.num_mask_patches)
    # The tokenizer computes the masked patches' tokens only (forward_backward passes their index).
    tok_flops_img = tokenizer_flops_per_image(tokenizer, tok_size, num_positions=args.num_mask_patches)
    peak = peak_flops(d.device)
    bar = _progress(args, d, total_steps, step)
    writer = _tensorboard(out_dir) if d.main else None
    interrupted = {"flag": False}

    def state_dict_for_save() -> dict:
        rngs = {str(d.rank): _rng_state(d.device)}
        if d.enabled:  # every rank's RNG state, gathered to rank 0
            gathered = [None] * d.world_size
            dist.all_gather_object(gathered, rngs[str(d.rank)])
            rngs = {str(r): s for r, s in enumerate(gathered)}
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if graph_step is None else graph_step.optimizer_state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "rng": rngs,
            "data": data_record,
            "args": _jsonable(vars(args)),
            "model_config": model.config.to_dict(),
        }

    def checkpoint() -> Path | None:
        state = state_dict_for_save()  # collective: every rank takes part
        if d.main:
            return save_checkpoint(state, out_dir, step, args.keep_ckpts)
        return None

    old_handler = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):  # finish the step in flight, then checkpoint and stop
        if interrupted["flag"]:
            raise KeyboardInterrupt
        interrupted["flag"] = True

    signal.signal(signal.SIGINT, on_sigint)
    t_log = time.perf_counter()
    images_since_log = 0
    last_metrics: dict = {}
    seen: dict[int, list[int]] = {}
    acc: tuple = ()
    try:
        while step < total_steps and not interrupted["flag"]:
            loader.set_epoch(epoch)
            batches = loader.iter_from(batch_in_epoch)
            micro = 0
            for batch in batches:
                # Stop only between optimizer steps, so a checkpoint never splits an accumulation.
                if micro == 0 and (step >= total_steps or interrupted["flag"]):
                    break
                lr = float(lr_schedule[step])
                if graph_step is None:
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                        if g["weight_decay"] > 0:
                            g["weight_decay"] = float(wd_schedule[step])
                if record_samples:
                    seen.setdefault(epoch, []).extend(batch["index"][batch["valid"]].tolist())
                if args.inject_sigint is not None and step == args.inject_sigint and micro == 0:
                    signal.raise_signal(signal.SIGINT)
                    if interrupted["flag"]:
                        break
                last_micro = micro == args.accum_steps - 1
                if graph_step is not None:
                    graph_step.load(micro, batch)  # the graph runs the whole step once every micro-batch is in
                else:
                    sync = contextlib.nullcontext() if (last_micro or not d.enabled) else step_module.no_sync()
                    with sync:
                        out = forward_backward(
                            step_module, tokenizer, batch, d.device, amp, scaler, 1.0 / args.accum_steps,
                            inject_nan=step in args.inject_nonfinite,
                        )  # fmt: skip
                    # (loss, correct, masked) summed over the micro-batches of this optimizer step, on the device.
                    acc = out if micro == 0 else tuple(a + b for a, b in zip(acc, out))
                micro += 1
                batch_in_epoch += 1
                images_since_log += batch["images"].shape[0]
                if not last_micro:
                    continue
                micro = 0
                if graph_step is not None:
                    was_captured = graph_step.captured
                    graph_step.step(lr, float(wd_schedule[step]), inject_nan=step in args.inject_nonfinite)
                    if graph_step.captured and not was_captured and d.main:
                        print(f"captured the training step in a CUDA graph at step {step}", flush=True)
                else:
                    grad_norm = optimizer_step(optimizer, scaler, args.clip_grad, precision)
                    record_step(metrics, acc, grad_norm, args.accum_steps)
                step += 1
                if bar is not None:
                    bar.update(1)

                if step % args.log_interval == 0 or step == total_steps:
                    m, consecutive = metrics.read(d)
                    now = time.perf_counter()
                    ips = images_since_log * d.world_size / max(now - t_log, 1e-9)
                    t_log, images_since_log = now, 0
                    m.update(step=step, epoch=epoch, lr=lr, images_per_s=ips)
                    if peak is not None:
                        m["mfu_model"] = ips / d.world_size * flops_img / peak
                        m["mfu_with_tokenizer"] = ips / d.world_size * (flops_img + tok_flops_img) / peak
                    if d.device.type == "cuda":
                        m["max_memory_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
                    history.append(m)
                    last_metrics = m
                    if d.main:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(m) + "\n")
                        if bar is not None:
                            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['mim_acc']:.3f}", ips=f"{ips:.0f}")
                        if writer is not None:
                            for k, v in m.items():
                                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                                    writer.add_scalar(f"train/{k}", v, step)
                    if consecutive >= args.max_nonfinite:
                        raise TrainingError(
                            f"{consecutive} non-finite steps in a row at step {step}: stopping. The last good "
                            f"checkpoint in {out_dir} is intact; lower the learning rate or check the data."
                        )
                if args.ckpt_interval and step % args.ckpt_interval == 0 and step < total_steps:
                    checkpoint()
            else:
                # The loader is exhausted: the epoch is over (a partial accumulation is dropped, as drop_last;
                # under --cuda-graph it was only copied into the input buffers, and the graph owns the gradients).
                if graph_step is None:
                    optimizer.zero_grad(set_to_none=True)
                epoch += 1
                batch_in_epoch = 0
                if step < total_steps:
                    checkpoint()
        final = checkpoint()
    finally:
        signal.signal(signal.SIGINT, old_handler)
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    if interrupted["flag"]:
        if d.main:
            print(f"interrupted: checkpoint written at step {step} ({final})", file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    if d.main:
        _plot(history, out_dir)
    return {"step": step, "epoch": epoch, "checkpoint": str(final) if final else None, "metrics": last_metrics,
            "history": history, "model": model, "samples": seen,
            "graph_captured": graph_step is not None and graph_step.captured}  # fmt: skip


def _find_resume(args, out_dir: Path) -> Path | None:
    if args.resume == "none":
        return None
    if args.resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(args.resume)
    if not path.is_file():
        raise TrainingError(f"--resume {args.resume}: no such checkpoint")
    return path


def _check_compatible(ckpt: dict, args, path) -> None:
    old = ckpt["args"]
    for key in ("model", "image_size", "batch_size", "accum_steps", "num_mask_patches"):
        if key in old and old[key] != getattr(args, key):
            raise TrainingError(
                f"{path} was written with --{key.replace('_', '-')} {old[key]}, this run has {getattr(args, key)}: "
                "resume with the same settings or start a new output folder"
            )


def _data_record(loader, world_size: int) -> dict:
    """What an epoch's sample order depends on besides --seed and --batch-size: the files and the ranks."""
    files = hashlib.sha256("\n".join(map(str, loader.files)).encode()).hexdigest()[:16]
    return {"num_files": len(loader.files), "files_sha256": files, "world_size": world_size}


def _check_resume_point(ckpt: dict, args, path, data_record: dict, out_dir: Path) -> None:
    """Refuse a resume that would repeat or skip samples, or leave two histories in one folder."""
    if ckpt["batch_in_epoch"] > 0:  # mid-epoch: the rest of the epoch must be the same sample order
        old = dict(ckpt.get("data") or {}, seed=ckpt["args"].get("seed"))
        new = dict(data_record, seed=args.seed)
        changed = [k for k in ("seed", "world_size", "num_files", "files_sha256") if k in old and old[k] != new[k]]
        if changed:
            what = ", ".join(f"{k} {old[k]} -> {new[k]}" for k in changed)
            raise TrainingError(
                f"{path} stopped in the middle of epoch {ckpt['epoch']} (batch {ckpt['batch_in_epoch']}); resuming "
                f"with another {what} would repeat some samples of that epoch and skip others: resume with the "
                "same --seed, number of processes and data, or from a checkpoint at an epoch's end"
            )
    newer = [p for p in list_checkpoints(out_dir) if int(CKPT_RE.search(p.name).group(1)) > ckpt["step"]]
    if newer:
        raise TrainingError(
            f"{out_dir} holds checkpoints newer than {path} (step {ckpt['step']}): {', '.join(p.name for p in newer)}."
            " This run would write a second history beside them, its rotation would delete the older ones, and "
            "--resume auto would later pick theirs: move them away, or give another --output-dir"
        )


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _write_args(args, out_dir: Path) -> None:
    (out_dir / "args.yaml").write_text(yaml.safe_dump(_jsonable(vars(args)), sort_keys=True))


def _progress(args, d: Dist, total: int, start: int):
    if not (d.main and args.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tb"))


def _plot(history: list[dict], out_dir: Path) -> None:
    if not history:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(steps, [h["loss"] for h in history])
    ax[0].set(xlabel="step", ylabel="loss", title="MIM loss")
    ax[1].plot(steps, [h["mim_acc"] for h in history])
    ax[1].set(xlabel="step", ylabel="accuracy", title="MIM accuracy")
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        result = train(args)
    except (TrainingError, BadImageError) as e:  # a bad image under --on-bad-file error: named, no traceback
        print(f"beit-pretrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    m = result["metrics"]
    if m:
        print(f"done: step {result['step']}, loss {m['loss']:.4f}, MIM accuracy {m['mim_acc']:.4f}, "
              f"checkpoint {result['checkpoint']}")  # fmt: skip
    if args.demo and result["checkpoint"]:  # rank 0 only: others have no checkpoint path
        demo_linear_probe(result["checkpoint"], args)
    return 0


def demo_linear_probe(checkpoint: str, args: argparse.Namespace) -> dict:
    """The demo's last word: a linear probe of the pretrained encoder against a random one on the demo classes
    (see beit.linprobe for why pretraining wins there), written to linprobe.json and printed."""
    from beit.export import model_from_checkpoint
    from beit.linprobe import probe_against_random

    both = probe_against_random(model_from_checkpoint(checkpoint, impl="ref"), args.data, seed=args.seed,
                                normalization=args.normalization)
    with open(Path(args.output_dir) / "linprobe.json", "w") as f:
        json.dump(both, f, indent=1)
    pre, rnd = both["pretrained"], both["random_init"]
    print(f"linear probe on the demo classes: pretrained {pre['accuracy']:.3f}, random init {rnd['accuracy']:.3f}, "
          f"chance {pre['chance']:.3f} ({pre['num_val']} held-out images)")  # fmt: skip
    return both


if __name__ == "__main__":
    sys.exit(main())
