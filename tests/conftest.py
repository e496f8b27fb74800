"""Test set-up shared by every test.

Without CUDA, Triton runs only in its interpreter, which must be switched on before triton is imported (kernels
decorated with ``triton.jit`` read it when they are defined), so this runs before any test module imports
``beit_kernels``. Tests marked ``gpu`` are skipped without CUDA.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/_testutil.py

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
