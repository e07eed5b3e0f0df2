"""Multi-LoRA shrink: v[p] = x[sorted_idx[p]] @ A_a^T for every row p of adapter a's segment.

Layout (Punica SGMV / vLLM lora_shrink): rows that use an adapter are grouped by adapter
in `sorted_idx`; adapter a owns positions [starts[a], starts[a] + counts[a]). The output
v is indexed by that position p (not by token row), so the expand kernel reads it back
with the same metadata.

Grid: (cdiv(max_count, BLOCK_M), SPLIT_K * cdiv(R, BLOCK_N), n_active). Programs whose
M-block lies past their adapter's count exit at once. With SPLIT_K > 1 each program
reduces an interleaved share of K and adds its fp32 partial sum into v with
tl.atomic_add (the wrapper zeroes v first); with SPLIT_K == 1 it stores. Either way the
caller may pass an uninitialised v: rows [0, n_lora) are fully overwritten.
Split-K results can differ run to run in the last bits (atomic order).

Accumulation is fp32. fp16/bf16 operands use the tensor cores (tl.dot, fp32 acc);
if either operand is fp32 both are taken as fp32 with IEEE precision (no TF32): the
op is memory bound, so full precision is free.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import tuning

__all__ = ["lora_shrink", "shrink_config", "shrink_key"]

# ----------------------------------------------------------------------------- shared helpers
# (lora_expand imports these; they hold no Triton code.)

# Used when the tensors are not on a CUDA device (TRITON_INTERPRET=1 on CPU tensors):
# the heuristics then size grids as for an H100 SXM.
DEFAULT_NUM_SMS = 132
# Shared memory a program may fill with pipelined operand tiles (H100/H200: 227 KiB per
# block; the rest is left for tl.dot's layout conversions).
SMEM_BUDGET = 160 * 1024
# tl.dot input precision for fp32 operands ("ieee", "tf32" or "tf32x3").
FP32_DOT_PRECISION = "ieee"
MAX_SPLIT_K = 32


_sms: dict = {}  # torch.device -> SM count: one dict hit per launch (device.type is slow to read)


def num_sms(device: torch.device) -> int:
    """SM count of a CUDA device; DEFAULT_NUM_SMS for anything else (the interpreter)."""
    try:
        return _sms[device]
    except KeyError:
        n = _sms[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                            if device.type == "cuda" else DEFAULT_NUM_SMS)  # fmt: skip
        return n


def pow2_block(n: int, lo: int = 16, hi: int = 128) -> int:
    """Next power of two >= n, clamped to [lo, hi] (tl.dot wants every dim >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, int(n)))))


def block_m_for(max_count: int) -> int:
    """Rows per program: small for decode-sized segments, 64 for prefill."""
    if max_count <= 16:
        return 16
    if max_count <= 32:
        return 32
    return 64


def num_stages_for(bytes_per_stage: int, iters: int) -> int:
    """Pipeline depth that fits SMEM_BUDGET; 1 when even two stages do not fit."""
    fit = SMEM_BUDGET // max(1, bytes_per_stage)
    if fit < 2:
        return 1
    return max(2, min(4, fit, iters + 1))


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, v_ptr,
    sorted_idx_ptr, starts_ptr, counts_ptr, active_ptr,
    K, R,
    stride_xm, stride_xk,
    stride_al, stride_ar, stride_ak,
    stride_vm, stride_vr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_sn = tl.program_id(1)
    adapter = tl.load(active_ptr + tl.program_id(2))
    count = tl.load(counts_ptr + adapter)
    if pid_m * BLOCK_M >= count:
        return
    start = tl.load(starts_ptr + adapter)
    pid_k = pid_sn % SPLIT_K
    pid_n = pid_sn // SPLIT_K

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    # padded rows read row 0 (always valid when this launches); their results are not stored
    rows = tl.load(sorted_idx_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % R  # padded ranks read an in-range row of A; never stored
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = (
        a_ptr + adapter.to(tl.int64) * stride_al + rn[None, :] * stride_ar + offs_k[:, None] * stride_ak
    )  # [BLOCK_K, BLOCK_N]: A_a^T tile
    step_k = BLOCK_K * SPLIT_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, step_k)):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            at = tl.load(a_ptrs)
        else:
            k_left = K - k * step_k
            xt = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            at = tl.load(a_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if DOT_FP32:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision=FP32_PRECISION)
        else:
            acc += tl.dot(xt, at.to(xt.dtype))
        x_ptrs += step_k * stride_xk
        a_ptrs += step_k * stride_ak

    pos = start + offs_m
    v_ptrs = v_ptr + pos[:, None] * stride_vm + offs_n[None, :] * stride_vr
    mask = mask_m[:, None] & (offs_n[None, :] < R)
    if SPLIT_K == 1:
        tl.store(v_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(v_ptrs, acc, mask=mask, sem="relaxed")


# ----------------------------------------------------------------------------- configs

# What a measured table's shrink entry holds (kernels/tuning.py); EVEN_K follows from the shape.
tuning.register("shrink", ("max_count", "n_active", "K", "R", "elem_size"), {
    "BLOCK_M": (16, 256, True), "BLOCK_N": (16, 256, True), "BLOCK_K": (16, 512, True),
    "SPLIT_K": (1, MAX_SPLIT_K, False), "num_warps": (1, 16, True), "num_stages": (1, 8, False),
})  # fmt: skip


def shrink_key(max_count: int, n_active: int, K: int, R: int, elem_size: int) -> tuple:
    """A shrink call's table key: max_count and n_active bucketed (tuning.bucket), the rest exact."""
    return (tuning.bucket(max_count), tuning.bucket(n_active), K, R, elem_size)


def shrink_config(max_count: int, n_active: int, K: int, R: int, elem_size: int, sms: int = DEFAULT_NUM_SMS,
                  split_k: int | None = None, device: torch.device | None = None) -> dict:
    """Launch parameters for one shrink call: the entry for its shape bucket (shrink_key) in the
    table measured for `device`'s GPU (kernels/tuning.py), else this heuristic (H100-sized):

    - BLOCK_N covers the whole rank (R <= 128) so x is read once per (M-block, K-split).
    - BLOCK_M follows the largest segment (16 decode, 32, 64 prefill).
    - BLOCK_K shrinks as BLOCK_N grows (keeps the A tile ~16-32 KiB); halved for fp32.
    - SPLIT_K: doubled until the grid has ~2 programs per SM, as long as every split
      keeps at least one K block (many splits for decode / large K, 1 for big prefill).
    - num_warps 8 for 64x128 accumulators, else 4; num_stages as deep as SMEM allows.
    split_k, if given, overrides SPLIT_K of either. EVEN_K always follows from K.
    """
    # the table is resolved outside the cache and is part of its key: a dict hit per call
    return _shrink_config(max_count, n_active, K, R, elem_size, sms, split_k, tuning.table_for(device))


@functools.lru_cache(maxsize=4096)
def _shrink_config(max_count: int, n_active: int, K: int, R: int, elem_size: int, sms: int,
                   split_k: int | None, table: tuning.Table | None) -> dict:
    cfg = None if table is None else table.get("shrink", shrink_key(max_count, n_active, K, R, elem_size))
    if cfg is None:
        cfg = _shrink_heuristic(max_count, n_active, K, R, elem_size, sms, split_k)
    elif split_k is not None:
        cfg["SPLIT_K"] = max(1, int(split_k))
    cfg["EVEN_K"] = K % (cfg["BLOCK_K"] * cfg["SPLIT_K"]) == 0
    return cfg


def _shrink_heuristic(max_count: int, n_active: int, K: int, R: int, elem_size: int, sms: int,
                      split_k: int | None) -> dict:
    block_m = block_m_for(max_count)
    block_n = pow2_block(R)
    block_k = 256 if block_n <= 32 else (128 if block_n <= 64 else 64)
    if elem_size >= 4:
        block_k //= 2
    block_k = min(block_k, pow2_block(K, 16, 256))
    k_blocks = triton.cdiv(K, block_k)
    base = triton.cdiv(max_count, block_m) * triton.cdiv(R, block_n) * n_active
    if split_k is None:
        split_k = 1
        while split_k * 2 <= min(k_blocks, MAX_SPLIT_K) and base * split_k < 2 * sms:
            split_k *= 2
    split_k = max(1, int(split_k))
    iters = triton.cdiv(K, block_k * split_k)
    per_stage = (block_m * block_k + block_k * block_n) * elem_size
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=8 if block_m * block_n >= 64 * 128 else 4,
        num_stages=num_stages_for(per_stage, iters),
    )  # fmt: skip


# ----------------------------------------------------------------------------- wrapper


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, sorted_idx: torch.Tensor, starts: torch.Tensor,
                counts: torch.Tensor, active: torch.Tensor, max_count: int, v: torch.Tensor,
                split_k: int | None = None) -> None:
    """v[p, j] = sum_k x[sorted_idx[p], k] * lora_a[a, j, k] for p in adapter a's segment.

    x [T, K] fp32/fp16/bf16, any strides; lora_a [L, R, K], any strides (transposed views
    are fine); sorted_idx int32 [n_lora]; starts, counts int32 [L]; active int32 [n_active]
    (adapters with counts > 0); max_count = max(counts) as a Python int; v fp32 [n_lora, R]
    (unit stride in R), written in full: it need not be initialised (it is zeroed here
    when split-K atomics are used). split_k overrides shrink_config's SPLIT_K. Returns
    nothing; launches nothing when no row uses an adapter.
    """
    n_lora = sorted_idx.shape[0]
    max_count = int(max_count)
    n_active = active.shape[0]
    if n_lora == 0 or max_count == 0 or n_active == 0:
        return
    assert x.dim() == 2 and lora_a.dim() == 3 and lora_a.shape[2] == x.shape[1], (x.shape, lora_a.shape)
    _, R, K = lora_a.shape
    assert v.shape == (n_lora, R) and v.dtype == torch.float32, (v.shape, v.dtype)
    assert sorted_idx.dtype == starts.dtype == counts.dtype == active.dtype == torch.int32
    assert R >= 1 and K >= 1
    device = x.device
    cfg = shrink_config(max_count, n_active, K, R, max(x.element_size(), lora_a.element_size()),
                        num_sms(device), split_k, device)  # fmt: skip
    if cfg["SPLIT_K"] > 1:
        v.zero_()
    grid = (
        triton.cdiv(max_count, cfg["BLOCK_M"]),
        cfg["SPLIT_K"] * triton.cdiv(R, cfg["BLOCK_N"]),
        n_active,
    )
    _lora_shrink_kernel[grid](
        x, lora_a, v,
        sorted_idx, starts, counts, active,
        K, R,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        v.stride(0), v.stride(1),
        DOT_FP32=(x.dtype == torch.float32 or lora_a.dtype == torch.float32),
        FP32_PRECISION=FP32_DOT_PRECISION,
        **cfg,
    )  # fmt: skip
