"""Backend names, availability and the `auto` choice shared by every op, and their common input check.

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


_cpp_threads = [0]  # the kernels' thread count last set from torch's


def cpp() -> ModuleType:
    """The C++ kernels, their thread count kept at torch.get_num_threads(), so that
    torch.set_num_threads(n) bounds the whole model: OpenMP's own setting is per calling
    thread (a server's engine thread would not see it) and per runtime (theirs may not be
    torch's)."""
    mod = _import_cpp()
    if mod is None:
        raise ValueError(
            "backend='cpp' is unavailable: the extension bsharedrag_fast._C is not built "
            "(reinstall with `pip install -e .`)"
        )
    n = torch.get_num_threads()
    if n != _cpp_threads[0]:
        mod.set_num_threads(n)
        _cpp_threads[0] = n
    return mod


def kernels() -> ModuleType:
    mod = _import_kernels()
    if mod is None:
        raise ValueError("backend='triton' is unavailable: triton is not installed")
    return mod


def triton_available() -> bool:
    return _import_kernels() is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_matrix(name: str, t, layout: str) -> None:
    """ValueError naming `name` unless t is a 2-D float tensor (layout: e.g. "[T, d]")."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def dense_rows(t: torch.Tensor) -> torch.Tensor:
    """t itself if its rows are dense and disjoint (what the C++ / Triton kernels take), else a
    contiguous copy."""
    return t if t.stride(-1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


def resolve(backend: str, device: torch.device, dtype: torch.dtype, cpu_auto: str) -> str:
    """Return the concrete backend for tensors of `dtype` on `device`.

    cpu_auto is the op's measured choice for CPU tensors (see each op's module). The fast
    kernels compute in fp32 at most, so float64 goes to the reference under "auto" and is
    an error for "triton" / "cpp".
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dtype == torch.float64:
        if backend == "auto":
            return "reference"
        if backend != "reference":
            raise ValueError(
                f"backend={backend!r} supports float32, float16 and bfloat16; use 'reference' for float64"
            )
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
