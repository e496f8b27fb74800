"""From a pretraining checkpoint to a classifier: the relative position table resize against SciPy (the spline it
replaces, and a transcription of the official code path), and ``load_pretrained``'s adaptation of our, official
and safetensors checkpoints (shared table copied, tables and position embedding resized, heads re-initialised,
architecture mismatches refused)."""

import json

import pytest
import torch
import torch.nn.functional as F

import beit
from beit.classifier import ClassifierConfig, VisionTransformer
from beit.model import BeitConfig, VisionTransformerForMaskedImageModeling
from beit.pretrained import official_source_offsets, resize_rel_pos_table

ARCH = dict(patch_size=16, embed_dim=32, depth=2, num_heads=4, layer_norm_eps=1e-6)


def mim(img_size=48, **kw):
    torch.manual_seed(0)
    return VisionTransformerForMaskedImageModeling(BeitConfig(**dict(ARCH, img_size=img_size, vocab_size=50, **kw)))


def classifier(img_size=64, num_classes=5, **kw):
    torch.manual_seed(1)
    return VisionTransformer(ClassifierConfig(**dict(ARCH, img_size=img_size, num_classes=num_classes, **kw)))


def randomize_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def random_table(grid, heads=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, heads, generator=g)


# ----------------------------------------------------------------------------------------------------------------
# The table resize against SciPy

CASES = [((14, 14), (24, 24)), ((14, 14), (40, 40)), ((14, 14), (7, 7)), ((14, 10), (20, 16)), ((3, 3), (4, 4))]


def official_transcription(table, src_grid, dst_grid):
    """run_class_finetuning.py's resize, line for line, with interp2d(x, y, z, kind='cubic')(dx, dy) written as the
    FITPACK spline it built: RectBivariateSpline(x, y, z.T, kx=3, ky=3, s=0)(dx, dy).T (interp2d takes z as
    [len(y), len(x)] and returns [len(dy), len(dx)]). Rectangular grids: the same per axis (x along the width,
    the table's columns; y along the height, its rows)."""
    interpolate = pytest.importorskip("scipy.interpolate")
    np = pytest.importorskip("numpy")

    def coords(src_size, dst_size):
        def geometric_progression(a, r, n):
            return a * (1.0 - r**n) / (1.0 - r)

        left, right = 1.01, 1.5
        while right - left > 1e-6:
            q = (left + right) / 2.0
            gp = geometric_progression(1, q, src_size // 2)
            if gp > dst_size // 2:
                right = q
            else:
                left = q
        dis = []
        cur = 1
        for i in range(src_size // 2):
            dis.append(cur)
            cur += q ** (i + 1)
        r_ids = [-_ for _ in reversed(dis)]
        t = dst_size // 2.0
        return r_ids + [0] + dis, np.arange(-t, t + 0.1, 1.0)

    src_h, src_w = 2 * src_grid[0] - 1, 2 * src_grid[1] - 1
    dst_h, dst_w = 2 * dst_grid[0] - 1, 2 * dst_grid[1] - 1
    num_extra_tokens = 3
    extra_tokens = table[-num_extra_tokens:, :]
    rel_pos_bias = table[:-num_extra_tokens, :]
    x, dx = coords(src_w, dst_w)
    y, dy = coords(src_h, dst_h)
    all_rel_pos_bias = []
    for i in range(table.shape[1]):
        z = rel_pos_bias[:, i].view(src_h, src_w).float().numpy()
        f = interpolate.RectBivariateSpline(np.array(x), np.array(y), z.T, kx=3, ky=3, s=0)
        all_rel_pos_bias.append(torch.Tensor(f(dx, dy).T).contiguous().view(-1, 1))
    rel_pos_bias = torch.cat(all_rel_pos_bias, dim=-1)
    return torch.cat((rel_pos_bias, extra_tokens), dim=0)


@pytest.mark.parametrize("src,dst", CASES)
def test_resize_matches_a_transcription_of_the_official_code(src, dst):
    table = random_table(src)
    got = resize_rel_pos_table(table, src, dst)
    ref = official_transcription(table, src, dst)
    assert got.shape == ref.shape == ((2 * dst[0] - 1) * (2 * dst[1] - 1) + 3, 3)
    assert got.dtype == table.dtype
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def geometric_offsets(n, q):
    """0, +-1, +-(1+q), ...: n offsets each side, from the closed form of the partial sums (not the loop)."""
    pos = [(1 - q**k) / (1 - q) for k in range(1, n + 1)]
    return [-p for p in reversed(pos)] + [0.0] + pos


@pytest.mark.parametrize("src,dst", CASES)
def test_resize_is_the_interpolating_bicubic_spline_through_geometric_offsets(src, dst):
    """Independently of the official loop: the source offsets are the partial sums of 1, q, q^2, ... with q the
    root of 1 + q + ... + q^(h-2) = H'-1 (a root finder here; the official bisection stops within 1e-6 of it),
    clamped to [1.01, 1.5]; the table is a RectBivariateSpline through them, evaluated at the integers, points
    beyond the grid taken at its edge."""
    np = pytest.importorskip("numpy")
    optimize = pytest.importorskip("scipy.optimize")
    interpolate = pytest.importorskip("scipy.interpolate")

    def axis(s, d):
        n, t = s - 1, d - 1
        if s == d:
            return np.arange(-n, n + 1.0)
        f = lambda q: (1 - q**n) / (1 - q) - t  # noqa: E731
        q = 1.5 if f(1.5) < 0 else (1.01 if f(1.01) > 0 else optimize.brentq(f, 1.01, 1.5, xtol=1e-12))
        offsets = np.array(geometric_offsets(n, q))
        ours = official_source_offsets(2 * s - 1, 2 * d - 1).numpy()
        # q within 1e-6 moves the outermost offset by at most sum_k k q^(k-1) 1e-6.
        np.testing.assert_allclose(ours, offsets, rtol=0, atol=n * n * 1.5**n * 1e-6)
        return ours

    table = random_table(src)
    ys, xs = axis(src[0], dst[0]), axis(src[1], dst[1])
    ty = np.arange(-(dst[0] - 1), dst[0] + 0.0)
    tx = np.arange(-(dst[1] - 1), dst[1] + 0.0)
    heads = []
    for h in range(table.shape[1]):
        grid = table[:-3, h].double().view(len(ys), len(xs)).numpy()
        spline = interpolate.RectBivariateSpline(ys, xs, grid, kx=3, ky=3, s=0)
        heads.append(torch.from_numpy(spline(np.clip(ty, ys[0], ys[-1]), np.clip(tx, xs[0], xs[-1]))).reshape(-1))
    ref = torch.cat([torch.stack(heads, 1).float(), table[-3:]])
    torch.testing.assert_close(resize_rel_pos_table(table, src, dst), ref, rtol=1e-5, atol=1e-5)


def test_resize_keeps_an_unchanged_axis_and_the_cls_rows():
    table = random_table((6, 8))
    out = resize_rel_pos_table(table, (6, 8), (6, 12))
    torch.testing.assert_close(out[-3:], table[-3:], rtol=0, atol=0)
    grid_in = table[:-3].view(11, 15, 3)
    grid_out = out[:-3].view(11, 23, 3)
    # The width is resampled (its centre column kept, by symmetry of the offsets about 0), the height untouched:
    # each row of the output depends on that row of the input only.
    torch.testing.assert_close(grid_out[:, 11], grid_in[:, 7], rtol=1e-6, atol=1e-6)
    assert resize_rel_pos_table(table, (6, 8), (6, 8)) is table
    # A constant table stays constant (the spline reproduces polynomials up to degree 3).
    const = torch.full((9 * 9 + 3, 2), 0.7)
    torch.testing.assert_close(resize_rel_pos_table(const, (5, 5), (9, 9)), torch.full((17 * 17 + 3, 2), 0.7))


def test_resize_refuses_bad_input():
    with pytest.raises(ValueError, match="28 rows but a 4x4 patch grid needs 52"):
        resize_rel_pos_table(random_table((3, 3)), (4, 4), (5, 5))
    with pytest.raises(ValueError, match="at least 3 patches a side"):
        resize_rel_pos_table(random_table((2, 2)), (2, 2), (4, 4))
    with pytest.raises(ValueError, match="dst_grid must be a pair of positive ints"):
        resize_rel_pos_table(random_table((3, 3)), (3, 3), (0, 4))
    with pytest.raises(ValueError, match="2-D tensor"):
        resize_rel_pos_table(torch.zeros(28), (3, 3), (4, 4))


# ----------------------------------------------------------------------------------------------------------------
# load_pretrained into a classifier


def our_pretraining_checkpoint(model):
    """What beit-pretrain writes (checkpoint-N.pth): the weights beside the optimizer state, config and counters."""
    return {
        "model": model.state_dict(),
        "model_config": model.config.to_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "step": 10,
        "epoch": 1,
    }


def test_a_pretraining_checkpoint_becomes_a_classifier_at_another_size(tmp_path):
    src = randomize_(mim(img_size=48))  # 3x3 patches, one shared table
    path = tmp_path / "checkpoint-10.pth"
    torch.save(our_pretraining_checkpoint(src), path)
    model = classifier(img_size=64)  # 4x4 patches, a table per block
    fc_norm_before = model.fc_norm.weight.detach().clone()
    report = beit.load_pretrained(model, path)
    assert report.source == "unilm"
    # Dropped on purpose, not unexpected: the MIM head, the mask token, the shared table (copied into the blocks).
    assert sorted(report.dropped_keys) == [
        "lm_head.bias", "lm_head.weight", "mask_token", "rel_pos_bias.relative_position_bias_table",
    ]  # fmt: skip
    # As the official fine-tuning: the pretraining's final norm has no place with mean pooling, fc_norm and the
    # head start fresh.
    assert report.unexpected_keys == ["norm.bias", "norm.weight"]
    assert report.missing_keys == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert any("copied the shared" in n for n in report.notes) and any("3x3 to a 4x4" in n for n in report.notes)
    assert "dropped on purpose" in str(report)
    sd, theirs = model.state_dict(), src.state_dict()
    expected_table = resize_rel_pos_table(theirs["rel_pos_bias.relative_position_bias_table"], (3, 3), (4, 4))
    for i in range(2):
        torch.testing.assert_close(sd[f"blocks.{i}.attn.relative_position_bias_table"], expected_table)
    for k, v in theirs.items():
        if k in sd and "relative_position" not in k:
            torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(model.fc_norm.weight, fc_norm_before)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_a_rectangular_grid_is_read_from_the_checkpoint_config():
    src = randomize_(mim(img_size=(48, 64)))  # 3x4 patches
    model = classifier(img_size=(64, 80))  # 4x5
    report = beit.load_pretrained(model, our_pretraining_checkpoint(src))
    assert any("3x4 to a 4x5" in n for n in report.notes)
    table = src.state_dict()["rel_pos_bias.relative_position_bias_table"]
    torch.testing.assert_close(
        model.blocks[1].attn.relative_position_bias_table.detach(), resize_rel_pos_table(table, (3, 4), (4, 5))
    )
    # Without a configuration, a rectangular table's grid cannot be told ((3, 4) and (4, 3) have the same rows).
    with pytest.raises(ValueError, match=r"cannot tell the patch grid.*src_grid=\(h, w\)"):
        beit.load_pretrained(classifier(img_size=(64, 80)), src.state_dict())
    again = classifier(img_size=(64, 80))
    beit.load_pretrained(again, src.state_dict(), src_grid=(3, 4))
    torch.testing.assert_close(again.state_dict(), model.state_dict())


def test_official_files_give_the_grid_by_their_index_buffers():
    """unilm state dicts keep relative_position_index (persistent buffers): its size gives the grid."""
    src = randomize_(mim(img_size=48))
    sd = beit.export_state_dict(src, "unilm")
    assert "rel_pos_bias.relative_position_index" in sd
    model = classifier(img_size=80)  # 5x5
    report = beit.load_pretrained(model, {"module": sd})
    assert any("3x3 to a 5x5" in n for n in report.notes)
    assert "relative_position_index" not in " ".join(report.unexpected_keys)


def test_the_absolute_position_embedding_is_resized_bicubically():
    src = randomize_(mim(img_size=48, use_abs_pos_emb=True))
    model = classifier(img_size=64, use_abs_pos_emb=True)
    report = beit.load_pretrained(model, src.state_dict())
    assert any("pos_embed" in n for n in report.notes)
    pe = src.pos_embed.detach()
    got = model.pos_embed.detach()
    torch.testing.assert_close(got[:, 0], pe[:, 0], rtol=0, atol=0)  # the cls position is kept
    # The patch part, position by position: bicubic with align_corners=False on the [D, 3, 3] grid.
    grid = pe[0, 1:].T.reshape(1, 32, 3, 3)
    ref = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)[0]  # [D, 4, 4]
    for r in range(4):
        for c in range(4):
            torch.testing.assert_close(got[0, 1 + r * 4 + c], ref[:, r, c])


def test_a_missing_absolute_position_embedding_is_reported_or_refused():
    src = randomize_(mim(img_size=48))  # relative position bias only
    model = classifier(img_size=64, use_abs_pos_emb=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="absolute position embedding.*checkpoint has none"):
        beit.load_pretrained(model, src.state_dict(), require_pos_embed=True)
    for k, v in model.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    report = beit.load_pretrained(model, src.state_dict())
    assert "pos_embed" in report.missing_keys


def test_a_head_for_other_classes_is_dropped_and_reinitialised():
    """Intermediate fine-tuning: a classifier fine-tuned on 7 classes, then on 3."""
    first = randomize_(classifier(img_size=64, num_classes=7))
    model = classifier(img_size=64, num_classes=3)
    with torch.no_grad():
        model.head.weight.fill_(5.0)  # a head that is not fresh: it must be re-initialised
    report = beit.load_pretrained(model, first.state_dict())
    assert report.head_reinitialised
    assert sorted(report.dropped_keys) == ["head.bias", "head.weight"]
    assert report.missing_keys == ["head.bias", "head.weight"]
    assert report.unexpected_keys == []
    assert any("7 classes" in n and "re-initialised" in n for n in report.notes)
    w = model.head.weight.detach()
    assert w.shape == (3, 32)
    assert w.abs().max() <= 0.02 * 0.001 + 1e-12 and w.abs().max() > 0  # trunc-normal(0.02) x init_scale
    assert torch.equal(model.head.bias.detach(), torch.zeros(3))
    # The same class count: the head is loaded.
    same = classifier(img_size=64, num_classes=7)
    report = beit.load_pretrained(same, first.state_dict(), strict=True)
    assert not report.head_reinitialised and report.dropped_keys == []
    torch.testing.assert_close(same.state_dict(), first.state_dict(), rtol=0, atol=0)


def test_architecture_mismatches_are_named_before_anything_is_loaded():
    src = randomize_(mim(img_size=48)).state_dict()
    cases = [
        (dict(embed_dim=48), r"width \(embed_dim\): checkpoint 32, model 48"),
        (dict(depth=3), "depth: checkpoint 2 blocks, model 3"),
        (dict(patch_size=8), "patch size: checkpoint 16x16, model 8x8"),
        (dict(num_heads=2), "heads: checkpoint 4"),
    ]
    for overrides, message in cases:
        model = classifier(img_size=64, **overrides)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="architecture does not match the model: .*" + message):
            beit.load_pretrained(model, src)
        after = model.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before), overrides
    # Several at once are named together.
    with pytest.raises(ValueError, match="width.*patch size.*depth"):
        beit.load_pretrained(classifier(img_size=64, embed_dim=48, patch_size=8, depth=3), src)
    # Other shapes (an MLP ratio) are listed by the general shape check.
    with pytest.raises(ValueError, match="mlp.fc1.weight: checkpoint"):
        beit.load_pretrained(classifier(img_size=48, mlp_ratio=2.0), src)


def test_our_finetuning_checkpoints_and_safetensors_exports_load(tmp_path):
    from beit.export import export

    src = randomize_(classifier(img_size=64, num_classes=5, use_mean_pooling=False))
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": src.state_dict(), "model_config": src.config.to_dict(), "epoch": 3}, path)
    model = classifier(img_size=64, num_classes=5, use_mean_pooling=False)
    assert beit.load_pretrained(model, path, strict=True).dropped_keys == []
    torch.testing.assert_close(model.state_dict(), src.state_dict(), rtol=0, atol=0)

    paths = export(src, tmp_path / "out")
    for file in (paths["safetensors"], paths["unilm"], paths["hf"]):
        again = classifier(img_size=64, num_classes=5, use_mean_pooling=False)
        beit.load_pretrained(again, file, strict=True)
        torch.testing.assert_close(again.state_dict(), src.state_dict(), rtol=0, atol=0, msg=str(file))
    # At another size, the tables of the exported file are resized as from any other.
    bigger = classifier(img_size=80, num_classes=5, use_mean_pooling=False)
    report = beit.load_pretrained(bigger, paths["hf"], strict=True)
    assert any("4x4 to a 5x5" in n for n in report.notes)
    # beit-export writes a fine-tuning checkpoint as it is: its Hugging Face folder is a classifier's.
    from beit.export import main

    assert main([str(path), str(tmp_path / "cli")]) == 0
    config = json.loads((tmp_path / "cli" / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BeitForImageClassification"] and config["num_labels"] == 5
    again = classifier(img_size=64, num_classes=5, use_mean_pooling=False)
    beit.load_pretrained(again, tmp_path / "cli" / "hf", strict=True)
    torch.testing.assert_close(again.state_dict(), src.state_dict(), rtol=0, atol=0)


def test_the_mim_model_path_is_unchanged():
    """A MIM model keeps its head and mask token: nothing is dropped."""
    src = randomize_(mim(img_size=48))
    model = mim(img_size=48)
    report = beit.load_pretrained(model, src.state_dict(), strict=True)
    assert report.dropped_keys == [] and report.notes == []
    torch.testing.assert_close(model.state_dict(), src.state_dict(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# beit-export --task segmentation


def official_backbone_keys(depth):
    """The state dict names of unilm's semantic_segmentation/backbone/beit.py BEiT (use_rel_pos_bias=True,
    use_abs_pos_emb=False, qkv_bias, init_values), its fpn necks left out: written from that file, not ours."""
    keys = {"cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in range(depth):
        p = f"blocks.{i}."
        keys |= {p + n for n in (
            "gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias",
            "attn.relative_position_bias_table", "attn.relative_position_index", "attn.qkv.weight",
            "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
            "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        )}  # fmt: skip
    return keys


def test_segmentation_export_for_mmseg_and_transformers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from beit.export import main

    src = randomize_(mim(img_size=48, depth=4))  # 3x3 patches, a shared table
    ckpt = tmp_path / "checkpoint-10.pth"
    torch.save(our_pretraining_checkpoint(src), ckpt)
    out = tmp_path / "seg"
    assert main([str(ckpt), str(out), "--task", "segmentation", "--img-size", "64"]) == 0
    assert "3x3 to a 4x4" in capsys.readouterr().out
    shared = src.state_dict()["rel_pos_bias.relative_position_bias_table"]
    table = resize_rel_pos_table(shared, (3, 3), (4, 4))

    # (a) The official mmseg backbone's layout: its names exactly (no lm_head, mask_token, norm or head).
    saved = torch.load(out / "beit_backbone.pth", map_location="cpu", weights_only=True)
    backbone = saved["model"]
    assert set(backbone) == official_backbone_keys(4)
    for i in range(4):
        torch.testing.assert_close(backbone[f"blocks.{i}.attn.relative_position_bias_table"], table)
        index = backbone[f"blocks.{i}.attn.relative_position_index"]
        assert index.shape == (17, 17) and index.max() == table.shape[0] - 1
    for k, v in src.state_dict().items():
        if k in backbone and "relative_position" not in k:
            torch.testing.assert_close(backbone[k], v, rtol=0, atol=0, msg=k)

    # (b) transformers' BeitForSemanticSegmentation: only the neck and the heads start fresh.
    hf, info = transformers.BeitForSemanticSegmentation.from_pretrained(str(out / "hf"), output_loading_info=True)
    assert info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert all(k.startswith(("decode_head.", "auxiliary_head.", "fpn")) for k in info["missing_keys"]), info
    assert hf.config.image_size == 64 and hf.config.num_labels == 150
    hf_tables = [v for k, v in hf.state_dict().items() if k.endswith("relative_position_bias_table")]
    assert len(hf_tables) == 4
    for t in hf_tables:
        torch.testing.assert_close(t, table)
    # The encoder computes what ours computes at 64 px from the same checkpoint.
    ours = classifier(img_size=64, depth=4, num_classes=0).eval()
    beit.load_pretrained(ours, ckpt)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval().beit(pixel_values=x).last_hidden_state, ours.forward_tokens(x))
        assert hf(pixel_values=x).logits.shape[:2] == (2, 150)

    # The default task is unchanged.
    assert main([str(ckpt), str(tmp_path / "mim")]) == 0
    assert (tmp_path / "mim" / "model.safetensors").is_file() and (tmp_path / "mim" / "hf" / "config.json").is_file()


def test_segmentation_export_refuses_bad_input(tmp_path, capsys):
    from beit.export import main

    ckpt = tmp_path / "checkpoint-10.pth"
    torch.save(our_pretraining_checkpoint(randomize_(mim(img_size=48, depth=4))), ckpt)
    cases = [
        ([str(ckpt), "--img-size", "72"], "--img-size 72 is not a positive multiple of the checkpoint's patch size 16"),
        ([str(tmp_path / "resnet.pth")], "is not a BEiT checkpoint"),
        ([str(tmp_path / "shallow.pth")], "depth 2 has too few blocks"),
    ]
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, tmp_path / "resnet.pth")
    torch.save(our_pretraining_checkpoint(mim(img_size=48, depth=2)), tmp_path / "shallow.pth")
    for args, message in cases:
        out = tmp_path / "out"
        assert main([args[0], str(out), "--task", "segmentation", *args[1:]]) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert not out.exists()  # refused before anything is written
