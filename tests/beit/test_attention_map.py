"""beit.attention_map: the last layer's attention probabilities against the reference path's own softmax, the
panels drawn where the attention points, and the beit-attention-map command end to end."""

import numpy as np
import pytest
import torch
from PIL import Image

from beit import attention_map as am
from beit.classifier import ClassifierConfig, VisionTransformer
from beit.model import BeitConfig, VisionTransformerForMaskedImageModeling

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # a 4x4 grid, N + 1 = 17 tokens


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Every parameter, the zero-initialised relative position tables included, so each bias moves the result.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 1.0 if "relative_position_bias_table" in name else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_mim(seed=0, **kw):
    return _randomise(VisionTransformerForMaskedImageModeling(BeitConfig(**TINY, vocab_size=16, **kw)), seed)


def tiny_classifier(seed=0, **kw):
    return _randomise(VisionTransformer(ClassifierConfig(**TINY, num_classes=3, **kw)), seed)


def reference_softmaxes(model, images, monkeypatch) -> list[torch.Tensor]:
    """The attention probabilities of every block, as the official code path ("ref") computes them: each
    [B, H, N+1, N+1] softmax taken during a forward pass."""
    seen = []
    original = torch.Tensor.softmax

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.dim() == 4 and out.shape[-1] == out.shape[-2] == model.num_patches + 1:
            seen.append(out.detach().clone())
        return out

    impl = model.impl
    model.set_impl("ref")
    model.eval()
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(torch.Tensor, "softmax", recording)
        if isinstance(model, VisionTransformerForMaskedImageModeling):
            model.forward_features(images)
        else:
            model(images)
    model.set_impl(impl)
    return seen


MODELS = {
    "mim shared bias": lambda: tiny_mim(),
    "mim per-block tables": lambda: tiny_mim(use_shared_rel_pos_bias=False, use_rel_pos_bias=True),
    "classifier per-block tables": lambda: tiny_classifier(),
    "classifier both biases": lambda: tiny_classifier(use_shared_rel_pos_bias=True),
    "classifier cls pooling": lambda: tiny_classifier(use_mean_pooling=False),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("impl", ["ref", "sdpa"])
def test_last_layer_attention_is_the_reference_softmax(name, impl, monkeypatch):
    model = MODELS[name]()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = reference_softmaxes(model, images, monkeypatch)
    assert len(ref) == model.get_num_layers()
    model.set_impl(impl)
    model.train()
    got = am.last_layer_attention(model, images)
    assert model.training  # the flag comes back
    assert got.shape == (2, 2, 17, 17) and got.dtype == torch.float32
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 2, 17), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, ref[-1], atol=2e-6, rtol=1e-5)
    # the comparison tells layers apart: the block before gives other probabilities
    assert (got - ref[-2]).abs().max() > 1e-2


def test_last_layer_attention_uses_the_biases(monkeypatch):
    # Zeroing the last block's table changes the result: the table is really added.
    model = tiny_classifier()
    images = torch.randn(1, 3, 32, 32)
    before = am.last_layer_attention(model, images)
    with torch.no_grad():
        model.blocks[-1].attn.relative_position_bias_table.zero_()
    after = am.last_layer_attention(model, images)
    assert (before - after).abs().max() > 1e-2
    torch.testing.assert_close(after, reference_softmaxes(model, images, monkeypatch)[-1], atol=2e-6, rtol=1e-5)


def test_last_layer_attention_refuses_other_inputs():
    model = tiny_mim()
    with pytest.raises(ValueError, match="does not match the model's 32x32"):
        am.last_layer_attention(model, torch.randn(1, 3, 48, 48))
    with pytest.raises(TypeError, match="expected a BEiT"):
        am.last_layer_attention(torch.nn.Linear(2, 2), torch.randn(1, 3, 32, 32))


# ----------------------------------------------------------------------------------------------------------------
# The panels


def _one_hot_attention(grid, pairs, heads=2):
    """[heads, N+1, N+1]: each query token in ``pairs`` puts all its weight on one key token; the others spread
    evenly."""
    n = grid[0] * grid[1] + 1
    a = torch.full((heads, n, n), 1.0 / n)
    for q, k in pairs.items():
        a[:, q] = 0
        a[:, q, k] = 1
    return a


def test_panels_heat_where_the_query_looks(tmp_path):
    grid = (4, 4)
    tok = lambda r, c: 1 + r * grid[1] + c  # noqa: E731
    # cls looks at patch (1, 2); reference patch (3, 0) looks at patch (0, 3) (and nothing looks back)
    attn = _one_hot_attention(grid, {0: tok(1, 2), tok(3, 0): tok(0, 3)})
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    path = tmp_path / "maps.png"
    boxes = am.draw_attention_maps(image, attn, [(3, 0)], grid, path)
    out = Image.open(path).convert("RGB")
    assert len(boxes) == 2
    left, top, right, bottom = boxes[1]
    pw, ph = right - left, bottom - top
    assert pw == ph == am.PANEL_MIN and right <= out.width and bottom <= out.height

    def centre(box, r, c):
        # the centre of patch (r, c) inside a panel, from the grid alone
        x = box[0] + int((c + 0.5) * (box[2] - box[0]) / grid[1])
        y = box[1] + int((r + 0.5) * (box[3] - box[1]) / grid[0])
        return out.getpixel((x, y))

    def hot(px):
        return px[0] > px[2] + 40

    def cold(px):
        return px[2] > px[0] + 40

    assert hot(centre(boxes[0], 1, 2)) and cold(centre(boxes[0], 3, 0)) and cold(centre(boxes[0], 2, 1))
    assert hot(centre(boxes[1], 0, 3)) and cold(centre(boxes[1], 3, 0)) and cold(centre(boxes[1], 1, 2))
    # the reference patch is outlined in its panel: the left edge of patch (3, 0), halfway down it
    edge_y = top + int(3.5 * ph / grid[0])
    assert out.getpixel((left, edge_y)) == am.OUTLINE
    assert out.getpixel((left + int(0.5 * pw / grid[1]), edge_y)) != am.OUTLINE  # inside it: not outlined
    assert out.getpixel((boxes[0][0], edge_y)) != am.OUTLINE  # the cls panel has no outline


@pytest.mark.parametrize(
    "patches, attn_shape, match",
    [
        ([(4, 0)], (2, 17, 17), r"reference patch \(4, 0\) is outside the 4x4 patch grid"),
        ([(0, -1)], (2, 17, 17), "outside"),
        ([(1,)], (2, 17, 17), "pair of integers"),
        ([(1, 1)], (2, 10, 10), r"attn must be \[heads, 17, 17\]"),
    ],
)
def test_panels_refuse_bad_input(tmp_path, patches, attn_shape, match):
    with pytest.raises(ValueError, match=match):
        am.draw_attention_maps(Image.new("RGB", (32, 32)), torch.rand(attn_shape), patches, (4, 4), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------------------------------
# The command


def _synthetic_png(path, size=(48, 40)):
    # smooth colour ramps: a non-square image whose resize and crop show
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 255 // (w + h - 2)], -1)
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(path)
    return path


def _expected_input(path, normalization):
    # shorter side (40) to 32 -> 38 x 32, then the centre 32 x 32; normalised with the named mean and std
    mean, std = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "inception": ((0.5,) * 3, (0.5,) * 3)}[
        normalization
    ]
    im = Image.open(path).convert("RGB").resize((38, 32), Image.BICUBIC).crop((3, 0, 35, 32))
    x = (np.asarray(im, dtype=np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None]


def _save_mim(path, model, args=None):
    ckpt = {"model": model.state_dict(), "model_config": model.config.to_dict()}
    if args is not None:
        ckpt["args"] = args
    torch.save(ckpt, path)
    return path


def _save_finetune(path, model, args=None):
    ckpt = {"kind": "beit-finetune", "model_config": model.config.to_dict(), "model": model.state_dict()}
    if args is not None:
        ckpt["args"] = args
    torch.save(ckpt, path)
    return path


def _run(monkeypatch, argv):
    """main(argv), with the attention handed to draw_attention_maps recorded."""
    seen = {}
    draw = am.draw_attention_maps

    def recording(image, attn, patches, grid, path, **kw):
        seen.update(attn=attn, patches=patches, grid=grid)
        return draw(image, attn, patches, grid, path, **kw)

    monkeypatch.setattr(am, "draw_attention_maps", recording)
    return am.main([str(a) for a in argv]), seen


@pytest.mark.parametrize(
    "kind, args, flag, normalization",
    [
        ("mim", {"normalization": "imagenet"}, None, "imagenet"),  # recorded
        ("mim", None, None, "imagenet"),  # MIM default
        ("mim", {"normalization": "imagenet"}, "inception", "inception"),  # the flag wins
        ("classifier", None, None, "inception"),  # classifier default
        ("classifier", {"normalization": "imagenet"}, None, "imagenet"),
    ],
)
def test_cli_end_to_end(tmp_path, monkeypatch, capsys, kind, args, flag, normalization):
    image = _synthetic_png(tmp_path / "img.png")
    if kind == "mim":
        model = tiny_mim(seed=3)
        ckpt = _save_mim(tmp_path / "ckpt.pth", model, args)
    else:
        model = tiny_classifier(seed=4)
        ckpt = _save_finetune(tmp_path / "ckpt.pth", model, args)
    out = tmp_path / "out" / "maps.png"
    argv = [ckpt, image, "--out", out, "--patches", "1,2", "3,3"]
    if flag:
        argv += ["--normalization", flag]
    rc, seen = _run(monkeypatch, argv)
    assert rc == 0, capsys.readouterr().err
    assert seen["patches"] == [(1, 2), (3, 3)] and tuple(seen["grid"]) == (4, 4)
    expected = am.last_layer_attention(model.eval(), _expected_input(image, normalization))[0]
    torch.testing.assert_close(seen["attn"], expected, atol=1e-5, rtol=1e-4)
    other = "inception" if normalization == "imagenet" else "imagenet"
    wrong = am.last_layer_attention(model, _expected_input(image, other))[0]
    assert (seen["attn"] - wrong).abs().max() > 1e-4  # the normalisation shows in the result
    png = Image.open(out)
    assert png.format == "PNG" and png.width > 3 * am.PANEL_MIN  # three panels: cls and two patches
    assert str(out) in capsys.readouterr().out


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("beit-attention-map: error: "), err
    return err


def test_cli_bad_input(tmp_path, monkeypatch, capsys):
    image = _synthetic_png(tmp_path / "img.png")
    ckpt = _save_mim(tmp_path / "mim.pth", tiny_mim())
    out = tmp_path / "maps.png"

    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(image.read_bytes()[:60])
    for bad, why in ((not_image, "not an image"), (truncated, "truncated PNG"), (tmp_path / "missing.png", "")):
        assert am.main([str(ckpt), str(bad), "--out", str(out)]) == 2
        err = _error(capsys)
        assert f"bad image file {bad}" in err and why in err

    assert am.main([str(ckpt), str(image), "--out", str(out), "--patches", "4,0"]) == 2
    assert "reference patch (4, 0) is outside the 4x4 patch grid" in _error(capsys)
    assert am.main([str(ckpt), str(image), "--out", str(out), "--patches", "3:4"]) == 2
    assert "ROW,COL" in _error(capsys)

    not_beit = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, not_beit)
    assert am.main([str(not_beit), str(image), "--out", str(out)]) == 2
    assert "no model_config" in _error(capsys)
    other_kind = tmp_path / "kind.pth"
    torch.save({"kind": "tokenizer", "model": {}}, other_kind)
    assert am.main([str(other_kind), str(image), "--out", str(out)]) == 2
    assert "'tokenizer' checkpoint" in _error(capsys)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x80\x02garbage")
    assert am.main([str(broken), str(image), "--out", str(out)]) == 2
    _error(capsys)
    wrong_weights = tmp_path / "ft.pth"
    model = tiny_classifier()
    state = model.state_dict()
    state.pop("head.weight")
    torch.save({"kind": "beit-finetune", "model_config": model.config.to_dict(), "model": state}, wrong_weights)
    assert am.main([str(wrong_weights), str(image), "--out", str(out)]) == 2
    assert "head.weight" in _error(capsys)
    assert am.main([str(ckpt), str(image), "--out", str(out), "--image-size", "48"]) == 2
    assert "--image-size 48" in _error(capsys)
    assert am.main([str(ckpt), str(image), "--out", str(tmp_path / "maps.jpg")]) == 2
    assert ".png" in _error(capsys)
    assert not out.exists()
