"""The training loop every trainer runs, read top to bottom as the official ``engine_for_pretraining.py``.

Per optimizer step: the step's learning rate and weight decay, ``accum_steps`` micro-batches from the loader
through ``beit.engine.train_step`` (or the captured step of ``beit.graphs``), the device-side metrics read and
logged every ``log_interval`` steps, a training-state checkpoint every ``ckpt_interval`` steps and at each epoch's
end. The loop stops between optimizer steps only, so a checkpoint never splits an accumulation, and on SIGINT it
finishes the step in flight, writes a checkpoint and raises KeyboardInterrupt.

A trainer supplies the model, its loss module and inputs (``Task``), the optimizer and schedules, the loader,
``extras(ips)`` for the metrics of its own (MFU), ``after_step()`` for device work after each optimizer step (a
model EMA) and ``at_boundary(position, final)`` for work at each epoch's end and before the final checkpoint
(evaluation), so that its results are in the checkpoint written next; checkpoints, resume state, logging and the
distributed reductions are the loop's.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from beit.distributed import Dist
from beit.engine import NO_FAULTS, Faults, Metrics, train_step
from beit.errors import TrainingError
from beit.sinks import LogSinks
from beit.train_state import gathered_rng_states, save_checkpoint


@dataclass
class Task:
    """What a trainer trains: ``step_module(*prepare(batch)) -> (loss, correct, count)``."""

    model: nn.Module
    step_module: nn.Module
    prepare: Callable[[dict], tuple]


@dataclass
class LoopOptions:
    total_steps: int
    accum_steps: int
    precision: str
    clip_grad: float
    log_interval: int
    ckpt_interval: int
    keep_ckpts: int
    max_nonfinite: int


@dataclass
class Position:
    """Where the run stands: optimizer steps taken, the epoch, and batches of the epoch consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass
class LoopResult:
    position: Position
    checkpoint: Path | None
    metrics: dict
    history: list[dict]
    samples: dict[int, list[int]] = field(default_factory=dict)


def run_loop(
    d: Dist,
    task: Task,
    optimizer,
    scaler,
    loader,
    lr_schedule: np.ndarray,
    wd_schedule: np.ndarray,
    opts: LoopOptions,
    out_dir: Path,
    sinks: LogSinks,
    *,
    position: Position,
    amp,
    metrics: Metrics,
    saved_extra: Callable[[], dict],
    extras: Callable[[float], dict] | None = None,
    graph_step=None,
    faults: Faults = NO_FAULTS,
    record_samples: bool = False,
    after_step: Callable[[], None] | None = None,
    at_boundary: Callable[[Position, bool], None] | None = None,
) -> LoopResult:
    """Train from ``position`` to ``opts.total_steps``. ``saved_extra()`` adds the trainer's own entries to every
    training-state checkpoint (options, model config, data record); ``record_samples`` lists, per epoch, the
    data-set indices of the samples this rank saw. ``at_boundary(position, final)`` runs after each epoch's last
    step (``final`` False, the epoch not yet advanced) and once before the final checkpoint (``final`` True), on
    every rank."""
    pos = position
    log_state = {"t": time.perf_counter(), "images": 0}
    last_metrics: dict = {}
    seen: dict[int, list[int]] = {}
    interrupted = {"flag": False}
    no_sync = task.step_module.no_sync if d.enabled else None

    def checkpoint() -> Path | None:
        state = {
            "model": task.model.state_dict(),
            "optimizer": optimizer.state_dict() if graph_step is None else graph_step.optimizer_state_dict(),
            "scaler": scaler.state_dict(),
            "step": pos.step,
            "epoch": pos.epoch,
            "batch_in_epoch": pos.batch_in_epoch,
            "rng": gathered_rng_states(d),  # collective: every rank takes part
            **saved_extra(),
        }
        return save_checkpoint(state, out_dir, pos.step, opts.keep_ckpts) if d.main else None

    def counted(batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            if record_samples:
                seen.setdefault(pos.epoch, []).extend(batch["index"][batch["valid"]].tolist())
            pos.batch_in_epoch += 1
            log_state["images"] += batch["images"].shape[0]
            yield batch

    def set_schedule(step: int) -> float:
        lr, wd = float(lr_schedule[step]), float(wd_schedule[step])
        faults.set_step(step)
        if graph_step is not None:
            graph_step.set_schedule(lr, wd)
        else:
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)  # layer-wise decay: the official per-group scale
                if g["weight_decay"] > 0:
                    g["weight_decay"] = wd
        return lr

    def one_step(first: dict, batches: Iterator[dict]) -> bool:
        micro_batches = counted(_prepend(first, batches))
        if graph_step is None:
            return train_step(
                task.step_module, task.prepare, micro_batches, optimizer, scaler, metrics, amp=amp,
                precision=opts.precision, clip_grad=opts.clip_grad, accum_steps=opts.accum_steps,
                loss_factor=faults.loss_factor, no_sync=no_sync,
            )  # fmt: skip
        loaded = 0
        for micro, batch in zip(range(opts.accum_steps), micro_batches):
            graph_step.load(micro, batch)  # the graph runs the whole step once every micro-batch is in
            loaded += 1
        if loaded < opts.accum_steps:  # only copied into the input buffers; the graph owns the gradients
            return False
        was_captured = graph_step.captured
        graph_step.step()
        if graph_step.captured and not was_captured and d.main:
            print(f"captured the training step in a CUDA graph at step {pos.step}", flush=True)
        return True

    def log(lr: float) -> None:
        m, consecutive = metrics.read(d.all_reduce)
        now = time.perf_counter()
        ips = log_state["images"] * d.world_size / max(now - log_state["t"], 1e-9)
        log_state["t"], log_state["images"] = now, 0
        m.update(step=pos.step, epoch=pos.epoch, lr=lr, images_per_s=ips)
        if extras is not None:
            m.update(extras(ips))
        if d.device.type == "cuda":
            m["max_memory_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
        last_metrics.clear()
        last_metrics.update(m)
        sinks.log(m, postfix=dict(loss=f"{m['loss']:.3f}", acc=f"{m[metrics.accuracy_name]:.3f}", ips=f"{ips:.0f}"))
        if consecutive >= opts.max_nonfinite:
            raise TrainingError(
                f"{consecutive} non-finite steps in a row at step {pos.step}: stopping. The last good "
                f"checkpoint in {out_dir} is intact; lower the learning rate or check the data."
            )

    def on_sigint(signum, frame):  # finish the step in flight, then checkpoint and stop
        if interrupted["flag"]:
            raise KeyboardInterrupt
        interrupted["flag"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        while pos.step < opts.total_steps and not interrupted["flag"]:
            loader.set_epoch(pos.epoch)
            batches = iter(loader.iter_from(pos.batch_in_epoch))
            epoch_over = False
            while True:
                first = next(batches, None)
                if first is None:
                    epoch_over = True
                    break
                if pos.step >= opts.total_steps or interrupted["flag"]:
                    break
                lr = set_schedule(pos.step)
                if faults.sigint_step is not None and pos.step == faults.sigint_step:
                    signal.raise_signal(signal.SIGINT)
                    break
                if not one_step(first, batches):
                    # The loader ran out inside an accumulation: the epoch is over, the partial step dropped
                    # (as drop_last).
                    epoch_over = True
                    break
                pos.step += 1
                if after_step is not None:
                    after_step()
                sinks.advance()
                if pos.step % opts.log_interval == 0 or pos.step == opts.total_steps:
                    log(lr)
                if opts.ckpt_interval and pos.step % opts.ckpt_interval == 0 and pos.step < opts.total_steps:
                    checkpoint()
            if epoch_over:
                if at_boundary is not None and not interrupted["flag"]:
                    at_boundary(pos, False)
                pos.epoch += 1
                pos.batch_in_epoch = 0
                if pos.step < opts.total_steps:
                    checkpoint()
        if at_boundary is not None and not interrupted["flag"]:
            at_boundary(pos, True)
        final = checkpoint()
    finally:
        signal.signal(signal.SIGINT, old_handler)
        sinks.close()
    if interrupted["flag"]:
        if d.main:
            print(f"interrupted: checkpoint written at step {pos.step} ({final})", file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    sinks.plot()
    return LoopResult(pos, final, dict(last_metrics), sinks.history, seen)


def _prepend(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    # Not ``yield from``: closing this generator (when a step has taken its micro-batches) would close ``rest``,
    # the epoch's iterator, with it.
    for batch in rest:  # noqa: UP028
        yield batch

