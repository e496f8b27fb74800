"""bench/host_overhead.py: its --quick run, in this process (Triton's interpreter on, as in every CPU test session),
writes a row for every op, provider and mode with positive times, and no kernel runs: each launch is counted by the
stub instead of reaching Triton's launch path."""

import json
import os
import sys

import pytest
from triton.runtime import interpreter
from triton.runtime.jit import JITFunction

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "bench")))

import host_overhead  # noqa: E402

OPS = {
    "patch_embed",
    "attention_qkvpacked",
    "add_layer_norm",
    "bias_gelu",
    "masked_gather_ln",
    "linear_cross_entropy",
    "conv_epilogue",
    "conv_epilogue_residual",
}
FORWARD_ONLY = {"conv_epilogue", "conv_epilogue_residual"}  # the tokenizer's glue: inference


@pytest.fixture
def real_launches(monkeypatch):
    """Every call that reaches Triton's own launch paths (the JIT's, the interpreter's, and the interpreter's grid
    executor, which runs the programs): the stub replaces the first two for the run, so this stays empty unless a
    launch slips past it."""
    calls = []

    def spy(cls, name):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            calls.append(f"{cls.__name__}.{name}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    spy(JITFunction, "run")
    spy(interpreter.InterpretedFunction, "run")
    spy(interpreter.GridExecutor, "__call__")
    return calls


def test_quick_run_times_every_op_with_every_launch_stubbed(tmp_path, real_launches, capsys):
    out = tmp_path / "host.json"
    assert host_overhead.main(["--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert not real_launches, real_launches
    got = {(r["kernel"], r["provider"], r["mode"]) for r in rows}
    want = {(op, provider, mode) for op in OPS for provider in ("ours", "reference")
            for mode in (("fwd",) if op in FORWARD_ONLY else ("fwd", "fwd+bwd"))}  # fmt: skip
    assert got == want | {(host_overhead.ENGINE, "torch", "fwd+bwd")}
    for r in rows:
        assert r["metric"] == "host_time" and r["unit"] == "us", r
        assert 0 < r["p20"] <= r["p50"] <= r["p80"], r
        assert r["calls"] == 30 and r["torch"] and r["triton"] and r["git_sha"], r
        # Each of our calls launches (the stub counted it); the reference and the engine's row launch none.
        assert (r["launches"] > 0) == (r["provider"] == "ours"), r
    # The backward adds launches of its own, except the MIM head's, whose forward computes the gradients.
    by = {(r["kernel"], r["provider"], r["mode"]): r["launches"] for r in rows}
    for op in OPS - FORWARD_ONLY - {"linear_cross_entropy"}:
        assert by[(op, "ours", "fwd+bwd")] > by[(op, "ours", "fwd")], op
    assert by[("linear_cross_entropy", "ours", "fwd+bwd")] == by[("linear_cross_entropy", "ours", "fwd")]
    printed = capsys.readouterr().out
    assert "| masked_gather_ln | fwd |" in printed and "launches intercepted" in printed


def test_the_stub_is_removed_after_the_run():
    run_jit, run_interp = JITFunction.run, interpreter.InterpretedFunction.run
    with host_overhead.stubbed_launches() as launches:
        assert JITFunction.run is not run_jit and interpreter.InterpretedFunction.run is not run_interp
    assert JITFunction.run is run_jit and interpreter.InterpretedFunction.run is run_interp
    assert launches.total() == 0
