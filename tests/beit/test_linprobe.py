"""The linear probe itself: it separates features that are linearly separable and reports a held-out accuracy."""

import numpy as np
import pytest
import torch

import beit.linprobe
from beit.data import NORMALIZATIONS, make_synthetic
from beit.linprobe import extract_features, fit_probe, labelled_images, main, probe_accuracy
from beit.model import BeitConfig, VisionTransformerForMaskedImageModeling

TINY = dict(img_size=32, patch_size=16, vocab_size=16, embed_dim=32, depth=1, num_heads=2)


def test_probe_fits_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=g)
    probe = fit_probe(x[:200], y[:200], 3)
    with torch.no_grad():
        acc = (probe((x[200:] - probe.mu) / probe.sd).argmax(1) == y[200:]).float().mean().item()
    assert acc > 0.95


def test_probe_is_at_chance_on_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=g)
    y = torch.randint(0, 2, (400,), generator=g)
    probe = fit_probe(x[:300], y[:300], 2)
    with torch.no_grad():
        acc = (probe((x[300:] - probe.mu) / probe.sd).argmax(1) == y[300:]).float().mean().item()
    assert 0.3 < acc < 0.7


def test_labelled_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        labelled_images(tmp_path / "nope")
    (tmp_path / "only").mkdir()
    with pytest.raises(ValueError, match="at least two class"):
        labelled_images(tmp_path)


def test_cli_refuses_random_init_with_compare_random(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ckpt.pth", "--data", "d", "--random-init", "--compare-random"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Eight small images in two classes."""
    root = tmp_path_factory.mktemp("labelled")
    make_synthetic(root, num_images=8, classes=2, seed=0, size=(40, 40))
    return root


def save_tiny_checkpoint(path, args=None, legacy=False):
    """A beit-pretrain-like checkpoint of a 1-block model at 32 px; ``args`` as the trainer saves them."""
    torch.manual_seed(0)
    model = VisionTransformerForMaskedImageModeling(BeitConfig(**TINY))
    state = {"model": model.state_dict(), "model_config": model.config.to_dict()}
    if args is not None:
        state["args"] = args
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture
def normalizations_used(monkeypatch):
    """The normalization of every extract_features call the probe makes."""
    used = []
    real = beit.linprobe.extract_features

    def spy(*a, normalization="imagenet", **kw):
        used.append(normalization)
        return real(*a, normalization=normalization, **kw)

    monkeypatch.setattr(beit.linprobe, "extract_features", spy)
    return used


def test_features_use_the_given_normalization(labelled):
    from PIL import Image

    model = VisionTransformerForMaskedImageModeling(BeitConfig(**TINY)).eval()
    files = labelled_images(labelled)[0][:2]
    u8 = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
            u8.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    x = torch.stack(u8).float() / 255
    for name, (mean, std) in NORMALIZATIONS.items():
        want = model.forward_features((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        (got,) = extract_features([model], files, 32, normalization=name)
        torch.testing.assert_close(got, want[:, 1:].mean(1).detach())
    with pytest.raises(ValueError, match="normalization must be one of"):
        extract_features([model], files, 32, normalization="cifar")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_cli_normalizes_as_the_checkpoint_was_pretrained(labelled, tmp_path, capsys, normalizations_used, legacy):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt.pth", {"normalization": "inception", "seed": 0}, legacy=legacy)
    assert main([str(ckpt), "--data", str(labelled), "--compare-random"]) == 0
    assert normalizations_used == ["inception"]
    assert capsys.readouterr().out.count("inception normalization") == 2
    # --normalization overrides what the checkpoint records.
    assert main([str(ckpt), "--data", str(labelled), "--normalization", "imagenet"]) == 0
    assert normalizations_used[-1] == "imagenet"
    assert "imagenet normalization" in capsys.readouterr().out


def test_cli_normalization_default_and_unknown(labelled, tmp_path, capsys, normalizations_used):
    # Checkpoints that record no normalization (no args, or args from before the option) were pretrained with
    # the trainer's default.
    for name, args in [("no_args.pth", None), ("old_args.pth", {"seed": 0})]:
        assert main([str(save_tiny_checkpoint(tmp_path / name, args)), "--data", str(labelled)]) == 0
        assert normalizations_used[-1] == "imagenet"
    ckpt = save_tiny_checkpoint(tmp_path / "odd.pth", {"normalization": "cifar"})
    assert main([str(ckpt), "--data", str(labelled)]) == 2
    assert "pretrained with normalization 'cifar'" in capsys.readouterr().err
    assert main([str(ckpt), "--data", str(labelled), "--normalization", "inception"]) == 0
    assert normalizations_used[-1] == "inception"


@pytest.mark.parametrize("fraction", ["1.5", "1.0", "0", "-0.3", "nan"])
def test_cli_refuses_val_fraction_outside_0_1(fraction, capsys):
    with pytest.raises(SystemExit) as e:  # before the checkpoint (which does not exist) is read
        main(["ckpt.pth", "--data", "d", "--val-fraction", fraction])
    assert e.value.code == 2
    assert f"--val-fraction must be between 0 and 1 (exclusive), got {float(fraction)}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "fraction, message",
    [("0.01", "holds out 0 and trains on 8"), ("0.9", "holds out 7 and trains on 1")],
)
def test_cli_refuses_a_split_with_an_empty_side(labelled, tmp_path, capsys, normalizations_used, fraction, message):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt.pth")
    assert main([str(ckpt), "--data", str(labelled), "--val-fraction", fraction]) == 2
    err = capsys.readouterr().err
    assert f"val_fraction {fraction} of 8 images {message}" in err and "need at least 1 held-out" in err
    assert normalizations_used == []  # refused before any image was decoded


@pytest.mark.parametrize("fraction", [1.0, 0.0, 0.95])
def test_probe_refuses_bad_val_fraction(labelled, fraction):
    model = VisionTransformerForMaskedImageModeling(BeitConfig(**TINY))
    with pytest.raises(ValueError, match="val_fraction"):
        probe_accuracy(model, labelled, val_fraction=fraction)
