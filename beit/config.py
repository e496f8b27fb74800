"""Command lines with a YAML config file: ``--config run.yaml`` sets defaults (keys as the long option names, with
underscores or dashes), the command line overrides them, and the file's values get the checks argparse gives the
command line's. Shared by the trainers."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import yaml

from beit.errors import TrainingError


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None,
                      demo: dict | None = None) -> tuple[argparse.Namespace, set[str]]:  # fmt: skip
    """Parse ``argv`` (``sys.argv[1:]`` when None) with the defaults of its ``--config`` file. Returns the options
    and the names the user set, on the command line or in the file. With ``--demo`` set, ``demo`` replaces the
    defaults of the options the user did not set."""
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    cfg = {}
    if known.config:
        cfg = read_yaml(known.config)
        valid = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            parser.error(f"unknown option(s) in {known.config}: {', '.join(unknown)}")
        check_config_values(parser, cfg, known.config)
        parser.set_defaults(**cfg)
    args = parser.parse_args(argv)
    given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")} | set(cfg)
    if demo is not None and getattr(args, "demo", False):
        for k, v in demo.items():
            if k not in given:
                setattr(args, k, v)
    return args, given


def apply_global_batch_size(args: argparse.Namespace, world_size: int) -> None:
    """``--global-batch-size``: images per optimizer step over all ranks, so ``--batch-size`` becomes it divided by
    ranks x accumulation steps; one that does not divide is a TrainingError."""
    if args.global_batch_size is None:
        return
    per = world_size * args.accum_steps
    if args.global_batch_size % per:
        raise TrainingError(
            f"--global-batch-size {args.global_batch_size} does not divide across {world_size} GPU(s) x "
            f"{args.accum_steps} accumulation step(s)"
        )
    args.batch_size = args.global_batch_size // per


def check_config_values(parser: argparse.ArgumentParser, cfg: dict, path: str) -> None:
    """A config file's values get the checks argparse gives the command line's (types, choices), which
    ``set_defaults`` skips: a ``precision: fp8`` must not quietly train in fp32."""
    actions = {a.dest: a for a in parser._actions}
    for key, v in cfg.items():
        a = actions[key]
        if v is None and a.default is None:  # an option that may be left unset
            continue
        problem = config_value_problem(a, v)
        if problem:
            parser.error(f"{path}: {key}: {v!r} is not {problem}")


def config_value_problem(a: argparse.Action, v) -> str | None:
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


def read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TrainingError(f"cannot read the config file {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise TrainingError(f"{path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in cfg.items()}


def check_trainer_options(parser: argparse.ArgumentParser, args: argparse.Namespace, *, at_least_one: tuple[str, ...],
                          non_negative: tuple[str, ...], optional_at_least_one: tuple[str, ...]) -> None:  # fmt: skip
    """The checks both trainers make of their options, as parser errors: integers ``at_least_one`` >= 1, numbers
    ``non_negative`` finite and >= 0 (NaN refused), ``optional_at_least_one`` unset or >= 1; AdamW's eps and betas,
    drop path, the device, the output folder, a training length, the choices of values a config file or a demo set
    (argparse checks only the command line's), and Triton's interpreter refused bf16."""
    for name in at_least_one:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in non_negative:
        v = getattr(args, name)
        if not (v >= 0 and math.isfinite(v)):
            parser.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    for name in optional_at_least_one:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (args.eps > 0 and math.isfinite(args.eps)):
        parser.error(f"--eps must be a finite number > 0, got {args.eps}")
    if not all(0 <= b < 1 for b in args.betas):
        parser.error(f"--betas must lie in [0, 1), got {' '.join(map(str, args.betas))}")
    if not 0 <= args.drop_path < 1:
        parser.error(f"--drop-path must lie in [0, 1), got {args.drop_path}")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output-dir {args.output_dir} exists and is not a folder")
    for a in parser._actions:
        if a.choices is not None and getattr(args, a.dest, None) not in a.choices:
            parser.error(f"--{a.dest.replace('_', '-')} must be one of {', '.join(map(str, a.choices))}")
    if args.epochs < 1 and args.steps < 1:
        parser.error("give --epochs or --steps (>= 1)")
    if args.device not in ("auto", "cuda", "cpu") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be auto, cuda, cuda:N or cpu, got {args.device!r}")
    on_cpu = args.device == "cpu" or (args.device == "auto" and not _cuda_available())
    if on_cpu and args.impl == "triton" and args.precision == "bf16":
        parser.error("--impl triton --precision bf16 cannot run on the CPU: Triton's interpreter computes bf16 "
                     "matrix products wrongly; use --precision fp32 there, or --impl sdpa for bf16")  # fmt: skip


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def add_optimisation_options(g, *, epochs: int, lr: float, min_lr: float, warmup_epochs: float, clip_grad: float,
                             clip_help: str) -> None:  # fmt: skip
    """The optimisation options both trainers share, with each recipe's defaults."""
    from beit.precision import PRECISIONS

    g.add_argument("--batch-size", type=int, default=128, help="images per GPU (process) per micro-step")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="images per optimizer step over all GPUs; sets --batch-size to it / (GPUs x accum steps)")
    g.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-steps per step")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--steps", type=int, default=0, help="total optimizer steps; overrides --epochs when > 0")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--min-lr", type=float, default=min_lr)
    g.add_argument("--warmup-epochs", type=float, default=warmup_epochs)
    g.add_argument("--warmup-steps", type=int, default=-1, help="overrides --warmup-epochs when >= 0")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=clip_grad, help=clip_help)
    g.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 where supported, fp16 on "
                   "older GPUs (with a gradient scaler), fp32 on CPU")
    g.add_argument("--seed", type=int, default=0)


def add_run_options(g, *, output_dir: str) -> None:
    """The run options both trainers share: the folder, resume, checkpoints, logs, device, progress bar, and the
    hidden fault injection of the tests."""
    g.add_argument("--output-dir", default=output_dir)
    g.add_argument("--resume", default="auto", help="auto (newest checkpoint in the output folder), none, or a path")
    g.add_argument("--ckpt-interval", type=int, default=0, help="also checkpoint every N steps (0: per epoch only)")
    g.add_argument("--keep-ckpts", type=int, default=3, help="how many checkpoints to keep")
    g.add_argument("--log-interval", type=int, default=50, help="steps between metric reads (the only host syncs)")
    g.add_argument("--max-nonfinite", type=int, default=10, help="stop after this many non-finite steps in a row")
    g.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    # Fault injection for tests: make the loss non-finite at these global steps; interrupt (SIGINT) at a step.
    g.add_argument("--inject-nonfinite", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    g.add_argument("--inject-sigint", type=int, default=None, help=argparse.SUPPRESS)
