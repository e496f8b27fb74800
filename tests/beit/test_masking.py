"""Blockwise masking against a line-by-line transcription of the official generator."""

import math
import random
import re

import numpy as np
import pytest
import torch
from _testutil import no_host_sync

from beit.masking import MaskingGenerator, generate_masks, mask_to_index


class OfficialMaskingGenerator:
    """unilm beit/masking_generator.py, transcribed statement for statement; only ``np.int`` (removed in NumPy 1.24)
    became ``int``, and the module-level ``random`` became an explicit ``random.Random``."""

    def __init__(self, rand, input_size, num_masking_patches, min_num_patches=4, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None):  # fmt: skip
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.random = rand
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _attempt in range(10):
            target_area = self.random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.random.randint(0, self.height - h)
                left = self.random.randint(0, self.width - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = np.zeros(shape=(self.height, self.width), dtype=int)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = self.num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            else:
                mask_count += delta
        return mask


CONFIGS = [
    dict(input_size=14, num_masking_patches=75, min_num_patches=16),  # BEiT's defaults
    dict(input_size=14, num_masking_patches=75, min_num_patches=16, max_num_patches=30, min_aspect=0.5),
    dict(input_size=(6, 9), num_masking_patches=20, min_num_patches=4),
    # The last block of a mask draws U(16, remaining < 16): uniform with swapped bounds, as in the official code.
    dict(input_size=14, num_masking_patches=20, min_num_patches=16),
    dict(input_size=14, num_masking_patches=16, min_num_patches=16, max_num_patches=16, min_aspect=1.0),  # edges
    dict(input_size=24, num_masking_patches=230, min_num_patches=16),  # 384 px
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_draw_for_draw_equal_to_the_official_algorithm(cfg):
    ours = MaskingGenerator(**cfg, rng=random.Random(123))
    rest = {k: v for k, v in cfg.items() if k not in ("input_size", "num_masking_patches")}
    official = OfficialMaskingGenerator(random.Random(123), cfg["input_size"], cfg["num_masking_patches"], **rest)
    for _ in range(300):
        m = ours()
        assert m.dtype == bool and m.shape == (ours.height, ours.width)
        np.testing.assert_array_equal(m, official().astype(bool))


def _counts(gen, n):
    return np.array([int(gen().sum()) for _ in range(n)])


def test_statistics_over_10000_draws():
    ours = _counts(MaskingGenerator(14, 75, 16, rng=1), 10_000)
    official = _counts(OfficialMaskingGenerator(random.Random(2), 14, 75, 16), 10_000)  # another stream
    assert ours.max() <= 75 and official.max() <= 75
    assert ours.min() >= 16  # the first block always fits in a 14x14 grid
    # Mean count: two independent samples of the same distribution (the count's std is about 0.95, so the
    # difference of the two means has a standard error of about 0.013). Measured: 74.5, with 67% at exactly 75.
    assert abs(ours.mean() - official.mean()) < 0.1
    assert 74 < ours.mean() <= 75
    # Share of masks at exactly 75.
    share_ours, share_official = (ours == 75).mean(), (official == 75).mean()
    assert abs(share_ours - share_official) < 0.03
    # Count histograms: total variation distance between the two samples.
    bins = np.arange(0, 77)
    h1 = np.histogram(ours, bins)[0] / len(ours)
    h2 = np.histogram(official, bins)[0] / len(official)
    assert 0.5 * np.abs(h1 - h2).sum() < 0.05


def test_global_random_is_the_default_stream():
    gen = MaskingGenerator(14, 75, 16)
    random.seed(7)
    a = [gen() for _ in range(5)]
    random.seed(7)
    b = [gen() for _ in range(5)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_int_seed_is_reproducible():
    a = [MaskingGenerator(rng=5)() for _ in range(1)]
    b = [MaskingGenerator(rng=5)() for _ in range(1)]
    np.testing.assert_array_equal(a[0], b[0])


def test_zero_budget_gives_empty_masks():
    m = MaskingGenerator(14, 0, 16, rng=0)()
    assert m.sum() == 0


BAD_ARGUMENTS = [
    # (arguments over the defaults input_size=14, num_masking_patches=75, min_num_patches=16; error; argument named)
    (dict(input_size=0), ValueError, "input_size"),
    (dict(input_size=(14, 0)), ValueError, "input_size"),
    (dict(input_size=(14, 14, 3)), ValueError, "input_size"),
    (dict(input_size=14.5), TypeError, "input_size"),
    (dict(num_masking_patches=197), ValueError, "num_masking_patches"),
    (dict(num_masking_patches=-1), ValueError, "num_masking_patches"),
    (dict(num_masking_patches=75.0), TypeError, "num_masking_patches"),
    (dict(num_masking_patches=True), TypeError, "num_masking_patches"),
    (dict(min_num_patches=0), ValueError, "min_num_patches"),
    (dict(min_num_patches=-40), ValueError, "min_num_patches"),  # was a math domain error at the first draw
    (dict(min_num_patches=16.5), TypeError, "min_num_patches"),
    (dict(min_num_patches=100), ValueError, "min_num_patches"),  # above the budget of 75
    (dict(min_num_patches=76), ValueError, "min_num_patches"),
    (dict(input_size=6, num_masking_patches=20, min_num_patches=50), ValueError, "min_num_patches"),
    (dict(input_size=6, num_masking_patches=36, min_num_patches=50), ValueError, "min_num_patches"),
    (dict(max_num_patches=0), ValueError, "max_num_patches"),
    (dict(max_num_patches=10), ValueError, "max_num_patches"),  # below min_num_patches=16
    (dict(num_masking_patches=0, max_num_patches=0), ValueError, "max_num_patches"),
    (dict(max_num_patches="30"), TypeError, "max_num_patches"),
    (dict(min_aspect=0), ValueError, "min_aspect"),
    (dict(min_aspect=-0.3), ValueError, "min_aspect"),
    (dict(min_aspect=math.nan), ValueError, "min_aspect"),
    (dict(min_aspect="0.3"), TypeError, "min_aspect"),
    (dict(min_aspect=2.0), ValueError, "max_aspect=1/min_aspect"),  # the default 1/2 would lie below it
    (dict(max_aspect=0.2), ValueError, "max_aspect"),
    (dict(max_aspect=0), ValueError, "max_aspect"),  # the official code's ``or`` would have read 0 as None
    (dict(max_aspect=math.inf), ValueError, "max_aspect"),
    (dict(num_masking_patches=196, min_num_patches=183), ValueError, "too large a block"),  # at most 182 fit
]


@pytest.mark.parametrize("kw, error, name", BAD_ARGUMENTS, ids=[str(kw) for kw, _, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_at_construction(kw, error, name):
    args = dict(input_size=14, num_masking_patches=75, min_num_patches=16)
    args.update(kw)
    with pytest.raises(error, match=re.escape(name)):
        MaskingGenerator(**args)


@pytest.mark.parametrize(
    "kw",
    [
        dict(min_num_patches=100),
        dict(min_num_patches=16, max_num_patches=10),
        dict(input_size=6, num_masking_patches=36, min_num_patches=50),
        dict(max_num_patches=0),
        dict(num_masking_patches=196, min_num_patches=183),
    ],
)
def test_refused_arguments_give_empty_masks_in_the_official_algorithm(kw):
    """Why the relations are refused: the official algorithm draws many empty masks (no training signal) with them."""
    args = dict(input_size=14, num_masking_patches=75, min_num_patches=16)
    args.update(kw)
    official = OfficialMaskingGenerator(random.Random(0), **args)
    empty = np.mean([official().sum() == 0 for _ in range(500)])
    assert empty > 0.05, empty


@pytest.mark.parametrize(
    "kw",
    [
        dict(min_num_patches=75),  # the smallest block equals the budget
        dict(min_num_patches=1, max_num_patches=1),
        dict(max_num_patches=200),  # a cap above the budget is just the budget
        dict(num_masking_patches=196, min_num_patches=16),  # the whole grid
        dict(num_masking_patches=196, min_num_patches=182),  # the largest block that fits 14x14, now and then
        dict(num_masking_patches=0),  # the budget check, not min_num_patches=16, governs an empty budget
        dict(min_aspect=1.0),
        dict(min_aspect=0.5, max_aspect=0.5),
        dict(input_size=[5, 7], num_masking_patches=14, min_num_patches=3),
        dict(input_size=np.int64(14), num_masking_patches=np.int64(75), max_num_patches=np.int32(30)),
        dict(min_aspect=np.float32(0.3), max_aspect=np.float64(3.0)),
    ],
)
def test_boundary_arguments_are_accepted(kw):
    args = dict(input_size=14, num_masking_patches=75, min_num_patches=16)
    args.update(kw)
    gen = MaskingGenerator(**args, rng=0)
    assert all(0 <= gen().sum() <= gen.num_masking_patches for _ in range(20))
    assert type(gen.num_masking_patches) is int and type(gen.min_num_patches) is int


def test_official_defaults_are_unchanged():
    """Defaults of the constructor itself: 14x14, 75 patches, blocks of at least 16, aspect 0.3 to 1/0.3."""
    gen = MaskingGenerator(rng=random.Random(2024))
    assert (gen.height, gen.width, gen.num_masking_patches) == (14, 14, 75)
    assert (gen.min_num_patches, gen.max_num_patches) == (16, 75)
    assert gen.log_aspect_ratio == (math.log(0.3), math.log(1 / 0.3))
    official = OfficialMaskingGenerator(random.Random(2024), 14, 75, 16, min_aspect=0.3)
    for _ in range(300):
        np.testing.assert_array_equal(gen(), official().astype(bool))


@pytest.mark.parametrize("B", [1, 3, 8])
def test_generate_masks_and_padded_index(B):
    gen = MaskingGenerator(14, 75, 16, rng=3)
    bool_masked_pos, index = generate_masks(gen, B)
    assert bool_masked_pos.shape == (B, 196) and bool_masked_pos.dtype == torch.bool
    assert index.shape == (B, 75) and index.dtype == torch.int64
    for b in range(B):
        valid = index[b][index[b] >= 0]
        assert torch.equal(valid, bool_masked_pos[b].nonzero().flatten())  # ascending, every masked position
        assert (index[b][len(valid) :] == -1).all()  # padding only at the end


def test_mask_to_index_edge_cases():
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    torch.testing.assert_close(mask_to_index(mask, 3), torch.tensor([[0, 2, -1], [-1, -1, -1], [0, 1, 2]]))
    torch.testing.assert_close(mask_to_index(mask, 5)[:, 3:], torch.full((3, 2), -1))
    with pytest.raises(RuntimeError, match="more than num_indices=2"):
        mask_to_index(mask, 2)
    with pytest.raises(TypeError):
        mask_to_index(mask.long(), 3)
    with pytest.raises(ValueError):
        mask_to_index(mask[0], 3)


@pytest.mark.gpu
def test_mask_to_index_is_sync_free_on_gpu():
    mask, _ = generate_masks(MaskingGenerator(rng=0), 16, device="cuda")
    with no_host_sync():
        index = mask_to_index(mask, 75)
    assert index.shape == (16, 75)
