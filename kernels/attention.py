"""Varlen causal attention over the paged KV cache: prefill, chunked prefill and decode rows of
every sequence of a step in one launch (the layout of ops.paged_attention).

Sequence b has n_b = cu_seqlens_q[b + 1] - cu_seqlens_q[b] new query rows and
context_lens[b] keys in the cache (its new ones included); row i sits at position
context_lens[b] - n_b + i and sees the keys at or before it (the last `window` of them with a
sliding window). Key position p of sequence b lives in block block_tables[b, p // block_size],
slot p % block_size: the kernel reads it there, with no gather.

Grid: (T // BLOCK_Q + B, KV). Program (i, g) finds its sequence by a binary search over
cu_seqlens_q (sequence b owns the program ids from cu[b] // BLOCK_Q + b on, one per BLOCK_Q
of its rows plus one spare) and computes BLOCK_Q query rows x the G query heads of KV head g
(BLOCK_M = BLOCK_Q * G rows of one tile: GQA reads each key once for its whole group, as
vLLM's unified attention does). The grid depends only on the shapes (T, B), never on the
lengths: no host sync, and a decode step can be captured in a CUDA graph. Programs with no
rows left exit at once.

Softmax is online (flash attention): fp32 running max and sum, base-2 exponentials with the
scale folded in, keys in tiles of BLOCK_N, tiles left of a sliding window skipped. fp16 /
bf16 operands use the tensor cores with fp32 accumulation; fp32 operands (and every dtype
under TRITON_INTERPRET, whose bf16 dot is wrong) multiply in fp32 with IEEE precision.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["paged_attention", "attention_config"]

_LOG2E = 1.4426950408889634


@triton.jit
def _find_seq(cu_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    """The sequence b whose program ids [cu[b] // BLOCK_Q + b, ...) hold pid."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(cu_ptr + mid) // BLOCK_Q + mid
        if first <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    tables_ptr, cu_ptr, lens_ptr,
    num_seqs, block_size, window, scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_tb,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = _find_seq(cu_ptr, num_seqs, pid, BLOCK_Q)
    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    local = pid - (q_start // BLOCK_Q + seq)
    if local * BLOCK_Q >= q_len:
        return
    ctx = tl.load(lens_ptr + seq)
    past = ctx - q_len

    offs_m = tl.arange(0, BLOCK_M)
    tok = local * BLOCK_Q + offs_m // G  # row of the sequence
    head = kvh * G + offs_m % G
    row_ok = (offs_m < BLOCK_Q * G) & (tok < q_len)
    qpos = past + tok
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & mask_d[None, :], other=0.0)  # fmt: skip
    if DOT_FP32:
        q = q.to(tl.float32)

    # keys this tile of rows may see: up to its last row's position, from its first row's window
    first_pos = past + local * BLOCK_Q
    kv_end = tl.minimum(ctx, first_pos + BLOCK_Q)
    kv_start = 0
    if WINDOW:
        kv_start = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    for start in range(kv_start, kv_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < kv_end
        blk = tl.load(table + offs_n // block_size, mask=key_ok, other=0).to(tl.int64)
        slot = offs_n % block_size
        kt = tl.load(k_ptr + blk[None, :] * stride_kb + slot[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None],
                     mask=key_ok[None, :] & mask_d[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        vt = tl.load(v_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                     mask=key_ok[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]  # fmt: skip
        if DOT_FP32:
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * scale_log2
        seen = key_ok[None, :] & (offs_n[None, :] <= qpos[:, None])
        if WINDOW:
            seen = seen & (qpos[:, None] - offs_n[None, :] < window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet: no NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & mask_d[None, :])  # fmt: skip


def attention_config(T: int, B: int, G: int, head_dim: int, elem_size: int) -> dict:
    """Launch parameters from the shapes only (never the lengths: no host sync).

    - Decode (one row per sequence, T == B): BLOCK_M = the group's heads rounded up to 16, so
      a program is one query row against its KV head.
    - Otherwise 64 rows per program (BLOCK_Q = 64 // G query positions), or the whole group
      when it is larger.
    - BLOCK_N 64 keys per tile (32 for fp32 operands or head_dim > 128, to bound registers).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    group = max(16, triton.next_power_of_2(G))
    block_m = group if T == B else max(64, group)
    block_n = 32 if (elem_size >= 4 or block_d > 128) else 64
    return dict(BLOCK_M=block_m, BLOCK_Q=block_m // G, BLOCK_N=block_n, BLOCK_D=block_d,
                num_warps=8 if block_m * block_d >= 128 * 128 else 4, num_stages=2)  # fmt: skip


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, window: int | None, scale: float,
                    out: torch.Tensor) -> None:
    """out[t, h] = attention of q[t, h] over its sequence's cached keys (see the module doc).

    q [T, H, D] (unit stride in D); k_cache / v_cache [num_blocks, block_size, KV, D] (unit
    stride in D; any other strides); block_tables int32 [B, max_blocks] (unit stride in
    blocks); cu_seqlens_q int32 [B + 1]; context_lens int32 [B]; out [T, H, D] like q (unit
    stride in D). Inputs are not validated here (ops.paged_attention does it)."""
    T, H, D = q.shape
    B = context_lens.shape[0]
    KV = k_cache.shape[2]
    if T == 0 or B == 0:
        return
    G = H // KV
    cfg = attention_config(T, B, G, D, q.element_size())
    grid = (T // cfg["BLOCK_Q"] + B, KV)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out,
        block_tables, cu_seqlens_q, context_lens,
        B, k_cache.shape[1], int(window or 0), float(scale) * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        G=G, HEAD_DIM=D, WINDOW=bool(window),
        DOT_FP32=(q.dtype == torch.float32 or q.device.type != "cuda"),
        **cfg,
    )  # fmt: skip
