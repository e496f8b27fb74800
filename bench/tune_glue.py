"""Tile sweep of the glue kernels at BEiT-B shapes: ``add_layer_norm`` and ``bias_gelu`` forward and backward, the
tokenizer's ``conv_epilogue`` and the MIM head's chunk size.

Each kernel takes one fixed choice from ``beit_kernels.tuning`` (entries ``layer_norm.fwd``, ``layer_norm.bwd``,
``bias_gelu.fwd``, ``bias_gelu.bwd``, ``conv_epilogue.epi``, ``conv_epilogue.epi_pool``,
``linear_cross_entropy.ce``); this script times the candidates they could hold, one launcher at a time, as
``tune_attention.py`` does for attention (``overrides`` says which entries each candidate sets):

    ln_fwd    add_layer_norm_fwd, (BLOCK_M, num_warps) candidates (BLOCK_D is the row, padded to a power of two)
    ln_bwd    add_layer_norm_bwd, (BLOCK_M, num_warps, programs per SM[, loop stages[, joint row sums]])
    gelu_fwd  bias_gelu_fwd, (BLOCK_M, BLOCK_D, num_warps)
    gelu_bwd  bias_gelu_bwd, (BLOCK_M, BLOCK_D, num_warps[, loop stages])
              (loop stages: ``tl.range(num_stages=...)`` on the backward's row-tile loop, ``loop_stages``,
              0 or absent None, a loop the compiler does not pipeline; joint row sums: ``joint_sums``)
    epi       conv_epilogue, a block's tail (two biases, residual, ReLU), (widest BLOCK_C, elements a program,
              num_warps), at the DALL-E encoder's first group: 256 channels at 112 px
    epi_pool  the same with the 2x2 max-pool that ends a group
    lce       linear_cross_entropy_fwd (the MIM head with its gradients), (rows per chunk,): bigger chunks make
              bigger cuBLAS products and fewer launches, and hold more logits

The inputs are the model's under bf16 autocast: an fp32 residual stream, a bf16 branch with layer scale and drop
path, bf16 fc1 output with an fp32 bias; bf16 maps with fp32 biases for the tokenizer. Each candidate's outputs
are checked against the default's before it is timed (a mismatch is an error row). Rows are the harness's long
format; the table prints the fastest first.

    python bench/tune_glue.py --out tune_glue.json          # GPU: B=256, N=197, D=768 (LayerNorm), 3072 (GELU)
    python bench/tune_glue.py --quick                       # CPU interpreter smoke run
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
import torch  # noqa: E402

import beit_kernels  # noqa: E402
from beit_kernels import tuning  # noqa: E402

CANDIDATES = {
    "ln_fwd": [(4, 8), (2, 4), (4, 4), (8, 8), (8, 16), (1, 4)],
    # Each list starts with the kernel's default (apply_tuning.py's baseline), the others around it.
    "ln_bwd": [(1, 4, 8, 2), (1, 4, 8, 3), (1, 4, 16, 2), (1, 4, 4, 2), (1, 8, 8, 2), (1, 2, 8, 2), (2, 8, 2, 3),
               (2, 8, 4, 2), (2, 4, 8, 2), (1, 4, 8, 0), (1, 4, 8, 2, 1), (1, 4, 8, 3, 1)],
    "gelu_fwd": [(8, 512, 8), (4, 1024, 8), (16, 256, 8), (8, 512, 4), (16, 512, 8), (4, 512, 4)],
    "gelu_bwd": [(16, 256, 8, 3), (8, 256, 4, 3), (16, 256, 8, 4), (8, 256, 4, 4), (16, 256, 8, 2), (16, 256, 8),
                 (8, 512, 8, 3), (32, 256, 8, 3), (16, 128, 4, 3)],
    "epi": [(128, 4096, 8), (64, 4096, 8), (256, 4096, 8), (128, 2048, 4), (128, 8192, 8), (256, 8192, 16)],
    "epi_pool": [(128, 4096, 8), (64, 4096, 8), (256, 4096, 8), (128, 2048, 4), (64, 2048, 4), (128, 8192, 8)],
    # Chunks within the head's memory cap (``linear_cross_entropy.ce``'s ``max_logits``).
    "lce": [(8192,), (4096,), (2048,)],
}
QUICK = {"ln_fwd": [(4, 4), (2, 4)], "ln_bwd": [(2, 4, 4), (1, 4, 8, 2), (2, 4, 4, 0, 1)], "gelu_fwd": [(4, 32, 4)],
         "gelu_bwd": [(4, 32, 4, 2)], "epi": [(16, 256, 4), (8, 128, 4)], "epi_pool": [(16, 256, 4)],
         "lce": [(8,), (32,)]}  # fmt: skip


def overrides(kind: str, cand) -> dict:
    """The ``tuning.override`` entries that install ``cand`` for the sweep mode ``kind``."""
    if kind == "ln_fwd":
        return {"layer_norm.fwd": dict(BLOCK_M=cand[0], num_warps=cand[1])}
    stages = cand[3] if len(cand) > 3 and cand[3] else None
    if kind == "ln_bwd":
        joint = len(cand) > 4 and bool(cand[4])
        return {"layer_norm.bwd": dict(BLOCK_M=cand[0], num_warps=cand[1], programs_per_sm=cand[2],
                                       loop_stages=stages, joint_sums=joint)}  # fmt: skip
    if kind == "gelu_bwd":
        return {"bias_gelu.bwd": dict(BLOCK_M=cand[0], BLOCK_D=cand[1], num_warps=cand[2], loop_stages=stages)}
    if kind.startswith("epi"):
        widest, elements, warps = cand
        return {f"conv_epilogue.{kind}": dict(max_channels=widest, elements=elements, num_warps=warps)}
    if kind == "lce":
        return {"linear_cross_entropy.ce": dict(chunk_rows=cand[0])}
    return {"bias_gelu.fwd": dict(BLOCK_M=cand[0], BLOCK_D=cand[1], num_warps=cand[2])}  # gelu_fwd


def main(argv: list[str] | None = None) -> list[dict]:
    kinds = "ln_fwd,ln_bwd,gelu_fwd,gelu_bwd,epi,epi_pool,lce"
    args = harness.sweep_parser(__doc__.splitlines()[0], kinds).parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, N, D, F = (3, 7, 24, 40) if args.quick else (256, 197, 768, 3072)
    act = torch.float32 if args.quick else torch.bfloat16  # the interpreter's bf16 is not what a GPU does
    candidates = QUICK if args.quick else CANDIDATES
    env = harness.env_info(device)

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, N, D, generator=g).to(device)  # the fp32 residual stream
    branch = torch.randn(B, N, D, generator=g).to(device=device, dtype=act)
    gamma = torch.full((D,), 0.1, device=device)
    w, b = torch.ones(D, device=device), torch.zeros(D, device=device)
    scale = ((torch.rand(B, generator=g) < 0.9).float() / 0.9).to(device)
    grad_h, grad_y = torch.randn(B, N, D, generator=g).to(device), torch.randn(B, N, D, generator=g).to(device, act)
    fc1 = torch.randn(B, N, F, generator=g).to(device=device, dtype=act)
    fc1_bias = (torch.randn(F, generator=g) * 0.02).to(device)
    grad_gelu = torch.randn(B, N, F, generator=g).to(device=device, dtype=act)
    # The tokenizer's first group: [B, C, S, S] channels_last maps in the compute dtype, fp32 biases.
    TB, TC, TS = (2, 24, 8) if args.quick else (256, 256, 112)
    cl = torch.channels_last
    conv_out = torch.randn(TB, TC, TS, TS, generator=g).to(device=device, dtype=act).contiguous(memory_format=cl)
    block_in = torch.randn(TB, TC, TS, TS, generator=g).to(device=device, dtype=act).contiguous(memory_format=cl)
    conv_bias, id_bias = (torch.randn(TC, generator=g).to(device) for _ in range(2))

    # The MIM head: B K masked rows of width D against the 8192-code vocabulary, bf16 under autocast.
    V, K = (64, 5) if args.quick else (8192, 75)
    head_x = torch.randn(B * K, D, generator=g).to(device=device, dtype=act)
    head_w = (torch.randn(V, D, generator=g) * 0.02).to(device=device, dtype=act)
    head_b = torch.zeros(V, device=device, dtype=act)
    head_t = torch.randint(0, V, (B * K,), generator=g).to(device)

    # The launchers, as the autograd functions call them: each direction alone.
    ops = torch.ops.beit_kernels

    def head():
        chunk = tuning.cross_entropy_chunk(B * K, V)
        return ops.linear_cross_entropy_fwd(head_x, head_w, head_b, head_t, -100, True, True, True, True, chunk)

    def epi(pool):
        return beit_kernels.conv_epilogue(conv_out, conv_bias, residual=block_in, residual_bias=id_bias, gain=1 / 64,
                                          pool=pool)  # fmt: skip

    def ln_fwd():
        return ops.add_layer_norm_fwd(x, branch, gamma, scale, w, b, 1e-6, act)

    h, _, mean, rstd = ln_fwd()

    def ln_bwd():
        return ops.add_layer_norm_bwd(grad_h, grad_y, h, branch, gamma, scale, w, mean, rstd, True, act, True, True)

    runs = {
        "ln_fwd": (ln_fwd, {"shape": dict(B=B, N=N, D=D)}),
        "ln_bwd": (ln_bwd, {"shape": dict(B=B, N=N, D=D)}),
        "gelu_fwd": (lambda: ops.bias_gelu_fwd(fc1, fc1_bias), {"shape": dict(B=B, N=N, D=F)}),
        "gelu_bwd": (lambda: ops.bias_gelu_bwd(grad_gelu, fc1, fc1_bias), {"shape": dict(B=B, N=N, D=F)}),
        "epi": (lambda: epi(False), {"shape": dict(B=TB, C=TC, H=TS, W=TS)}),
        "epi_pool": (lambda: epi(True), {"shape": dict(B=TB, C=TC, H=TS, W=TS)}),
        "lce": (head, {"shape": dict(M=B * K, D=D, V=V)}),
    }

    def outputs(out):
        return [t.float() for t in (out if isinstance(out, (tuple, list)) else (out,)) if t is not None]

    rows = []
    for kind in args.kinds.split(","):
        fn, meta = runs[kind]
        expected = outputs(fn())
        for cand in candidates[kind]:
            name = harness.candidate_name(kind, cand)
            # Orders of summation differ between tiles (the partial column sums): rounding-level tolerance.
            harness.sweep_candidate(
                rows, args.out, "glue_tune", name, kind, fn,
                lambda out, expected=expected: all(torch.allclose(a, e, rtol=2e-2, atol=2e-2)
                                                   for a, e in zip(outputs(out), expected, strict=True)),
                tuning.override(overrides(kind, cand)), device=device, rep_ms=args.rep_ms, quick=args.quick,
                shape=meta["shape"], dtype=act, env=env, candidate=list(cand))  # fmt: skip
    return harness.finish_sweep(rows, args.out)


if __name__ == "__main__":
    main()
