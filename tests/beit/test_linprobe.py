"""The linear probe itself: it separates features that are linearly separable and reports a held-out accuracy."""

import pytest
import torch

from beit.linprobe import fit_probe, labelled_images


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
    from beit.linprobe import main

    with pytest.raises(SystemExit) as e:
        main(["ckpt.pth", "--data", "d", "--random-init", "--compare-random"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
