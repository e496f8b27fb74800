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
import json
import os
import random
import sys
from pathlib import Path

import torch
import torch.nn as nn

import beit
from beit import train_state
from beit.config import (
    add_optimisation_options,
    add_run_options,
    apply_global_batch_size,
    check_trainer_options,
    parse_with_config,
)
from beit.data import BadImageError
from beit.distributed import Dist, init_distributed, shutdown
from beit.engine import Faults, Metrics, MIMInputs, MIMStep
from beit.errors import TrainingError
from beit.flops import peak_flops, tokenizer_flops_per_image, train_flops_per_image
from beit.loop import LoopOptions, Position, Task, run_loop
from beit.optim import cosine_scheduler, fused_adamw
from beit.precision import autocast, grad_scaler, resolve_precision
from beit.sinks import LogSinks

LOADERS = ("auto", "dali-gpu", "dali-cpu", "reference")
# What a resume must keep: the model, and what an epoch's order and a step's batch depend on.
RESUME_KEYS = ("model", "image_size", "batch_size", "accum_steps", "num_mask_patches")


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
    g.add_argument("--data", help="image folder (ImageFolder or flat), a text file list, or WebDataset tar shards "
                   "('shards/train-{000000..000009}.tar' or a folder of .tar files; labels ignored)")  # fmt: skip
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
    add_optimisation_options(g, epochs=800, lr=1.5e-3, min_lr=1e-5, warmup_epochs=10, clip_grad=3.0,
                             clip_help="max gradient norm; 0 disables clipping")  # fmt: skip
    g.add_argument("--weight-decay-end", type=float, default=None, help="cosine end value (default: constant)")
    g = p.add_argument_group("run")
    add_run_options(g, output_dir="runs/beit")
    g.add_argument("--demo", action="store_true", help="synthetic data, a fitted k-means tokenizer, a small BEiT")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    args, _ = parse_with_config(parser, argv, demo=DEMO)
    _check_args(parser, args)
    return args


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


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.model not in beit.list_models() and args.model not in ("beit_base_patch16_224_8k_vocab",
                                                                   "beit_large_patch16_224_8k_vocab"):  # fmt: skip
        parser.error(f"--model {args.model!r} is not one of {', '.join(beit.list_models())}")
    check_trainer_options(
        parser, args, at_least_one=("batch_size", "accum_steps", "log_interval", "keep_ckpts", "max_nonfinite",
                                    "image_size"),
        non_negative=("lr", "min_lr", "warmup_epochs", "weight_decay", "clip_grad", "num_workers", "steps", "epochs",
                      "ckpt_interval"),
        optional_at_least_one=("depth", "global_batch_size"),
    )  # fmt: skip
    if args.weight_decay_end is not None and not args.weight_decay_end >= 0:
        parser.error(f"--weight-decay-end must be >= 0, got {args.weight_decay_end}")
    if args.layer_scale is not None and not args.layer_scale >= 0:
        parser.error(f"--layer-scale must be >= 0 (0: no layer scale), got {args.layer_scale}")
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
    if not args.demo and (not args.data or not args.tokenizer):
        parser.error("--data and --tokenizer are required (or --demo)")
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
    d.barrier()
    args.data = args.data or str(data)
    args.tokenizer = args.tokenizer or f"kmeans:{tok}"


# ----------------------------------------------------------------------------------------------------------------
# Training


def train(args: argparse.Namespace, record_samples: bool = False) -> dict:
    """Run (or resume) a pretraining run; returns the final step, metrics, history and the model (and whether
    --cuda-graph captured the step). With ``record_samples`` the result also lists, per epoch, the data-set indices
    of the samples this rank saw."""
    d = init_distributed(args.device)
    apply_global_batch_size(args, d.world_size)
    out_dir = Path(args.output_dir)
    lock = train_state.open_run_folder(d, out_dir)  # one writer per run folder, before any work
    try:
        return _train(args, d, out_dir, record_samples)
    finally:
        if lock is not None:
            lock.release()


def _train(args: argparse.Namespace, d: Dist, out_dir: Path, record_samples: bool) -> dict:
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

    tokenizer, loader = _tokenizer_and_loader(args, d, loader_kind)
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
    scaler = grad_scaler(precision, d.device)
    lr_schedule = cosine_scheduler(args.lr, args.min_lr, total_steps, warmup)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = cosine_scheduler(args.weight_decay, wd_end, total_steps)

    position = Position()
    data_record = train_state.data_record(loader, d.world_size)
    resume = train_state.find_resume(args.resume, out_dir, move_aside=d.main)
    if resume is not None:
        ckpt = train_state.load_checkpoint(resume)
        train_state.check_compatible(ckpt, args, resume, RESUME_KEYS)
        train_state.check_resume_point(ckpt, args.seed, resume, data_record, out_dir)
        position = Position(*train_state.restore(ckpt, resume, d, model, optimizer, scaler))

    if d.main:
        train_state.write_args(args, out_dir)
    amp = autocast(precision, d.device)
    metrics = Metrics(d.device)
    faults = Faults(args.inject_nonfinite, args.inject_sigint, device=d.device)
    graph_step = None
    if args.cuda_graph:
        from beit.graphs import CudaGraphStep

        # After the resume: the graph captures the optimizer's and the scaler's tensors by address.
        graph_step = CudaGraphStep(
            step_module, tokenizer, optimizer, scaler, metrics, amp=amp, precision=precision,
            clip_grad=args.clip_grad, accum_steps=args.accum_steps, decay_groups=decay_groups,
            scheduled_weight_decay=bool((wd_schedule != wd_schedule[0]).any()), loss_factor=faults.loss_factor,
        )  # fmt: skip
    flops_img = train_flops_per_image(model.config, args.num_mask_patches)
    # The tokenizer computes the masked patches' tokens only (MIMInputs passes their index).
    tok_flops_img = tokenizer_flops_per_image(tokenizer, args.image_size // 2, num_positions=args.num_mask_patches)
    peak = peak_flops(d.device)

    def mfu(ips: float) -> dict:
        if peak is None:
            return {}
        per_rank = ips / d.world_size
        with_tok = per_rank * (flops_img + tok_flops_img) / peak
        return {"mfu_model": per_rank * flops_img / peak, "mfu_with_tokenizer": with_tok}

    sinks = LogSinks(out_dir, enabled=d.main, progress=args.progress, total=total_steps, start=position.step,
                     desc="pretrain", plot_keys={"loss": "MIM loss", "mim_acc": "MIM accuracy"})  # fmt: skip
    opts = LoopOptions(total_steps=total_steps, accum_steps=args.accum_steps, precision=precision,
                       clip_grad=args.clip_grad, log_interval=args.log_interval, ckpt_interval=args.ckpt_interval,
                       keep_ckpts=args.keep_ckpts, max_nonfinite=args.max_nonfinite)  # fmt: skip
    saved = {"data": data_record, "args": train_state.jsonable(vars(args)), "model_config": model.config.to_dict()}
    result = run_loop(
        d, Task(model, step_module, MIMInputs(tokenizer, d.device)), optimizer, scaler, loader, lr_schedule,
        wd_schedule, opts, out_dir, sinks, position=position, amp=amp, metrics=metrics, saved_extra=lambda: saved,
        extras=mfu, graph_step=graph_step, faults=faults, record_samples=record_samples,
    )  # fmt: skip
    return {"step": result.position.step, "epoch": result.position.epoch,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None, "metrics": result.metrics,
            "history": result.history, "model": model, "samples": result.samples,
            "graph_captured": graph_step is not None and graph_step.captured}  # fmt: skip


def _tokenizer_and_loader(args: argparse.Namespace, d: Dist, loader_kind: str):
    """The tokenizer (its file checked) and the data loader of this rank's shard."""
    from beit.data import build_loader
    from beit.tokenizer import load_tokenizer

    # check_range=False: its input check costs a host sync per call, and the loader's output is known to be mapped.
    try:
        fused = {"auto": "auto", "on": True, "off": False}[args.tokenizer_fused]
        tokenizer = load_tokenizer(args.tokenizer, device=d.device, check_range=False, fused=fused)
    except (OSError, ValueError) as e:
        raise TrainingError(f"--tokenizer {args.tokenizer}: {e}") from e
    tok_size = args.image_size // 2
    if tokenizer.input_size is not None and tokenizer.input_size != tok_size and not args.demo:
        raise TrainingError(f"the tokenizer expects {tokenizer.input_size} px images but --image-size "
                            f"{args.image_size} gives a {tok_size} px tokenizer view")  # fmt: skip
    masking = dict(
        input_size=args.image_size // 16,
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
    return tokenizer, loader


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
        shutdown()
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
