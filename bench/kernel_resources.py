"""Registers, spills and shared memory of every Triton kernel launch of a BEiT training step, compiled without a GPU.

What gets compiled is what the launchers launch. A BEiT-B pretraining step (two blocks: every launch of the
12-block step is one of theirs) runs forward and backward on the CPU with each Triton launch intercepted instead
of run. Each distinct launch (kernel, argument types, constexprs, warps, stages, and the specialisation the JIT
derives from the argument values: 16-byte alignment, integers equal to 1 as constants) is then compiled for each
architecture (sm80 to sm120) by Triton's own compiler (ptxas ships in the triton wheel), specialised by Triton's own
``native_specialize_impl``, as a launch on that GPU would be. The step's launches are joined by two the step does
not make: patch embedding from uint8 HWC images with normalisation in the kernel (what DALI hands over),
attention at head dimensions 128 and 256, the all-queries dk/dv kernel (the default on sm90 only), the fused
attention backward in both its forms (off by default), and the DALL-E
tokenizer's fused glue (``conv_epilogue``, at every width
of the full-size encoder, on a small view).

Per launch it reports what ptxas says (registers per thread, spill stores and loads) and the shared memory Triton
asks for, against the architecture's per-block limit. A kernel over that limit fails at its first launch with
OutOfResources, so ``--check`` makes that a failure here, where it costs no device time. Spills are reported, not
refused: they are slow, not wrong, and only a GPU can say how slow.

    python bench/kernel_resources.py                      # sm80 to sm120; bf16 and fp32
    python bench/kernel_resources.py --arch 90 --dtype bf16 --json resources.json
    python bench/kernel_resources.py --check              # exit 1 if a launch needs more shared memory than fits

The numbers depend on the Triton version (each row records it): the device image has Triton 3.6.
"""

from __future__ import annotations

import os

# The interpreter never runs the compiler, and the launchers pick other tiles under it: switch it off before
# triton is imported (tests/conftest.py switches it on for the CPU test session).
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend, get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import beit  # noqa: E402
import beit_kernels  # noqa: E402
from beit.masking import MaskingGenerator, generate_masks  # noqa: E402
from beit_kernels.backend import shared_memory_optin  # noqa: E402

# The architectures compiled for, and the shared memory a block may opt into on each: the table the launchers
# fall back on (beit_kernels.backend), so the two cannot disagree.
SHARED_LIMIT = {a: shared_memory_optin(a // 10, a % 10) for a in (80, 86, 87, 89, 90, 100, 120)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNEL_MODULES = (
    "attention",
    "bias_gelu",
    "conv_epilogue",
    "layer_norm",
    "masked_gather",
    "patch_embed",
    "linear_cross_entropy",
)
# Keyword arguments of a launch that are compiler options, not kernel arguments.
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# Where several keys tell launches apart equally well, these name them best: the head dimension, the image layout.
NAMING_KEYS = ("BLOCK_D", "img_ptr")


@dataclass(frozen=True)
class Launch:
    """One distinct launch: everything the compiled code depends on."""

    kernel: str  # module.function
    signature: tuple  # ((argument, type), ...), "constexpr" for constants
    constexprs: tuple  # ((argument, value), ...)
    aligned: tuple  # arguments the JIT marks divisible by 16
    options: tuple  # ((option, value), ...)

    def label(self, others: list[Launch]) -> str:
        """The kernel, plus the fewest constexprs and pointer types that tell it from the other launches of the
        same kernel (greedily: each added key is the one that sets it apart from the most launches still alike)."""
        mine = self._traits()
        alike = [o._traits() for o in others if o.kernel == self.kernel and o != self]
        if not alike:
            return self.kernel
        tags = []
        order = sorted(mine, key=lambda k: k not in NAMING_KEYS)  # max() keeps the first of equals
        while alike:
            key = max(order, key=lambda k: sum(t.get(k) != mine[k] for t in alike))
            if all(t.get(key) == mine[key] for t in alike):
                break  # identical traits: launches that differ only in their specialisation
            tags.append(key)
            alike = [t for t in alike if t.get(key) == mine[key]]
        return f"{self.kernel}[{','.join(f'{k}={mine[k]}' for k in tags)}]"

    def _traits(self) -> dict:
        return {k: v for k, v in self.signature if v.startswith("*")} | dict(self.constexprs)


# The kernels the captures met, by ``Launch.kernel``: compiled from here (a forked worker inherits it).
JIT_FUNCTIONS: dict[str, JITFunction] = {}


def _jit(kernel: str) -> JITFunction:
    return JIT_FUNCTIONS[kernel]


def specialise(fn: JITFunction, args: tuple, kwargs: dict) -> Launch:
    """What the JIT compiles for a launch ``fn[grid](*args, **kwargs)``, using its own specialisation rules."""
    kwargs = dict(kwargs)
    options = tuple(sorted((k, kwargs.pop(k)) for k in list(kwargs) if k in LAUNCH_OPTIONS))
    bound = inspect.signature(fn.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, aligned = [], [], []
    for p in fn.params:
        value = bound.arguments[p.name]
        if p.is_constexpr:
            signature.append((p.name, "constexpr"))
            constexprs.append((p.name, value))
            continue
        # As the JIT does: non-constexpr floats and bools are not specialised on their values.
        specialise_value = not p.do_not_specialize and not isinstance(value, (bool, float))
        ty, key = native_specialize_impl(CUDABackend, value, p.is_const, specialise_value,
                                         not p.do_not_specialize_on_alignment)  # fmt: skip
        if ty == "constexpr":  # an integer equal to 1
            signature.append((p.name, "constexpr"))
            constexprs.append((p.name, key))
            continue
        signature.append((p.name, ty))
        if isinstance(key, str) and "D" in key:
            aligned.append(p.name)
    name = f"{fn.fn.__module__.split('.')[-1]}.{fn.fn.__name__}"
    JIT_FUNCTIONS[name] = fn
    return Launch(name, tuple(signature), tuple(constexprs), tuple(aligned), options)


@contextlib.contextmanager
def captured_launches(shared: int):
    """Run the launchers on CPU tensors with every Triton launch recorded (as a ``Launch``) instead of run, as on a
    GPU with ``shared`` bytes of shared memory a block."""
    launches: list[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(specialise(self, args, kwargs))

    mods = [importlib.import_module(f"beit_kernels.{m}") for m in KERNEL_MODULES]
    # The launch never happens, so a CPU tensor is fine (each module's device check, the public
    # ``backend.check_kernel_device``, is switched off); the tiles are those of the GPU being compiled for.
    saved = [(m, m.check_kernel_device) for m in mods]
    saved_run = JITFunction.run
    JITFunction.run = run
    for m, _ in saved:
        m.check_kernel_device = lambda op, t: None
    try:
        with beit_kernels.tuning.override({"shared_memory": shared}):
            yield launches
    finally:
        JITFunction.run = saved_run
        for m, fn in saved:
            m.check_kernel_device = fn


# A multiple of 16, as the real 256 is, so the row counts the JIT sees (B N, B K) get the same divisibility.
BATCH = 16


def training_step(dtype: torch.dtype, batch: int = BATCH) -> None:
    """One BEiT-B/16 step on the triton path (fused glue, drop path on), under autocast unless ``dtype`` is fp32."""
    torch.manual_seed(0)
    model = beit.create_model("beit_base_patch16_224", depth=2, impl="triton", drop_path_rate=0.1)
    images = torch.randn(batch, 3, 224, 224)
    bool_masked_pos, mask_index = generate_masks(MaskingGenerator(14, 75, 16, rng=0), batch)
    tokens = torch.randint(0, model.config.vocab_size, (batch, 196))
    amp = dtype != torch.float32
    with torch.autocast("cpu", dtype=dtype, enabled=amp):
        loss, _, _ = model.forward_mim_loss(images, bool_masked_pos, mask_index, tokens)
    loss.backward()


def extra_launches(dtype: torch.dtype, head_dims: list[int]) -> None:
    """The launches the step does not make: uint8 patch embedding with normalisation, other head dimensions."""
    B, D = BATCH, 768
    weight = torch.randn(D, 3, 16, 16, requires_grad=True)
    images = torch.randint(0, 256, (B, 224, 224, 3), dtype=torch.uint8)
    mask = torch.rand(B, 196) < 0.4
    params = [torch.zeros(1, 1, D, requires_grad=True) for _ in range(2)] + [torch.zeros(1, 197, D, requires_grad=True)]
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = beit_kernels.patch_embed(images, weight, torch.zeros(D, requires_grad=True), mask=mask,
                                       mask_token=params[0], cls_token=params[1], pos_embed=params[2],
                                       mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))  # fmt: skip
    out.float().sum().backward()
    # The half-precision backward kernels the default may not take: the all-queries dk/dv kernel (the default on
    # sm90 only) and the fused backward (off by default) in both its forms, the transposed dk and dv being one
    # the attention sweep may install; compiled for every target.
    variants = [
        {"attention.dkdv_all_queries": True},
        {"attention.bwd_fused": True},
        {"attention.bwd_fused": True, "attention.fused": {"DKDV_T": True}},
    ]
    for entries in variants if dtype != torch.float32 else ():
        with beit_kernels.tuning.override(entries):
            H, N = 2, 197
            qkv = torch.randn(B, N, 3, H, 64, dtype=dtype, requires_grad=True)
            bias = torch.zeros(H, N, N, requires_grad=True)
            beit_kernels.attention_qkvpacked(qkv, bias).float().sum().backward()
    for hd in head_dims:
        if hd == 64:
            continue  # the step's own
        H, N = 2, 197
        qkv = torch.randn(B, N, 3, H, hd, dtype=dtype).permute(2, 0, 3, 1, 4).requires_grad_()  # [3, B, H, N, hd]
        bias = torch.zeros(H, N, N, requires_grad=True)
        o = beit_kernels.attention(qkv[0], qkv[1], qkv[2], bias)
        o.transpose(1, 2).reshape(B, N, H * hd).float().sum().backward()  # the layout the projection hands back


def tokenizer_launches(dtype: torch.dtype) -> None:
    """The full-size DALL-E encoder with its glue fused, on a 32 px view (the launches depend on the widths, not the
    side)."""
    from beit.tokenizer import DalleEncoder

    torch.manual_seed(0)
    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    enc = DalleEncoder().configure(precision=precision, channels_last=True, fused=True, check_range=False)
    enc.get_codebook_indices(torch.rand(2, 3, 32, 32) * 0.8 + 0.1)


def capture(dtype: torch.dtype, head_dims: list[int], shared: int) -> list[Launch]:
    with captured_launches(shared) as launches:
        training_step(dtype)
        extra_launches(dtype, head_dims)
        tokenizer_launches(dtype)
    return list(dict.fromkeys(launches))  # distinct, in launch order


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes, from ``ptxas -v`` (the ptxas Triton uses for ``arch``) on Triton's PTX."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # Triton targets the arch-specific sm_90a on Hopper
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}:\n{proc.stderr[-2000:]}")
    log = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    if regs is None or stores is None or loads is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log[-2000:]}")
    return dict(registers=int(regs.group(1)), spill_stores=int(stores.group(1)), spill_loads=int(loads.group(1)))


def compile_launch(launch: Launch, arch: int, limit: int | None = None) -> dict:
    fn = _jit(launch.kernel)
    index = {p.name: p.num for p in fn.params}
    attrs = {(index[n],): CUDABackend.parse_attr("D") for n in launch.aligned}
    src = ASTSource(fn, dict(launch.signature), dict(launch.constexprs), attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    if not k.asm.get("cubin"):
        raise RuntimeError(f"{launch.kernel}: no cubin for sm{arch}")
    shared = int(k.metadata.shared)
    limit = SHARED_LIMIT[arch] if limit is None else limit
    opts = dict(launch.options)
    return dict(arch=f"sm{arch}", warps=opts.get("num_warps", 4), stages=opts.get("num_stages"), shared=shared,
                shared_limit=limit, fits=shared <= limit, **ptxas_usage(k.asm["ptx"], arch))  # fmt: skip


def _job(job: tuple) -> dict:
    launch, label, dt, arch, limit = job
    row = dict(kernel=label, dtype=dt, **compile_launch(launch, arch, limit))
    row.update(triton=triton.__version__, torch=torch.__version__)
    return row


def rows(archs: list[int], dtypes: list[str], head_dims: list[int], jobs: int = 1, limit: int | None = None
         ) -> list[dict]:  # fmt: skip
    work, captured = [], {}
    for dt in dtypes:
        for arch in archs:
            key = (dt, SHARED_LIMIT[arch])  # the launchers see a GPU's shared memory only
            if key not in captured:
                captured[key] = capture(DTYPES[dt], head_dims, SHARED_LIMIT[arch])
            launches = captured[key]
            work += [(launch, launch.label(launches), dt, arch, limit) for launch in launches]
    if jobs <= 1:
        return [_job(j) for j in work]
    # Each compilation is single-threaded; a process pool keeps every core busy (fork: no re-import per worker).
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_job, work))


def table(rs: list[dict]) -> str:
    head = "| kernel | arch | dtype | warps | stages | registers | spill st/ld B | shared KiB (limit) |"
    lines = [head, "|" + "---|" * 8]
    for r in rs:
        flag = "" if r["fits"] else " **over**"
        lines.append(
            f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['warps']} | {r['stages'] or '-'} | {r['registers']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['shared'] / 1024:.0f} ({r['shared_limit'] // 1024}){flag} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,86,89,90,100,120", help="compute capabilities, comma-separated")
    p.add_argument("--dtype", default="bf16,fp32",
                   help="the step's autocast dtypes (fp32: no autocast; fp16 works, but its CPU matmuls make each "
                        "capture take minutes)")  # fmt: skip
    p.add_argument("--head-dim", default="64,128,256", help="attention head dimensions, comma-separated")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compilations run at once")
    p.add_argument("--limit-kib", type=int, default=None,
                   help="check against this shared memory a block instead of the architecture's (a GPU shared "
                        "with other work, or a part with less)")  # fmt: skip
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--check", action="store_true", help="exit 1 when a launch needs more shared memory than fits")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    dtypes = args.dtype.split(",")
    for a in archs:
        if a not in SHARED_LIMIT:
            p.error(f"--arch {a}: known architectures are {sorted(SHARED_LIMIT)}")
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"--dtype {d}: known dtypes are {sorted(DTYPES)}")
    head_dims = [int(d) for d in args.head_dim.split(",")]
    limit = args.limit_kib * 1024 if args.limit_kib is not None else None
    rs = rows(archs, dtypes, head_dims, args.jobs, limit)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rs, f, indent=1)
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    print(table(rs))
    over = [f"{r['kernel']} {r['arch']} {r['dtype']}" for r in rs if not r["fits"]]
    if over:
        print("over the shared-memory limit: " + ", ".join(over), file=sys.stderr)
        return 1 if args.check else 0
    print(f"all {len(rs)} launches fit in shared memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
