"""Which devices the Triton path suits.

Triton lowers ``tl.dot`` to tensor cores only from sm80 (A100) on; on V100 (sm70) and older its matmuls fall back
to FMA loops that are far slower than cuBLAS, so matmul-heavy kernels must take the PyTorch path there. On a
machine without CUDA, Triton runs only in its interpreter (``TRITON_INTERPRET=1``), which is for tests, not speed.
"""

from __future__ import annotations

import functools
import importlib.util

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
