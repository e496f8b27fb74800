"""Optimizer parameter groups and the per-step schedules of the official pretraining recipe.

Weight decay exclusions follow unilm ``optim_factory.get_parameter_groups``: no decay for 1-D parameters, names
ending in ``.bias``, and the model's ``no_weight_decay()`` set (``pos_embed``, ``cls_token``). So ``gamma_*``,
``q_bias``/``v_bias`` and LayerNorms get none, while ``mask_token`` and the relative position table do get decay,
as in the official code.

Layer-wise learning-rate decay follows unilm ``optim_factory.get_num_layer_for_vit`` and ``run_class_finetuning.py``:
with L = the number of blocks, the embeddings (``cls_token``, ``mask_token``, ``pos_embed``, ``patch_embed.*``) are
layer 0, ``blocks.i.*`` is layer i + 1, and everything else (a shared ``rel_pos_bias``, ``norm``, ``fc_norm``,
``head``) is layer L + 1. A parameter of layer l trains at ``lr * layer_decay ** (L + 1 - l)``: the head at the full
rate, the embeddings at ``layer_decay ** (L + 1)`` of it.

The schedule is unilm ``utils.cosine_scheduler``: a linear warm-up from 0 to the base value over the warm-up
steps, then ``final + (base - final) * (1 + cos(pi * i / len)) / 2`` per step.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn as nn


def _no_weight_decay_set(model: nn.Module, skip: set[str] | None) -> set[str]:
    if skip is None:
        return set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return set(skip)


def _is_no_decay(name: str, p: torch.Tensor, skip: set[str]) -> bool:
    """The official exclusion: 1-D parameters, names ending in ``.bias`` and the model's ``no_weight_decay()``."""
    return p.ndim == 1 or name.endswith(".bias") or name in skip


def parameter_groups(model: nn.Module, weight_decay: float, skip: set[str] | None = None) -> list[dict]:
    """Two groups, with and without weight decay, by the official rule."""
    skip = _no_weight_decay_set(model, skip)
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _is_no_decay(name, p, skip):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "param_names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "param_names": no_decay_names},
    ]


_BLOCK = re.compile(r"blocks\.(\d+)\.")
_EMBEDDING_NAMES = ("cls_token", "mask_token", "pos_embed")


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """The layer a parameter belongs to for layer-wise lr decay (unilm ``get_num_layer_for_vit``, whose
    ``num_max_layer`` is ``num_layers + 2``): ``cls_token``, ``mask_token``, ``pos_embed`` and ``patch_embed.*`` are
    0, ``blocks.i.*`` is i + 1, anything else (``rel_pos_bias.*``, ``norm``, ``fc_norm``, ``head``) is num_layers + 1.

    ``name`` is as ``named_parameters()`` of the bare model gives it: a DDP (``module.``) or ``torch.compile``
    (``_orig_mod.``) prefix is refused, since the official rule would silently put every such name in the last layer.
    """
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 0:
        raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}")
    if name.startswith(("module.", "_orig_mod.")):
        raise ValueError(
            f"parameter name {name!r} carries a wrapper prefix: pass the bare model (ddp.module, compiled._orig_mod)"
        )
    if name in _EMBEDDING_NAMES or name.startswith("patch_embed"):
        return 0
    m = _BLOCK.match(name)
    if m is not None:
        block = int(m.group(1))
        if block >= num_layers:
            raise ValueError(f"parameter {name!r} is in block {block}, but num_layers={num_layers}")
        return block + 1
    return num_layers + 1


def _num_layers(model: nn.Module) -> int:
    if hasattr(model, "get_num_layers"):
        return int(model.get_num_layers())
    if hasattr(model, "blocks"):
        return len(model.blocks)
    raise ValueError(f"layer-wise lr decay needs a ViT: {type(model).__name__} has neither get_num_layers() nor blocks")


def _check_layer_decay(layer_decay: float) -> None:
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be a number in (0, 1], got {layer_decay!r}")


def layer_decay_parameter_groups(
    model: nn.Module, weight_decay: float, layer_decay: float, skip: set[str] | None = None
) -> list[dict]:
    """Parameter groups split by (layer id, weight decay or not), as unilm ``get_parameter_groups`` with a
    ``LayerDecayValueAssigner``.

    Each group is a dict with ``params`` (tensors), ``param_names``, ``weight_decay`` (``weight_decay`` or 0.0 by the
    same exclusion rule as :func:`parameter_groups`), ``layer_id`` (:func:`layer_id_for_vit`) and ``lr_scale`` =
    ``layer_decay ** (L + 1 - layer_id)`` with L = ``model.get_num_layers()`` (or ``len(model.blocks)``). The
    trainer multiplies its scheduled lr by ``lr_scale``. Groups come in the order their first parameter appears
    in ``named_parameters()``; frozen parameters (``requires_grad=False``) are left out. ``layer_decay=1.0`` gives
    ``lr_scale == 1.0`` everywhere.
    """
    _check_layer_decay(layer_decay)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    num_layers = _num_layers(model)
    skip = _no_weight_decay_set(model, skip)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer_id = layer_id_for_vit(name, num_layers)
        no_decay = _is_no_decay(name, p, skip)
        g = groups.get((layer_id, no_decay))
        if g is None:
            g = groups[(layer_id, no_decay)] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": float(layer_decay ** (num_layers + 1 - layer_id)),
                "param_names": [],
                "layer_id": layer_id,
            }
        g["params"].append(p)
        g["param_names"].append(name)
    return list(groups.values())


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
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    layer_decay: float | None = None,
) -> torch.optim.AdamW:
    """AdamW over the official parameter groups, fused: its step takes a GradScaler's found-inf flag on the device,
    so skipping a non-finite step needs no host sync (CUDA and, since torch 2.4, CPU).

    ``layer_decay=None``: two groups (decay, no decay) from :func:`parameter_groups`, every group at ``lr``. A
    number in (0, 1]: the groups of :func:`layer_decay_parameter_groups`, each keeping its ``lr_scale`` and
    ``layer_id``, and starting at ``lr * lr_scale``; the caller sets ``group["lr"] = lr_now * group["lr_scale"]`` at
    each step, as the official trainer does."""
    if layer_decay is None:
        groups = parameter_groups(model, weight_decay)
    else:
        groups = layer_decay_parameter_groups(model, weight_decay, layer_decay)
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
    for g in groups:
        del g["param_names"]  # names are for inspection; the optimizer needs only the tensors
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
