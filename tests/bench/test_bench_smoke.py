"""Tiny CPU runs of the benchmark scripts, so the harness and the scripts cannot rot between GPU runs."""

import json
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
sys.path.insert(0, os.path.abspath(BENCH))

import bench_attention  # noqa: E402
import harness  # noqa: E402
import summarize  # noqa: E402


def test_attention_bench_quick_run_writes_complete_rows(tmp_path):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU smoke run needs the Triton interpreter")
    out = tmp_path / "attention.json"
    rows = bench_attention.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    providers = {r["provider"] for r in rows}
    assert {"ours", "reference", "sdpa"} <= providers
    for r in rows:
        for key in ("kernel", "provider", "mode", "metric", "unit", "shape", "dtype", "device", "torch", "triton",
                    "git_sha", "date"):  # fmt: skip
            assert r.get(key) not in (None, ""), (key, r)
        if r["metric"] == "time":
            assert 0 < r["p20"] <= r["p50"] <= r["p80"]
            assert r["max_abs_err"] < 1e-4  # every provider computed the same attention
    table = summarize.summarize(rows)
    assert "| attention |" in table and "ours" in table


def test_attention_bench_does_not_time_a_wrong_provider(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU smoke run needs the Triton interpreter")
    real = bench_attention.providers

    def with_a_wrong_one(device):
        return dict(real(device), wrong=lambda q, k, v, b: v)

    monkeypatch.setattr(bench_attention, "providers", with_a_wrong_one)
    env = harness.env_info(torch.device("cpu"))
    rows = bench_attention.bench_case(2, 2, 20, 16, torch.float32, torch.device("cpu"), env, quick=True)
    wrong = [r for r in rows if r["provider"] == "wrong"]
    assert [r["metric"] for r in wrong] == ["error"] and "exceeds" in wrong[0]["note"]
    assert {r["provider"] for r in rows if r["metric"] == "time"} == {"ours", "reference", "sdpa"}


def test_fused_ops_bench_quick_run_block_glue_rows(tmp_path):
    """The add_layer_norm and bias_gelu rows (the other fused ops run in bench/test_bench_fused_ops.py)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU smoke run needs the Triton interpreter")
    import bench_fused_ops

    out = tmp_path / "fused_ops.json"
    rows = bench_fused_ops.main(["--quick", "--no-compile", "--ops", "add_layer_norm,bias_gelu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    assert not [r for r in rows if r["metric"] == "error"]
    timed = {(r["kernel"], r["provider"], r["mode"]) for r in rows if r["metric"] == "time"}
    assert timed == {(k, p, m) for k in ("add_layer_norm", "bias_gelu") for p in ("ours", "reference")
                     for m in ("fwd", "fwd+bwd")}  # fmt: skip
    assert all(r["p50"] > 0 and r["shape"] and r["git_sha"] for r in rows)


def test_harness_row_and_table():
    env = harness.env_info("cpu")
    r = harness.row("k", "p", "fwd", "time", "ms", (2.0, 1.0, 3.0), shape=dict(B=3), dtype="float32", env=env)
    assert (r["p50"], r["p20"], r["p80"]) == (2.0, 1.0, 3.0) and r["device"].startswith("cpu")
    assert "B=3" in harness.format_table([r], ("kernel", "shape", "p50"))
    ms = harness.time_fn(lambda: sum(range(1000)), device="cpu", rep_ms=5)
    assert 0 < ms[1] <= ms[0] <= ms[2]
    assert harness.peak_memory_mb(lambda: None, device="cpu") is None


def test_train_throughput_quick_run(tmp_path):
    import train_throughput

    out = tmp_path / "train.json"
    rows = train_throughput.main(["--quick", "--impls", "ref,sdpa,triton", "--tokenizer", "none", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    errors = [r for r in rows if r["metric"] == "error"]
    assert not errors, errors
    for impl in ("ref", "sdpa", "triton"):
        ips = [r for r in rows if r["provider"] == impl and r["metric"] == "throughput"]
        assert len(ips) == 1 and ips[0]["p50"] > 0
        phases = {r["metric"] for r in rows if r["provider"] == impl}
        assert {"forward_time", "backward_time", "optimizer_time"} <= phases


def test_train_throughput_profile_lists_the_top_ops_per_step():
    import train_throughput

    rows = train_throughput.main(["--quick", "--impls", "triton", "--tokenizer", "none", "--profile", "1"])
    prof = [r for r in rows if r["kernel"] == "train_step_profile"]
    total = [r for r in prof if r["metric"] == "kernel_time_total"]
    tops = [r for r in prof if r["metric"] == "kernel_time"]
    assert len(total) == 1 and 0 < len(tops) <= train_throughput.PROFILE_TOP
    assert [r["p50"] for r in tops] == sorted((r["p50"] for r in tops), reverse=True)
    assert sum(r["p50"] for r in tops) <= total[0]["p50"] * (1 + 1e-9)
    assert all(r["note"] and r["calls_per_step"] > 0 for r in tops)


@pytest.mark.parametrize(
    "fits_up_to, start, expected",
    [(1000, 256, (992, False)), (300, 256, (288, False)), (100, 64, (96, False)), (20, 2, (0, False)),
     (10**6, 256, (8192, True)), (700, 2, (672, False))],
)  # fmt: skip
def test_largest_batch_search(monkeypatch, fits_up_to, start, expected):
    """The search against a fake step that runs out of memory above ``fits_up_to`` images (as cuBLAS reports it for
    some sizes): the largest multiple of 32 that fits, or the search's limit, flagged as such. ``start`` is the
    batch just timed, which fitted."""
    import argparse

    import train_throughput

    tried = []

    def fake_run(impl, args, device, env, rows=None):
        tried.append(args.batch)
        if args.batch > fits_up_to:
            if args.batch % 64:
                raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")
            raise torch.OutOfMemoryError("CUDA out of memory")
        return []

    released = []  # the real release runs gc.collect() per try, a second each under a loaded test process
    monkeypatch.setattr(train_throughput, "run_impl", fake_run)
    monkeypatch.setattr(train_throughput, "_release", released.append)
    args = argparse.Namespace(batch=start, steps=6, warmup=2, max_batch=True, tokenizer="dalle")
    assert train_throughput.largest_batch("triton", args, torch.device("cpu")) == expected
    assert len(tried) <= 12, tried
    assert len(released) == len(tried)  # every try frees what it held, fitting or not

    def broken(impl, args, device, env, rows=None):
        raise ValueError("not a memory error")

    monkeypatch.setattr(train_throughput, "run_impl", broken)
    with pytest.raises(ValueError):  # anything else is a failure, not a size
        train_throughput.largest_batch("triton", args, torch.device("cpu"))


def test_summary_checks_the_training_step_targets():
    """Synthetic rows (not measurements): the summary's target lines use the tokenizer-included mode, the best of
    sdpa and compile, peak memory against ref, and list error rows."""
    env = harness.env_info(torch.device("cpu"))

    def r(provider, metric, value, mode="with tokenizer", unit=""):
        return harness.row("train_step", provider, mode, metric, unit, value, shape={}, dtype=None, env=env)

    rows = [
        r("ref", "throughput", 1000.0, unit="images/s"), r("ref", "peak_memory", 40000.0),
        r("sdpa", "throughput", 1500.0, unit="images/s"), r("compile", "throughput", 2000.0, unit="images/s"),
        r("triton", "throughput", 2400.0, unit="images/s"), r("triton", "peak_memory", 26000.0),
        r("triton", "throughput", 9999.0, mode="model only", unit="images/s"),
        harness.row("train_step", "triton+graph", "-", "error", "", None, shape={}, dtype=None, env=env,
                    note="RuntimeError: capture failed"),
        # BEiT-L/16 rows (train_large) must not stand in for BEiT-B's.
        harness.row("train_step", "triton", "with tokenizer", "throughput", "images/s", 500.0, env=env, dtype=None,
                    shape=dict(model="beit_large_patch16_224", B=128)),
    ]  # fmt: skip
    text = summarize.targets(rows)
    assert "| triton | images/s vs ref | 2.40 | >= 1.8 | met |" in text
    assert "| triton | images/s vs compile (best of sdpa, compile) | 1.20 | >= 1.15 | met |" in text
    assert "| triton | peak memory vs ref | 0.65 | <= 0.7 | met |" in text
    assert "| triton | images/s | 2400.00 | >= 3000 | NOT met |" in text
    assert summarize.targets([]) == ""
    listed, ours_failed = summarize.errors(rows)
    assert listed == "error: train_step - triton+graph: RuntimeError: capture failed" and ours_failed


def test_summary_lists_every_error_and_fails_on_ours_only(tmp_path, capsys):
    def r(provider, metric, p50, kernel="attention", dtype="bfloat16", **kw):
        return dict(kernel=kernel, provider=provider, mode="fwd", metric=metric, p50=p50, shape={"B": 3}, dtype=dtype,
                    device="d", torch="t", triton="tr", git_sha="abc", date="now", **kw)  # fmt: skip

    peer = r("xformers", "error", None, note="NotImplementedError: no operator")
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([r("ours", "time", 1.0), r("sdpa", "time", 1.3), peer]))
    assert summarize.main([str(path)]) == 0  # a peer's failure is listed, not ours
    assert "error: attention B=3 bfloat16 fwd xformers: NotImplementedError: no operator" in capsys.readouterr().out
    path.write_text(json.dumps([r("sdpa", "time", 1.3), r("ours", "error", None, note="RuntimeError: boom"), peer]))
    assert summarize.main([str(path)]) == 1
    assert "attention B=3 bfloat16 fwd ours: RuntimeError: boom" in capsys.readouterr().out
    # Rows of two runs are refused, not divided by each other.
    other = dict(r("sdpa", "time", 3.0), device="another GPU", git_sha="def")
    path.write_text(json.dumps([r("ours", "time", 1.0), other]))
    assert summarize.main([str(path)]) == 2
    assert "rows of 2 runs" in capsys.readouterr().err
    # The tokenizer's official module (a dtype of its own) is compared with our fused tokenizer.
    tok = [r("ours-bf16-cl-fused", "time", 40.0, kernel="tokenizer", dtype="bf16 (fp32 output conv)"),
           r("official-fp16", "time", 90.0, kernel="tokenizer", dtype="fp16 (fp32 output conv)")]  # fmt: skip
    line = next(ln for ln in summarize.summarize(tok).splitlines() if "| official-fp16 |" in ln)
    assert "| 90.000 | - | - | 2.25 |" in line


def test_device_check_calls_scripts_and_implementations_that_exist():
    """bench/device_check.sh runs only on a GPU: check here that every bench script it calls exists, that the
    stage limits stay within its 7-minute budget, and that every --impls name is one train_throughput knows."""
    import re
    import shlex

    import train_throughput

    text = open(os.path.join(BENCH, "device_check.sh")).read().replace("\\\n", " ")
    stages = [shlex.split(line) for line in text.splitlines() if line.startswith("stage ")]
    default = re.search(r"STAGES=\$\{STAGES:-([\w ]+)\}", text).group(1).split()
    assert len(default) >= 5 and set(default) <= {s[1] for s in stages}
    # Every stage is known to the name check, which knows no other name.
    known = re.search(r'KNOWN_STAGES="([\w ]+)"', text).group(1).split()
    assert sorted(known) == sorted(s[1] for s in stages)
    # 7 minutes, less the install: each stage's limit and the grace before its SIGKILL.
    grace = int(re.search(r"^GRACE=(\d+)", text, re.M).group(1))
    assert sum(int(s[2]) + grace for s in stages if s[1] in default) <= 420 - 10
    impls_known = set(train_throughput.IMPLS + train_throughput.EXTRA_IMPLS)
    for s in stages:
        cmd = s[3:]
        scripts = [c for c in cmd if re.fullmatch(r"bench/\w+\.py", c)]
        for script in scripts:
            assert os.path.isfile(os.path.join(BENCH, "..", script)), script
        if "--impls" in cmd:
            impls = cmd[cmd.index("--impls") + 1]
            impls = re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", impls)  # an overridable default: ${VAR:-a,b}
            assert set(impls.split(",")) <= impls_known, cmd


def test_tune_attention_quick_run_times_every_kind(tmp_path):
    """The tile sweep in the interpreter: every kind gets timed rows, each candidate agrees with the default."""
    import importlib
    import json

    import tune_attention

    from beit_kernels import tuning

    # Spies on the kernels themselves (no public way to see a launch): the module, not the function of its name.
    attn = importlib.import_module("beit_kernels.attention")
    before = tuning.overrides()
    out = tmp_path / "tune.json"
    launched = {"_attn_bwd_dkdv_allq_kernel": [], "_attn_bwd_fused_kernel": []}
    real = {name: getattr(attn, name) for name in launched}

    def spy(name):
        return type("Spy", (), {"__getitem__": lambda s, g: launched[name].append(g) or real[name][g]})()

    for name in launched:
        setattr(attn, name, spy(name))
    try:
        rows = tune_attention.main(["--quick", "--rep-ms", "1", "--out", str(out)])
    finally:
        for name, fn in real.items():
            setattr(attn, name, fn)
    assert tuning.overrides() == before == {}
    assert all(launched.values())  # the dkdv_allq and fused kinds ran their kernels
    assert not [r for r in rows if r["metric"] == "error"], rows
    assert {r["mode"] for r in rows if r["metric"] == "time"} == {"fwd", "dq", "dkdv", "dkdv_allq", "fused"}
    assert all(r["p50"] > 0 and r["config"]["BLOCK_N"] for r in rows)
    assert all("BLOCK_M" in r["config"] for r in rows if r["mode"] not in ("dkdv_allq", "fused"))
    assert json.loads(out.read_text()) == rows
    # fp32 takes neither the all-queries kernel nor the fused one: their kinds are skipped, not timed under their
    # names with the other kernel running.
    rows = tune_attention.main(["--quick", "--rep-ms", "1", "--dtype", "float32", "--kinds", "dkdv_allq,fused"])
    assert rows == []


def test_plot_draws_one_panel_per_kernel_and_merges_mixed_dtype_providers(tmp_path):
    pytest.importorskip("matplotlib")
    import plot

    def r(kernel, provider, dtype, p50, mode="fwd"):
        return dict(kernel=kernel, provider=provider, mode=mode, metric="time", p50=p50, shape={"B": 3}, dtype=dtype,
                    device="cpu", torch="t", triton="tr", git_sha="abc")  # fmt: skip

    # The tokenizer's labels as bench_tokenizer.py writes them on a GPU.
    bf16, fp16 = "bf16 (fp32 output conv)", "fp16 (fp32 output conv)"
    rows = [r("attention", "ours", "bfloat16", 1.0), r("attention", "sdpa", "bfloat16", 1.3),
            r("tokenizer", "ours-bf16-cl-fused", bf16, 1.0), r("tokenizer", "ours-bf16-cl", bf16, 2.0),
            r("tokenizer", "official-fp16", fp16, 3.0), r("tokenizer", "ours-bf16-cl-bf16out", "bf16", 1.9),
            r("tokenizer", "ours-fp32", "fp32", 4.0), r("tokenizer", "kmeans", "fp32", 0.5)]  # fmt: skip
    out = tmp_path / "chart.png"
    drawn = plot.plot(rows, str(out))
    assert out.stat().st_size > 1000
    assert set(drawn) == {"attention", "tokenizer"}
    # Every provider against our fused tokenizer, the official module (the 1.5x target's baseline) included.
    (label, ratios), = drawn["tokenizer"]
    assert ratios == {"ours-bf16-cl-fused": 1.0, "ours-bf16-cl": 2.0, "official-fp16 (fp16 (fp32 output conv))": 3.0,
                      "ours-bf16-cl-bf16out (bf16)": 1.9, "ours-fp32 (fp32)": 4.0, "kmeans (fp32)": 0.5}  # fmt: skip
    with pytest.raises(ValueError, match="no rows"):
        plot.plot([r("attention", "sdpa", "bfloat16", 1.3)], str(out))


def test_sync_count_ignores_the_debug_mode_notice():
    import bench_fused_ops

    assert bench_fused_ops.is_sync_warning("called a synchronizing CUDA operation")
    notice = ("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing "
              "operations")  # fmt: skip
    assert not bench_fused_ops.is_sync_warning(notice)


def test_summary_shows_gpu_kernel_time_and_its_ratio_to_ours():
    def r(provider, metric, p50, mode="fwd+bwd"):
        return dict(kernel="masked_gather_ln", provider=provider, mode=mode, metric=metric, p50=p50, shape={"B": 3},
                    dtype="float32", device="d", torch="t", triton="tr", git_sha="abc", date="now")  # fmt: skip

    rows = [r("ours", "time", 1.4), r("ours", "kernel_time", 0.1), r("reference", "time", 1.3),
            r("reference", "kernel_time", 0.4), r("compiled", "time", 0.9)]  # fmt: skip
    lines = summarize.summarize(rows).splitlines()
    assert "GPU kernel ms | GPU time / ours |" in lines[2]
    ours, ref, compiled = (next(ln for ln in lines if f"| {p} |" in ln) for p in ("ours", "reference", "compiled"))
    assert ours.endswith("| 1.400 | - | - | 1.00 | 0.100 | 1.00 |")
    assert ref.endswith("| 1.300 | - | - | 0.93 | 0.400 | 4.00 |")
    assert compiled.endswith("| 0.900 | - | - | 0.64 | - | - |")  # no kernel time: no ratio


@pytest.mark.gpu
def test_gpu_kernel_time_leaves_the_host_out():
    """kernel_time_ms counts the GPU's kernels only: a call that also sleeps 20 ms on the host takes over 20 ms of
    wall time but a fraction of a millisecond of kernel time."""
    import time

    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)

    def call():
        a @ a  # about 17 GFLOP: well under a millisecond on a recent GPU
        time.sleep(0.02)

    gpu_ms = harness.kernel_time_ms(call, "cuda", calls=3)
    wall_ms = harness.time_fn(call, device="cuda", rep_ms=100)[0]
    assert 0 < gpu_ms < 5 and wall_ms > 20


def test_summary_keeps_the_first_row_of_each_key_and_lists_largest_batches():
    def r(provider, metric, p50, mode="with tokenizer", capped=None):
        return dict(kernel="train_step", provider=provider, mode=mode, metric=metric, p50=p50, shape={"B": 3},
                    dtype="bfloat16", capped=capped)  # fmt: skip

    rows, dropped = summarize.first_rows([r("ref", "throughput", 100.0), r("ref", "throughput", 90.0),
                                          r("ref", "max_batch", 704.0, "model only")])  # fmt: skip
    assert dropped == 1 and [x["p50"] for x in rows] == [100.0, 704.0]
    capped = r("triton", "max_batch", 8192.0, "model only", capped=True)
    assert summarize.largest_batches(rows + [capped]) == "ref 704; triton 8192 (search capped)"


def test_tune_glue_quick_run_times_every_kind_and_restores_the_tiles():
    import tune_glue

    from beit_kernels import tuning

    def current():
        return tuning.overrides(), {k: tuning.get(k) for k in tuning.TABLE}

    before = current()
    rows = tune_glue.main(["--quick", "--rep-ms", "1"])
    assert not [r for r in rows if r["metric"] == "error"], rows
    assert {r["mode"] for r in rows} == {"ln_fwd", "ln_bwd", "gelu_fwd", "gelu_bwd", "epi", "epi_pool", "lce"}
    assert current() == before


def test_count_traffic_tokenizer_fused_moves_less_and_counts_exactly(capsys):
    """The traffic count of a tiny DALL-E encoder: the fused glue replaces the bias, ReLU, add and pool passes, and
    an op's per-image figure is its tensors' bytes (argmax reads the fp32 logits [512, 4, 4] of each image; its
    int64 output is below the size counted)."""
    import count_traffic

    args = ["tokenizer", "--n-hid", "64", "--vocab-size", "512", "--size", "32", "--precision", "fp32"]
    assert count_traffic.main(args) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| *"): line for line in out.splitlines() if line.startswith("|")}
    assert "conv_epilogue" in rows and "relu_" in rows and "max_pool2d_with_indices" in rows
    unfused, fused = (float(c.strip(" *|")) for c in rows["total"].split(" | ")[1:])
    assert fused < 0.75 * unfused, (fused, unfused)
    ns = type("A", (), dict(n_hid=64, vocab_size=512, size=32, precision="fp32"))
    prepare, run = count_traffic.tokenizer_runs(ns)["fused"]
    per = count_traffic.per_image(prepare, run, (1, 2), 4096)
    assert per["argmax"][0] == 512 * 4 * 4 * 4
    assert per[count_traffic.BIAS_ADD][1] == 1  # only the output convolution keeps its bias


def test_tokenizer_bench_quick_run(tmp_path):
    """bench_tokenizer.py on CPU: every provider timed, the masked-only provider agreeing at its positions."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU smoke run needs the Triton interpreter")
    import bench_tokenizer

    out = tmp_path / "tokenizer.json"
    assert bench_tokenizer.main(["--quick", "--rep-ms", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    timed = {r["provider"] for r in rows if r["metric"] == "time"}
    assert {"ours-bf16-cl-fused", "ours-bf16-cl-fused-masked", "ours-bf16-cl", "ours-fp32", "kmeans"} <= timed
    agree = {r["provider"]: r["p50"] for r in rows if r["metric"] == "agreement_with_ours-fp32"}
    # At these tiny sizes the bf16 tokens match the fp32 ones everywhere (a deterministic CPU run).
    assert agree["ours-bf16-cl-fused"] == agree["ours-bf16-cl-fused-masked"] == 1.0


def test_tune_glue_lists_each_kernels_default_first():
    """apply_tuning.py takes a sweep mode's first candidate as the default it must beat."""
    import tune_glue

    from beit_kernels import tuning

    first = {k: v[0] for k, v in tune_glue.CANDIDATES.items()}
    assert first["ln_fwd"] == (tuning.layer_norm_tile(768, False)[0], tuning.layer_norm_tile(768, False)[2])
    tile = tuning.layer_norm_tile(768, True)
    bwd = tuning.get("layer_norm.bwd")
    ln_bwd = (tile[0], tile[2], bwd["programs_per_sm"], bwd["loop_stages"]) + (1,) * bwd["joint_sums"]
    assert first["ln_bwd"] == ln_bwd
    gelu_fwd, gelu_bwd = tuning.get("bias_gelu.fwd"), tuning.get("bias_gelu.bwd")
    assert first["gelu_fwd"] == (gelu_fwd["BLOCK_M"], gelu_fwd["BLOCK_D"], gelu_fwd["num_warps"])
    assert first["gelu_bwd"] == (gelu_bwd["BLOCK_M"], gelu_bwd["BLOCK_D"], gelu_bwd["num_warps"],
                                 gelu_bwd["loop_stages"])  # fmt: skip
    for mode, pool in (("epi", False), ("epi_pool", True)):
        block_p, block_c, warps = tuning.conv_epilogue_tile(256, pool)
        assert first[mode] == (block_c, block_p * block_c, warps)
    assert first["lce"] == (tuning.cross_entropy_chunk(256 * 75, 8192),)
    max_logits = tuning.get("linear_cross_entropy.ce")["max_logits"]
    assert all(c * 8192 <= max_logits for (c,) in tune_glue.CANDIDATES["lce"])  # within the memory cap


def _sweep_row(mode, cand, p50, group_scale=None, metric="time"):
    r = dict(kernel="glue_tune", provider=f"{mode}:{cand}", mode=mode, metric=metric, p50=p50)
    if group_scale is None:
        r["candidate"] = list(cand)
    else:  # the attention sweep's rows, as tune_attention._config writes their configs
        import tune_attention

        r.update(config=tune_attention._config(cand), group_scale=group_scale, shape=dict(B=3, H=2, N=197, D=64),
                 dtype="bfloat16")  # fmt: skip
    return r


def test_apply_tuning_chooses_winners_beyond_the_margin_only():
    import apply_tuning
    import tune_attention
    import tune_glue

    from beit_kernels import tuning

    ln0, ln1 = tune_glue.CANDIDATES["ln_bwd"][:2]
    g0, g1 = tune_glue.CANDIDATES["gelu_bwd"][:2]
    d0, d1 = tune_attention.CANDIDATES["dkdv"][:2]
    q0 = tune_attention.CANDIDATES["dkdv_allq"][0]
    rows = [
        _sweep_row("ln_bwd", ln0, 1.0), _sweep_row("ln_bwd", ln1, 0.9),  # 10% faster: installed
        _sweep_row("gelu_bwd", g0, 1.0), _sweep_row("gelu_bwd", g1, 0.99),  # within the margin: default kept
        _sweep_row("gelu_bwd", g1[:2] + (1,), 0.1, metric="error"),  # an error row never wins
        _sweep_row("dkdv", d0, 2.0, 1), _sweep_row("dkdv", d1, 1.9, 1), _sweep_row("dkdv", d0, 1.95, 2),
        _sweep_row("dkdv_allq", q0, 1.5, 1),  # competes with dkdv's default: the family's winner
        _sweep_row("epi", (1, 2, 3), 0.5),  # a mode without its baseline row: nothing to beat, nothing chosen
    ]  # fmt: skip
    # The interpreter's default is the dk/dv kernel: its first candidate is the family's baseline.
    assert not tuning.attention_all_queries(197, 64, torch.bfloat16, torch.device("cpu"))
    chosen = apply_tuning.choose(rows, min_gain=0.03)
    assert set(chosen) == {"ln_bwd", "dkdv"}
    assert chosen["ln_bwd"]["candidate"] == list(ln1) and chosen["ln_bwd"]["baseline_p50"] == 1.0
    assert chosen["dkdv"]["mode"] == "dkdv_allq" and chosen["dkdv"]["baseline_p50"] == 2.0
    # Where the all-queries kernel is the default (sm90), its first candidate is the baseline: nothing beats 1.5.
    with tuning.override({"attention.dkdv_all_queries": True}):
        assert set(apply_tuning.choose(rows, min_gain=0.03)) == {"ln_bwd"}
        # The fused backward competes in the same family; where it is the default, its first candidate is the
        # baseline.
        f0, f1 = tune_attention.CANDIDATES["fused"][:2]
        rows += [_sweep_row("fused", f0, 1.4, 1), _sweep_row("fused", f1, 1.45, 1)]
        chosen = apply_tuning.choose(rows, min_gain=0.03)
        assert chosen["dkdv"]["mode"] == "fused" and chosen["dkdv"]["baseline_p50"] == 1.5
        with tuning.override({"attention.bwd_fused": True}):
            assert set(apply_tuning.choose(rows, min_gain=0.03)) == {"ln_bwd"}


def test_apply_tuning_drops_a_dq_winner_under_the_fused_backward():
    """The dq rows time the two-kernel backward: installing their winner would switch a fused backward off."""
    import contextlib

    import apply_tuning
    import tune_attention

    from beit_kernels import tuning

    q0, q1 = tune_attention.CANDIDATES["dq"][:2]
    f0, f1 = tune_attention.CANDIDATES["fused"][:2]
    d0 = tune_attention.CANDIDATES["dkdv"][0]
    dq_rows = [_sweep_row("dq", q0, 1.0, 1), _sweep_row("dq", q1, 0.9, 1)]
    # Two-kernel default, no family winner: the dq tile is installed.
    assert set(apply_tuning.choose(dq_rows + [_sweep_row("dkdv", d0, 2.0, 1)])) == {"dq"}
    # The fused backward wins its family: the dq winner goes, and the installed backward stays fused.
    rows = dq_rows + [_sweep_row("dkdv", d0, 2.0, 1), _sweep_row("fused", f0, 1.5, 1)]
    chosen = apply_tuning.choose(rows)
    assert set(chosen) == {"dkdv"} and chosen["dkdv"]["mode"] == "fused"
    with contextlib.ExitStack() as stack:
        apply_tuning.install(chosen, stack)
        assert tuning.get("attention.bwd_fused")
    # The fused backward as the default, nothing beating it: the dq winner goes too.
    with tuning.override({"attention.bwd_fused": True}):
        fused_rows = [_sweep_row("fused", f0, 1.0, 1), _sweep_row("fused", f1, 0.99, 1)]
        assert apply_tuning.choose(dq_rows + fused_rows) == {}


def test_apply_tuning_installs_for_the_run_and_rows_record_it(tmp_path):
    """train_throughput --tuned: the winners are in place during the run, recorded in every row, gone after."""
    import contextlib

    import apply_tuning
    import train_throughput
    import tune_glue

    from beit_kernels import tuning

    def ln_bwd():
        bwd = tuning.get("layer_norm.bwd")
        return bwd["loop_stages"], bwd["joint_sums"], bwd["programs_per_sm"]

    with contextlib.ExitStack() as stack:
        applied = apply_tuning.install(
            {"ln_bwd": dict(mode="ln_bwd", candidate=[2, 8, 4, 3, 1], group_scale=1),
             "dkdv": dict(mode="dkdv_allq", candidate=[0, 16, 8, 1], group_scale=2)}, stack)  # fmt: skip
        assert applied == {"ln_bwd": "ln_bwd:2x8x4x3x1", "dkdv": "dkdv_allq:0x16x8x1:g2"}
        assert ln_bwd()[:2] == (3, True) and tuning.layer_norm_tile(768, True)[0] == 2
        assert ln_bwd()[2] == 4
        assert tuning.get("attention.dkdv_all_queries") and harness.kernel_switches()["tuned"] == applied
    assert not harness.TUNED
    assert ln_bwd() == (2, False, 8)
    assert tuning.get("attention.dkdv_all_queries") is None
    # The fused backward as the dk/dv family's winner: switched on with its tile.
    with contextlib.ExitStack() as stack:
        applied = apply_tuning.install({"dkdv": dict(mode="fused", candidate=[0, 16, 8, 2, 1], group_scale=2)}, stack)
        assert applied == {"dkdv": "fused:0x16x8x2x1:g2"}
        # The all-queries switch is left as it is: unused while the fused kernel runs.
        assert tuning.get("attention.bwd_fused") and tuning.get("attention.dkdv_all_queries") is None
        cfg = tuning.attention_tile("fused", 64, torch.bfloat16, 227 * 1024)
        assert cfg == dict(BLOCK_N=16, num_warps=8, num_stages=2, DKDV_T=True)
    assert tuning.get("attention.bwd_fused") is False and tuning.get("attention.dkdv_all_queries") is None

    sweep = tmp_path / "sweep.json"
    l0, l1 = tune_glue.CANDIDATES["ln_fwd"][:2]
    sweep.write_text(json.dumps([_sweep_row("ln_fwd", l0, 1.0), _sweep_row("ln_fwd", l1, 0.5)]))
    rows = train_throughput.main(["--quick", "--impls", "triton", "--tokenizer", "none", "--tuned", str(sweep)])
    assert tuning.overrides() == {} and not harness.TUNED
    timed = [r for r in rows if r["metric"] == "throughput"]
    assert timed and all(r["kernel_switches"]["tuned"] == {"ln_fwd": "ln_fwd:" + "x".join(map(str, l1))}
                         for r in timed)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="did the sweep run"):
        train_throughput.main(["--quick", "--impls", "triton", "--tuned", str(tmp_path / "missing.json")])


def test_train_throughput_compile_tok_compiles_the_model_and_the_tokenizer(monkeypatch):
    """compile+tok: the compile peer with its tokenizer under torch.compile too (torch.compile replaced by a
    recorder here: a real compile takes minutes on the CPU)."""
    import train_throughput

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(getattr(fn, "__name__", type(fn).__name__))
                        or fn)  # fmt: skip
    rows = train_throughput.main(["--quick", "--impls", "compile+tok"])
    assert not [r for r in rows if r["metric"] == "error"], rows
    assert {r["provider"] for r in rows} == {"compile+tok"}
    assert {r["mode"] for r in rows if r["metric"] == "throughput"} == {"with tokenizer", "model only"}
    assert compiled == ["MIMStep", "_logits_any"]


def test_summary_targets_count_compile_tok_among_the_peers():
    def r(provider, p50, metric="throughput"):
        return dict(kernel="train_step", provider=provider, mode="with tokenizer", metric=metric, p50=p50)

    text = summarize.targets([r("ref", 1000.0), r("compile", 1500.0), r("compile+tok", 1700.0), r("triton", 2000.0)])
    assert "images/s vs compile+tok (best of compile, compile+tok) | 1.18 | >= 1.15 | met" in text


def test_train_throughput_overlap_runs_the_tokenizer_one_batch_ahead(monkeypatch):
    """triton+overlap on the CPU (one stream): each step consumes the tokens made during the step before, and
    makes the next batch's; the rows are the whole step's, with the tokenizer only."""
    import train_throughput

    from beit.tokenizer.dalle import DalleEncoder

    calls = []
    real = DalleEncoder.get_codebook_indices

    def spy(self, images, positions=None):
        calls.append(positions is not None)
        return real(self, images, positions=positions)

    monkeypatch.setattr(DalleEncoder, "get_codebook_indices", spy)
    rows = train_throughput.main(["--quick", "--impls", "triton+overlap", "--steps", "2", "--warmup", "1"])
    assert not [r for r in rows if r["metric"] == "error"], rows
    assert {r["mode"] for r in rows} == {"with tokenizer"}
    assert {"time", "throughput", "step_time"} <= {r["metric"] for r in rows}
    assert not {"tokenizer_time", "forward_time"} & {r["metric"] for r in rows}
    # The prologue, then one a step (1 warm-up + 2 timed), each on the masked positions only.
    assert calls == [True] * 4
    with pytest.raises(SystemExit):
        train_throughput.main(["--quick", "--impls", "triton+overlap,nope"])
    rows = train_throughput.main(["--quick", "--impls", "triton+overlap", "--tokenizer", "none"])
    assert [r["note"] for r in rows if r["metric"] == "error"] == [
        "ValueError: triton+overlap overlaps the tokenizer: it needs --tokenizer dalle"]


@pytest.mark.gpu
def test_gpu_train_throughput_overlap_on_two_streams():
    """triton+overlap on a GPU: the side stream's tokens reach the main stream's step (tiny model)."""
    import train_throughput

    rows = train_throughput.main(["--quick", "--impls", "triton+overlap,triton", "--steps", "3", "--warmup", "1"])
    assert not [r for r in rows if r["metric"] == "error"], rows
    notes = {r.get("note") for r in rows if r["provider"] == "triton+overlap" and r["metric"] == "time"}
    assert notes == {"the next batch's tokenizer on a side stream: no per-phase split"}


def test_apply_tuning_refuses_rows_of_mixed_runs():
    import apply_tuning
    import tune_glue

    l0, l1 = tune_glue.CANDIDATES["ln_bwd"][:2]
    rows = [_sweep_row("ln_bwd", l0, 1.0), _sweep_row("ln_bwd", l1, 0.9)]
    with pytest.raises(ValueError, match="two baseline rows"):
        apply_tuning.choose(rows + rows)  # the same sweep passed twice
    other = dict(_sweep_row("ln_bwd", l1, 0.5), dtype="float16")
    with pytest.raises(ValueError, match="several shapes or dtypes"):
        apply_tuning.choose(rows + [other])


def test_write_rows_replaces_the_file_whole(tmp_path):
    out = tmp_path / "rows.json"
    harness.write_rows([{"a": 1}], out)
    harness.write_rows([{"a": 1}, {"a": 2}], out)
    assert json.loads(out.read_text()) == [{"a": 1}, {"a": 2}]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]  # no temporary file left


def test_tune_attention_lists_the_sm90_defaults_first(monkeypatch):
    """apply_tuning.py takes each attention sweep's first candidate as the H100's default (bf16, D=64)."""
    import tune_attention

    from beit_kernels import tuning

    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    for kind, cands in tune_attention.CANDIDATES.items():
        assert tune_attention._config(cands[0]) == tuning.attention_tile(kind, 64, torch.bfloat16, 227 * 1024), kind
    assert all(scales[0] == 1 for scales in tune_attention.GROUP_SCALES.values())
