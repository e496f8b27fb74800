"""The BEiT fine-tuning step, end to end, on synthetic device-resident data: images per second per implementation.

One step is what ``beit-finetune`` runs after its loader and its mixup/cutmix: the classifier
(``beit.create_classifier``, per-block relative position tables whose gradients every block computes, drop path
0.1, mean pooling, 1000 classes) under autocast, soft-target cross-entropy (``beit.finetune.ClassifyStep``),
backward, the fused AdamW step over the layer-decay parameter groups (``fused_adamw(..., layer_decay=0.65)``), the
GradScaler's found-inf flag and the metric sums: ``beit.engine.train_step``, as the trainer calls it. Images,
labels and soft targets (what mixup with label smoothing hands the loss) are generated once on the device, so the
loader and the batch augmentations are not measured. Every implementation runs in this process on this device, so
their ratios are like for like.

Shapes: BEiT-B/16 at 224 px, batch 256 (``beit_base_patch16_224``, 197 tokens) and at 384 px, batch 64
(``beit_base_patch16_384``, 577 tokens), one after the other; ``--image-size``, ``--batch`` and ``--model`` pick
others.

Implementations:
    ref             the official code path: explicit softmax attention, Conv2d patch embedding
    sdpa            F.scaled_dot_product_attention with the bias as attn_mask (its gradient: a dense
                    [B, H, N, N] bias gradient per block, reduced to the table)
    compile         torch.compile of the sdpa step (what a user would pick instead)
    triton          our kernels: patch embedding with the cls token, attention with the bias gradient reduced
                    in-kernel, the blocks' fused glue
    triton+graph    the triton step captured in one CUDA graph and replayed (``beit.graphs.CudaGraphStep``, given
                    the classifier's inputs and one learning-rate tensor per layer-decay group)
    on request (--impls): triton+compile (the triton path under torch.compile, the glue left to inductor),
                    sdpa+graph

Reported per implementation and shape: ms per step, images per second, ms per phase (forward, backward, optimizer;
CUDA events), peak memory, MFU (the classifier's FLOPs from beit.flops; peak from the device name), and per shape
the ratios the issue sets targets for: images/s of each triton variant over the best of sdpa and compile, and its
peak memory over sdpa's. A graph variant reports the whole step only (one replay has no phase boundaries), and its
peak memory spans the eager warm-up and the capture. Implementations run one after another, every shape of one
before the next, compile last by default (its cold compiles are the slowest part: a time limit then stops it
rather than the eager rows), and each is freed before the next, so none counts in another's peak memory.
``--profile N`` adds the top kernels of N more steps (train_throughput.py's profile). No largest-batch search here:
train_throughput.py's is written around its own step.

    python bench/finetune_throughput.py --out results/finetune.json      # GPU: both shapes, bf16
    python bench/finetune_throughput.py --quick                           # CPU smoke run of the harness
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU smoke runs: Triton's interpreter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import train_throughput  # noqa: E402

import beit  # noqa: E402
from beit.classifier import list_classifiers  # noqa: E402
from beit.engine import Metrics, train_step  # noqa: E402
from beit.finetune import ClassifyStep  # noqa: E402
from beit.flops import peak_flops, train_flops_per_image  # noqa: E402
from beit.graphs import CudaGraphStep  # noqa: E402
from beit.optim import fused_adamw  # noqa: E402
from beit.precision import autocast, grad_scaler  # noqa: E402

IMPLS = ("ref", "sdpa", "triton", "triton+graph", "compile")  # the default list, in the order run
EXTRA_IMPLS = ("triton+compile", "sdpa+graph")
GRAPH_SUFFIX = "+graph"
KERNEL = "finetune_step"
NUM_CLASSES = 1000
PATCH = 16
# The targets on one H100, by image size: images/s of triton over the best of sdpa and compile, and peak
# memory over sdpa's.
SPEED_TARGETS = {224: 1.15, 384: 1.3}
MEMORY_TARGETS = {384: 0.6}
TARGETS_LINE = ("targets (issue 21, one H100): triton >= 1.3x the best of sdpa and compile at 384 px, >= 1.15x at "
                "224 px; peak memory at 384 px <= 0.6x sdpa's")  # fmt: skip
# The recipe's values that shape the step's work (beit-finetune's defaults).
LR, WEIGHT_DECAY, MIXUP_LAM = 4e-3, 0.05, 0.7


def default_model(image_size: int) -> str:
    return "beit_base_patch16_384" if image_size == 384 else "beit_base_patch16_224"


def default_batch(image_size: int) -> int:
    return 64 if image_size >= 384 else 256


def classifier_flops_per_image(config) -> float:
    """Training FLOPs of the classifier per image: the encoder's (beit.flops, N + 1 tokens from the config's image
    size) and the head's, one pooled row times ``num_classes`` (the MIM head's count on one row with the class
    count as its vocabulary). Pooling and the final LayerNorm are left out, as beit.flops leaves out the norms."""
    view = SimpleNamespace(**config.to_dict(), vocab_size=config.num_classes)
    return train_flops_per_image(view, 1)


def make_data(batch: int, image_size: int, smoothing: float, device) -> dict:
    """Device-resident inputs of the step: images, labels, the soft targets mixup hands the loss (label-smoothed
    one-hots of each sample and the batch's mirror, mixed at a fixed ratio), and sample weights (no padding)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    off = smoothing / NUM_CLASSES
    one_hot = torch.full((batch, NUM_CLASSES), off).scatter_(1, labels[:, None], 1 - smoothing + off)
    targets = MIXUP_LAM * one_hot + (1 - MIXUP_LAM) * one_hot.flip(0)
    return dict(images=images.to(device), labels=labels.to(device), targets=targets.to(device),
                weights=torch.ones(batch, device=device))  # fmt: skip


INPUT_KEYS = ("images", "labels", "targets", "weights")


def prepare(batch: dict) -> tuple:
    """The step's ``prepare``: the batch already lies on the device."""
    return tuple(batch[k] for k in INPUT_KEYS)


class ClassifyGraphStep(CudaGraphStep):
    """``CudaGraphStep`` with the classifier's inputs (its static buffers and ``prepare`` are the MIM step's
    otherwise) and a learning-rate tensor per parameter group: the capture shares one among the groups, which would
    drop the layer-decay scales. ``step()`` is called without a schedule here, so the groups keep their rates."""

    def __init__(self, step_module, optimizer, scaler, metrics, **kwargs):
        rates = [float(g["lr"]) for g in optimizer.param_groups]
        super().__init__(step_module, None, optimizer, scaler, metrics, **kwargs)
        self.input_keys = INPUT_KEYS
        self.prepare = prepare
        for g, lr in zip(optimizer.param_groups, rates):
            g["lr"] = torch.full((), lr, dtype=torch.float32, device=self.device)


def run_impl(impl: str, shape: dict, args, device, env, rows: list[dict]) -> None:
    """The rows of one implementation at one shape, appended to ``rows``."""
    graph = impl.endswith(GRAPH_SUFFIX)
    base = impl[: -len(GRAPH_SUFFIX)] if graph else impl
    model_impl = {"compile": "sdpa", "triton+compile": "triton"}.get(base, base)
    overrides = dict(img_size=shape["image"], impl=model_impl, drop_path_rate=0.1,
                     fused_glue=base != "triton+compile")  # fmt: skip
    if args.quick:
        overrides.update(depth=1)  # a smoke run of the code path: one block runs every kernel the step has
    model = beit.create_classifier(shape["model"], num_classes=NUM_CLASSES, **overrides).to(device)
    step_mod = ClassifyStep(model, args.smoothing)
    if base.endswith("compile"):
        # dynamic=False: each shape is compiled for itself, never as a dynamic graph after seeing a second one.
        step_mod = torch.compile(step_mod, dynamic=False)
    opt = fused_adamw(model, LR, WEIGHT_DECAY, layer_decay=args.layer_decay)
    precision = "bf16" if device.type == "cuda" else "fp32"
    scaler = grad_scaler(precision, device)
    amp = autocast(precision, device)
    metrics = Metrics(device, accuracy_name="train_acc")
    batch = make_data(shape["B"], shape["image"], args.smoothing, device)
    cuda = device.type == "cuda"

    def timer():
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(a, b):
        return a.elapsed_time(b) if cuda else (b - a) * 1e3

    def one_step():
        """The trainer's step (fine-tuning clips no gradient by default), its phase boundaries as events."""
        marks = [timer()]
        train_step(step_mod, prepare, [batch], opt, scaler, metrics, amp=amp, precision=precision, clip_grad=0.0,
                   mark=lambda phase: marks.append(timer()))  # fmt: skip
        return tuple(marks)  # before, then after the inputs, forward, backward and optimizer phases

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # a graph variant: the warm-up and capture count as well
    gstep = None
    if graph:
        gstep = ClassifyGraphStep(step_mod, opt, scaler, metrics, amp=amp, precision=precision, clip_grad=0.0,
                                  warmup_steps=args.warmup)  # fmt: skip
        gstep.load(0, batch)  # static data: loaded once, as the eager steps read them in place
        for _ in range(gstep.warmup_steps + (1 if cuda else 0)):  # eager warm-up, then the capture
            gstep.step()
        if cuda and not gstep.captured:
            raise RuntimeError("the step was not captured after its warm-up")

        def run_step(g=gstep):
            t0 = timer()
            g.step()
            return t0, timer()

        note = ("one CUDA graph replay per step: no per-phase split" if gstep.captured else
                "not captured (no CUDA device): the captured code run eagerly")  # fmt: skip
    else:
        run_step, note = one_step, None
        for _ in range(args.warmup):
            run_step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
    marks = []
    if cuda:
        torch.cuda.synchronize()
    wall0 = time.perf_counter()
    for _ in range(args.steps):
        marks.append(run_step())
    if cuda:
        torch.cuda.synchronize()
    wall = (time.perf_counter() - wall0) * 1e3 / args.steps
    ips = shape["B"] / (wall / 1e3)
    common = dict(shape=shape, dtype="bfloat16" if precision == "bf16" else "float32", env=env)
    extra = dict(note=note) if note else {}
    rows.append(harness.row(KERNEL, impl, "step", "time", "ms", wall, **common, **extra))
    rows.append(harness.row(KERNEL, impl, "step", "throughput", "images/s", ips, **common, **extra))
    if graph:
        # Events around each replay: the GPU time of the whole step, next to the wall time above.
        gpu_ms = sum(elapsed(a, b) for a, b in marks) / len(marks)
        rows.append(harness.row(KERNEL, impl, "step", "step_time", "ms", gpu_ms, **common, **extra))
    else:
        for i, name in enumerate(("inputs", "forward", "backward", "optimizer")):
            if name != "inputs":  # the batch already lies on the device: nothing to time
                ms = sum(elapsed(m[i], m[i + 1]) for m in marks) / len(marks)
                rows.append(harness.row(KERNEL, impl, "step", f"{name}_time", "ms", ms, **common))
    if cuda:
        rows.append(harness.row(KERNEL, impl, "step", "peak_memory", "MiB",
                                torch.cuda.max_memory_allocated() / 2**20, **common))  # fmt: skip
        # What the caching allocator held at most, a graph's private pool included: what the process needs.
        rows.append(harness.row(KERNEL, impl, "step", "peak_reserved", "MiB",
                                torch.cuda.max_memory_reserved() / 2**20, **common))  # fmt: skip
    if args.profile and not graph:
        profiled = train_throughput.profile_kernels(one_step, args.profile, device, impl, "step", common)
        for r in profiled:
            r["kernel"] = KERNEL + "_profile"
        rows += profiled
    peak = peak_flops(device)
    if peak is not None:
        mfu = ips * classifier_flops_per_image(model.config) / peak
        rows.append(harness.row(KERNEL, impl, "step", "mfu", "", mfu, **common))
    del gstep, run_step  # a graph keeps its memory pool until it is freed: before the next capture


def _value(rows, impl, image, metric):
    found = [r["p50"] for r in rows if r["kernel"] == KERNEL and r["provider"] == impl and r["metric"] == metric
             and r["shape"].get("image") == image and r["p50"] is not None]  # fmt: skip
    return found[0] if found else None


def ratio_rows(rows: list[dict], shapes: list[dict], env) -> list[dict]:
    """Per shape, each triton variant against the issue's baselines measured in this run: images/s over the best of
    sdpa and compile (the faster one named in ``note``), and peak memory over sdpa's."""
    out = []
    for shape in shapes:
        image = shape["image"]
        common = dict(shape=shape, dtype=next((r["dtype"] for r in rows if r["kernel"] == KERNEL and r["dtype"]),
                                              None), env=env)  # fmt: skip
        baselines = {b: _value(rows, b, image, "throughput") for b in ("sdpa", "compile")}
        baselines = {b: v for b, v in baselines.items() if v is not None}
        sdpa_mem = _value(rows, "sdpa", image, "peak_memory")
        ours = sorted({r["provider"] for r in rows if r["kernel"] == KERNEL and r["provider"].startswith("triton")
                       and r["shape"].get("image") == image and r["metric"] == "throughput"})  # fmt: skip
        for impl in ours:
            if baselines:
                best = max(baselines, key=baselines.get)
                missing = sorted({"sdpa", "compile"} - set(baselines))
                note = f"best: {best}" + (f" ({', '.join(missing)} not measured)" if missing else "")
                out.append(harness.row(KERNEL, impl, "step", "speedup_vs_best_sdpa_compile", "x",
                                       _value(rows, impl, image, "throughput") / baselines[best], **common,
                                       target=SPEED_TARGETS.get(image), note=note))  # fmt: skip
            mem = _value(rows, impl, image, "peak_memory")
            if mem is not None and sdpa_mem:
                out.append(harness.row(KERNEL, impl, "step", "peak_memory_vs_sdpa", "x", mem / sdpa_mem, **common,
                                       target=MEMORY_TARGETS.get(image)))  # fmt: skip
    return out


def print_tables(rows: list[dict], env) -> None:
    print(f"# fine-tuning step on {env['device']}, torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['git_sha']}")  # fmt: skip
    table = []
    for r in rows:
        if r["kernel"] != KERNEL or r["metric"] not in ("throughput", "error"):
            continue
        image, impl = r["shape"].get("image"), r["provider"]

        def get(metric, image=image, impl=impl):
            return _value(rows, impl, image, metric)

        table.append(dict(image=image, B=r["shape"].get("B"), provider=impl, images_s=r["p50"], ms=get("time"),
                          forward=get("forward_time"), backward=get("backward_time"),
                          optimizer=get("optimizer_time"), peak_MiB=get("peak_memory"), mfu=get("mfu"),
                          note=r.get("note")))  # fmt: skip
    table.sort(key=lambda t: t["image"] or 0)  # by shape, the implementations in the order run
    print(harness.format_table(table, ("image", "B", "provider", "images_s", "ms", "forward", "backward", "optimizer",
                                       "peak_MiB", "mfu", "note")))  # fmt: skip
    ratios = [r for r in rows if r["metric"] in ("speedup_vs_best_sdpa_compile", "peak_memory_vs_sdpa")]
    if ratios:
        print(f"# {TARGETS_LINE}")
        shown = sorted((dict(r, image=r["shape"].get("image")) for r in ratios), key=lambda r: r["image"])
        print(harness.format_table(shown, ("image", "provider", "metric", "p50", "target", "note")))
    profiled = [dict(r, image=r["shape"].get("image")) for r in rows if r["kernel"] == KERNEL + "_profile"]
    if profiled:
        print(harness.format_table(profiled, ("image", "provider", "metric", "p50", "unit", "share", "note")))


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=_int_list, default=None, metavar="PX[,PX]",
                   help="image sizes, multiples of 16 (default 224,384; --quick 32,48)")
    p.add_argument("--batch", type=_int_list, default=None, metavar="B[,B]",
                   help="batch per image size, or one for all (default 256 below 384 px, 64 from 384 px; --quick 2)")
    p.add_argument("--model", default=None,
                   help="a beit.list_classifiers() name, built at each --image-size (default beit_base_patch16_384 "
                        "at 384 px, else beit_base_patch16_224; --quick a one-block beit_tiny_patch16_224)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (a graph variant: at least 1)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing folded into the soft targets")
    p.add_argument("--layer-decay", type=float, default=0.65)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="profile STEPS more steps of each eager implementation: the top kernels by GPU time")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes: a CPU smoke run")
    p.add_argument("--tuned", metavar="JSON[,JSON]",
                   help="install the winners of these tile sweeps first (see apply_tuning.py)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.quick = args.quick or device.type == "cpu"
    sizes = args.image_size or ([32, 48] if args.quick else [224, 384])
    bad = [s for s in sizes if s < PATCH or s % PATCH]
    if bad:
        p.error(f"--image-size must be a positive multiple of the patch size {PATCH}, got {bad}")
    batches = args.batch or [2 if args.quick else default_batch(s) for s in sizes]
    if len(batches) == 1:
        batches = batches * len(sizes)
    if len(batches) != len(sizes):
        p.error(f"--batch gives {len(batches)} sizes for {len(sizes)} image sizes: give one, or one per image size")
    if any(b < 1 for b in batches):
        p.error(f"--batch must be >= 1, got {batches}")
    if args.model is not None and args.model not in list_classifiers():
        p.error(f"--model {args.model!r} is not one of {', '.join(list_classifiers())}")
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if not 0 <= args.smoothing < 1:
        p.error(f"--smoothing must lie in [0, 1), got {args.smoothing}")
    if not 0 < args.layer_decay <= 1:
        p.error(f"--layer-decay must lie in (0, 1], got {args.layer_decay}")
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS + EXTRA_IMPLS]
    if unknown:
        p.error(f"unknown implementation(s) {unknown}: choose from {', '.join(IMPLS + EXTRA_IMPLS)}")
    if args.quick:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    shapes = []
    for s, b in zip(sizes, batches):
        model = args.model or ("beit_tiny_patch16_224" if args.quick else default_model(s))
        shapes.append(dict(model=model, B=b, image=s, tokens=(s // PATCH) ** 2 + 1, classes=NUM_CLASSES))
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as beit-finetune sets it
    with contextlib.ExitStack() as stack:
        if args.tuned:
            import apply_tuning

            apply_tuning.apply(args.tuned.split(","), stack)
        return _run_all(args, impls, shapes, device)


def _run_all(args, impls: list[str], shapes: list[dict], device) -> list[dict]:
    env = harness.env_info(device)
    rows: list[dict] = []

    def finish():
        done = rows + ratio_rows(rows, shapes, env)
        if args.out:
            harness.write_rows(done, args.out)
        return done

    for impl in impls:
        for shape in shapes:
            try:
                run_impl(impl, shape, args, device, env, rows)
            except KeyboardInterrupt:  # a stage's time limit (device_check.sh): keep what was measured, say so
                rows.append(harness.row(KERNEL, impl, "step", "error", "", None, shape=shape, dtype=None, env=env,
                                        note="interrupted (time limit): the rows above are what it finished"))
                print_tables(finish(), env)
                raise
            except Exception as e:  # one implementation failing must not hide the others' numbers
                rows.append(harness.row(KERNEL, impl, "step", "error", "", None, shape=shape, dtype=None, env=env,
                                        note=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"))
            if impl.endswith("compile"):
                torch._dynamo.reset()  # the next shape compiles afresh, as a process of its own would
            train_throughput._release(device)
            if args.out:
                harness.write_rows(rows, args.out)
    rows = finish()
    print_tables(rows, env)
    return rows


if __name__ == "__main__":
    main()
