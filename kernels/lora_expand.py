"""Multi-LoRA expand: y[sorted_idx[p]] += scaling[a] * v[p] @ B_a^T, in place.

v is the fp32 output of lora_shrink (indexed by sorted position p). Grid:
(cdiv(max_count, BLOCK_M), cdiv(N, BLOCK_N), n_active); programs whose M-block lies
past their adapter's count exit at once. Each program loads its y tile, adds the fp32
LoRA term and stores it back rounded once to y's dtype:
    y = cast(float(y) + scaling[a] * sum_j v[p, j] * B[a, n, j]).
Rows not in sorted_idx (adapter -1) are never read or written, so they stay
bit-identical.

Precision: the rank reduction accumulates in fp32. With fp16/bf16 lora_b, v is cast to
lora_b's dtype and tl.dot runs on the tensor cores (as Punica / vLLM do: the cast costs
one rounding of v, about the size of the final rounding into y). With fp32 lora_b the
dot is fp32 with IEEE precision (no TF32).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import tuning
from .lora_shrink import DEFAULT_NUM_SMS, FP32_DOT_PRECISION, block_m_for, num_sms, num_stages_for, pow2_block

__all__ = ["lora_expand", "expand_config", "expand_key"]


@triton.jit
def _lora_expand_kernel(
    v_ptr, b_ptr, scaling_ptr, y_ptr,
    sorted_idx_ptr, starts_ptr, counts_ptr, active_ptr,
    N, R,
    stride_vm, stride_vr,
    stride_bl, stride_bn, stride_br,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    EVEN_R: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    adapter = tl.load(active_ptr + tl.program_id(2))
    count = tl.load(counts_ptr + adapter)
    if pid_m * BLOCK_M >= count:
        return
    start = tl.load(starts_ptr + adapter)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    rows = tl.load(sorted_idx_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    pos = start + offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N  # padded columns read an in-range row of B; never stored
    offs_r = tl.arange(0, BLOCK_R)

    v_ptrs = v_ptr + pos[:, None] * stride_vm + offs_r[None, :] * stride_vr  # [BLOCK_M, BLOCK_R]
    b_ptrs = (
        b_ptr + adapter.to(tl.int64) * stride_bl + rn[None, :] * stride_bn + offs_r[:, None] * stride_br
    )  # [BLOCK_R, BLOCK_N]: B_a^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, tl.cdiv(R, BLOCK_R)):
        if EVEN_R:
            vt = tl.load(v_ptrs, mask=mask_m[:, None], other=0.0)
            bt = tl.load(b_ptrs)
        else:
            r_left = R - r * BLOCK_R
            vt = tl.load(v_ptrs, mask=mask_m[:, None] & (offs_r[None, :] < r_left), other=0.0)
            bt = tl.load(b_ptrs, mask=offs_r[:, None] < r_left, other=0.0)
        if DOT_FP32:
            acc += tl.dot(vt, bt.to(tl.float32), input_precision=FP32_PRECISION)
        else:
            acc += tl.dot(vt.to(bt.dtype), bt)
        v_ptrs += BLOCK_R * stride_vr
        b_ptrs += BLOCK_R * stride_br

    acc = acc * tl.load(scaling_ptr + adapter)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = mask_m[:, None] & (offs_n[None, :] < N)
    yt = tl.load(y_ptrs, mask=mask, other=0.0)
    out = yt.to(tl.float32) + acc
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


# What a measured table's expand entry holds (kernels/tuning.py); EVEN_R follows from the shape.
tuning.register("expand", ("max_count", "n_active", "N", "R", "elem_size"), {
    "BLOCK_M": (16, 256, True), "BLOCK_N": (16, 256, True), "BLOCK_R": (16, 256, True),
    "num_warps": (1, 16, True), "num_stages": (1, 8, False),
})  # fmt: skip


def expand_key(max_count: int, n_active: int, N: int, R: int, elem_size: int) -> tuple:
    """An expand call's table key: max_count and n_active bucketed (tuning.bucket), the rest exact."""
    return (tuning.bucket(max_count), tuning.bucket(n_active), N, R, elem_size)


def expand_config(max_count: int, n_active: int, N: int, R: int, elem_size: int, sms: int = DEFAULT_NUM_SMS,
                  device: torch.device | None = None) -> dict:
    """Launch parameters for one expand call: the entry for its shape bucket (expand_key) in the
    table measured for `device`'s GPU (kernels/tuning.py), else this heuristic (H100-sized):

    - BLOCK_R covers the whole rank (R <= 128: one tl.dot per tile, no R loop).
    - BLOCK_M follows the largest segment (16 decode, 32, 64 prefill).
    - BLOCK_N starts at 128 (64 for fp32 operands, to bound registers) and is halved,
      down to 32, while the grid has fewer programs than SMs (decode, few adapters).
    - num_warps 8 for 64x128 tiles, else 4; num_stages 2 when the R loop has work to
      overlap and the tiles fit in SMEM.
    EVEN_R always follows from R.
    """
    # the table is resolved outside the cache and is part of its key: a dict hit per call
    return _expand_config(max_count, n_active, N, R, elem_size, sms, tuning.table_for(device))


@functools.lru_cache(maxsize=4096)
def _expand_config(max_count: int, n_active: int, N: int, R: int, elem_size: int, sms: int,
                   table: tuning.Table | None) -> dict:
    cfg = None if table is None else table.get("expand", expand_key(max_count, n_active, N, R, elem_size))
    if cfg is None:
        cfg = _expand_heuristic(max_count, n_active, N, R, elem_size, sms)
    cfg["EVEN_R"] = R % cfg["BLOCK_R"] == 0
    return cfg


def _expand_heuristic(max_count: int, n_active: int, N: int, R: int, elem_size: int, sms: int) -> dict:
    block_m = block_m_for(max_count)
    block_r = pow2_block(R)
    block_n = 128 if elem_size <= 2 else 64
    block_n = min(block_n, pow2_block(N, 16, block_n))
    m_blocks = triton.cdiv(max_count, block_m)
    while block_n > 32 and m_blocks * triton.cdiv(N, block_n) * n_active < sms:
        block_n //= 2
    iters = triton.cdiv(R, block_r)
    per_stage = block_m * block_r * 4 + block_r * block_n * elem_size
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        num_warps=8 if block_m * block_n >= 64 * 128 else 4,
        num_stages=min(2, num_stages_for(per_stage, iters)),
    )  # fmt: skip


def lora_expand(v: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor, sorted_idx: torch.Tensor,
                starts: torch.Tensor, counts: torch.Tensor, active: torch.Tensor, max_count: int,
                y: torch.Tensor) -> None:
    """y[sorted_idx[p], n] = cast(float(y[...]) + scaling[a] * sum_j v[p, j] * lora_b[a, n, j]), in place.

    v fp32 [n_lora, R] (any strides); lora_b [L, N, R], any strides (transposed views are
    fine); scaling fp32 [L]; sorted_idx int32 [n_lora]; starts, counts int32 [L]; active
    int32 [n_active]; max_count = max(counts) as a Python int; y [T, N] fp32/fp16/bf16,
    any strides. Rows not in sorted_idx are untouched. Launches nothing when no row uses
    an adapter.
    """
    n_lora = sorted_idx.shape[0]
    max_count = int(max_count)
    n_active = active.shape[0]
    if n_lora == 0 or max_count == 0 or n_active == 0:
        return
    assert v.dim() == 2 and lora_b.dim() == 3 and y.dim() == 2, (v.shape, lora_b.shape, y.shape)
    _, N, R = lora_b.shape
    assert v.shape == (n_lora, R) and v.dtype == torch.float32, (v.shape, v.dtype)
    assert y.shape[1] == N, (y.shape, lora_b.shape)
    assert scaling.dtype == torch.float32 and scaling.shape[0] == lora_b.shape[0]
    assert sorted_idx.dtype == starts.dtype == counts.dtype == active.dtype == torch.int32
    device = y.device
    cfg = expand_config(max_count, n_active, N, R, lora_b.element_size(), num_sms(device), device)
    grid = (triton.cdiv(max_count, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), n_active)
    _lora_expand_kernel[grid](
        v, lora_b, scaling, y,
        sorted_idx, starts, counts, active,
        N, R,
        v.stride(0), v.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y.stride(0), y.stride(1),
        DOT_FP32=(lora_b.dtype == torch.float32),
        FP32_PRECISION=FP32_DOT_PRECISION,
        **cfg,
    )  # fmt: skip
