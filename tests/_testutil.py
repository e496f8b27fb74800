"""Helpers shared by the kernel tests (tests/conftest.py puts this folder on sys.path)."""

import os
import subprocess
import sys

import torch


def max_err(a, ref) -> float:
    return (a.double() - ref.double()).abs().max().item()


def check_close(name, got, ref64, baseline, dtype):
    """fp32: close to float64. Low precision: at most twice the error of plain PyTorch in the same dtype."""
    assert got.shape == ref64.shape, name
    assert torch.isfinite(got).all(), name
    scale = ref64.abs().max().item() + 1e-12
    if dtype == torch.float32:
        assert max_err(got, ref64) <= 1e-5 * scale + 1e-6, f"{name}: {max_err(got, ref64)} (scale {scale})"
    else:
        tol = 2 * max_err(baseline, ref64) + 1e-4 * scale
        assert max_err(got, ref64) <= tol, f"{name}: {max_err(got, ref64)} > {tol}"


def compile_for_gpu(script: str, timeout: int = 600) -> None:
    """Run a script that compiles kernels with Triton's GPU compiler (and the ptxas in the triton wheel), without
    a GPU: in a subprocess without TRITON_INTERPRET, which the interpreter-mode test session has set. The script
    prints "compiled" when every kernel compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
