"""Dense linear y = x W^T + b: the base projection of every layer and the LM head.

Decode steps multiply a handful of rows by every weight of the model, so they are bound
by reading the weights. A BLAS gemm packs W before multiplying, which at those shapes
doubles the traffic; torch's CPU fp32 gemm measured 2-4x slower at 4 rows than at 1.
The C++ kernel (csrc, `bsr_linear`) streams each block of weight rows once, prefetching
two blocks ahead into L2, and reuses it from cache for every row of x.

Up to 8 rows its AVX-512 tile is 8 rows x 3 weight rows, so they take one pass over W; fp32
calls of 9-16 rows put the rows in the 16 lanes of a vector and broadcast each weight to
them (one FMA per weight, no horizontal sums, one pass: a 16-row decode step of
SmolLM2-135M's projections 31 -> 22 ms on the Zen 4); past 128 rows it makes one pass per
128 rows of x (their micro-tiles stay in L2).
`auto` takes it on CPU where it beat F.linear in benchmarks/bench_linear.py (AMD EPYC,
2 threads, torch 2.13; Qwen2-0.5B's shapes, weights streamed from memory) and on the tiny
preset's cache-resident weights, per dtype and per machine (`cpp_pays`):
  float32   up to 16 rows: 1.8-4.6x (0.9-1.4x on cache-resident weights). With the AVX-512
            kernel also 17-127 rows when in_features >= 768: 1.0-2.9x F.linear (with fewer
            input features the reduction that ends each micro-tile is not amortized:
            0.7-0.9x). The AVX2 kernel (3 rows x 4 weight rows up to 16 rows, 4 x 2 above)
            is 1.2-2.9x at 16 rows and 0.9-1.7x at 32, 0.8-1.3x at 64 on an AVX2-only EPYC
            (2026-12-07): not taken above 16.
  float16   2+ rows:   torch's fp16 gemv is as fast at 1 row, its gemm 1.8-5.8x slower above;
  bfloat16  1..8 rows where the CPU has AVX512-BF16 / AMX (from 16 rows torch's gemm uses
            those dot products); every row count where it has not (torch emulates bf16:
            the kernel measured 3.5-4.5x at 2-512 rows on the AVX2-only EPYC).
On that AVX-512 machine (a Zen 4 EPYC) `auto` takes torch's oneDNN gemm
(`torch.ops.mkldnn._linear_pointwise`, what torch.compile calls on CPU) for the other fp32
row counts (`onednn_pays`): F.linear there is MKL's sgemm, and oneDNN's beat it by 1.02-1.58x
at 128-2048 rows and 1.07-1.86x at 17-64 on SmolLM2-135M's shapes, and beat the C++ kernel
from 128 rows (1.05-1.39x; 2026-12-07, 2 threads, plain weights: no packed copy is kept).
Everything else (CUDA, float64, other row counts, autograd graphs) is F.linear.

Weight-only int8 (`scale=`, `quantize_int8`): weight int8 [out, in] with one fp32 scale per
output channel, x and y fp32. The C++ kernel (`bsr_linear_w8`) widens each weight to fp32
inside the dot-product tile, so a decode step streams a quarter of fp32's bytes (one row:
SmolLM2-135M's 120 projections 14.3 -> 4.7 ms on the Zen 4, 2 threads, min of 7); above
W8_KERNEL_ROWS rows the weight is dequantized (a transient fp32 copy) and takes the fp32 path
above, where the gemm's FLOPs, not the bytes, bound the call.

The Backbone runs every base projection and its LM head through this op, then adds the
adapters with `ops.MergedLoRA`. `ops.lora_linear` keeps F.linear as its base: its rows
without an adapter are bit-identical to F.linear by contract (docs/api.md, ops.lora_linear;
tested in tests/test_lora_linear.py).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ..util.sysinfo import cpu_has_bf16
from . import _backends

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what bsr_linear takes here (fp64: F.linear)
ONEDNN_MIN_ROWS = 128  # AVX-512, fp32: from here oneDNN's gemm beats the C++ kernel at every in_features
# int8 weights: the C++ kernel up to this many rows, above it dequantize + the fp32 path. SmolLM2-135M's
# 120 projections on the Zen 4 (2 threads, min of 3): 128 rows 158 ms against 189, 256 rows 351 against 327
W8_KERNEL_ROWS = 192


@functools.lru_cache(maxsize=None)
def _machine() -> tuple[str, bool]:
    """(the ISA the C++ kernels run at, whether the CPU multiplies bf16 natively)."""
    mod = _backends._import_cpp()
    return (mod._isa() if mod is not None else "generic"), cpu_has_bf16()


def cpp_pays(dtype: torch.dtype, rows: int, in_features: int, isa: Optional[str] = None,
             native_bf16: Optional[bool] = None) -> bool:
    """Whether `auto` takes the C++ kernel for a CPU x [rows, in_features] (see the module
    doc); dtype torch.int8: int8 weights (fp32 rows). isa ("avx512", "avx2", "generic") and
    native_bf16 default to this machine's."""
    if dtype == torch.int8:
        return rows <= W8_KERNEL_ROWS
    if isa is None or native_bf16 is None:
        here = _machine()
        isa = here[0] if isa is None else isa
        native_bf16 = here[1] if native_bf16 is None else native_bf16
    if dtype == torch.float32:
        return rows <= 16 or (in_features >= 768 and isa == "avx512" and rows < ONEDNN_MIN_ROWS)
    if dtype == torch.float16:
        return rows >= 2
    return dtype == torch.bfloat16 and (rows <= 8 or not native_bf16)


def onednn_pays(dtype: torch.dtype, rows: int, in_features: int, isa: Optional[str] = None) -> bool:
    """Whether `auto` takes torch's oneDNN gemm for a CPU x [rows, in_features]: fp32 on the
    AVX-512 machine, where the C++ kernel does not pay (see the module doc)."""
    isa = _machine()[0] if isa is None else isa
    return dtype == torch.float32 and isa == "avx512" and not cpp_pays(dtype, rows, in_features, isa, False)


@functools.lru_cache(maxsize=None)
def _onednn_op():
    """torch's oneDNN linear, or None where torch was built without oneDNN (mkldnn)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


BACKENDS = ("auto", "cpp", "onednn", "reference")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of a [out, in] weight: (q int8, scale fp32 [out]),
    weight ~ q * scale[:, None], scale = max |row| / 127 (an all-zero row gets scale 1)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight an int8 one stands for: q * scale[:, None]."""
    return q.float() * scale[:, None]


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _plain_cpu_call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """x [T, in] on CPU with a contiguous weight and bias of its dtype, outside autograd: what
    the C++ kernel and oneDNN's gemm take."""
    return (
        x.device.type == "cpu"
        and x.dim() == 2
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.shape[1] == x.shape[1]
        and weight.is_contiguous()
        and (bias is None or (bias.dtype == x.dtype and tuple(bias.shape) == (weight.shape[0],)))
        and not _needs_graph(x, weight, bias)
    )


def _check_cpu_call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> None:
    _backends.check_float_matrix("x", x, "[T, in]")
    _backends.check_float_matrix("weight", weight, "[out, in]")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"backend={backend!r} supports float32, float16 and bfloat16, got {x.dtype}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and (t.device.type != "cpu" or t.dtype != x.dtype):
            raise ValueError(f"{name} must be a {x.dtype} CPU tensor like x, got {t.dtype} on {t.device}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [out, {x.shape[1]}] for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if _needs_graph(x, weight, bias):
        raise ValueError(f"backend={backend!r} is inference only; use 'auto' or 'reference' where autograd "
                         "needs a graph")


def _cpp_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """bsr_linear, or bsr_linear_w8 when scale is given (weight int8, x float32)."""
    x = _backends.dense_rows(x)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    b = 0 if bias is None else bias.data_ptr()
    if scale is None:
        _backends.cpp().linear(_backends.CPP_DTYPES[x.dtype], x.data_ptr(), x.stride(0), x.shape[0], x.shape[1],
                               weight.data_ptr(), weight.shape[0], b, y.data_ptr(), y.stride(0))
    else:
        _backends.cpp().linear_w8(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], weight.data_ptr(),
                                  scale.contiguous().data_ptr(), weight.shape[0], b, y.data_ptr(), y.stride(0))
    return y


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _onednn_op()(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), "none",
                        [], "")


def _check_w8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"with scale, weight must be an int8 [out, in] tensor, got {weight.dtype} "
                         f"{list(weight.shape)}")
    if not x.is_floating_point() or x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be a float [T, {weight.shape[1]}] tensor, got {x.dtype} {list(x.shape)}")
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (weight.shape[0],)):
            raise ValueError(f"{name} must be a float32 [{weight.shape[0]}] tensor, got {t.dtype} {list(t.shape)}")


def _linear_w8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               backend: str) -> torch.Tensor:
    """linear() of int8 weights with per-channel scales (see the module doc)."""
    _check_w8(x, weight, scale, bias)
    if backend == "onednn":
        raise ValueError("backend='onednn' takes float weights; int8 weights (scale=) run on 'auto', 'cpp' or "
                         "'reference'")
    plain = x.device.type == "cpu" and x.dtype == torch.float32 and not _needs_graph(x, bias)
    if backend == "cpp":
        _backends.cpp()
        if not plain:
            raise ValueError(f"backend='cpp' with int8 weights takes float32 CPU rows outside autograd, got "
                             f"{x.dtype} on {x.device}")
        return _cpp_linear(x, weight, bias, scale)
    if (backend == "auto" and plain and weight.device.type == "cpu" and cpp_pays(torch.int8, *x.shape)
            and _backends._import_cpp() is not None):
        return _cpp_linear(x, weight, bias, scale)
    w = dequantize_int8(weight, scale).to(x.dtype)
    return linear(x, w, None if bias is None else bias.to(x.dtype), "reference" if backend == "reference" else "auto")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str = "auto", scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b, x [T, in], weight [out, in], bias [out] or None.

    backend: "auto" (the C++ kernel or oneDNN's gemm where they pay, see the module doc, else
    F.linear), "cpp" (the kernel for any row count; CPU, inference only), "onednn" (torch's
    oneDNN gemm; CPU, inference only) or "reference" (F.linear).
    scale: weight-only int8, weight int8 [out, in] and scale fp32 [out]: y = x (weight *
    scale[:, None])^T + b ("reference" dequantizes and calls F.linear; "auto" takes the C++
    kernel for fp32 CPU rows up to W8_KERNEL_ROWS).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if scale is not None:
        return _linear_w8(x, weight, scale, bias, backend)
    if backend == "cpp":
        _backends.cpp()
        _check_cpu_call(x, weight, bias, backend)
        return _cpp_linear(x, weight, bias)
    if backend == "onednn":
        if _onednn_op() is None:
            raise ValueError("backend='onednn' needs a torch built with oneDNN (torch.backends.mkldnn)")
        _check_cpu_call(x, weight, bias, backend)
        return _onednn_linear(x, weight, bias)
    if backend == "auto" and _plain_cpu_call(x, weight, bias):
        rows, k = x.shape
        if cpp_pays(x.dtype, rows, k):
            if _backends._import_cpp() is not None:
                return _cpp_linear(x, weight, bias)
        elif onednn_pays(x.dtype, rows, k) and _onednn_op() is not None:
            return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)
