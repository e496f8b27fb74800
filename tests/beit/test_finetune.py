"""The fine-tuning trainer on CPU: the step's loss, exact evaluation (one and two gloo processes), layer-wise decay
in the optimizer it builds, bitwise resume with mixup, cutmix, random erasing and a model EMA, and bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _testutil import HostSyncs, assert_same

from beit.classifier import create_classifier
from beit.data import make_synthetic
from beit.finetune import ClassifyStep, classifier_from_checkpoint, main
from beit.train_state import list_checkpoints, load_checkpoint

TRAIN, VAL = 30, 13  # 13: neither the batch (4) nor 2 ranks x batch divide it


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_data")
    make_synthetic(root / "train", num_images=TRAIN, classes=3, seed=0, size=(64, 56))
    make_synthetic(root / "val", num_images=VAL, classes=3, seed=1, size=(64, 56))
    return root


def args(data, out, *extra):
    return ["--data", str(data), "--output-dir", str(out), "--model", "beit_tiny_patch16_224", "--depth", "2",
            "--embed-dim", "32", "--num-heads", "2", "--image-size", "48", "--batch-size", "4", "--loader", "pil",
            "--rand-augment", "none", "--num-workers", "1", "--precision", "fp32", "--device", "cpu",
            "--no-progress", "--warmup-epochs", "1", "--log-interval", "2", *extra]  # fmt: skip


def evals(out):
    return [json.loads(x) for x in (Path(out) / "eval.jsonl").read_text().splitlines()]


def test_step_loss_is_the_mean_over_real_samples():
    torch.manual_seed(0)
    model = create_classifier("beit_tiny_patch16_224", num_classes=5, img_size=32, depth=1, embed_dim=16,
                              num_heads=2, impl="ref", init_scale=1.0)  # fmt: skip
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 4, 1])
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0])  # the third is loader padding
    step = ClassifyStep(model, smoothing=0.1)
    logits = model(x).double()
    logp = logits.log_softmax(-1)
    smooth = torch.full((4, 5), 0.1 / 5, dtype=torch.float64).scatter_(1, labels[:, None], 1 - 0.1 + 0.1 / 5)
    want = -(smooth * logp).sum(-1)[[0, 1, 3]].mean()
    loss, correct, count = step(x, labels, None, weights)
    assert torch.allclose(loss.double(), want, atol=1e-6) and count == 3
    assert correct == (logits.argmax(-1) == labels)[[0, 1, 3]].sum()
    targets = torch.softmax(torch.randn(4, 5), -1)
    loss, _, _ = step(x, labels, targets, weights)
    assert torch.allclose(loss.double(), -(targets.double() * logp).sum(-1)[[0, 1, 3]].mean(), atol=1e-6)
    # Without padding and mixing, the smoothed cross-entropy is PyTorch's.
    loss, _, _ = step(x, labels, None, torch.ones(4))
    assert torch.allclose(loss, F.cross_entropy(model(x), labels, label_smoothing=0.1), atol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "sdpa"])
def test_the_finetuning_step_never_waits_for_the_device(impl):
    """The whole step as beit-finetune runs it (random erasing, cutmix or mixup, forward, soft-target loss,
    backward, layer-decay AdamW, metrics, the EMA update), every op watched: nothing in it would synchronise the
    host on a GPU (the loop reads the metrics at log points only)."""
    import contextlib
    import random

    from beit.ema import ModelEma
    from beit.engine import Metrics, train_step
    from beit.finetune import ClassifyInputs
    from beit.mixup import Mixup, RandomErasing
    from beit.optim import fused_adamw

    torch.manual_seed(0)
    random.seed(0)
    model = create_classifier("beit_tiny_patch16_224", num_classes=5, img_size=32, depth=2, embed_dim=32,
                              num_heads=2, impl=impl, drop_path_rate=0.1)  # fmt: skip
    opt = fused_adamw(model, 1e-3, 0.05, layer_decay=0.65)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    ema = ModelEma(model, decay=0.9)
    prepare = ClassifyInputs(torch.device("cpu"), Mixup(num_classes=5), RandomErasing(probability=1.0))
    batch = {"images": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 4, 2, 1]),
             "valid": torch.tensor([True, True, True, False])}  # fmt: skip
    metrics = Metrics(torch.device("cpu"), accuracy_name="train_acc")

    def step():
        train_step(ClassifyStep(model, 0.1), prepare, [batch], opt, scaler, metrics, amp=contextlib.nullcontext(),
                   precision="fp32", clip_grad=0.0)  # fmt: skip
        ema.update(model)

    step()  # the optimizer's state is set up in the first step
    with HostSyncs() as watch:
        step()
    assert watch.found == [], watch.found
    if impl == "triton":
        assert any(op.startswith("beit_kernels.") for op in watch.custom_ops), watch.custom_ops


def test_finetune_evaluates_every_sample_once_and_keeps_the_best(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(data, out, "--epochs", "2", "--mixup", "0", "--cutmix", "0")) == 0
    ev = evals(out)
    assert [e["epoch"] for e in ev] == [1, 2] and all(e["count"] == VAL for e in ev)
    best = max(ev, key=lambda e: e["acc1"])
    model = classifier_from_checkpoint(out / "best.pth")
    assert model.num_classes == 3 and model.config.depth == 2
    capsys.readouterr()
    # --eval of the kept weights gives the evaluation they were kept for.
    assert main(args(data, tmp_path / "ev", "--eval", "--resume", str(out / "best.pth"))) == 0
    text = capsys.readouterr().out
    m = re.search(r"top-1 ([0-9.]+), top-5 ([0-9.]+), loss ([0-9.]+) on (\d+) images", text)
    assert m and int(m.group(4)) == VAL, text
    assert abs(float(m.group(1)) - best["acc1"]) < 1e-4 and abs(float(m.group(3)) - best["loss"]) < 1e-3
    # Correct counts are whole numbers of the 13 images.
    assert all(abs(e["acc1"] * VAL - round(e["acc1"] * VAL)) < 1e-9 for e in ev)


def test_optimizer_groups_carry_the_official_layer_decay(data, tmp_path):
    out = tmp_path / "run"
    assert main(args(data, out, "--steps", "3", "--warmup-steps", "0", "--lr", "1e-3", "--layer-decay", "0.5",
                      "--mixup", "0", "--cutmix", "0", "--eval-interval", "0")) == 0  # fmt: skip
    ckpt = load_checkpoint(list_checkpoints(out)[-1])
    groups = ckpt["optimizer"]["param_groups"]
    names = ckpt["model"].keys()
    # Depth 2: patch_embed and cls_token layer 0 (scale 0.5^3), blocks.i layer i+1, the head and fc_norm layer 3.
    by_id = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert by_id == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}
    # The last step's lr: the cosine schedule at step 2 of 3 (no warm-up) times each group's scale.
    import math

    lr_now = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 2 / 3))
    for g in groups:
        assert g["lr"] == pytest.approx(lr_now * g["lr_scale"], rel=1e-9)
    assert any(n.startswith("blocks.1.attn.relative_position_bias_table") for n in names)


def test_interrupted_and_resumed_finetuning_is_bitwise_identical(data, tmp_path, capsys):
    """Mixup, cutmix, random erasing, drop path and the model EMA all draw random numbers: a resume that lost any
    of their states would diverge."""
    extra = ("--steps", "12", "--reprob", "0.5", "--drop-path", "0.1", "--model-ema", "--model-ema-decay", "0.9")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(args(data, a, *extra)) == 0
    # 30 images in batches of 4: 8 batches an epoch, so step 5 stops in the middle of the first epoch.
    assert main(args(data, b, *extra, "--inject-sigint", "5")) == 130
    mid_path = list_checkpoints(b)[-1]
    mid = load_checkpoint(mid_path)
    assert (mid["step"], mid["epoch"], mid["batch_in_epoch"]) == (5, 0, 5)
    capsys.readouterr()
    assert main(args(data, b, *extra)) == 0
    assert f"resumed from {mid_path} at step 5 (epoch 0, batch 5)" in capsys.readouterr().out
    ca, cb = (load_checkpoint(list_checkpoints(x)[-1]) for x in (a, b))
    assert ca["step"] == cb["step"] == 12
    for key in ("model", "optimizer", "scaler", "rng", "model_ema", "evals", "best"):
        assert_same(ca[key], cb[key], key)
    assert [e["step"] for e in evals(b)] == [8, 12]  # each evaluation once, the one before the kill kept
    # The EMA is not the model, and the evaluations ran on the EMA.
    assert any(not torch.equal(ca["model"][k], v) for k, v in ca["model_ema"].items())


def test_repeated_augmentation_sees_each_kept_sample_k_times(data, tmp_path):
    from beit.finetune import finetune, parse_args

    a = parse_args(args(data, tmp_path / "ra", "--epochs", "1", "--repeated-aug", "2", "--eval-interval", "0",
                        "--mixup", "0", "--cutmix", "0"))  # fmt: skip
    seen = finetune(a, record_samples=True)["samples"][0]
    # 30 images, batch 4, one rank: 7 whole batches of copies (28 slots), the first 14 samples of the permutation
    # twice each, in a row (DeiT's RASampler on one GPU).
    assert len(seen) == 28 and all(seen[i] == seen[i + 1] for i in range(0, 28, 2))
    assert len(set(seen)) == 14


def test_two_gloo_processes_evaluate_each_sample_once(data, tmp_path):
    out = tmp_path / "run"
    assert main(args(data, out, "--steps", "2", "--eval-interval", "0", "--mixup", "0", "--cutmix", "0")) == 0
    single = evals(out)[-1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "beit.finetune"]
    cmd += args(data, tmp_path / "ev", "--eval", "--resume", str(out / "best.pth"), "--batch-size", "2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"top-1 ([0-9.]+), top-5 ([0-9.]+), loss ([0-9.]+) on (\d+) images", proc.stdout)
    assert m, proc.stdout
    # 13 images over 2 ranks in batches of 2: 4 batches each, 3 padding samples, none counted.
    assert int(m.group(4)) == VAL
    assert abs(float(m.group(1)) - single["acc1"]) < 1e-4 and abs(float(m.group(3)) - single["loss"]) < 1e-3


def test_bad_input_is_named_before_work(data, tmp_path, capsys):
    # A pretraining checkpoint of another width.
    other = create_classifier("beit_tiny_patch16_224", num_classes=3, img_size=48, depth=2, embed_dim=64,
                              num_heads=2, impl="ref")  # fmt: skip
    bad = tmp_path / "wide.pth"
    torch.save({"model": other.state_dict()}, bad)
    out = tmp_path / "run"
    assert main(args(data, out, "--steps", "2", "--finetune", str(bad))) == 2
    err = capsys.readouterr().err
    assert "wide.pth" in err and ("width" in err or "embed" in err), err
    assert not list_checkpoints(out)
    # A class count that does not match the data.
    assert main(args(data, tmp_path / "r2", "--steps", "2", "--num-classes", "5")) == 2
    assert "--num-classes 5" in capsys.readouterr().err
    # A validation folder with a class the training folder lacks.
    extra = tmp_path / "extra"
    make_synthetic(extra / "train", num_images=8, classes=2, seed=0, size=(64, 56))
    make_synthetic(extra / "val", num_images=6, classes=3, seed=1, size=(64, 56))
    assert main(args(extra, tmp_path / "r3", "--steps", "2")) == 2
    assert "class_002" in capsys.readouterr().err
    # An image size that is not a multiple of the patch size: the parser's error.
    with pytest.raises(SystemExit) as e:
        main(args(data, tmp_path / "r4", "--image-size", "50"))
    assert e.value.code == 2 and "multiple of the patch size" in capsys.readouterr().err
    # Evaluating a checkpoint without a head for these classes.
    assert main(args(data, tmp_path / "r5", "--eval", "--resume", str(bad))) == 2
    assert "wide.pth" in capsys.readouterr().err
    # Evaluating a fine-tuned checkpoint of another class count: its head would be re-initialised, so refused.
    ten = create_classifier("beit_tiny_patch16_224", num_classes=10, img_size=48, depth=2, embed_dim=32,
                            num_heads=2, impl="ref")  # fmt: skip
    torch.save({"model": ten.state_dict()}, tmp_path / "ten.pth")
    assert main(args(data, tmp_path / "r6", "--eval", "--resume", str(tmp_path / "ten.pth"))) == 2
    err = capsys.readouterr().err
    assert "ten.pth has no classification head for this model's 3 classes" in err and "10 classes" in err, err


@pytest.mark.slow
def test_demo_end_to_end(pretraining_demo, tmp_path):
    """beit-finetune --demo: the pretraining demo's checkpoint fine-tuned against the same classifier from scratch,
    the paper's Figure 5 in miniature. Pretraining must show: seeds 0 to 2 measured 0.845-0.89 against 0.59-0.675."""
    out = tmp_path / "ft_demo"
    assert main(["--demo", "--demo-pretrain-dir", str(pretraining_demo), "--output-dir", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    summary = json.loads((out / "finetune_demo.json").read_text())
    pre, scr = summary["pretrained"], summary["scratch"]
    assert [e["epoch"] for e in pre["evals"]] == [e["epoch"] for e in scr["evals"]] == [1, 2, 3, 4, 5]
    assert pre["evals"][-1]["count"] == scr["evals"][-1]["count"] == 200  # half of the 400 demo images
    assert pre["final_acc1"] > scr["final_acc1"] + 0.1, summary
    assert summary["pretraining_checkpoint"] == str(list_checkpoints(pretraining_demo)[-1])
    from PIL import Image

    with Image.open(out / "figure5.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    for name in ("pretrained", "scratch"):
        assert (out / name / "best.pth").is_file() and evals(out / name)[-1]["acc1"] == summary[name]["final_acc1"]


@pytest.mark.parametrize("dali, want", [(False, ("pil", "cpu")), (True, ("dali", "gpu"))])
def test_loader_auto_on_a_gpu_run_takes_dali_or_the_pil_loader(data, dali, want, monkeypatch):
    """--loader auto as beit-pretrain's: DALI on the training GPU where DALI is installed, else the PIL loader on
    the CPU (not an error for the missing DALI)."""
    import beit.finetune_data as fd
    from beit.distributed import Dist
    from beit.finetune import parse_args

    calls = []
    monkeypatch.setattr(fd, "dali_available", lambda: dali)
    monkeypatch.setattr(fd, "build_classification_loader", lambda src, bs, **kw: calls.append((kw["backend"],
                                                                                             kw["device"])))
    fd.build_loaders(parse_args(args(data, "/nonexistent", "--loader", "auto")), Dist(device=torch.device("cuda", 0)))
    assert calls == [want, want]
