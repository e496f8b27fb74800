"""Optimizer parameter groups and the per-step schedules of the official pretraining recipe.

Weight decay exclusions follow unilm ``optim_factory.get_parameter_groups``: no decay for 1-D parameters, names
ending in ``.bias``, and the model's ``no_weight_decay()`` set (``pos_embed``, ``cls_token``). So ``gamma_*``,
``q_bias``/``v_bias`` and LayerNorms get none, while ``mask_token`` and the relative position table do get decay,
as in the official code.

The schedule is unilm ``utils.cosine_scheduler``: a linear warm-up from 0 to the base value over the warm-up
steps, then ``final + (base - final) * (1 + cos(pi * i / len)) / 2`` per step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


def parameter_groups(model: nn.Module, weight_decay: float, skip: set[str] | None = None) -> list[dict]:
    """Two groups, with and without weight decay, by the official rule."""
    if skip is None:
        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "param_names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "param_names": no_decay_names},
    ]


def cosine_scheduler(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """One value per step: linear warm-up over ``warmup_steps``, then cosine from ``base_value`` to
    ``final_value`` over the remaining steps (unilm ``cosine_scheduler`` with steps instead of epochs)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}]")
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps) if warmup_steps > 0 else np.array([])
    iters = np.arange(total_steps - warmup_steps)
    decay = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(math.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, decay))
    assert len(schedule) == total_steps
    return schedule


def fused_adamw(
    model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over the official parameter groups, fused: its step takes a GradScaler's found-inf flag on the device,
    so skipping a non-finite step needs no host sync (CUDA and, since torch 2.4, CPU)."""
    groups = parameter_groups(model, weight_decay)
    for g in groups:
        del g["param_names"]  # names are for inspection; the optimizer needs only the tensors
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
