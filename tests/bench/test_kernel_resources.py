"""bench/kernel_resources.py: every Triton launch of a BEiT training step (plus uint8 patch embedding, attention at
head dimensions 128 and 256, the all-queries dk/dv kernel, the fused attention backward and the DALL-E tokenizer's
fused glue), specialised as the JIT would and compiled for sm86 and sm90 with Triton's own compiler (no GPU needed),
fits the architecture's shared memory: one that does not fails at its first launch on the GPU, which the
interpreter-mode tests cannot see."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "kernel_resources.py")
KERNELS = {
    "attention._attn_fwd_kernel", "attention._attn_bwd_dq_kernel", "attention._attn_bwd_dkdv_kernel",
    "bias_gelu._bias_gelu_fwd_kernel", "bias_gelu._bias_gelu_bwd_kernel",
    "conv_epilogue._conv_epilogue_kernel",
    "layer_norm._add_ln_fwd_kernel", "layer_norm._add_ln_bwd_kernel",
    "masked_gather._masked_gather_fwd_kernel", "masked_gather._masked_gather_bwd_kernel",
    "patch_embed._patch_embed_fwd_kernel", "patch_embed._patch_embed_bwd_kernel",
    "linear_cross_entropy._ce_rows_kernel",
}  # fmt: skip


def run(*args, timeout=900):
    # The script switches the interpreter off itself; a subprocess keeps that out of this test session.
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_every_launch_compiles_and_fits_shared_memory(tmp_path):
    out = tmp_path / "resources.json"
    proc = run("--arch", "86,90", "--dtype", "bf16,fp32", "--head-dim", "64,128,256", "--check", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    for arch in ("sm86", "sm90"):
        for dtype in ("bf16", "fp32"):
            mine = [r for r in rows if r["arch"] == arch and r["dtype"] == dtype]
            # The all-queries dk/dv kernel and the fused backward take half precision only; the fused backward
            # also needs 160 KiB of shared memory a block, which sm86 lacks.
            half = {"attention._attn_bwd_dkdv_allq_kernel"} | (
                {"attention._attn_bwd_fused_kernel"} if arch == "sm90" else set()
            )
            expected = KERNELS | (half if dtype == "bf16" else set())
            assert {r["kernel"].split("[")[0] for r in mine} == expected, (arch, dtype)
            # Every attention kernel at every head dimension, and both image layouts of the patch embedding.
            for d in (64, 128, 256):
                assert sum(f"BLOCK_D={d}]" in r["kernel"] for r in mine) == 3, (arch, dtype, d)
            assert any("img_ptr=*u8" in r["kernel"] for r in mine) and any("img_ptr=*fp32" in r["kernel"] for r in mine)
    for r in rows:
        assert r["fits"] and r["shared"] <= r["shared_limit"], r
        assert 0 < r["registers"] <= 255, r
    # sm86 is the tightest of the architectures the triton path runs on (99 KiB a block).
    assert {r["shared_limit"] for r in rows if r["arch"] == "sm86"} == {99 * 1024}
    assert f"all {len(rows)} launches fit" in proc.stdout


@pytest.mark.slow
def test_check_fails_when_a_launch_does_not_fit():
    proc = run("--arch", "90", "--dtype", "fp32", "--head-dim", "64", "--limit-kib", "120", "--check")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    # The model's fp32-image patch embedding asks for 144 KiB on sm90; nothing else there needs more than 113.
    over = proc.stderr.split("over the shared-memory limit: ")[1].strip().split(", ")
    assert len(over) == 1 and over[0].startswith("patch_embed._patch_embed_fwd_kernel[img_ptr=*fp32"), over


def test_unknown_architecture_is_refused():
    proc = run("--arch", "75", timeout=120)
    assert proc.returncode == 2 and "known architectures" in proc.stderr
