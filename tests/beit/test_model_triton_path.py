"""The model's fused pretraining path (``forward_mim_loss``): triton and sdpa against the official ref path.

The attention of the blocks is pinned to "sdpa" in most tests so that these exercise this path's kernels (patch
embedding, masked gather with the final LayerNorm, linear cross-entropy) on their own; the Triton attention has
its own tests, and one test here runs the whole model with every kernel.
"""

import math

import pytest
import torch
from _testutil import no_host_sync

from beit.masking import mask_to_index
from beit.model import BeitConfig, VisionTransformerForMaskedImageModeling, resolve_impl

SMALL = dict(img_size=(48, 32), patch_size=16, embed_dim=40, depth=2, num_heads=5, vocab_size=37)
K = 4  # the padded index width: at most 4 of the 6 patches are masked


def small_model(impl, **kw):
    torch.manual_seed(0)
    model = VisionTransformerForMaskedImageModeling(BeitConfig(**dict(SMALL, impl=impl, **kw)))
    if impl == "triton":
        for block in model.blocks:
            block.attn.impl = "sdpa"
    return model


def batch(B=3, counts=(3, 0, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 48, 32, generator=g)
    mask = torch.zeros(B, 6, dtype=torch.bool)
    for b, c in enumerate(counts):
        mask[b, torch.randperm(6, generator=g)[:c]] = True
    tokens = torch.randint(0, 37, (B, 6), generator=g)
    return images, mask, mask_to_index(mask, K), tokens


def loss_and_grads(model, images, mask, index, tokens):
    model.zero_grad(set_to_none=True)
    loss, correct, valid = model.forward_mim_loss(images, mask, index, tokens)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return (loss, correct, valid), grads


@pytest.mark.parametrize("impl", ["triton", "sdpa"])
@pytest.mark.parametrize("abs_pos", [False, True])
def test_fused_path_matches_the_official_path(impl, abs_pos):
    images, mask, index, tokens = batch()
    ref_model = small_model("ref", use_abs_pos_emb=abs_pos)
    model = small_model(impl, use_abs_pos_emb=abs_pos)
    model.load_state_dict(ref_model.state_dict())
    ref, ref_grads = loss_and_grads(ref_model, images, mask, index, tokens)
    got, grads = loss_and_grads(model, images, mask, index, tokens)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert got[1].item() == ref[1].item() and got[2].item() == ref[2].item() == int(mask.sum())
    # Every parameter gets a gradient on both paths, and they agree.
    assert set(grads) == set(ref_grads) == {n for n, _ in model.named_parameters()}
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_path_under_fp16_autocast():
    # fp16, not bf16: the Triton interpreter's bf16 dot is wrong; bf16 runs in the gpu test below.
    images, mask, index, tokens = batch()
    ref_model = small_model("ref")
    model = small_model("triton")
    model.load_state_dict(ref_model.state_dict())
    with torch.autocast("cpu", dtype=torch.float16):
        ref = ref_model.forward_mim_loss(images, mask, index, tokens)
        got = model.forward_mim_loss(images, mask, index, tokens)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0].float(), rtol=2e-3, atol=2e-3)
    got[0].backward()
    ref[0].backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert p.grad.dtype == torch.float32, name
        # Our embedding is rounded to fp16 (the autocast dtype) where the official blend promotes it to fp32, so
        # the paths differ by fp16 noise: compare each gradient against its own largest entry.
        err = (p.grad - q.grad).abs().max().item()
        assert err <= 2e-2 * q.grad.abs().max().item() + 1e-6, (name, err)


def test_fp16_training_step_with_grad_scaler():
    images, mask, index, tokens = batch()
    model = small_model("triton")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with torch.autocast("cpu", dtype=torch.float16):
        loss, _, _ = model.forward_mim_loss(images, mask, index, tokens)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**16  # no overflow, so the step was taken
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in moved and "patch_embed.proj.weight" in moved and "mask_token" in moved
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_official_forward_is_unchanged_by_the_triton_impl():
    images, mask, _, _ = batch()
    ref_model = small_model("ref")
    model = small_model("triton")
    model.load_state_dict(ref_model.state_dict())
    torch.testing.assert_close(model(images, mask), ref_model(images, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "sdpa"])
def test_batch_without_masked_patches_gives_zero_not_nan(impl):
    images, mask, index, tokens = batch(counts=(0, 0, 0))
    (loss, correct, valid), grads = loss_and_grads(small_model(impl), images, mask, index, tokens)
    assert loss.item() == 0.0 and correct.item() == 0 and valid.item() == 0
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert torch.count_nonzero(grads["lm_head.weight"]) == 0


def test_accuracy_counts_correct_predictions():
    images, mask, index, tokens = batch(counts=(4, 4, 4))
    model = small_model("triton")
    with torch.no_grad():
        feats = model.norm(model._run_blocks(model._embed(images, mask)))[:, 1:]  # [B, N, D]
        predicted = model.lm_head(feats).argmax(-1)  # [B, N]
    tokens = torch.where(torch.arange(6) % 2 == 0, predicted, (predicted + 1) % 37)  # right on even patches
    _, correct, valid = model.forward_mim_loss(images, mask, index, tokens)
    expected = ((tokens == predicted) & mask).sum()
    assert correct.item() == expected.item() and 0 < expected.item() < valid.item()


def test_auto_takes_the_pytorch_path_on_cpu():
    assert resolve_impl("auto", "cpu") == "sdpa"
    images, mask, index, tokens = batch()
    auto, sdpa = small_model("auto"), small_model("sdpa")
    torch.testing.assert_close(
        auto.forward_mim_loss(images, mask, index, tokens)[0], sdpa.forward_mim_loss(images, mask, index, tokens)[0]
    )


@pytest.mark.parametrize("capability,expected", [((7, 0), "sdpa"), ((8, 0), "triton"), ((9, 0), "triton")])
def test_auto_takes_the_pytorch_path_below_sm80(monkeypatch, capability, expected):
    import beit_kernels.backend as backend

    # A pretend GPU: only the capability query is answered, nothing is launched.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    backend._auto_impl.cache_clear()
    try:
        assert resolve_impl("auto", "cuda:0") == expected
    finally:
        backend._auto_impl.cache_clear()


def test_whole_model_with_every_triton_kernel():
    images, mask, index, tokens = batch()
    ref_model = small_model("ref")
    model = VisionTransformerForMaskedImageModeling(BeitConfig(**dict(SMALL, impl="triton")))  # triton attention too
    model.load_state_dict(ref_model.state_dict())
    ref, ref_grads = loss_and_grads(ref_model, images, mask, index, tokens)
    got, grads = loss_and_grads(model, images, mask, index, tokens)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_bad_mim_inputs():
    images, mask, index, tokens = batch()
    model = small_model("triton")
    with pytest.raises(ValueError, match="needs bool_masked_pos"):
        model.forward_mim_loss(images, None, index, tokens)
    with pytest.raises(ValueError, match=r"tokens must be \[3, 6\]"):
        model.forward_mim_loss(images, mask, index, tokens[:, :5])
    with pytest.raises(ValueError, match=r"mask_index must be \[3, K\]"):
        model.forward_mim_loss(images, mask, index[:2], tokens)
    with pytest.raises(TypeError, match="mask_index must be an int32 or int64"):
        model.forward_mim_loss(images, mask, index.float(), tokens)
    other = mask.clone()
    other[1, 0] = ~other[1, 0]  # the index no longer matches the mask: caught on the device (at once on the CPU)
    with pytest.raises(RuntimeError, match="mask_index must list exactly"):
        model.forward_mim_loss(images, other, index, tokens)


# ----------------------------------------------------------------------------------------------------------------
# GPU: BEiT-B in bf16 autocast, no host synchronisation in the fused step


def assert_matches_ref(loss, ref_loss, grads, ref_grads, vocab, loss_frac=0.1, grad_rel=5e-2, global_rel=2e-2):
    """A low-precision step against the reference: at initialisation the loss sits near ln V (uniform logits), so
    its error is bounded by a fraction of its distance from ln V (constant logits are off by the whole distance),
    and every gradient is compared in relative L2 norm (bf16 against fp32 on this model on the CPU: at most 0.8%
    per parameter, 0.5% over all of them)."""
    dist = abs(ref_loss - math.log(vocab))
    assert dist > 0, "the reference loss is exactly ln V: the loss check would prove nothing"
    assert abs(loss - ref_loss) < loss_frac * dist, (loss, ref_loss, math.log(vocab))
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    for name, g in ref_grads.items():
        assert g.abs().sum() > 0, name
        assert rel(grads[name], g) < grad_rel, (name, rel(grads[name], g))
    flat = [torch.cat([g[n].flatten() for n in sorted(ref_grads)]) for g in (grads, ref_grads)]
    assert rel(*flat) < global_rel, rel(*flat)


def test_the_reference_comparison_refuses_constant_logits():
    """The check of the GPU test below, on the CPU: it accepts the triton path and refuses a model whose logits are
    constant (its loss is ln V; its gradients are wrong)."""
    images, mask, index, tokens = batch()
    ref_model = small_model("ref")
    model = small_model("triton")
    model.load_state_dict(ref_model.state_dict())
    ref, ref_grads = loss_and_grads(ref_model, images, mask, index, tokens)
    got, grads = loss_and_grads(model, images, mask, index, tokens)
    vocab = SMALL["vocab_size"]
    assert_matches_ref(got[0].item(), ref[0].item(), grads, ref_grads, vocab)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
    flat, flat_grads = loss_and_grads(model, images, mask, index, tokens)
    assert flat[0].item() == pytest.approx(math.log(vocab))
    with pytest.raises(AssertionError):
        assert_matches_ref(flat[0].item(), ref[0].item(), flat_grads, ref_grads, vocab)
    with pytest.raises(AssertionError):  # the gradients alone catch it too
        assert_matches_ref(ref[0].item(), ref[0].item(), flat_grads, ref_grads, vocab)


@pytest.mark.gpu
def test_gpu_fused_step_is_sync_free_and_matches_ref():
    from beit.masking import MaskingGenerator, generate_masks

    torch.manual_seed(0)
    cfg = dict(embed_dim=768, depth=2, num_heads=12, vocab_size=8192)
    ref_model = VisionTransformerForMaskedImageModeling(BeitConfig(**cfg, impl="ref")).cuda()
    model = VisionTransformerForMaskedImageModeling(BeitConfig(**cfg, impl="triton")).cuda()
    model.load_state_dict(ref_model.state_dict())
    B = 32
    mask, index = generate_masks(MaskingGenerator(14, 75, 16, rng=0), B, device="cuda")
    images = torch.randn(B, 3, 224, 224, device="cuda")
    tokens = torch.randint(0, 8192, (B, 196), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref_loss = ref_model.forward_mim_loss(images, mask, index, tokens)[0]
    ref_loss.backward()
    with no_host_sync():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, correct, valid = model.forward_mim_loss(images, mask, index, tokens)
        loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 2e-2 * abs(ref_loss.item())
    assert valid.item() == int(mask.sum())
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ref_grads) == {n for n, _ in model.named_parameters()}
    assert_matches_ref(loss.item(), ref_loss.item(), grads, ref_grads, cfg["vocab_size"])


@pytest.mark.parametrize("init_values", [0.1, None])
def test_fused_glue_matches_the_blocks_with_drop_path(init_values):
    """The triton path's fused glue (add_layer_norm, bias_gelu) against the same model with the glue in PyTorch,
    in training mode with drop path: the same loss and gradients, so the same per-sample draws in the same order."""
    images, mask, index, tokens = batch(counts=(3, 2, 4))
    kw = dict(drop_path_rate=0.5, init_values=init_values)
    plain = small_model("triton", fused_glue=False, **kw)
    fused = small_model("triton", fused_glue=True, **kw)
    fused.load_state_dict(plain.state_dict())
    for seed in range(3):  # several draws: some samples dropped, some kept
        torch.manual_seed(seed)
        ref, ref_grads = loss_and_grads(plain.train(), images, mask, index, tokens)
        torch.manual_seed(seed)
        got, grads = loss_and_grads(fused.train(), images, mask, index, tokens)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
        assert set(grads) == set(ref_grads)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # The draws matter: another seed gives another loss.
    torch.manual_seed(100)
    other, _ = loss_and_grads(fused.train(), images, mask, index, tokens)
    torch.manual_seed(0)
    again, _ = loss_and_grads(fused.train(), images, mask, index, tokens)
    assert other[0].item() != again[0].item()


def test_compiled_triton_path_matches_eager_without_graph_breaks():
    """torch.compile around the triton path (our ops, fused glue included, are torch.library custom ops): no graph
    break, and the same loss and gradients as eager (drop path off: compiled code draws its own random numbers)."""
    images, mask, index, tokens = batch(counts=(3, 2, 4))
    model = small_model("triton")
    eager, eager_grads = loss_and_grads(model, images, mask, index, tokens)
    compiled = torch.compile(model.forward_mim_loss, fullgraph=True)  # a graph break raises
    model.zero_grad(set_to_none=True)
    loss, correct, valid = compiled(images, mask, index, tokens)
    loss.backward()
    torch.testing.assert_close(loss, eager[0], rtol=1e-6, atol=1e-6)
    assert (correct.item(), valid.item()) == (eager[1].item(), eager[2].item())
    for name, g in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, rtol=1e-5, atol=1e-6, msg=name)
