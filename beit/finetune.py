"""BEiT fine-tuning and evaluation for image classification: ``beit-finetune`` (also ``python -m beit.finetune``).

The step is the official one (unilm ``run_class_finetuning.py`` with ``engine_for_finetuning.py``): random erasing and
mixup/cutmix on the batch, the classifier under autocast, soft-target cross-entropy (label smoothing folded into
the targets; plain smoothed cross-entropy without mixup), backward, an AdamW step whose parameter groups carry the
layer-wise learning-rate scales, a per-step cosine schedule with linear warm-up, an optional model EMA. It runs
through the pretraining trainer's engine (``beit.engine.train_step``: no host synchronisation inside a step,
non-finite steps skipped on the device and counted), loop, checkpoints (atomic, checksummed, mid-epoch bitwise
resume), run-folder lock, logs and distributed set-up.

Defaults are the official BEiT-B recipe from a pretraining checkpoint: 100 epochs, 1024 images a step in all
(``--global-batch-size 1024``, or 128 per GPU on 8 GPUs), lr 4e-3 with 20 warm-up epochs from 1e-6 and a cosine to
1e-6, layer decay 0.65, AdamW (0.9, 0.999), weight decay 0.05 (no decay on 1-D parameters, biases, ``cls_token``
and ``pos_embed``), drop path 0.1, label smoothing 0.1, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25,
mixup 0.8 and cutmix 1.0, mean pooling, Inception normalisation (mean = std = 0.5). Evaluation: top-1 and top-5
with the official preprocessing (resize and centre crop at crop_pct 0.875 below 384 px, resize only at 384 and
above), exact across ranks, every ``--eval-interval`` epochs and at the end; the best weights are kept in
``best.pth``.

One GPU:
    beit-finetune --data /data/imagenet --finetune runs/beit_b/checkpoint-XXXXXXXX.pth --output-dir runs/ft
Eight GPUs (the official set-up):
    torchrun --standalone --nproc_per_node=8 -m beit.finetune --data /data/imagenet --batch-size 128 \\
        --finetune runs/beit_b/checkpoint-XXXXXXXX.pth --output-dir runs/ft
At 384 px after the 224 px run (the tables are resized on load):
    beit-finetune --model beit_base_patch16_384 --finetune runs/ft/best.pth --epochs 10 --lr 5e-5 ...
Evaluate any checkpoint (ours, official, Hugging Face):
    beit-finetune --eval --resume runs/ft/best.pth --data /data/imagenet
The demo (fine-tunes the pretraining demo's checkpoint against the same classifier from scratch):
    beit-finetune --demo
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
import torch.nn.functional as F

import beit
from beit import train_state
from beit.checkpoint import peek_checkpoint
from beit.classifier import classifier_from_config, classifier_image_size, create_classifier, list_classifiers
from beit.config import (
    add_optimisation_options,
    add_run_options,
    apply_global_batch_size,
    check_trainer_options,
    parse_with_config,
)
from beit.data import BadImageError
from beit.distributed import Dist, init_distributed, shutdown
from beit.engine import Faults, Metrics
from beit.errors import TrainingError
from beit.evaluate import evaluate
from beit.finetune_demo import DEMO
from beit.loop import LoopOptions, Position, Task, run_loop
from beit.optim import cosine_scheduler, fused_adamw
from beit.precision import autocast, grad_scaler, resolve_precision
from beit.sinks import LogSinks

KIND = "beit-finetune"
DATA_FORMATS = ("auto", "folder", "cifar100", "webdataset")
# What a resume must keep: the model, and what an epoch's order and a step's batch depend on.
RESUME_KEYS = ("model", "image_size", "batch_size", "accum_steps", "use_cls", "data_format", "repeated_aug")


# ----------------------------------------------------------------------------------------------------------------
# The step


class ClassifyStep(nn.Module):
    """The loss of a batch as a module forward, so DistributedDataParallel sees it: (loss, correct, count).

    ``targets`` [B, C] soft targets (mixup/cutmix with smoothing folded in) or None (then the smoothed
    cross-entropy of ``labels``); ``weights`` [B] 1 for real samples, 0 for the loader's padding, so the loss is the
    mean over real samples. ``correct`` counts real samples whose argmax is their (unmixed) label."""

    def __init__(self, model: nn.Module, smoothing: float):
        super().__init__()
        self.model = model
        self.smoothing = smoothing

    def forward(self, images, labels, targets, weights):
        logits = self.model(images).float()  # the loss in fp32, as timm's under autocast
        if targets is not None:
            per_sample = -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
        else:
            per_sample = F.cross_entropy(logits, labels, label_smoothing=self.smoothing, reduction="none")
        count = weights.sum()
        loss = (per_sample * weights).sum() / count.clamp(min=1)
        correct = ((logits.argmax(-1) == labels).float() * weights).sum()
        return loss, correct, count


class ClassifyInputs:
    """``prepare`` for fine-tuning: a batch on ``device``, random erasing, then mixup/cutmix (host-drawn parameters,
    device work, no synchronisation). Returns (images, labels, soft targets or None, sample weights)."""

    def __init__(self, device: torch.device, mixup=None, erasing=None):
        self.device, self.mixup, self.erasing = device, mixup, erasing

    def __call__(self, batch: dict) -> tuple:
        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        weights = batch["valid"].to(self.device, non_blocking=True).float()
        if self.erasing is not None:
            images = self.erasing(images)
        targets = None
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        return images, labels, targets, weights


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("beit-finetune", description="BEiT fine-tuning and evaluation for classification.")
    p.add_argument("--config", help="YAML file of options (keys: long option names with underscores)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="beit_base_patch16_224", help="one of beit.list_classifiers()")
    g.add_argument("--image-size", type=int, default=None, help="input size (default: the model's)")
    g.add_argument("--depth", type=int, default=None, help="override the model's number of blocks")
    g.add_argument("--embed-dim", type=int, default=None, help="override the model's width")
    g.add_argument("--num-heads", type=int, default=None, help="override the model's number of heads")
    g.add_argument("--finetune", help="start from this checkpoint: ours (pretraining or fine-tuning), unilm or HF")
    g.add_argument("--num-classes", type=int, default=None, help="default: the data's class count")
    g.add_argument("--drop-path", type=float, default=0.1)
    g.add_argument("--layer-scale", type=float, default=None, help="layer scale init (model default: 0.1, 1e-5 large)")
    g.add_argument("--use-cls", action="store_true", help="classify the cls token (norm) instead of mean pooling")
    g.add_argument("--rel-pos-bias", default="per-block", choices=("per-block", "shared"),
                   help="a relative position table per block (official fine-tuning) or one shared")  # fmt: skip
    g.add_argument("--impl", default="auto", choices=beit.IMPLS, help="attention/kernels implementation")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=False, help="keep a model EMA")
    g.add_argument("--model-ema-decay", type=float, default=0.9999)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="ImageFolder root with train/ and val/, a cifar-100-python folder, or shards")
    g.add_argument("--val-data", help="validation shards or folder when --data is not a root with val/")
    g.add_argument("--data-format", default="auto", choices=DATA_FORMATS)
    g.add_argument("--val-fraction", type=float, default=None,
                   help="hold out a seeded, stratified fraction of --data for validation when it has no val/")
    g.add_argument("--loader", default="auto", choices=("auto", "dali", "pil"), help="auto: DALI when installed")
    g.add_argument("--num-workers", type=int, default=8, help="loader threads (DALI) or worker processes")
    g.add_argument("--normalization", default="inception", choices=("imagenet", "inception"))
    g.add_argument("--rand-augment", default="rand-m9-mstd0.5-inc1", help="timm-style spec, or none")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--crop-pct", type=float, default=None, help="evaluation crop (default 0.875 below 384 px, else 1)")
    g.add_argument("--repeated-aug", type=int, default=1,
                   help="repeated augmentation (DeiT's RASampler, in the paper's recipe): each sample k times an "
                   "epoch, with its own augmentations, on k ranks where there are k; an epoch keeps its length")
    g.add_argument("--on-bad-file", default="skip", choices=("skip", "error"))
    g = p.add_argument_group("optimisation")
    add_optimisation_options(g, epochs=100, lr=4e-3, min_lr=1e-6, warmup_epochs=20, clip_grad=0.0,
                             clip_help="max gradient norm; 0 (the official default) disables clipping")  # fmt: skip
    g.add_argument("--warmup-lr", type=float, default=1e-6, help="the warm-up's first lr")
    g.add_argument("--layer-decay", type=float, default=0.65, help="layer-wise lr decay (1: none)")
    g = p.add_argument_group("run")
    add_run_options(g, output_dir="runs/finetune")
    g.add_argument("--eval", action="store_true", help="evaluate --resume (or --finetune) and stop")
    g.add_argument("--eval-interval", type=int, default=1, help="evaluate every N epochs (0: at the end only)")
    g.add_argument("--demo", action="store_true", help="fine-tune the pretraining demo against training from scratch")
    g.add_argument("--demo-pretrain-dir", default="runs/demo", help="--demo: the pretraining demo's folder")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    args, _ = parse_with_config(parser, argv, demo=DEMO)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.model not in list_classifiers():
        parser.error(f"--model {args.model!r} is not one of {', '.join(list_classifiers())}")
    check_trainer_options(
        parser, args, at_least_one=("batch_size", "accum_steps", "log_interval", "keep_ckpts", "max_nonfinite",
                                    "repeated_aug"),
        non_negative=("lr", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "clip_grad", "num_workers",
                      "steps", "epochs", "ckpt_interval", "eval_interval", "mixup", "cutmix", "smoothing", "reprob"),
        optional_at_least_one=("depth", "embed_dim", "num_heads", "global_batch_size", "num_classes", "image_size"),
    )  # fmt: skip
    for name in ("reprob", "mixup_prob", "mixup_switch_prob", "model_ema_decay"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}")
    if not 0 <= args.smoothing < 1:
        parser.error(f"--smoothing must lie in [0, 1), got {args.smoothing}")
    if not 0 < args.layer_decay <= 1:
        parser.error(f"--layer-decay must lie in (0, 1], got {args.layer_decay}")
    if args.image_size is None:
        args.image_size = classifier_image_size(args.model)
    if args.image_size % 16 != 0:
        parser.error(f"--image-size must be a multiple of the patch size 16, got {args.image_size}")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must lie in (0, 1), got {args.val_fraction}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        parser.error(f"--crop-pct must lie in (0, 1], got {args.crop_pct}")
    if (args.mixup > 0 or args.cutmix > 0) and args.mixup_prob > 0 and args.batch_size % 2:
        parser.error(f"mixup/cutmix mix each image with the batch's mirror and need an even --batch-size, got "
                     f"{args.batch_size}")  # fmt: skip
    if not args.demo and not args.data:
        parser.error("--data is required (or --demo)")
    if args.eval and not (args.resume not in ("auto", "none") or args.finetune):
        parser.error("--eval needs the checkpoint to evaluate: --resume PATH (or --finetune PATH)")


# ----------------------------------------------------------------------------------------------------------------
# Model and checkpoints


def build_classifier(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The classifier the options describe, on the CPU (weights are loaded before it moves to the device)."""
    overrides = dict(drop_path_rate=args.drop_path, use_mean_pooling=not args.use_cls, impl=args.impl,
                     use_rel_pos_bias=args.rel_pos_bias == "per-block",
                     use_shared_rel_pos_bias=args.rel_pos_bias == "shared")  # fmt: skip
    for key, name in (("image_size", "img_size"), ("depth", "depth"), ("embed_dim", "embed_dim"),
                      ("num_heads", "num_heads"), ("layer_scale", "init_values")):  # fmt: skip
        if getattr(args, key) is not None:
            overrides[name] = getattr(args, key)
    try:
        return create_classifier(args.model, num_classes=num_classes, **overrides)
    except (TypeError, ValueError) as e:
        raise TrainingError(f"--model {args.model}: {e}") from e


def load_weights(model: nn.Module, path: str, d: Dist, *, require_head: bool) -> None:
    """Fill ``model`` from ``path`` (ours, unilm, timm or Hugging Face) with the official adaptation; a checkpoint
    that does not fit (width, depth, patch size) is a TrainingError. ``require_head``: evaluation, where a head
    re-initialised for another class count would score chance; refused instead."""
    try:
        report = beit.load_pretrained(model, path)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise TrainingError(f"{path}: {e}") from e
    if require_head and (report.head_reinitialised or any(k.startswith("head.") for k in report.missing_keys)):
        raise TrainingError(f"{path} has no classification head for this model's {model.num_classes} classes "
                            f"({report}); evaluate a fine-tuned checkpoint, with --num-classes as it was trained")
    if d.main:
        print(f"{path}: {report}", flush=True)


def weights_file(model: nn.Module, args: argparse.Namespace, extra: dict) -> dict:
    """What ``best.pth`` holds: the weights and what rebuilds the model (``classifier_from_config``)."""
    return {"kind": KIND, "model": model.state_dict(), "model_config": model.config.to_dict(),
            "args": train_state.jsonable(vars(args)), **extra}  # fmt: skip


def classifier_from_checkpoint(path: str | os.PathLike, **overrides) -> nn.Module:
    """A classifier rebuilt from one of our fine-tuning files (``best.pth`` or a training checkpoint)."""
    ckpt = train_state.read_verified(path, f"{KIND} checkpoint")
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise TrainingError(f"{path} is not a {KIND} checkpoint (it has no model_config)")
    model = classifier_from_config(ckpt["model_config"], **overrides)
    model.load_state_dict(ckpt["model"])
    return model


# ----------------------------------------------------------------------------------------------------------------
# Training


def finetune(args: argparse.Namespace, record_samples: bool = False) -> dict:
    """Run (or resume) a fine-tuning run, or evaluate a checkpoint (``--eval``); returns the final step, the train
    metrics, the evaluation history, the best accuracy and the model."""
    d = init_distributed(args.device)
    apply_global_batch_size(args, d.world_size)
    out_dir = Path(args.output_dir)
    if args.eval:
        return _evaluate_only(args, d)
    lock = train_state.open_run_folder(d, out_dir)  # one writer per run folder, before any work
    try:
        return _finetune(args, d, out_dir, record_samples)
    finally:
        if lock is not None:
            lock.release()


def _data(args: argparse.Namespace, d: Dist, train: bool = True):
    from beit.finetune_data import build_loaders

    try:
        return build_loaders(args, d, train)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        raise TrainingError(f"--data {args.data}: {e}") from e


def _evaluate_only(args: argparse.Namespace, d: Dist) -> dict:
    precision = resolve_precision(args.precision, d.device)
    _, val_loader, num_classes = _data(args, d, train=False)
    path = args.resume if args.resume not in ("auto", "none") else args.finetune
    model = _model_for_eval(args, path, num_classes, d).to(d.device)
    result = evaluate(model, val_loader.iter_from(0), d, autocast(precision, d.device), num_classes=num_classes)
    if d.main:
        print(f"evaluated {path}: top-1 {result['acc1']:.4f}, top-5 {result['acc5']:.4f}, loss {result['loss']:.4f} "
              f"on {result['count']} images", flush=True)  # fmt: skip
    return {"eval": result, "model": model}


def _model_for_eval(args: argparse.Namespace, path: str, num_classes: int, d: Dist) -> nn.Module:
    """Ours rebuild from their recorded configuration; others are loaded into the model the options name."""
    file = Path(path).is_file() and Path(path).suffix != ".safetensors"
    try:
        head = peek_checkpoint(path) if file else None  # mapped: only its entries are read here
    except ValueError as e:
        raise TrainingError(str(e)) from e
    if isinstance(head, dict) and "model_config" in head and "model" in head:
        model = classifier_from_checkpoint(path, impl=args.impl)
        if model.num_classes != num_classes:
            raise TrainingError(f"{path} classifies {model.num_classes} classes, the data has {num_classes}")
        return model
    model = build_classifier(args, args.num_classes or num_classes)
    if model.num_classes != num_classes:
        raise TrainingError(f"--num-classes {model.num_classes} does not match the data's {num_classes} classes")
    load_weights(model, path, d, require_head=True)
    return model


def _finetune(args: argparse.Namespace, d: Dist, out_dir: Path, record_samples: bool) -> dict:
    if args.demo:
        from beit.finetune_demo import prepare_demo

        prepare_demo(args, d)
    precision = resolve_precision(args.precision, d.device)
    torch.manual_seed(args.seed + d.rank)
    random.seed(args.seed + d.rank)  # mixup, cutmix and random erasing draw from it; checkpoints keep its state
    torch.backends.cudnn.benchmark = d.device.type == "cuda"

    train_loader, val_loader, num_classes = _data(args, d)
    if args.num_classes is not None and args.num_classes != num_classes:
        raise TrainingError(f"--num-classes {args.num_classes} does not match the data's {num_classes} classes")
    batches_per_epoch = len(train_loader)
    steps_per_epoch = batches_per_epoch // args.accum_steps
    if steps_per_epoch < 1:
        raise TrainingError(f"one epoch has {batches_per_epoch} batches per rank, fewer than --accum-steps "
                            f"{args.accum_steps}: lower the batch size or the accumulation")  # fmt: skip
    total_steps = args.steps if args.steps > 0 else args.epochs * steps_per_epoch
    warmup = args.warmup_steps if args.warmup_steps >= 0 else int(args.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total_steps)

    model = build_classifier(args, num_classes)
    resume = train_state.find_resume(args.resume, out_dir, move_aside=d.main)
    if args.finetune and resume is None:
        load_weights(model, args.finetune, d, require_head=False)
    model = model.to(d.device)
    step_module: nn.Module = ClassifyStep(model, args.smoothing)
    if d.enabled:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[d.device.index] if d.device.type == "cuda" else None
        )
    if args.compile:
        step_module = torch.compile(step_module)

    optimizer = fused_adamw(model, args.lr, args.weight_decay, args.betas, args.eps, layer_decay=args.layer_decay)
    scaler = grad_scaler(precision, d.device)
    lr_schedule = cosine_scheduler(args.lr, args.min_lr, total_steps, warmup, start_warmup_value=args.warmup_lr)
    wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay, total_steps)
    ema = None
    if args.model_ema:
        from beit.ema import ModelEma

        ema = ModelEma(model, decay=args.model_ema_decay)

    state = {"evals": [], "best": None}
    position = Position()
    data_record = train_state.data_record(train_loader, d.world_size)
    if resume is not None:
        ckpt = train_state.load_checkpoint(resume, KIND)
        train_state.check_compatible(ckpt, args, resume, RESUME_KEYS)
        train_state.check_resume_point(ckpt, args.seed, resume, data_record, out_dir)
        position = Position(*train_state.restore(ckpt, resume, d, model, optimizer, scaler))
        state["evals"] = list(ckpt.get("evals", []))
        state["best"] = ckpt.get("best")
        if ema is not None:
            if "model_ema" not in ckpt:
                raise TrainingError(f"{resume} holds no model EMA: resume without --model-ema, or start afresh")
            ema.load_state_dict(ckpt["model_ema"])

    if d.main:
        train_state.write_args(args, out_dir)
        _write_evals(out_dir, state["evals"])
    amp = autocast(precision, d.device)
    metrics = Metrics(d.device, accuracy_name="train_acc")
    faults = Faults(args.inject_nonfinite, args.inject_sigint, device=d.device)
    mixup, erasing = _batch_augmentations(args, num_classes)
    plots = {"loss": "training loss", "train_acc": "training accuracy"}
    sinks = LogSinks(out_dir, enabled=d.main, progress=args.progress, total=total_steps, start=position.step,
                     desc="finetune", plot_keys=plots)  # fmt: skip
    opts = LoopOptions(total_steps=total_steps, accum_steps=args.accum_steps, precision=precision,
                       clip_grad=args.clip_grad, log_interval=args.log_interval, ckpt_interval=args.ckpt_interval,
                       keep_ckpts=args.keep_ckpts, max_nonfinite=args.max_nonfinite)  # fmt: skip

    def at_boundary(pos: Position, final: bool) -> None:
        """Evaluate at the epochs --eval-interval picks and at the end (once per step), keep the best weights."""
        done = bool(state["evals"]) and state["evals"][-1]["step"] == pos.step
        due = final or (args.eval_interval > 0 and (pos.epoch + 1) % args.eval_interval == 0)
        if done or not due:
            return
        eval_model = ema.module if ema is not None else model
        r = evaluate(eval_model, val_loader.iter_from(0), d, amp, num_classes=num_classes)
        r.update(step=pos.step, epoch=pos.epoch + (0 if final else 1))
        state["evals"].append(r)
        if d.main:
            print(f"eval at step {pos.step} (epoch {r['epoch']}): top-1 {r['acc1']:.4f}, top-5 {r['acc5']:.4f}, loss "
                  f"{r['loss']:.4f} on {r['count']} images", flush=True)  # fmt: skip
        if state["best"] is None or r["acc1"] > state["best"]["acc1"]:
            state["best"] = dict(r)
            if d.main:
                train_state.save_verified(weights_file(eval_model, args, {"eval": r}), out_dir / "best.pth")
        if d.main:
            _write_evals(out_dir, state["evals"])

    def saved() -> dict:
        extra = {"kind": KIND, "data": data_record, "args": train_state.jsonable(vars(args)),
                 "model_config": model.config.to_dict(), "evals": state["evals"], "best": state["best"]}  # fmt: skip
        if ema is not None:
            extra["model_ema"] = ema.state_dict()
        return extra

    result = run_loop(
        d, Task(model, step_module, ClassifyInputs(d.device, mixup, erasing)), optimizer, scaler, train_loader,
        lr_schedule, wd_schedule, opts, out_dir, sinks, position=position, amp=amp, metrics=metrics,
        saved_extra=saved, faults=faults, record_samples=record_samples,
        after_step=(lambda: ema.update(model)) if ema is not None else None, at_boundary=at_boundary,
    )  # fmt: skip
    return {"step": result.position.step, "epoch": result.position.epoch,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None, "metrics": result.metrics,
            "history": result.history, "evals": state["evals"], "best": state["best"], "model": model,
            "samples": result.samples}  # fmt: skip


def _batch_augmentations(args: argparse.Namespace, num_classes: int):
    from beit.mixup import Mixup, RandomErasing

    mixup = Mixup.from_args(args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.smoothing,
                            num_classes)  # fmt: skip
    erasing = RandomErasing(probability=args.reprob) if args.reprob > 0 else None
    return mixup, erasing


def _write_evals(out_dir: Path, evals: list[dict]) -> None:
    """``eval.jsonl``: one line per evaluation, rewritten whole, so that a resumed run's file holds each once."""
    tmp = out_dir / ".eval.jsonl.tmp"
    tmp.write_text("".join(json.dumps(e) + "\n" for e in evals))
    os.replace(tmp, out_dir / "eval.jsonl")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.demo:
            from beit.finetune_demo import run_demo

            run_demo(args, finetune)
            return 0
        result = finetune(args)
    except (TrainingError, BadImageError) as e:
        print(f"beit-finetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        shutdown()
    if "eval" in result:
        return 0
    best = result["best"]
    if best is not None:
        print(f"done: step {result['step']}, best top-1 {best['acc1']:.4f} (top-5 {best['acc5']:.4f}) at epoch "
              f"{best['epoch']}, weights {Path(args.output_dir) / 'best.pth'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
