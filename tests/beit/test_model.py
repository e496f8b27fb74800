"""The reference BEiT: structure, parameter count, initialisation, forward semantics, implementations, bad input."""

import math

import pytest
import torch

import beit
from beit.model import BeitConfig, VisionTransformerForMaskedImageModeling, gen_relative_position_index

SMALL = dict(img_size=48, patch_size=16, embed_dim=40, depth=3, num_heads=5, vocab_size=37)


def small_model(**kw):
    args = dict(SMALL, **kw)
    return VisionTransformerForMaskedImageModeling(BeitConfig(**args))


def random_mask(B, N, p=0.4, generator=None):
    return torch.rand(B, N, generator=generator) < p


def expected_param_count(D, depth, heads, vocab, img=224, patch=16, mlp_ratio=4, shared=True, per_block=False):
    """Count from the architecture description, independently of the model code."""
    n = (img // patch) ** 2
    w = img // patch
    table = ((2 * w - 1) ** 2 + 3) * heads
    hidden = int(D * mlp_ratio)
    block = 2 * D + 3 * D * D + 2 * D + D * D + D + 2 * D + D * hidden + hidden + hidden * D + D + 2 * D
    block += table if per_block else 0
    total = D * 3 * patch * patch + D + 2 * D + (table if shared else 0) + depth * block + 2 * D + D * vocab + vocab
    assert n > 0
    return total


# ---------------------------------------------------------------------------------------------------------------
# Structure and parameters


def test_base_has_the_official_parameter_count():
    model = beit.create_model("beit_base_patch16_224")
    assert sum(p.numel() for p in model.parameters()) == 91_965_776


@pytest.mark.parametrize(
    "name,D,depth,heads",
    [
        ("beit_tiny_patch16_224", 192, 12, 3),
        ("beit_small_patch16_224", 384, 12, 6),
        ("beit_base_patch16_224", 768, 12, 12),
        ("beit_large_patch16_224", 1024, 24, 16),
    ],
)
def test_registry_shapes_and_counts(name, D, depth, heads):
    with torch.device("meta"):
        model = beit.create_model(name)
    assert model.embed_dim == D and len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads
    assert sum(p.numel() for p in model.parameters()) == expected_param_count(D, depth, heads, 8192)
    gamma = model.config.init_values
    assert gamma == (1e-5 if "large" in name else 0.1)


def test_official_names_and_aliases():
    with torch.device("meta"):
        model = beit.create_model("beit_base_patch16_224_8k_vocab")
    keys = set(model.state_dict())
    for k in [
        "cls_token",
        "mask_token",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "rel_pos_bias.relative_position_bias_table",
        "blocks.0.gamma_1",
        "blocks.0.gamma_2",
        "blocks.0.norm1.weight",
        "blocks.0.attn.q_bias",
        "blocks.0.attn.v_bias",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
        "blocks.11.norm2.bias",
        "norm.weight",
        "lm_head.weight",
        "lm_head.bias",
    ]:
        assert k in keys, k
    assert len(keys) == 190 - 1  # the 190 official keys less the derived relative_position_index buffer
    assert "blocks.0.attn.qkv.bias" not in keys and "pos_embed" not in keys
    assert tuple(model.rel_pos_bias.relative_position_bias_table.shape) == (732, 12)
    assert model.norm.eps == 1e-6


def test_every_parameter_receives_a_gradient():
    model = small_model(use_abs_pos_emb=True, use_rel_pos_bias=True, drop_path_rate=0.1)
    model.train()
    x = torch.randn(3, 3, 48, 48)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[:, ::2] = True
    model(x, mask).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------------------
# Relative position index


def _brute_force_index(wh, ww):
    n = wh * ww
    nrd = (2 * wh - 1) * (2 * ww - 1) + 3
    idx = torch.empty(n + 1, n + 1, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            dh = i // ww - j // ww + wh - 1
            dw = i % ww - j % ww + ww - 1
            idx[i + 1, j + 1] = dh * (2 * ww - 1) + dw
    idx[0, 1:] = nrd - 3
    idx[1:, 0] = nrd - 2
    idx[0, 0] = nrd - 1
    return idx


@pytest.mark.parametrize("window", [(14, 14), (3, 5), (1, 1), (2, 7)])
def test_relative_position_index_matches_definition(window):
    idx = gen_relative_position_index(window)
    assert torch.equal(idx, _brute_force_index(*window))
    assert idx.max().item() == (2 * window[0] - 1) * (2 * window[1] - 1) + 2


@pytest.mark.parametrize("window", [(14, 14), (3, 5)])
def test_relative_position_index_matches_transformers(window):
    modeling_beit = pytest.importorskip("transformers.models.beit.modeling_beit")
    hf = modeling_beit.BeitRelativePositionBias.generate_relative_position_index(window)
    assert torch.equal(gen_relative_position_index(window), hf.long())


# ---------------------------------------------------------------------------------------------------------------
# Initialisation


def test_official_initialisation():
    model = beit.create_model("beit_small_patch16_224", vocab_size=1000)
    std = 0.02
    for name, p in model.named_parameters():
        if name.endswith("relative_position_bias_table") or name.endswith(("q_bias", "v_bias")):
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith(("gamma_1", "gamma_2")):
            assert torch.all(p == 0.1), name
        elif "norm" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
        else:
            bound = std
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                layer_id = int(name.split(".")[1]) + 1
                bound = std / math.sqrt(2.0 * layer_id)
            assert p.abs().max() <= bound * (1 + 1e-6), name
            if p.numel() > 10_000:
                # The std of N(0, s) cut at +-s is 0.5396 s.
                assert abs(p.std().item() / (bound * 0.5396) - 1) < 0.05, name
    assert model.mask_token.abs().max() > 0 and model.cls_token.abs().max() > 0


def test_layer_scale_off():
    model = small_model(init_values=None)
    assert all(b.gamma_1 is None and b.gamma_2 is None for b in model.blocks)
    model(torch.randn(2, 3, 48, 48), random_mask(2, 9)).sum().backward()


# ---------------------------------------------------------------------------------------------------------------
# Forward semantics


@pytest.mark.parametrize("impl", ["ref", "sdpa"])
def test_output_shapes_and_order(impl):
    model = small_model(impl=impl).eval()
    x = torch.randn(3, 3, 48, 48)
    mask = random_mask(3, 9)
    mask[1] = False  # one image without masked patches
    mask[2, 4] = True
    logits = model(x, mask)
    assert logits.shape == (int(mask.sum()), 37)
    all_tokens = model(x, mask, return_all_tokens=True)
    assert all_tokens.shape == (3, 9, 37)
    torch.testing.assert_close(logits, all_tokens[mask])  # row-major (image, patch) order
    feats = model.forward_features(x)
    assert feats.shape == (3, 10, 40)
    # forward_features is normalised (LayerNorm with unit weight, zero bias at init).
    torch.testing.assert_close(feats.mean(-1), torch.zeros(3, 10), atol=1e-5, rtol=0)


def test_mask_blend_replaces_masked_patches_exactly():
    for abs_pos in (False, True):
        model = small_model(use_abs_pos_emb=abs_pos).eval()
        x = torch.randn(2, 3, 48, 48)
        mask = torch.zeros(2, 9, dtype=torch.bool)
        mask[0, 4] = True  # patch (1, 1): pixels [16:32, 16:32]
        mask[1, 0] = True
        y = x.clone()
        y[0, :, 16:32, 16:32] += 5.0  # change only the masked patch of image 0
        y[1, :, 0:16, 0:16] -= 3.0
        torch.testing.assert_close(model.forward_features(x, mask), model.forward_features(y, mask), rtol=0, atol=0)
        z = x.clone()
        z[0, :, 0:16, 0:16] += 5.0  # an unmasked patch
        assert not torch.allclose(model.forward_features(x, mask), model.forward_features(z, mask))


def test_mask_accepts_grid_shape():
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    mask = random_mask(2, 9)
    torch.testing.assert_close(model(x, mask), model(x, mask.view(2, 3, 3)))


@pytest.mark.parametrize(
    "variant", [dict(), dict(use_rel_pos_bias=True), dict(use_rel_pos_bias=True, use_abs_pos_emb=True)]
)
def test_ref_and_sdpa_agree(variant):
    torch.manual_seed(1)
    model = small_model(**variant).double().eval()
    with torch.no_grad():  # non-zero tables, so the biases matter
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1.0)
    x = torch.randn(3, 3, 48, 48, dtype=torch.float64)
    mask = random_mask(3, 9)
    model.set_impl("ref")
    ref = model(x, mask)
    model.set_impl("sdpa")
    out = model(x, mask)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_rel_pos_bias_changes_the_output():
    model = small_model().eval()
    x = torch.randn(1, 3, 48, 48)
    before = model.forward_features(x)
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_(0, 1.0)
    assert not torch.allclose(before, model.forward_features(x))


def test_non_square_image_size():
    model = small_model(img_size=(48, 32)).eval()
    assert model.num_patches == 6
    assert tuple(model.rel_pos_bias.relative_position_bias_table.shape) == (5 * 3 + 3, 5)
    x = torch.randn(3, 3, 48, 32)
    mask = random_mask(3, 6, p=0.5)
    mask[0, 0] = True
    assert model(x, mask).shape == (int(mask.sum()), 37)


def test_larger_image_size_builds_its_table():
    with torch.device("meta"):
        model = beit.create_model("beit_base_patch16_224", img_size=384)
    assert model.num_patches == 576
    assert tuple(model.rel_pos_bias.relative_position_bias_table.shape) == (47 * 47 + 3, 12)
    assert tuple(model.rel_pos_bias.relative_position_index.shape) == (577, 577)


def test_drop_path_is_stochastic_in_training_only():
    model = small_model(drop_path_rate=0.5)
    x = torch.randn(4, 3, 48, 48)
    model.train()
    a, b = model.forward_features(x), model.forward_features(x)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model.forward_features(x), model.forward_features(x), rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["ref", "sdpa"])
def test_bf16_autocast_on_cpu(impl):
    model = small_model(impl=impl)
    x = torch.randn(2, 3, 48, 48)
    mask = random_mask(2, 9, p=0.5)
    mask[0, 0] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x, mask)
    assert torch.isfinite(logits).all()
    logits.float().logsumexp(-1).sum().backward()
    assert torch.isfinite(model.rel_pos_bias.relative_position_bias_table.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# The implementation switch


def test_impl_default_from_environment(monkeypatch):
    monkeypatch.setenv("BEIT_IMPL", "ref")
    model = beit.create_model("beit_tiny_patch16_224", depth=1)
    assert model.impl == "ref" and model.blocks[0].attn.impl == "ref"
    model = beit.create_model("beit_tiny_patch16_224", depth=1, impl="sdpa")  # explicit wins
    assert model.impl == "sdpa"
    monkeypatch.setenv("BEIT_IMPL", "fast")
    with pytest.raises(ValueError, match="BEIT_IMPL"):
        beit.create_model("beit_tiny_patch16_224", depth=1)


def test_auto_resolves_to_an_available_impl():
    assert beit.resolve_impl("auto", "cpu") == "sdpa"
    assert beit.resolve_impl("ref", "cpu") == "ref"
    with pytest.raises(ValueError, match="unknown impl"):
        beit.resolve_impl("cuda")


@pytest.mark.parametrize("variant", [dict(), dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False)])
def test_triton_impl_matches_ref(variant):
    """impl="triton" (the interpreter on CPU) against the official path: logits and every parameter's gradient."""
    torch.manual_seed(2)
    model = small_model(**variant)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1.0)
    x = torch.randn(3, 3, 48, 48)
    mask = random_mask(3, 9, p=0.5)
    mask[0, 0] = True
    results = {}
    for impl in ("ref", "triton"):
        model.set_impl(impl)
        model.zero_grad()
        logits = model(x, mask)
        logits.logsumexp(-1).sum().backward()
        results[impl] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["ref"][0], rtol=1e-5, atol=1e-5)
    for name, grad in results["ref"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_model_name_and_options():
    with pytest.raises(ValueError, match="unknown model 'beit_huge'.*beit_base_patch16_224"):
        beit.create_model("beit_huge")
    with pytest.raises(TypeError, match="window"):
        beit.create_model("beit_tiny_patch16_224", window=3)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        beit.create_model("beit_tiny_patch16_224", img_size=100)
    with pytest.raises(ValueError, match="unknown impl"):
        beit.create_model("beit_tiny_patch16_224", impl="cuda")


def test_bad_images_and_masks():
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    mask = random_mask(2, 9)
    with pytest.raises(ValueError, match="image size 64x48 does not match the model's 48x48"):
        model(torch.randn(2, 3, 64, 48), mask)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(2, 1, 48, 48), mask)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 48, 48), mask)
    with pytest.raises(TypeError, match="float tensor"):
        model(torch.zeros(2, 3, 48, 48, dtype=torch.uint8), mask)
    with pytest.raises(TypeError, match="torch.bool"):
        model(x, mask.long())
    with pytest.raises(ValueError, match=r"bool_masked_pos must be \[B, 9\].*\(3, 9\)"):
        model(x, random_mask(3, 9))
    with pytest.raises(ValueError, match=r"\(2, 8\)"):
        model(x, random_mask(2, 8))
    with pytest.raises(ValueError, match="needs bool_masked_pos"):
        model(x)
