"""Model EMA: the closed form after k updates, buffers copied, a bitwise state-dict round trip."""

import io

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from beit.ema import ModelEma


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def test_ema_is_a_frozen_eval_copy():
    model = _model().train()
    ema = ModelEma(model, decay=0.9)
    assert not ema.module.training and model.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    for p, q in zip(model.parameters(), ema.module.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()


def test_ema_after_k_updates_equals_the_closed_form():
    decay, k = 0.8, 5
    model = _model()
    ema = ModelEma(model, decay=decay)
    names = [n for n, _ in model.named_parameters()]
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    seen = {n: [] for n in names}
    g = torch.Generator().manual_seed(1)
    for step in range(1, k + 1):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * step)
                seen[n].append(p.detach().double().clone())
            model[1].running_mean.fill_(float(step))
            model[1].num_batches_tracked.fill_(10 * step)
        ema.update(model)
    got = dict(ema.module.named_parameters())
    for n in names:
        # e_k = d^k e_0 + sum_{j=1..k} (1 - d) d^(k - j) p_j, in float64
        expected = decay**k * start[n] + sum((1 - decay) * decay ** (k - j) * seen[n][j - 1] for j in range(1, k + 1))
        torch.testing.assert_close(got[n].double(), expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got[n].double(), seen[n][-1])  # averaged, not copied
    # Buffers are copied, not averaged; the integer counter stays an exact integer.
    assert torch.equal(ema.module[1].running_mean, torch.full((3,), float(k)))
    assert ema.module[1].num_batches_tracked.dtype == torch.int64 and int(ema.module[1].num_batches_tracked) == 10 * k


def test_decay_zero_copies_and_one_stays():
    model = _model()
    follow, stay = ModelEma(model, decay=0.0), ModelEma(model, decay=1.0)
    before = {k: v.clone() for k, v in stay.state_dict().items() if v.dtype.is_floating_point}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    follow.update(model)
    stay.update(model)
    for (n, p), q in zip(model.named_parameters(), follow.module.parameters()):
        assert torch.equal(p, q), n
    for n, p in stay.module.named_parameters():
        assert torch.equal(p, before[n]), n


def test_state_dict_round_trip_is_bitwise():
    model = _model()
    ema = ModelEma(model, decay=0.97)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1).add_(0.01)
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other = ModelEma(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)), decay=0.97)
    tensors = [p for p in other.module.parameters()]
    other.load_state_dict(loaded)
    assert all(a is b for a, b in zip(tensors, other.module.parameters()))  # loaded in place: update goes on
    a, b = ema.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    # And both go on identically.
    ema.update(model)
    other.update(model)
    for key in a:
        assert torch.equal(ema.state_dict()[key], other.state_dict()[key]), key
    # The EMA weights load into a bare model for evaluation.
    fresh = _model()
    fresh.load_state_dict(ema.state_dict())


class _Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found, self.ops = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        if str(func.overloadpacket) in {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal"}:
            self.found.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_update_never_waits_for_the_device_and_uses_foreach():
    model = _model()
    ema = ModelEma(model)
    with _Syncs() as watch:
        ema.update(model)
    assert watch.found == []
    assert "aten._foreach_lerp_" in watch.ops and "aten._foreach_copy_" in watch.ops


def test_bad_input():
    model = _model()
    for bad in (-0.1, 1.5, float("nan"), True, "0.99"):
        with pytest.raises(ValueError, match="decay"):
            ModelEma(model, decay=bad)
    ema = ModelEma(model)
    with pytest.raises(ValueError, match="not the model"):
        ema.update(nn.Sequential(nn.Linear(4, 3)))
    renamed = nn.Sequential()
    renamed.add_module("a", nn.Linear(4, 3))
    renamed.add_module("b", nn.BatchNorm1d(3))
    renamed.add_module("c", nn.Linear(3, 2))
    with pytest.raises(ValueError, match="lacks"):
        ema.update(renamed)
    with pytest.raises(TypeError, match="nn.Module"):
        ModelEma({"w": torch.zeros(2)})
