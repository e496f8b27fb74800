"""Host overhead of each custom op a BEiT training step calls: validation, dispatch, allocation, with every Triton
launch replaced by a no-op.

A GPU runs a kernel asynchronously; what the host spends before and after each launch (the public function's
checks, the autograd Function, the torch.library dispatch, the allocations, the small tensor ops of the launcher)
decides whether a short op's wall time is the GPU's or the host's. This times that host side on the CPU: each
``kernel[grid](...)`` launch is intercepted and counted instead of run (``JITFunction.run``, and
``InterpretedFunction.run`` when Triton's interpreter is on, as in a test session), so the output buffers stay as
``torch.empty`` left them. The device check (``check_kernel_device``, which refuses CPU tensors outside the
interpreter) is switched off as ``kernel_resources.py`` does, and so is the interpreter's bf16 check; on a GPU both
are one comparison.

What is not counted: Triton's own launch path (binding and specialising the arguments, the cache lookup, the
driver call: the launches column says how many a call makes), and the CUDA launches of the launchers' torch ops
(a fill, a sum, an assert). Torch ops still execute here, on the CPU and synchronously, so the tensors are made
small enough that their work is negligible next to their dispatch: the host side depends on the structure
(which ops run, how many chunks, groups and launches), not on the sizes. ``--shape host`` (the default) keeps
BEiT-B's structure at small sizes; ``--shape beit-b`` uses BEiT-B's sizes (B=256, 224 px, D=768, H=12, K=75 of
196, V=8192), where the torch ops' CPU work (zero fills of [B, T, D], the MIM head's GEMMs) is timed as well.

Per op (patch_embed with mask and cls, attention_qkvpacked with a [H, N, N] bias and its gradient, add_layer_norm
with branch, layer scale and drop path, bias_gelu, masked_gather with LayerNorm, linear_cross_entropy with counts,
and the DALL-E tokenizer's conv_epilogue, forward only) the median microseconds a call of the forward (with
autograd recording, as in training) and of forward plus backward (``torch.autograd.grad``), one thread, under bf16
autocast as the step runs them (the MIM head in fp32, see ``cases``), for ours and for ``beit_kernels.reference``
(the plain-PyTorch path the "sdpa" plan runs) at the same shapes, with the tuning of an H100. Each fwd+bwd row
includes one ``torch.autograd.grad`` call's fixed cost, which a step pays once for all its ops: the
``autograd_engine`` row times it alone. The calls of every row are taken in rounds over all the rows, so that on
a shared machine each row sees the same mix of the load.

    python bench/host_overhead.py --out results/host_overhead.json
    python bench/host_overhead.py --quick                                  # a few calls each
    python bench/host_overhead.py --ops masked_gather_ln --profile fwd     # cProfile of ours, by cumulative time
"""

from __future__ import annotations

import os
import sys

# As kernel_resources.py: without the interpreter the launchers take the GPU's code paths (tiles, checks). As a
# script only: a test session that imports this module runs the interpreter, and keeps it.
if __name__ == "__main__" and "triton" not in sys.modules:
    os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

import beit_kernels  # noqa: E402
from beit_kernels import reference, tuning  # noqa: E402

KERNEL_MODULES = ("attention", "bias_gelu", "conv_epilogue", "layer_norm", "masked_gather", "patch_embed",
                  "linear_cross_entropy")  # fmt: skip

# BEiT-B/16 pretraining (batch 256, 75 of 196 patches masked, the DALL-E vocabulary) and the same structure small.
SHAPES = {
    "beit-b": dict(B=256, img=224, p=16, D=768, H=12, K=75, V=8192, conv=(256, 2048, 14, 14)),
    "host": dict(B=4, img=64, p=16, D=64, H=4, K=6, V=128, conv=(2, 64, 8, 8)),
}
# The MIM head's rows a chunk at BEiT-B's shape: the small shape keeps its number of chunks.
BEIT_B_HEAD = dict(M=256 * 75, V=8192)
# The row of the autograd engine's own cost (``engine_case``).
ENGINE = "autograd_engine"
# As on an H100 (sm90): its shared memory a block picks the tiles, and its all-queries dk/dv kernel the backward.
H100 = {"shared_memory": 227 * 1024, "attention.dkdv_all_queries": True}


# ----------------------------------------------------------------------------------------------------------------
# The stub


@dataclass
class Launches:
    """Launches intercepted, by kernel name; ``real`` stays 0 (nothing reaches a real launch path)."""

    counts: dict[str, int] = field(default_factory=dict)

    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton launch counted instead of run; the device and interpreter-dtype checks off (CPU tensors stand
    for CUDA ones)."""
    launches = Launches()
    counts = launches.counts

    def run(self, *args, grid, warmup, **kwargs):
        name = self.fn.__name__
        counts[name] = counts.get(name, 0) + 1

    mods = [importlib.import_module(f"beit_kernels.{m}") for m in KERNEL_MODULES]
    saved = [(m, name, getattr(m, name)) for m in mods for name in ("check_kernel_device", "check_interpreter_dtype")
             if hasattr(m, name)]  # fmt: skip
    saved_runs = (JITFunction.run, InterpretedFunction.run)
    JITFunction.run = InterpretedFunction.run = run
    for m, name, _ in saved:
        setattr(m, name, lambda op, *a: None)
    try:
        yield launches
    finally:
        JITFunction.run, InterpretedFunction.run = saved_runs
        for m, name, fn in saved:
            setattr(m, name, fn)


# ----------------------------------------------------------------------------------------------------------------
# The ops, as the step calls them


@dataclass
class Case:
    kernel: str
    shape: dict
    dtype: str
    ours: Callable[[], object]
    reference: Callable[[], object]
    inputs: tuple = ()  # what fwd+bwd differentiates (empty: forward only)
    grads: Callable[[object], tuple] | None = None  # (outputs, grad_outputs) from a forward's result
    autocast: bool = True
    overrides: dict = field(default_factory=dict)


def _randn(*shape, dtype=torch.float32, grad=False, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_(grad)


def cases(shape: str) -> list[Case]:
    s = SHAPES[shape]
    B, img, p, D, H, K, V = (s[k] for k in ("B", "img", "p", "D", "H", "K", "V"))
    N = (img // p) ** 2
    T = N + 1
    bf16 = torch.bfloat16
    torch.manual_seed(0)
    out = []

    # Patch embedding with the mask blend, cls token and position embedding (fp32 images, bf16 autocast).
    images = _randn(B, 3, img, img)
    w, b, mt, cls, pos = (_randn(*sh, grad=True, scale=0.02) for sh in ((D, 3, p, p), (D,), (1, 1, D), (1, 1, D),
                                                                        (1, T, D)))  # fmt: skip
    mask = torch.rand(B, N) < K / N
    pe = dict(mask=mask, mask_token=mt, cls_token=cls, pos_embed=pos)
    g_pe = _randn(B, T, D, dtype=bf16)
    out.append(Case("patch_embed", dict(B=B, img=img, p=p, D=D), "bf16",
                    lambda: beit_kernels.patch_embed(images, w, b, **pe),
                    lambda: reference.patch_embed(images, w, b, **pe),
                    (w, b, mt, cls, pos), lambda o: ((o,), (g_pe,))))  # fmt: skip

    # Attention on the packed qkv projection, with the shared relative position bias [H, N, N] and its gradient.
    hd = D // H
    qkv = _randn(B, T, 3, H, hd, dtype=bf16, grad=True)
    bias = _randn(H, T, T, grad=True)
    g_at = _randn(B, T, H, hd, dtype=bf16)
    out.append(Case("attention_qkvpacked", dict(B=B, N=T, H=H, hd=hd), "bf16",
                    lambda: beit_kernels.attention_qkvpacked(qkv, bias),
                    lambda: reference.attention_qkvpacked(qkv, bias),
                    (qkv, bias), lambda o: ((o,), (g_at,))))  # fmt: skip

    # The block glue: h = x + drop_path(gamma * branch), y = LayerNorm(h) in bf16 (fp32 residual stream).
    x = _randn(B, T, D, grad=True)
    branch = _randn(B, T, D, dtype=bf16, grad=True)
    gamma, lw, lb = (_randn(D, grad=True) for _ in range(3))
    keep = (torch.rand(B) < 0.9).float() / 0.9
    ln = dict(eps=1e-6, sample_scale=keep, y_dtype=bf16)
    g_h, g_y = _randn(B, T, D), _randn(B, T, D, dtype=bf16)
    out.append(Case("add_layer_norm", dict(B=B, N=T, D=D), "fp32 x, bf16 branch and y",
                    lambda: beit_kernels.add_layer_norm(x, branch, gamma, lw, lb, **ln),
                    lambda: reference.add_layer_norm(x, branch, gamma, lw, lb, **ln),
                    (x, branch, gamma, lw, lb), lambda o: (o, (g_h, g_y))))  # fmt: skip

    # fc1's bias and GELU (bf16 activations, an fp32 bias).
    z = _randn(B, T, 4 * D, dtype=bf16, grad=True)
    fc1_b = _randn(4 * D, grad=True)
    g_z = _randn(B, T, 4 * D, dtype=bf16)
    out.append(Case("bias_gelu", dict(B=B, N=T, D=4 * D), "bf16",
                    lambda: beit_kernels.bias_gelu(z, fc1_b), lambda: reference.bias_gelu(z, fc1_b),
                    (z, fc1_b), lambda o: ((o,), (g_z,))))  # fmt: skip

    # The masked tokens with the final LayerNorm: the padded ascending index of beit.masking (+1: the cls row).
    h = _randn(B, T, D, grad=True)
    nw, nb = _randn(D, grad=True), _randn(D, grad=True)
    index = torch.stack([torch.randperm(N)[:K].sort().values + 1 for _ in range(B)])
    index[0, -1] = -1  # one padded row, as an image with fewer masked patches has
    g_mg = _randn(B * K, D)
    norm = dict(ln_weight=nw, ln_bias=nb, eps=1e-6)
    out.append(Case("masked_gather_ln", dict(B=B, T=T, K=K, D=D), "fp32",
                    lambda: beit_kernels.masked_gather(h, index, **norm),
                    lambda: reference.masked_gather(h, index, **norm),
                    (h, nw, nb), lambda o: ((o,), (g_mg,))))  # fmt: skip

    # The MIM head: Linear to the vocabulary, cross-entropy with ignored padding, counts; the small shape keeps
    # BEiT-B's number of chunks. In fp32 without autocast: a bf16 GEMM on the CPU goes through oneDNN, tens of
    # microseconds of CPU work a product even this small, where a GPU's host only enqueues it (the three casts
    # autocast adds are left out with it).
    M = B * K
    feats = _randn(M, D, grad=True)
    lm_w, lm_b = _randn(V, D, grad=True, scale=0.02), _randn(V, grad=True)
    labels = torch.randint(0, V, (M,))
    labels[-1] = -100
    chunks = math.ceil(BEIT_B_HEAD["M"] / tuning.cross_entropy_chunk(BEIT_B_HEAD["M"], BEIT_B_HEAD["V"]))
    head = {} if shape == "beit-b" else {"linear_cross_entropy.ce": {"chunk_rows": math.ceil(M / chunks)}}
    lce = dict(ignore_index=-100, return_counts=True)
    out.append(Case("linear_cross_entropy", dict(M=M, D=D, V=V, chunks=chunks), "fp32",
                    lambda: beit_kernels.linear_cross_entropy(feats, lm_w, lm_b, labels, **lce),
                    lambda: reference.linear_cross_entropy(feats, lm_w, lm_b, labels, **lce),
                    (feats, lm_w, lm_b), lambda o: ((o[0],), (None,)), autocast=False, overrides=head))  # fmt: skip

    # The DALL-E tokenizer's glue (inference): a residual path's bias + ReLU in place, and a block's tail with the
    # identity residual and the post gain.
    cb, cc, ch, cw = s["conv"]
    cl = torch.channels_last
    conv = torch.randn(cb, cc, ch, cw).to(bf16).contiguous(memory_format=cl)
    conv_b, res = torch.randn(cc), torch.randn(cb, cc, ch, cw).to(bf16).contiguous(memory_format=cl)
    cshape = dict(B=cb, C=cc, H=ch, W=cw)
    relu = dict(return_out=False, inplace=True)
    out.append(Case("conv_epilogue", cshape, "bf16",
                    lambda: beit_kernels.conv_epilogue(conv, conv_b, **relu),
                    lambda: reference.conv_epilogue(conv, conv_b, **relu)))  # fmt: skip
    tail = dict(residual=res, gain=0.0625, inplace=True)
    out.append(Case("conv_epilogue_residual", cshape, "bf16",
                    lambda: beit_kernels.conv_epilogue(conv, conv_b, **tail),
                    lambda: reference.conv_epilogue(conv, conv_b, **tail)))  # fmt: skip
    return out


def engine_case() -> Case:
    """The autograd engine alone: ``torch.autograd.grad`` through one clone. Every fwd+bwd row includes one such
    call's fixed cost, which a training step pays once for all its ops."""
    x = _randn(4, 8, grad=True)
    g = torch.ones(4, 8)
    return Case(ENGINE, dict(numel=32), "fp32", lambda: x.clone(), lambda: x.clone(), (x,),
                lambda o: ((o,), (g,)))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Timing


def _calls(case: Case, fn: Callable[[], object], mode: str) -> Callable[[], object]:
    """One call of ``fn`` in ``mode`` ("fwd" or "fwd+bwd"), as the step makes it (inside ``_context``)."""
    if mode == "fwd" or not case.inputs:
        return fn

    def fwd_bwd():
        outputs, grads = case.grads(fn())
        return torch.autograd.grad(outputs, case.inputs, grads, allow_unused=True)

    return fwd_bwd


def _context(case: Case) -> contextlib.ExitStack:
    """What the step runs the op in, entered once around all the calls (the step enters it once, not per op):
    the tuning of an H100, bf16 autocast where the step has it, no_grad for the tokenizer."""
    stack = contextlib.ExitStack()
    stack.enter_context(tuning.override({**H100, **case.overrides}))
    if case.autocast:
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    if not case.inputs:
        stack.enter_context(torch.no_grad())
    return stack


def time_calls(fn: Callable[[], object], calls: int) -> list[float]:
    """Microseconds of each of ``calls`` calls, each timed alone; the garbage collector is off while they run, as
    in ``timeit``."""
    times = []
    gc.disable()
    try:
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        gc.enable()
    return times


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """The 0.5, 0.2 and 0.8 quantiles."""
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


@dataclass
class Timed:
    case: Case
    provider: str
    mode: str
    call: Callable[[], object]
    launches: int = 0
    times: list[float] = field(default_factory=list)


def measure(timed: list[Timed], launches: Launches, calls: int, warmup: int, rounds: int) -> None:
    """Fill each entry's launches a call and ``calls`` timings, taken in ``rounds`` rounds over all the entries:
    on a shared machine, whose load comes and goes, every row then sees the same mix of it."""
    for t in timed:
        with _context(t.case):
            before = launches.total()
            t.call()
            t.launches = launches.total() - before
            for _ in range(warmup):
                t.call()
    # The collections between the rows' calls then skip what is already there (torch, sympy: a full collection
    # of it takes a tenth of a second).
    gc.collect()
    gc.freeze()
    try:
        for r in range(rounds):
            n = calls // rounds + (r < calls % rounds)
            for t in timed:
                with _context(t.case):
                    t.call()  # untimed: the previous entry's calls left other code and data in the caches
                    t.times += time_calls(t.call, n)
    finally:
        gc.unfreeze()


def profile(case: Case, mode: str, calls: int, top: int = 40) -> None:
    import cProfile
    import pstats

    call = _calls(case, case.ours, mode)
    with _context(case):
        call()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            call()
        prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


def table(rows: list[dict]) -> str:
    by = {(r["kernel"], r["mode"], r["provider"]): r for r in rows}
    lines = ["| op | mode | ours us (p20-p80) | Triton launches | reference us | ours / reference |", "|" + "---|" * 6]
    for (kernel, mode, provider), r in by.items():
        if provider != "ours":
            continue
        ref = by.get((kernel, mode, "reference"))
        ref_us = f"{ref['p50']:.1f}" if ref else "-"
        ratio = f"{r['p50'] / ref['p50']:.2f}" if ref else "-"
        lines.append(f"| {kernel} | {mode} | {r['p50']:.1f} ({r['p20']:.1f}-{r['p80']:.1f}) | {r['launches']} | "
                     f"{ref_us} | {ratio} |")  # fmt: skip
    for r in rows:
        if r["kernel"] == ENGINE:
            lines.append(f"\ntorch.autograd.grad through one clone (in every fwd+bwd row, once a step in training): "
                         f"{r['p50']:.1f} us")  # fmt: skip
    return "\n".join(lines)


def run(shape: str = "host", ops: list[str] | None = None, calls: int = 2000, warmup: int = 50,
        with_reference: bool = True, rounds: int | None = None) -> tuple[list[dict], Launches]:  # fmt: skip
    """The rows of every op (or of ``ops``), and the launches the stub intercepted; ``rounds`` (default
    min(10, calls)) splits the calls, see ``measure``."""
    torch.set_num_threads(1)
    env = harness.env_info("cpu")
    kernel = importlib.import_module("beit_kernels.masked_gather")._masked_gather_fwd_kernel
    env["triton_mode"] = "interpreter" if isinstance(kernel, InterpretedFunction) else "jit"
    env["shape_set"] = shape
    providers = ("ours", "reference") if with_reference else ("ours",)
    timed = []
    with stubbed_launches() as launches:
        for case in cases(shape):
            if ops and case.kernel not in ops:
                continue
            for provider in providers:
                fn = case.ours if provider == "ours" else case.reference
                for mode in ("fwd", "fwd+bwd") if case.inputs else ("fwd",):
                    timed.append(Timed(case, provider, mode, _calls(case, fn, mode)))
        if not ops or ENGINE in ops:
            case = engine_case()
            timed.append(Timed(case, "torch", "fwd+bwd", _calls(case, case.ours, "fwd+bwd")))
        measure(timed, launches, calls, warmup, rounds or min(10, calls))
    rows = [harness.row(t.case.kernel, t.provider, t.mode, "host_time", "us", quantiles(t.times), shape=t.case.shape,
                        dtype=t.case.dtype, env=env, launches=t.launches, calls=len(t.times))
            for t in timed]  # fmt: skip
    return rows, launches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="host",
                   help="host: BEiT-B's structure at small sizes (default); beit-b: BEiT-B's sizes")  # fmt: skip
    p.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    p.add_argument("--calls", type=int, default=None, help="timed calls a row (default 2000, 30 with --quick)")
    p.add_argument("--quick", action="store_true", help="few calls a row: a smoke run")
    p.add_argument("--no-reference", action="store_true", help="time ours only")
    p.add_argument("--profile", choices=("fwd", "fwd+bwd"), default=None,
                   help="print a cProfile of ours for the --ops instead of timing")  # fmt: skip
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    calls = args.calls or (30 if args.quick else 2000)
    warmup = 3 if args.quick else 50
    ops = args.ops.split(",") if args.ops else None
    known = {c.kernel for c in cases("host")} | {ENGINE}
    for op in ops or ():
        if op not in known:
            p.error(f"--ops {op}: known ops are {', '.join(sorted(known))}")
    if args.profile:
        torch.set_num_threads(1)
        with stubbed_launches():
            for case in cases(args.shape):
                if not ops or case.kernel in ops:
                    print(f"== {case.kernel} {args.profile}")
                    profile(case, args.profile, calls)
        return 0
    rows, launches = run(args.shape, ops, calls, warmup, not args.no_reference)
    if args.out:
        harness.write_rows(rows, args.out)
    env = rows[0] if rows else harness.env_info("cpu")
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']} ({env.get('triton_mode')}), "
          f"commit {env['git_sha']}, one thread, shape set {args.shape}, {calls} calls a row; "
          "median us a call")  # fmt: skip
    print(table(rows))
    counts = ", ".join(f"{k} {v}" for k, v in sorted(launches.counts.items()))
    print(f"{launches.total()} launches intercepted: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
