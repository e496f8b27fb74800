"""pytest-benchmark suite for attention: ``pytest tests/bench/test_bench_attention.py --benchmark-json=OUT.json``.

On a GPU it runs BEiT-B (H=12) at B=128 in bf16, forward+backward with the bias gradient, for every provider of
bench_attention.py; on CPU (Triton interpreter) a tiny shape, so the suite itself cannot rot. Each benchmark's
``extra_info`` records the device, versions, commit and shape, as the harness rows do.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "bench")))

import bench_attention  # noqa: E402
import harness  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    B, H, N, D, DTYPE = 128, 12, 197, 64, torch.bfloat16
else:
    B, H, N, D, DTYPE = 2, 2, 50, 32, torch.float32


@pytest.mark.parametrize("provider", sorted(bench_attention.providers(DEVICE)))
def test_attention_fwd_bwd(benchmark, provider):
    fn = bench_attention.providers(DEVICE)[provider]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(DEVICE, DTYPE).requires_grad_() for _ in range(3))
    bias = torch.randn(H, N, N, generator=g).to(DEVICE).requires_grad_()
    do = torch.randn(B, H, N, D, generator=g).to(DEVICE, DTYPE)

    def step():
        q.grad = k.grad = v.grad = bias.grad = None  # each round writes its gradients rather than adding to them
        fn(q, k, v, bias).backward(do)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(harness.env_info(DEVICE), shape=dict(B=B, H=H, N=N, D=D), dtype=str(DTYPE))
    benchmark.pedantic(step, rounds=10 if DEVICE.type == "cuda" else 1, warmup_rounds=int(DEVICE.type == "cuda"))
    assert torch.isfinite(bias.grad).all()
