"""Causal attention over the paged KV cache: every sequence of a step in one call.

Sequence b has n_b = cu_seqlens_q[b + 1] - cu_seqlens_q[b] new query rows (packed in q) and
context_lens[b] >= n_b keys in the cache, its new ones included; its row i sits at position
context_lens[b] - n_b + i and attends to the positions at or before it (the last `window`
of them with a sliding window). Decode rows (n_b = 1), prefill chunks over a cached past and
cache-less sequences (the packed k / v seen as a cache of one-token blocks, `packed_tables`)
are all the same call. GQA: query head h reads KV head h // (H / KV).

The C++ kernel (csrc/attention.cpp, bsr_paged_attention, CPU) and the Triton kernel
(kernels/attention.py, GPU; CPU tensors under TRITON_INTERPRET=1) read each cached row once
per tile of queries, with no gather, padding, mask tensor or Python loop; the reference below
gathers each sequence's blocks and runs torch's SDPA with its causal (and window) mask.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _backends


def _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, read_back: bool) -> None:
    """Shapes and dtypes; read_back: also the values (a device sync on a GPU, so never on the
    Triton path: it must stay capturable in a CUDA graph)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be [T, H, D] and k_cache / v_cache [num_blocks, block_size, KV, D], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    T, H, D = q.shape
    KV = k_cache.shape[2]
    if k_cache.shape[3] != D or H % KV:
        raise ValueError(f"head_dim {k_cache.shape[3]} vs {D}, or {H} query heads not a multiple of {KV} KV heads")
    if q.dtype != k_cache.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if context_lens.dtype != torch.int32 or context_lens.dim() != 1:
        raise ValueError(f"context_lens must be int32 [B], got {context_lens.dtype} {tuple(context_lens.shape)}")
    B = context_lens.shape[0]
    if cu_seqlens_q.dtype != torch.int32 or tuple(cu_seqlens_q.shape) != (B + 1,):
        raise ValueError(f"cu_seqlens_q must be int32 [{B + 1}], got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be int32 [{B}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if read_back and int(cu_seqlens_q[-1]) != T:
        raise ValueError(f"cu_seqlens_q must end at q's {T} rows, got {int(cu_seqlens_q[-1])}")


def packed_tables(cu_seqlens: list, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_tables, context_lens) that read cache-less packed k / v [T, KV, D], seen as the
    cache k[:, None] (T blocks of one token): sequence b's table is its own rows (entries past
    its length repeat the last row, never read)."""
    starts = torch.tensor(cu_seqlens[:-1], dtype=torch.int32, device=device)
    lens = torch.tensor(cu_seqlens[1:], dtype=torch.int32, device=device) - starts
    width = max(int(lens.max()) if len(lens) else 1, 1)
    tables = torch.arange(width, dtype=torch.int32, device=device)[None, :] + starts[:, None]
    return tables.clamp_(max=max(cu_seqlens[-1] - 1, 0)), lens


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                              window: Optional[int] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Per sequence: gather its blocks, one SDPA with the offset causal (and window) mask."""
    T, H, D = q.shape
    KV, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for b in range(len(cu) - 1):
        s, e, n = cu[b], cu[b + 1], int(context_lens[b])
        if e == s:
            continue
        blocks = block_tables[b, : -(-n // bs)].long()
        ks, vs = (c.index_select(0, blocks).reshape(-1, KV, D)[:n] for c in (k_cache, v_cache))
        qpos = torch.arange(n - (e - s), n, device=q.device)[:, None]
        diff = qpos - torch.arange(n, device=q.device)[None, :]
        mask = diff >= 0
        if window:
            mask &= diff < window
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                           vs.transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                           enable_gqa=KV != H)
        out[s:e] = o[0].transpose(0, 1)
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, window: Optional[int] = None,
                    scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """q [T, H, D] (packed new rows); k_cache / v_cache [num_blocks, block_size, KV, D] (each
    token's KV x D values contiguous; tokens may be further apart, as in views of a packed
    qkv); block_tables int32 [B, max_blocks]; cu_seqlens_q int32 [B + 1]; context_lens int32
    [B] (>= each sequence's new rows); window: None or the sliding window; scale: default
    1 / sqrt(D). Returns [T, H, D] in q's dtype. backend: "auto" (C++ on CPU and Triton on
    CUDA for fp32 / fp16 / bf16, else the reference), "cpp", "triton" or "reference". Not
    differentiable. No host sync on the Triton path (what a CUDA graph captures)."""
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    fast = q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if backend == "auto":
        backend = "reference"
        if fast and q.device.type == "cpu":
            backend = "cpp"
        elif fast and q.device.type == "cuda" and _backends.triton_available():
            backend = "triton"
    _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, read_back=backend != "triton")
    if backend == "reference":
        return paged_attention_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, window, scale)
    if backend == "triton":
        _backends.resolve("triton", q.device, q.dtype, "cpp")  # (installed, and CUDA or the interpreter)
        if not fast:
            raise ValueError(f"backend='triton' supports float32, float16 and bfloat16, got {q.dtype}")
        named = dict(k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, cu_seqlens_q=cu_seqlens_q,
                     context_lens=context_lens)
        for name, t in named.items():
            if t.device != q.device:
                raise ValueError(f"{name} must be on {q.device} (the device of q), got {t.device}")
        q = q if q.stride(2) == 1 else q.contiguous()
        k_cache = k_cache if k_cache.stride(3) == 1 else k_cache.contiguous()
        v_cache = v_cache if v_cache.stride(3) == 1 else v_cache.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        _backends.kernels().paged_attention(q, k_cache, v_cache, block_tables.contiguous(), cu_seqlens_q.contiguous(),
                                            context_lens.contiguous(), window, scale, out)
        return out
    if backend != "cpp":
        raise ValueError(f"backend must be 'auto', 'cpp', 'triton' or 'reference', got {backend!r}")
    if q.device.type != "cpu":
        raise ValueError("backend='cpp' needs CPU tensors")
    T, H, D = q.shape
    nb, bs, KV, _ = k_cache.shape

    def tokens(c):  # the kernel takes a token stride; a token's KV x D values must be contiguous
        ok = c.stride(3) == 1 and c.stride(2) == D and c.stride(0) == bs * c.stride(1)
        return c if ok else c.contiguous()

    k_cache, v_cache = tokens(k_cache), tokens(v_cache)
    q = q if q.stride(2) == 1 else q.contiguous()
    tables, cu, lens = block_tables.contiguous(), cu_seqlens_q.contiguous(), context_lens.contiguous()
    out = torch.empty(T, H, D, dtype=q.dtype)
    _backends.cpp().paged_attention(
        _backends.CPP_DTYPES[q.dtype], q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.stride(1), v_cache.stride(1), nb, bs, KV, H, D, tables.data_ptr(), tables.shape[1], cu.data_ptr(),
        lens.data_ptr(), lens.shape[0], int(window or 0), scale, out.data_ptr(), out.stride(0), out.stride(1),
    )  # fmt: skip
    return out
