"""RMSNorm, alone or after the residual add that precedes it: one pass over each row.

The reference is transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale. In
torch that is 6 ops (pow, mean, add, rsqrt, mul, mul; 7 with the residual add), each a pass
over the rows and, on a decode step of a few rows, a few microseconds of dispatch: 60-90
calls a step on a 30-layer model. The C++ kernel (csrc/rowops.cpp, bsr_rms_norm) does it in
one pass per row, fp32 math, each result rounded to the dtype where torch rounds it.
`auto` takes it for CPU float32 / float16 / bfloat16 rows whose weight has their dtype, when
no autograd graph is needed (training keeps the reference, differentiable); everything else
(CUDA, float64, mixed dtypes) is the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _backends

BACKENDS = ("auto", "cpp", "reference")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In fp32 torch.rms_norm, bit for bit the ops below in one dispatch (one row: 24 -> 16 us a
    call); 16-bit inputs keep the cast before the scale."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _fast(x: torch.Tensor, weight: torch.Tensor, add: Optional[torch.Tensor]) -> bool:
    ts = (x, weight) if add is None else (x, weight, add)
    return (
        x.device.type == "cpu"
        and x.dim() == 2
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and all(t.dtype == x.dtype and t.device.type == "cpu" and t.stride(-1) == 1 for t in ts)
        and weight.dim() == 1
        and weight.shape[0] == x.shape[1]
        and (add is None or add.shape == x.shape)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))
        and _backends._import_cpp() is not None
    )


def _choose(backend: str, x, weight, add) -> bool:
    """Whether to run the C++ kernel; ValueError for an unknown backend or a 'cpp' it cannot take."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    fast = _fast(x, weight, add)
    if backend == "cpp" and not fast:
        raise ValueError("backend='cpp' takes 2-D CPU float32/float16/bfloat16 rows with a weight [d] of their dtype "
                         "(unit column stride, no autograd graph)")
    return fast


def _cpp(x: torch.Tensor, weight: torch.Tensor, eps: float, add: Optional[torch.Tensor]):
    x = _backends.dense_rows(x)
    out = torch.empty(x.shape, dtype=x.dtype)
    s = None if add is None else torch.empty(x.shape, dtype=x.dtype)
    if add is not None:
        add = _backends.dense_rows(add)
    _backends.cpp().rms_norm(
        _backends.CPP_DTYPES[x.dtype], x.data_ptr(), x.stride(0), 0 if add is None else add.data_ptr(),
        0 if add is None else add.stride(0), x.shape[0], x.shape[1], weight.contiguous().data_ptr(), float(eps),
        0 if s is None else s.data_ptr(), 0 if s is None else s.stride(0), out.data_ptr(), out.stride(0),
    )  # fmt: skip
    return out if s is None else (s, out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)), x [..., d] (the kernel: [T, d]), weight [d]."""
    if _choose(backend, x, weight, None):
        return _cpp(x, weight, eps, None)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, add: torch.Tensor, weight: torch.Tensor, eps: float,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) with s = x + add: a sublayer's output joining the residual stream, then
    the next norm, in one pass. Inputs are not modified."""
    if _choose(backend, x, weight, add):
        return _cpp(x, weight, eps, add)
    s = x + add
    return s, rms_norm_reference(s, weight, eps)
