"""Shared test setup: without a GPU, Triton kernels run on CPU tensors through its interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def triton_device() -> str | None:
    """Device the Triton backend runs on here: cuda, cpu (interpreter), or None if triton is missing."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


requires_triton = pytest.mark.skipif(triton_device() is None, reason="triton is not installed")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="longer fuzzing runs (more hypothesis / schemathesis examples per test)")


@pytest.fixture(scope="session")
def slow(request) -> bool:
    return request.config.getoption("--slow")
