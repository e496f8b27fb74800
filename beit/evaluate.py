"""Classification evaluation: top-1 and top-5 accuracy and the cross-entropy on a validation set, exact across ranks.

Each rank evaluates a disjoint part of the validation set (the classification loader's evaluation sharding); the
loader pads a rank's last batch to full size with ``valid = False`` samples, which count nowhere. Per batch the
counts are summed on the device (no host synchronisation inside the loop) and all-reduced once at the end, so the
totals count every sample exactly once, whatever the number of ranks and however the set divides. The official
``--dist_eval`` instead pads the last batches with repeated samples and counts them twice.

    correct@k = sum over valid samples of [label in topk(logits, k)]     k = 1 and min(5, classes)
    loss      = sum over valid samples of cross_entropy(logits, label) / count
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from beit.distributed import Dist


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], d: Dist, amp, *, num_classes: int | None = None) -> dict:
    """``{"acc1", "acc5", "loss", "count"}`` of ``model`` (logits [B, C]) over ``batches`` (dicts with ``images``
    [B, 3, S, S], ``labels`` [B] int64 and ``valid`` [B] bool), summed over the ranks of ``d``. ``amp`` is the
    autocast context of the run. A label outside [0, C) fails the step on the device (an assertion), not silently."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=d.device)  # correct@1, correct@5, loss sum, count
    try:
        for batch in batches:
            images = batch["images"].to(d.device, non_blocking=True)
            labels = batch["labels"].to(d.device, non_blocking=True)
            valid = batch["valid"].to(d.device, non_blocking=True)
            with amp:
                logits = model(images)
            logits = logits.float()
            classes = logits.shape[1]
            if num_classes is not None and classes != num_classes:
                raise ValueError(f"the model gives {classes} logits per image, the data has {num_classes} classes")
            torch._assert_async(((labels >= 0) & (labels < classes)).all(), "evaluation label out of range")
            top = logits.topk(min(5, classes), dim=1).indices  # [B, k]
            hit = top == labels[:, None]  # [B, k]
            w = valid.double()
            loss = F.cross_entropy(logits, labels.clamp(0, classes - 1), reduction="none").double()
            sums += torch.stack([(hit[:, 0].double() * w).sum(), (hit.any(1).double() * w).sum(), (loss * w).sum(),
                                 w.sum()])  # fmt: skip
    finally:
        model.train(was_training)
    d.all_reduce(sums, "sum")
    c1, c5, loss_sum, count = sums.tolist()
    n = max(count, 1.0)
    return {"acc1": c1 / n, "acc5": c5 / n, "loss": loss_sum / n, "count": int(count)}
