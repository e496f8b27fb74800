"""The whole pretraining step as one CUDA graph (``beit-pretrain --cuda-graph``).

The step has static shapes (full batches, a padded mask index of ``num_mask_patches`` columns) and never waits for
the host, so one optimizer step can be captured once and replayed: per micro-batch the tokenizer (no_grad), the
MIM loss under autocast and the scaled backward, then unscaling, clipping, the fused AdamW step, the GradScaler
update and the metric sums. The graph runs exactly ``beit.engine.train_step``, so it computes what the eager trainer
computes. Outside the graph, per step: copying the batch into static input
buffers, and writing the step's learning rate (and a scheduled weight decay) into device scalars with ``fill_``.

What makes that correct, read in the torch 2.13 sources installed here (the device runs 2.11; these code paths
predate it, but that is not checked line by line):

* The learning rate is a 0-d float32 tensor on the parameters' device in every param group: ``_fused_adamw_`` has
  a ``tensor_lr`` overload that reads it on the device (``const_data_ptr<float>()``; a CPU tensor would be read
  with ``.item()``). Its ``weight_decay`` is a ``float`` argument, baked into the graph at capture. A constant
  decay (the default) stays there; a scheduled one (``--weight-decay-end``) is applied instead by a step pre-hook
  as ``p *= 1 - lr * wd`` from device scalars, skipped on a non-finite step, with the fused kernel's decay set to
  0 (the kernel does ``p -= lr * wd * p`` before the Adam update, which does not read p: the same arithmetic).
* ``capturable=True`` in every group: ``Optimizer._accelerator_graph_capture_health_check`` refuses a capture
  otherwise. The fused path ignores the flag itself (``_fused_adam``: "Needed for consistency").
* GradScaler: ``scale`` multiplies by the device scale, ``unscale_`` runs ``_amp_foreach_non_finite_check_and_unscale_``
  into a device found-inf flag, ``step`` hands the flag to the fused optimizer (``optimizer.found_inf``; the kernel
  returns early when it is set and ``_fused_adam`` subtracts it from the step counts) instead of the ``.item()`` of
  ``_maybe_opt_step``, and ``update`` is ``_amp_update_scale_`` (fp16) or ``_scale.fill_(1.0)`` (bf16/fp32): all
  on the device, so fp16 loss scaling is captured too. The host-side stage bookkeeping resets in ``update``.
* ``clip_grad_norm_(foreach=True)`` without ``error_if_nonfinite``: ``_foreach_norm``, a stacked norm and a
  ``_foreach_mul_`` by a device tensor; nothing reads the norm on the host.
* Gradients: set to None before capture, so the captured backward allocates them from the graph's pool and every
  replay rewrites them (the torch docs' whole-network example); nothing zeroes them inside the graph.
* Random numbers (drop path): capture registers the default CUDA generator and ``CUDAGraph::replay`` advances its
  Philox offset by the graph's total use (``replay_prologue``), so each replay draws fresh numbers and the saved
  RNG state stays meaningful.
* Warm-up: a few eager steps on a side stream before capture (lazy initialisation, Triton compilation, cuBLAS
  workspaces, optimizer state), as the torch docs require; they are real training steps, not thrown away. The
  capture uses the same stream and ``capture_error_mode="thread_local"`` (as torch's own cudagraph trees do), so
  the loader's threads (DALI, pin-memory) may keep calling CUDA while the main thread captures.

State that the graph holds by address (parameters, optimizer moments and step counts, the scaler's scale, the
metric sums, the input buffers) must exist before capture and never be replaced: load a checkpoint before the
first ``step``. ``optimizer_state_dict`` gives a checkpoint that an eager run loads as it loads its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

from beit.engine import Metrics, MIMInputs, train_step

# The eager warm-up steps run an optimizer built for capture; torch warns about that once per optimizer.
_UNCAPTURED_WARNING = "This instance was constructed with capturable=True"


class CudaGraphStep:
    """One optimizer step (``accum_steps`` micro-batches) run eagerly ``warmup_steps`` times, then captured in a
    CUDA graph and replayed. Per step: ``load(micro, batch)`` for each micro-batch, then ``step(lr, weight_decay)``.

    On a device other than CUDA every step runs the same code eagerly (tests and smoke runs of the code path).
    ``decay_groups``: indices of the param groups that get weight decay; ``scheduled_weight_decay``: the decay
    changes from step to step (else the value of the first step is kept, and a later change is an error).
    ``loss_factor``: a device scalar the loss is multiplied by (``beit.engine.Faults``, tests), read on replay.
    """

    def __init__(
        self,
        step_module: nn.Module,
        tokenizer,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        metrics: Metrics,
        *,
        amp,
        precision: str,
        clip_grad: float,
        accum_steps: int = 1,
        decay_groups: Sequence[int] = (),
        scheduled_weight_decay: bool = False,
        loss_factor: torch.Tensor | None = None,
        warmup_steps: int = 3,
    ):
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
        if not all(g.get("fused") for g in optimizer.param_groups):
            # The non-fused path of GradScaler.step reads the found-inf flag on the host, which a capture forbids.
            raise ValueError("CudaGraphStep needs a fused optimizer (beit.optim.fused_adamw)")
        if not scaler.is_enabled():
            raise ValueError("CudaGraphStep needs an enabled GradScaler: its found-inf flag skips non-finite steps")
        if tokenizer is not None and getattr(tokenizer, "check_range", False):
            # Checked here, not at capture: the check reads a value back to the host, which a capture forbids.
            raise ValueError(
                "CudaGraphStep needs a tokenizer without its input range check (check_range=False, as beit-pretrain "
                "loads it): the check reads a value back to the host, which a CUDA graph cannot capture"
            )
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.device = params[0].device
        self.step_module, self.tokenizer, self.optimizer, self.scaler, self.metrics = (
            step_module, tokenizer, optimizer, scaler, metrics,
        )  # fmt: skip
        self.amp, self.precision, self.clip_grad, self.accum_steps = amp, precision, clip_grad, accum_steps
        self.decay_groups = tuple(decay_groups)
        self.warmup_steps = max(1, warmup_steps)
        self.inputs: list[dict[str, torch.Tensor]] = [{} for _ in range(accum_steps)]
        keys = ("images", "bool_masked_pos", "mask_index")
        self.input_keys = keys + (("tokenizer_images",) if tokenizer is not None else ("tokens",))

        groups = optimizer.param_groups
        # What a checkpoint records as lr and weight decay (python floats, as the eager trainer's groups hold).
        self._lr_value = float(groups[0]["lr"])
        self._wd_value = float(groups[self.decay_groups[0]]["weight_decay"]) if self.decay_groups else 0.0
        f32 = dict(dtype=torch.float32, device=self.device)
        self.lr = torch.full((), self._lr_value, **f32)
        for g in groups:
            g["lr"] = self.lr
            g["capturable"] = True
        self.weight_decay = None
        if scheduled_weight_decay and self.decay_groups:
            self.weight_decay = torch.full((), self._wd_value, **f32)
            for i in self.decay_groups:
                groups[i]["weight_decay"] = 0.0
            self._hook = optimizer.register_step_pre_hook(self._decoupled_weight_decay)
        self.loss_factor = loss_factor
        self.prepare = MIMInputs(tokenizer, self.device)

        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps_run = 0
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    # -- per step ------------------------------------------------------------------------------------------------
    def load(self, micro: int, batch: dict) -> None:
        """Copy micro-batch ``micro`` of the next step into the static input buffers (allocated on first use)."""
        slot = self.inputs[micro]
        for k in self.input_keys:
            src = batch[k]
            dst = slot.get(k)
            if dst is None:
                if self.captured:
                    raise RuntimeError(f"input {k!r} appeared after the capture")
                slot[k] = dst = torch.empty(src.shape, dtype=src.dtype, device=self.device)
            elif dst.shape != src.shape or dst.dtype != src.dtype:
                raise ValueError(
                    f"a CUDA graph needs static shapes: {k} is {tuple(src.shape)} {src.dtype}, the captured step "
                    f"has {tuple(dst.shape)} {dst.dtype}"
                )
            dst.copy_(src, non_blocking=True)

    def set_schedule(self, lr: float, weight_decay: float) -> None:
        """Write this step's learning rate and weight decay where the graph reads them (no recapture)."""
        self.lr.fill_(lr)
        self._lr_value = float(lr)
        if self.decay_groups:
            if self.weight_decay is not None:
                self.weight_decay.fill_(weight_decay)
            else:
                for i in self.decay_groups:
                    g = self.optimizer.param_groups[i]
                    if self.captured and g["weight_decay"] != weight_decay:
                        raise RuntimeError(
                            f"the graph was captured with weight decay {g['weight_decay']}; a changing decay needs "
                            "scheduled_weight_decay=True"
                        )
                    g["weight_decay"] = float(weight_decay)
            self._wd_value = float(weight_decay)

    def step(self, lr: float | None = None, weight_decay: float | None = None) -> None:
        """One optimizer step on the loaded micro-batches: eager during warm-up, then the capture and replays.
        The metrics are added on the device, as the eager trainer adds them. ``lr`` and ``weight_decay`` given:
        ``set_schedule`` them first."""
        if lr is not None:
            self.set_schedule(lr, self._wd_value if weight_decay is None else weight_decay)
        if self.graph is None:
            if self.device.type != "cuda" or self.steps_run < self.warmup_steps:
                self._run_eager()
            else:
                self._capture()
        if self.graph is not None:
            self.graph.replay()
        self.steps_run += 1

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def optimizer_state_dict(self) -> dict:
        """The optimizer's state as the eager trainer saves it: python-float lr and weight decay, capturable off.
        The tensors are the live ones the graph updates (torch.save reads them when it writes)."""
        sd = self.optimizer.state_dict()
        for i, g in enumerate(sd["param_groups"]):
            g["lr"] = self._lr_value
            g["capturable"] = False
            if i in self.decay_groups:
                g["weight_decay"] = self._wd_value
        return sd

    # -- internals ------------------------------------------------------------------------------------------------
    def _body(self) -> None:
        train_step(
            self.step_module, self.prepare, self.inputs, self.optimizer, self.scaler, self.metrics, amp=self.amp,
            precision=self.precision, clip_grad=self.clip_grad, accum_steps=self.accum_steps,
            loss_factor=self.loss_factor, zero_grad=False,
        )  # fmt: skip

    def _run_eager(self) -> None:
        if any(not slot for slot in self.inputs):
            raise RuntimeError("load() every micro-batch before step()")
        self.optimizer.zero_grad(set_to_none=True)  # the body accumulates into .grad and never zeroes it
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_UNCAPTURED_WARNING)
            if self.stream is None:
                self._body()
                return
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)  # the inputs and the schedule were written on the current stream
            with torch.cuda.stream(self.stream):
                self._body()
            current.wait_stream(self.stream)

    def _capture(self) -> None:
        # Set to None, the gradients are allocated by the captured backward from the graph's private pool and stay
        # there: every replay writes them anew (the first accumulation into a None grad is a copy, not an add).
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._body()
        except RuntimeError as e:
            raise RuntimeError(
                f"capturing the training step in a CUDA graph failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "something in the step synchronises with the host or changes shape: run without --cuda-graph"
            ) from e
        current.wait_stream(self.stream)
        self.graph = graph

    @torch.no_grad()
    def _decoupled_weight_decay(self, optimizer, args, kwargs) -> None:
        """Step pre-hook for a scheduled decay: p *= 1 - lr * wd on the decayed parameters, skipped when the
        GradScaler's found-inf flag (set on the optimizer just before its step) says the step is skipped."""
        found_inf = getattr(optimizer, "found_inf", None)
        keep = (found_inf == 0).to(torch.float32) if found_inf is not None else 1.0
        params = [p for i in self.decay_groups for p in optimizer.param_groups[i]["params"] if p.grad is not None]
        if params:
            torch._foreach_mul_(params, 1.0 - self.lr * self.weight_decay * keep)
