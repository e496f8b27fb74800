"""Which devices the Triton path suits.

Triton lowers ``tl.dot`` to tensor cores only from sm80 (A100) on; on V100 (sm70) and older its matmuls fall back
to FMA loops that are far slower than cuBLAS, so matmul-heavy kernels must take the PyTorch path there. On a
machine without CUDA, Triton runs only in its interpreter (``TRITON_INTERPRET=1``), which is for tests, not speed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import torch


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is absent on macOS and Windows wheels)."""
    return importlib.util.find_spec("triton") is not None


def triton_matmul_ok(device: torch.device | str | None = None) -> bool:
    """True when ``device`` is a CUDA GPU on which Triton's ``tl.dot`` uses tensor cores (sm80 and newer)."""
    device = torch.device(device) if device is not None else None
    if device is None:
        if not torch.cuda.is_available():
            return False
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda" or not torch.cuda.is_available() or not triton_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def native_bf16(device: torch.device | str) -> bool:
    """True when ``device`` is a CUDA GPU that computes in bf16 itself (sm80 and newer). Not
    ``torch.cuda.is_bf16_supported()``: that also says True where bf16 is only emulated, because it merely allocates
    a bf16 tensor, which any CUDA GPU can (a V100 or T4), and there autocast
    in bf16 loses fp16's loss scaling, SDPA's memory-efficient kernel and cuDNN's convolutions."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def env_switch(name: str) -> bool | None:
    """A kernel switch from the environment: ``1`` on, ``0`` off, unset or empty ``None`` (the default decides).
    Anything else is refused, so that a typo cannot leave a switch silently at its default."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return None if value == "" else value == "1"


def _major_minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)  # "3.6.0", "2.4.0rc1", "3.9.0+git1234"
    if m is None:
        raise ValueError(f"unparsable version {version!r}")
    return int(m.group(1)), int(m.group(2))


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run our kernels with these versions, or None.

    Triton 3.6 and older convert a 1-element array to an int with ``int(array)`` when a kernel uses a runtime
    scalar as a loop bound (``range(0, N, BLOCK)``); NumPy 2.4 turned that deprecation into a TypeError, raised
    from inside the kernel. Triton 3.7 squeezes the array first."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter cannot run with NumPy {numpy_version} (it calls int() on a "
            "1-element array, an error since NumPy 2.4): install numpy<2.4 or triton>=3.7"
        )
    return None


@functools.cache
def _interpreter_problem() -> str | None:
    from importlib.metadata import version

    return interpreter_problem(version("triton"), version("numpy"))


def check_kernel_device(op: str, t: torch.Tensor) -> None:
    """Refuse a non-CUDA tensor for Triton kernel ``op`` unless the interpreter is on, pointing at the reference;
    under the interpreter, refuse a Triton and NumPy pair it cannot run with, before a kernel fails inside."""
    if t.device.type == "cuda":
        return
    if not interpreting():
        raise ValueError(
            f"{op}: the Triton kernel needs a CUDA tensor (got {t.device}); on CPU use beit_kernels.reference.{op}, "
            "or set TRITON_INTERPRET=1 before importing triton (tests only)"
        )
    problem = _interpreter_problem()
    if problem is not None:
        raise RuntimeError(f"{op}: {problem}")


def check_interpreter_dtype(op: str, device: torch.device, *dtypes: torch.dtype) -> None:
    """Refuse bf16 in Triton's CPU interpreter for an op whose kernels multiply with ``tl.dot``: the interpreter's
    bf16 dot multiplies the bit patterns (errors of 1e11 and more, no exception), so its results would be garbage
    passed on as numbers."""
    if device.type == "cuda" or not interpreting() or torch.bfloat16 not in dtypes:
        return
    raise ValueError(
        f"{op}: bfloat16 is not computed correctly by Triton's CPU interpreter (its bf16 tl.dot is wrong); on the "
        f"CPU use float32 or float16, or beit_kernels.reference.{op}; bf16 runs on a CUDA GPU"
    )


def check_vector(op: str, name: str, t: torch.Tensor | None, n: int, device: torch.device) -> None:
    """An optional per-feature (or per-sample) parameter of kernel ``op``: None, or a float tensor [n] on
    ``device``; anything else is a clear error before any launch."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a float tensor [{n}] or None")
    if tuple(t.shape) != (n,):
        raise ValueError(f"{op}: {name} must be [{n}], got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}")


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for the launchers: Triton 3.9 makes it a constexpr function, and a host call then goes
    through its wrapper (argument unwrapping, an import) each time."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for the launchers (a constexpr function in Triton 3.9, as ``cdiv``); 0 for 0, as
    Triton's."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def fill_programs(device: torch.device, per_sm: int = 4) -> int:
    """Programs that fill CUDA ``device``: ``per_sm`` on each multiprocessor."""
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def persistent_programs(n_tiles: int, device: torch.device, per_sm: int = 4) -> int:
    """Programs for a grid-stride kernel over ``n_tiles`` tiles that keeps per-program partial sums: enough to fill
    a GPU (``fill_programs``), never more than the tiles; two in the interpreter, which runs programs one by one
    (two still exercise the reduction of the partials)."""
    cap = fill_programs(device, per_sm) if device.type == "cuda" else 2
    return max(1, min(n_tiles, cap))


# Whether cuBLAS can return fp32 from bf16/fp16 operands here (aten::addmm.dtype, CUDA builds of recent torch).
_addmm_fp32_out = hasattr(torch.ops.aten.addmm, "dtype")


def add_t_matmul_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (fp32 [M, N]) + a^T @ b for a [R, M], b [R, N]: a weight gradient summed over R rows. Half-precision
    operands on CUDA go to cuBLAS with an fp32 result (products summed in fp32 and added unrounded); elsewhere, or
    on a build without that overload, the product is rounded to the operands' dtype once, then added in fp32.
    Returns acc (updated in place where it can be)."""
    global _addmm_fp32_out
    if a.dtype == torch.float32:
        return acc.addmm_(a.t(), b)
    if a.is_cuda and _addmm_fp32_out:
        try:
            return torch.ops.aten.addmm.dtype(acc, a.t(), b, torch.float32)
        except (RuntimeError, NotImplementedError):
            _addmm_fp32_out = False  # a build without it: dispatch refuses before any launch; use the fallback
    acc += a.t() @ b  # rounded to the operands' dtype once, then summed in fp32
    return acc


# Largest shared memory one block may opt into, KiB, by compute capability (CUDA programming guide), for a torch
# that does not report it; unknown parts get the smallest figure of their family (sm80+, or the 48 KiB any block
# has before sm80).
_SHARED_OPTIN_KIB = {(7, 0): 96, (7, 2): 96, (7, 5): 64, (8, 0): 163, (8, 7): 163, (9, 0): 227, (10, 0): 227,
                     (10, 3): 227, (12, 0): 99}  # fmt: skip
_SHARED_OPTIN_MIN_KIB = 99
_SHARED_PRE_SM80_MIN_KIB = 48


def shared_memory_optin(major: int, minor: int) -> int:
    """Bytes of shared memory one block may opt into on compute capability ``major.minor``, from the table."""
    unknown = _SHARED_OPTIN_MIN_KIB if major >= 8 else _SHARED_PRE_SM80_MIN_KIB
    return _SHARED_OPTIN_KIB.get((major, minor), unknown) * 1024


def block_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one block may use on ``device``, which sizes the tiles of the kernels that need the
    most (99 KiB on sm86 and sm89, 163 on sm80, 227 on sm90); unbounded for the interpreter."""
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    return shared_memory_optin(props.major, props.minor)


# ----------------------------------------------------------------------------------------------------------------
# Calling the launchers


# Tensor types the launchers take as they are; any other subclass (a FakeTensor, a DTensor, a functional wrapper)
# goes through the dispatcher, which knows how to handle it.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def call_op(op, impl, *args):
    """``op(*args)`` for ``impl``, a launcher registered as the torch.library custom op ``op``. In eager mode on
    plain tensors, ``impl(*args)`` itself: there the dispatcher's Python layers (the generated autograd kernel,
    the backend kernel, dynamo's disable wrapper, the aliasing check) run the same function and only add host
    time (``bench/host_overhead.py`` measures it). Through ``op`` wherever it matters: under torch.compile (the op
    stays opaque), in a dispatch or function mode (fake tensors, tracing, functionalisation), on tensor subclasses
    and meta tensors, and where autograd would record (grad mode on and an input that requires grad: a backward
    with create_graph=True, where the op's missing autograd formula is a clear error rather than a silently wrong
    double backward). Under the profiler the direct call is recorded under the op's name."""
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
    ):
        return op(*args)
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSORS or a.is_meta or (grad and a.requires_grad)):
            return op(*args)
    if torch._C._autograd._profiler_enabled():
        with torch.autograd.profiler.record_function(getattr(op, "_qualname", impl.__name__)):
            return impl(*args)
    return impl(*args)


IMPLS = ("auto", "ref", "sdpa", "triton")


@functools.cache
def _auto_impl(device_type: str, device_index: int | None) -> str:
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    if triton_matmul_ok(device):
        return "triton"
    # On CPU, and on GPUs older than sm80 (no tensor-core tl.dot), PyTorch's fused attention is the fastest path.
    return "sdpa"


def resolve_impl(impl: str, device: torch.device | str | None = None) -> str:
    """Turn ``impl`` (one of ``IMPLS``) into the concrete path for ``device``: "ref" (the official PyTorch code),
    "sdpa" (PyTorch's fused attention) or "triton" (our kernels); "auto" picks "triton" on sm80+ GPUs, else
    "sdpa". Raises for unknown values and for "triton" where Triton is not installed."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: expected one of {', '.join(IMPLS)}")
    if impl == "triton" and not triton_available():
        raise ValueError("impl='triton' needs the triton package, which is not installed; use impl='sdpa' or 'ref'")
    if impl != "auto":
        return impl
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _auto_impl(device.type, device.index)
