"""pytest-benchmark suite for the fused ops: ``pytest tests/bench/test_bench_fused_ops.py --benchmark-json=OUT.json``.

On a GPU it runs BEiT-B shapes (B=256, 224 px, K=75, D=768, V=8192; 197 tokens of width 768 for add_layer_norm
and 3072 for bias_gelu) under bf16 autocast, forward+backward, for our kernels and the reference chains of
bench_fused_ops.py (torch.compile is left to that script); on CPU (Triton interpreter, fp32) tiny shapes, so the
suite itself cannot rot. Each benchmark's ``extra_info`` records the device, versions, commit and shape, as the
harness rows do.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "bench")))

import bench_fused_ops  # noqa: E402  (sets TRITON_INTERPRET without CUDA before triton is imported)
import harness  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    B, IMG, P, D, K, V, AUTOCAST = 256, 224, 16, 768, 75, 8192, torch.bfloat16
else:
    B, IMG, P, D, K, V, AUTOCAST = 2, 32, 16, 64, 2, 160, None
N = (IMG // P) ** 2

SETUPS = {
    "patch_embed": lambda: bench_fused_ops.setup_patch_embed(B, IMG, P, D, DEVICE, AUTOCAST, False, False),
    "patch_embed_uint8": lambda: bench_fused_ops.setup_patch_embed(B, IMG, P, D, DEVICE, AUTOCAST, False, True),
    "masked_gather": lambda: bench_fused_ops.setup_masked_gather(B, N, K, D, DEVICE, AUTOCAST, False),
    "linear_cross_entropy": lambda: bench_fused_ops.setup_linear_cross_entropy(B * K, D, V, DEVICE, AUTOCAST, False),
    "add_layer_norm": lambda: bench_fused_ops.setup_add_layer_norm(B, N + 1, D, DEVICE, AUTOCAST, False),
    "bias_gelu": lambda: bench_fused_ops.setup_bias_gelu(B, N + 1, 4 * D, DEVICE, AUTOCAST, False),
}


@pytest.mark.parametrize("provider", ["ours", "reference"])
@pytest.mark.parametrize("op", sorted(SETUPS))
def test_fused_op_fwd_bwd(benchmark, op, provider):
    kernel, providers, leaves, grad_fn, shape, dtype = SETUPS[op]()
    fwd = providers[provider]

    def step():
        for t in leaves:
            t.grad = None  # each round writes its gradients rather than adding to them
        with torch.autocast(DEVICE.type, dtype=AUTOCAST, enabled=AUTOCAST is not None):
            out = fwd()
        grad_fn(out)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(harness.env_info(DEVICE), kernel=kernel, shape=shape, dtype=str(dtype))
    benchmark.pedantic(step, rounds=10 if DEVICE.type == "cuda" else 1, warmup_rounds=int(DEVICE.type == "cuda"))
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
