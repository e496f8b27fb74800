"""Checkpoint interop: Hugging Face (transformers 4 and 5 names), official unilm, timm; file reading; bad files."""

import json
import pickle
import re

import pytest
import torch

import beit
from beit.checkpoint import (
    convert_state_dict,
    export_state_dict,
    hf_config_kwargs,
    load_pretrained,
    read_state_dict,
)
from beit.errors import TrainingError
from beit.model import BeitConfig, VisionTransformerForMaskedImageModeling

SMALL = dict(img_size=48, patch_size=16, embed_dim=32, depth=2, num_heads=4, vocab_size=50, layer_norm_eps=1e-6)


def ours(**kw):
    return VisionTransformerForMaskedImageModeling(BeitConfig(**dict(SMALL, **kw))).eval()


def randomize_(model):
    """Give every parameter a distinct random value (tables, mask token and layer scales included)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def inputs(B=3, n=9):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 48, 48, generator=g)
    mask = torch.rand(B, n, generator=g) < 0.5
    mask[0, 0] = True
    return x, mask


def hf_model(**kw):
    transformers = pytest.importorskip("transformers")
    args = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=48,
        patch_size=16,
        vocab_size=50,
        use_mask_token=True,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=0.1,
        layer_norm_eps=1e-6,
        use_mean_pooling=True,
        attn_implementation="eager",
    )
    args.update(kw)
    attn = args.pop("attn_implementation")
    config = transformers.BeitConfig(**args)
    config._attn_implementation = attn
    return randomize_(transformers.BeitForMaskedImageModeling(config)).eval()


def hf_logits(model, x, mask):
    with torch.no_grad():
        return model(pixel_values=x, bool_masked_pos=mask).logits[mask]


HF_VARIANTS = [
    dict(),
    dict(use_relative_position_bias=True, use_shared_relative_position_bias=False),
]


def _ours_for(hf_kwargs):
    per_block = hf_kwargs.get("use_relative_position_bias", False)
    return ours(use_rel_pos_bias=per_block, use_shared_rel_pos_bias=not per_block)


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_hf_transformers5_model_converts_to_the_same_logits(variant):
    hf = hf_model(**variant)
    model = _ours_for(variant)
    report = load_pretrained(model, hf.state_dict(), strict=True)
    assert report.source == "hf"
    x, mask = inputs()
    with torch.no_grad():
        out = model(x, mask)
    ref = hf_logits(hf, x, mask)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-4


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_export_round_trips_to_hf(variant, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = hf_model(**variant)
    model = _ours_for(variant)
    load_pretrained(model, hf.state_dict(), strict=True)
    x, mask = inputs()
    ref = hf_logits(hf, x, mask)

    # transformers 5 module names load strictly into the installed transformers' model.
    fresh = hf_model(**variant)
    if any(k.startswith("beit.layers.") for k in fresh.state_dict()):
        fresh.load_state_dict(export_state_dict(model, "hf5"), strict=True)
        assert (hf_logits(fresh, x, mask) - ref).abs().max() < 1e-5

    # The hub layout (transformers 4 names), saved as a model folder, goes through from_pretrained.
    from safetensors.torch import save_file

    sd = export_state_dict(model, "hf")
    assert "beit.encoder.layer.0.attention.attention.query.weight" in sd
    assert not any(".key.bias" in k for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    config = transformers.BeitConfig(**hf_config_kwargs(model))
    (tmp_path / "config.json").write_text(
        json.dumps(dict(config.to_dict(), architectures=["BeitForMaskedImageModeling"]))
    )
    loaded = transformers.BeitForMaskedImageModeling.from_pretrained(str(tmp_path)).eval()
    assert (hf_logits(loaded, x, mask) - ref).abs().max() < 1e-5

    # And the folder loads back into ours.
    again = _ours_for(variant)
    assert load_pretrained(again, tmp_path, strict=True).source == "hf"
    with torch.no_grad():
        assert (again(x, mask) - ref).abs().max() < 1e-4


def test_hf_transformers4_names_are_read():
    model = randomize_(ours())
    sd = export_state_dict(model, "hf")  # transformers 4 names, as on the hub
    sd["beit.encoder.relative_position_bias.relative_position_index"] = torch.zeros(10, 10, dtype=torch.long)
    sd["beit.encoder.layer.0.attention.attention.key.bias"] = torch.randn(32)  # softmax-invariant: dropped
    again = ours()
    assert load_pretrained(again, sd, strict=True).source == "hf"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)


def test_unilm_round_trip_through_a_pth_file(tmp_path):
    model = randomize_(ours())
    sd = export_state_dict(model, "unilm")
    assert tuple(sd["rel_pos_bias.relative_position_index"].shape) == (10, 10)
    assert len(sd) == len(model.state_dict()) + 1
    # A training checkpoint of the official trainer: weights under "model", DDP prefix, other entries beside.
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 799, "args": {"lr": 1.5e-3}}, path)
    again = ours()
    report = load_pretrained(again, path)
    assert report.source == "unilm" and not report.missing_keys and not report.unexpected_keys
    x, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(x, mask), model(x, mask), rtol=0, atol=0)


def test_unilm_packed_qkv_bias_is_split():
    model = randomize_(ours())
    sd = export_state_dict(model, "unilm")
    for i in range(2):
        q, v = sd.pop(f"blocks.{i}.attn.q_bias"), sd.pop(f"blocks.{i}.attn.v_bias")
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.randn_like(q), v])
    again = ours()
    load_pretrained(again, sd, src="unilm", strict=True)
    x, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(x, mask), model(x, mask))


def test_shared_table_is_copied_into_per_block_tables():
    shared = randomize_(ours())
    per_block = ours(use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    report = load_pretrained(per_block, export_state_dict(shared, "unilm"))
    assert not report.missing_keys and not report.unexpected_keys
    table = shared.rel_pos_bias.relative_position_bias_table
    for blk in per_block.blocks:
        torch.testing.assert_close(blk.attn.relative_position_bias_table, table, rtol=0, atol=0)
    x, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(per_block(x, mask), shared(x, mask))


def test_timm_layout():
    source = randomize_(ours(use_rel_pos_bias=True, use_shared_rel_pos_bias=False))
    sd = {k: v for k, v in source.state_dict().items() if not k.startswith(("mask_token", "lm_head"))}
    for i in range(2):
        sd[f"blocks.{i}.attn.k_bias"] = torch.zeros(32)  # timm's non-persistent buffer, in older files
        sd[f"blocks.{i}.attn.relative_position_index"] = torch.zeros(10, 10, dtype=torch.long)
    sd["fc_norm.weight"], sd["head.weight"] = torch.ones(32), torch.zeros(5, 32)
    target = ours(use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    report = load_pretrained(target, sd, src="timm")
    assert report.missing_keys == ["lm_head.bias", "lm_head.weight", "mask_token"]
    assert report.unexpected_keys == ["fc_norm.weight", "head.weight"]
    for k, v in sd.items():
        if k in target.state_dict():
            torch.testing.assert_close(target.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing keys"):
        load_pretrained(ours(use_rel_pos_bias=True, use_shared_rel_pos_bias=False), sd, strict=True)


def test_shape_mismatch_is_a_clear_error():
    big = beit.create_model("beit_tiny_patch16_224", depth=1, vocab_size=50)
    small = beit.create_model("beit_tiny_patch16_224", depth=1, vocab_size=50, img_size=160)
    with pytest.raises(ValueError, match=r"rel_pos_bias.relative_position_bias_table: checkpoint \(732, 3\) vs model "
                                         r"\(364, 3\).*|image or patch size"):  # fmt: skip
        load_pretrained(small, export_state_dict(big, "unilm"))
    with pytest.raises(ValueError, match=r"lm_head.weight: checkpoint \(50, 192\) vs model \(60, 192\)"):
        load_pretrained(beit.create_model("beit_tiny_patch16_224", depth=1, vocab_size=60), big.state_dict())


def test_safetensors_and_bin_files(tmp_path):
    from safetensors.torch import save_file

    model = randomize_(ours())
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(model.state_dict(), tmp_path / "w.bin")
    for name in ("w.safetensors", "w.bin"):
        again = ours()
        assert not load_pretrained(again, tmp_path / name).missing_keys
        torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


class Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")
    html = tmp_path / "encoder.pth"
    html.write_text("<!DOCTYPE html><html><body>Access denied</body></html>")
    with pytest.raises(ValueError, match="HTML"):
        read_state_dict(html)
    log = tmp_path / "beit.pth"
    log.write_text("--2021-07-01 10:00:00--  https://example.invalid/beit.pth\nResolving example.invalid... failed\n")
    with pytest.raises(ValueError, match="wget log"):
        read_state_dict(log)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_state_dict(empty)
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(evil)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="safetensors"):
        read_state_dict(bad_st)
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_state_dict(tmp_path / "folder")


def test_unknown_layouts_are_refused():
    with pytest.raises(ValueError, match="cannot tell the checkpoint layout"):
        convert_state_dict({"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown checkpoint source"):
        convert_state_dict({"blocks.0.x": torch.zeros(1)}, src="mmcv")
    with pytest.raises(ValueError, match="unknown export layout"):
        export_state_dict(ours(), "onnx")
    with pytest.raises(TypeError):
        convert_state_dict([1, 2, 3])


# ----------------------------------------------------------------------------------------------------------------
# Inputs not made by our export: transformers' own save_pretrained, and the official key names written out by hand
# (from the unilm, timm and Hugging Face sources, not from beit.checkpoint), so that a naming error made the same
# way in export and import cannot pass.

D, MLP, TABLE = 32, 128, (2 * 3 - 1) ** 2 + 3  # SMALL: 3x3 windows, 28 table rows


def official_unilm_shapes(depth=2, shared_table=True) -> dict[str, tuple]:
    """The keys and shapes of an official unilm MIM checkpoint's ``model`` (run_beit_pretraining.py)."""
    shapes = {
        "cls_token": (1, 1, D),
        "mask_token": (1, 1, D),
        "patch_embed.proj.weight": (D, 3, 16, 16),
        "patch_embed.proj.bias": (D,),
    }
    if shared_table:
        shapes["rel_pos_bias.relative_position_bias_table"] = (TABLE, 4)
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({
            p + "gamma_1": (D,), p + "gamma_2": (D,),
            p + "norm1.weight": (D,), p + "norm1.bias": (D,),
            p + "attn.q_bias": (D,), p + "attn.v_bias": (D,),
            p + "attn.qkv.weight": (3 * D, D),
            p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
            p + "norm2.weight": (D,), p + "norm2.bias": (D,),
            p + "mlp.fc1.weight": (MLP, D), p + "mlp.fc1.bias": (MLP,),
            p + "mlp.fc2.weight": (D, MLP), p + "mlp.fc2.bias": (D,),
        })  # fmt: skip
        if not shared_table:
            shapes[p + "attn.relative_position_bias_table"] = (TABLE, 4)
    shapes.update({"norm.weight": (D,), "norm.bias": (D,), "lm_head.weight": (50, D), "lm_head.bias": (50,)})
    return shapes


def random_state(shapes: dict, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}


def unilm_to_hf4_by_hand(sd: dict, depth=2) -> dict[str, torch.Tensor]:
    """The transformers converter's map (convert_beit_unilm_to_pytorch.py, has_lm_head=True), written out."""
    out = {
        "beit.embeddings.cls_token": sd["cls_token"],
        "beit.embeddings.mask_token": sd["mask_token"],
        "beit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "beit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "beit.encoder.relative_position_bias.relative_position_bias_table": sd[
            "rel_pos_bias.relative_position_bias_table"
        ],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
        "lm_head.weight": sd["lm_head.weight"],
        "lm_head.bias": sd["lm_head.bias"],
    }
    for i in range(depth):
        u, h = f"blocks.{i}.", f"beit.encoder.layer.{i}."
        qkv = sd[u + "attn.qkv.weight"]
        out.update({
            h + "lambda_1": sd[u + "gamma_1"], h + "lambda_2": sd[u + "gamma_2"],
            h + "layernorm_before.weight": sd[u + "norm1.weight"], h + "layernorm_before.bias": sd[u + "norm1.bias"],
            h + "attention.attention.query.weight": qkv[:D],
            h + "attention.attention.query.bias": sd[u + "attn.q_bias"],
            h + "attention.attention.key.weight": qkv[D : 2 * D],
            h + "attention.attention.value.weight": qkv[2 * D :],
            h + "attention.attention.value.bias": sd[u + "attn.v_bias"],
            h + "attention.output.dense.weight": sd[u + "attn.proj.weight"],
            h + "attention.output.dense.bias": sd[u + "attn.proj.bias"],
            h + "layernorm_after.weight": sd[u + "norm2.weight"], h + "layernorm_after.bias": sd[u + "norm2.bias"],
            h + "intermediate.dense.weight": sd[u + "mlp.fc1.weight"],
            h + "intermediate.dense.bias": sd[u + "mlp.fc1.bias"],
            h + "output.dense.weight": sd[u + "mlp.fc2.weight"], h + "output.dense.bias": sd[u + "mlp.fc2.bias"],
        })  # fmt: skip
    return out


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_a_model_saved_by_transformers_itself_loads_to_the_same_logits(variant, tmp_path):
    hf = hf_model(**variant)
    hf.save_pretrained(str(tmp_path))  # transformers' own file and names, whatever this version writes
    model = _ours_for(variant)
    assert load_pretrained(model, tmp_path, strict=True).source == "hf"
    x, mask = inputs()
    with torch.no_grad():
        assert (model(x, mask) - hf_logits(hf, x, mask)).abs().max() < 1e-4


def test_a_hand_written_official_unilm_checkpoint_loads_and_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    shapes = official_unilm_shapes()
    sd = random_state(shapes)
    sd["rel_pos_bias.relative_position_index"] = torch.zeros(10, 10, dtype=torch.long)  # a persistent buffer
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": sd, "epoch": 799}, path)
    model = ours()
    report = load_pretrained(model, path, strict=True)
    assert report.source == "unilm"
    # Our names are the official ones: every official weight arrives unchanged under its own name.
    assert set(model.state_dict()) == set(shapes)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
    # And our export writes exactly the official keys (the index buffer beside them).
    assert set(export_state_dict(model, "unilm")) == set(shapes) | {"rel_pos_bias.relative_position_index"}

    # The same weights, mapped by hand to the hub names, in transformers' own model: the same logits.
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in unilm_to_hf4_by_hand(sd).items()}, str(folder / "model.safetensors"))
    hf_model().config.save_pretrained(str(folder))
    hf = transformers.BeitForMaskedImageModeling.from_pretrained(str(folder)).eval()
    x, mask = inputs()
    with torch.no_grad():
        assert (model(x, mask) - hf_logits(hf, x, mask)).abs().max() < 1e-4


def test_a_hand_written_timm_state_dict_loads_under_the_official_names():
    """timm's Beit (global_pool='avg', per-block tables): unilm's names without mask_token, lm_head and norm, with
    fc_norm and head; older files hold k_bias and per-block relative_position_index buffers."""
    shapes = {
        k: s
        for k, s in official_unilm_shapes(shared_table=False).items()
        if not k.startswith(("mask_token", "lm_head", "norm."))
    }
    shapes.update({"fc_norm.weight": (D,), "fc_norm.bias": (D,), "head.weight": (1000, D), "head.bias": (1000,)})
    sd = random_state(shapes, seed=1)
    for i in range(2):
        sd[f"blocks.{i}.attn.k_bias"] = torch.zeros(D)
        sd[f"blocks.{i}.attn.relative_position_index"] = torch.zeros(10, 10, dtype=torch.long)
    target = ours(use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    report = load_pretrained(target, sd)
    assert report.source == "unilm"
    assert report.missing_keys == ["lm_head.bias", "lm_head.weight", "mask_token", "norm.bias", "norm.weight"]
    assert report.unexpected_keys == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    loaded = target.state_dict()
    for k in shapes:
        if not k.startswith(("fc_norm", "head")):
            torch.testing.assert_close(loaded[k], sd[k], rtol=0, atol=0, msg=k)


class _NotWeights:
    """Any class the weights-only loader does not allow."""


def _refusal(fn, path) -> str:
    with pytest.raises(Exception) as info:
        fn(path)
    assert isinstance(info.value, (ValueError, TrainingError)), repr(info.value)
    return str(info.value)


def test_refusals_never_advise_loading_with_weights_only_false(tmp_path):
    """torch.load's error advises re-running with weights_only=False (running whatever the file names): our
    messages pass on the reason (the global the file names), never that advice."""
    from beit.export import model_from_checkpoint
    from beit.linprobe import pretraining_normalization
    from beit.train_state import load_checkpoint

    code = tmp_path / "code.pth"
    torch.save({"model": {}, "x": _NotWeights()}, code)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x02garbage" * 10)
    readers = [read_state_dict, load_checkpoint, model_from_checkpoint, pretraining_normalization]
    for path in (code, junk):
        for fn in readers:
            msg = _refusal(fn, path)
            assert str(path) in msg, (fn.__name__, msg)
            assert not re.search(r"weights_only\W{0,5}(set to\W{0,3})?False", msg), (fn.__name__, msg)
            assert "trust" not in msg and "add_safe_globals" not in msg, (fn.__name__, msg)
            if path == code:
                assert "_NotWeights" in msg, (fn.__name__, msg)


def test_exported_safetensors_carry_a_checksum_that_catches_damage(tmp_path):
    from safetensors.torch import save_file

    from beit.export import export

    model = ours()
    paths = export(model, tmp_path / "out")
    for path in (paths["safetensors"], paths["hf"] / "model.safetensors"):
        sd = read_state_dict(path)  # verified
        assert sd and all(isinstance(v, torch.Tensor) for v in sd.values())
        raw = bytearray(path.read_bytes())
        raw[-64:] = bytes(b ^ 0xFF for b in raw[-64:])  # the last tensor's bytes: the header still parses
        path.write_bytes(bytes(raw))
        with pytest.raises(ValueError, match="damaged: its tensors do not match the checksum"):
            read_state_dict(path)
    # A safetensors file from elsewhere (no checksum of ours) loads as before.
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    assert torch.equal(read_state_dict(tmp_path / "plain.safetensors")["w"], torch.ones(2))


# ----------------------------------------------------------------------------------------------------------------
# Classifiers: transformers' BeitForImageClassification, a shared-table MIM source, our HF export, and the official
# fine-tuned key names written out by hand.


def ours_classifier(**kw):
    from beit.classifier import ClassifierConfig, VisionTransformer

    args = dict(img_size=48, patch_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=5, layer_norm_eps=1e-6)
    return VisionTransformer(ClassifierConfig(**dict(args, **kw))).eval()


def hf_classifier(**kw):
    transformers = pytest.importorskip("transformers")
    args = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=48,
        patch_size=16,
        num_labels=5,
        use_mask_token=False,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=True,
        use_shared_relative_position_bias=False,
        layer_scale_init_value=0.1,
        layer_norm_eps=1e-6,
        use_mean_pooling=True,
    )
    config = transformers.BeitConfig(**dict(args, **kw))
    config._attn_implementation = "eager"
    return randomize_(transformers.BeitForImageClassification(config)).eval()


def hf_class_logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_hf_image_classification_converts_to_the_same_logits(mean_pooling, tmp_path):
    """With mean pooling HF's pooler LayerNorm of the patch tokens' mean is our fc_norm; without, BeitModel's final
    layernorm over every token is our norm, and the pooler returns the cls token of its output."""
    hf = hf_classifier(use_mean_pooling=mean_pooling)
    names = set(hf.state_dict())
    assert ("beit.pooler.layernorm.weight" in names) == mean_pooling
    assert ("beit.layernorm.weight" in names) == (not mean_pooling)
    x, _ = inputs()
    ref = hf_class_logits(hf, x)
    hf.save_pretrained(str(tmp_path))  # whatever names this transformers writes
    for source in (hf.state_dict(), tmp_path):
        model = ours_classifier(use_mean_pooling=mean_pooling)
        report = load_pretrained(model, source, strict=True)
        assert report.source == "hf" and report.dropped_keys == []
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_a_shared_table_mim_source_loads_into_a_per_block_classifier_as_copies():
    transformers = pytest.importorskip("transformers")
    hf = hf_model()  # BeitForMaskedImageModeling, one shared table
    shared = hf.state_dict()[
        next(k for k in hf.state_dict() if k.endswith("relative_position_bias_table"))
    ]  # the only table
    model = ours_classifier()
    report = load_pretrained(model, hf.state_dict())
    assert "mask_token" in report.dropped_keys and "lm_head.weight" in report.dropped_keys
    assert "rel_pos_bias.relative_position_bias_table" in report.dropped_keys
    assert not any(k.startswith(("lm_head", "mask_token")) for k in report.unexpected_keys)
    for block in model.blocks:
        torch.testing.assert_close(block.attn.relative_position_bias_table.detach(), shared, rtol=0, atol=0)
    # The blocks then compute what HF's shared-table encoder computes (its BeitModel has no final norm here).
    x, _ = inputs()
    with torch.no_grad():
        ref = hf.beit(pixel_values=x).last_hidden_state
        torch.testing.assert_close(model.forward_tokens(x), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(hf, transformers.BeitForMaskedImageModeling)


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_classifier_export_loads_into_hf_image_classification(mean_pooling, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    model = randomize_(ours_classifier(use_mean_pooling=mean_pooling))
    x, _ = inputs()
    with torch.no_grad():
        ref = model(x)
    fresh = hf_classifier(use_mean_pooling=mean_pooling)
    if any(k.startswith("beit.layers.") for k in fresh.state_dict()):
        fresh.load_state_dict(export_state_dict(model, "hf5"), strict=True)
        torch.testing.assert_close(hf_class_logits(fresh, x), ref, rtol=1e-5, atol=1e-5)
    sd = export_state_dict(model, "hf")
    assert ("classifier.weight" in sd) and ("beit.pooler.layernorm.weight" in sd) == mean_pooling
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    kwargs = hf_config_kwargs(model)
    assert kwargs["num_labels"] == 5 and kwargs["use_mean_pooling"] == mean_pooling
    config = transformers.BeitConfig(**kwargs)
    (tmp_path / "config.json").write_text(
        json.dumps(dict(config.to_dict(), architectures=["BeitForImageClassification"]))
    )
    loaded, info = transformers.BeitForImageClassification.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(hf_class_logits(loaded.eval(), x), ref, rtol=1e-5, atol=1e-5)


def official_finetuned_shapes(depth=2, mean_pooling=True, classes=1000) -> dict[str, tuple]:
    """The state dict of unilm's modeling_finetune.VisionTransformer as run_class_finetuning.py builds it
    (use_rel_pos_bias, no absolute position embedding, layer scale, qkv_bias): persistent relative_position_index
    buffers in every block, fc_norm with mean pooling, norm with the cls token, head."""
    shapes = {"cls_token": (1, 1, D), "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,)}
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({
            p + "gamma_1": (D,), p + "gamma_2": (D,),
            p + "norm1.weight": (D,), p + "norm1.bias": (D,),
            p + "attn.q_bias": (D,), p + "attn.v_bias": (D,),
            p + "attn.relative_position_bias_table": (TABLE, 4),
            p + "attn.relative_position_index": (10, 10),
            p + "attn.qkv.weight": (3 * D, D),
            p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
            p + "norm2.weight": (D,), p + "norm2.bias": (D,),
            p + "mlp.fc1.weight": (MLP, D), p + "mlp.fc1.bias": (MLP,),
            p + "mlp.fc2.weight": (D, MLP), p + "mlp.fc2.bias": (D,),
        })  # fmt: skip
    pool = "fc_norm" if mean_pooling else "norm"
    shapes.update({pool + ".weight": (D,), pool + ".bias": (D,), "head.weight": (classes, D), "head.bias": (classes,)})
    return shapes


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_a_hand_written_official_finetuned_checkpoint_loads_with_every_key(mean_pooling, tmp_path):
    shapes = official_finetuned_shapes(mean_pooling=mean_pooling)
    sd = random_state(shapes, seed=2)
    from beit.model import gen_relative_position_index

    for i in range(2):
        sd[f"blocks.{i}.attn.relative_position_index"] = gen_relative_position_index((3, 3))
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"module": {"module." + k: v for k, v in sd.items()}}, path)  # a DeepSpeed-style wrapper
    model = ours_classifier(num_classes=1000, use_mean_pooling=mean_pooling)
    report = load_pretrained(model, path, strict=True)
    assert report.source == "unilm"
    assert report.missing_keys == [] and report.unexpected_keys == [] and report.dropped_keys == []
    loaded = model.state_dict()
    assert set(loaded) == {k for k in shapes if not k.endswith("relative_position_index")}
    for k, v in loaded.items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
    # Our unilm export of the classifier writes exactly the official keys.
    assert set(export_state_dict(model, "unilm")) == set(shapes)
