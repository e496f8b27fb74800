"""The training step every trainer and benchmark shares.

One optimizer step is the official engine's (unilm ``engine_for_pretraining.py``), without a host
synchronisation: per micro-batch the task's inputs (for pretraining the tokenizer's labels under no_grad), the loss
under autocast and the scaled backward; then unscaling, clipping, the fused AdamW step (which takes the GradScaler's
found-inf flag and skips itself on the device) and the scaler's update; then the device-side metric sums.
``train_step`` runs that whole step over its micro-batches; the eager loop (``beit.loop``), the captured step
(``beit.graphs.CudaGraphStep``) and ``bench/train_throughput.py`` all call it.

A task supplies a ``step_module`` whose forward returns ``(loss, correct, count)`` (``MIMStep`` for pretraining)
and a ``prepare(batch) -> inputs`` callable that moves a batch to the device and computes what the loss needs
besides the batch (``MIMInputs``: the visual tokens of the masked patches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn


class MIMStep(nn.Module):
    """The loss of a batch as a module forward, so DistributedDataParallel sees it: (loss, correct, valid)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, bool_masked_pos, mask_index, tokens):
        return self.model.forward_mim_loss(images, bool_masked_pos, mask_index, tokens)


class MIMInputs:
    """``prepare`` for pretraining: a batch's tensors on ``device`` and the tokenizer's labels of its masked patches
    (no_grad). ``tokenizer`` None: the batch carries its ``tokens`` (benchmarks without the tokenizer)."""

    def __init__(self, tokenizer, device: torch.device):
        self.tokenizer, self.device = tokenizer, device

    def __call__(self, batch: dict) -> tuple:
        def get(key):
            return batch[key].to(self.device, non_blocking=True)

        mask_index = get("mask_index")
        if self.tokenizer is None:
            tokens = get("tokens")
        else:
            with torch.no_grad():
                # Only the masked patches' tokens are read by the loss: the tokenizer computes those (-1 elsewhere).
                tokens = self.tokenizer.get_codebook_indices(get("tokenizer_images"), positions=mask_index)
                tokens = tokens.flatten(1)  # [B, h, w] -> [B, N]
        return get("images"), get("bool_masked_pos"), mask_index, tokens


class Metrics:
    """Device-side sums between log points: reading them is the only host synchronisation of the loop.
    ``accuracy_name``: the log key of correct / count ("mim_acc" for pretraining)."""

    NAMES = ("loss", "correct", "valid", "grad_norm", "steps", "nonfinite")

    def __init__(self, device: torch.device, accuracy_name: str = "mim_acc"):
        self.device = device
        self.accuracy_name = accuracy_name
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

    def read(self, all_reduce: Callable[[torch.Tensor, str], None] | None = None) -> tuple[dict, int]:
        """The means since the last read (and reset the sums), and the current run of non-finite steps.
        ``all_reduce(tensor, op)`` ("sum" or "max") combines the ranks' values in place."""
        sums = self.sums.clone()
        consecutive = self.consecutive_nonfinite.clone()
        if all_reduce is not None:
            all_reduce(sums, "sum")
            all_reduce(consecutive, "max")
        s = dict(zip(self.NAMES, sums.tolist()))
        self.sums.zero_()
        good = max(s["steps"] - s["nonfinite"], 1)
        out = {
            "loss": s["loss"] / good,
            self.accuracy_name: s["correct"] / max(s["valid"], 1),
            "grad_norm": s["grad_norm"] / good,
            "nonfinite_steps": int(s["nonfinite"]),
        }
        return out, int(consecutive.item())


class Faults:
    """Fault injection for tests: the optimizer steps whose loss is made non-finite, and the step before which
    the run receives SIGINT. The loss is multiplied by a device scalar (1, or NaN at a chosen step) that
    ``set_step`` writes, so a captured step injects the same way on replay."""

    def __init__(self, nonfinite_steps: Iterable[int] = (), sigint_step: int | None = None, device=None):
        self.nonfinite_steps = frozenset(nonfinite_steps)
        self.sigint_step = sigint_step
        self.loss_factor = torch.ones((), device=device) if self.nonfinite_steps else None

    def set_step(self, step: int) -> None:
        if self.loss_factor is not None:
            self.loss_factor.fill_(float("nan") if step in self.nonfinite_steps else 1.0)


NO_FAULTS = Faults()


def forward_backward(step_module: nn.Module, inputs: tuple, amp, scaler, scale: float, loss_factor=None,
                     mark: Callable[[str], None] | None = None):  # fmt: skip
    """One micro-batch: the loss under autocast, the scaled backward. Returns (loss, correct, count) as device
    tensors: nothing here waits for the host. ``loss_factor``: a device scalar the loss is multiplied by."""
    with amp:
        loss, correct, valid = step_module(*inputs)
    if loss_factor is not None:
        loss = loss * loss_factor
    if mark is not None:
        mark("forward")
    scaler.scale(loss * scale).backward()
    if mark is not None:
        mark("backward")
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
    """Add an optimizer step to the device-side metrics: ``acc`` is (loss, correct, count) summed over the
    micro-batches; a step whose loss or gradient norm is not finite is counted, not averaged."""
    loss_sum, correct, valid = acc
    loss = loss_sum / accum_steps
    nonfinite = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    metrics.add(loss.float(), correct, valid, grad_norm.float(), nonfinite)


def train_step(
    step_module: nn.Module,
    prepare: Callable[[dict], tuple],
    micro_batches: Iterable[dict],
    optimizer,
    scaler,
    metrics: Metrics,
    *,
    amp,
    precision: str,
    clip_grad: float,
    accum_steps: int = 1,
    loss_factor: torch.Tensor | None = None,
    zero_grad: bool = True,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    mark: Callable[[str], None] | None = None,
) -> bool:
    """One optimizer step over ``accum_steps`` micro-batches taken from ``micro_batches`` (each loss scaled by
    1 / accum_steps), then the optimizer step and the metrics. Returns False, having dropped the partial
    accumulation, when ``micro_batches`` ends first (an epoch's last batches, as drop_last).

    ``no_sync``: a context for every micro-batch but the last (DistributedDataParallel's, which skips their
    all-reduce). ``mark(phase)``: called after each phase ("inputs", "forward", "backward" per micro-batch, then
    "optimizer"), for benchmarks that time them. ``zero_grad=False``: the gradients stay allocated after the step
    (a captured step's live in the graph's memory)."""
    acc: tuple = ()
    taken = 0
    for batch in micro_batches:
        last = taken == accum_steps - 1
        inputs = prepare(batch)
        if mark is not None:
            mark("inputs")
        sync = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with sync:
            out = forward_backward(step_module, inputs, amp, scaler, 1.0 / accum_steps, loss_factor, mark)
        # (loss, correct, count) summed over the micro-batches of this optimizer step, on the device.
        acc = out if taken == 0 else tuple(a + b for a, b in zip(acc, out))
        taken += 1
        if last:
            break
    if taken < accum_steps:
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)
        return False
    grad_norm = optimizer_step(optimizer, scaler, clip_grad, precision, zero_grad=zero_grad)
    record_step(metrics, acc, grad_norm, accum_steps)
    if mark is not None:
        mark("optimizer")
    return True

