"""Visual tokenizers: the DALL-E encoder against the official ``dall_e`` package, reading encoder.pkl without
running it, refusing bad files, the k-means tokenizer and its command line."""

import collections
import copy
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from beit.tokenizer import (
    DalleEncoder,
    KMeansTokenizer,
    MiniBatchKMeans,
    fit_kmeans_tokenizer,
    load_tokenizer,
    main,
    map_pixels,
    patchify,
    read_dalle_state_dict,
    unmap_pixels,
)

# The smallest config the official validators accept (n_hid >= 64, vocab >= 512): 2.6M parameters.
SMALL = dict(n_hid=64, vocab_size=512)


def mapped_images(b=3, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return map_pixels(torch.rand(b, 3, size, size, generator=g))


@pytest.fixture(scope="module")
def official():
    """A randomly initialised official encoder (weights drawn by dall_e itself)."""
    dall_e = pytest.importorskip("dall_e", reason="the dall-e package (dev extra, installed with --no-deps)")
    torch.manual_seed(123)
    return dall_e.encoder.Encoder(**SMALL).eval()


@pytest.fixture(scope="module")
def official_out(official):
    x = mapped_images(3, 32)
    with torch.no_grad():
        return x, official(x)


def ours_from(official_module):
    enc = DalleEncoder(**SMALL)
    enc.load_state_dict(official_module.state_dict(), strict=True)
    return enc


# ----------------------------------------------------------------------------------------------------------------
# The encoder


def test_map_pixels_matches_official():
    dall_e = pytest.importorskip("dall_e")
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(map_pixels(x), dall_e.utils.map_pixels(x), rtol=0, atol=0)
    torch.testing.assert_close(unmap_pixels(map_pixels(x)), x, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="float"):
        map_pixels(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("h,w", [(32, 32), (24, 40)])
def test_encoder_matches_official_fp32(official, h, w):
    ours = ours_from(official)
    x = map_pixels(torch.rand(3, 3, h, w, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        ref = official(x)
    logits = ours(x)
    assert logits.shape == (3, 512, h // 8, w // 8) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    ids = ours.get_codebook_indices(x)
    assert ids.shape == (3, (h // 8) * (w // 8)) and ids.dtype == torch.int64
    assert torch.equal(ids, ref.argmax(1).flatten(1))


def test_default_config_has_official_names_and_shapes():
    dall_e = pytest.importorskip("dall_e")
    meta = torch.device("meta")
    theirs = dall_e.encoder.Encoder(device=meta).state_dict()
    with meta:
        ours = DalleEncoder().state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "blocks.group_1.block_1.res_path.conv_1.w" in ours and "blocks.group_2.block_1.id_path.w" in ours
    assert sum(v.numel() for v in ours.values()) == 53_786_240  # 53.8M, as derived in the reference notes


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("fp32_logits", [True, False])
def test_low_precision_channels_last_close_to_fp32(official_out, official, precision, fp32_logits):
    x, ref = official_out
    ours = ours_from(official).configure(precision=precision, channels_last=True, fp32_logits=fp32_logits)
    assert ours.blocks.input.w.is_contiguous(memory_format=torch.channels_last)
    logits = ours(x)
    # Low-precision error relative to the logit scale; tokens may flip only where logits nearly tie.
    assert (logits - ref).abs().max() <= 0.05 * ref.abs().max()
    agree = (ours.get_codebook_indices(x) == ref.argmax(1).flatten(1)).float().mean()
    assert agree >= 0.9


def test_caller_autocast_does_not_change_precision(official_out, official):
    x, ref = official_out
    ours = ours_from(official)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ours(x)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_encoder_traces_as_one_graph(official_out, official):
    """Dynamo captures the whole forward (fullgraph: no graph breaks); the eager backend keeps this fast on CPU."""
    x, ref = official_out
    ours = ours_from(official).configure(compile={"backend": "eager", "fullgraph": True})
    assert torch.equal(ours.get_codebook_indices(x), ref.argmax(1).flatten(1))


@pytest.mark.gpu
def test_bf16_compiled_on_gpu_agrees(official):
    ours = ours_from(official).cuda()
    official = copy.deepcopy(official).cuda()
    x = mapped_images(4, 112).cuda()
    with torch.no_grad():
        ref = official(x).float()  # the official fp16 path
    ours.configure(precision="bf16", channels_last=True, compile=True)
    agree = (ours.get_codebook_indices(x) == ref.argmax(1).flatten(1)).float().mean()
    assert agree >= 0.9


def fused_pair(precision, fp32_logits=True, seed=5, device="cpu"):
    """Two copies of one random encoder, channels_last: the glue fused (conv_epilogue) and in PyTorch ops."""
    torch.manual_seed(seed)
    base = DalleEncoder(**SMALL).to(device)
    fused, plain = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(precision=precision, channels_last=True, fp32_logits=fp32_logits, check_range=False)
    return fused.configure(fused=True, **kw), plain.configure(fused=False, **kw)


@pytest.mark.parametrize("fp32_logits", [True, False])
def test_fused_glue_matches_pytorch_glue_fp32(fp32_logits):
    """fp32, Triton's interpreter on CPU: the same logits up to fp32 rounding, the same tokens."""
    fused, plain = fused_pair("fp32", fp32_logits)
    assert fused.uses_fused(torch.device("cpu")) and not plain.uses_fused(torch.device("cpu"))
    x = mapped_images(3, 40, seed=2)  # 40 px: odd 5x5 maps after the three pools
    got, ref = fused(x), plain(x)
    assert got.shape == ref.shape == (3, 512, 5, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.get_codebook_indices(x), plain.get_codebook_indices(x))


def test_fused_glue_traces_as_one_graph():
    """Dynamo captures the fused forward whole (conv_epilogue is a custom op that writes into its out arguments),
    masked positions included; the eager backend keeps this fast on CPU."""
    fused, plain = fused_pair("fp32")
    x = mapped_images(3, 32, seed=7)
    positions = positions_case(16)
    want, want_masked = plain.get_codebook_indices(x), plain.get_codebook_indices(x, positions=positions)
    fused.configure(compile={"backend": "eager", "fullgraph": True})
    assert torch.equal(fused.get_codebook_indices(x), want)
    assert torch.equal(fused.get_codebook_indices(x, positions=positions), want_masked)


def test_fused_glue_half_error_within_twice_pytorch():
    """fp16 autocast: the fused glue's error against the fp32 encoder at most twice that of PyTorch's fp16 glue.
    (bf16 is tested on the GPU: Triton's interpreter truncates fp32 to bf16 where GPUs round to nearest, and the
    bias accumulates over the blocks.)"""
    fused, plain = fused_pair("fp16")
    ref = copy.deepcopy(plain).configure(precision="fp32")
    x = mapped_images(3, 32, seed=3)
    r = ref(x).double()
    err_fused = (fused(x).double() - r).abs().max().item()
    err_plain = (plain(x).double() - r).abs().max().item()
    assert err_fused <= 2 * err_plain + 1e-4 * r.abs().max().item(), (err_fused, err_plain)


def test_load_tokenizer_passes_fused_on(tmp_path):
    from beit.tokenizer import load_tokenizer

    torch.manual_seed(0)
    path = tmp_path / "enc.pt"
    torch.save(DalleEncoder(**SMALL).state_dict(), path)
    assert load_tokenizer(f"dalle:{path}").fused == "auto"
    assert load_tokenizer(f"dalle:{path}", channels_last=True, fused=False).fused is False
    assert load_tokenizer(f"dalle:{path}", channels_last=True, fused=True).uses_fused(torch.device("cpu"))
    with pytest.raises(ValueError, match="needs channels_last"):
        load_tokenizer(f"dalle:{path}", fused=True)  # channels_last defaults to CUDA only


def test_padded_input_convolution():
    """pad_input_channels: the 7x7 input convolution on zero-padded channels equals the 3-channel one up to fp16
    rounding (half precision only; fp32 never pads), and bad values are refused."""
    fused, _ = fused_pair("fp16")
    x = mapped_images(3, 32, seed=8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.float16):
        plain = fused._input_conv(x)
        fused.configure(pad_input_channels=8)
        padded = fused._input_conv(x)
    assert padded.shape == plain.shape and padded.is_contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.conv2d(x.double(), fused.blocks.input.w.double(), padding=3)
    err = (padded.double() - ref).abs().max().item()
    assert err <= 2 * (plain.double() - ref).abs().max().item() + 1e-3, err
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="pad_input_channels"):
            fused.configure(pad_input_channels=bad)
    assert fused.pad_input_channels == 8


def test_fused_glue_settings():
    """Bad settings are refused before anything changes."""
    enc = DalleEncoder(**SMALL)
    assert enc.fused == "auto" and not enc.uses_fused(torch.device("cpu"))

    def state():
        return enc.fused, enc.channels_last, enc.precision, enc.blocks.input.w.is_contiguous()

    before = state()
    with pytest.raises(ValueError, match="needs channels_last"):
        enc.configure(fused=True)
    for bad in ("yes", 1, 0):
        with pytest.raises(ValueError, match="True, False or 'auto'"):
            enc.configure(channels_last=True, fused=bad)
    with pytest.raises(ValueError, match="precision"):
        enc.configure(channels_last=True, precision="fp8")
    assert state() == before
    enc.configure(channels_last=True, fused=True)
    before = state()
    with pytest.raises(ValueError, match="fused=False"):
        enc.configure(channels_last=False)
    assert state() == before and not enc.blocks.input.w.is_contiguous()  # still channels_last
    assert enc.configure(channels_last=False, fused="auto").fused == "auto"


@pytest.mark.gpu
def test_fused_glue_on_gpu_bf16_and_captured():
    """bf16 on the GPU: within twice PyTorch's error of the fp32 encoder, tokens agreeing, no host sync, and the
    fused forward captured in a CUDA graph gives the same tokens."""
    from _testutil import no_host_sync

    fused, plain = fused_pair("bf16", device="cuda")
    assert fused.uses_fused(torch.device("cuda"))
    ref = copy.deepcopy(plain).configure(precision="fp32")
    x = mapped_images(5, 112, seed=4).cuda()
    with torch.backends.cudnn.flags(allow_tf32=False):
        r = ref(x).double()
    got, base = fused(x).double(), plain(x).double()
    assert (got - r).abs().max() <= 2 * (base - r).abs().max() + 1e-4 * r.abs().max()
    ids = fused.get_codebook_indices(x)
    assert (ids == plain.get_codebook_indices(x)).float().mean() >= 0.99
    positions = torch.stack([torch.randperm(196, generator=torch.Generator().manual_seed(b))[:75].sort().values
                             for b in range(5)]).cuda()  # fmt: skip
    positions[1, 70:] = -1  # padding
    with no_host_sync():
        fused.get_codebook_indices(x)
        masked = fused.get_codebook_indices(x, positions=positions)
    picked = positions >= 0
    assert (masked == -1).sum() == 5 * 196 - picked.sum()
    # The output convolution on 370 rows instead of 5 x 196 positions: cuDNN may pick another algorithm.
    assert (masked.gather(1, positions.clamp(min=0)) == ids.gather(1, positions.clamp(min=0)))[
        picked
    ].float().mean() >= 0.99
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused.get_codebook_indices(x)
        captured_masked = fused.get_codebook_indices(x, positions=positions)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, ids) and torch.equal(captured_masked, masked)


def test_probs_and_input_checks(official):
    ours = ours_from(official)
    x = mapped_images(2, 16)
    probs = ours.get_codebook_probs(x)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="map_pixels"):
        ours.get_codebook_indices(torch.rand(2, 3, 16, 16) * 2 - 1)  # ImageNet-normalised-like input
    with pytest.raises(ValueError, match="map_pixels"):
        ours.get_codebook_indices(unmap_pixels(x))  # forgot map_pixels: values reach 0 and 1
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ours.get_codebook_indices(x[:, :1])
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.get_codebook_indices(x[..., :12])
    with pytest.raises(TypeError, match="float"):
        ours.get_codebook_indices((x * 255).to(torch.uint8))
    ours.check_range = False
    assert ours.get_codebook_indices(unmap_pixels(x)).shape == (2, 4)
    with pytest.raises(ValueError, match="images are on meta but the tokenizer is on cpu"):
        ours.get_codebook_indices(x.to("meta"))


# ----------------------------------------------------------------------------------------------------------------
# Reading encoder.pkl and state dicts


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_whole_pickled_module_loads_and_matches(official, official_out, tmp_path, monkeypatch, zip_format):
    # OpenAI's encoder.pkl is torch.save(Encoder); the legacy format is what torch < 1.6 wrote.
    monkeypatch.chdir(tmp_path)  # the legacy loader writes .patch files into the cwd when a class allows it
    path = tmp_path / "encoder.pkl"
    torch.save(official, path, _use_new_zipfile_serialization=zip_format)
    tok = load_tokenizer(f"dalle:{path}", precision="fp32")
    assert isinstance(tok, DalleEncoder) and tok.vocab_size == 512 and tok.input_size == 112
    assert tok.config == dict(n_hid=64, n_blk_per_group=2, input_channels=3, vocab_size=512)
    x, ref = official_out
    torch.testing.assert_close(tok(x), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(tok.get_codebook_indices(x), ref.argmax(1).flatten(1))
    assert sorted(os.listdir(tmp_path)) == ["encoder.pkl"]
    assert not any(p.requires_grad for p in tok.parameters())


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "wrapped"])
def test_state_dict_files_load(official, official_out, tmp_path, fmt):
    sd = official.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "enc.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "pt":
        path = tmp_path / "enc.pt"
        torch.save(sd, path)
    else:  # unilm's Dalle_VAE keeps the encoder as .encoder; checkpoints nest it under "state_dict"
        path = tmp_path / "vae.pth"
        torch.save({"state_dict": {f"encoder.{k}": v for k, v in sd.items()}}, path)
    x, ref = official_out
    tok = load_tokenizer(f"dalle:{path}", precision="fp32")
    assert torch.equal(tok.get_codebook_indices(x), ref.argmax(1).flatten(1))


class _RunsCode:
    """Unpickling this would call os.mkdir(marker): the restricted reader must refuse before calling anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _bad_files(tmp_path, official):
    """(file name, content writer, error type, message pattern)."""
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n"
    wget_log = (
        b"--2021-09-14 10:11:12--  https://conversationhub.blob.core.windows.net/beit-share-public/dall-e_vae/"
        b"encoder.pkl\nResolving conversationhub.blob.core.windows.net... 52.239.0.1\n"
        b"HTTP request sent, awaiting response... 409 Public access is not permitted\n"
    )
    marker = tmp_path / "pwned"
    sd = official.state_dict()
    return [
        ("encoder.pkl", html, ValueError, "HTML"),
        ("encoder.pkl", wget_log, ValueError, r"wget log.*wget -O"),
        ("encoder.pkl", b"", ValueError, "empty"),
        ("encoder.pkl", b"\x00garbage" * 20, ValueError, "not a torch pickle"),
        ("code.pkl", lambda p: torch.save({"x": _RunsCode(marker)}, p), ValueError, r"references posix\.mkdir"),
        (
            "linear.pkl",
            lambda p: torch.save(torch.nn.Linear(2, 2), p),
            ValueError,
            r"torch\.nn\.modules\.linear\.Linear",
        ),
        ("seq.pkl", lambda p: torch.save(official.blocks, p), ValueError, r"holds a pickled .*Sequential"),
        ("beit.pt", lambda p: torch.save({"blocks.0.attn.qkv.weight": torch.zeros(6, 2)}, p), ValueError, "BEiT"),
        (
            "shape.pt",
            lambda p: torch.save({**sd, "blocks.group_2.block_1.id_path.w": torch.zeros(3, 3, 1, 1)}, p),
            ValueError,
            r"wrong shape \(1\): blocks\.group_2\.block_1\.id_path\.w",
        ),
        (
            "missing.pt",
            lambda p: torch.save({k: v for k, v in sd.items() if "conv_3" not in k}, p),
            ValueError,
            r"missing \(16\)",
        ),
        (
            "nan.pt",
            lambda p: torch.save({**sd, "blocks.input.b": torch.full((64,), float("nan"))}, p),
            ValueError,
            "non-finite",
        ),
        ("tokens.safetensors", lambda p: _write_kmeans(p, 16), ValueError, "kmeans:PATH"),
        ("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}     ", ValueError, "not a valid safetensors"),
    ], marker


@pytest.mark.parametrize("case", range(13))
def test_bad_dalle_files_are_refused(official, tmp_path, case):
    cases, marker = _bad_files(tmp_path, official)
    assert len(cases) == 13
    name, content, exc, pattern = cases[case]
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        content(path)
    with pytest.raises(exc, match=pattern):
        load_tokenizer(f"dalle:{path}")
    assert not marker.exists()  # nothing named by the file ran


class _CallsAllowed:
    """Pickles as a call of an allowed callable with arguments no torch.save of a module writes."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


CRAFTED_CALLS = {
    # Raw pickles (the legacy torch format's first record) calling allowed callables with bad arguments.
    "ordereddict.pkl": b"\x80\x02ccollections\nOrderedDict\nK\x01K\x02K\x03\x87R.",
    "device.pkl": b"\x80\x02ctorch\ndevice\n]\x85R.",
    "rebuild.pkl": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nK\x01\x85R.",
    "set.pkl": b"\x80\x02c__builtin__\nset\nK\x01\x85R.",
    # The same inside torch.save's zip format.
    "zip_ordereddict.pkl": lambda p: torch.save({"x": _CallsAllowed(collections.OrderedDict, (1, 2, 3))}, p),
    "zip_frozenset.pkl": lambda p: torch.save(_CallsAllowed(frozenset, (1,)), p),
}


@pytest.mark.parametrize("name", sorted(CRAFTED_CALLS))
def test_allowed_callables_with_bad_arguments_are_refused_naming_the_file(tmp_path, name):
    path = tmp_path / name
    content = CRAFTED_CALLS[name]
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        content(path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a valid torch pickle of the DALL-E encoder"):
        load_tokenizer(f"dalle:{path}")


def test_truncated_and_missing_files(official, tmp_path):
    path = tmp_path / "encoder.pkl"
    torch.save(official, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(ValueError, match="truncated"):
        load_tokenizer(f"dalle:{path}")
    with pytest.raises(FileNotFoundError, match=r"does not exist; expected DALL-E encoder weights"):
        load_tokenizer(f"dalle:{tmp_path / 'nope.pkl'}")
    with pytest.raises(FileNotFoundError, match="k-means tokenizer file"):
        load_tokenizer(f"kmeans:{tmp_path / 'nope.safetensors'}")


def test_decoder_pickle_is_named(tmp_path):
    dall_e = pytest.importorskip("dall_e")
    path = tmp_path / "decoder.pkl"
    torch.save(dall_e.decoder.Decoder(n_init=8, n_hid=64, vocab_size=512), path)
    with pytest.raises(ValueError, match=r"DALL-E decoder \(decoder\.pkl\).*encoder\.pkl"):
        read_dalle_state_dict(path)


def test_bad_specs():
    for spec, pattern in [
        ("encoder.pkl", "dalle:PATH"),
        ("vqgan:x.ckpt", "unknown tokenizer kind"),
        ("dalle:", "no path"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            load_tokenizer(spec)


# ----------------------------------------------------------------------------------------------------------------
# k-means


def _write_kmeans(path, vocab, **meta_overrides):
    tok = KMeansTokenizer(torch.rand(vocab, 192) * 0.8 + 0.1)
    tok.save(path)
    if meta_overrides:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta, cb = f.metadata(), f.get_tensor("codebook")
        meta.update({k: str(v) for k, v in meta_overrides.items() if k != "codebook"})
        save_file({"codebook": meta_overrides.get("codebook", cb)}, str(path), metadata=meta)


def _clustered_patches(n, k=12, dim=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(k, dim, generator=g) * 0.8 + 0.1
    which = torch.randint(k, (n,), generator=g)
    return centers[which] + 0.02 * torch.randn(n, dim, generator=g)


def _fit(seed, data, vocab=16, batch=256):
    km = MiniBatchKMeans(vocab, data.shape[1], seed=seed)
    km.init_from(data[:600])
    before = km.quantization_error(data)
    for step, start in enumerate(range(0, data.shape[0], batch)):
        km.partial_fit(data[start : start + batch], reassign=step % 3 == 2)
    return km, before


def test_kmeans_lowers_error_and_is_seeded():
    data = _clustered_patches(3000)
    km, before = _fit(0, data)
    after = km.quantization_error(data)
    assert after < 0.5 * before
    again, _ = _fit(0, data)
    assert torch.equal(km.centroids, again.centroids)
    other, _ = _fit(1, data)
    assert not torch.equal(km.centroids, other.centroids)


def test_kmeans_refuses_too_few_distinct_patches():
    km = MiniBatchKMeans(16, 192, seed=0)
    with pytest.raises(ValueError, match="only 3 distinct patches"):
        km.init_from(torch.rand(3, 192).repeat(10, 1))


@pytest.mark.parametrize("h,w", [(112, 112), (24, 40)])
def test_kmeans_indices_are_nearest_centroids(h, w):
    tok = KMeansTokenizer(torch.rand(37, 192) * 0.8 + 0.1)
    tok.chunk_rows = 50  # exercise the chunked path
    x = map_pixels(torch.rand(3, 3, h, w, generator=torch.Generator().manual_seed(2)))
    ids = tok.get_codebook_indices(x)
    assert ids.shape == (3, (h // 8) * (w // 8)) and ids.dtype == torch.int64
    brute = torch.cdist(
        patchify(x, 8), tok.codebook[None].expand(3, -1, -1), compute_mode="donot_use_mm_for_euclid_dist"
    ).argmin(-1)
    assert torch.equal(ids, brute)
    tok.check_range = False
    with pytest.raises(ValueError, match="images are on meta"):
        tok.get_codebook_indices(x.to("meta"))


def positions_case(n=16):
    """Padded positions [3, 5] of an n-token grid: an unpadded row, a padded row whose padding must not overwrite
    its position 0, and a row of padding only."""
    return torch.tensor([[0, 3, 4, 9, n - 1], [0, 2, 7, -1, -1], [-1, -1, -1, -1, -1]])


def check_positions_result(got, full, positions):
    assert got.shape == full.shape and got.dtype == torch.int64
    for b in range(full.shape[0]):
        keep = positions[b][positions[b] >= 0]
        want = torch.full_like(full[b], -1)
        want[keep] = full[b, keep]
        assert torch.equal(got[b], want), (b, got[b], want)


@pytest.mark.parametrize("fused", [False, True])
def test_dalle_positions_compute_only_the_masked_tokens(fused):
    torch.manual_seed(6)
    enc = DalleEncoder(**SMALL).configure(channels_last=True, fused=fused, check_range=False)
    x = mapped_images(3, 32, seed=5)
    positions = positions_case(16)
    check_positions_result(enc.get_codebook_indices(x, positions=positions), enc.get_codebook_indices(x), positions)
    logits = enc._logits(x, positions)  # the output convolution ran on B K rows only
    assert logits.shape == (3 * 5, 512, 1, 1)


def test_kmeans_positions_and_bad_positions():
    tok = KMeansTokenizer(torch.rand(37, 192) * 0.8 + 0.1)
    x = map_pixels(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    positions = positions_case(16)
    check_positions_result(tok.get_codebook_indices(x, positions=positions), tok.get_codebook_indices(x), positions)
    enc = DalleEncoder(**SMALL)
    for t in (tok, enc):
        with pytest.raises(TypeError, match="int32 or int64"):
            t.get_codebook_indices(x, positions=positions.float())
        with pytest.raises(ValueError, match=r"\[3, K\]"):
            t.get_codebook_indices(x, positions=positions[:2])
        with pytest.raises(ValueError, match="lists 17 tokens"):
            t.get_codebook_indices(x, positions=torch.zeros(3, 17, dtype=torch.int64))
        with pytest.raises(ValueError, match="positions are on meta"):
            t.get_codebook_indices(x, positions=positions.to("meta"))
        for bad in (-2, 16):  # checked on the device: on CPU the assertion raises at once
            with pytest.raises(RuntimeError, match=r"-1 \(padding\) or token indices in \[0, 16\)"):
                t.get_codebook_indices(x, positions=torch.full((3, 2), bad))


def test_patchify_layout():
    x = torch.arange(2 * 3 * 16 * 24, dtype=torch.float32).reshape(2, 3, 16, 24)
    p = patchify(x, 8)
    assert p.shape == (2, 6, 192)
    # Token 4 is row 1, column 1 of the 2x3 grid; values are (channel, row, column) of that patch.
    assert torch.equal(p[1, 4].view(3, 8, 8), x[1, :, 8:16, 8:16])


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(vocab_size=17), r"codebook has shape \[16, 192\].*requires \[17, 192\]"),
        (dict(codebook=torch.rand(16, 100)), r"codebook has shape \[16, 100\]"),
        (dict(format="something-else"), "not a k-means tokenizer"),
        (dict(patch_size="eight"), "malformed metadata"),
    ],
)
def test_bad_kmeans_files_are_refused(tmp_path, overrides, pattern):
    path = tmp_path / "tok.safetensors"
    _write_kmeans(path, 16, **overrides)
    with pytest.raises(ValueError, match=pattern):
        load_tokenizer(f"kmeans:{path}")


def test_dalle_pickle_given_as_kmeans_is_named(official, tmp_path):
    path = tmp_path / "encoder.pkl"
    torch.save(official, path)
    with pytest.raises(ValueError, match=r"not a safetensors file.*dalle:PATH"):
        load_tokenizer(f"kmeans:{path}")
    (tmp_path / "page.safetensors").write_bytes(b"<html><body>Access denied</body></html>")
    with pytest.raises(ValueError, match="HTML.*k-means tokenizer file"):
        load_tokenizer(f"kmeans:{tmp_path / 'page.safetensors'}")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Ten small PNG and JPEG images of different sizes and modes in a two-level folder tree."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(10):
        h, w = (int(v) for v in rng.integers(40, 160, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), rng.integers(0, 255))], -1)
        img = (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
        sub = root / ("cls_a" if i % 2 else "cls_b") / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(img)
        if i == 4:
            im = im.convert("L")  # grey-scale files are read as RGB
        im.save(sub / (f"{i}.jpg" if i % 2 else f"{i}.png"))
    (root / "notes.txt").write_text("not an image")
    return root


def test_cli_fit_end_to_end(image_folder, tmp_path, capsys):
    out = tmp_path / "km.safetensors"
    argv = ["fit", "--data", str(image_folder), "--vocab-size", "32", "--out", str(out)]
    argv += ["--epochs", "2", "--batch-size", "4", "--workers", "0", "--no-progress", "--seed", "3"]
    assert main(argv) == 0
    assert f"kmeans:{out}" in capsys.readouterr().out
    tok = load_tokenizer(f"kmeans:{out}")
    assert isinstance(tok, KMeansTokenizer) and tok.vocab_size == 32 and tok.input_size == 112
    meta = tok.metadata
    assert meta["n_images"] == "10" and meta["seed"] == "3" and meta["format"] == "beit-kmeans-tokenizer"
    assert float(meta["quantization_error_last_epoch"]) < float(meta["quantization_error_first_batch"])
    ids = tok.get_codebook_indices(mapped_images(3, 112))
    assert ids.shape == (3, 196) and 0 <= ids.min() and ids.max() < 32

    # Same seed, loader workers or not: the same codebook (crops depend on seed, epoch and image only).
    again = fit_kmeans_tokenizer(image_folder, 32, seed=3, epochs=2, batch_size=4, workers=2, progress=False)
    assert torch.equal(again.codebook, tok.codebook)
    assert main(["info", f"kmeans:{out}"]) == 0
    assert "vocab_size" in capsys.readouterr().out


def test_cli_errors_before_work(image_folder, tmp_path, capsys):
    out = tmp_path / "km.safetensors"
    cases = [
        (["--data", str(tmp_path / "none"), "--vocab-size", "8", "--out", str(out)], "is not a folder"),
        (["--data", str(image_folder), "--vocab-size", "5000", "--out", str(out)], "fewer than vocab_size=5000"),
        (
            ["--data", str(image_folder), "--vocab-size", "8", "--out", str(tmp_path / "km.pt")],
            "ending in .safetensors",
        ),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((["--data", str(empty), "--vocab-size", "8", "--out", str(out)], "no images"))
    # A negative count would slice off that many images from the end and fit on the rest.
    for n in ("-3", "0"):
        argv = ["--data", str(image_folder), "--vocab-size", "8", "--out", str(out), "--max-images", n]
        cases.append((argv, f"max_images must be at least 1 (or left out for every image), got {n}"))
    for argv, pattern in cases:
        assert main(["fit", *argv, "--no-progress", "--workers", "0"]) == 2
        assert pattern in capsys.readouterr().err
        assert not out.exists()


def test_max_images_fits_a_subset(image_folder):
    tok = fit_kmeans_tokenizer(image_folder, 8, seed=0, batch_size=4, workers=0, max_images=1, progress=False)
    assert tok.metadata["n_images"] == 1


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.jpg"):
        fit_kmeans_tokenizer(tmp_path, 4, seed=0, workers=0, progress=False)


@pytest.mark.parametrize("major,expected", [(7, "fp16"), (8, "bf16"), (9, "bf16")])
def test_dalle_auto_precision_follows_the_gpu(monkeypatch, major, expected):
    """bf16 where the GPU computes it; fp16 before sm80, as the official module on the paper's V100s; fp32 on CPU."""
    from beit.tokenizer.dalle import auto_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # as torch says on a V100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert auto_precision("cuda") == expected and auto_precision(torch.device("cuda", 0)) == expected
    assert auto_precision("cpu") == "fp32"
