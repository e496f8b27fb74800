"""Parameter groups and schedules of the official recipe."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import beit
from beit.optim import (
    cosine_scheduler,
    fused_adamw,
    layer_decay_parameter_groups,
    layer_id_for_vit,
    parameter_groups,
)


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


# ----------------------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay


def _official_layer_id(var_name, num_max_layer):
    """unilm optim_factory.get_num_layer_for_vit, transcribed (num_max_layer = depth + 2)."""
    if var_name in ("cls_token", "mask_token", "pos_embed"):
        return 0
    elif var_name.startswith("patch_embed"):
        return 0
    elif var_name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    elif var_name.startswith("blocks"):
        return int(var_name.split(".")[1]) + 1
    else:
        return num_max_layer - 1


def _official_scales(decay, depth):
    """run_class_finetuning.py: values = [decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]."""
    return [decay ** (depth + 1 - i) for i in range(depth + 2)]


def _by_name(groups):
    out = {}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        for name, p in zip(g["param_names"], g["params"]):
            assert name not in out, f"{name} in two groups"
            out[name] = (g, p)
    return out


def _beit_b(**overrides):
    with torch.device("meta"):  # shapes only: the groups never read values
        return beit.create_model("beit_base_patch16_224", depth=12, impl="ref", **overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # pretraining layout: shared rel_pos_bias, mask_token
        {"use_rel_pos_bias": True, "use_shared_rel_pos_bias": False, "use_abs_pos_emb": True},  # per-block tables
    ],
)
def test_layer_decay_groups_follow_the_official_assignment_for_beit_b(overrides):
    model = _beit_b(**overrides)
    depth, decay, wd = 12, 0.65, 0.05
    groups = layer_decay_parameter_groups(model, wd, decay)
    named = dict(model.named_parameters())
    got = _by_name(groups)
    assert set(got) == set(named)
    scales = _official_scales(decay, depth)
    ref_decay, ref_no_decay = parameter_groups(model, wd)
    ref_no_decay_names = set(ref_no_decay["param_names"])
    for name, (g, p) in got.items():
        lid = _official_layer_id(name, depth + 2)
        assert g["layer_id"] == lid, name
        assert g["lr_scale"] == pytest.approx(scales[lid], rel=1e-12), name
        assert g["lr_scale"] == pytest.approx(0.65 ** (13 - lid), rel=1e-12), name
        assert g["weight_decay"] == (0.0 if name in ref_no_decay_names else wd), name
        official_no_decay = p.ndim == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")
        assert g["weight_decay"] == (0.0 if official_no_decay else wd), name
        assert p is named[name]
    # Spot checks written out by hand.
    spot = {"patch_embed.proj.weight": 0.65**13, "cls_token": 0.65**13, "blocks.0.attn.qkv.weight": 0.65**12,
            "blocks.11.mlp.fc2.weight": 0.65, "norm.weight": 1.0, "lm_head.weight": 1.0}  # fmt: skip
    if not overrides:
        spot.update({"mask_token": 0.65**13, "rel_pos_bias.relative_position_bias_table": 1.0})
    else:
        spot.update({"pos_embed": 0.65**13, "blocks.5.attn.relative_position_bias_table": 0.65**7})
    for name, scale in spot.items():
        assert got[name][0]["lr_scale"] == pytest.approx(scale, rel=1e-12), name
    # One group per (layer, decay or not) that occurs; 14 layers, each with both kinds, in the official layout.
    keys = [(g["layer_id"], g["weight_decay"] > 0) for g in groups]
    assert len(keys) == len(set(keys)) == 2 * (depth + 2)


class _TinyClassifier(nn.Module):
    """The fine-tuning model's names: no get_num_layers, so the depth comes from len(blocks)."""

    def __init__(self, depth=3, dim=8, num_classes=5):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def no_weight_decay(self):
        return {"cls_token"}


def test_classifier_head_and_fc_norm_train_at_the_full_rate():
    model = _TinyClassifier(depth=3)
    model.extra = nn.Module()
    model.extra.bias = nn.Parameter(torch.zeros(2, 2))  # 2-D, but named .bias: no decay
    got = _by_name(layer_decay_parameter_groups(model, 0.05, 0.75))
    assert got["extra.bias"][0]["weight_decay"] == 0.0 and got["extra.bias"][0]["lr_scale"] == 1.0
    for name in ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]:
        assert got[name][0]["lr_scale"] == 1.0 and got[name][0]["layer_id"] == 4, name
    assert got["head.weight"][0]["weight_decay"] == 0.05 and got["head.bias"][0]["weight_decay"] == 0.0
    assert got["cls_token"][0]["weight_decay"] == 0.0  # no_weight_decay(), although it is 3-D
    assert got["cls_token"][0]["lr_scale"] == pytest.approx(0.75**4)
    assert got["patch_embed.proj.weight"][0]["lr_scale"] == pytest.approx(0.75**4)
    assert got["blocks.2.1.weight"][0]["lr_scale"] == pytest.approx(0.75)
    assert got["blocks.0.0.weight"][0]["weight_decay"] == 0.0  # LayerNorm weight: 1-D


def test_layer_decay_one_is_the_plain_learning_rate_and_frozen_parameters_are_left_out():
    model = _TinyClassifier()
    model.patch_embed.proj.weight.requires_grad_(False)
    groups = layer_decay_parameter_groups(model, 0.05, 1.0)
    assert all(g["lr_scale"] == 1.0 for g in groups)
    names = set(_by_name(groups))
    assert "patch_embed.proj.weight" not in names
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}


def test_layer_id_for_vit():
    for name in ["cls_token", "mask_token", "pos_embed", "patch_embed.proj.bias"]:
        assert layer_id_for_vit(name, 12) == 0
    assert layer_id_for_vit("blocks.0.norm1.weight", 12) == 1
    assert layer_id_for_vit("blocks.11.gamma_2", 12) == 12
    for name in ["rel_pos_bias.relative_position_bias_table", "norm.weight", "fc_norm.bias", "head.weight"]:
        assert layer_id_for_vit(name, 12) == 13
    with pytest.raises(ValueError, match="wrapper prefix"):
        layer_id_for_vit("module.blocks.0.norm1.weight", 12)
    with pytest.raises(ValueError, match="block 12"):
        layer_id_for_vit("blocks.12.norm1.weight", 12)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.01, float("nan"), True, "0.65", None])
def test_bad_layer_decay_is_refused(bad):
    model = _TinyClassifier()
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_parameter_groups(model, 0.05, bad)
    if bad is not None:
        with pytest.raises(ValueError, match="layer_decay"):
            fused_adamw(model, 1e-3, 0.05, layer_decay=bad)


def test_layer_decay_needs_a_vit():
    with pytest.raises(ValueError, match="get_num_layers"):
        layer_decay_parameter_groups(nn.Linear(3, 3), 0.05, 0.65)


def test_fused_adamw_with_and_without_layer_decay():
    model = _TinyClassifier()
    plain = fused_adamw(model, 1e-3, 0.05)
    assert len(plain.param_groups) == 2 and all("lr_scale" not in g for g in plain.param_groups)
    assert [g["lr"] for g in plain.param_groups] == [1e-3, 1e-3]
    opt = fused_adamw(model, 1e-3, 0.05, layer_decay=0.5)
    assert len(opt.param_groups) == 2 * 5  # layers 0..4, decay and no decay each
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * 0.5 ** (4 - g["layer_id"]))
        assert g["fused"] and "param_names" not in g
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))
    # A step runs, and a parameter moves by its group's lr (Adam's first step is lr * sign(grad), wd aside).
    model.head.bias.grad = torch.ones_like(model.head.bias)
    model.patch_embed.proj.bias.grad = torch.ones_like(model.patch_embed.proj.bias)
    before_head, before_embed = model.head.bias.detach().clone(), model.patch_embed.proj.bias.detach().clone()
    opt.step()
    torch.testing.assert_close(before_head - model.head.bias.detach(), torch.full_like(before_head, 1e-3))
    moved = before_embed - model.patch_embed.proj.bias.detach()
    torch.testing.assert_close(moved, torch.full_like(before_embed, 1e-3 / 16))
