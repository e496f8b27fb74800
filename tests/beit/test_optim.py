"""Parameter groups and schedules of the official recipe."""

import math

import numpy as np
import pytest

import beit
from beit.optim import cosine_scheduler, parameter_groups


def test_official_weight_decay_exclusions():
    model = beit.create_model("beit_tiny_patch16_224", depth=2, vocab_size=10, use_abs_pos_emb=True)
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    d, nd = set(decay["param_names"]), set(no_decay["param_names"])
    # As unilm: the mask token and the relative position table are decayed.
    for name in ["mask_token", "rel_pos_bias.relative_position_bias_table", "blocks.0.attn.qkv.weight",
                 "patch_embed.proj.weight", "lm_head.weight", "blocks.1.mlp.fc2.weight"]:  # fmt: skip
        assert name in d, name
    for name in ["cls_token", "pos_embed", "blocks.0.gamma_1", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias",
                 "blocks.0.norm1.weight", "norm.bias", "lm_head.bias", "patch_embed.proj.bias"]:  # fmt: skip
        assert name in nd, name
    assert d | nd == {n for n, _ in model.named_parameters()} and not d & nd


def test_cosine_schedule_matches_the_official_formula():
    base, final, total, warm = 1.5e-3, 1e-5, 100, 10
    s = cosine_scheduler(base, final, total, warm)
    assert len(s) == total
    np.testing.assert_allclose(s[:warm], np.linspace(0, base, warm))
    assert s[warm] == pytest.approx(base)
    i = 37
    assert s[warm + i] == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / (total - warm))))
    assert np.all(np.diff(s[warm:]) <= 0) and s[-1] > final
    assert np.all(cosine_scheduler(0.05, 0.05, 7) == 0.05)  # the constant weight-decay schedule


def test_bad_schedules():
    with pytest.raises(ValueError):
        cosine_scheduler(1.0, 0.0, 0)
    with pytest.raises(ValueError):
        cosine_scheduler(1.0, 0.0, 10, warmup_steps=11)
