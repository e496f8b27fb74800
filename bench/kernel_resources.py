"""Registers, spills and shared memory of every Triton kernel of ours, compiled without a GPU.

Each kernel is compiled by Triton's own compiler (ptxas ships in the triton wheel) for a GPU architecture, at the
tile sizes, warps and stages its host launcher picks for BEiT's training shapes (width 768, MLP 3072, head
dimension 64, vocabulary 8192), in each dtype the training step feeds it. Per kernel it reports what ptxas says
(registers per thread, spill stores and loads) and the shared memory Triton asks for at launch, against the
architecture's per-block limit. A kernel over that limit fails at its first launch with OutOfResources, so
``--check`` makes that a failure here, where it costs no device time. Spills are reported, not refused: they are
slow, not wrong, and only a GPU can say how slow.

    python bench/kernel_resources.py                      # sm80, sm86, sm89, sm90; bf16, fp16, fp32; d 64-256
    python bench/kernel_resources.py --arch 90 --dtype bf16 --json resources.json
    python bench/kernel_resources.py --check              # exit 1 if a kernel needs more shared memory than fits

The numbers depend on the Triton version (each row records it): the device image has Triton 3.6.
"""

from __future__ import annotations

import os

# The interpreter never runs the compiler, and the launchers' tile tables differ under it: switch it off before
# triton is imported (tests/conftest.py switches it on for the CPU test session).
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Largest shared memory one block may opt into, bytes (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WIDTH, MLP, HEAD_DIM, VOCAB = 768, 3072, 64, 8192


@dataclass
class Spec:
    kernel: str
    fn: object  # a triton.JITFunction
    ptrs: dict  # pointer argument -> element type ("bf16", "fp32", "i64", "u8", ...)
    consts: dict  # constexpr arguments
    warps: int
    stages: int | None = None
    floats: tuple = ()  # fp32 scalar arguments; every other argument is an i32

    def signature(self) -> dict:
        return {
            n: "constexpr" if n in self.consts else "*" + self.ptrs[n] if n in self.ptrs else
            "fp32" if n in self.floats else "i32"
            for n in self.fn.arg_names
        }  # fmt: skip


def _mod(name: str):
    # The package exports functions named like their modules (attention, bias_gelu, ...): import the modules.
    return importlib.import_module(f"beit_kernels.{name}")


def attention_specs(dt: str, head_dim: int = HEAD_DIM) -> list[Spec]:
    at = _mod("attention")
    dtype = DTYPES[dt]
    block_d = max(16, triton.next_power_of_2(head_dim))
    out = []
    for kind, fn in (("fwd", at._attn_fwd_kernel), ("bwd", at._attn_bwd_dq_kernel), ("bwd", at._attn_bwd_dkdv_kernel)):
        ptrs = {n: dt for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
        ptrs.update(BIAS="fp32", LSE="fp32", DELTA="fp32", DBIAS="fp32")
        cfg = dict(at._block_config(kind, head_dim, dtype))
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        consts = dict(HAS_BIAS=True, IEEE=dtype == torch.float32, BLOCK_D=block_d, **cfg)
        if "BIAS_GRAD" in fn.arg_names:
            consts["BIAS_GRAD"] = True
        name = f"attention.{fn.__name__}[d{head_dim}]"
        out.append(Spec(name, fn, ptrs, consts, warps, stages, ("qk_scale", "sm_scale")))
    return out


def bias_gelu_specs(dt: str) -> list[Spec]:
    bg = _mod("bias_gelu")
    ptrs = dict(x_ptr=dt, b_ptr="fp32", out_ptr=dt, dy_ptr=dt, dx_ptr=dt, db_ptr="fp32")
    out = []
    for fn, tile in ((bg._bias_gelu_fwd_kernel, bg._FWD_TILE), (bg._bias_gelu_bwd_kernel, bg._BWD_TILE)):
        bm, bd, warps = bg._tile(tile, MLP)
        out.append(Spec(f"bias_gelu.{fn.__name__}", fn, ptrs, dict(HAS_BIAS=True, BLOCK_M=bm, BLOCK_D=bd), warps))
    return out


def layer_norm_specs(dt: str) -> list[Spec]:
    ln = _mod("layer_norm")
    # Under autocast the residual stream stays fp32 and the branch and the normalised output are in the low dtype.
    res = "fp32"
    bm, bd, warps = ln._tile(WIDTH, backward=False)
    fwd = dict(x_ptr=res, br_ptr=dt, g_ptr="fp32", s_ptr="fp32", w_ptr="fp32", b_ptr="fp32", h_ptr=res, y_ptr=dt,
               mean_ptr="fp32", rstd_ptr="fp32")  # fmt: skip
    fwd_c = dict(HAS_BRANCH=True, HAS_GAMMA=True, HAS_SCALE=True, HAS_W=True, HAS_B=True, BLOCK_M=bm, BLOCK_D=bd)
    specs = [Spec("layer_norm._add_ln_fwd_kernel", ln._add_ln_fwd_kernel, fwd, fwd_c, warps, floats=("eps",))]
    bm, bd, warps = ln._tile(WIDTH, backward=True)
    bwd = dict(dh_ptr=res, dy_ptr=dt, h_ptr=res, br_ptr=dt, g_ptr="fp32", s_ptr="fp32", w_ptr="fp32",
               mean_ptr="fp32", rstd_ptr="fp32", dx_ptr=res, dbr_ptr=dt, dg_ptr="fp32", dw_ptr="fp32",
               db_ptr="fp32")  # fmt: skip
    bwd_c = dict(HAS_DH=True, HAS_DY=True, HAS_BRANCH=True, HAS_GAMMA=True, HAS_SCALE=True, HAS_W=True,
                 WRITE_DX=True, WRITE_DBR=True, GAMMA_GRAD=True, BLOCK_M=bm, BLOCK_D=bd)  # fmt: skip
    specs.append(Spec("layer_norm._add_ln_bwd_kernel", ln._add_ln_bwd_kernel, bwd, bwd_c, warps))
    return specs


def masked_gather_specs(dt: str) -> list[Spec]:
    mg = _mod("masked_gather")
    block_d = triton.next_power_of_2(WIDTH)
    fwd = dict(x_ptr=dt, idx_ptr="i64", w_ptr="fp32", b_ptr="fp32", out_ptr=dt, mean_ptr="fp32", rstd_ptr="fp32")
    bwd = dict(x_ptr=dt, idx_ptr="i64", w_ptr="fp32", dy_ptr=dt, mean_ptr="fp32", rstd_ptr="fp32", dx_ptr=dt,
               dw_ptr="fp32", db_ptr="fp32")  # fmt: skip
    warps = mg._num_warps(block_d)
    return [
        Spec("masked_gather._masked_gather_fwd_kernel", mg._masked_gather_fwd_kernel, fwd,
             dict(HAS_LN=True, HAS_W=True, HAS_B=True, BLOCK_D=block_d), warps, floats=("eps",)),
        Spec("masked_gather._masked_gather_bwd_kernel", mg._masked_gather_bwd_kernel, bwd,
             dict(HAS_LN=True, HAS_W=True, BLOCK_D=block_d), warps),
    ]  # fmt: skip


def patch_embed_specs(dt: str) -> list[Spec]:
    pe = _mod("patch_embed")
    prec = pe._dot_precision(DTYPES[dt])
    specs = []
    for img in ("u8", "fp32"):  # DALI's uint8 HWC batches, and float NCHW tensors
        fwd = dict(img_ptr=img, w_ptr="fp32", b_ptr="fp32", mask_ptr="u8", mtok_ptr="fp32", cls_ptr="fp32",
                   pos_ptr="fp32", scale_ptr="fp32", shift_ptr="fp32", out_ptr=dt)  # fmt: skip
        fwd_c = dict(P=16, HAS_BIAS=True, HAS_MASK=True, HAS_CLS=1, HAS_POS=True, NORM=img == "u8", DOT_PREC=prec,
                     BLOCK_M=pe._FWD_BLOCK_M, BLOCK_N=pe._FWD_BLOCK_N, BLOCK_K=pe._FWD_BLOCK_K)  # fmt: skip
        bwd = dict(img_ptr=img, dy_ptr=dt, mask_ptr="u8", scale_ptr="fp32", shift_ptr="fp32", dw_ptr="fp32",
                   db_ptr="fp32", dmt_ptr="fp32")  # fmt: skip
        bwd_c = dict(P=16, HAS_MASK=True, HAS_CLS=1, NORM=img == "u8", DOT_PREC=prec, BLOCK_M=pe._BWD_BLOCK_M,
                     BLOCK_D=pe._BWD_BLOCK_D, BLOCK_K=pe._BWD_BLOCK_K)  # fmt: skip
        specs += [
            Spec(f"patch_embed._patch_embed_fwd_kernel[{img}]", pe._patch_embed_fwd_kernel, fwd, fwd_c,
                 pe._FWD_WARPS, pe._FWD_STAGES),
            Spec(f"patch_embed._patch_embed_bwd_kernel[{img}]", pe._patch_embed_bwd_kernel, bwd, bwd_c,
                 pe._BWD_WARPS, pe._BWD_STAGES),
        ]  # fmt: skip
    return specs


def linear_cross_entropy_specs(dt: str) -> list[Spec]:
    lce = _mod("linear_cross_entropy")
    ptrs = dict(z_ptr=dt, target_ptr="i64", loss_ptr="fp32", correct_ptr="i32", n_valid_ptr="i64")
    consts = dict(MEAN=True, COMPUTE_GRAD=True, BLOCK_V=min(lce._BLOCK_V, triton.next_power_of_2(VOCAB)))
    return [Spec("linear_cross_entropy._ce_rows_kernel", lce._ce_rows_kernel, ptrs, consts, lce._CE_WARPS)]


# The kernels whose tiles depend on the head dimension, and those sized for BEiT's widths.
SPECS = dict(attention=attention_specs, bias_gelu=bias_gelu_specs, layer_norm=layer_norm_specs,
             masked_gather=masked_gather_specs, patch_embed=patch_embed_specs,
             linear_cross_entropy=linear_cross_entropy_specs)  # fmt: skip


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton itself uses for this architecture

    return get_ptxas(arch).path


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes, from ``ptxas -v`` on the PTX Triton generated."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # Triton targets the arch-specific sm_90a on Hopper
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}:\n{proc.stderr[-2000:]}")
    log = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    if regs is None or stores is None or loads is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log[-2000:]}")
    return dict(registers=int(regs.group(1)), spill_stores=int(stores.group(1)), spill_loads=int(loads.group(1)))


def compile_spec(spec: Spec, arch: int, limit: int | None = None) -> dict:
    options = dict(num_warps=spec.warps)
    if spec.stages is not None:
        options["num_stages"] = spec.stages
    k = triton.compile(ASTSource(spec.fn, spec.signature(), spec.consts), target=GPUTarget("cuda", arch, 32),
                       options=options)  # fmt: skip
    if not k.asm.get("cubin"):
        raise RuntimeError(f"{spec.kernel}: no cubin for sm{arch}")
    usage = ptxas_usage(k.asm["ptx"], arch)
    shared = int(k.metadata.shared)
    limit = SHARED_LIMIT[arch] if limit is None else limit
    return dict(kernel=spec.kernel, arch=f"sm{arch}", warps=spec.warps, stages=spec.stages, shared=shared,
                shared_limit=limit, fits=shared <= limit, **usage)  # fmt: skip


def _specs(kernel: str, dt: str, head_dim: int) -> list[Spec]:
    return SPECS[kernel](dt, head_dim) if kernel == "attention" else SPECS[kernel](dt)


def _job(job: tuple) -> dict:
    """One compilation, by name (JIT functions do not pickle): (kernel, dtype, head dim, spec index, arch,
    shared-memory limit or None for the architecture's)."""
    kernel, dt, head_dim, i, arch, limit = job
    row = compile_spec(_specs(kernel, dt, head_dim)[i], arch, limit)
    row.update(dtype=dt, triton=triton.__version__, torch=torch.__version__)
    return row


def rows(archs: list[int], dtypes: list[str], head_dims: list[int], jobs: int = 1, limit: int | None = None
         ) -> list[dict]:  # fmt: skip
    work = []
    for arch in archs:
        for dt in dtypes:
            for kernel in SPECS:
                for head_dim in head_dims if kernel == "attention" else [HEAD_DIM]:
                    n = len(_specs(kernel, dt, head_dim))
                    work += [(kernel, dt, head_dim, i, arch, limit) for i in range(n)]
    if jobs <= 1:
        return [_job(j) for j in work]
    # Each compilation is single-threaded; a process pool keeps every core busy (fork: no re-import per worker).
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
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
    p.add_argument("--arch", default="80,86,89,90", help="compute capabilities, comma-separated (80, 86, 89, 90)")
    p.add_argument("--dtype", default="bf16,fp16,fp32", help="activation dtypes, comma-separated")
    p.add_argument("--head-dim", default="64,128,256", help="attention head dimensions, comma-separated")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compilations run at once")
    p.add_argument("--limit-kib", type=int, default=None,
                   help="check against this shared memory a block instead of the architecture's (a GPU shared "
                        "with other work, or a part with less)")  # fmt: skip
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--check", action="store_true", help="exit 1 when a kernel needs more shared memory than fits")
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
    print(f"all {len(rs)} kernels fit in shared memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
