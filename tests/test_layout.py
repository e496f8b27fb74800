"""The repository's layout: no folder at its root shadows an installed package for code run from the root.

``python -m ...`` and ``python -c ...`` put the working directory first on ``sys.path``. A folder there with an
``__init__.py`` is a regular package and wins over an installed package of the same name: transformers 5 imports
the PyPI package ``kernels``, and a ``kernels/__init__.py`` at our root made that import find our sources. A
folder without ``__init__.py`` is only a namespace candidate, which loses to a regular package anywhere on the path.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_PACKAGES = {"beit"}  # import packages this project installs from a root folder of the same name
ROOT_FOLDERS = sorted(
    p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier() and p.name not in OWN_PACKAGES
)

_FIND = (
    "import importlib, json, sys\n"
    "m = importlib.import_module(sys.argv[1])\n"
    "print(json.dumps([getattr(m, '__file__', None), list(getattr(m, '__path__', []))]))\n"
)


def import_from_root(name: str, extra_path: str | None = None) -> tuple[str | None, list[str]]:
    """Import ``name`` in a fresh interpreter started as ``python -c`` in the repository root."""
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = extra_path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run(
        [sys.executable, "-c", _FIND, name], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    file, path = json.loads(out.stdout.strip().splitlines()[-1])
    return file, path


def inside_root(p: str | None) -> bool:
    return p is not None and Path(p).resolve().is_relative_to(ROOT)


def test_root_folders_are_not_packages():
    # Only the project's own packages may be regular packages at the root.
    assert "kernels" in ROOT_FOLDERS and "bench" in ROOT_FOLDERS
    offenders = [name for name in ROOT_FOLDERS if (ROOT / name / "__init__.py").exists()]
    assert offenders == [], f"root folders that would shadow an installed package: {offenders}"


@pytest.mark.parametrize("name", ROOT_FOLDERS)
def test_an_installed_package_of_a_root_folders_name_wins(tmp_path, name):
    # A stand-in for any distribution that provides this import name, installed after the root on sys.path.
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("MARKER = 1\n")
    file, _ = import_from_root(name, extra_path=str(tmp_path))
    assert file == str(pkg / "__init__.py"), f"`import {name}` from the repository root found {file}"


def test_installed_distributions_are_not_shadowed():
    # Every import name that an installed distribution provides, when a root folder has that name too.
    provided = importlib.metadata.packages_distributions()
    clashes = [name for name in ROOT_FOLDERS if name in provided]
    for name in clashes:
        file, path = import_from_root(name)
        assert not inside_root(file) and not any(inside_root(p) for p in path), (name, provided[name], file, path)


def test_pypi_kernels_package_is_the_one_imported_from_the_root():
    # transformers 5 imports this package when a model class is imported (CUDAProperties is one of its names).
    if "kernels" not in importlib.metadata.packages_distributions():
        pytest.skip("the PyPI package 'kernels' is not installed")
    out = subprocess.run(
        [sys.executable, "-c", "import kernels, sys; from kernels import CUDAProperties; print(kernels.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert not inside_root(out.stdout.strip()), out.stdout


def test_beit_kernels_imports_from_the_root():
    file, _ = import_from_root("beit_kernels")
    assert file is not None and Path(file).parent.name == "beit_kernels", file
