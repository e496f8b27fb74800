"""The fused BEiT ops (patch embedding, masked gather with LayerNorm, linear cross-entropy, residual add with
LayerNorm, bias with GELU) against the PyTorch chains they replace and ``torch.compile`` of those chains.

Modes: ``fwd`` and ``fwd+bwd``. Metrics: milliseconds (p50, p20, p80), the peak memory one fwd+bwd adds on top of
its inputs (MiB), and on CUDA the device-to-host synchronisations one fwd+bwd makes (``syncs``, counted with
``torch.cuda.set_sync_debug_mode("warn")``) and the GPU kernel time of one fwd+bwd (``kernel_time``, torch.profiler:
the milliseconds exclude the host, which the wall time of a short call can be made of). Parameters are fp32 and the
step runs under bf16 autocast, as in training. All providers run in one process on one device, so their ratios are
like for like.

    python bench/bench_fused_ops.py --out results/fused_ops.json     # GPU: BEiT-B, B=256, 224 px, K=75, V=8192
    python bench/bench_fused_ops.py --quick                          # CPU smoke run (Triton interpreter, fp32)

Providers:
    ours       beit_kernels.patch_embed / masked_gather / linear_cross_entropy / add_layer_norm / bias_gelu
    ours-cublas-wgrad  patch_embed with its weight gradient as a cuBLAS GEMM on materialised patches
    reference  the official chains: Conv2d, blend, cat, + pos_embed (with the normalisation for uint8 images);
               LayerNorm of all tokens then boolean indexing ``x[:, 1:][bool_masked_pos]``; Linear then
               CrossEntropy on the full logits; ``x + drop_path(gamma * branch)`` then LayerNorm (the glue of a
               pre-norm block, B=256, N=197, D=768); GELU of fc1's output plus its bias (D=3072)
    compiled   torch.compile of the reference chain (default mode)

The block glue runs as the model runs it under autocast: the residual stream x and the parameters in fp32, the
branch (a Linear's output) in bf16, drop path with keep probability 0.9 (a fixed draw, so every provider does the
same work). The reference's LayerNorm returns fp32 under autocast; ours writes y in bf16 (``y_dtype``), as the next
Linear would cast it anyway (that cast is not timed for the reference). For bias_gelu, fc1's output is bf16 and
its bias an fp32 parameter that the reference casts to bf16 first, as a Linear under autocast adds it.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Without CUDA, Triton runs only in its interpreter, which must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

import beit_kernels  # noqa: E402

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


# ----------------------------------------------------------------------------------------------------------------
# The chains


def patch_chain(images, w, b, mask, mask_token, cls_token, pos_embed, mean=None, std=None):
    """The official patch embedding: (normalise) -> Conv2d -> blend -> cat cls -> + pos_embed."""
    if images.dtype == torch.uint8:
        images = (images.permute(0, 3, 1, 2).float() - mean) / std  # [B, H, W, 3] -> [B, 3, H, W]
    x = F.conv2d(images, w, b, stride=w.shape[-1]).flatten(2).transpose(1, 2)  # [B, N, D]
    B, N, _ = x.shape
    wgt = mask.unsqueeze(-1).type_as(mask_token)
    x = x * (1 - wgt) + mask_token.expand(B, N, -1) * wgt
    x = torch.cat((cls_token.expand(B, -1, -1), x), dim=1)  # [B, N+1, D]
    return x + pos_embed


def gather_chain(x, mask, ln_w, ln_b):
    """The official head input: LayerNorm of every token, then the boolean gather of the masked patches."""
    return F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, 1e-6)[:, 1:][mask]


def lce_chain(x, w, b, target):
    return F.cross_entropy(F.linear(x, w, b), target)


def add_ln_chain(x, branch, gamma, w, b, keep, keep_prob):
    """The official block glue: ``x + drop_path(gamma * branch)`` (keep [B, 1, 1] of 0/1 draws), then LayerNorm."""
    h = x + (gamma * branch).div(keep_prob) * keep
    return h, F.layer_norm(h, (h.shape[-1],), w, b, 1e-6)


def bias_gelu_chain(x, bias):
    return F.gelu(x + bias.to(x.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Measurement


def count_syncs(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum(is_sync_warning(str(w.message)) for w in caught)


def is_sync_warning(message: str) -> bool:
    """torch's warning for one synchronising call, not its once-per-process notice "Synchronization debug mode is
    a prototype feature and does not yet detect all synchronizing operations", which would count as a sync of the
    first op measured."""
    return "called a synchronizing CUDA operation" in message


def measure(kernel, providers, leaves, grad_fn, shape, dtype, env, device, quick, autocast_dtype):
    """Rows for each provider: ``providers[name]()`` runs the forward; ``grad_fn(out)`` the backward."""
    rows = []
    for name, fwd in providers.items():

        def run_fwd(fwd=fwd):
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                fwd()

        def run_full(fwd=fwd):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = fwd()
            grad_fn(out)
            for t in leaves:
                t.grad = None

        try:
            run_full()  # first call: compiles (torch.compile, Triton) outside the timed region
        except Exception as e:  # a provider that fails here is reported, not silently dropped
            note = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rows.append(
                harness.row(kernel, name, "fwd+bwd", "error", "", None, shape=shape, dtype=dtype, env=env, note=note)
            )
            continue
        common = dict(shape=shape, dtype=dtype, env=env)
        rep = 20 if quick else 100
        rows.append(
            harness.row(
                kernel, name, "fwd", "time", "ms", harness.time_fn(run_fwd, device=device, rep_ms=rep), **common
            )
        )
        rows.append(
            harness.row(
                kernel, name, "fwd+bwd", "time", "ms", harness.time_fn(run_full, device=device, rep_ms=rep), **common
            )
        )
        # The GPU's own time of a training call, apart from the host: one of these ops moves a few hundred MB at
        # most, so its wall time can be the host's (a launcher's Python side can take longer than its GPU
        # traffic). fwd+bwd only: each profiled pass
        # costs the device call's stage time.
        gpu_ms = harness.kernel_time_ms(run_full, device, calls=2)
        if gpu_ms is not None:
            rows.append(harness.row(kernel, name, "fwd+bwd", "kernel_time", "ms", gpu_ms, **common))
        mem = harness.peak_memory_mb(run_full, device=device)
        if mem is not None:
            rows.append(harness.row(kernel, name, "fwd+bwd", "peak_memory_added", "MiB", mem, **common))
        syncs = count_syncs(run_full, device)
        if syncs is not None:
            rows.append(harness.row(kernel, name, "fwd+bwd", "syncs", "count", syncs, **common))
    return rows


def maybe_compile(fn, enabled):
    return torch.compile(fn) if enabled else None


# ----------------------------------------------------------------------------------------------------------------
# Cases


def setup_patch_embed(B, img, p, D, device, autocast_dtype, compile_, uint8):
    """(kernel, providers, leaves, grad_fn, shape, dtype), the arguments of ``measure``."""
    g = torch.Generator().manual_seed(0)
    N = (img // p) ** 2
    if uint8:
        images = torch.randint(0, 256, (B, img, img, 3), dtype=torch.uint8, generator=g).to(device)
    else:
        images = torch.randn(B, 3, img, img, generator=g).to(device)
    w, b, mt, cls, pos = (
        (torch.randn(*s, generator=g) * 0.02).to(device).requires_grad_()
        for s in ((D, 3, p, p), (D,), (1, 1, D), (1, 1, D), (1, N + 1, D))
    )
    mask = (torch.rand(B, N, generator=g) < 75 / 196).to(device)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) if uint8 else None
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) if uint8 else None
    norm = dict(mean=mean.view(3), std=std.view(3)) if uint8 else {}
    grad = torch.randn(B, N + 1, D, generator=g).to(device)

    def ours(weight_grad="triton"):
        # The weight-gradient GEMM is chosen when the forward runs (tuning entry patch_embed.bwd).
        with beit_kernels.tuning.override({"patch_embed.bwd": {"weight_grad": weight_grad}}):
            return beit_kernels.patch_embed(images, w, b, mask=mask, mask_token=mt, cls_token=cls, pos_embed=pos,
                                            **norm)  # fmt: skip

    providers = {
        "ours": ours,
        # Materialised patches and a cuBLAS weight-gradient GEMM (off by default).
        "ours-cublas-wgrad": lambda: ours("cublas"),
        "reference": lambda: patch_chain(images, w, b, mask, mt, cls, pos, mean, std),
    }
    compiled = maybe_compile(patch_chain, compile_)
    if compiled is not None:
        providers["compiled"] = lambda: compiled(images, w, b, mask, mt, cls, pos, mean, std)
    shape = dict(B=B, img=img, p=p, D=D, input="uint8 NHWC" if uint8 else "float NCHW")
    kernel = "patch_embed_uint8" if uint8 else "patch_embed"
    dtype = autocast_dtype or torch.float32
    return kernel, providers, (w, b, mt, cls, pos), lambda out: out.backward(grad.to(out.dtype)), shape, dtype


def setup_masked_gather(B, N, K, D, device, autocast_dtype, compile_):
    g = torch.Generator().manual_seed(1)
    # The encoder output is fp32 under autocast (the residual stream), as the model's gather sees it.
    x = torch.randn(B, N + 1, D, generator=g).to(device).requires_grad_()
    ln_w = torch.ones(D, device=device, requires_grad=True)
    ln_b = torch.zeros(D, device=device, requires_grad=True)
    # Exactly K masked patches per image, so both paths produce the same B*K rows.
    mask = torch.zeros(B, N, dtype=torch.bool)
    for i in range(B):
        mask[i, torch.randperm(N, generator=g)[:K]] = True
    index = (torch.nonzero(mask)[:, 1].view(B, K) + 1).to(device)  # token positions, cls skipped (set-up only)
    mask = mask.to(device)
    grad = torch.randn(B * K, D, generator=g).to(device)
    providers = {
        "ours": lambda: beit_kernels.masked_gather(x, index, ln_weight=ln_w, ln_bias=ln_b),
        "reference": lambda: gather_chain(x, mask, ln_w, ln_b),
    }
    compiled = maybe_compile(gather_chain, compile_)
    if compiled is not None:
        providers["compiled"] = lambda: compiled(x, mask, ln_w, ln_b)
    shape = dict(B=B, T=N + 1, K=K, D=D)
    grad_fn = lambda out: out.backward(grad.to(out.dtype))
    return "masked_gather_ln", providers, (x, ln_w, ln_b), grad_fn, shape, torch.float32


def setup_linear_cross_entropy(M, D, V, device, autocast_dtype, compile_):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, D, generator=g).to(device).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.02).to(device).requires_grad_()
    b = torch.zeros(V, device=device, requires_grad=True)
    target = torch.randint(0, V, (M,), generator=g).to(device)
    providers = {
        "ours": lambda: beit_kernels.linear_cross_entropy(x, w, b, target),
        "reference": lambda: lce_chain(x, w, b, target),
    }
    compiled = maybe_compile(lce_chain, compile_)
    if compiled is not None:
        providers["compiled"] = lambda: compiled(x, w, b, target)
    shape = dict(M=M, D=D, V=V)
    dtype = autocast_dtype or torch.float32
    return "linear_cross_entropy", providers, (x, w, b), lambda out: out.backward(), shape, dtype


def setup_add_layer_norm(B, N, D, device, autocast_dtype, compile_, keep_prob=0.9):
    g = torch.Generator().manual_seed(3)
    act = autocast_dtype or torch.float32
    x = torch.randn(B, N, D, generator=g).to(device).requires_grad_()  # the fp32 residual stream
    branch = torch.randn(B, N, D, generator=g).to(device=device, dtype=act).requires_grad_()
    gamma = torch.full((D,), 0.1, device=device, requires_grad=True)
    w = torch.ones(D, device=device, requires_grad=True)
    b = torch.zeros(D, device=device, requires_grad=True)
    keep = (torch.rand(B, generator=g) < keep_prob).float().to(device)
    scale = keep / keep_prob
    keep = keep.view(B, 1, 1)
    gh, gy = (torch.randn(B, N, D, generator=g).to(device) for _ in range(2))
    providers = {
        "ours": lambda: beit_kernels.add_layer_norm(x, branch, gamma, w, b, sample_scale=scale, y_dtype=autocast_dtype),
        "reference": lambda: add_ln_chain(x, branch, gamma, w, b, keep, keep_prob),
    }
    compiled = maybe_compile(add_ln_chain, compile_)
    if compiled is not None:
        providers["compiled"] = lambda: compiled(x, branch, gamma, w, b, keep, keep_prob)
    grad_fn = lambda out: torch.autograd.backward(out, (gh.to(out[0].dtype), gy.to(out[1].dtype)))
    dtype = autocast_dtype or torch.float32
    return "add_layer_norm", providers, (x, branch, gamma, w, b), grad_fn, dict(B=B, N=N, D=D), dtype


def setup_bias_gelu(B, N, D, device, autocast_dtype, compile_):
    g = torch.Generator().manual_seed(4)
    act = autocast_dtype or torch.float32
    x = torch.randn(B, N, D, generator=g).to(device=device, dtype=act).requires_grad_()  # fc1's output, no bias
    bias = (torch.randn(D, generator=g) * 0.02).to(device).requires_grad_()
    grad = torch.randn(B, N, D, generator=g).to(device)
    providers = {
        "ours": lambda: beit_kernels.bias_gelu(x, bias),
        "reference": lambda: bias_gelu_chain(x, bias),
    }
    compiled = maybe_compile(bias_gelu_chain, compile_)
    if compiled is not None:
        providers["compiled"] = lambda: compiled(x, bias)
    dtype = autocast_dtype or torch.float32
    grad_fn = lambda out: out.backward(grad.to(out.dtype))
    return "bias_gelu", providers, (x, bias), grad_fn, dict(B=B, N=N, D=D), dtype


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run, or a fast GPU check)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument(
        "--ops", default="patch_embed,patch_embed_uint8,masked_gather,linear_cross_entropy,add_layer_norm,bias_gelu"
    )
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = harness.env_info(device)
    if args.quick or device.type == "cpu":
        # The interpreter's bf16 dot is wrong (it multiplies bit patterns), so the CPU smoke run stays in fp32.
        B, img, p, D, K, V = 2, 32, 16, 64, 2, 160
        autocast_dtype = None if device.type == "cpu" else torch.bfloat16
        quick = True
    else:
        B, img, p, D, K, V = args.batch, 224, 16, 768, 75, 8192
        autocast_dtype = torch.bfloat16
        quick = False
    compile_ = not args.no_compile
    N = (img // p) ** 2
    ops = set(args.ops.split(","))
    cases = {
        "patch_embed": lambda: setup_patch_embed(B, img, p, D, device, autocast_dtype, compile_, False),
        "masked_gather": lambda: setup_masked_gather(B, N, K, D, device, autocast_dtype, compile_),
        "linear_cross_entropy": lambda: setup_linear_cross_entropy(B * K, D, V, device, autocast_dtype, compile_),
        "patch_embed_uint8": lambda: setup_patch_embed(B, img, p, D, device, autocast_dtype, compile_, True),
        "add_layer_norm": lambda: setup_add_layer_norm(B, N + 1, D, device, autocast_dtype, compile_),
        "bias_gelu": lambda: setup_bias_gelu(B, N + 1, 4 * D, device, autocast_dtype, compile_),
    }
    unknown = ops - set(cases)
    if unknown:
        raise SystemExit(f"unknown --ops {sorted(unknown)}: choose from {sorted(cases)}")
    rows = []
    for name, case in cases.items():
        if name not in ops:
            continue
        kernel, providers, leaves, grad_fn, shape, dtype = case()
        rows += measure(kernel, providers, leaves, grad_fn, shape, dtype, env, device, quick, autocast_dtype)
        if args.out:  # after each op, so a run cut short by a time limit keeps what it measured
            harness.write_rows(rows, args.out)
    print(f"# fused ops on {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_sha']}")
    if device.type == "cpu":
        print("# CPU: Triton interpreter; these times check the harness only and say nothing about GPU speed")
    print(harness.format_table(rows, ("kernel", "dtype", "provider", "mode", "metric", "p50", "unit")))
    return rows


if __name__ == "__main__":
    main()
