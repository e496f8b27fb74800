"""Precision policy of the trainers and the tokenizer: which autocast dtype a device runs, and the GradScaler."""

from __future__ import annotations

import contextlib

import torch

from beit.errors import TrainingError
from beit_kernels.backend import native_bf16

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 where the GPU has it, fp16 (with loss scaling) on older GPUs, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise TrainingError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if native_bf16(device) else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError("fp16 autocast needs CUDA; use --precision bf16 or fp32 on CPU")
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise TrainingError("this GPU has no bf16 (V100 and older): use --precision fp16")
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context of a resolved precision (none for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16: loss scaling from 2^16. bf16 and fp32: a scale of 1 that only carries the found-inf flag, so a
    non-finite step is skipped on the device in every precision."""
    return torch.amp.GradScaler(device.type, enabled=True, init_scale=2.0**16 if precision == "fp16" else 1.0)
