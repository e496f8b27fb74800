"""The trainer on CPU: loss falls, bitwise resume, 2-process torchrun on gloo, faults, bad input, export."""

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _testutil import TRAIN_IMAGES, assert_same, make_train_assets, no_host_sync, tiny_run_args

from beit.errors import TrainingError
from beit.train import DEMO, main, parse_args
from beit.train_state import list_checkpoints, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_train_assets(tmp_path_factory.mktemp("train_assets"))


def common(assets, out, *extra):
    return tiny_run_args(assets, out, "--precision", "fp32", "--drop-path", "0.1", *extra)


def log_lines(out):
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_twenty_steps_lower_the_loss(assets, tmp_path):
    assert main(common(assets, tmp_path, "--steps", "20")) == 0
    logs = log_lines(tmp_path)
    assert [m["step"] for m in logs] == [5, 10, 15, 20]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert all(m["nonfinite_steps"] == 0 for m in logs)
    assert (tmp_path / "args.yaml").is_file()
    ckpt = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert ckpt["step"] == 20 and ckpt["args"]["steps"] == 20


def test_interrupted_and_resumed_run_is_bitwise_identical(assets, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(common(assets, a, "--steps", "20")) == 0
    assert "resumed from" not in capsys.readouterr().out
    # 40 images in batches of 6: 7 batches an epoch, so step 10 is in the middle of the second epoch.
    assert main(common(assets, b, "--steps", "20", "--inject-sigint", "10")) == 130
    mid_path = list_checkpoints(b)[-1]
    mid = load_checkpoint(mid_path)
    assert (mid["step"], mid["epoch"], mid["batch_in_epoch"]) == (10, 1, 3)
    assert [m["step"] for m in log_lines(b)] == [5, 10]
    capsys.readouterr()
    assert main(common(assets, b, "--steps", "20")) == 0
    # The second run really resumed at step 10 (a run that restarted at step 0 would reach the same weights).
    assert f"resumed from {mid_path} at step 10 (epoch 1, batch 3)" in capsys.readouterr().out
    # log.jsonl continues from there: each step once, with the losses of the uninterrupted run.
    la, lb = log_lines(a), log_lines(b)
    assert [m["step"] for m in lb] == [m["step"] for m in la] == [5, 10, 15, 20]
    assert [m["loss"] for m in lb] == [m["loss"] for m in la]
    ca, cb = (load_checkpoint(list_checkpoints(x)[-1]) for x in (a, b))
    assert ca["step"] == cb["step"] == 20
    for key in ("model", "optimizer", "scaler", "rng"):
        assert_same(ca[key], cb[key], key)
    # Negative control: the optimizer state compared is not trivial. A resume with a fresh optimizer would count
    # 10 steps, not 20, and its moments would differ; zero moments would match anything.
    states = cb["optimizer"]["state"]
    assert states and all(float(st["step"]) == 20 for st in states.values())
    assert all(st["exp_avg"].abs().sum() > 0 and st["exp_avg_sq"].abs().sum() > 0 for st in states.values())
    assert any(not torch.equal(st["exp_avg"], mid["optimizer"]["state"][i]["exp_avg"]) for i, st in states.items())
    assert not torch.equal(ca["rng"]["0"]["torch"], mid["rng"]["0"]["torch"])


def test_torchrun_two_processes_on_gloo(assets, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        textwrap.dedent(
            """
            import os, sys, torch
            import torch.distributed as dist
            from beit.train import parse_args, train
            args = parse_args(sys.argv[1:])
            res = train(args, record_samples=True)
            torch.save({"state": res["model"].state_dict(), "samples": res["samples"]},
                       os.path.join(args.output_dir, f"rank{os.environ['RANK']}.pt"))
            # As beit.train.main does: a gloo group left alive at exit can abort the process ("terminate called
            # without an active exception").
            dist.destroy_process_group()
            """
        )
    )
    out = tmp_path / "ddp"
    # 40 images, batch 6, 2 ranks: 4 steps an epoch; 8 steps are two whole epochs.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    cmd += common(assets, out, "--steps", "8", "--log-interval", "4")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    for epoch in (0, 1):
        s0, s1 = r0["samples"][epoch], r1["samples"][epoch]
        assert not set(s0) & set(s1)
        assert sorted(s0 + s1) == list(range(TRAIN_IMAGES))  # every sample once per epoch across the ranks
    # A folder another run holds: rank 0 is refused its lock, and rank 1 stops with it instead of waiting.
    from beit.train_state import RunFolderLock

    lock = RunFolderLock(out)
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "beit.train"]
        cmd += common(assets, out, "--steps", "9")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    finally:
        lock.release()
    assert proc.returncode != 0
    assert "another run is writing to" in proc.stderr and "rank 0 could not take its lock" in proc.stderr


def test_an_injected_nonfinite_loss_is_skipped_and_counted(assets, tmp_path):
    assert main(common(assets, tmp_path, "--steps", "10", "--inject-nonfinite", "3")) == 0
    logs = log_lines(tmp_path)
    assert sum(m["nonfinite_steps"] for m in logs) == 1
    state = load_checkpoint(list_checkpoints(tmp_path)[-1])["model"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_too_many_nonfinite_steps_stop_the_run(assets, tmp_path, capsys):
    args = common(assets, tmp_path, "--steps", "20", "--ckpt-interval", "2", "--log-interval", "1")
    args += ["--max-nonfinite", "3", "--inject-nonfinite", *map(str, range(4, 20))]
    assert main(args) == 2
    assert "non-finite steps in a row" in capsys.readouterr().err
    kept = list_checkpoints(tmp_path)
    assert kept and load_checkpoint(kept[-1])["step"] <= 6
    for path in kept:
        assert all(torch.isfinite(v).all() for v in load_checkpoint(path)["model"].values())


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_bad_input_gives_a_clear_error_and_loses_nothing(assets, tmp_path, capsys):
    data, tok = assets
    base = common(assets, tmp_path / "run", "--steps", "2")
    assert main(base) == 0
    saved = list_checkpoints(tmp_path / "run")[-1]
    before = _digest(saved)

    def fails(args, message):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err, err

    missing = list(base)
    missing[missing.index(str(data))] = str(tmp_path / "nope")
    fails(missing + ["--output-dir", str(tmp_path / "x")], "--data")
    (tmp_path / "empty").mkdir()
    empty = list(base)
    empty[empty.index(str(data))] = str(tmp_path / "empty")
    fails(empty + ["--output-dir", str(tmp_path / "y")], "--data")
    html = tmp_path / "tok.safetensors"
    html.write_text("<!DOCTYPE html><html>not found</html>")
    bad_tok = list(base)
    bad_tok[bad_tok.index(tok)] = f"kmeans:{html}"
    fails(bad_tok + ["--output-dir", str(tmp_path / "z")], "--tokenizer")
    fails(base + ["--depth", "3", "--steps", "4"], "does not fit this model")  # incompatible checkpoint
    fails(base + ["--global-batch-size", "7", "--accum-steps", "2"], "does not divide")
    with pytest.raises(SystemExit) as e:
        main(base + ["--precision", "fp8"])
    assert e.value.code == 2
    assert _digest(saved) == before and list_checkpoints(tmp_path / "run")[-1] == saved


def test_checkpoints_are_atomic_and_only_the_newest_are_kept(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint({"step": step, "w": torch.ones(3) * step}, tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000003.pth", "checkpoint-00000004.pth"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(TrainingError, match="lacks"):
        load_checkpoint(list_checkpoints(tmp_path)[-1])
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(TrainingError, match="not a readable training checkpoint"):
        load_checkpoint(tmp_path / "junk.pth")


def test_export_writes_loadable_layouts(assets, tmp_path):
    transformers = pytest.importorskip("transformers")
    from beit.export import main as export_main
    from beit.export import model_from_checkpoint

    assert main(common(assets, tmp_path / "run", "--steps", "2")) == 0
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    assert export_main([str(ckpt), str(tmp_path / "out")]) == 0
    model = model_from_checkpoint(ckpt).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        ours = model(x, mask)
        hf = transformers.BeitForMaskedImageModeling.from_pretrained(str(tmp_path / "out" / "hf")).eval()
        theirs = hf(pixel_values=x, bool_masked_pos=mask).logits[mask]
    assert (ours - theirs).abs().max() < 1e-4
    import beit

    again = beit.create_model("beit_tiny_patch16_224", depth=2, img_size=64, vocab_size=16)
    assert not beit.load_pretrained(again, tmp_path / "out" / "beit_unilm.pth").missing_keys
    assert not beit.load_pretrained(again, tmp_path / "out" / "model.safetensors").missing_keys


@pytest.mark.slow
def test_demo_end_to_end(pretraining_demo):
    """The README's main job: synthetic data, a fitted k-means tokenizer, a small BEiT; MIM accuracy well above
    the majority-token baseline; the outputs a user looks at; the linear probe runs on the result."""
    from beit.data import build_loader
    from beit.export import model_from_checkpoint
    from beit.linprobe import main as linprobe_main
    from beit.tokenizer import load_tokenizer

    out = pretraining_demo  # main(["--demo", "--output-dir", out, "--no-progress"]), run by the fixture
    logs = log_lines(out)
    assert logs[-1]["step"] == DEMO["steps"] and logs[-1]["loss"] < logs[0]["loss"]
    assert parse_args(["--config", str(out / "args.yaml")]).steps == DEMO["steps"]  # args.yaml works as a config
    # Chance: always predicting the most frequent token of the masked patches.
    tok = load_tokenizer(f"kmeans:{out / 'demo_tokenizer.safetensors'}")
    loader = build_loader(
        out / "demo_data",
        32,
        device="cpu",
        backend="reference",
        num_threads=1,
        image_size=96,
        tokenizer_size=48,
        masking=dict(input_size=6, num_masking_patches=14, min_num_patches=4),
    )
    counts = torch.zeros(tok.vocab_size)
    for batch in loader:
        tokens = tok.get_codebook_indices(batch["tokenizer_images"])
        counts += torch.bincount(tokens[batch["bool_masked_pos"]], minlength=tok.vocab_size)
    majority = (counts.max() / counts.sum()).item()
    assert logs[-1]["mim_acc"] > 2 * majority, (logs[-1]["mim_acc"], majority)
    ckpt = list_checkpoints(out)[-1]
    assert load_checkpoint(ckpt)["step"] == DEMO["steps"]
    try:
        import matplotlib  # noqa: F401

        assert (out / "curves.png").is_file()
    except ImportError:
        pass
    model = model_from_checkpoint(ckpt)
    assert model.config.depth == 4 and model.config.img_size == 96
    # The pretrained encoder beats a random one on the demo classes (measured 0.62-0.76 against 0.31-0.38).
    probe = json.loads((out / "linprobe.json").read_text())
    assert probe["pretrained"]["accuracy"] > probe["random_init"]["accuracy"] + 0.2, probe
    assert linprobe_main([str(ckpt), "--data", str(out / "demo_data"), "--random-init"]) == 0


def test_gradient_accumulation_runs_and_counts_every_micro_batch(assets, tmp_path):
    assert main(common(assets, tmp_path, "--steps", "4", "--accum-steps", "2", "--batch-size", "3",
                       "--log-interval", "2")) == 0  # fmt: skip
    logs = log_lines(tmp_path)
    assert [m["step"] for m in logs] == [2, 4]
    ckpt = load_checkpoint(list_checkpoints(tmp_path)[-1])
    # 4 steps of 2 micro-batches of 3 images: 8 batches consumed; 40 images in batches of 3 is 14 an epoch.
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (4, 0, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "sdpa"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_training_step_never_syncs(assets, impl, precision):
    """forward_backward + optimizer_step, as the trainer runs them, under set_sync_debug_mode("error")."""
    import beit
    from beit.data import build_loader
    from beit.engine import MIMInputs, MIMStep, forward_backward, optimizer_step
    from beit.optim import fused_adamw
    from beit.tokenizer import load_tokenizer

    data, tok = assets
    device = torch.device("cuda")
    model = beit.create_model("beit_tiny_patch16_224", depth=2, img_size=64, vocab_size=16, impl=impl).to(device)
    step_module = MIMStep(model)
    opt = fused_adamw(model, 1e-3, 0.05)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16 if precision == "fp16" else 1.0)
    tokenizer = load_tokenizer(tok, device=device, check_range=False)
    masking = dict(input_size=4, num_masking_patches=6, min_num_patches=2)
    loader = build_loader(data, 6, device="cpu", backend="reference", num_threads=1, image_size=64,
                          tokenizer_size=32, masking=masking)  # fmt: skip
    batches = [{k: v.to(device) for k, v in b.items()} for b, _ in zip(loader, range(3))]
    amp = torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    prepare = MIMInputs(tokenizer, device)
    forward_backward(step_module, prepare(batches[0]), amp, scaler, 1.0)  # warm-up: compile, allocate
    optimizer_step(opt, scaler, 3.0, precision)
    with no_host_sync():
        for b in batches[1:]:
            loss, correct, valid = forward_backward(step_module, prepare(b), amp, scaler, 1.0)
            grad_norm = optimizer_step(opt, scaler, 3.0, precision)
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and valid > 0
    # fp16 starts at a loss scale of 2^16, at which this tiny model's lm_head gradient may overflow (seen in a CPU
    # simulation): the scaler then skips the step and halves the scale, as it should.
    assert torch.isfinite(grad_norm) or (precision == "fp16" and scaler.get_scale() < 2.0**16)


def test_precision_and_argument_checks():
    from beit.precision import resolve_precision
    from beit.train import parse_args

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(TrainingError, match="fp16 autocast needs CUDA"):
        resolve_precision("fp16", cpu)
    for bad in (["--image-size", "200"], ["--batch-size", "0"], ["--model", "vit_huge"]):
        with pytest.raises(SystemExit):
            parse_args(["--data", "d", "--tokenizer", "kmeans:t", *bad])
    with pytest.raises(SystemExit):
        parse_args([])  # neither --data/--tokenizer nor --demo
    with pytest.raises(SystemExit):  # the interpreter's bf16 dot is wrong: refused before any work
        parse_args(["--data", "d", "--tokenizer", "kmeans:t", "--device", "cpu", "--impl", "triton", "--precision",
                    "bf16"])  # fmt: skip
    assert parse_args(["--data", "d", "--tokenizer", "kmeans:t", "--image-size", "208"]).image_size == 208
    assert parse_args(["--data", "d", "--tokenizer", "kmeans:t"]).tokenizer_fused == "auto"
    assert parse_args(["--data", "d", "--tokenizer", "kmeans:t", "--tokenizer-fused", "off"]).tokenizer_fused == "off"
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--tokenizer", "kmeans:t", "--tokenizer-fused", "yes"])


def test_yaml_config_sets_defaults_and_the_command_line_wins(tmp_path):
    from beit.train import parse_args

    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 7\nlr: 0.002\nbatch-size: 16\ndata: d\ntokenizer: kmeans:t\n")
    args = parse_args(["--config", str(cfg), "--lr", "0.003"])
    assert (args.steps, args.lr, args.batch_size, args.data) == (7, 0.003, 16, "d")
    (tmp_path / "bad.yaml").write_text("stepz: 7\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "bad.yaml")])
    # --demo's defaults fill only what neither the config nor the command line set.
    (tmp_path / "demo.yaml").write_text("demo: true\nsteps: 7\n")
    args = parse_args(["--config", str(tmp_path / "demo.yaml"), "--lr", "0.003"])
    assert (args.steps, args.lr, args.batch_size) == (7, 0.003, DEMO["batch_size"])


@pytest.mark.parametrize(
    "text,match",
    [
        ("precision: fp8\n", "precision: 'fp8' is not one of auto, bf16, fp16, fp32"),
        ("loader: foo\n", "loader: 'foo' is not one of"),
        ("tokenizer_fused: yes\n", "tokenizer_fused: True is not one of auto, on, off"),
        ("impl: fastest\n", "impl: 'fastest' is not one of"),
        ("lr: abc\n", "lr: 'abc' is not a number"),
        ("steps: 2.5\n", "steps: 2.5 is not an integer"),
        ("compile: 1\n", "compile: 1 is not true or false"),
        ("betas: [0.9]\n", r"betas: \[0.9\] is not a list of 2 values, each a number"),
    ],
)
def test_yaml_config_values_meet_the_command_line_checks(tmp_path, capsys, text, match):
    """set_defaults skips argparse's type and choice checks: a config file's values get them all the same."""
    from beit.train import parse_args

    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: d\ntokenizer: kmeans:t\n" + text)
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(cfg)])
    assert e.value.code == 2 and re.search(match, capsys.readouterr().err)
    cfg.write_text("data: d\ntokenizer: kmeans:t\nbetas: [0.9, 0.98]\ndepth: null\nlr: 1\ncompile: false\n")
    args = parse_args(["--config", str(cfg)])
    assert args.betas == [0.9, 0.98] and args.depth is None and args.lr == 1


@pytest.mark.parametrize(
    "bad,match",
    [
        (["--lr", "-1"], "--lr must be a finite number >= 0"),
        (["--lr", "nan"], "--lr must be a finite number >= 0"),
        (["--eps", "0"], "--eps must be a finite number > 0"),
        (["--betas", "1.5", "0.999"], r"--betas must lie in \[0, 1\)"),
        (["--warmup-epochs", "-3"], "--warmup-epochs must be a finite number >= 0"),
        (["--drop-path", "1.5"], r"--drop-path must lie in \[0, 1\)"),
        (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
        (["--min-lr", "-5"], "--min-lr must be a finite number >= 0"),
        (["--clip-grad", "-1"], "--clip-grad must be a finite number >= 0"),
        (["--ckpt-interval", "-2"], "--ckpt-interval must be a finite number >= 0"),
        (["--depth", "0"], "--depth must be >= 1"),
        (["--layer-scale", "-1"], "--layer-scale must be >= 0"),
        (["--num-mask-patches", "0"], "--num-mask-patches must be >= 1"),
        (["--num-mask-patches", "197"], r"num_masking_patches=197 must lie in \[0, 196\]"),
        (["--max-mask-patches", "0"], "max_num_patches=0 is below min_num_patches=16"),
        (["--min-mask-patches", "100"], "min_num_patches=100 exceeds num_masking_patches=75"),
        (["--min-mask-patches", "-40"], "min_num_patches must be >= 1"),
        (["--num-mask-patches", "196", "--min-mask-patches", "190"], "too large a block for a 14x14 grid"),
    ],
)
def test_numeric_options_are_range_checked_before_work(capsys, bad, match):
    from beit.train import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--data", "d", "--tokenizer", "kmeans:t", *bad])
    assert e.value.code == 2 and re.search(match, capsys.readouterr().err)


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    from beit.train import parse_args

    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--tokenizer", "kmeans:t", "--output-dir", str(tmp_path / "f")])
    assert "exists and is not a folder" in capsys.readouterr().err


def test_a_resume_that_would_repeat_samples_or_fork_the_history_is_refused(assets, tmp_path, capsys):
    run = tmp_path / "run"
    # 40 images in batches of 6: step 3 stops mid-epoch.
    assert main(common(assets, run, "--steps", "6", "--ckpt-interval", "2", "--keep-ckpts", "5",
                       "--inject-sigint", "3")) == 130  # fmt: skip
    mid = list_checkpoints(run)[-1]
    data = load_checkpoint(mid)["data"]
    assert (data["num_files"], data["world_size"], len(data["files_sha256"])) == (TRAIN_IMAGES, 1, 16)
    before = _digest(mid)
    assert main(common(assets, run, "--steps", "6", "--seed", "1")) == 2
    assert "stopped in the middle of epoch 0 (batch 3)" in capsys.readouterr().err
    assert main(common(assets, run, "--steps", "6", "--ckpt-interval", "2", "--keep-ckpts", "5")) == 0
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(run)] == [2, 3, 4, 6]
    # Rolling back to step 4 in the same folder would leave step 6 beside the new history.
    old = list_checkpoints(run)[2]
    assert main(common(assets, run, "--steps", "8", "--resume", str(old))) == 2
    assert "holds checkpoints newer than" in capsys.readouterr().err
    assert _digest(mid) == before and len(list_checkpoints(run)) == 4


def test_on_bad_file_error_stops_before_training_naming_the_file(assets, tmp_path, capsys):
    import shutil

    data, tok = assets
    messy = tmp_path / "data"
    shutil.copytree(data, messy)
    first = next(p for p in sorted(messy.rglob("*")) if p.is_file())
    bad = first.with_name("broken" + first.suffix)
    bad.write_bytes(b"not an image at all")
    args = common((messy, tok), tmp_path / "run", "--steps", "1")
    assert main(args + ["--on-bad-file", "error"]) == 2
    assert "broken" in capsys.readouterr().err and not list_checkpoints(tmp_path / "run")
    with pytest.warns(UserWarning, match="broken"):
        assert main(args) == 0  # the default leaves it out, naming it


@pytest.mark.parametrize("major", [7, 8])
def test_auto_precision_is_fp16_on_a_gpu_without_native_bf16(monkeypatch, major):
    """A V100 (sm70) emulates bf16, and torch.cuda.is_bf16_supported() says True there: auto must still pick fp16
    with loss scaling, and an explicit bf16 is refused."""
    from beit.precision import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    cuda = torch.device("cuda", 0)
    assert resolve_precision("auto", cuda) == ("fp16" if major < 8 else "bf16")
    if major < 8:
        with pytest.raises(TrainingError, match="no bf16"):
            resolve_precision("bf16", cuda)
