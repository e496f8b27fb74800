"""``beit-env``: the versions and devices that matter for a bug report, and which implementation ``auto`` picks."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys


def _version(dist: str, module: str | None = None) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    if module is not None:
        try:
            return getattr(importlib.import_module(module), "__version__", "installed (version unknown)")
        except Exception:
            pass
    return "not installed"


def collect() -> dict[str, str]:
    """The report as an ordered mapping of names to strings."""
    import torch

    import beit
    import beit_kernels
    from beit.model import resolve_impl
    from beit_kernels.backend import native_bf16

    info = {
        "beit": beit.__version__,
        "beit_kernels": beit_kernels.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch cuda": str(torch.version.cuda),
        "triton": _version("triton", "triton"),
        "nvidia-dali": next(
            (v for v in (_version(d) for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120")) if v != "not installed"),
            "not installed",
        ),
        "xformers": _version("xformers"),
        "transformers": _version("transformers"),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            info[f"gpu {i}"] = f"{torch.cuda.get_device_name(i)} (sm{major}{minor})"
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        info["gpu"] = "none (CUDA not available)"
        device = torch.device("cpu")
    info["bf16 supported"] = str(native_bf16(device))  # computed natively: emulation does not count
    info[f"impl 'auto' on {device}"] = resolve_impl("auto", device)
    return info


def main(argv: list[str] | None = None) -> int:
    info = collect()
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
