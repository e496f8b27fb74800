"""Tokenizer throughput: images per second of ``get_codebook_indices`` on the 112 px view, batch 256.

Providers (same random weights for every DALL-E variant: the official module draws them, ours copies them):
    official-fp16        dall_e.encoder.Encoder's own path: every conv but the last cast to fp16 on CUDA, fp32 last
                         (on the CPU it runs fp32); only when the dall-e package imports
    ours-bf16-cl-fused   DalleEncoder, bf16 autocast, channels_last, fp32 output conv, the glue fused by
                         beit_kernels.conv_epilogue (the default on CUDA)
    ours-bf16-cl-fused-masked  the same, tokens of the masked patches only (``positions``: 75 of 196 at 112 px,
                         the official blockwise masks), as beit-pretrain calls it
    ours-bf16-cl-fused-pad8    ours-bf16-cl-fused with the input convolution's 3 image channels zero-padded to 8
                         (``pad_input_channels=8``: NVIDIA's guide advises channel counts divisible by 8)
    ours-bf16-cl         the same with the glue in PyTorch ops (fused=False)
    ours-bf16-cl-bf16out the same with the output conv in bf16 too
    ours-fp32            DalleEncoder in fp32 (cuDNN's TF32 setting as torch leaves it, recorded in the rows)
    ours-bf16-cl-compile with --compile: ours-bf16-cl under torch.compile
    kmeans               KMeansTokenizer with a random codebook of the same vocabulary size
Rows: time (ms), throughput (img/s; its p20/p80 come from the p80/p20 times), peak memory (CUDA), token agreement
with official-fp16 and with ours-fp32 at the positions a provider computes (random weights on uniform-noise
images: a consistency check, not a quality measure), and the speed-up of each ours-* over official-fp16 (the
issue's target is 1.5x on an H100).

    python bench/bench_tokenizer.py --out bench/results/tokenizer.json            # GPU: 112 px, batch 256
    python bench/bench_tokenizer.py --quick                                       # CPU smoke run, tiny sizes
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU smoke runs: the fused glue in Triton's interpreter

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402

from beit.masking import MaskingGenerator, generate_masks  # noqa: E402
from beit.tokenizer import DalleEncoder, KMeansTokenizer, map_pixels  # noqa: E402
from beit_kernels.backend import native_bf16  # noqa: E402

KERNEL = "tokenizer"


def build_providers(args, device: torch.device, positions: torch.Tensor) -> dict:
    """name -> (callable(images) -> ids [B, N], dtype label, extra row fields)."""
    cfg = dict(n_hid=args.n_hid, vocab_size=args.vocab_size)
    providers = {}
    official = None
    try:
        import dall_e

        torch.manual_seed(0)
        official = dall_e.encoder.Encoder(**cfg, device=device).eval()
    except ImportError as e:
        print(f"official provider skipped: dall_e does not import ({e})", file=sys.stderr)

    def ours(**configure):
        enc = DalleEncoder(**cfg)
        if official is not None:
            enc.load_state_dict(official.state_dict())
        return enc.to(device).configure(check_range=False, **configure)

    if official is not None:

        @torch.no_grad()
        def run_official(x):
            return official(x).argmax(1).flatten(1)

        label = "fp16 (fp32 output conv)" if device.type == "cuda" else "fp32 (no fp16 path on cpu)"
        providers["official-fp16"] = (run_official, label, {})

    low = "bf16" if device.type == "cpu" or native_bf16(device) else "fp16"
    enc = ours(precision=low, channels_last=True, fp32_logits=True, fused=True)
    providers[f"ours-{low}-cl-fused"] = (enc.get_codebook_indices, f"{low} (fp32 output conv)", {})
    masked = functools.partial(enc.get_codebook_indices, positions=positions)
    enc_pad = ours(precision=low, channels_last=True, fp32_logits=True, fused=True, pad_input_channels=8)
    providers[f"ours-{low}-cl-fused-pad8"] = (enc_pad.get_codebook_indices, f"{low} (fp32 output conv)", {})
    providers[f"ours-{low}-cl-fused-masked"] = (masked, f"{low} (fp32 output conv)", {"positions": positions.shape[1]})
    enc = ours(precision=low, channels_last=True, fp32_logits=True, fused=False)
    providers[f"ours-{low}-cl"] = (enc.get_codebook_indices, f"{low} (fp32 output conv)", {})
    enc = ours(precision=low, channels_last=True, fp32_logits=False, fused=False)
    providers[f"ours-{low}-cl-{low}out"] = (enc.get_codebook_indices, low, {})
    enc = ours(precision="fp32")
    providers["ours-fp32"] = (enc.get_codebook_indices, "fp32", {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32})
    if args.compile:  # inductor's fusion of the PyTorch glue, against ours
        enc = ours(precision=low, channels_last=True, fp32_logits=True, fused=False, compile=True)
        providers[f"ours-{low}-cl-compile"] = (enc.get_codebook_indices, f"{low} (fp32 output conv)", {})
    g = torch.Generator().manual_seed(0)
    km = KMeansTokenizer(torch.rand(args.vocab_size, 192, generator=g) * 0.8 + 0.1).to(device)
    km.check_range = False
    providers["kmeans"] = (km.get_codebook_indices, "fp32", {})
    return providers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized smoke run: batch 2, 32 px, n_hid 64, 512 codes")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--n-hid", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile provider (minutes to compile)")
    parser.add_argument("--rep-ms", type=float, default=None, help="timing budget per provider")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.n_hid, args.vocab_size = 2, 32, 64, 512
    rep_ms = args.rep_ms if args.rep_ms is not None else (200 if args.quick else 1000)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the official pretraining script sets it
    env = harness.env_info(device)
    shape = dict(batch=args.batch, size=args.size, n_hid=args.n_hid, vocab=args.vocab_size)
    g = torch.Generator().manual_seed(1)
    x = map_pixels(torch.rand(args.batch, 3, args.size, args.size, generator=g)).to(device)
    grid = args.size // 8
    num_mask = max(1, round(75 / 196 * grid * grid))  # the official 75 of 196, scaled for other sizes
    _, positions = generate_masks(MaskingGenerator(grid, num_mask, min(16, num_mask), rng=0), args.batch, device=device)

    providers = build_providers(args, device, positions)
    rows, ids, throughput = [], {}, {}
    for name, (fn, dtype, extra) in providers.items():
        ids[name] = fn(x)  # also the warm-up on the CPU
        t50, t20, t80 = harness.time_fn(lambda fn=fn: fn(x), device=device, rep_ms=rep_ms, warmed=True,
                                        min_reps=harness.min_reps(args.quick))  # fmt: skip
        common = dict(shape=shape, dtype=dtype, env=env, cudnn_benchmark=torch.backends.cudnn.benchmark, **extra)
        rows.append(harness.row(KERNEL, name, "fwd", "time", "ms", (t50, t20, t80), **common))
        ips = tuple(args.batch / t * 1e3 for t in (t50, t80, t20))
        throughput[name] = ips[0]
        rows.append(harness.row(KERNEL, name, "fwd", "throughput", "img/s", ips, **common))
        mem = harness.peak_memory_mb(lambda fn=fn: fn(x), device)
        if mem is not None:
            rows.append(harness.row(KERNEL, name, "fwd", "peak_memory", "MiB", mem, **common))
        if args.out:  # after each provider, so a run cut short by a time limit keeps what it measured
            harness.write_rows(rows, args.out)

    for ref in ("official-fp16", "ours-fp32"):
        if ref not in ids:
            continue
        for name, t in ids.items():
            if name != ref and name != "kmeans":
                computed = t >= 0  # a masked-only provider leaves -1 elsewhere
                agree = (t == ids[ref])[computed].float().mean().item()
                rows.append(
                    harness.row(
                        KERNEL,
                        name,
                        "fwd",
                        f"agreement_with_{ref}",
                        "fraction",
                        agree,
                        shape=shape,
                        dtype=None,
                        env=env,
                    )
                )
    if "official-fp16" in throughput:
        for name in (n for n in throughput if n.startswith("ours-")):
            ratio = throughput[name] / throughput["official-fp16"]
            rows.append(
                harness.row(
                    KERNEL, name, "fwd", "speedup_vs_official-fp16", "x", ratio, shape=shape, dtype=None, env=env
                )
            )

    if args.out:
        harness.write_rows(rows, args.out)
        print(f"wrote {len(rows)} rows to {args.out}")
    print(f"device: {env['device']}  torch {env['torch']}  git {env['git_sha']}  shape {shape}")
    if device.type == "cpu":
        print("(CPU run: a smoke test of the script; its numbers say nothing about GPU speed)")
    print(harness.format_table(rows, ("provider", "metric", "dtype", "p50", "p20", "p80", "unit")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
