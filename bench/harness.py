"""The shared benchmark harness: timing, peak memory, and long-format rows that say where they were measured.

Every bench script imports this module (``sys.path`` gets ``bench/`` first, as the scripts do) and writes rows of
the form
    kernel, provider, mode, metric, unit, shape (dict), dtype, p50, p20, p80, device, torch, triton, git_sha, date
one per (kernel, provider, mode, metric, shape). Speed-ups are ratios of rows measured in the same run on the same
device; nothing here compares numbers across machines.

On CUDA, timing uses ``triton.testing.do_bench`` (L2 flushed between repetitions, quantiles 0.5/0.2/0.8); on the
CPU, a perf_counter loop, for smoke runs of the harness only (its numbers say little about GPU speed).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

QUANTILES = (0.5, 0.2, 0.8)


def git_sha() -> str:
    sha = os.environ.get("BEIT_GIT_SHA")
    if sha:
        return sha
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device) if device is not None else _default_device()
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def env_info(device: torch.device | str | None = None) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton_version,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # Kernel switches, as the kernels read them at import: a row says which kernels it timed.
        "kernel_switches": kernel_switches(),
    }


# Sweep winners installed for this process by apply_tuning.py: {family: "mode:candidate"}.
TUNED: dict[str, str] = {}


def kernel_switches() -> dict:
    """The effective values of the kernels' run-wide switches, and the sweep winners installed in this process
    (empty where beit_kernels does not import)."""
    try:
        from beit_kernels import tuning
    except Exception:  # noqa: BLE001  (beit_kernels does not import: no switches to report)
        return {}
    # As the switches resolve here at BEiT's attention shape: the fused backward, where it runs, replaces the dk/dv
    # kernels, so the all-queries one is reported off then.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backward = tuning.attention_backward(197, 64, torch.bfloat16, device)
    return {"dkdv_all_queries": backward == "dkdv_allq", "attn_bwd_fused": backward == "fused", "tuned": dict(TUNED)}


def time_fn(
    fn: Callable[[], object],
    *,
    device: torch.device | str | None = None,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    min_reps: int = 3,
    warmed: bool = False,
) -> tuple[float, float, float]:
    """Milliseconds per call of ``fn`` at the quantiles 0.5, 0.2, 0.8. On the CPU one call warms up, unless
    ``warmed`` (the caller has just called ``fn``), and at least ``min_reps`` calls are timed."""
    device = torch.device(device) if device is not None else _default_device()
    if device.type == "cuda":
        from triton.testing import do_bench

        return tuple(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES)))
    if not warmed:
        fn()  # warm-up: first calls compile or allocate
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times, dtype=torch.float64)
    return tuple(torch.quantile(t, q).item() for q in QUANTILES)


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str | None = None) -> float | None:
    """Peak memory that one call of ``fn`` adds on top of what is allocated before it, in MiB (None on CPU)."""
    device = torch.device(device) if device is not None else _default_device()
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def profiled_ops(fn: Callable[[], object], calls: int, device: torch.device | str | None = None
                 ) -> list[tuple[str, float, float]]:  # fmt: skip
    """``calls`` calls of ``fn`` under torch.profiler: (name, ms per call, launches per call) of every GPU kernel
    they ran (of every CPU op on a CPU-only run), by self time, longest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device) if device is not None else _default_device()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize(device)

    def self_us(e) -> float:
        if not cuda:
            return e.self_cpu_time_total
        # torch >= 2.4 names it device time; older versions, cuda time.
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    def counted(e) -> bool:
        # On a GPU, the kernels themselves: a CPU op (aten::mm, a beit_kernels custom op) reports the time of the
        # kernels it launched as its own device time, and user annotations span other events, so either would count
        # kernels twice (as torch's own table avoids).
        if cuda and (e.device_type == DeviceType.CPU or getattr(e, "is_user_annotation", False)):
            return False
        return self_us(e) > 0

    events = sorted((e for e in prof.key_averages() if counted(e)), key=self_us, reverse=True)
    return [(e.key, self_us(e) / 1e3 / calls, e.count / calls) for e in events]


def kernel_time_ms(fn: Callable[[], object], device: torch.device | str | None = None, calls: int = 3
                   ) -> float | None:  # fmt: skip
    """Milliseconds of GPU kernel time one call of ``fn`` takes (torch.profiler, the mean of ``calls``): what the
    GPU spends, apart from the host's launch overhead and any wait on the host, which ``time_fn`` includes when a
    call is too short to hide them. None on CPU."""
    device = torch.device(device) if device is not None else _default_device()
    if device.type != "cuda":
        return None
    return sum(ms for _, ms, _ in profiled_ops(fn, calls, device))


def row(
    kernel: str,
    provider: str,
    mode: str,
    metric: str,
    unit: str,
    values: float | Iterable[float] | None,
    *,
    shape: dict,
    dtype: torch.dtype | str | None,
    env: dict,
    **extra,
) -> dict:
    """One long-format row; ``values`` is one number or the (p50, p20, p80) triple."""
    if values is None:
        p50 = p20 = p80 = None
    elif isinstance(values, (int, float)):
        p50 = p20 = p80 = float(values)
    else:
        p50, p20, p80 = (float(v) for v in values)
    return {
        "kernel": kernel,
        "provider": provider,
        "mode": mode,
        "metric": metric,
        "unit": unit,
        "shape": shape,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "p50": p50,
        "p20": p20,
        "p80": p80,
        **extra,
        **env,
    }


def write_rows(rows: list[dict], path: str | os.PathLike) -> None:
    """Write ``rows`` as JSON through a temporary file and a rename: a stage stopped by its time limit in the
    middle of a write leaves the previous complete file, never a truncated one that a later stage cannot read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)


def format_table(rows: list[dict], columns: Iterable[str] = ("kernel", "provider", "mode", "metric", "p50", "unit")):
    columns = list(columns)

    def cell(r, c):
        v = r.get(c)
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, dict):
            return ",".join(f"{k}={x}" for k, x in v.items())
        return "-" if v is None else str(v)

    cells = [[cell(r, c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Tile sweeps (tune_attention.py, tune_glue.py)


def candidate_name(mode: str, cand, group_scale: float = 1) -> str:
    """A sweep row's provider name, "mode:AxBxC[:g<scale>]": the sweeps write it, apply_tuning.py reports it."""
    return f"{mode}:{'x'.join(map(str, cand))}" + (f":g{group_scale}" if group_scale != 1 else "")


def min_reps(quick: bool) -> int:
    """Calls a measurement times at least: one in a ``--quick`` run, a smoke run in the Triton interpreter that
    checks every timed path runs (its numbers say nothing about a GPU's), three otherwise."""
    return 1 if quick else 3


def sweep_parser(description: str, kinds: str):
    """The options every tile sweep takes; a script adds its own."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--kinds", default=kinds, help="the launchers to sweep, comma-separated")
    p.add_argument("--rep-ms", type=float, default=100, help="timing budget a candidate (do_bench's rep)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few candidates: a CPU interpreter smoke run")
    p.add_argument("--out", help="write the rows as JSON here")
    return p


def sweep_candidate(rows: list[dict], out: str | None, kernel: str, name: str, mode: str, run: Callable[[], object],
                    agrees: Callable[[object], bool], context, *, device, rep_ms: float, quick: bool = False,
                    **fields) -> dict:  # fmt: skip
    """One candidate of a tile sweep: inside ``context`` (which installs the candidate), check that ``run()``'s
    output ``agrees`` with the default's, then time it. A failure (a mismatch, a candidate that does not compile
    or does not fit) is an error row, not an exception: one bad candidate must not stop the sweep. The row is
    appended to ``rows``, which are written to ``out`` (if given) at once: a sweep stopped by its time limit keeps
    what it timed."""
    try:
        with context:
            if not agrees(run()):
                raise AssertionError("outputs differ from the default configuration's")
            # On the CPU the agreement check's call was the warm-up.
            t = time_fn(run, device=device, rep_ms=rep_ms, warmup_ms=10, warmed=True, min_reps=min_reps(quick))
        r = row(kernel, name, mode, "time", "ms", t, **fields)
    except Exception as e:  # noqa: BLE001
        r = row(kernel, name, mode, "error", "", None, note=f"{type(e).__name__}: {e}".splitlines()[0][:300], **fields)
    print(f"{name:28s} {r['p50'] if r['p50'] is not None else r['note']}", flush=True)
    rows.append(r)
    if out:
        write_rows(rows, out)
    return r


def finish_sweep(rows: list[dict], out: str | None) -> list[dict]:
    """Print a sweep's rows, fastest first within each mode, errors last; write them to ``out`` if given."""
    timed = sorted((r for r in rows if r["metric"] == "time"), key=lambda r: (r["mode"], r["p50"]))
    errors = [r for r in rows if r["metric"] == "error"]
    print(format_table(timed + errors, ("mode", "provider", "metric", "p50", "p20", "p80", "unit", "note")))
    if out:
        write_rows(rows, out)
    return rows
