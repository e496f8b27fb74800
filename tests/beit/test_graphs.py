"""--cuda-graph (beit.graphs): the option's checks and the captured step's code, run eagerly, against the trainer's
eager step (CPU); on a GPU, captured training against eager training, non-finite steps, fp16 loss scaling, resume,
and the learning rate and drop path changing between replays."""

import contextlib
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _testutil import HostSyncs, make_train_assets, tiny_run_args

import beit
from beit.engine import Faults, Metrics, MIMInputs, MIMStep, train_step
from beit.graphs import CudaGraphStep
from beit.masking import MaskingGenerator, generate_masks
from beit.optim import cosine_scheduler, fused_adamw
from beit.tokenizer.kmeans import KMeansTokenizer
from beit.train import main, parse_args, train
from beit.train_state import list_checkpoints, load_checkpoint

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# The option


def test_cuda_graph_is_refused_with_a_clear_error_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    base = ["--data", "d", "--tokenizer", "kmeans:t", "--output-dir", str(out), "--cuda-graph"]

    def refused(extra, message):
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err, err

    refused(["--impl", "ref"], "cannot capture --impl ref")
    refused(["--compile"], "--cuda-graph and --compile do not combine")
    refused(["--device", "cpu"], "--cuda-graph needs a CUDA device")
    if not torch.cuda.is_available():
        refused([], "--cuda-graph needs a CUDA device")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    refused(["--impl", "sdpa"], "--cuda-graph runs on one GPU only")
    monkeypatch.delenv("WORLD_SIZE")
    assert not out.exists()  # refused while parsing: nothing written, no device touched
    args = parse_args(base[:-1] + ["--impl", "ref", "--compile"])  # the same options without the flag are fine
    assert args.cuda_graph is False


def test_cuda_graph_on_the_cpu_exits_non_zero_from_the_command_line(tmp_path):
    cmd = [sys.executable, "-m", "beit.train", "--demo", "--cuda-graph", "--device", "cpu",
           "--output-dir", str(tmp_path / "demo")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--cuda-graph needs a CUDA device" in proc.stderr
    assert not (tmp_path / "demo").exists()


# ----------------------------------------------------------------------------------------------------------------
# The captured step's code, run eagerly on the CPU, against the trainer's eager step


def _setup(seed=0, batches=12, batch_size=4):
    g = torch.Generator().manual_seed(seed)
    tok = KMeansTokenizer(torch.rand(16, 3 * 8 * 8, generator=g) * 0.8 + 0.1, patch_size=8, input_size=32)
    tok.check_range = False  # as beit-pretrain loads it: the check's host sync cannot be captured
    gen = MaskingGenerator(4, 6, 2, rng=seed)
    data = []
    for _ in range(batches):
        bool_masked_pos, mask_index = generate_masks(gen, batch_size)
        data.append(
            dict(
                images=torch.randn(batch_size, 3, 64, 64, generator=g),
                tokenizer_images=torch.rand(batch_size, 3, 32, 32, generator=g) * 0.8 + 0.1,
                bool_masked_pos=bool_masked_pos,
                mask_index=mask_index,
            )
        )
    torch.manual_seed(seed)
    model = beit.create_model("beit_tiny_patch16_224", depth=2, img_size=64, vocab_size=16, impl="sdpa",
                              drop_path_rate=0.0)  # fmt: skip
    return tok, data, model


def _train(model, tok, data, lrs, wds, *, captured_code, accum=1, nan_at=(), scheduled=None, weight_decay=None):
    """``len(lrs)`` optimizer steps, either as the trainer's loop runs them or through CudaGraphStep (eagerly on
    the CPU). Returns the model, the metrics, the optimizer and the CudaGraphStep."""
    model = copy.deepcopy(model)
    opt = fused_adamw(model, float(lrs[0]), float(wds[0]) if weight_decay is None else weight_decay)
    decay_groups = [i for i, g in enumerate(opt.param_groups) if g["weight_decay"] > 0]
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    metrics = Metrics(CPU)
    amp = contextlib.nullcontext()
    step_module = MIMStep(model)
    faults = Faults(nan_at, device=CPU)
    gstep = None
    if captured_code:
        gstep = CudaGraphStep(
            step_module, tok, opt, scaler, metrics, amp=amp, precision="fp32", clip_grad=3.0, accum_steps=accum,
            decay_groups=decay_groups, loss_factor=faults.loss_factor,
            scheduled_weight_decay=bool(len(set(wds)) > 1) if scheduled is None else scheduled,
        )  # fmt: skip
    batches = iter(data)
    for step, (lr, wd) in enumerate(zip(lrs, wds)):
        faults.set_step(step)
        if gstep is not None:
            for micro in range(accum):
                gstep.load(micro, next(batches))
            gstep.step(float(lr), float(wd))
            continue
        for g in opt.param_groups:
            g["lr"] = float(lr)
            if g["weight_decay"] > 0:
                g["weight_decay"] = float(wd)
        assert train_step(step_module, MIMInputs(tok, CPU), batches, opt, scaler, metrics, amp=amp, precision="fp32",
                          clip_grad=3.0, accum_steps=accum, loss_factor=faults.loss_factor)  # fmt: skip
    return model, metrics, opt, gstep


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant-decay", "scheduled-decay"])
@pytest.mark.parametrize("accum", [1, 2])
def test_the_captured_code_computes_the_trainer_step(scheduled, accum):
    tok, data, model = _setup()
    steps = 5
    # Large lr and decay, so that a decay applied wrongly (or not at all) shows far above rounding.
    lrs = cosine_scheduler(1e-2, 1e-3, steps, 2)
    wds = cosine_scheduler(0.5, 0.1 if scheduled else 0.5, steps)
    eager, m_eager, opt_eager, _ = _train(model, tok, data, lrs, wds, captured_code=False, accum=accum)
    graph, m_graph, _, gstep = _train(model, tok, data, lrs, wds, captured_code=True, accum=accum)
    assert not gstep.captured  # no CUDA here: the same code, run eagerly
    assert (gstep.weight_decay is not None) == scheduled
    # The learning rate is a float32 tensor (rounded) and a scheduled decay a separate multiply: rounding apart.
    assert _max_diff(eager, graph) < 1e-6
    no_decay, _, _, _ = _train(model, tok, data, lrs, [0.0] * steps, captured_code=False, accum=accum,
                               weight_decay=0.5)  # fmt: skip
    assert _max_diff(eager, no_decay) > 1e-5  # the decay matters at this size, so the comparison above sees it
    torch.testing.assert_close(m_graph.sums, m_eager.sums, rtol=1e-6, atol=1e-6)
    assert torch.equal(m_graph.consecutive_nonfinite, m_eager.consecutive_nonfinite)
    # A checkpoint of the captured step holds what the eager trainer's holds, and an eager optimizer takes it.
    saved, expected = gstep.optimizer_state_dict(), opt_eager.state_dict()
    for g, e in zip(saved["param_groups"], expected["param_groups"]):
        assert isinstance(g["lr"], float) and g["lr"] == e["lr"]
        assert g["weight_decay"] == e["weight_decay"] and g["capturable"] is False
    fresh = fused_adamw(copy.deepcopy(model), 1e-3, 0.05)
    fresh.load_state_dict(copy.deepcopy(saved))
    assert all(isinstance(g["lr"], float) for g in fresh.param_groups)


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant-decay", "scheduled-decay"])
def test_an_injected_nonfinite_step_changes_nothing_and_is_counted(scheduled):
    tok, data, model = _setup()
    lrs, wds = [1e-2] * 4, ([0.5, 0.4, 0.3, 0.2] if scheduled else [0.5] * 4)
    before, _, _, _ = _train(model, tok, data, lrs[:2], wds[:2], captured_code=True, scheduled=scheduled)
    after, metrics, opt, gstep = _train(model, tok, data, lrs[:3], wds[:3], captured_code=True, nan_at=(2,),
                                        scheduled=scheduled)  # fmt: skip
    assert _max_diff(before, after) == 0  # neither the Adam update nor the decay ran
    assert all(s["step"].item() == 2 for s in opt.state.values())  # the step counts were not advanced either
    sums = dict(zip(Metrics.NAMES, metrics.sums.tolist()))
    assert (sums["steps"], sums["nonfinite"], metrics.consecutive_nonfinite.item()) == (3, 1, 1)
    assert all(torch.isfinite(v).all() for v in after.state_dict().values())


def test_the_captured_step_needs_static_shapes_a_fused_optimizer_and_no_range_check():
    tok, data, model = _setup(batches=2)
    opt = fused_adamw(model, 1e-3, 0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    gstep = CudaGraphStep(MIMStep(model), tok, opt, scaler, Metrics(CPU), amp=contextlib.nullcontext(),
                          precision="fp32", clip_grad=3.0)  # fmt: skip
    gstep.load(0, data[0])
    smaller = {k: v[:2] for k, v in data[1].items()}
    with pytest.raises(ValueError, match="static shapes"):
        gstep.load(0, smaller)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="fused optimizer"):
        CudaGraphStep(MIMStep(model), tok, plain, scaler, Metrics(CPU), amp=contextlib.nullcontext(),
                      precision="fp32", clip_grad=3.0)  # fmt: skip
    tok.check_range = True
    with pytest.raises(ValueError, match="check_range=False"):
        CudaGraphStep(MIMStep(model), tok, opt, scaler, Metrics(CPU), amp=contextlib.nullcontext(),
                      precision="fp32", clip_grad=3.0)  # fmt: skip


@torch.library.custom_op("beit_tests::syncs_inside", mutates_args=())
def _syncs_inside(x: torch.Tensor) -> torch.Tensor:
    return x * 2 if x.sum().item() > 0 else x.clone()  # a host sync hidden inside a custom op


def test_the_host_sync_watch_sees_inside_custom_ops():
    with HostSyncs() as watch:
        _syncs_inside(torch.ones(3))
    assert watch.custom_ops == ["beit_tests.syncs_inside"], watch.custom_ops
    assert {"aten.item", "aten._local_scalar_dense"} & set(watch.found), watch.found


@pytest.mark.parametrize("impl, clean", [("triton", True), ("sdpa", True), ("ref", False)])
def test_the_captured_step_never_waits_for_the_device(impl, clean):
    """The step a CUDA graph captures (tokenizer, forward, backward, unscale and clip, fused AdamW, the scaler's
    update, the metrics), run eagerly on the CPU with every op watched: the triton and sdpa paths contain nothing
    that would synchronise the host; the official path's boolean indexing would (which is why it is refused)."""
    tok, data, _ = _setup(batches=2)
    torch.manual_seed(0)
    model = beit.create_model("beit_tiny_patch16_224", depth=2, img_size=64, vocab_size=16, impl=impl,
                              drop_path_rate=0.1)  # fmt: skip
    opt = fused_adamw(model, 1e-3, 0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    gstep = CudaGraphStep(MIMStep(model), tok, opt, scaler, Metrics(CPU), amp=contextlib.nullcontext(),
                          precision="fp32", clip_grad=3.0, decay_groups=[0])  # fmt: skip
    gstep.load(0, data[0])
    gstep.step(1e-3, 0.05)  # the first step sets up the optimizer state
    gstep.load(0, data[1])
    with HostSyncs() as watch:
        gstep.step(1e-3, 0.05)
    if impl == "triton":  # the kernels' own ops were looked into
        assert any(op.startswith("beit_kernels.") for op in watch.custom_ops), watch.custom_ops
    if clean:
        assert watch.found == [], watch.found
    else:
        assert "aten.index (boolean index)" in watch.found, watch.found


def test_the_throughput_bench_runs_its_graph_variant(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import train_throughput

    rows = train_throughput.main(["--quick", "--impls", "sdpa+graph", "--tokenizer", "none",
                                  "--out", str(tmp_path / "train.json")])  # fmt: skip
    assert not [r for r in rows if r["metric"] == "error"], rows
    metrics = {r["metric"] for r in rows}
    assert {"time", "throughput", "step_time"} <= metrics
    assert not {"forward_time", "backward_time", "optimizer_time"} & metrics  # one replay has no phases
    ips = [r for r in rows if r["metric"] == "throughput"]
    assert len(ips) == 1 and ips[0]["p50"] > 0 and ips[0]["note"]


# ----------------------------------------------------------------------------------------------------------------
# On a GPU: captured training against eager training


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_train_assets(tmp_path_factory.mktemp("graph_assets"))


def gpu_args(assets, out, *extra):
    return tiny_run_args(assets, out, *extra, device="cuda")


def _run(argv) -> dict:
    return train(parse_args(argv))


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.double().flatten() for v in state.values() if v.is_floating_point()])


def _rel_diff(a: dict, b: dict) -> float:
    fa, fb = _flat(a), _flat(b)
    return ((fa - fb).norm() / fa.norm()).item()


@pytest.mark.gpu
def test_gpu_captured_training_matches_eager_training(assets, tmp_path):
    """fp32, no drop path, the same data and seed: ten steps of two micro-batches, three eager warm-up steps then
    seven replays; the triton path (auto on sm80+) and a scheduled weight decay (the pre-hook inside the graph)."""
    common = ["--precision", "fp32", "--drop-path", "0", "--steps", "10", "--impl", "auto",
              "--weight-decay-end", "0.01", "--accum-steps", "2", "--batch-size", "3"]  # fmt: skip
    eager = _run(gpu_args(assets, tmp_path / "eager", *common))
    graph = _run(gpu_args(assets, tmp_path / "graph", *common, "--cuda-graph"))
    assert graph["graph_captured"] and not eager["graph_captured"]
    # The lr is a float32 tensor in the graph (a python float when eager): rounding apart, the same training.
    # Ten steps at lr 1e-3 move the weights by several per cent, so a stale lr or a lost decay shows far above 1e-3.
    diff = _rel_diff(eager["model"].state_dict(), graph["model"].state_dict())
    print(f"relative L2 difference of the parameters, captured vs eager: {diff:.3g}")
    assert diff < 1e-3, diff
    for e, g in zip(eager["history"], graph["history"]):
        assert e["step"] == g["step"] and e["nonfinite_steps"] == g["nonfinite_steps"] == 0
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-3) and g["mim_acc"] == pytest.approx(e["mim_acc"], abs=0.05)


@pytest.mark.gpu
def test_gpu_captured_step_skips_nonfinite_steps_and_backs_off_the_fp16_scale(assets, tmp_path):
    # Step 1 is an eager warm-up step, step 6 a replay: both are skipped on the device and counted.
    res = _run(gpu_args(assets, tmp_path, "--precision", "fp16", "--impl", "sdpa", "--steps", "10",
                        "--cuda-graph", "--inject-nonfinite", "1", "6", "--log-interval", "1"))  # fmt: skip
    assert res["graph_captured"]
    skipped = {m["step"] - 1: m["nonfinite_steps"] for m in res["history"]}  # the log after step s says step s + 1
    assert skipped[1] == 1 and skipped[6] == 1, skipped
    # Step 0 runs at the initial 2^16 with its lm_head gradient at about 95% of fp16's range on this model (a CPU
    # simulation): it may overflow on its own, which the scaler handles as it should. No other may.
    assert all(n == 0 for s, n in skipped.items() if s not in (0, 1, 6)), skipped
    ckpt = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    # 2^16 halved by each skipped step (_amp_update_scale_ inside the graph); growth waits 2000 good steps.
    assert ckpt["scaler"]["scale"] <= 2.0**14, ckpt["scaler"]
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in ckpt["optimizer"]["param_groups"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
def test_gpu_captured_training_resumes_from_its_checkpoint(assets, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--precision", "bf16", "--drop-path", "0", "--steps", "9", "--cuda-graph"]
    whole = _run(gpu_args(assets, a, *common))
    assert "resumed from" not in capsys.readouterr().out
    assert main(gpu_args(assets, b, *common, "--inject-sigint", "4")) == 130  # after the capture (step 3)
    mid_path = list_checkpoints(b)[-1]
    mid = load_checkpoint(mid_path)
    assert mid["step"] == 4
    capsys.readouterr()
    resumed = _run(gpu_args(assets, b, *common))  # steps 4-6 eager warm-up, then the capture at step 7
    # The run really resumed at step 4: a run restarted at step 0 reaches nearly the same weights at this tolerance.
    assert f"resumed from {mid_path} at step 4 " in capsys.readouterr().out
    assert resumed["graph_captured"] and resumed["step"] == 9
    assert [m["step"] for m in resumed["history"]] == [5, 9]  # only what follows step 4 (log interval 5)
    diff = _rel_diff(whole["model"].state_dict(), resumed["model"].state_dict())
    print(f"relative L2 difference, resumed vs uninterrupted: {diff:.3g}")
    assert diff < 1e-2, diff  # bf16: the same training, up to the rounding of a different kernel order
    logs = [json.loads(x) for x in (b / "log.jsonl").read_text().splitlines()]
    assert logs[-1]["step"] == 9 and logs[-1]["nonfinite_steps"] == 0
    assert [m["step"] for m in logs] == [m["step"] for m in whole["history"]]  # log.jsonl continues, each step once
    ca, cb = (load_checkpoint(list_checkpoints(x)[-1]) for x in (a, b))
    assert ca["step"] == cb["step"] == 9
    assert ca["scaler"] == cb["scaler"]
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sorted(sa) == sorted(sb) and sa
    # Negative control: a resume with a fresh optimizer would count 5 steps, not 9, and its moments (beta2 0.999:
    # about 5/9 of the second moment) would be tens of per cent off; the moments compared are not zero.
    for i in sa:
        assert float(sa[i]["step"]) == float(sb[i]["step"]) == 9, i
        for key in ("exp_avg", "exp_avg_sq"):
            assert sb[i][key].abs().sum() > 0, (i, key)
    for key in ("exp_avg", "exp_avg_sq"):
        moment = _rel(torch.cat([sa[i][key].flatten() for i in sa]), torch.cat([sb[i][key].flatten() for i in sa]))
        print(f"relative L2 difference of {key}, resumed vs uninterrupted: {moment:.3g}")
        assert moment < 5e-2, (key, moment)


@pytest.mark.gpu
def test_gpu_replays_read_the_new_lr_and_draw_new_drop_paths(assets):
    """After the capture: lr 0 leaves every parameter bitwise unchanged, lr > 0 moves them (the schedule needs no
    recapture); with drop path, two replays on the same batch and weights give different losses (fresh Philox
    offsets per replay)."""
    device = torch.device("cuda")
    tok, data, _ = _setup(batches=1)
    tok = tok.to(device)
    batch = {k: v.to(device) for k, v in data[0].items()}
    torch.manual_seed(0)
    model = beit.create_model("beit_tiny_patch16_224", depth=2, img_size=64, vocab_size=16, impl="auto",
                              drop_path_rate=0.5).to(device)  # fmt: skip
    opt = fused_adamw(model, 1e-3, 0.05)
    scaler = torch.amp.GradScaler("cuda", init_scale=1.0)
    metrics = Metrics(device)
    gstep = CudaGraphStep(MIMStep(model), tok, opt, scaler, metrics, amp=torch.autocast("cuda", dtype=torch.bfloat16),
                          precision="bf16", clip_grad=3.0, decay_groups=[0], warmup_steps=2)  # fmt: skip
    gstep.load(0, batch)
    for _ in range(3):  # two eager warm-up steps, then the capture (and its first replay)
        gstep.step(1e-3, 0.05)
    assert gstep.captured
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    for _ in range(4):
        metrics.read()
        gstep.step(0.0, 0.05)
        losses.append(metrics.read()[0]["loss"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # One block drops, 4 samples: two replays draw the same masks with probability 1/16, four with 1/4096.
    assert len(set(losses)) > 1, losses
    gstep.step(1e-3, 0.05)
    torch.cuda.synchronize()
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
