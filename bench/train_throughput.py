"""The BEiT pretraining step, end to end, on synthetic device-resident data: images per second per implementation.

One step is what ``beit-pretrain`` runs: the tokenizer on the 112 px view (no_grad), the model's MIM loss on the
224 px view, backward, gradient clipping, a fused AdamW step. Data are generated once on the device (images,
tokenizer views, official blockwise masks and their padded index), so the loader is not measured. Each
implementation runs in this process on this device, so their ratios are like for like.

Implementations:
    ref             the official code path: explicit softmax attention, Conv2d patch embedding, boolean gather,
                    Linear plus CrossEntropy; the DALL-E tokenizer in fp16 (the official module's own cast) and
                    in the official module's NCHW layout
    sdpa            F.scaled_dot_product_attention with the bias as attn_mask, padded static-shape head
    compile         torch.compile of the sdpa path (what a user would pick instead)
    triton          our kernels: patch embedding, attention with the bias gradient, gather + LayerNorm, linear CE,
                    and the blocks' glue (residual add + layer scale + drop path + LayerNorm; fc1 bias + GELU)
    triton+compile  the triton path under torch.compile with the glue left to inductor (our other ops are opaque
                    custom ops: no graph break); against "triton" it tells which way of fusing the glue is faster
    triton+graph    the triton path with the whole step captured in one CUDA graph and replayed (beit.graphs, the
                    trainer's --cuda-graph); sdpa+graph on request (--impls)
    triton+overlap  triton with the tokenizer one batch ahead on a second CUDA stream (on request): the tokens of
                    batch i+1 are computed while batch i's forward, backward and optimizer run, so the tokenizer's
                    convolutions (compute-bound) can share the GPU with the model's memory-bound kernels. A
                    trainer would need the next batch a step early (a loader's prefetch). Its peak memory holds
                    the tokenizer's working memory and the model's at once. Whole step only; with the tokenizer
                    only; no largest-batch search
    compile+tok     compile with the tokenizer under torch.compile too (on request): inductor fuses its glue, the
                    peer of our fused tokenizer glue
Every implementation other than ref runs the tokenizer in bf16 with channels_last, as beit-pretrain does; the
triton ones with its glue fused by ``beit_kernels.conv_epilogue`` (beit-pretrain's default on CUDA), sdpa and
compile with the glue in PyTorch ops (``bench_tokenizer.py`` times both).

Reported per implementation, with and without the tokenizer: ms per step by phase (tokenizer, forward, backward,
optimizer; CUDA events), images per second, peak memory, and MFU with the model's and the tokenizer's FLOPs counted
separately (beit.flops; peak from the device name). ``--max-batch`` also searches the largest batch that fits,
after the timed run is freed. Implementations run one after another and each is freed (and collected) before the
next, so none counts in another's peak memory.
A graph variant reports the whole step only: one replay has no phase boundaries to put events between. Its peak
memory spans the eager warm-up and the capture, whose private pool keeps the activations' memory between replays;
``--max-batch`` skips it (an out-of-memory error inside a capture leaves no usable graph to bisect with). Without
CUDA (``--quick`` on the CPU) a graph variant runs the captured code eagerly, as a smoke run of that code path.
Every step, eager or replayed, is the trainer's ``beit.engine.train_step``, metric sums included.

    python bench/train_throughput.py --out results/train.json                 # GPU: BEiT-B/16, batch 256, bf16
    python bench/train_throughput.py --quick                                  # CPU smoke run of the harness

The DALL-E tokenizer has random weights here (its real weights are a download): its cost does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU smoke runs: Triton's interpreter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

import beit  # noqa: E402
from beit.engine import Metrics, MIMStep, train_step  # noqa: E402
from beit.flops import peak_flops, tokenizer_flops_per_image, train_flops_per_image  # noqa: E402
from beit.masking import MaskingGenerator, generate_masks  # noqa: E402
from beit.optim import fused_adamw  # noqa: E402
from beit.precision import autocast, grad_scaler  # noqa: E402

IMPLS = ("ref", "sdpa", "compile", "triton", "triton+compile", "triton+graph")  # the default list
EXTRA_IMPLS = ("sdpa+graph", "compile+tok", "triton+overlap")
OVERLAP = "triton+overlap"
GRAPH_SUFFIX = "+graph"


def make_tokenizer(kind: str, size: int, device, precision: str, quick: bool, channels_last: bool = True,
                   fused: bool = False, compile: bool = False):  # fmt: skip
    if kind == "none":
        return None
    from beit.tokenizer.dalle import DalleEncoder

    enc = DalleEncoder(n_hid=64 if quick else 256, vocab_size=512 if quick else 8192).to(device)
    # No input range check, as beit-pretrain loads its tokenizer: the check costs a host sync per step, and a
    # CUDA graph cannot capture it.
    cl = channels_last and device.type == "cuda"
    enc.configure(precision=precision, channels_last=cl, fused=fused and cl, check_range=False, compile=compile)
    return enc


def make_data(batch: int, image_size: int, grid: int, num_mask: int, min_mask: int, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
    tok_images = (torch.rand(batch, 3, image_size // 2, image_size // 2, generator=g) * 0.8 + 0.1).to(device)
    gen = MaskingGenerator(grid, num_mask, min_mask, rng=0)
    bool_masked_pos, mask_index = generate_masks(gen, batch, device=device)
    return images, tok_images, bool_masked_pos, mask_index


def run_impl(impl: str, args, device, env, rows: list[dict] | None = None) -> list[dict]:
    """The rows of one implementation, appended to ``rows`` as they are measured (a run stopped by a time limit
    keeps the modes it finished) and returned."""
    quick = args.quick
    graph = impl.endswith(GRAPH_SUFFIX)
    base = impl[: -len(GRAPH_SUFFIX)] if graph else impl
    compile_tokenizer, overlap = base == "compile+tok", base == OVERLAP
    base = {"compile+tok": "compile", OVERLAP: "triton"}.get(base, base)
    model_impl = {"compile": "sdpa", "triton+compile": "triton"}.get(base, base)
    # The blocks' glue: our fused kernels in eager mode, inductor's fusions under torch.compile (the two ways the
    # issue allows; this benchmark is what picks one).
    overrides = dict(img_size=args.image_size, impl=model_impl, drop_path_rate=0.1, fused_glue=base != "triton+compile")
    if quick:
        overrides.update(depth=2, vocab_size=512)
    model = beit.create_model(args.model, **overrides).to(device)
    step_mod = MIMStep(model)
    if base.endswith("compile"):
        step_mod = torch.compile(step_mod)
    # The trainer's optimizer and step: fused AdamW behind a GradScaler that only carries the found-inf flag.
    opt = fused_adamw(model, 1e-4, 0.05)
    precision = "bf16" if device.type == "cuda" else "fp32"
    scaler = grad_scaler(precision, device)
    grid = args.image_size // 16
    num_mask = max(1, round(75 / 196 * grid * grid))
    data = make_data(args.batch, args.image_size, grid, num_mask, min(16, num_mask), device)
    images, tok_images, bool_masked_pos, mask_index = data
    # ref: the official module's fp16 cast and NCHW layout; the others: bf16, channels_last (beit-pretrain's), with
    # the glue fused by our conv_epilogue on the triton paths and in PyTorch ops on sdpa and compile.
    tokenizer = make_tokenizer(args.tokenizer, args.image_size // 2, device,
                               "fp16" if impl == "ref" and device.type == "cuda" else
                               ("bf16" if device.type == "cuda" else "fp32"), quick,
                               channels_last=impl != "ref", fused=base.startswith("triton"),
                               compile=compile_tokenizer)  # fmt: skip
    vocab = model.config.vocab_size
    fixed_tokens = torch.randint(0, vocab, (args.batch, grid * grid), device=device)
    metrics = Metrics(device)
    batch = dict(images=images, tokenizer_images=tok_images, bool_masked_pos=bool_masked_pos,
                 mask_index=mask_index, tokens=fixed_tokens)  # fmt: skip

    def timer():
        if device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(a, b):
        if device.type == "cuda":
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def tokenize():
        # ref tokenizes every patch, as the official script does; the others the masked ones only, as beit-pretrain
        # does (-1 elsewhere, never read; % keeps it a valid id all the same).
        positions = None if impl == "ref" else mask_index
        with torch.no_grad():
            return tokenizer.get_codebook_indices(tok_images, positions=positions).flatten(1) % vocab

    amp = autocast(precision, device)

    def one_step(with_tokenizer: bool, tokens: torch.Tensor | None = None):
        """One step (the trainer's ``train_step``), its phase boundaries as events; ``tokens`` given: this batch's,
        made elsewhere (overlap)."""
        marks = [timer()]

        def prepare(_):
            t = tokens
            if t is None:
                t = tokenize() if with_tokenizer and tokenizer is not None else fixed_tokens
            return images, bool_masked_pos, mask_index, t

        train_step(step_mod, prepare, [batch], opt, scaler, metrics, amp=amp, precision=precision, clip_grad=3.0,
                   mark=lambda phase: marks.append(timer()))  # fmt: skip
        return tuple(marks)  # before, then after the inputs, forward, backward and optimizer phases

    side = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None
    ahead = {}  # the next batch's tokens, computed on the side stream

    def tokenize_ahead():
        main = torch.cuda.current_stream(device) if side is not None else None
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if side is not None:
                side.wait_stream(main)  # the next batch's inputs, as a loader would hand them over on main
            ahead["tokens"] = tokenize()

    def overlapped_step():
        """One step on batch i with the tokenizer of batch i+1 running beside it; the events around the main
        stream's work (which first waits for batch i's tokens) give the whole step."""
        if "tokens" not in ahead:
            tokenize_ahead()  # the pipeline's prologue
        t0 = timer()
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)
            ahead["tokens"].record_stream(torch.cuda.current_stream(device))  # made on side, read on main
        tokens = ahead.pop("tokens")
        tokenize_ahead()
        return t0, one_step(False, tokens)[-1]

    def graph_steps(with_tokenizer: bool):
        """The captured step: warm-up and capture here, then a callable that replays it."""
        from beit.graphs import CudaGraphStep

        gstep = CudaGraphStep(step_mod, tokenizer if with_tokenizer else None, opt, scaler, metrics, amp=amp,
                              precision=precision, clip_grad=3.0, warmup_steps=args.warmup)  # fmt: skip
        gstep.load(0, batch)  # the data are static here: loaded once, as the eager steps read them in place
        for _ in range(gstep.warmup_steps + (1 if device.type == "cuda" else 0)):  # eager warm-up, then the capture
            gstep.step(1e-4, 0.05)
        if device.type == "cuda" and not gstep.captured:
            raise RuntimeError("the step was not captured after its warm-up")

        def replay():
            t0 = timer()
            gstep.step(1e-4, 0.05)
            return t0, timer()

        return gstep, replay

    rows = [] if rows is None else rows
    shape = dict(model=args.model, B=args.batch, image=args.image_size, masked=num_mask)
    modes = [True, False] if tokenizer is not None else [False]
    if overlap:
        if tokenizer is None:
            raise ValueError(f"{OVERLAP} overlaps the tokenizer: it needs --tokenizer dalle")
        modes = [True]  # model only, it is triton
    for with_tok in modes:
        mode = "with tokenizer" if with_tok else "model only"
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # a graph variant: the warm-up and capture count as well
        if graph:
            gstep, run_step = graph_steps(with_tok)
            note = ("one CUDA graph replay per step: no per-phase split" if gstep.captured else
                    "not captured (no CUDA device): the captured code run eagerly")  # fmt: skip
        else:
            if overlap:
                run_step = overlapped_step
                note = ("the next batch's tokenizer on a side stream: no per-phase split" if side is not None else
                        "no CUDA device: the tokenizer one batch ahead, on the one stream")  # fmt: skip
            else:
                run_step, note = (lambda w=with_tok: one_step(w)), None
            gstep = None
            for _ in range(args.warmup):
                run_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        phases = []
        if device.type == "cuda":
            torch.cuda.synchronize()  # the capture ends with a replay; the warm-up's last step may still run
        wall0 = time.perf_counter()
        for _ in range(args.steps):
            phases.append(run_step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - wall0) * 1e3 / args.steps
        ips = args.batch / (wall / 1e3)
        common = dict(shape=shape, dtype="bfloat16" if precision == "bf16" else "float32", env=env)
        extra = dict(note=note) if note else {}
        rows.append(harness.row("train_step", impl, mode, "time", "ms", wall, **common, **extra))
        rows.append(harness.row("train_step", impl, mode, "throughput", "images/s", ips, **common, **extra))
        if not (graph or overlap):
            per = {
                name: sum(elapsed(p[i], p[i + 1]) for p in phases) / len(phases)
                for i, name in enumerate(("tokenizer", "forward", "backward", "optimizer"))
            }
            for name, ms in per.items():
                rows.append(harness.row("train_step", impl, mode, f"{name}_time", "ms", ms, **common))
        else:
            # Events around each replay: the GPU time of the whole step, next to the wall time above.
            gpu_ms = sum(elapsed(a, b) for a, b in phases) / len(phases)
            rows.append(harness.row("train_step", impl, mode, "step_time", "ms", gpu_ms, **common, **extra))
        if device.type == "cuda":
            mem = torch.cuda.max_memory_allocated() / 2**20
            rows.append(harness.row("train_step", impl, mode, "peak_memory", "MiB", mem, **common))
            # What the caching allocator held at most, a graph's private pool included: what the process needs.
            reserved = torch.cuda.max_memory_reserved() / 2**20
            rows.append(harness.row("train_step", impl, mode, "peak_reserved", "MiB", reserved, **common))
        if args.profile and not (graph or overlap):
            rows += profile_kernels(lambda w=with_tok: one_step(w), args.profile, device, impl, mode, common)
        del gstep, run_step  # a graph keeps its memory pool until it is freed: before the next capture
        peak = peak_flops(device)
        if peak is not None:
            model_flops = train_flops_per_image(model.config, num_mask)
            rows.append(harness.row("train_step", impl, mode, "mfu_model", "", ips * model_flops / peak, **common))
            if with_tok:
                tok_flops = tokenizer_flops_per_image(tokenizer, args.image_size // 2,
                                                      None if impl == "ref" else mask_index.shape[1])  # fmt: skip
                rows.append(harness.row("train_step", impl, mode, "mfu_with_tokenizer", "",
                                        ips * (model_flops + tok_flops) / peak, **common))  # fmt: skip
    return rows


PROFILE_TOP = 40  # with the tokenizer, its convolutions take a good part of the list


def profile_kernels(step, steps: int, device, impl: str, mode: str, common: dict) -> list[dict]:
    """``steps`` more steps under torch.profiler: the ``PROFILE_TOP`` kernels by self GPU time (CPU ops on a
    CPU-only run), in ms per step, plus the total over every kernel. The kernel's name goes in ``note``."""
    ops = harness.profiled_ops(step, steps, device)
    total = sum(ms for _, ms, _ in ops)
    kind = "GPU kernels" if device.type == "cuda" else "CPU ops"
    rows = [harness.row("train_step_profile", impl, mode, "kernel_time_total", "ms/step", total, **common,
                        note=f"{kind}, {steps} profiled steps")]  # fmt: skip
    for name, ms, per_step in ops[:PROFILE_TOP]:
        rows.append(harness.row("train_step_profile", impl, mode, "kernel_time", "ms/step", ms, **common,
                                note=name[:160], calls_per_step=per_step, share=ms / total))  # fmt: skip
    return rows


def _out_of_memory(e: BaseException) -> bool:
    # cuBLAS and compiled code report running out of memory as RuntimeErrors of their own.
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower() or "ALLOC_FAILED" in str(e)


def _release(device) -> None:
    """Free what the last implementation held: its model can stay alive in a reference cycle until collected,
    and would count in the next one's peak memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_batch(impl: str, args, device, limit: int = 8192) -> tuple[int, bool]:
    """The largest batch (a multiple of 32) whose training step (two steps, model only) fits in memory: doubling
    from ``args.batch``, which has just run, then bisection. Returns (batch, whether ``limit`` stopped the search
    while batches still fit)."""

    def fits(b: int) -> bool:
        sub = argparse.Namespace(**dict(vars(args), batch=b, steps=1, warmup=1, max_batch=False, tokenizer="none",
                                            profile=0))  # fmt: skip
        try:
            run_impl(impl, sub, device, {})
            return True
        except Exception as e:
            if not _out_of_memory(e):
                raise
            return False
        finally:
            _release(device)

    lo = args.batch // 32 * 32  # it fitted with the tokenizer alongside
    hi = max(lo * 2, 32)
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo, True
    while hi - lo > 32:
        mid = (lo + hi) // 2 // 32 * 32
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="beit_base_patch16_224")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--tokenizer", default="dalle", choices=("dalle", "none"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-batch", action="store_true", help="also search the largest batch per implementation")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="profile STEPS more steps of each mode (eager implementations): the top kernels by GPU time")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes: a CPU smoke run")
    p.add_argument("--tuned", metavar="JSON[,JSON]",
                   help="install the winners of these tile sweeps (tune_glue.py, tune_attention.py rows) first: "
                        "see apply_tuning.py; every row records them under kernel_switches")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick or device.type == "cpu":
        args.quick = True
        args.model, args.batch, args.image_size = "beit_tiny_patch16_224", 2, 64
        args.steps, args.warmup = min(args.steps, 2), 1
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS + EXTRA_IMPLS]
    if unknown:
        p.error(f"unknown implementation(s) {unknown}: choose from {', '.join(IMPLS + EXTRA_IMPLS)}")
    # As beit-pretrain (and the official script) set it, for every implementation alike.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    with contextlib.ExitStack() as stack:
        if args.tuned:
            import apply_tuning

            apply_tuning.apply(args.tuned.split(","), stack)
        return _run_all(args, impls, device)


def _run_all(args, impls: list[str], device) -> list[dict]:
    env = harness.env_info(device)
    rows = []

    def error_row(impl, note):
        rows.append(harness.row("train_step", impl, "-", "error", "", None, shape={}, dtype=None, env=env, note=note))

    for impl in impls:
        try:
            run_impl(impl, args, device, env, rows)
            if args.max_batch and device.type == "cuda" and not impl.endswith(GRAPH_SUFFIX) and impl != OVERLAP:
                _release(device)  # nothing of the timed run may count against the searched batches
                best, capped = largest_batch(impl, args, device)
                note = dict(note="the search's limit, not memory, stopped it") if capped else {}
                rows.append(harness.row("train_step", impl, "model only", "max_batch", "images", best, env=env,
                                        shape=dict(model=args.model, image=args.image_size), dtype="bfloat16",
                                        capped=capped, **note))  # fmt: skip
        except KeyboardInterrupt:  # a stage's time limit (device_check.sh): keep what was measured, say so
            error_row(impl, "interrupted (time limit): the rows above are the modes it finished")
            if args.out:
                harness.write_rows(rows, args.out)
            raise
        except Exception as e:  # one implementation failing must not hide the others' numbers
            error_row(impl, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        _release(device)
        if args.out:
            harness.write_rows(rows, args.out)
    print(f"# train step on {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_sha']}")
    shown = [r for r in rows if r["metric"] in ("throughput", "time", "peak_memory", "error", "max_batch")]
    print(harness.format_table(shown, ("provider", "mode", "metric", "p50", "unit", "note")))
    profiled = [r for r in rows if r["kernel"] == "train_step_profile"]
    if profiled:
        print(harness.format_table(profiled, ("provider", "metric", "p50", "unit", "share", "calls_per_step", "note")))
    return rows


if __name__ == "__main__":
    main()
