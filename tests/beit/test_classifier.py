"""The fine-tuning classifier: ref, sdpa and triton (interpreter on the CPU) agree, the per-block table gradient
through our attention matches the reference, the pooling and the whole forward against a computation written
here from the official definitions, the head's initial scale, and bad image sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

import beit
from beit.classifier import ClassifierConfig, VisionTransformer

TINY = dict(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def tiny(impl="ref", seed=0, **kw):
    torch.manual_seed(seed)
    model = VisionTransformer(ClassifierConfig(**dict(TINY, impl=impl, **kw)))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Random everywhere (tables, layer scales, norms, head), kept small enough for a stable softmax.
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "relative_position" in name else 0.2))
    return model.eval()


def images(b=2, seed=3):
    return torch.randn(b, 3, 32, 48, generator=torch.Generator().manual_seed(seed))


def logits_and_grads(impl, x):
    model = tiny(impl)
    out = model(x)
    out.logsumexp(-1).sum().backward()
    return model, out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("impl", ["sdpa", "triton"])
def test_sdpa_and_triton_match_the_reference_logits_and_gradients(impl):
    """Each block's table gets its own gradient (the bias gradient summed over the batch and gathered back onto
    the table rows): through our attention and SDPA as through the official explicit softmax."""
    if impl == "triton":
        pytest.importorskip("triton")
    x = images(b=3)
    _, out_ref, grads_ref = logits_and_grads("ref", x)
    model, out, grads = logits_and_grads(impl, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(grads_ref)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    tables = [grads[f"blocks.{i}.attn.relative_position_bias_table"] for i in range(2)]
    assert tables[0].shape == ((2 * 4 - 1) * (2 * 6 - 1) + 3, 2)
    assert all(t.abs().max() > 0 for t in tables)
    assert not torch.allclose(tables[0], tables[1])  # one table per block, not a shared one


# ----------------------------------------------------------------------------------------------------------------
# The forward written out from the official definitions (modeling_finetune.py), parameter by parameter


def table_index(h, w):
    """The official index, element by element: offset (dr, dc) -> (dr + h-1)(2w-1) + (dc + w-1); the cls rows are
    the last three (cls->token, token->cls, cls->cls)."""
    rows = (2 * h - 1) * (2 * w - 1) + 3
    n = h * w
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            dr, dc = i // w - j // w, i % w - j % w
            index[i + 1, j + 1] = (dr + h - 1) * (2 * w - 1) + (dc + w - 1)
    index[0, 1:] = rows - 3
    index[1:, 0] = rows - 2
    index[0, 0] = rows - 1
    return index


def by_hand(model, x):
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    c = model.config
    p, d, heads = c.patch_size, c.embed_dim, c.num_heads
    b, _, hh, ww = x.shape
    h, w = hh // p, ww // p
    # Patches in row-major order, each flattened as (channel, row, column), times the conv weight.
    patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, h * w, -1)
    t = patches @ sd["patch_embed.proj.weight"].reshape(d, -1).T + sd["patch_embed.proj.bias"]
    t = torch.cat([sd["cls_token"].expand(b, 1, d), t], 1)
    index = table_index(h, w)
    hd = d // heads
    for i in range(c.depth):
        pre = f"blocks.{i}."

        def ln(v, name, pre=pre):
            return F.layer_norm(v, (d,), sd[pre + name + ".weight"], sd[pre + name + ".bias"], eps=c.layer_norm_eps)

        y = ln(t, "norm1")
        bias = torch.cat([sd[pre + "attn.q_bias"], torch.zeros(d), sd[pre + "attn.v_bias"]])
        q, k, v = (y @ sd[pre + "attn.qkv.weight"].T + bias).split(d, -1)
        q, k, v = (z.reshape(b, -1, heads, hd).transpose(1, 2) for z in (q, k, v))
        table = sd[pre + "attn.relative_position_bias_table"]
        rel = table[index].permute(2, 0, 1)  # [H, N+1, N+1]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + rel, -1)
        a = (att @ v).transpose(1, 2).reshape(b, -1, d) @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
        t = t + sd[pre + "gamma_1"] * a
        y = ln(t, "norm2")
        m = F.gelu(y @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
        t = t + sd[pre + "gamma_2"] * (m @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"])
    if c.use_mean_pooling:  # fc_norm of the mean of the patch tokens, the cls token left out
        f = F.layer_norm(t[:, 1:].mean(1), (d,), sd["fc_norm.weight"], sd["fc_norm.bias"], eps=c.layer_norm_eps)
    else:  # norm of the cls token
        f = F.layer_norm(t[:, 0], (d,), sd["norm.weight"], sd["norm.bias"], eps=c.layer_norm_eps)
    return f @ sd["head.weight"].T + sd["head.bias"]


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_pooling_and_forward_match_a_computation_from_the_official_definitions(mean_pooling):
    model = tiny("ref", use_mean_pooling=mean_pooling)
    assert (model.fc_norm is not None) == mean_pooling
    assert isinstance(model.norm, torch.nn.Identity) == mean_pooling
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), by_hand(model, x), rtol=1e-5, atol=1e-5)
        # The two poolings differ on the same weights: mean pooling does not look at the cls token's output.
        tokens = model.forward_tokens(x)
        changed = tokens.clone()
        changed[:, 0] += torch.randn(changed[:, 0].shape, generator=torch.Generator().manual_seed(5))
        same = torch.allclose(model.pool(changed), model.pool(tokens))
        assert same == mean_pooling


def test_the_head_starts_at_init_scale():
    small = VisionTransformer(ClassifierConfig(**TINY))
    assert small.config.init_scale == 0.001
    torch.manual_seed(0)
    small = VisionTransformer(ClassifierConfig(**TINY))
    torch.manual_seed(0)
    unit = VisionTransformer(ClassifierConfig(**dict(TINY, init_scale=1.0)))
    # The same draws (the official order), the head multiplied by init_scale, nothing else changed.
    torch.testing.assert_close(small.head.weight, unit.head.weight * 0.001, rtol=1e-6, atol=0)
    assert torch.equal(small.head.bias, torch.zeros(5))
    for (name, p), (_, q) in zip(small.named_parameters(), unit.named_parameters()):
        if not name.startswith("head."):
            assert torch.equal(p, q), name
    w = unit.head.weight.detach()
    assert w.abs().max() <= 0.02 and 0.01 < w.std() < 0.02  # trunc-normal(std 0.02) cut at one std: std 0.0108
    small.reset_classifier(3)
    assert small.head.weight.shape == (3, 32) and small.head.weight.abs().max() <= 0.02 * 0.001
    assert torch.equal(small.head.bias.detach(), torch.zeros(3))


def test_bad_image_sizes_are_named():
    with pytest.raises(ValueError, match=r"image size \(40, 40\) is not a positive multiple of the patch size"):
        VisionTransformer(ClassifierConfig(**dict(TINY, img_size=40, patch_size=16)))
    with pytest.raises(ValueError, match="not a positive multiple"):
        beit.create_classifier("beit_tiny_patch16_224", depth=1, img_size=100)
    model = tiny()
    with pytest.raises(ValueError, match=r"image size 48x48 does not match the model's 32x48.*create_classifier"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"must be \[B, 3, H, W\]"):
        model(torch.randn(3, 32, 48))
