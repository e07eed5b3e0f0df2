"""Backend names, availability and the `auto` choice shared by every op.

An unknown or unavailable backend is a ValueError, never a silent fallback.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cpp", "reference")

# dtype codes of the C ABI (csrc/include/bsharedrag.h, enum bsr_dtype)
CPP_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@functools.lru_cache(maxsize=None)
def _import_cpp() -> ModuleType | None:
    try:
        from .. import _C
    except ImportError:
        return None
    return _C


@functools.lru_cache(maxsize=None)
def _import_kernels() -> ModuleType | None:
    try:
        from .. import kernels
    except ImportError:
        return None
    return kernels


def cpp() -> ModuleType:
    mod = _import_cpp()
    if mod is None:
        raise ValueError(
            "backend='cpp' is unavailable: the extension bsharedrag_fast._C is not built "
            "(reinstall with `pip install -e .`)"
        )
    return mod


def kernels() -> ModuleType:
    mod = _import_kernels()
    if mod is None:
        raise ValueError("backend='triton' is unavailable: triton is not installed")
    return mod


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, device: torch.device, cpu_auto: str) -> str:
    """Return the concrete backend for tensors on `device`.

    cpu_auto is the op's measured choice for CPU tensors (see each op's module).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            kernels()
            return "triton"
        if device.type != "cpu":
            raise ValueError(f"backend='auto' supports cpu and cuda tensors, got device {device}")
        return cpu_auto
    if backend == "triton":
        kernels()
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                f"got device {device}"
            )
    elif backend == "cpp":
        cpp()
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got device {device}")
    return backend
