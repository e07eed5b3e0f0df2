"""Decode attention over the paged KV cache: every sequence of a decode step in one call.

out[b] = softmax(scale * q[b] . K_b^T) V_b per head, where K_b / V_b are sequence b's
context_lens[b] cached rows (its newest included), found through its block table; GQA
(query head h reads KV head h // (H / KV)); an optional sliding window keeps the last
`window` keys. The C++ kernel (csrc/attention.cpp, bsr_paged_decode_attention) reads each
cached row once per KV-head group, with no per-sequence gather, padding or Python loop; the
reference below gathers each sequence's blocks and runs torch's SDPA on them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _backends


def _check(q, k_cache, v_cache, block_tables, context_lens) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be [B, H, D] and k_cache / v_cache [num_blocks, block_size, KV, D], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, D = q.shape
    KV = k_cache.shape[2]
    if k_cache.shape[3] != D or H % KV:
        raise ValueError(f"head_dim {k_cache.shape[3]} vs {D}, or {H} query heads not a multiple of {KV} KV heads")
    if q.dtype != k_cache.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be int32 [{B}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if context_lens.dtype != torch.int32 or tuple(context_lens.shape) != (B,):
        raise ValueError(f"context_lens must be int32 [{B}], got {context_lens.dtype} {tuple(context_lens.shape)}")


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                                     window: Optional[int] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Per sequence: gather its blocks, keep its keys (the last `window` of them), one SDPA."""
    B, H, D = q.shape
    KV, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(B):
        n = int(context_lens[b])
        blocks = block_tables[b, : -(-n // bs)].long()
        ks, vs = (c.index_select(0, blocks).reshape(-1, KV, D)[:n] for c in (k_cache, v_cache))
        if window:
            ks, vs = ks[-window:], vs[-window:]
        o = F.scaled_dot_product_attention(q[b][None, :, None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
                                           scale=scale, enable_gqa=KV != H)
        out[b] = o[0, :, 0]
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, window: Optional[int] = None,
                           scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """q [B, H, D] (one query per sequence); k_cache / v_cache [num_blocks, block_size, KV, D];
    block_tables int32 [B, max_blocks]; context_lens int32 [B] (>= 1); window: None or the
    sliding window; scale: default 1 / sqrt(D). Returns [B, H, D] in q's dtype. backend:
    "auto" (C++ on CPU for fp32 / fp16 / bf16, else the reference), "cpp" or "reference"."""
    _check(q, k_cache, v_cache, block_tables, context_lens)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    if backend == "auto":  # (the Triton paged attention of a GPU is not written yet: torch's SDPA there)
        cpu_kernel = q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        backend = "cpp" if cpu_kernel else "reference"
    if backend == "reference":
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, window, scale)
    if backend != "cpp":
        raise ValueError(f"backend must be 'auto', 'cpp' or 'reference', got {backend!r}")
    if q.device.type != "cpu":
        raise ValueError("backend='cpp' needs CPU tensors")
    q = q if q.stride(2) == 1 else q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    tables, lens = block_tables.contiguous(), context_lens.contiguous()
    B, H, D = q.shape
    out = torch.empty(B, H, D, dtype=q.dtype)
    _backends.cpp().paged_decode_attention(
        _backends.CPP_DTYPES[q.dtype], q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.shape[0], k_cache.shape[1], k_cache.shape[2], H, D, tables.data_ptr(), tables.shape[1],
        lens.data_ptr(), B, int(window or 0), scale, out.data_ptr(), out.stride(0), out.stride(1),
    )  # fmt: skip
    return out
