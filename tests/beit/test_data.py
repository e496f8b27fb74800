"""beit.data: both loaders' outputs, reproducibility, sharding, masks (native operator and fallback), bad input,
the plugin build and the synthetic data set. CPU only; tiny images (64/32 px views, 4x4 masks) keep it fast."""

import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beit.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    BadImageError,
    build_dali_plugin,
    build_loader,
    check_image,
    dali_available,
    epoch_order,
    list_images,
    main,
    make_synthetic,
)
from beit.masking import MaskingGenerator, mask_to_index

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
BACKENDS = [pytest.param("dali", marks=needs_dali), "reference"]
MASKING = dict(input_size=4, num_masking_patches=6, min_num_patches=2)
SMALL = dict(device="cpu", num_threads=2, image_size=64, tokenizer_size=32, masking=MASKING)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, 22, classes=3, seed=1, size=(80, 60), gray_fraction=0.2, png_fraction=0.2)
    return root


def _batches(loader):
    # DALI may reuse its buffers on the next step: copy what is kept.
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def _check_batch(b, batch_size, output_dtype, normalization="imagenet"):
    if output_dtype == "uint8":
        assert b["images"].shape == (batch_size, 64, 64, 3) and b["images"].dtype == torch.uint8
        assert b["images"].float().std() > 10  # not blank
    else:
        assert b["images"].shape == (batch_size, 3, 64, 64)
        assert b["images"].dtype == getattr(torch, output_dtype)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalization == "imagenet" else (INCEPTION_MEAN, (0.5,) * 3)
        lo = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
        hi = torch.tensor([(1 - m) / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
        x = b["images"].float()
        tol = 0.02 if output_dtype != "float32" else 1e-4
        assert (x >= lo - tol).all() and (x <= hi + tol).all()
        assert x.std() > 0.1
    t = b["tokenizer_images"]
    assert t.shape == (batch_size, 3, 32, 32) and t.dtype == torch.float32
    assert t.min() >= 0.1 - 1e-6 and t.max() <= 0.9 + 1e-6 and t.std() > 0.02
    assert b["index"].shape == (batch_size,) and b["index"].dtype == torch.int64
    valid = b["valid"]
    assert valid.shape == (batch_size,) and valid.dtype == torch.bool
    m = b["bool_masked_pos"]
    assert m.shape == (batch_size, 16) and m.dtype == torch.bool
    # Padding samples carry an empty mask, so no loss counts them.
    assert (m.sum(1) <= 6).all() and (m.sum(1)[valid] > 0).all() and not m[~valid].any()
    idx = b["mask_index"]
    assert idx.shape == (batch_size, 6) and idx.dtype == torch.int64
    assert torch.equal(idx, mask_to_index(m, 6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output_dtype", ["float32", "bfloat16", "float16", "uint8"])
def test_outputs(data_dir, backend, output_dtype):
    loader = build_loader(data_dir, 8, backend=backend, output_dtype=output_dtype, **SMALL)
    batches = _batches(loader)
    assert len(loader) == len(batches) == 3  # 22 files, batch 8
    for b in batches:
        _check_batch(b, 8, output_dtype)
    index = torch.cat([b["index"][b["valid"]] for b in batches])
    assert sorted(index.tolist()) == list(range(22))


@needs_dali
@pytest.mark.parametrize("output_dtype", ["float32", "float16", "uint8"])
def test_fused_color_operator_matches_dali_operators(data_dir, output_dtype):
    """The plugin's one-pass jitter + flip + normalisation against DALI's brightness_contrast, hsv and
    crop_mirror_normalize on the same crops and factors: equal up to rounding, except where the fused operator
    clips between contrast and brightness as PIL does (a few saturated pixels)."""
    fused = build_loader(data_dir, 8, output_dtype=output_dtype, **SMALL)
    assert fused.fused_color, "the plugin did not load"
    plain = build_loader(data_dir, 8, output_dtype=output_dtype, **SMALL)
    plain.fused_color = False
    unit = 1 if output_dtype == "uint8" else 1 / (255 * min(IMAGENET_STD))  # one grey level
    for a, b in zip(_batches(fused), _batches(plain)):
        _check_batch(a, 8, output_dtype)
        for key in ("images", "tokenizer_images"):
            diff = (a[key].float() - b[key].float()).abs()
            scale = unit if key == "images" else 0.8 / 255
            assert diff.mean() < 1.0 * scale and (diff > 3.5 * scale).float().mean() < 0.05, key
        assert torch.equal(a["bool_masked_pos"], b["bool_masked_pos"])


@needs_dali
def test_gpu_contrast_variant_on_cpu(data_dir):
    """The GPU pipeline's contrast step (arithmetic on a device-side centre) cannot run here without a GPU; its
    graph runs on the CPU and must match the CPU variant up to rounding, except where the GPU variant clips
    between contrast and brightness (a few saturated pixels)."""
    ref = build_loader(data_dir, 8, output_dtype="uint8", **SMALL)
    ref.fused_color = False
    alt = build_loader(data_dir, 8, output_dtype="uint8", **SMALL)
    alt.fused_color, alt._arithmetic_contrast = False, True
    for a, b in zip(_batches(ref), _batches(alt)):
        _check_batch(b, 8, "uint8")
        diff = (a["images"].int() - b["images"].int()).abs()
        assert diff.float().mean() < 1.0 and (diff > 3).float().mean() < 0.05
        assert torch.equal(a["bool_masked_pos"], b["bool_masked_pos"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inception_normalization_and_official_masks(data_dir, backend):
    loader = build_loader(data_dir, 4, backend=backend, normalization="inception", **{**SMALL, "masking": None})
    b = next(iter(loader))
    assert b["images"].min() >= -1 - 1e-5 and b["images"].max() <= 1 + 1e-5 and b["images"].min() < -0.5
    assert b["bool_masked_pos"].shape == (4, 196) and b["mask_index"].shape == (4, 75)
    assert (b["bool_masked_pos"].sum(1) <= 75).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible(data_dir, backend):
    def run(seed, epoch):
        loader = build_loader(data_dir, 8, backend=backend, seed=seed, **SMALL)
        loader.set_epoch(epoch)
        return _batches(loader)

    a, b = run(0, 1), run(0, 1)
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    # An epoch does not depend on the epochs before it (resume gives the uninterrupted run's batches).
    loader = build_loader(data_dir, 8, backend=backend, seed=0, **SMALL)
    _batches(loader)
    loader.set_epoch(1)
    for x, y in zip(a, _batches(loader)):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["bool_masked_pos"], y["bool_masked_pos"])
    other_epoch, other_seed = run(0, 2), run(1, 1)
    assert not torch.equal(a[0]["index"], other_epoch[0]["index"])
    assert not torch.equal(a[0]["images"], other_seed[0]["images"])


@pytest.mark.parametrize("num_files", [1, 7, 22, 48, 50, 101])
@pytest.mark.parametrize("num_shards", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_epoch_order_covers_every_file_once(num_files, num_shards, batch_size):
    for epoch in range(2):
        parts = [
            epoch_order(num_files, batch_size, epoch=epoch, seed=3, shard_id=r, num_shards=num_shards)
            for r in range(num_shards)
        ]
        lengths = {len(o) for o, _ in parts}
        assert len(lengths) == 1 and lengths.pop() % batch_size == 0  # same number of full steps on every rank
        seen = np.concatenate([o[v] for o, v in parts])
        assert sorted(seen.tolist()) == list(range(num_files))
        assert all(((o >= 0) & (o < num_files)).all() for o, _ in parts)


def test_epoch_order_shuffles_per_epoch():
    a = epoch_order(100, 10, epoch=0, seed=0, shard_id=0, num_shards=1)[0]
    b = epoch_order(100, 10, epoch=1, seed=0, shard_id=0, num_shards=1)[0]
    assert not np.array_equal(a, b) and sorted(a) == sorted(b)
    with pytest.raises(ValueError, match="shard_id"):
        epoch_order(10, 2, epoch=0, seed=0, shard_id=2, num_shards=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_shards", [2, 3])
def test_sharded_loaders_cover_every_file_once(data_dir, backend, num_shards):
    for epoch in (0, 1):
        seen, lengths, masks = [], set(), []
        for rank in range(num_shards):
            loader = build_loader(data_dir, 4, backend=backend, shard_id=rank, num_shards=num_shards, **SMALL)
            loader.set_epoch(epoch)
            batches = _batches(loader)
            lengths.add((len(loader), len(batches)))
            seen += torch.cat([b["index"][b["valid"]] for b in batches]).tolist()
            masks.append(torch.cat([b["bool_masked_pos"] for b in batches]))
            pad = torch.cat([~b["valid"] for b in batches])
            assert not masks[-1][pad].any() and masks[-1][~pad].sum(1).min() > 0  # padding counts in no loss
            assert (torch.cat([b["mask_index"] for b in batches])[pad] == -1).all()
        assert len(lengths) == 1 and lengths.pop()[0] == -(-22 // (4 * num_shards))
        assert sorted(seen) == list(range(22))
        assert not torch.equal(masks[0], masks[1])  # seeds differ per rank


def _mask_stats(masks: np.ndarray, budget: int):
    counts = masks.reshape(len(masks), -1).sum(1)
    hist = np.bincount(counts, minlength=budget + 1) / len(counts)
    return counts, hist, masks.mean(0)


def _assert_same_mask_distribution(masks, ref, budget):
    counts, hist, cells = _mask_stats(masks, budget)
    rcounts, rhist, rcells = _mask_stats(ref, budget)
    assert counts.max() <= budget
    assert abs(counts.mean() - rcounts.mean()) < 0.2, (counts.mean(), rcounts.mean())
    assert abs(hist[budget] - rhist[budget]) < 0.05, (hist[budget], rhist[budget])
    assert 0.5 * np.abs(hist - rhist).sum() < 0.07, (hist, rhist)  # total variation distance
    assert np.abs(cells - rcells).max() < 0.07  # where blocks land


@needs_dali
@pytest.mark.parametrize("native", [True, False], ids=["native", "python_fallback"])
def test_mask_statistics_match_masking_generator(native):
    from beit.data import dali_masks, load_dali_plugin

    if native:
        assert load_dali_plugin(), "the native mask operator did not build or load"
    n = 3000
    gen = MaskingGenerator(14, 75, rng=123)
    ref = np.stack([gen() for _ in range(n)])
    masks = dali_masks(n, seed=7, native=native, batch_size=250)
    assert masks.shape == (n, 14, 14) and masks.dtype == bool
    _assert_same_mask_distribution(masks, ref, 75)
    # A small grid where the budget is often missed: the statistics must still agree.
    cfg = dict(input_size=(5, 7), num_masking_patches=14, min_num_patches=3, min_aspect=0.5)
    gen = MaskingGenerator(**cfg, rng=5)
    _assert_same_mask_distribution(dali_masks(n, seed=3, native=native, batch_size=250, **cfg),
                                   np.stack([gen() for _ in range(n)]), 14)  # fmt: skip


@needs_dali
def test_native_masks_are_seeded():
    from beit.data import dali_masks, load_dali_plugin

    assert load_dali_plugin()
    a, b, c = (dali_masks(64, seed=s, batch_size=32) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len({m.tobytes() for m in a}) > 60  # samples within a batch and across batches differ


@needs_dali
def test_plugin_builds_from_clean_state_and_loads(tmp_path):
    lib = build_dali_plugin(tmp_path / "plugin", force=True)
    assert lib.exists() and lib.parent == tmp_path / "plugin"
    # A fresh process: an operator can be registered only once per process.
    code = (
        "from nvidia.dali import plugin_manager, fn; "
        f"plugin_manager.load_library({str(lib)!r}); "
        "assert hasattr(fn, 'beit_mask_generator') and hasattr(fn, 'beit_color_normalize'); print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@needs_dali
@pytest.mark.parametrize(
    "env, warned",
    [({"BEIT_DALI_PLUGIN": "/nonexistent/libbeit_dali_ops.so"}, 1), ({"BEIT_NO_DALI_PLUGIN": "1"}, 0)],
    ids=["unloadable", "opted_out"],
)
def test_fallback_when_plugin_unavailable(data_dir, env, warned):
    """Where the plugin cannot be loaded, one one-line warning and the Python masks; an explicit opt-out is
    silent."""
    code = (
        "import warnings, torch\n"
        "from beit.data import build_loader\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    loader = build_loader({str(data_dir)!r}, 4, device='cpu', num_threads=1, image_size=32,"
        " tokenizer_size=16, masking=dict(input_size=4, num_masking_patches=6, min_num_patches=2))\n"
        "b = next(iter(loader))\n"
        "msgs = [str(x.message) for x in w if 'DALI plugin' in str(x.message)]\n"
        f"assert len(msgs) == {warned} and all('\\n' not in m for m in msgs), msgs\n"
        "assert b['bool_masked_pos'].shape == (4, 16) and (b['bool_masked_pos'].sum(1) <= 6).all()\n"
        "print('ok', loader.native_masks, loader.fused_color)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )
    assert res.returncode == 0 and "ok False False" in res.stdout, res.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def messy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    make_synthetic(root, 6, classes=2, seed=2, size=(80, 60), gray_fraction=0, png_fraction=0)
    rgb = Image.open(next((root / "class_001").glob("*.jpg"))).convert("RGB")  # red-cyan: colourful
    odd = root / "class_001"
    rgb.convert("L").save(odd / "gray.jpg")
    rgb.convert("CMYK").save(odd / "cmyk.jpg")
    rgb.save(odd / "plain.png")
    rgb.convert("RGBA").save(odd / "alpha.png")
    rgb.convert("P").save(odd / "palette.png")
    (odd / "truncated.jpg").write_bytes((root / "class_000" / "img_000000.jpg").read_bytes()[:600])
    (odd / "notes.jpg").write_text("not an image")
    (odd / "empty.jpg").write_bytes(b"")
    rgb.save(odd / "anim.gif")
    return root


BAD = ("truncated.jpg", "notes.jpg", "empty.jpg", "anim.gif")
ODD = ("gray.jpg", "cmyk.jpg", "plain.png", "alpha.png", "palette.png")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_skipped_with_warning_naming_them(messy_dir, backend):
    with pytest.warns(UserWarning, match="skipping 4 of 15 files") as rec:
        loader = build_loader(messy_dir, 4, backend=backend, on_bad_file="skip", **SMALL)
    msg = str(rec[0].message)
    assert all(name in msg for name in BAD)
    assert sorted(os.path.basename(f) for f, _ in loader.bad_files) == sorted(BAD)
    names = {os.path.basename(f) for f in loader.files}
    assert set(ODD) <= names and not set(BAD) & names
    batches = _batches(loader)
    for b in batches:
        _check_batch(b, 4, "float32")
    assert sorted(torch.cat([b["index"][b["valid"]] for b in batches]).tolist()) == list(range(11))


def test_gray_and_cmyk_become_rgb(messy_dir):
    for backend in ["reference"] + (["dali"] if dali_available() else []):
        with pytest.warns(UserWarning):
            loader = build_loader(messy_dir, 1, backend=backend, shuffle=False, output_dtype="uint8", **SMALL)
        by_name = {os.path.basename(f): i for i, f in enumerate(loader.files)}
        for b in loader:
            name = os.path.basename(loader.files[int(b["index"][0])])
            img = b["images"][0].int()  # [64, 64, 3]
            assert img.shape == (64, 64, 3)
            if name == "gray.jpg":  # saturation jitter keeps grey grey
                assert (img.max(-1).values - img.min(-1).values).max() <= 2, backend
            if name == "cmyk.jpg":
                assert img.float().std() > 10, backend
        assert {"gray.jpg", "cmyk.jpg"} <= set(by_name)


def _png16(path, a: np.ndarray) -> None:
    """A 16-bit PNG of ``a`` ([H, W] or [H, W, C], C in 1-4), written by hand: PIL writes 16-bit grey only."""
    import struct
    import zlib

    a = a.reshape(*a.shape[:2], -1).astype(">u2")
    h, w, c = a.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    raw = b"".join(b"\0" + row.tobytes() for row in a)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def _dali_decode(path) -> np.ndarray:
    """DALI's CPU decode of one file as [H, W, 3] uint8."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        encoded, _ = fn.readers.file(files=[str(path)])
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    return np.array(p.run()[0].as_tensor())[0]


def test_16_bit_pngs_are_scaled_to_8_bits(tmp_path):
    """A full-range 16-bit grey gradient (PIL mode "I;16") and a 16-bit RGB PNG come out as 8-bit gradients
    (round(v / 257), as DALI decodes them), not as a white image; both loaders agree and neither is blank."""
    from beit.data import to_rgb

    ramp = np.linspace(0, 65535, 80 * 60).round().astype(np.uint16).reshape(60, 80)
    rgb = np.stack([ramp, ramp[::-1], 65535 - ramp], -1)
    (tmp_path / "c").mkdir()
    _png16(tmp_path / "c" / "gray16.png", ramp)
    _png16(tmp_path / "c" / "rgb16.png", rgb)
    expected = {"gray16.png": np.repeat(ramp[..., None], 3, -1), "rgb16.png": rgb}
    for name, tol in (("gray16.png", 0), ("rgb16.png", 1)):
        with Image.open(tmp_path / "c" / name) as im:
            mine = np.asarray(to_rgb(im)).astype(int)
        want = np.round(expected[name] / 257).astype(int)
        assert mine.shape == (60, 80, 3) and np.abs(mine - want).max() <= tol, name
        if dali_available():
            assert np.abs(_dali_decode(tmp_path / "c" / name).astype(int) - mine).max() <= tol, name
    for backend in ["reference"] + (["dali"] if dali_available() else []):
        loader = build_loader(tmp_path, 2, backend=backend, output_dtype="uint8", shuffle=False, **SMALL)
        (b,) = _batches(loader)
        for img in b["images"]:
            assert img.float().std() > 10, backend


def test_check_image_reads_a_path_or_the_same_bytes_alike(messy_dir, tmp_path):
    """One check for image files and tar members: a file's reason and its bytes' reason are the same, but for
    the words an empty file and an unparsable header get (bytes have no file system to fail)."""
    big = tmp_path / "big.png"
    Image.new("L", (300, 200), 128).save(big)
    paths = sorted(p for p in messy_dir.rglob("*") if p.is_file()) + [big]
    reasons = {}
    for p in paths:
        by_path, by_bytes = check_image(p, 250 * 200), check_image(p.read_bytes(), 250 * 200)
        assert by_path == {"empty image": "empty file"}.get(by_bytes, by_bytes), p.name
        reasons[p.name] = by_path
    assert {n for n, r in reasons.items() if r is not None} == {*BAD, "big.png"}
    assert reasons["truncated.jpg"].startswith("truncated JPEG") and reasons["anim.gif"].startswith("unsupported")
    assert reasons["big.png"].startswith("too large: 300x200")
    assert check_image(b"\xff\xd8\xff" + b"junk" * 10 + b"\xff\xd9").startswith("bad image header")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixel_limit_sets_large_images_aside(tmp_path, backend):
    """An image over ``max_pixels`` is a bad file, found from its header: "skip" warns naming it, "error" raises
    naming it. A header claiming 20000 x 20000 pixels (PIL's decompression-bomb error) is refused the same way."""
    import struct
    import zlib

    make_synthetic(tmp_path, 4, classes=1, seed=6, size=(80, 60), gray_fraction=0, png_fraction=0)
    Image.new("L", (300, 200), 128).save(tmp_path / "class_000" / "big.png")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    (tmp_path / "class_000" / "bomb.png").write_bytes(bomb)
    with pytest.warns(UserWarning, match="skipping 2 of 6 files") as rec:
        loader = build_loader(tmp_path, 2, backend=backend, max_pixels=250 * 200, **SMALL)
    msg = str(rec[0].message)
    assert "big.png: too large: 300x200" in msg and "bomb.png: too large" in msg
    assert sorted(os.path.basename(f) for f, _ in loader.bad_files) == ["big.png", "bomb.png"]
    assert len(_batches(loader)) == 2
    with pytest.warns(UserWarning, match="skipping 1 of 6 files"):
        build_loader(tmp_path, 2, backend=backend, **SMALL)  # the default limit takes the 300x200 image
    with pytest.raises(BadImageError, match=r"big.png: too large: 300x200 = 60000 pixels, over max_pixels=50000"):
        build_loader(tmp_path, 2, backend=backend, max_pixels=250 * 200, on_bad_file="error", **SMALL)
    with pytest.raises(ValueError, match="max_pixels"):
        build_loader(tmp_path, 2, backend=backend, max_pixels=0, **SMALL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_file_error_names_it(messy_dir, backend):
    with pytest.raises(BadImageError, match=r"bad image file .*(truncated|notes|empty|anim)"):
        build_loader(messy_dir, 4, backend=backend, on_bad_file="error", **SMALL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_decode_failure_is_named(tmp_path, backend):
    """With validation off, a truncated file is found when it is decoded: "error" names it, "skip" warns and
    keeps the step count."""
    make_synthetic(tmp_path, 8, classes=1, seed=4, size=(80, 60), gray_fraction=0, png_fraction=0)
    victim = tmp_path / "class_000" / "img_000003.jpg"
    victim.write_bytes(victim.read_bytes()[:700])
    loader = build_loader(tmp_path, 4, backend=backend, validate=False, on_bad_file="error", **SMALL)
    with pytest.raises(BadImageError, match="img_000003.jpg") as err:
        _batches(loader)
    # One line naming the file and the cause, raised in the main process: no worker traceback in the message.
    msg = str(err.value)
    del err  # its traceback would keep the pipeline (DALI's threads) alive while the next loader forks workers
    assert "\n" not in msg and "Traceback" not in msg and msg.startswith("decoding failed: "), msg
    assert "img_000003.jpg: " in msg
    # The error stopped the reference loader's worker processes (its traceback still holds their iterator).
    assert multiprocessing.active_children() == []
    loader = build_loader(tmp_path, 4, backend=backend, validate=False, on_bad_file="skip", **SMALL)
    with pytest.warns(UserWarning, match="img_000003.jpg"):
        batches = _batches(loader)
    assert len(batches) == 2
    seen = torch.cat([b["index"][b["valid"]] for b in batches]).tolist()
    assert 3 not in seen and sorted(seen) == [0, 1, 2, 4, 5, 6, 7]
    assert [os.path.basename(f) for f, _ in loader.bad_files] == ["img_000003.jpg"]
    # Later epochs leave the file out up front: no second failure, no second warning.
    loader.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = _batches(loader)
    seen = torch.cat([b["index"][b["valid"]] for b in batches]).tolist()
    assert len(batches) == 2 and sorted(seen) == [0, 1, 2, 4, 5, 6, 7]


def test_empty_missing_and_all_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_loader(tmp_path / "nowhere", 4, backend="reference", device="cpu")
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no files"):
        build_loader(tmp_path / "empty", 4, backend="reference", device="cpu")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_text("text")
    with pytest.warns(UserWarning, match="a.jpg"), pytest.raises(ValueError, match="no decodable images"):
        build_loader(junk, 4, backend="reference", device="cpu")
    (tmp_path / "list.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="names no files"):
        build_loader(tmp_path / "list.txt", 4, backend="reference", device="cpu")


def test_bad_arguments_fail_before_work(data_dir):
    for kw, match in [
        (dict(output_dtype="int8"), "output_dtype"),
        (dict(normalization="caffe"), "normalization"),
        (dict(on_bad_file="ignore"), "on_bad_file"),
        (dict(shard_id=3, num_shards=2), "shard_id"),
        (dict(masking=dict(num_masking_patches=99, input_size=4)), "num_masking_patches"),
        (dict(masking=dict(ratio=2)), "unknown masking"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_loader(data_dir, 4, backend="reference", device="cpu", **kw)
    with pytest.raises(ValueError, match="device"):
        build_loader(data_dir, 4, device="tpu")


def test_sources_flat_folder_and_file_list(tmp_path, data_dir):
    files = list_images(data_dir)
    assert len(files) == 22 and files == sorted(files)
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in files[:5]:
        (flat / os.path.basename(f)).write_bytes(open(f, "rb").read())
    assert len(list_images(flat)) == 5
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\n" + "\n".join(os.path.relpath(f, tmp_path) for f in files[:3]) + "\n")
    assert [os.path.realpath(p) for p in list_images(lst)] == [os.path.realpath(f) for f in files[:3]]
    loader = build_loader(lst, 2, backend="reference", **SMALL)
    assert len(loader) == 2 and len(_batches(loader)) == 2
    assert list_images(files[:4]) == files[:4]


def test_list_images_extension_filter(tmp_path, data_dir):
    """``extensions`` keeps the files of any source whose names end with one of them, case-insensitively; a source
    left with none is an error. Without it, folders keep their other files for validation to report."""
    files = list_images(data_dir)
    pngs = [f for f in files if f.endswith(".png")]
    assert pngs and list_images(data_dir, extensions=(".PNG",)) == pngs
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a.JPG").write_bytes(open(files[0], "rb").read())
    assert list_images(tmp_path) == [str(tmp_path / "a.JPG"), str(tmp_path / "notes.txt")]
    assert list_images(tmp_path, extensions=(".jpg", ".png")) == [str(tmp_path / "a.JPG")]
    assert list_images([*files[:2], "x.txt"], extensions=(".jpg", ".png")) == files[:2]
    with pytest.raises(ValueError, match=r"no files ending in \.gif"):
        list_images(tmp_path, extensions=(".gif",))


@pytest.mark.parametrize("backend", BACKENDS)
def test_symlinked_class_folders_are_followed_once(tmp_path, data_dir, backend):
    """Class folders that are symlinks to folders elsewhere are listed (sorted, as plain folders are); a link to
    an ancestor (a loop) or a second link to a folder already listed is skipped with a warning naming it."""
    store, root = tmp_path / "store", tmp_path / "data"
    root.mkdir()
    make_synthetic(store, 9, classes=3, seed=5, size=(80, 60), gray_fraction=0, png_fraction=0)
    for name in ("class_000", "class_001", "class_002"):
        (root / name).symlink_to(store / name, target_is_directory=True)
    expected = sorted(str(root / os.path.relpath(f, store)) for f in list_images(store))
    assert len(expected) == 9 and list_images(root) == expected
    (store / "class_001" / "loop").symlink_to(root, target_is_directory=True)  # an ancestor, through a link
    (root / "class_000_again").symlink_to(store / "class_000", target_is_directory=True)
    with pytest.warns(UserWarning, match="skipping 2 symlinked folders") as rec:
        assert list_images(root) == expected
    assert "loop" in str(rec[0].message) and "class_000_again" in str(rec[0].message)
    with pytest.warns(UserWarning, match="skipping 2 symlinked folders"):
        loader = build_loader(root, 4, backend=backend, **SMALL)
    assert loader.files == expected
    seen = torch.cat([b["index"][b["valid"]] for b in _batches(loader)]).tolist()
    assert sorted(seen) == list(range(9))


def test_imports_and_falls_back_without_dali(data_dir):
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'nvidia' or name.startswith('nvidia.'): raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import beit, beit.data\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    loader = beit.data.build_loader({str(data_dir)!r}, 4, device='cpu', num_threads=1, image_size=32,"
        " tokenizer_size=16)\n"
        "assert type(loader).__name__ == 'ReferenceLoader' and any('DALI' in str(x.message) for x in w)\n"
        "try:\n"
        f"    beit.data.build_loader({str(data_dir)!r}, 4, device='gpu')\n"
        "except ImportError as e:\n"
        "    assert 'pip install nvidia-dali' in str(e); print('ok')\n"
        # The fine-tuning loader resolves its backend the same way.
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    loader = beit.data.build_classification_loader({str(data_dir)!r}, 4, train=True, image_size=48,"
        " num_threads=1, rand_augment=None)\n"
        "assert type(loader).__name__ == 'PilClassificationLoader' and any('DALI' in str(x.message) for x in w)\n"
        "try:\n"
        f"    beit.data.build_classification_loader({str(data_dir)!r}, 4, train=True, device='gpu')\n"
        "except ImportError as e:\n"
        "    assert 'pip install nvidia-dali' in str(e); print('fine-tuning ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout and "fine-tuning ok" in res.stdout, res.stderr[-2000:]


def test_make_synthetic_cli(tmp_path, capsys):
    assert main([str(tmp_path / "syn"), "--num-images", "30", "--classes", "3", "--seed", "0"]) == 0
    files = list_images(tmp_path / "syn")
    assert len(files) == 30
    assert sorted(os.listdir(tmp_path / "syn")) == ["class_000", "class_001", "class_002"]
    exts = {os.path.splitext(f)[1] for f in files}
    assert exts == {".jpg", ".png"}
    modes = {Image.open(f).mode for f in files}
    assert modes == {"RGB", "L"}
    sizes = [Image.open(f).size for f in files]
    assert all(400 <= w <= 600 and 300 <= h <= 450 for w, h in sizes)
    # Varied content: the images differ in their mean colour.
    means = np.array([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).mean((0, 1)) for f in files[:10]])
    assert means.std(0).min() > 5
    assert "wrote 30 images" in capsys.readouterr().out


def test_shards_default_to_torch_distributed(data_dir, monkeypatch):
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    loader = build_loader(data_dir, 4, backend="reference", **SMALL)
    assert (loader.shard_id, loader.num_shards) == (2, 3) and len(loader) == 2
    expected = epoch_order(22, 4, epoch=0, seed=0, shard_id=2, num_shards=3)[0]
    assert torch.equal(torch.cat([b["index"] for b in _batches(loader)]), torch.from_numpy(expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_does_not_depend_on_thread_count(data_dir, backend):
    one = _batches(build_loader(data_dir, 8, backend=backend, **{**SMALL, "num_threads": 1}))
    two = _batches(build_loader(data_dir, 8, backend=backend, **SMALL))
    for a, b in zip(one, two):
        for k in a:
            assert torch.equal(a[k], b[k]), k


@needs_dali
@pytest.mark.gpu
@pytest.mark.parametrize("output_dtype", ["float32", "bfloat16", "uint8"])
def test_gpu_pipeline_matches_cpu_pipeline(data_dir, output_dtype):
    """device="gpu": nvJPEG decode and GPU operators. Same seeds, so the same files, crops, flips, factors and
    masks as the CPU pipeline; pixels agree up to decoder and resampling differences."""
    kw = {**SMALL, "output_dtype": output_dtype}
    gpu = _batches(build_loader(data_dir, 8, **{**kw, "device": "gpu"}))
    cpu = _batches(build_loader(data_dir, 8, **kw))
    assert len(gpu) == len(cpu) == 3
    for g, c in zip(gpu, cpu):
        assert all(v.is_cuda for v in g.values())
        g = {k: v.cpu() for k, v in g.items()}
        _check_batch(g, 8, output_dtype)
        for k in ("index", "valid", "bool_masked_pos", "mask_index"):
            assert torch.equal(g[k], c[k]), k
        unit = 1 if output_dtype == "uint8" else 1 / (255 * min(IMAGENET_STD))
        assert (g["images"].float() - c["images"].float()).abs().mean() < 3 * unit
        assert (g["tokenizer_images"] - c["tokenizer_images"]).abs().mean() < 3 * 0.8 / 255


@pytest.mark.parametrize("backend", BACKENDS)
def test_iter_from_resumes_mid_epoch_without_repeating_or_skipping(data_dir, backend):
    loader = build_loader(data_dir, 4, backend=backend, seed=3, **SMALL)
    loader.set_epoch(1)
    full = _batches(loader)
    tail = [{k: v.clone() for k, v in b.items()} for b in loader.iter_from(2)]
    assert len(tail) == len(full) - 2
    for a, b in zip(full[2:], tail):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["valid"], b["valid"])
        if backend == "reference":  # per-sample seeds: the very same batches
            for key in ("images", "tokenizer_images", "bool_masked_pos", "mask_index"):
                assert torch.equal(a[key], b[key]), key
    assert list(loader.iter_from(len(loader))) == []
    with pytest.raises(ValueError, match="outside"):
        loader.iter_from(len(loader) + 1)


def test_synthetic_classes_share_a_mean_colour_and_differ_in_colour_axis(tmp_path):
    """The linear probe's demo task: each class spreads its colours along its own axis through mid-grey, so the
    class mean colours coincide (within sampling noise) while the principal colour axis tells the classes apart."""
    from beit.data import class_colour_axes

    classes = 4
    make_synthetic(tmp_path, 48, classes=classes, seed=3, size=(64, 48), gray_fraction=0, png_fraction=1)
    axes = class_colour_axes(classes)
    means = []
    for c in range(classes):
        pix = np.concatenate([np.asarray(Image.open(f), dtype=np.float64).reshape(-1, 3)
                              for f in list_images(tmp_path / f"class_{c:03d}")])  # fmt: skip
        means.append(pix.mean(0))
        _, _, vt = np.linalg.svd(pix - pix.mean(0), full_matrices=False)
        cos = abs(vt[0] @ axes[c]) / np.linalg.norm(axes[c])
        assert cos > 0.9, (c, vt[0], axes[c])
    assert np.ptp(np.array(means), axis=0).max() < 40, means  # vs a spread of +-127 along each axis
    assert len({tuple(a) for a in axes}) == classes


@pytest.mark.parametrize("backend", BACKENDS)
def test_pin_memory_reaches_the_cpu_loaders(data_dir, backend):
    """Batches bound for a GPU are pinned (a pageable copy makes the host wait); the flag reaches both CPU loaders.
    Pinning itself needs CUDA: the GPU run of the trainer exercises it."""
    for pin in (False, True):
        assert build_loader(data_dir, 4, backend=backend, pin_memory=pin, **SMALL).pin_memory is pin


# ------------------------------------------------------------------------------- WebDataset shards for pretraining


def _add_member(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_shards(files, folder, per_shard, extra=None) -> str:
    """``files`` as samples of plain tar shards ``folder/train-NNN.tar``, ``per_shard`` each and in order, keyed by
    their position (``0007``), each with a ``cls`` member that is no integer (pretraining reads no label) and a
    ``json`` one; ``extra`` maps a shard number to more (name, bytes) members. Returns the shards' brace spec."""
    folder.mkdir(parents=True, exist_ok=True)
    num = -(-len(files) // per_shard)
    for s in range(num):
        with tarfile.open(folder / f"train-{s:03d}.tar", "w") as tf:
            for k in range(s * per_shard, min(len(files), (s + 1) * per_shard)):
                _add_member(tf, f"{k:04d}{os.path.splitext(files[k])[1]}", Path(files[k]).read_bytes())
                _add_member(tf, f"{k:04d}.cls", b"cat")
                _add_member(tf, f"{k:04d}.json", b"{}")
            for name, data in (extra or {}).get(s, []):
                _add_member(tf, name, data)
    return f"{folder}/train-{{000..{num - 1:03d}}}.tar"


@pytest.fixture(scope="module")
def data_shards(data_dir, tmp_path_factory):
    """data_dir's 22 images, in the order the folder lists them, as 3 shards of 8, 8 and 6 samples."""
    folder = tmp_path_factory.mktemp("shards")
    files = list_images(data_dir)
    return _write_shards(files, folder, 8), folder, files


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_shards", [1, 2])
def test_shards_give_the_batches_of_the_same_images_as_files(data_dir, data_shards, backend, num_shards):
    """The pretraining loaders read tar shards: samples named SHARD.tar:KEY that, holding the folder's images in
    the folder's order, give the folder's batches on every rank: the same order and sharding and, the same bytes
    decoded with the same seeds, the same pixels and masks."""
    spec, folder, files = data_shards
    for rank in range(num_shards):
        kw = dict(backend=backend, seed=3, shard_id=rank, num_shards=num_shards, **SMALL)
        by_file, by_tar = build_loader(data_dir, 4, **kw), build_loader(spec, 4, **kw)
        assert by_file.files == files and by_tar.bad_files == []
        assert by_tar.files == [f"{folder}/train-{k // 8:03d}.tar:{k:04d}" for k in range(22)]
        by_file.set_epoch(1)
        by_tar.set_epoch(1)
        a, b = _batches(by_file), _batches(by_tar)
        assert len(a) == len(b) == len(by_tar) == -(-22 // (4 * num_shards))
        for x, y in zip(a, b):
            _check_batch(y, 4, "float32")
            assert x.keys() == y.keys()
            for k in x:
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (backend, k)
        assert not torch.equal(a[0]["index"], torch.arange(4))  # shuffled: the order is not trivially equal


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_epoch_resumes_mid_epoch(data_shards, backend):
    spec = data_shards[0]
    loader = build_loader(spec, 4, backend=backend, seed=3, **SMALL)
    loader.set_epoch(1)
    full = _batches(loader)
    fresh = build_loader(spec, 4, backend=backend, seed=3, **SMALL)
    fresh.set_epoch(1)
    tail = [{k: v.clone() for k, v in b.items()} for b in fresh.iter_from(3)]
    assert len(tail) == len(full) - 3 == 3
    for a, b in zip(full[3:], tail):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["valid"], b["valid"])
        if backend == "reference":  # per-sample seeds: the very same batches
            for key in ("images", "tokenizer_images", "bool_masked_pos", "mask_index"):
                assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shard_samples_are_named_by_shard_and_key(tmp_path, data_dir, backend):
    """A sample without an image is set aside when the shards are indexed, named SHARD.tar:KEY: skipped with a
    warning, or an error. An image that fails only when decoded (validation off) is named the same way."""
    files = list_images(data_dir)[:7]
    lost = [("lost.cls", b"3"), ("lost.json", b"{}")]  # a label and no image
    spec = _write_shards(files, tmp_path / "a", 4, extra={1: lost})
    name = f"{tmp_path}/a/train-001.tar:lost"
    with pytest.warns(UserWarning, match=r"skipping 1 bad samples .*train-001\.tar:lost: no image"):
        loader = build_loader(spec, 4, backend=backend, **SMALL)
    assert loader.bad_files == [(name, "no image (jpg, jpeg, png, webp)")] and len(loader.files) == 7
    seen = torch.cat([b["index"][b["valid"]] for b in _batches(loader)]).tolist()
    assert sorted(seen) == list(range(7))
    with pytest.raises(BadImageError, match=rf"bad sample {re.escape(name)}: no image"):
        build_loader(spec, 4, backend=backend, on_bad_file="error", **SMALL)

    k = next(i for i, f in enumerate(files) if f.endswith(".jpg"))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(files[k]).read_bytes()[:700])
    spec = _write_shards([*files[:k], str(truncated), *files[k + 1 :]], tmp_path / "b", 4)
    name = f"{tmp_path}/b/train-{k // 4:03d}.tar:{k:04d}"
    with pytest.warns(UserWarning, match=rf"{re.escape(name)}: truncated JPEG"):
        build_loader(spec, 4, backend=backend, **SMALL)
    loader = build_loader(spec, 4, backend=backend, validate=False, on_bad_file="error", **SMALL)
    with pytest.raises(BadImageError, match=rf"decoding failed: {re.escape(name)}: ") as err:
        _batches(loader)
    del err  # its traceback would keep the pipeline (DALI's threads) alive while the next loader forks workers
    loader = build_loader(spec, 4, backend=backend, validate=False, **SMALL)
    with pytest.warns(UserWarning, match=rf"failed to decode: {re.escape(name)}"):
        batches = _batches(loader)
    seen = torch.cat([b["index"][b["valid"]] for b in batches]).tolist()
    assert len(batches) == 2 and sorted(seen) == [i for i in range(7) if i != k]
    assert [n for n, _ in loader.bad_files] == [name]


def test_pretraining_runs_on_shards_and_resumes_mid_epoch(tmp_path, capsys):
    """beit-pretrain --data 'train-{000..003}.tar' trains as on the folder of the same images (the same losses and
    weights), and a run interrupted mid-epoch resumes on the shards, refusing the folder: the checkpoint's record
    of the data holds the samples' SHARD.tar:KEY names."""
    from _testutil import assert_same, make_train_assets, tiny_run_args

    from beit.train import main as pretrain
    from beit.train_state import list_checkpoints, load_checkpoint

    data, tok = make_train_assets(tmp_path)
    spec = _write_shards(list_images(data), tmp_path / "shards", 10)  # 40 images: 4 shards
    steps = ("--precision", "fp32", "--steps", "10")
    on_files, on_tars, resumed = tmp_path / "files", tmp_path / "tars", tmp_path / "resumed"
    assert pretrain(tiny_run_args((data, tok), on_files, *steps)) == 0
    assert pretrain(tiny_run_args((spec, tok), on_tars, *steps)) == 0
    logs = [
        [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()] for run in (on_files, on_tars)
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 2
    a, b = (load_checkpoint(list_checkpoints(run)[-1]) for run in (on_files, on_tars))
    assert_same(a["model"], b["model"], "model")
    assert b["data"]["num_files"] == 40 and b["data"]["files_sha256"] != a["data"]["files_sha256"]
    # 40 images in batches of 6: 7 batches an epoch, so step 8 is batch 1 of epoch 1.
    assert pretrain(tiny_run_args((spec, tok), resumed, *steps, "--inject-sigint", "8")) == 130
    capsys.readouterr()
    assert pretrain(tiny_run_args((data, tok), resumed, *steps)) == 2
    assert "files_sha256" in capsys.readouterr().err
    assert pretrain(tiny_run_args((spec, tok), resumed, *steps)) == 0
    assert "resumed from" in capsys.readouterr().out
    c = load_checkpoint(list_checkpoints(resumed)[-1])
    assert c["step"] == 10
    assert_same(b["model"], c["model"], "model")


@pytest.mark.gpu
@needs_dali
def test_gpu_pipeline_reads_shards(data_dir, data_shards):
    """device="gpu" on tar shards: the external source's bytes go to the mixed decoder, and the batches are the
    folder's (the same samples, crops, flips and masks; pixels within decoder differences, if any)."""
    by_file = _batches(build_loader(data_dir, 8, **{**SMALL, "device": "gpu"}))
    by_tar = _batches(build_loader(data_shards[0], 8, **{**SMALL, "device": "gpu"}))
    assert len(by_file) == len(by_tar) == 3
    for x, y in zip(by_file, by_tar):
        assert all(v.is_cuda for v in y.values())
        _check_batch({k: v.cpu() for k, v in y.items()}, 8, "float32")
        for k in ("index", "valid", "bool_masked_pos", "mask_index"):
            assert torch.equal(x[k], y[k]), k
        for k in ("images", "tokenizer_images"):
            assert (x[k] - y[k]).abs().mean() < 1 / 255, k
