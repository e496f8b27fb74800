"""Fixtures of the kernel tests."""

import contextlib

import pytest


@pytest.fixture
def tuned():
    """``tuned(entries)`` puts ``beit_kernels.tuning.override(entries)`` in force until the test ends."""
    from beit_kernels import tuning

    with contextlib.ExitStack() as stack:
        yield lambda entries: stack.enter_context(tuning.override(entries))
