"""SiLU-and-mul of a merged gate/up projection: silu(x[:, :I]) * x[:, I:] in one pass.

In torch it is a split, F.silu and a mul (two passes over the [T, I] halves and a temporary);
the C++ kernel (csrc/rowops.cpp, bsr_silu_mul) reads each element once, fp32 math, the SiLU
rounded to the dtype before the product as torch does. `auto` takes it for 2-D CPU float32 /
float16 / bfloat16 rows when no autograd graph is needed; everything else is the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backends

BACKENDS = ("auto", "cpp", "reference")


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x [T, 2 I] (gate columns, then up) -> [T, I]."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if x.shape[-1] % 2:
        raise ValueError(f"x must have an even number of columns (gate, then up), got {x.shape[-1]}")
    fast = (
        backend != "reference"
        and x.device.type == "cpu"
        and x.dim() == 2
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and x.stride(-1) == 1
        and not (torch.is_grad_enabled() and x.requires_grad)
        and _backends._import_cpp() is not None
    )
    if backend == "cpp" and not fast:
        raise ValueError("backend='cpp' takes 2-D CPU float32/float16/bfloat16 rows with unit column stride "
                         "and no autograd graph")
    if not fast:
        return silu_mul_reference(x)
    x = _backends.dense_rows(x)
    inter = x.shape[1] // 2
    out = torch.empty(x.shape[0], inter, dtype=x.dtype)
    _backends.cpp().silu_mul(_backends.CPP_DTYPES[x.dtype], x.data_ptr(), x.stride(0), x.shape[0], inter,
                             out.data_ptr(), out.stride(0))
    return out
