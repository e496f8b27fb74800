"""Tile sweep of the attention kernels at one shape: each candidate of an attention tile timed kernel by kernel.

``beit_kernels.attention`` uses one fixed tile table, ``beit_kernels.tuning`` (no autotuning: the dk/dv kernel
accumulates into its bias buffer, which repeated launches would corrupt, and a fixed table keeps results
reproducible). This script measures the candidates that table could hold, each installed with
``tuning.override``, so the table is chosen from timings rather than from register counts:

    fwd    the forward kernel alone, each (BLOCK_M, BLOCK_N, num_warps, num_stages) candidate
    dq     the whole backward (dq then dk/dv kernels, bias gradient on), the dq kernel's candidates, dk/dv default
    dkdv   the same with the dk/dv kernel's candidates, the dq kernel default; ``groups`` scales the number of
           batch groups (programs and partial bias buffers), the table's ``attention.dkdv_groups`` scale
    dkdv_allq  the same with the all-queries dk/dv kernel switched on (``attention.dkdv_all_queries``, the
           default on sm90), its (BLOCK_N, num_warps, num_stages) candidates (BLOCK_M is N's power of two), and
           group scales (on top of its default scale); ``dkdv`` switches it off
    fused  the whole backward in the fused kernel (``attention.bwd_fused``, off by default), its (BLOCK_N, num_warps,
           num_stages, DKDV_T) candidates and group scales; the other backward kinds switch it off. It competes with the
           dk/dv kinds for one winner (``apply_tuning.py``): each times the whole backward

Every row is checked against the default configuration's outputs first (a candidate that changes the result is
reported as an error row, not timed). Rows are the harness's long format; the table prints the fastest first.

    python bench/tune_attention.py --out tune_attention.json                  # GPU: B=256, H=12, N=197, D=64, bf16
    python bench/tune_attention.py --quick                                    # CPU interpreter smoke run
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
import torch  # noqa: E402

import beit_kernels  # noqa: E402,F401  (registers the torch.ops.beit_kernels launchers)
from beit_kernels import tuning  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages). The dq kernel's program owns BLOCK_M queries and loops over keys; the
# dk/dv kernel's owns BLOCK_N keys and loops over queries.
CANDIDATES = {
    "fwd": [(128, 32, 4, 3), (128, 64, 4, 3), (128, 16, 4, 3), (128, 32, 8, 3), (128, 32, 4, 4), (128, 32, 4, 2),
            (64, 32, 4, 3), (64, 64, 4, 2), (256, 32, 8, 3), (128, 128, 8, 2)],
    "dq": [(64, 32, 4, 2), (64, 64, 4, 2), (64, 16, 4, 2), (128, 32, 4, 2), (128, 32, 8, 2), (32, 32, 4, 2),
           (64, 32, 4, 3), (64, 32, 2, 2)],
    "dkdv": [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2),
             (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 1)],
    # BLOCK_M is set by the launcher (N's power of two); the 0 only fills the tuple.
    "dkdv_allq": [(0, 16, 8, 2), (0, 16, 8, 1), (0, 32, 8, 2), (0, 32, 16, 1), (0, 16, 4, 1), (0, 64, 16, 1)],
    # A fifth entry, DKDV_T: dk and dv as transposed products.
    "fused": [(0, 16, 8, 2, 0), (0, 16, 8, 2, 1), (0, 16, 8, 1, 0), (0, 16, 16, 1, 0), (0, 16, 16, 1, 1),
              (0, 32, 8, 1, 0)],
}
# Scales of the batch groups that the table's default picks, the first candidate's; the all-queries kernel's
# default is already 4x the fill (``attention.dkdv_allq_groups``), so its sweep also tries fewer.
GROUP_SCALES = {"dkdv": (1, 2, 4, 8), "dkdv_allq": (1, 0.25, 0.5, 2), "fused": (1, 2, 0.5)}
QUICK = {"fwd": [(16, 16, 4, 1), (32, 16, 4, 1)], "dq": [(16, 16, 4, 1)], "dkdv": [(16, 16, 4, 1)],
         "dkdv_allq": [(0, 16, 4, 1)], "fused": [(0, 16, 4, 1, 0), (0, 16, 4, 1, 1)]}


def _config(c):
    if len(c) == 5:  # the fused backward: no BLOCK_M here, and its DKDV_T switch
        return dict(BLOCK_N=c[1], num_warps=c[2], num_stages=c[3], DKDV_T=bool(c[4]))
    if c[0] == 0:  # the all-queries kernel: no BLOCK_M here
        return dict(BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])
    return dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])


def overrides(kind: str, cand, group_scale: float = 1) -> dict:
    """The ``tuning.override`` entries of a candidate: tile ``cand`` for ``kind``, the batch groups of the kernel
    that sums the bias gradient scaled by ``group_scale`` (over what is in force), and the backward kernel its
    kind times switched on (the other kinds leave that choice as it is)."""
    entries: dict = {f"attention.{kind}": _config(cand)}
    if group_scale != 1:
        groups = f"attention.{kind}_groups"
        entries[groups] = {"scale": tuning.get(groups)["scale"] * group_scale}
    all_queries = {"dkdv_allq": True, "dkdv": False}.get(kind)
    if all_queries is not None:
        entries["attention.dkdv_all_queries"] = all_queries
    fused = {"fused": True, "dkdv_allq": False, "dkdv": False, "dq": False}.get(kind)
    if fused is not None:
        entries["attention.bwd_fused"] = fused
    return entries


def main(argv: list[str] | None = None) -> list[dict]:
    p = harness.sweep_parser(__doc__.splitlines()[0], "fwd,dq,dkdv,dkdv_allq,fused")
    p.add_argument("--shape", default="256,12,197,64", help="B,H,N,D")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, H, N, D = (3, 2, 37, 16) if args.quick else (int(s) for s in args.shape.split(","))
    # fp16 in the interpreter unless another dtype is asked for (its bf16 dot is wrong, and fp32 takes neither the
    # half-precision tiles nor the all-queries or fused kernels).
    dtype = torch.float16 if args.quick and args.dtype == "bfloat16" else getattr(torch, args.dtype)
    candidates = QUICK if args.quick else CANDIDATES
    env = harness.env_info(device)
    shape = dict(B=B, H=H, N=N, D=D)
    scale = D**-0.5

    g = torch.Generator(device="cpu").manual_seed(0)
    # q, k, v as the model splits them from a packed [B, N, 3, H, D] qkv: strided, no copy.
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(device=device, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D] each
    bias = (torch.randn(H, N, N, generator=g) * 0.5).to(device)  # the shared relative position bias, fp32
    do = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
    # The launchers, as the autograd functions call them: the forward alone, the backward alone.
    fwd, bwd_op = torch.ops.beit_kernels.attention_fwd, torch.ops.beit_kernels.attention_bwd
    o_ref, lse_ref = fwd(q, k, v, bias, scale)
    grads_ref = bwd_op(do, q, k, v, bias, o_ref, lse_ref, scale, True)

    def close(a, b):
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)

    rows = []

    def record(kind, cand, gs, fn, check):
        name = harness.candidate_name(kind, cand, gs)
        harness.sweep_candidate(rows, args.out, "attention_tune", name, kind, fn, check,
                                tuning.override(overrides(kind, cand, gs)),
                                device=device, rep_ms=args.rep_ms, quick=args.quick, shape=shape, dtype=dtype, env=env,
                                config=_config(cand), group_scale=gs)  # fmt: skip

    kinds = args.kinds.split(",")
    if "fwd" in kinds:
        for cand in candidates["fwd"]:
            record("fwd", cand, 1, lambda: fwd(q, k, v, bias, scale),
                   lambda out: close(out[0], o_ref))  # fmt: skip

    def bwd():
        return bwd_op(do, q, k, v, bias, o_ref, lse_ref, scale, True)

    def bwd_close(out):
        return all(close(a, b) for a, b in zip(out, grads_ref, strict=True))

    if "dq" in kinds:
        for cand in candidates["dq"]:
            record("dq", cand, 1, bwd, bwd_close)

    def applies(kind):  # the kernel a kind switches on may not take this shape, dtype or GPU
        with tuning.override(overrides(kind, candidates[kind][0])):
            return tuning.attention_backward(N, D, dtype, device) == kind

    for kind in ("dkdv", "dkdv_allq", "fused"):
        if kind not in kinds:
            continue
        if not applies(kind):
            # Its rows would time the other backward under this kind's name, and could be installed as its winner.
            print(f"tune_attention: {kind} does not apply at {shape}, {dtype} on this device: skipped", flush=True)
            continue
        for cand in candidates[kind]:
            record(kind, cand, 1, bwd, bwd_close)
        for gs in GROUP_SCALES[kind][1:] if not args.quick else (2,):
            record(kind, candidates[kind][0], gs, bwd, bwd_close)

    return harness.finish_sweep(rows, args.out)


if __name__ == "__main__":
    main()
