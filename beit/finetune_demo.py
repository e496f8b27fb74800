"""``beit-finetune --demo``: the paper's Figure 5 in miniature, on 2 CPU cores in a few minutes.

It fine-tunes the pretraining demo's checkpoint (``beit-pretrain --demo``, run first when its folder has no
checkpoint) on the demo's labelled images, and trains the same classifier from a random initialisation with the
same budget (steps, schedule, augmentation, seed); a seeded, stratified half of the images is held out for
validation. It writes ``OUTPUT_DIR/pretrained/`` and ``OUTPUT_DIR/scratch/`` (two ordinary fine-tuning runs),
``finetune_demo.json`` (both evaluation histories and final accuracies) and ``figure5.png`` (validation top-1
against epochs, BEiT fine-tuning against training from scratch).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path

from beit.distributed import Dist

DEMO = dict(
    model="beit_tiny_patch16_224",
    image_size=96,
    depth=4,
    batch_size=32,
    epochs=5,
    warmup_epochs=1,
    lr=2e-3,
    min_lr=1e-5,
    layer_decay=0.75,
    drop_path=0.0,
    mixup=0.0,
    cutmix=0.0,
    reprob=0.0,
    rand_augment="none",
    log_interval=10,
    num_workers=2,
    output_dir="runs/finetune_demo",
)
# The held-out fraction of the demo's labelled images: half, so that 200 images train (few labels per class, where
# pretraining shows) and 200 measure the accuracy to half a percent.
VAL_FRACTION = 0.5


def _pretraining_checkpoint(args: argparse.Namespace) -> Path:
    """The newest intact checkpoint of the pretraining demo, running that demo first when there is none."""
    from beit import train, train_state

    folder = Path(args.demo_pretrain_dir)
    found = [p for p in train_state.list_checkpoints(folder) if train_state.checkpoint_problem(p) is None]
    if not found:
        print(f"no pretraining checkpoint in {folder}: running beit-pretrain --demo there first", flush=True)
        argv = ["--demo", "--output-dir", str(folder), "--seed", str(args.seed), "--device", args.device]
        if not args.progress:
            argv.append("--no-progress")
        if train.main(argv) != 0:
            from beit.errors import TrainingError

            raise TrainingError(f"the pretraining demo in {folder} failed")
        found = train_state.list_checkpoints(folder)
    return found[-1]


def prepare_demo(args: argparse.Namespace, d: Dist) -> None:
    """Point ``args`` at the pretraining demo's data (its labelled images, split by ``VAL_FRACTION``)."""
    folder = Path(args.demo_pretrain_dir)
    if args.data is None:
        args.data = str(folder / "demo_data")
    if args.val_fraction is None:
        args.val_fraction = VAL_FRACTION


def run_demo(args: argparse.Namespace, finetune: Callable[[argparse.Namespace], dict]) -> dict:
    """Both runs (each ``finetune(args)``: ``beit.finetune.finetune``, passed in so that this module does not
    import the trainer that imports it), the JSON summary and the figure; returns the summary."""
    from beit.figures import line_chart
    from beit.linprobe import pretraining_normalization

    ckpt = _pretraining_checkpoint(args)
    out = Path(args.output_dir)
    runs = {}
    for name, start in (("pretrained", str(ckpt)), ("scratch", None)):
        run_args = copy.deepcopy(args)
        run_args.demo, run_args.finetune = True, start
        run_args.output_dir = str(out / name)
        run_args.normalization = pretraining_normalization(ckpt) or args.normalization
        print(f"fine-tuning demo: {name} ({'from ' + start if start else 'random initialisation'})", flush=True)
        runs[name] = finetune(run_args)
    summary = {
        name: {"final_acc1": r["evals"][-1]["acc1"], "best_acc1": r["best"]["acc1"],
               "evals": [{k: e[k] for k in ("epoch", "step", "acc1", "acc5", "loss", "count")} for e in r["evals"]]}
        for name, r in runs.items()
    }  # fmt: skip
    summary["pretraining_checkpoint"] = str(ckpt)
    (out / "finetune_demo.json").write_text(json.dumps(summary, indent=1))
    series = {
        label: ([e["epoch"] for e in summary[name]["evals"]], [e["acc1"] for e in summary[name]["evals"]])
        for name, label in (("pretrained", "BEiT fine-tuning"), ("scratch", "from scratch"))
    }
    line_chart(series, out / "figure5.png", title="Validation top-1 on the demo classes", xlabel="epoch",
               ylabel="top-1 accuracy", ylim=(0.0, 1.0))  # fmt: skip
    pre, scr = summary["pretrained"]["final_acc1"], summary["scratch"]["final_acc1"]
    n = summary["pretrained"]["evals"][-1]["count"]
    print(f"fine-tuning demo: top-1 after {args.epochs} epochs on {n} held-out images: pretrained {pre:.3f}, from "
          f"scratch {scr:.3f}; {out / 'figure5.png'}")  # fmt: skip
    return summary
