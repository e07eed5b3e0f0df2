"""Rotary position embedding (rotate-half form: Llama, Qwen2, Mistral) of a step's q and k heads.

`rope_cos_sin` builds a step's tables once (every layer reuses them); `rope` rotates
x [T, heads, head_dim], in practice the q and k heads of a merged qkv projection at once
(a strided view: no copy). The reference is transformers' x * cos + rotate_half(x) * sin;
in torch that is four ops and a temporary per layer (about 22 us a layer on a decode row of
SmolLM2's 12 heads, 2-core EPYC), the C++ kernel (csrc/rowops.cpp, bsr_rope) one pass.
`auto` takes it for CPU float32 / float16 / bfloat16 when no autograd graph is needed;
everything else (CUDA, float64, training) is the reference.
"""
from __future__ import annotations

import torch

from . import _backends

BACKENDS = ("auto", "cpp", "reference")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [T, head_dim] in fp32, cast to dtype (as transformers), sin with its first half
    negated: transformers' rotate_half(x) * sin is then roll(x, head_dim / 2) * sin, bit for bit
    (a sign flip is exact), in one op instead of a slice, a negation and a cat."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
    return emb.cos().to(dtype), sin.to(dtype)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos / sin [T, head_dim] from rope_cos_sin."""
    return x * cos[:, None, :] + x.roll(x.shape[-1] // 2, -1) * sin[:, None, :]


def _fast(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 3
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and x.shape[2] % 2 == 0
        and x.stride(2) == 1
        and all(t.dtype == x.dtype and t.device.type == "cpu" and t.dim() == 2 and t.stride(1) == 1
                and tuple(t.shape) == (x.shape[0], x.shape[2]) for t in (cos, sin))
        and cos.stride(0) == sin.stride(0)
        and not (torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad))
        and _backends._import_cpp() is not None
    )


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x [T, heads, head_dim] (any row and head strides; unit element stride for the kernel)
    rotated by cos / sin [T, head_dim] from rope_cos_sin; a new contiguous tensor.
    backend: "auto", "cpp" (CPU, inference only) or "reference"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return rope_reference(x, cos, sin)
    fast = _fast(x, cos, sin)
    if backend == "cpp" and not fast:
        raise ValueError("backend='cpp' takes CPU float32/float16/bfloat16 x [T, heads, head_dim] (even head_dim, "
                         "unit element stride) and cos / sin [T, head_dim] of x's dtype, with no autograd graph")
    if not fast:
        return rope_reference(x, cos, sin)
    T, H, D = x.shape
    out = torch.empty(T, H, D, dtype=x.dtype)
    # the kernel takes the halves' cos / sin [T, D / 2]: cos's first half, sin's second (its unnegated half)
    _backends.cpp().rope(
        _backends.CPP_DTYPES[x.dtype], x.data_ptr(), x.stride(0), x.stride(1), T, H, D, cos.data_ptr(),
        sin.data_ptr() + (D // 2) * sin.element_size(), cos.stride(0), out.data_ptr(), H * D, D,
    )  # fmt: skip
    return out
