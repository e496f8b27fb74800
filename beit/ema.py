"""An exponential moving average of a model's weights, as timm's ``ModelEmaV2`` (the official ``--model_ema``).

After each optimizer step, for every floating-point parameter ``e <- decay * e + (1 - decay) * p`` (one
``torch._foreach_lerp_`` with weight ``1 - decay``), so after k updates from ``e_0`` with parameters
``p_1..p_k``: ``e_k = decay**k * e_0 + sum_j (1 - decay) * decay**(k - j) * p_j``. Buffers (BatchNorm statistics,
``relative_position_index``) and any non-floating parameter are copied as they are, not averaged: averaging an
integer index would corrupt it. Everything runs on the device with no host synchronisation (unless the EMA lives
on another device than the model, which costs a copy of the weights per update).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

__all__ = ["ModelEma"]


class ModelEma:
    """A frozen copy of ``model`` (``.module``, eval mode, ``requires_grad=False``) tracking its weights.

    ``decay`` in [0, 1]: 0 copies the model at every update, 1 never moves. ``device``: where the copy lives (the
    model's own device when None). Pass the bare model (not a DDP or ``torch.compile`` wrapper), the same one to
    ``update`` every step; its parameter and buffer names must be the copy's. ``state_dict()`` is the copy's own
    (the model's keys), so it loads into a fresh model for evaluation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, device: torch.device | str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or math.isnan(decay) or not 0 <= decay <= 1:
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.device = None if device is None else torch.device(device)
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.module.requires_grad_(False)
        if self.device is not None:
            self.module.to(self.device)
        self._averaged_names, self._averaged = [], []  # floating parameters
        self._copied_names, self._copied = [], []  # buffers and any other parameter
        for name, p in self.module.named_parameters():
            if p.dtype.is_floating_point or p.dtype.is_complex:
                self._averaged_names.append(name)
                self._averaged.append(p)
            else:
                self._copied_names.append(name)
                self._copied.append(p)
        for name, b in self.module.named_buffers():
            self._copied_names.append(name)
            self._copied.append(b)

    def _sources(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        if len(params) + len(buffers) != len(self._averaged) + len(self._copied):
            raise ValueError(
                f"model has {len(params)} parameters and {len(buffers)} buffers, the EMA copy "
                f"{len(self._averaged) + len(self._copied)} tensors in all: not the model the EMA was made from"
            )
        try:
            averaged = [params[n] for n in self._averaged_names]
            copied = [params[n] if n in params else buffers[n] for n in self._copied_names]
        except KeyError as e:
            raise ValueError(
                f"model lacks {e.args[0]!r}, which the EMA copy has: not the model it was made from"
            ) from None
        if self.device is not None:
            averaged = [t.detach().to(self.device) for t in averaged]
            copied = [t.detach().to(self.device) for t in copied]
        return averaged, copied

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``e <- lerp(e, p, 1 - decay)`` for the floating parameters, a copy for the rest."""
        averaged, copied = self._sources(model)
        if self._averaged:
            torch._foreach_lerp_(self._averaged, averaged, 1.0 - self.decay)
        if self._copied:
            torch._foreach_copy_(self._copied, copied)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The copy's state dict (the model's keys; the tensors themselves, as ``nn.Module.state_dict``)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load into the copy in place (its tensors keep their identity, so ``update`` goes on with them)."""
        return self.module.load_state_dict(state_dict, strict=strict)
