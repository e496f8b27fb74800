"""Mixup / CutMix label arithmetic, soft-target cross-entropy and random erasing, against independent computations."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from beit.mixup import MixParams, Mixup, RandomErasing, one_hot_smoothed, soft_target_cross_entropy

SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.allclose", "aten.nonzero"}


class _Syncs(TorchDispatchMode):
    """The ops of a region that would make the host wait for a CUDA device (on the CPU nothing waits)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in SYNC_OPS:
            self.found.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _images(b=4, c=3, h=8, w=10):
    # Every value distinct, so a pasted pixel is told apart from an unpasted one.
    return torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w) / 7.0


def _smoothed_rows(labels, num_classes, smoothing):
    """The smoothed one-hot, element by element."""
    rows = []
    for label in labels:
        rows.append([1 - smoothing + smoothing / num_classes if c == label else smoothing / num_classes
                     for c in range(num_classes)])  # fmt: skip
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# One-hot and the loss


def test_one_hot_smoothed_values():
    y = one_hot_smoothed(torch.tensor([2, 0, 3]), 4, 0.1)
    assert y.dtype == torch.float32 and y.shape == (3, 4)
    expected = torch.tensor([[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.025, 0.925]])
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(one_hot_smoothed(torch.tensor([1]), 3, 0.0), torch.tensor([[0.0, 1.0, 0.0]]))
    with pytest.raises(RuntimeError, match="num_classes=4"):
        one_hot_smoothed(torch.tensor([0, 4]), 4, 0.1)
    with pytest.raises(TypeError, match="integer"):
        one_hot_smoothed(torch.tensor([0.0, 1.0]), 4, 0.1)
    with pytest.raises(ValueError, match="smoothing"):
        one_hot_smoothed(torch.tensor([0]), 4, 1.0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_target_cross_entropy_equals_cross_entropy_with_label_smoothing(smoothing):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g) * 3
    labels = torch.randint(0, 11, (6,), generator=g)
    loss = soft_target_cross_entropy(logits, one_hot_smoothed(labels, 11, smoothing))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, label_smoothing=smoothing))
    # Linear in the target: a mixed target gives the mixed losses.
    lam = 0.3
    mixed = lam * one_hot_smoothed(labels, 11, smoothing) + (1 - lam) * one_hot_smoothed(labels.flip(0), 11, smoothing)
    expected = lam * F.cross_entropy(logits, labels, label_smoothing=smoothing) + (1 - lam) * F.cross_entropy(
        logits, labels.flip(0), label_smoothing=smoothing
    )
    torch.testing.assert_close(soft_target_cross_entropy(logits, mixed), expected)
    # Half-precision logits are taken to fp32.
    half = soft_target_cross_entropy(logits.bfloat16(), mixed)
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match="same shape"):
        soft_target_cross_entropy(logits, mixed[:, :5])


# ----------------------------------------------------------------------------------------------------------------
# Mixup / CutMix


def _timm_draw(mixup_alpha, cutmix_alpha, prob, switch_prob, h, w):
    """timm Mixup._params_per_batch + cutmix_bbox_and_lam(correct_lam=True), transcribed with Python's random in
    place of numpy's (rand -> random, beta -> betavariate, randint(0, n) -> randrange(n))."""
    lam, use_cutmix = 1.0, False
    if random.random() < prob:
        if mixup_alpha > 0.0 and cutmix_alpha > 0.0:
            use_cutmix = random.random() < switch_prob
            lam_mix = (
                random.betavariate(cutmix_alpha, cutmix_alpha)
                if use_cutmix
                else random.betavariate(mixup_alpha, mixup_alpha)
            )
        elif mixup_alpha > 0.0:
            lam_mix = random.betavariate(mixup_alpha, mixup_alpha)
        else:
            use_cutmix = True
            lam_mix = random.betavariate(cutmix_alpha, cutmix_alpha)
        lam = float(lam_mix)
    if lam == 1.0 or not use_cutmix:
        return lam, None
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy = random.randrange(h)
    cx = random.randrange(w)
    yl, yh = min(max(cy - cut_h // 2, 0), h), min(max(cy + cut_h // 2, 0), h)
    xl, xh = min(max(cx - cut_w // 2, 0), w), min(max(cx + cut_w // 2, 0), w)
    return 1.0 - (yh - yl) * (xh - xl) / float(h * w), (yl, yh, xl, xh)


@pytest.mark.parametrize("alphas", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_draws_follow_timm(alphas):
    mix = Mixup(*alphas, prob=0.7, switch_prob=0.5, label_smoothing=0.1, num_classes=5)
    random.seed(11)
    ours = [mix.draw(24, 30) for _ in range(200)]
    random.seed(11)
    theirs = [_timm_draw(*alphas, 0.7, 0.5, 24, 30) for _ in range(200)]
    assert [(p.lam, p.box) for p in ours] == theirs
    assert any(p.cutmix for p in ours) == (alphas[1] > 0)
    assert any(not p.cutmix and p.lam < 1 for p in ours) == (alphas[0] > 0)


def test_mixup_with_a_forced_lam(monkeypatch):
    coins = iter([0.0, 0.9])  # the prob coin: mix; the switch coin: not cutmix
    monkeypatch.setattr(random, "random", lambda: next(coins))
    monkeypatch.setattr(random, "betavariate", lambda a, b: 0.3)
    mix = Mixup(0.8, 1.0, label_smoothing=0.1, num_classes=5)
    x, labels = _images(), torch.tensor([0, 4, 2, 2])
    x_before = x.clone()
    mixed, target = mix(x, labels)
    assert torch.equal(x, x_before)  # the input is left alone
    for i in range(4):
        torch.testing.assert_close(mixed[i], 0.3 * x[i] + 0.7 * x[3 - i])
    y = _smoothed_rows([0, 4, 2, 2], 5, 0.1)
    expected = torch.stack([0.3 * y[i] + 0.7 * y[3 - i] for i in range(4)])
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(target.sum(1), torch.ones(4))


def test_cutmix_pastes_the_box_and_weights_the_targets_by_its_area(monkeypatch):
    coins = iter([0.0, 0.1])  # mix; cutmix
    centre = iter([3, 15])  # row, column
    monkeypatch.setattr(random, "random", lambda: next(coins))
    monkeypatch.setattr(random, "betavariate", lambda a, b: 0.64)
    monkeypatch.setattr(random, "randrange", lambda n: next(centre))
    mix = Mixup(0.8, 1.0, label_smoothing=0.0, num_classes=3)
    x, labels = _images(b=2, h=20, w=20), torch.tensor([0, 1])
    mixed, target = mix(x, labels)
    # Cut 0.6 of each side: 12 x 12 around (3, 15), clipped: rows [0, 9), columns [9, 20).
    pasted = (mixed != x).any(dim=1)  # [B, H, W]
    assert torch.equal(pasted[0], pasted[1])
    rows, cols = pasted[0].any(1).nonzero().flatten(), pasted[0].any(0).nonzero().flatten()
    assert rows.tolist() == list(range(0, 9)) and cols.tolist() == list(range(9, 20))
    count = int(pasted[0].sum())
    assert count == 9 * 11  # a full rectangle
    assert torch.equal(mixed[0][:, pasted[0]], x[1][:, pasted[0]])
    assert torch.equal(mixed[1][:, pasted[1]], x[0][:, pasted[1]])
    assert torch.equal(mixed[0][:, ~pasted[0]], x[0][:, ~pasted[0]])
    lam = 1 - count / 400
    torch.testing.assert_close(target, torch.tensor([[lam, 1 - lam, 0.0], [1 - lam, lam, 0.0]]))


def test_cutmix_targets_match_the_pasted_area_over_many_draws():
    mix = Mixup(0.0, 1.0, label_smoothing=0.1, num_classes=4)
    x, labels = _images(b=2, h=16, w=12), torch.tensor([1, 3])
    random.seed(3)
    for _ in range(30):
        mixed, target = mix(x, labels)
        count = int((mixed[0] != x[0]).any(dim=0).sum())
        lam = 1 - count / (16 * 12)
        y = _smoothed_rows([1, 3], 4, 0.1)
        torch.testing.assert_close(target, torch.stack([lam * y[0] + (1 - lam) * y[1], lam * y[1] + (1 - lam) * y[0]]))
        torch.testing.assert_close(target.sum(1), torch.ones(2))


def test_no_mixing_and_seeded_repeatability():
    x, labels = _images(), torch.tensor([0, 1, 2, 3])
    never = Mixup(0.8, 1.0, prob=0.0, label_smoothing=0.1, num_classes=4)
    mixed, target = never(x, labels)
    assert torch.equal(mixed, x)
    torch.testing.assert_close(target, _smoothed_rows([0, 1, 2, 3], 4, 0.1))
    half = Mixup(0.8, 1.0, prob=0.5, num_classes=4)
    random.seed(0)
    mixed_share = sum(half.draw(8, 8).lam < 1 for _ in range(2000)) / 2000
    assert abs(mixed_share - 0.5) < 0.04
    mix = Mixup(0.8, 1.0, num_classes=4)
    random.seed(123)
    first = [mix(x, labels) for _ in range(6)]
    random.seed(123)
    second = [mix(x, labels) for _ in range(6)]
    for (a, ta), (b, tb) in zip(first, second):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert Mixup.from_args(0.0, 0.0, 1.0, 0.5, 0.1, 1000) is None
    assert isinstance(Mixup.from_args(0.8, 0.0, 1.0, 0.5, 0.1, 1000), Mixup)


def test_mixup_bad_input():
    mix = Mixup(num_classes=4)
    x = _images()
    with pytest.raises(ValueError, match="even"):
        mix(x[:3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        mix(x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        mix(x, torch.tensor([0.0, 1, 2, 3]))
    with pytest.raises(ValueError, match="float"):
        mix(x[0], torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="num_classes=4"):
        mix(x, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(RuntimeError, match="num_classes=4"):
        mix(x, torch.tensor([0, -1, 2, 3]))
    for kwargs, name in [({"mixup_alpha": -1.0}, "mixup_alpha"), ({"prob": 1.5}, "prob"),
                         ({"label_smoothing": 1.0}, "label_smoothing"), ({"num_classes": 0}, "num_classes"),
                         ({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, "from_args")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            Mixup(**kwargs)
    with pytest.raises(ValueError, match="box"):
        mix.apply(x, torch.tensor([0, 1, 2, 3]), MixParams(0.5, cutmix=True))


def test_mixup_and_erasing_never_wait_for_the_device():
    mix, erase = Mixup(0.8, 1.0, num_classes=4), RandomErasing(probability=1.0)
    x, labels = _images(), torch.tensor([0, 1, 2, 3])
    random.seed(1)
    with _Syncs() as watch:
        for _ in range(8):
            mix(erase(x), labels)
    assert watch.found == []


# ----------------------------------------------------------------------------------------------------------------
# Random erasing


def _timm_erase_boxes(n, h, w, probability, min_area=0.02, max_area=1 / 3, min_aspect=0.3, max_count=1):
    """timm RandomErasing._erase's draws, transcribed, recording boxes instead of painting them."""
    log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    out = []
    for _ in range(n):
        boxes = []
        out.append(boxes)
        if random.random() > probability:
            continue
        area = h * w
        count = 1 if max_count == 1 else random.randint(1, max_count)
        for _ in range(count):
            for _attempt in range(10):
                target_area = random.uniform(min_area, max_area) * area / count
                aspect_ratio = math.exp(random.uniform(*log_aspect_ratio))
                eh = int(round(math.sqrt(target_area * aspect_ratio)))
                ew = int(round(math.sqrt(target_area / aspect_ratio)))
                if ew < w and eh < h:
                    top = random.randint(0, h - eh)
                    left = random.randint(0, w - ew)
                    boxes.append((top, left, eh, ew))
                    break
    return out


@pytest.mark.parametrize("max_count", [1, 3])
def test_erasing_draws_follow_timm(max_count):
    erase = RandomErasing(probability=0.25, max_count=max_count)
    random.seed(5)
    ours = erase.draw_boxes(300, 24, 20)
    random.seed(5)
    assert ours == _timm_erase_boxes(300, 24, 20, 0.25, max_count=max_count)


def test_erasing_rate_and_box_bounds():
    erase = RandomErasing(probability=0.25)
    random.seed(0)
    boxes = erase.draw_boxes(4000, 64, 48)
    share = sum(bool(b) for b in boxes) / len(boxes)
    assert abs(share - 0.25) < 0.03
    fractions = []
    for sample in boxes:
        assert len(sample) <= 1
        for top, left, h, w in sample:
            assert 0 <= top and top + h <= 64 and 0 <= left and left + w <= 48 and h < 64 and w < 48
            # h and w are rounded from sqrt(area * aspect) and sqrt(area / aspect): within half a pixel.
            assert (h + 0.5) * (w + 0.5) >= 0.02 * 64 * 48 and (h - 0.5) * (w - 0.5) <= 64 * 48 / 3
            assert (h + 0.5) / max(w - 0.5, 1e-9) >= 0.3 and (h - 0.5) / (w + 0.5) <= 1 / 0.3
            fractions.append(h * w / (64 * 48))
    assert min(fractions) < 0.04 and max(fractions) > 0.25  # the range is covered
    random.seed(0)
    assert all(RandomErasing(probability=0.0).draw_boxes(100, 8, 8) == [[]] * 100 for _ in range(1))
    assert sum(bool(b) for b in RandomErasing(probability=1.0).draw_boxes(200, 64, 64)) >= 198


def test_erasing_fills_the_boxes_with_noise_and_leaves_the_rest():
    erase = RandomErasing(probability=0.5)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.01 + 5.0  # far from N(0, 1)
    random.seed(2)
    boxes = erase.draw_boxes(64, 32, 32)
    random.seed(2)
    torch.manual_seed(7)
    out = erase(x)
    assert not torch.equal(out, x) and x.min() > 4.0  # the input is left alone
    mask = torch.zeros(64, 32, 32, dtype=torch.bool)
    for i, sample in enumerate(boxes):
        for top, left, h, w in sample:
            mask[i, top : top + h, left : left + w] = True
    mask = mask[:, None].expand_as(x)  # [B, 3, H, W]
    assert torch.equal(out[~mask], x[~mask])
    fill = out[mask]
    assert fill.numel() > 5000 and (fill != x[mask]).all()
    assert abs(fill.mean().item()) < 0.05 and abs(fill.std().item() - 1.0) < 0.05
    # The same seeds give the same batch; apply() with the drawn boxes is what __call__ does.
    torch.manual_seed(7)
    assert torch.equal(erase.apply(x, boxes), out)


def test_erasing_modes_and_bad_input():
    x = torch.full((2, 3, 16, 16), 3.0)
    boxes = [[(2, 3, 4, 5)], []]
    const = RandomErasing(mode="const").apply(x, boxes)
    assert (const[0, :, 2:6, 3:8] == 0).all() and int((const == 0).sum()) == 3 * 4 * 5
    per_channel = RandomErasing(mode="rand").apply(x, boxes)
    patch = per_channel[0, :, 2:6, 3:8]  # [3, 4, 5]
    assert torch.equal(patch, patch[:, :1, :1].expand_as(patch)) and torch.equal(per_channel[1], x[1])
    assert RandomErasing().apply(x, [[], []]) is x  # nothing erased: nothing computed
    for kwargs, name in [({"probability": 1.5}, "probability"), ({"mode": "zeros"}, "mode"),
                         ({"max_count": 0}, "max_count"), ({"min_area": 0.5, "max_area": 0.4}, "max_area"),
                         ({"min_aspect": 0.0}, "min_aspect")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            RandomErasing(**kwargs)
    with pytest.raises(ValueError, match="float"):
        RandomErasing()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="boxes"):
        RandomErasing().apply(x, [[]])
