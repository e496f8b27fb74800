"""The native DALI operators (``csrc/dali_ops``): ``fn.beit_mask_generator`` draws the blockwise masks inside the
pipeline, ``fn.beit_color_normalize`` fuses colour jitter, flip and normalisation on the CPU.

``load_dali_plugin`` loads, in this order, the library named by ``BEIT_DALI_PLUGIN``, one an install step placed
at ``beit/_native/libbeit_dali_ops.so``, or one built from the sources by the repository's ``CMakeLists.txt``
(``build_dali_plugin``) into ``$BEIT_CACHE_DIR`` (default ``~/.cache/beit``). ``BEIT_NO_DALI_PLUGIN=1`` opts out.
Without the operators the loader draws the masks with the Python ``MaskingGenerator`` and does the colour work with
DALI's own operators.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

PLUGIN_ENV_DISABLE = "BEIT_NO_DALI_PLUGIN"
PLUGIN_ENV_PATH = "BEIT_DALI_PLUGIN"
CACHE_ENV = "BEIT_CACHE_DIR"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # beit/
REPO_ROOT = PACKAGE_ROOT.parent  # holds csrc/dali_ops and CMakeLists.txt

_PLUGIN_STATE: dict = {}


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "beit")


def require_dali():
    """The ``nvidia.dali`` module, or an ImportError that says how to install it or what to use instead."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "NVIDIA DALI is not installed: pip install nvidia-dali-cuda130 (CUDA 13) or nvidia-dali-cuda120, "
            "or use the reference loader (build_loader(..., device='cpu', backend='reference'))"
        ) from e
    import nvidia.dali as dali

    return dali


def build_dali_plugin(cache_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Build the DALI operator plugin (``fn.beit_mask_generator``, ``fn.beit_color_normalize``) with CMake into
    ``cache_dir`` (default ``~/.cache/beit/dali_plugin/<key>``, the key covering the sources and the DALI version)
    and return the library's path. Raises with the build log's tail on failure."""
    dali = require_dali()
    src_dir = REPO_ROOT / "csrc" / "dali_ops"
    sources = sorted(src_dir.glob("*.cc"))
    cmake_lists = REPO_ROOT / "CMakeLists.txt"
    if not sources or not cmake_lists.exists():
        raise FileNotFoundError(f"plugin sources not found next to the package ({src_dir}, {cmake_lists})")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise FileNotFoundError("cmake is not on PATH")
    blob = b"".join(f.read_bytes() for f in [*sources, cmake_lists]) + dali.__version__.encode()
    key = hashlib.sha256(blob).hexdigest()[:16]
    out = Path(cache_dir) if cache_dir is not None else _cache_dir() / "dali_plugin" / key
    lib = out / "libbeit_dali_ops.so"
    if lib.exists() and not force:
        return lib
    out.mkdir(parents=True, exist_ok=True)
    # Ranks of one job start together: one builds, the others wait on the lock and find the library.
    with open(out / ".lock", "w") as lock:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists() and not force:
            return lib
        build = out / "build"
        cmds = [
            [cmake, "-S", str(REPO_ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
             f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}"],
            [cmake, "--build", str(build), "--target", "beit_dali_ops", "-j", str(min(4, os.cpu_count() or 1))],
        ]  # fmt: skip
        for cmd in cmds:
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                log = (res.stdout + res.stderr).strip().splitlines()[-15:]
                raise RuntimeError(f"building the DALI mask plugin failed ({' '.join(cmd)}):\n" + "\n".join(log))
        if not lib.exists():
            raise RuntimeError(f"the plugin build finished but {lib} is missing")
    return lib


def load_dali_plugin() -> bool:
    """Load the native operators once per process: True when ``fn.beit_mask_generator`` and
    ``fn.beit_color_normalize`` are available. Where they cannot be built or loaded, warns once (one line) and
    returns False: the Python mask generator and DALI's own colour operators take over."""
    if "loaded" in _PLUGIN_STATE:
        return _PLUGIN_STATE["loaded"]
    if os.environ.get(PLUGIN_ENV_DISABLE, "0") not in ("", "0"):
        _PLUGIN_STATE["loaded"] = False
        return False
    try:
        from nvidia.dali import plugin_manager

        # A library that an install step placed in the package is used as is; otherwise build from the sources.
        packaged = PACKAGE_ROOT / "_native" / "libbeit_dali_ops.so"
        lib = os.environ.get(PLUGIN_ENV_PATH) or (packaged if packaged.exists() else build_dali_plugin())
        plugin_manager.load_library(str(lib))
        from nvidia.dali import fn

        missing = [op for op in ("beit_mask_generator", "beit_color_normalize") if not hasattr(fn, op)]
        if missing:
            raise RuntimeError(f"{lib} lacks the operators {missing} (a stale build?)")
        _PLUGIN_STATE["loaded"], _PLUGIN_STATE["path"] = True, str(lib)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"DALI plugin unavailable ({first}); masks come from the Python generator, colour ops from DALI's own",
            stacklevel=4,
        )
        _PLUGIN_STATE["loaded"] = False
    return _PLUGIN_STATE["loaded"]
