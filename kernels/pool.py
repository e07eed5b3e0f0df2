"""Pooled embedding: out[b] = pool(hidden[cu_seqlens[b]:cu_seqlens[b+1]]), with the backbone's
final RMSNorm and the L2 normalisation fused in.

Semantics (fp32 math throughout, out in hidden's dtype):
    rms(h)  = h * rsqrt(mean(h^2) + eps) * w            (only when norm_weight w is given)
    last:   v = rms(hidden[cu[b+1] - 1])                 (only the pooled row is normalised)
    cls:    v = rms(hidden[cu[b]])
    mean:   v = mean_t rms(hidden[t]) over the sequence  (every token is normalised first)
            = w * mean_t (hidden[t] * rsqrt(mean(hidden[t]^2) + eps))   (w applied once)
    normalize: v = v / max(||v||_2, 1e-12)               (a zero vector stays zero)

Kernels:
- _pool_rows_kernel, grid (cdiv(B, BLOCK_B),): BLOCK_B sequences per program (BLOCK_B > 1
  only for small d), each a whole row of BLOCK_D = next_pow2(d) columns held in registers.
  It pools last/cls (gathers the row, RMSNorm, L2) and finalises mean (reads the fp32
  partial sum from the scratch, scales by w / len, L2). If d > MAX_BLOCK_D it loops over
  CHUNK_D column chunks instead (one pass per reduction: rstd, norm, store; the repeats
  hit L1/L2).
- _pool_mean_kernel, grid (cdiv(T, ROWS),): the packed token axis is cut into tiles of
  ROWS rows (ROWS sized so the grid is ~4 programs per SM; no host sync: the grid needs only
  T = hidden.shape[0], never max(seqlen)), so a long sequence is split across many
  programs and a batch of short ones is packed into few. A program finds the first
  sequence overlapping its tile (a vectorised count over cu_seqlens), then walks the
  sequences in it; for each it adds BLOCK_T x BLOCK_D tiles of rows, each row scaled by its
  rstd, into an fp32 [BLOCK_T, BLOCK_D] accumulator, reduced over rows once per sequence.
  A sequence wholly inside the tile is finished there (w / len, L2, store); one that
  crosses a tile boundary tl.atomic_adds its partial sum into an fp32 scratch [B, d]
  (zeroed by the wrapper), and _pool_rows_kernel (mode finalize) then finishes just those
  sequences. With one tile (cdiv(T, ROWS) == 1) there is no scratch and no second launch.
  If d > MAX_BLOCK_D every sequence goes through the scratch, atomically added once per
  MEAN_CHUNK_T-row subtile and MEAN_CHUNK_D column chunk (rstd from a first pass over the
  subtile's columns).

The atomics make mean pooling of sequences that cross a tile boundary non-deterministic
in the last fp32 bits (summation order); sequences inside one tile are deterministic.

Backward (pool_backward; recomputes from hidden, saves nothing from the forward):
- last/cls: _pool_bwd_rows_kernel, grid (cdiv(B, BLOCK_B),), goes back through L2, w and
  the pooled row's RMSNorm and writes that row of grad_hidden (the wrapper zeroes the rest).
- mean: the forward kernels recompute p[b] = mean_t h_t * rstd_t (fp32, before w) when
  normalize or w needs it; _pool_bwd_rows_kernel turns dL/dout into G[b] = dL/du_t (fp32
  [B, d], the same for every token: w * dL/dv / len); _pool_mean_bwd_kernel, with the
  forward's token tiling, writes every row: dh_t = r_t * G[b] - h_t * r_t^3 * (h_t . G[b]) / d.
- dL/dw = sum_b dL/dv_b * p_b, tl.atomic_add over the sequence blocks into an fp32 [d].
- L2 backward: dL/dv = (g - y (y . g)) / max(|v|, 1e-12) while |v| > 1e-12, else g / 1e-12
  (torch's v / v.norm().clamp_min(1e-12); a zero vector gets a large but finite gradient).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import tuning
from .lora_shrink import num_sms

__all__ = ["pool_forward", "pool_backward", "pool_config", "pool_rows_key", "pool_mean_key"]

# the mode codes are the C ABI's enum bsr_pool_mode (0 last, 1 mean, 2 cls; bsharedrag_fast/util/pool_modes.py)
_MEAN = 1
_FINALIZE = 3  # _pool_rows_kernel mode: finish mean pooling from the fp32 scratch

# Widest row held in registers at once (next_pow2(d) above this loops over chunks).
MAX_BLOCK_D = 8192
# fp32 elements of one [BLOCK_T, BLOCK_D] / [BLOCK_B, BLOCK_D] register tile.
TILE_ELEMS = 8192
ROWS_TILE_ELEMS = 4096
# Chunked (d > MAX_BLOCK_D) column blocks: rows kernel, mean kernel (with 32-row subtiles).
CHUNK_D = 2048
MEAN_CHUNK_D = 256
MEAN_CHUNK_T = 32
# mean: programs per SM the token tiling aims for, and the smallest tile.
PROGRAMS_PER_SM = 4
MIN_ROWS = 16
# Largest bucket of the packed token count in a table key (tuning.bucket; a power of 4).
MAX_TOKENS_BUCKET = 65536
# cu_seqlens entries scanned per step when a mean program looks for its first sequence.
BLOCK_S = 512


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _scaled_chunk(src_rows, w_ptr, cols, mask_b, D, scale, HAS_W: tl.constexpr):
    """Columns `cols` of the pooled rows in fp32, times their scale (and the norm weight)."""
    mask_d = cols < D
    mask = mask_b[:, None] & mask_d[None, :]
    x = tl.load(src_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * scale[:, None]
    if HAS_W:
        x = x * tl.load(w_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    return x, mask


@triton.jit
def _first_seq(cu_ptr, B, r0, BLOCK_S: tl.constexpr):
    """The first sequence overlapping rows [r0, ...): #{j in 1..B : cu[j] <= r0}."""
    b = r0 * 0
    offs_s = tl.arange(0, BLOCK_S)
    for j0 in range(0, B, BLOCK_S):
        js = j0 + 1 + offs_s
        mask_s = js <= B
        c = tl.load(cu_ptr + js, mask=mask_s, other=0)
        b += tl.sum(((c <= r0) & mask_s).to(tl.int32), axis=0)
    return b


@triton.jit
def _pool_rows_kernel(
    src_ptr, cu_ptr, w_ptr, out_ptr,
    B, D, ROWS,
    stride_s, stride_o, eps,
    MODE: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, NORMALIZE: tl.constexpr, ALL: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    start = tl.load(cu_ptr + offs_b, mask=mask_b, other=0)
    end = tl.load(cu_ptr + offs_b + 1, mask=mask_b, other=1)
    if MODE == 0:  # last
        row = end - 1
    elif MODE == 2:  # cls
        row = start
    else:  # finalize mean: scratch row b; only sequences that crossed a tile boundary
        row = offs_b
        if not ALL:
            mask_b = mask_b & ((start // ROWS) != ((end - 1) // ROWS))
    src_rows = src_ptr + row.to(tl.int64)[:, None] * stride_s
    out_rows = out_ptr + offs_b.to(tl.int64)[:, None] * stride_o
    if MODE == 3:
        scale = 1.0 / (end - start).to(tl.float32)
    else:
        scale = tl.full((BLOCK_B,), 1.0, tl.float32)
    offs_d = tl.arange(0, BLOCK_D)

    if ONE_CHUNK:
        mask_d = offs_d < D
        mask = mask_b[:, None] & mask_d[None, :]
        x = tl.load(src_rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        if MODE != 3:
            if RMS:
                ss = tl.sum(x * x, axis=1)
                scale = scale * tl.rsqrt(ss / D + eps)
        x = x * scale[:, None]
        if HAS_W:
            w = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            x = x * w[None, :]
        if NORMALIZE:
            nrm = tl.sqrt(tl.sum(x * x, axis=1))
            x = x * (1.0 / tl.maximum(nrm, 1e-12))[:, None]
        tl.store(out_rows + offs_d[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if MODE != 3:
            if RMS:  # pass: rstd of the pooled row
                ss = tl.zeros((BLOCK_B,), tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    cols = d0 + offs_d
                    mask = mask_b[:, None] & (cols < D)[None, :]
                    x = tl.load(src_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                    ss += tl.sum(x * x, axis=1)
                scale = scale * tl.rsqrt(ss / D + eps)
        if NORMALIZE:  # pass: L2 norm of the pooled vector
            sv = tl.zeros((BLOCK_B,), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                x, mask = _scaled_chunk(src_rows, w_ptr, d0 + offs_d, mask_b, D, scale, HAS_W)
                sv += tl.sum(x * x, axis=1)
            scale = scale * (1.0 / tl.maximum(tl.sqrt(sv), 1e-12))
        for d0 in range(0, D, BLOCK_D):  # pass: store
            cols = d0 + offs_d
            x, mask = _scaled_chunk(src_rows, w_ptr, cols, mask_b, D, scale, HAS_W)
            tl.store(out_rows + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish_mean(acc, n, w_ptr, out_row, offs_d, mask_d, HAS_W: tl.constexpr, NORMALIZE: tl.constexpr):
    """out_row = l2(w * acc / n) for a sequence summed wholly by this program."""
    v = acc * (1.0 / n.to(tl.float32))
    if HAS_W:
        v = v * tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if NORMALIZE:
        nrm = tl.sqrt(tl.sum(v * v, axis=0))
        v = v * (1.0 / tl.maximum(nrm, 1e-12))
    tl.store(out_row + offs_d, v.to(out_row.dtype.element_ty), mask=mask_d)


@triton.jit
def _pool_mean_kernel(
    h_ptr, cu_ptr, w_ptr, out_ptr, acc_ptr,
    B, D, ROWS,
    stride_h, stride_o, eps,
    RMS: tl.constexpr, HAS_W: tl.constexpr, NORMALIZE: tl.constexpr, SINGLE_TILE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    T = tl.load(cu_ptr + B)
    r0 = tl.program_id(0) * ROWS
    r1 = tl.minimum(r0 + ROWS, T)
    b = _first_seq(cu_ptr, B, r0, BLOCK_S)
    seg_start = tl.load(cu_ptr + b)

    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    while seg_start < r1:
        seg_end = tl.load(cu_ptr + b + 1)
        lo = tl.maximum(seg_start, r0)
        hi = tl.minimum(seg_end, r1)
        acc_row = acc_ptr + b.to(tl.int64) * D
        if ONE_CHUNK:
            # [BLOCK_T, BLOCK_D] accumulator: elementwise adds per step, one cross-row
            # reduction per sequence (only the per-row rstd is reduced every step)
            acc2 = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
            for t0 in range(lo, hi, BLOCK_T):
                rows = t0 + offs_t
                mask = (rows < hi)[:, None] & mask_d[None, :]
                x = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h + offs_d[None, :],
                            mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)  # fmt: skip
                if RMS:
                    ss = tl.sum(x * x, axis=1)
                    x = x * tl.rsqrt(ss / D + eps)[:, None]
                acc2 += x
            acc = tl.sum(acc2, axis=0)
            out_row = out_ptr + b.to(tl.int64) * stride_o
            n = seg_end - seg_start
            if SINGLE_TILE:  # every sequence lies in the one tile
                _finish_mean(acc, n, w_ptr, out_row, offs_d, mask_d, HAS_W, NORMALIZE)
            elif (seg_start >= r0) & (seg_end <= r1):  # whole sequence here: finish it
                _finish_mean(acc, n, w_ptr, out_row, offs_d, mask_d, HAS_W, NORMALIZE)
            else:
                tl.atomic_add(acc_row + offs_d, acc, mask=mask_d, sem="relaxed")
        else:
            for t0 in range(lo, hi, BLOCK_T):
                rows = t0 + offs_t
                mask_t = rows < hi
                row_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h
                if RMS:
                    ss = tl.zeros((BLOCK_T,), tl.float32)
                    for d0 in range(0, D, BLOCK_D):
                        cols = d0 + offs_d
                        mask = mask_t[:, None] & (cols < D)[None, :]
                        x = tl.load(row_ptrs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                        ss += tl.sum(x * x, axis=1)
                    rstd = tl.rsqrt(ss / D + eps)
                for d0 in range(0, D, BLOCK_D):
                    cols = d0 + offs_d
                    mask = mask_t[:, None] & (cols < D)[None, :]
                    x = tl.load(row_ptrs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                    if RMS:
                        x = x * rstd[:, None]
                    tl.atomic_add(acc_row + cols, tl.sum(x, axis=0), mask=cols < D, sem="relaxed")
        b += 1
        seg_start = seg_end


# ----------------------------------------------------------------------------- backward kernels


@triton.jit
def _pool_bwd_rows_kernel(
    src_ptr, cu_ptr, w_ptr, gy_ptr, dst_ptr, gw_ptr,
    B, D,
    stride_s, stride_g, stride_dst, eps,
    MODE: tl.constexpr, HAS_W: tl.constexpr, NORMALIZE: tl.constexpr, GRAD_W: tl.constexpr,
    RMS: tl.constexpr, LOAD_P: tl.constexpr,  # RMS: (MODE != 1) and HAS_W; LOAD_P: MODE != 1 or NORMALIZE or HAS_W
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per sequence: gradient through L2 and w. last/cls: src = hidden, and the pooled row's
    RMSNorm backward is written into dst = grad_hidden. mean: src = p (fp32, the mean of the
    rms-scaled rows before w), dst = G (fp32 [B, d]) = dL/du_t for every token t of b."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    start = tl.load(cu_ptr + offs_b, mask=mask_b, other=0)
    end = tl.load(cu_ptr + offs_b + 1, mask=mask_b, other=1)
    if MODE == 0:
        row = end - 1
    elif MODE == 2:
        row = start
    else:
        row = offs_b
    src_rows = src_ptr + row.to(tl.int64)[:, None] * stride_s
    dst_rows = dst_ptr + row.to(tl.int64)[:, None] * stride_dst
    gy_rows = gy_ptr + offs_b.to(tl.int64)[:, None] * stride_g
    offs_d = tl.arange(0, BLOCK_D)

    r = tl.full((BLOCK_B,), 1.0, tl.float32)
    if RMS:  # rstd of the pooled row
        ss = tl.zeros((BLOCK_B,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            mask = mask_b[:, None] & (cols < D)[None, :]
            x = tl.load(src_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=1)
        r = tl.rsqrt(ss / D + eps)
    # L2: y = v * inv with inv = 1 / max(|v|, 1e-12); dL/dv = inv * (gy - v * c),
    # c = (y . gy) * inv while |v| > 1e-12, else 0 (the clamp passes no gradient)
    inv = tl.full((BLOCK_B,), 1.0, tl.float32)
    c = tl.zeros((BLOCK_B,), tl.float32)
    if NORMALIZE:
        nn = tl.zeros((BLOCK_B,), tl.float32)
        dy = tl.zeros((BLOCK_B,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            mask_d = cols < D
            mask = mask_b[:, None] & mask_d[None, :]
            v = tl.load(src_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * r[:, None]
            if HAS_W:
                v = v * tl.load(w_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            g = tl.load(gy_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            nn += tl.sum(v * v, axis=1)
            dy += tl.sum(v * g, axis=1)
        nrm = tl.sqrt(nn)
        inv = 1.0 / tl.maximum(nrm, 1e-12)
        c = tl.where(nrm > 1e-12, dy * inv * inv, 0.0)
    # RMSNorm of the pooled row: dL/dh = r * (gu - u * mean(gu * u)), u = h * r, gu = dL/du
    sdot = tl.zeros((BLOCK_B,), tl.float32)
    if RMS:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            mask_d = cols < D
            mask = mask_b[:, None] & mask_d[None, :]
            p = tl.load(src_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * r[:, None]
            w = tl.load(w_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            g = tl.load(gy_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            gv = (g - p * w * c[:, None]) * inv[:, None]
            sdot += tl.sum(gv * w * p, axis=1)
    if MODE == 1:
        out_scale = 1.0 / (end - start).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        mask = mask_b[:, None] & mask_d[None, :]
        g = tl.load(gy_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if LOAD_P:
            p = tl.load(src_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * r[:, None]
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        gv = g
        if NORMALIZE:
            if HAS_W:
                gv = (g - p * w * c[:, None]) * inv[:, None]
            else:
                gv = (g - p * c[:, None]) * inv[:, None]
        if GRAD_W:
            tl.atomic_add(gw_ptr + cols, tl.sum(gv * p, axis=0), mask=mask_d, sem="relaxed")
        gu = gv
        if HAS_W:
            gu = gv * w
        if MODE == 1:
            tl.store(dst_rows + cols[None, :], gu * out_scale[:, None], mask=mask)
        else:
            gh = gu
            if HAS_W:
                gh = r[:, None] * (gu - p * (sdot / D)[:, None])
            tl.store(dst_rows + cols[None, :], gh.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pool_mean_bwd_kernel(
    h_ptr, cu_ptr, g_ptr, dh_ptr,
    B, D, ROWS,
    stride_h, stride_dh, eps,
    RMS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    """dh[t] = r_t * G[b] - h[t] * r_t^3 * (h[t] . G[b]) / d  (RMS), else G[b], for every token t
    of sequence b; same token tiling as _pool_mean_kernel, every row of dh is written."""
    T = tl.load(cu_ptr + B)
    r0 = tl.program_id(0) * ROWS
    r1 = tl.minimum(r0 + ROWS, T)
    b = _first_seq(cu_ptr, B, r0, BLOCK_S)
    seg_start = tl.load(cu_ptr + b)

    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    while seg_start < r1:
        seg_end = tl.load(cu_ptr + b + 1)
        lo = tl.maximum(seg_start, r0)
        hi = tl.minimum(seg_end, r1)
        g_row = g_ptr + b.to(tl.int64) * D
        if ONE_CHUNK:
            mask_d = offs_d < D
            gu = tl.load(g_row + offs_d, mask=mask_d, other=0.0)[None, :]
            for t0 in range(lo, hi, BLOCK_T):
                rows = (t0 + offs_t).to(tl.int64)
                mask = (rows < hi)[:, None] & mask_d[None, :]
                if RMS:
                    x = tl.load(h_ptr + rows[:, None] * stride_h + offs_d[None, :],
                                mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)  # fmt: skip
                    r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
                    k = r * r * r * tl.sum(x * gu, axis=1) / D
                    gh = r[:, None] * gu - x * k[:, None]
                else:
                    gh = gu + tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
                tl.store(dh_ptr + rows[:, None] * stride_dh + offs_d[None, :],
                         gh.to(dh_ptr.dtype.element_ty), mask=mask)  # fmt: skip
        else:
            for t0 in range(lo, hi, BLOCK_T):
                rows = (t0 + offs_t).to(tl.int64)
                mask_t = rows < hi
                if RMS:
                    ss = tl.zeros((BLOCK_T,), tl.float32)
                    dot = tl.zeros((BLOCK_T,), tl.float32)
                    for d0 in range(0, D, BLOCK_D):
                        cols = d0 + offs_d
                        mask_d = cols < D
                        mask = mask_t[:, None] & mask_d[None, :]
                        x = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :],
                                    mask=mask, other=0.0).to(tl.float32)  # fmt: skip
                        gu = tl.load(g_row + cols, mask=mask_d, other=0.0)[None, :]
                        ss += tl.sum(x * x, axis=1)
                        dot += tl.sum(x * gu, axis=1)
                    r = tl.rsqrt(ss / D + eps)
                    k = r * r * r * dot / D
                for d0 in range(0, D, BLOCK_D):
                    cols = d0 + offs_d
                    mask_d = cols < D
                    mask = mask_t[:, None] & mask_d[None, :]
                    gu = tl.load(g_row + cols, mask=mask_d, other=0.0)[None, :]
                    if RMS:
                        x = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :],
                                    mask=mask, other=0.0).to(tl.float32)  # fmt: skip
                        gh = r[:, None] * gu - x * k[:, None]
                    else:
                        gh = gu + tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
                    tl.store(dh_ptr + rows[:, None] * stride_dh + cols[None, :],
                             gh.to(dh_ptr.dtype.element_ty), mask=mask)  # fmt: skip
        b += 1
        seg_start = seg_end


# ----------------------------------------------------------------------------- configs


def _warps(elems: int) -> int:
    if elems >= 4096:
        return 8
    if elems >= 1024:
        return 4
    if elems >= 256:
        return 2
    return 1


# What a measured table's pool entries hold (kernels/tuning.py): the rows kernel (last / cls, and
# the finish of mean) keyed by the batch, the mean kernels by the packed token count. BLOCK_D and
# ONE_CHUNK follow from d.
tuning.register("pool_rows", ("d", "batch", "elem_size"), {"BLOCK_B": (1, 64, True), "num_warps": (1, 16, True)})
tuning.register("pool_mean", ("d", "tokens", "elem_size"), {
    "BLOCK_T": (1, 128, True), "num_warps": (1, 16, True), "programs_per_sm": (1, 64, False),
})  # fmt: skip


def pool_rows_key(d: int, B: int, elem_size: int) -> tuple:
    """The rows kernel's table key: the batch bucketed (tuning.bucket), d and the element size exact."""
    return (d, tuning.bucket(B), elem_size)


def pool_mean_key(d: int, T: int, elem_size: int) -> tuple:
    """The mean kernels' table key: the packed token count bucketed, d and the element size exact."""
    return (d, tuning.bucket(T, MAX_TOKENS_BUCKET), elem_size)


def pool_config(d: int, max_block_d: int = MAX_BLOCK_D, *, B: int = 1, T: int = 1, elem_size: int = 4,
                device: torch.device | None = None) -> dict:
    """Block sizes for hidden size d, B sequences of T packed tokens (hidden's element size):
    {"rows": rows kernel config, "mean": mean kernel config, "programs_per_sm": mean's token tiling}.

    The entries for these shape buckets (pool_rows_key, pool_mean_key) in the table measured for
    `device`'s GPU (kernels/tuning.py) override this heuristic (H100-sized), which depends on d only:
    one_chunk: next_pow2(d) <= max_block_d, so a row (and the mean accumulator) sits in
    registers. rows kernel: BLOCK_B sequences per program so a tile holds ~ROWS_TILE_ELEMS
    (<= 16). mean kernel: BLOCK_T rows per step so a tile holds ~TILE_ELEMS (<= 32).
    Chunked: CHUNK_D-wide rows, MEAN_CHUNK_T x MEAN_CHUNK_D mean tiles. num_warps grows with
    the tile: 8 warps from 4096 fp32 elements, 4 from 1024, 2 from 256, else 1. Mean's token
    tiles: PROGRAMS_PER_SM programs per SM. BLOCK_D and ONE_CHUNK always follow from d and
    max_block_d. The backward kernels take the same tiles.
    """
    # the table is resolved outside the cache and is part of its key: a dict hit per call
    return _pool_config(d, max_block_d, pool_rows_key(d, B, elem_size), pool_mean_key(d, T, elem_size),
                        tuning.table_for(device))  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _pool_config(d: int, max_block_d: int, rows_key: tuple, mean_key: tuple, table: tuning.Table | None) -> dict:
    cfg = _pool_heuristic(d, max_block_d)
    rows = None if table is None else table.get("pool_rows", rows_key)
    if rows is not None:
        cfg["rows"].update(rows)
    mean = None if table is None else table.get("pool_mean", mean_key)
    if mean is not None:
        cfg["programs_per_sm"] = mean.pop("programs_per_sm")
        cfg["mean"].update(mean)
    return cfg


def _pool_heuristic(d: int, max_block_d: int) -> dict:
    block_d = max(16, triton.next_power_of_2(max(1, int(d))))
    if block_d <= max_block_d:
        block_b = max(1, min(16, ROWS_TILE_ELEMS // block_d))
        block_t = max(1, min(32, TILE_ELEMS // block_d))
        rows = dict(BLOCK_B=block_b, BLOCK_D=block_d, ONE_CHUNK=True, num_warps=_warps(block_b * block_d))
        mean = dict(BLOCK_T=block_t, BLOCK_D=block_d, ONE_CHUNK=True, num_warps=_warps(block_t * block_d))
    else:
        rd = min(CHUNK_D, max_block_d)
        md = min(MEAN_CHUNK_D, max_block_d)
        rows = dict(BLOCK_B=1, BLOCK_D=rd, ONE_CHUNK=False, num_warps=_warps(rd))
        mean = dict(BLOCK_T=MEAN_CHUNK_T, BLOCK_D=md, ONE_CHUNK=False, num_warps=_warps(MEAN_CHUNK_T * md))
    return dict(rows=rows, mean=mean, programs_per_sm=PROGRAMS_PER_SM)


def mean_rows_per_program(T: int, block_t: int, sms: int, programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """Token-tile height of the mean kernel: ~programs_per_sm programs per SM, >= MIN_ROWS,
    a multiple of BLOCK_T."""
    rows = max(MIN_ROWS, block_t, triton.cdiv(T, programs_per_sm * sms))
    return triton.cdiv(rows, block_t) * block_t


# ----------------------------------------------------------------------------- wrappers


def _check(hidden, cu_seqlens, norm_weight, out, out_name):
    assert hidden.dim() == 2 and hidden.stride(1) == 1, (hidden.shape, hidden.stride())
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.is_contiguous()
    assert out.shape[1] == hidden.shape[1] and out.stride(1) == 1, (out_name, out.shape, out.stride())
    if norm_weight is not None:
        assert norm_weight.shape == (hidden.shape[1],) and norm_weight.is_contiguous(), norm_weight.shape


def _mean_rows(T, cfg, device, rows_per_program):
    if rows_per_program:
        return int(rows_per_program)
    return mean_rows_per_program(T, cfg["mean"]["BLOCK_T"], num_sms(device), cfg["programs_per_sm"])


def _forward(hidden, cu_seqlens, mode_id, w, rms, eps, normalize, out, rows_per_program, max_block_d):
    """Launches the forward; rms (per-row rstd) and w (multiply by weight) are separate here
    so the backward can recompute the pooled vector before w."""
    B = cu_seqlens.shape[0] - 1
    T, d = hidden.shape
    has_w = w is not None
    w = w if has_w else hidden  # dummy pointer, never read
    cfg = pool_config(d, max_block_d, B=B, T=T, elem_size=hidden.element_size(), device=hidden.device)
    rc = cfg["rows"]
    if mode_id != _MEAN:
        _pool_rows_kernel[(triton.cdiv(B, rc["BLOCK_B"]),)](
            hidden, cu_seqlens, w, out, B, d, 1, hidden.stride(0), out.stride(0), eps,
            MODE=mode_id, RMS=rms, HAS_W=has_w, NORMALIZE=normalize, ALL=True, **rc,
        )  # fmt: skip
        return
    mc = cfg["mean"]
    rows = _mean_rows(T, cfg, hidden.device, rows_per_program)
    n_tiles = triton.cdiv(T, rows)
    direct = mc["ONE_CHUNK"] and n_tiles == 1  # every sequence finishes in the one program
    scratch = out if direct else torch.zeros((B, d), dtype=torch.float32, device=hidden.device)
    _pool_mean_kernel[(n_tiles,)](
        hidden, cu_seqlens, w, out, scratch, B, d, rows, hidden.stride(0), out.stride(0), eps,
        RMS=rms, HAS_W=has_w, NORMALIZE=normalize, SINGLE_TILE=direct, BLOCK_S=BLOCK_S, **mc,
    )  # fmt: skip
    if not direct:
        _pool_rows_kernel[(triton.cdiv(B, rc["BLOCK_B"]),)](
            scratch, cu_seqlens, w, out, B, d, rows, scratch.stride(0), out.stride(0), eps,
            MODE=_FINALIZE, RMS=rms, HAS_W=has_w, NORMALIZE=normalize, ALL=not mc["ONE_CHUNK"], **rc,
        )  # fmt: skip


def pool_forward(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: int, norm_weight: torch.Tensor | None,
                 eps: float, normalize: bool, out: torch.Tensor, *, rows_per_program: int | None = None,
                 max_block_d: int = MAX_BLOCK_D) -> None:
    """out[b] = pool(hidden[cu_seqlens[b]:cu_seqlens[b+1]]) (see the module docstring).

    hidden [T, d] fp32/fp16/bf16, unit stride in d, any row stride; cu_seqlens int32
    [B+1] (0 = cu[0] < cu[1] < ... < cu[B] = T, not checked here); mode: a bsr_pool_mode code
    (0 last, 1 mean, 2 cls); norm_weight [d] (any float dtype, contiguous) or None; out [B, d], unit stride in
    d, any row stride, any dtype (normally hidden's): fully overwritten, need not be
    initialised. mean may allocate an fp32 scratch [B, d] (torch.zeros) and launch a second
    kernel. No host sync. rows_per_program / max_block_d override the heuristics (tests).
    """
    mode_id = int(mode)
    B = cu_seqlens.shape[0] - 1
    if B <= 0:
        return
    _check(hidden, cu_seqlens, norm_weight, out, "out")
    assert out.shape[0] == B, out.shape
    _forward(hidden, cu_seqlens, mode_id, norm_weight, norm_weight is not None, float(eps), bool(normalize),
             out, rows_per_program, max_block_d)  # fmt: skip


def pool_backward(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: int, norm_weight: torch.Tensor | None,
                  eps: float, normalize: bool, grad_out: torch.Tensor, grad_hidden: torch.Tensor,
                  grad_weight: torch.Tensor | None = None, *, rows_per_program: int | None = None,
                  max_block_d: int = MAX_BLOCK_D) -> None:
    """Gradients of pool_forward(hidden, cu_seqlens, mode, norm_weight, eps, normalize) given
    grad_out = dL/dout [B, d] (any float dtype, unit stride in d).

    grad_hidden [T, d] (normally hidden's dtype; unit stride in d, any row stride): fully
    overwritten, need not be initialised (last/cls: zero except the pooled rows).
    grad_weight: None, or an fp32 contiguous [d] that receives dL/dnorm_weight (overwritten;
    only with norm_weight). Recomputes what it needs from hidden (nothing saved from the
    forward): last/cls read B rows; mean reads hidden twice (recompute of the pooled vector
    when normalize or norm_weight, then one fused pass writing every row of grad_hidden) with
    an fp32 [B, d] workspace or two. No host sync. grad_weight sums use atomics (run-to-run
    last-bit differences), as does the recompute of mean (see the module docstring).
    """
    mode_id = int(mode)
    B = cu_seqlens.shape[0] - 1
    T, d = hidden.shape
    if B <= 0:
        grad_hidden.zero_()
        if grad_weight is not None:
            grad_weight.zero_()
        return
    _check(hidden, cu_seqlens, norm_weight, grad_hidden, "grad_hidden")
    assert grad_hidden.shape[0] == T and grad_out.shape == (B, d) and grad_out.stride(1) == 1, grad_out.shape
    has_w = norm_weight is not None
    grad_w = grad_weight is not None
    if grad_w:
        assert has_w and grad_weight.shape == (d,) and grad_weight.dtype == torch.float32
        assert grad_weight.is_contiguous()
        grad_weight.zero_()
    eps = float(eps)
    normalize = bool(normalize)
    w = norm_weight if has_w else hidden  # dummy pointers, never read
    gw = grad_weight if grad_w else grad_out
    cfg = pool_config(d, max_block_d, B=B, T=T, elem_size=hidden.element_size(), device=hidden.device)
    rc = dict(cfg["rows"])
    del rc["ONE_CHUNK"]  # the rows backward always loops over column chunks (one when it fits)
    grid_b = (triton.cdiv(B, rc["BLOCK_B"]),)
    if mode_id != _MEAN:
        grad_hidden.zero_()
        _pool_bwd_rows_kernel[grid_b](
            hidden, cu_seqlens, w, grad_out, grad_hidden, gw, B, d,
            hidden.stride(0), grad_out.stride(0), grad_hidden.stride(0), eps,
            MODE=mode_id, HAS_W=has_w, NORMALIZE=normalize, GRAD_W=grad_w, RMS=has_w, LOAD_P=True, **rc,
        )  # fmt: skip
        return
    # mean: p[b] = mean_t u_t (u_t = rms-scaled row, before w), then G[b] = dL/du_t (fp32)
    if normalize or has_w:
        p = torch.empty((B, d), dtype=torch.float32, device=hidden.device)
        _forward(hidden, cu_seqlens, _MEAN, None, has_w, eps, False, p, rows_per_program, max_block_d)
    else:
        p = grad_out  # dummy, never read
    g = torch.empty((B, d), dtype=torch.float32, device=hidden.device)
    _pool_bwd_rows_kernel[grid_b](
        p, cu_seqlens, w, grad_out, g, gw, B, d,
        p.stride(0), grad_out.stride(0), g.stride(0), eps,
        MODE=_MEAN, HAS_W=has_w, NORMALIZE=normalize, GRAD_W=grad_w, RMS=False, LOAD_P=normalize or has_w, **rc,
    )  # fmt: skip
    mc = cfg["mean"]
    rows = _mean_rows(T, cfg, hidden.device, rows_per_program)
    _pool_mean_bwd_kernel[(triton.cdiv(T, rows),)](
        hidden, cu_seqlens, g, grad_hidden, B, d, rows, hidden.stride(0), grad_hidden.stride(0), eps,
        RMS=has_w, BLOCK_S=BLOCK_S, **mc,
    )  # fmt: skip
