"""Attention with BEiT's learnable relative position bias: ours against the reference, SDPA and xformers.

Modes: ``fwd`` and ``fwd+bwd`` (gradients of q, k, v and the bias). Metrics: milliseconds (p50, p20, p80),
TFLOP/s (4*B*H*N*N*D forward, 2.5 times that for the backward) and the peak memory the op adds on top of its
inputs (MiB). All providers run in one process on one device, so their ratios are like for like.

    python bench/bench_attention.py --out results/attention.json        # GPU: BEiT-B and -L shapes, bf16 and fp16
    python bench/bench_attention.py --quick                             # CPU smoke run of the harness

Providers:
    ours       beit_kernels.attention, bias [H, N, N] with its gradient reduced over the batch in-kernel
    reference  the official math: explicit softmax over a materialised [B, H, N, N] score tensor
    sdpa       F.scaled_dot_product_attention(attn_mask=bias [1, H, N, N]); with a bias gradient CUDA picks the
               memory-efficient backend (flash and cuDNN refuse a bias that needs a gradient)
    xformers   xformers.ops.memory_efficient_attention with a tensor bias (only when xformers imports); it needs
               the bias at full [B, H, N, N] when it requires grad, so the [H, N, N] parameter is expanded
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

import beit_kernels  # noqa: E402
from beit_kernels import reference  # noqa: E402


def _reference_lowp(q, k, v, bias):
    # The official code path, in the inputs' dtype: q*scale @ k^T + bias, softmax, @ v.
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return (s + bias).softmax(-1).to(v.dtype) @ v


def _sdpa(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).unsqueeze(0))


def _xformers_fn():
    try:
        import xformers.ops as xops
    except Exception:
        return None

    def fn(q, k, v, bias):
        B, H, N, _ = q.shape
        # xformers takes [B, N, H, D]; a bias that needs a gradient must be [B, H, N, N] with aligned strides:
        # allocate the padded last dimension and slice it, as its documentation recommends.
        pad = (N + 7) // 8 * 8
        b = F.pad(bias.to(q.dtype), (0, pad - N))[..., :N].unsqueeze(0).expand(B, H, N, N)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=b)
        return out.transpose(1, 2)

    return fn


def _error_note(e: Exception) -> str:
    """One line: xformers says why each of its operators declined on the lines after the first, and its first line
    alone does not say why."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {' | '.join(lines)}"[:1200]


def providers(device: torch.device) -> dict:
    out = {"ours": lambda q, k, v, b: beit_kernels.attention(q, k, v, b), "reference": _reference_lowp, "sdpa": _sdpa}
    if device.type == "cuda":
        xf = _xformers_fn()
        if xf is not None:
            out["xformers"] = xf
    return out


def flops(B, H, N, D, mode):
    fwd = 4 * B * H * N * N * D
    return fwd if mode == "fwd" else fwd * 3.5


def bench_case(B, H, N, D, dtype, device, env, quick=False):
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    bias = (torch.randn(H, N, N, generator=g) * 0.5).to(device).requires_grad_()
    do = torch.randn(B, H, N, D, generator=g).to(device, dtype)
    shape = dict(B=B, H=H, N=N, D=D)
    # Correctness guard: a provider that disagrees with the fp32 reference is reported as an error row, not timed.
    # Its bound: four times the official path's error in the same dtype plus 1% of the output's scale, loose enough
    # for a peer's own rounding (SDPA rounds the bias to the inputs' dtype), tight enough for a wrong result.
    errs, failed = {}, {}
    provs = providers(device)
    with torch.no_grad():
        expect = reference.attention(q, k, v, bias).float()
        for name, fn in provs.items():
            try:
                errs[name] = (fn(q, k, v, bias).float() - expect).abs().max().item()
            except Exception as e:  # an unsupported shape or dtype for a peer: record why, keep going
                failed[name] = _error_note(e)
    tol = 4 * errs.get("reference", 0.0) + 1e-2 * expect.abs().max().item() + 1e-6
    for name, err in errs.items():
        if not err <= tol:  # NaN too
            failed[name] = f"max_abs_err {err:.3g} against the fp32 reference exceeds {tol:.3g}: not timed"
    for name, fn in provs.items():
        if name in failed:
            rows.append(harness.row("attention", name, "fwd", "error", "", None, shape=shape, dtype=dtype, env=env,
                                    note=failed[name]))  # fmt: skip
            continue
        err = errs[name]
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":

                def step(fn=fn):
                    with torch.no_grad():
                        fn(q, k, v, bias)
            else:

                def step(fn=fn):
                    fn(q, k, v, bias).backward(do)
                    q.grad = k.grad = v.grad = bias.grad = None

            ms = harness.time_fn(step, device=device, rep_ms=20 if quick else 200)
            tflops = [flops(B, H, N, D, mode) / (t * 1e-3) / 1e12 for t in ms]
            mem = harness.peak_memory_mb(step, device=device)
            common = dict(shape=shape, dtype=dtype, env=env, max_abs_err=err)
            rows.append(harness.row("attention", name, mode, "time", "ms", ms, **common))
            rows.append(harness.row("attention", name, mode, "throughput", "TFLOP/s", tflops, **common))
            if mem is not None:
                rows.append(harness.row("attention", name, mode, "peak_memory_added", "MiB", mem, **common))
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run, or a fast GPU check)")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--batches", default="256,128", help="256 first: the issue's shape")
    parser.add_argument("--heads", default="12,16", help="12 for BEiT-B, 16 for BEiT-L")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = harness.env_info(device)
    if args.quick or device.type == "cpu":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("bench_attention: on CPU set TRITON_INTERPRET=1 (the Triton interpreter)")
        cases = [(2, 2, 50, 32, torch.float32 if device.type == "cpu" else torch.bfloat16)]
    else:
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
        cases = [
            (B, H, 197, 64, dt)
            for dt in dtypes
            for H in (int(h) for h in args.heads.split(","))
            for B in (int(b) for b in args.batches.split(","))
        ]
    rows = []
    for B, H, N, D, dt in cases:
        rows += bench_case(B, H, N, D, dt, device, env, quick=args.quick or device.type == "cpu")
        if args.out:  # after each case, so a run cut short by a time limit keeps what it measured
            harness.write_rows(rows, args.out)
    shown = [dict(r, shape=f"B{r['shape']['B']} H{r['shape']['H']}") for r in rows if r["metric"] != "throughput"]
    print(f"# attention on {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_sha']}")
    print(harness.format_table(shown, ("shape", "dtype", "provider", "mode", "metric", "p50", "unit")))
    return rows


if __name__ == "__main__":
    main()
