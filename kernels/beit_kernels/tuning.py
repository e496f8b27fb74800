"""The tile and switch choices of every kernel, as data, and a public way to override them for a block of code.

No kernel is autotuned: the attention dk/dv kernel accumulates into its bias-gradient buffer, which autotuning's
repeated launches would corrupt, and one fixed table keeps results reproducible. ``TABLE`` holds every choice,
keyed ``"<kernel>.<launch>"``; the launchers read it through the functions below each time they launch, so an
override takes effect at the next call. ``bench/tune_attention.py`` and ``bench/tune_glue.py`` time the
candidates an entry could hold; ``bench/RESULTS.md`` keeps the measurements behind the defaults.

Entries (what decides them in brackets):

    attention.fwd, .dq, .dkdv     rows ``(dtype class, largest head dimension, tile, changes with >= 160 KiB of
                                  shared memory a block)``: the first row whose dtype class ("half" or "fp32") and
                                  head dimension match gives BLOCK_M, BLOCK_N, num_warps, num_stages.
    attention.dkdv_allq, .fused   the same rows (any dtype, BLOCK_M is N's power of two, set by the launcher);
                                  ``fused`` also carries DKDV_T (dk and dv as transposed products).
    attention.interpreter         the tile changes each attention launch kind takes in Triton's interpreter, where
                                  large tiles mean fewer Python-level steps.
    attention.dkdv_all_queries    the all-queries dk/dv kernel: True, False, or None for the architecture's default
                                  (on for sm90 only); from ``BEIT_KERNELS_DKDV_ALL_QUERIES`` when it is set.
    attention.bwd_fused           the fused backward, where it applies; from ``BEIT_KERNELS_ATTN_BWD_FUSED``.
    attention.dkdv_groups, .dkdv_allq_groups, .fused_groups
                                  ``programs_per_sm`` and ``scale``: batch groups of the kernel that sums the bias
                                  gradient, enough to fill the GPU with that many programs a multiprocessor, times
                                  ``scale``.
    layer_norm.fwd, .bwd          BLOCK_M and num_warps from the row width (``max_elements`` a program,
                                  ``elements_per_thread``, at most ``max_rows`` rows), unless given; the backward's
                                  ``programs_per_sm``, ``loop_stages`` (software pipelining of its row-tile loop,
                                  None: none) and ``joint_sums`` (its two row sums as one reduction).
    bias_gelu.fwd, .bwd           BLOCK_M, BLOCK_D (narrowed to D's power of two, more rows instead), num_warps;
                                  the backward's ``loop_stages``.
    conv_epilogue.epi, .epi_pool  the block tail's and the max-pool's tiles: ``max_channels`` a row, ``elements`` a
                                  program, num_warps.
    linear_cross_entropy.ce       ``max_logits`` a chunk holds (rows per chunk: the power of two that fits, or
                                  ``chunk_rows`` when given), and the row kernel's BLOCK_V and num_warps.
    masked_gather.rows            ``num_warps`` by row width: {widest BLOCK_D: warps}.
    patch_embed.fwd, .bwd         the GEMM tiles; the backward's ``weight_grad``: "triton" (the patches recomputed
                                  from the image) or "cublas" (materialised, one cuBLAS GEMM).
    shared_memory                 bytes of shared memory a block that the attention lookups assume; None: the
                                  device's own (``backend.block_shared_memory``). For compiling for a GPU from a
                                  machine without one (``bench/kernel_resources.py``).

Overrides::

    with beit_kernels.tuning.override({"attention.fwd": {"BLOCK_N": 64}, "attention.bwd_fused": True,
                                       "layer_norm.bwd": {"loop_stages": None}}):
        ...  # launches in this block use these choices

A dict entry's override sets only the fields it names (on the attention tiles: at every shape, after the rows'
own changes); any other entry is replaced. Unknown keys or fields and malformed values are refused before anything
changes; leaving the block (also by an exception) restores what was in force before it. Overrides nest; they are
process-wide (not per thread), and a launch compiled into a CUDA graph keeps the tile it was captured with.
``attention_backward`` says which backward kernel runs at a shape; ``overrides`` lists what is in force.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator, Mapping

import torch

from beit_kernels.backend import block_shared_memory, env_switch, interpreting

# A block's shared memory from which the deeper pipelines and the fused backward fit (sm80, sm90, sm100; not sm86,
# sm89, sm120 at 99 KiB).
LARGE_SHARED = 160 * 1024
# The all-queries dk/dv kernel and the fused backward hold every query in one tile: sequences of at most this many
# tokens, in half precision, at head dimensions of at most 64.
ALL_QUERIES_MAX_N = 256
FUSED_MAX_N = 256
ONE_TILE_MAX_HEAD_DIM = 64


def _tile(m, n, warps, stages):
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


_ATTENTION_KINDS = ("fwd", "dq", "dkdv", "dkdv_allq", "fused")

_DEFAULTS: dict[str, object] = {
    # IEEE fp32 products run on the FMA units with their operands replicated across threads, so fp32 tiles are
    # small; head dimensions above 128 take smaller half-precision tiles than 64-wide ones, which would need 136
    # to 200 KiB of shared memory there. The three-stage forward pipeline needs more than 99 KiB.
    "attention.fwd": [
        ("fp32", 64, _tile(32, 32, 4, 2), {}),
        ("fp32", 256, _tile(16, 16, 4, 2), {}),
        ("half", 64, _tile(128, 32, 4, 2), dict(num_stages=3)),
        ("half", 128, _tile(64, 64, 8, 2), dict(num_stages=3)),
        ("half", 256, _tile(64, 32, 8, 2), {}),
    ],
    "attention.dq": [
        ("fp32", 64, _tile(32, 32, 4, 2), {}),
        ("fp32", 256, _tile(16, 16, 4, 2), {}),
        ("half", 64, _tile(64, 32, 4, 2), {}),
        ("half", 128, _tile(64, 64, 8, 2), {}),
        ("half", 256, _tile(32, 32, 4, 2), {}),
    ],
    "attention.dkdv": [
        ("fp32", 64, _tile(32, 16, 4, 2), {}),
        ("fp32", 256, _tile(16, 16, 4, 2), {}),
        ("half", 64, _tile(64, 64, 4, 2), {}),
        ("half", 128, _tile(64, 64, 8, 2), {}),
        ("half", 256, _tile(32, 32, 4, 2), {}),
    ],
    # Two stages take 94 KiB of shared memory: one below 160 KiB (68 KiB).
    "attention.dkdv_allq": [("any", 256, dict(BLOCK_N=16, num_warps=8, num_stages=1), dict(num_stages=2))],
    # 16 keys and 8 warps, the all-queries kernel's tile; dq's [N, D] fp32 accumulator comes on top.
    "attention.fused": [("any", 256, dict(BLOCK_N=16, num_warps=8, num_stages=2, DKDV_T=False), {})],
    "attention.interpreter": {
        "fwd": _tile(64, 64, 4, 1),
        "dq": _tile(64, 64, 4, 1),
        "dkdv": _tile(64, 64, 4, 1),
        "dkdv_allq": dict(num_stages=1),
        "fused": dict(num_stages=1),
    },
    "attention.dkdv_all_queries": env_switch("BEIT_KERNELS_DKDV_ALL_QUERIES"),
    "attention.bwd_fused": bool(env_switch("BEIT_KERNELS_ATTN_BWD_FUSED")),
    "attention.dkdv_groups": dict(programs_per_sm=4, scale=1),
    "attention.dkdv_allq_groups": dict(programs_per_sm=4, scale=4),
    # The fused backward's programs are large (an [N, D] fp32 accumulator, [N, 16] tiles at 8 warps): one a
    # multiprocessor fills the GPU.
    "attention.fused_groups": dict(programs_per_sm=1, scale=1),
    # Whole rows, several per program for narrow D; the backward (more live tiles) moves 8 elements a thread.
    "layer_norm.fwd": dict(max_elements=4096, elements_per_thread=16, max_rows=16, BLOCK_M=None, num_warps=None),
    "layer_norm.bwd": dict(
        max_elements=1024,
        elements_per_thread=8,
        max_rows=16,
        BLOCK_M=None,
        num_warps=None,
        programs_per_sm=8,
        loop_stages=2,
        joint_sums=False,
    ),  # fmt: skip
    # 16 elements a thread; column blocks that split D = 3072 (BEiT-B's MLP) whole.
    "bias_gelu.fwd": dict(BLOCK_M=8, BLOCK_D=512, num_warps=8),
    "bias_gelu.bwd": dict(BLOCK_M=16, BLOCK_D=256, num_warps=8, loop_stages=3),
    # 4096 elements a program, 16 a thread, a row of at most 128 channels (256 contiguous bytes in half precision).
    "conv_epilogue.epi": dict(max_channels=128, elements=4096, num_warps=8),
    "conv_epilogue.epi_pool": dict(max_channels=128, elements=4096, num_warps=8),
    # 2**26 logits a chunk: 128 MiB in bf16, 8192 rows at V = 8192.
    "linear_cross_entropy.ce": dict(max_logits=1 << 26, chunk_rows=None, BLOCK_V=2048, num_warps=8),
    "masked_gather.rows": dict(num_warps={1024: 4, 4096: 8, 65536: 16}),
    # The largest tiles that compile without register spills (the gathered patch tile is register-heavy). The
    # weight gradient's tile is wide in D and K: each program re-reads the image for its D tile, dY for its K tile.
    "patch_embed.fwd": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "patch_embed.bwd": dict(BLOCK_M=32, BLOCK_D=128, BLOCK_K=128, num_warps=8, num_stages=2, weight_grad="triton"),
    "shared_memory": None,
}

# The defaults, read-only (``override`` changes what is in force, never these).
TABLE: Mapping[str, object] = types.MappingProxyType(_DEFAULTS)

# What ``override`` has put in force: key -> value (a dict entry's fields, an attention tile's parameters).
_active: dict[str, object] = {}
# The entries in force as ``_entry`` resolved them, shared and never mutated; emptied whenever ``_active`` changes.
# The launchers look entries up at every launch, and a deep copy each time cost a few microseconds of host time.
_resolved: dict[str, object] = {}


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _power_of_two(v) -> bool:
    return _positive_int(v) and v & (v - 1) == 0


def _optional(check):
    return lambda v: v is None or check(v)


def _warps_by_width(v) -> bool:
    return isinstance(v, dict) and bool(v) and all(_power_of_two(k) and _power_of_two(w) for k, w in v.items())


_FIELD_CHECKS = {
    "BLOCK_M": (_power_of_two, "a power of two"),
    "BLOCK_N": (_power_of_two, "a power of two"),
    "BLOCK_D": (_power_of_two, "a power of two"),
    "BLOCK_K": (_power_of_two, "a power of two"),
    "BLOCK_V": (_power_of_two, "a power of two"),
    "num_warps": (_power_of_two, "a power of two"),
    "num_stages": (_positive_int, "a positive int"),
    "DKDV_T": (lambda v: isinstance(v, bool), "a bool"),
    "joint_sums": (lambda v: isinstance(v, bool), "a bool"),
    "loop_stages": (_optional(_positive_int), "a positive int or None"),
    "programs_per_sm": (_positive_int, "a positive int"),
    "scale": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a positive number"),
    "max_elements": (_power_of_two, "a power of two"),
    "elements_per_thread": (_positive_int, "a positive int"),
    "max_rows": (_positive_int, "a positive int"),
    "max_channels": (_power_of_two, "a power of two"),
    "elements": (_power_of_two, "a power of two"),
    "max_logits": (_positive_int, "a positive int"),
    "chunk_rows": (_optional(_positive_int), "a positive int or None"),
    "weight_grad": (lambda v: v in ("triton", "cublas"), "'triton' or 'cublas'"),
}
_SCALAR_CHECKS = {
    "attention.dkdv_all_queries": (_optional(lambda v: isinstance(v, bool)), "True, False or None (by architecture)"),
    "attention.bwd_fused": (lambda v: isinstance(v, bool), "a bool"),
    "shared_memory": (_optional(_positive_int), "a positive int (bytes) or None (the device's)"),
}


def _tile_fields(key: str) -> set[str]:
    rows = _DEFAULTS[key]
    return set(rows[0][2])  # every row of a launch kind has the same parameters


def _check_fields(key: str, value, fields: set[str]) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"tuning.override: {key!r} takes a dict of {sorted(fields)}, got {value!r}")
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(f"tuning.override: {key!r} has no field {unknown[0]!r}; its fields are {sorted(fields)}")
    for field, v in value.items():
        if field == "num_warps" and key == "masked_gather.rows":
            ok, what = _warps_by_width(v), "a dict {widest BLOCK_D: warps} of powers of two"
        else:
            check, what = _FIELD_CHECKS[field]
            ok = check(v)
        if not ok:
            raise ValueError(f"tuning.override: {key}[{field!r}] must be {what}, got {v!r}")


def _check(key: str, value) -> None:
    if key not in _DEFAULTS:
        raise ValueError(f"tuning.override: unknown key {key!r}; known keys: {', '.join(sorted(_DEFAULTS))}")
    if key in _SCALAR_CHECKS:
        check, what = _SCALAR_CHECKS[key]
        if not check(value):
            raise ValueError(f"tuning.override: {key!r} must be {what}, got {value!r}")
    elif key == "attention.interpreter":
        _check_fields(key, value, set(_ATTENTION_KINDS))
        for kind, tile in value.items():
            _check_fields(f"{key}.{kind}", tile, _tile_fields(f"attention.{kind}") | {"BLOCK_M"})
    elif isinstance(_DEFAULTS[key], list):
        _check_fields(key, value, _tile_fields(key))
    else:
        _check_fields(key, value, set(_DEFAULTS[key]))


# ----------------------------------------------------------------------------------------------------------------
# Overrides


@contextlib.contextmanager
def override(entries: Mapping[str, object]) -> Iterator[None]:
    """Put ``entries`` (``{key: value}``, see the module docstring) in force for the ``with`` block, on top of what
    is in force already; restored on exit, also by an exception. Every entry is checked before any changes."""
    if not isinstance(entries, Mapping):
        raise TypeError(f"tuning.override takes a dict {{key: value}}, got {type(entries).__name__}")
    for key, value in entries.items():
        _check(key, value)
    saved = copy.deepcopy(_active)
    for key, value in entries.items():
        if isinstance(_DEFAULTS[key], (dict, list)):
            merged = dict(_active.get(key, {}))  # type: ignore[arg-type]
            merged.update(copy.deepcopy(dict(value)))  # type: ignore[arg-type]
            _active[key] = merged
        else:
            _active[key] = value
    _resolved.clear()
    try:
        yield
    finally:
        _active.clear()
        _active.update(saved)
        _resolved.clear()


def overrides() -> dict[str, object]:
    """The overrides in force (``{}`` outside any ``override`` block)."""
    return copy.deepcopy(_active)


def get(key: str):
    """The entry in force for ``key``: the table's value with the overrides applied (a copy). For the attention
    tiles (a list of rows), the fixed parameters in force; ``attention_tile`` resolves a launch's tile."""
    value = _entry(key)
    if isinstance(value, dict):
        # A flat dict of numbers, strings and None copies as a dict; nested ones (masked_gather.rows,
        # attention.interpreter) need the deep copy.
        if all(v is None or isinstance(v, (int, float, str)) for v in value.values()):
            return dict(value)
        return copy.deepcopy(value)
    return value


def _entry(key: str):
    """``get`` without the copy, for the lookups below, which only read it: resolved once while the overrides in
    force stay the same."""
    try:
        return _resolved[key]
    except KeyError:
        pass
    if key not in _DEFAULTS:
        raise ValueError(f"tuning.get: unknown key {key!r}; known keys: {', '.join(sorted(_DEFAULTS))}")
    default = _DEFAULTS[key]
    if isinstance(default, list):
        value = copy.deepcopy(_active.get(key, {}))
    elif isinstance(default, dict):
        if key == "attention.interpreter":
            value = {k: dict(v, **_active.get(key, {}).get(k, {})) for k, v in default.items()}  # type: ignore
        else:
            value = copy.deepcopy(dict(default, **_active.get(key, {})))  # type: ignore[arg-type]
    else:
        value = _active.get(key, default)
    _resolved[key] = value
    return value


# ----------------------------------------------------------------------------------------------------------------
# Lookups the launchers make


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory a block that the lookups assume on ``device`` (``shared_memory`` when set)."""
    fixed = _entry("shared_memory")
    return fixed if fixed is not None else block_shared_memory(device)


def attention_tile(kind: str, head_dim: int, dtype: torch.dtype, shared: int) -> dict:
    """Tile of attention launch ``kind`` ("fwd", "dq", "dkdv", "dkdv_allq" or "fused") at head dimension
    ``head_dim`` and ``dtype`` on a GPU with ``shared`` bytes of shared memory a block (or in the interpreter);
    ``dkdv_allq`` and ``fused`` leave BLOCK_M to the launcher."""
    if kind not in _ATTENTION_KINDS:
        raise ValueError(f"attention_tile: unknown kind {kind!r}; expected one of {_ATTENTION_KINDS}")
    dtype_class = "fp32" if dtype == torch.float32 else "half"
    rows = _DEFAULTS[f"attention.{kind}"]
    match = [(tile, large) for dt, max_d, tile, large in rows if dt in ("any", dtype_class) and head_dim <= max_d]
    if not match:
        raise ValueError(f"attention_tile: no {kind} tile for head dimension {head_dim}")
    tile, large = match[0]
    cfg = dict(tile)
    if shared >= LARGE_SHARED:
        cfg.update(large)
    if interpreting():
        cfg.update(_entry("attention.interpreter")[kind])
    cfg.update(_entry(f"attention.{kind}"))
    return cfg


def attention_groups(kind: str) -> tuple[int, float]:
    """(programs a multiprocessor, scale) of the batch groups of the ``kind`` backward kernel that sums the bias
    gradient ("dkdv", "dkdv_allq" or "fused")."""
    entry = _entry(f"attention.{kind}_groups")
    return entry["programs_per_sm"], entry["scale"]


def _one_tile(N: int, D: int, dtype: torch.dtype, max_n: int) -> bool:
    return N <= max_n and D <= ONE_TILE_MAX_HEAD_DIM and dtype != torch.float32


def attention_all_queries(N: int, D: int, dtype: torch.dtype, device: torch.device | None = None) -> bool:
    """Whether the two-kernel backward takes the all-queries dk/dv kernel at this shape on ``device``."""
    if not _one_tile(N, D, dtype, ALL_QUERIES_MAX_N):
        return False
    switch = _entry("attention.dkdv_all_queries")
    if switch is None:
        return device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    return switch


def attention_fused(N: int, D: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the backward takes the fused kernel at this shape on ``device``: switched on, and a block has
    160 KiB of shared memory (one of its two forms needs up to 148 KiB; unbounded in the interpreter)."""
    if not (_entry("attention.bwd_fused") and _one_tile(N, D, dtype, FUSED_MAX_N)):
        return False
    return shared_memory(device) >= LARGE_SHARED


def attention_backward(N: int, D: int, dtype: torch.dtype, device: torch.device) -> str:
    """Which attention backward runs at sequence length ``N``, head dimension ``D`` and ``dtype`` on ``device``:
    "fused", or the dq kernel then "dkdv_allq" or "dkdv" (the kinds of ``bench/tune_attention.py``)."""
    if attention_fused(N, D, dtype, device):
        return "fused"
    return "dkdv_allq" if attention_all_queries(N, D, dtype, device) else "dkdv"


def layer_norm_tile(D: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of ``add_layer_norm``'s forward or backward at row width D."""
    e = _entry("layer_norm.bwd" if backward else "layer_norm.fwd")
    block_d = _next_power_of_2(D)
    block_m = e["BLOCK_M"] or max(1, min(e["max_rows"], e["max_elements"] // block_d))
    warps = e["num_warps"] or min(32, max(4, block_m * block_d // (32 * e["elements_per_thread"])))
    return block_m, block_d, warps


def bias_gelu_tile(D: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of ``bias_gelu``: the table's, narrowed to D's power of two for narrow rows
    (more rows a program instead)."""
    e = _entry("bias_gelu.bwd" if backward else "bias_gelu.fwd")
    narrow = min(e["BLOCK_D"], _next_power_of_2(D))
    return e["BLOCK_M"] * (e["BLOCK_D"] // narrow), narrow, e["num_warps"]


def conv_epilogue_tile(C: int, pool: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of ``conv_epilogue`` at C channels, with or without the max-pool."""
    e = _entry("conv_epilogue.epi_pool" if pool else "conv_epilogue.epi")
    block_c = min(e["max_channels"], _next_power_of_2(max(C, 1)))
    return max(1, e["elements"] // block_c), block_c, e["num_warps"]


def cross_entropy_chunk(M: int, V: int) -> int:
    """Rows per chunk of ``linear_cross_entropy`` (a power of two): ``chunk_rows`` when set, else all M rows where
    their logits fit in ``max_logits`` elements, else the most rows that fit."""
    e = _entry("linear_cross_entropy.ce")
    if e["chunk_rows"] is not None:
        return e["chunk_rows"]
    most = max(1, e["max_logits"] // max(V, 1))
    most = 1 << (most.bit_length() - 1)  # the power of two at or below
    return max(1, min(_next_power_of_2(max(M, 1)), most))


def masked_gather_warps(block_d: int) -> int:
    """Warps of a ``masked_gather`` program over a row of ``block_d`` features."""
    by_width = _entry("masked_gather.rows")["num_warps"]
    for width in sorted(by_width):
        if block_d <= width:
            return by_width[width]
    return by_width[max(by_width)]
