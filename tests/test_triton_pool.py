"""Triton pooled-embedding kernels (kernels/pool.py) against an fp64 torch reference.

Without a GPU the kernels run on CPU tensors through the Triton interpreter (conftest sets
TRITON_INTERPRET=1 before triton is imported). Shapes are small but odd: d in {1, 7, 64,
2049}, sequences of length 1, mixes of lengths, 300 short sequences, long sequences split
over many token tiles, forced column chunking, zero rows, column-sliced hidden.
"""
import os
import sys

import pytest
import torch

from conftest import triton_device

DEVICE = triton_device()
if DEVICE is None:
    pytest.skip("needs triton with CUDA or TRITON_INTERPRET=1", allow_module_level=True)

try:
    from bsharedrag_fast.kernels import pool_backward, pool_forward  # noqa: E402
except ImportError:  # not installed: import the source tree's kernels/ directly
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kernels import pool_backward, pool_forward  # noqa: E402
from bsharedrag_fast.util.pool_modes import POOL_MODES  # noqa: E402  (the kernels take the C ABI's mode codes)

EPS = 1e-6
# bf16 load/store (no tl.dot here) is right in the interpreter too
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=1.6e-2),
}
MODES = ["last", "cls", "mean"]


def reference(hidden, cu_seqlens, mode, norm_weight, eps, normalize):
    """Plain fp64 pooling: RMSNorm (per token for mean) -> pool -> optional L2."""
    h = hidden.double().cpu()
    w = None if norm_weight is None else norm_weight.double().cpu()
    cu = cu_seqlens.tolist()

    def rms(x):
        if w is None:
            return x
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    outs = []
    for s, e in zip(cu[:-1], cu[1:]):
        if mode == "last":
            v = rms(h[e - 1])
        elif mode == "cls":
            v = rms(h[s])
        else:
            v = rms(h[s:e]).mean(0)
        if normalize:
            v = v / v.norm().clamp_min(1e-12)
        outs.append(v)
    return torch.stack(outs)


def cu_from_lens(lens):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu.to(DEVICE)


def make_inputs(lens, d, dtype, seed=0, has_w=True):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    hidden = (torch.randn(T, d, generator=gen) * 2).to(dtype).to(DEVICE)
    w = (torch.rand(d, generator=gen) + 0.5).to(dtype).to(DEVICE) if has_w else None
    return hidden, cu_from_lens(lens), w


def run_check(hidden, cu, mode, w, normalize, dtype=None, out=None, **kw):
    dtype = dtype or hidden.dtype
    B, d = cu.numel() - 1, hidden.shape[1]
    if out is None:
        out = torch.full((B, d), float("nan"), dtype=hidden.dtype, device=DEVICE)  # must be overwritten
    pool_forward(hidden, cu, POOL_MODES[mode], w, EPS, normalize, out, **kw)
    ref = reference(hidden, cu, mode, w, EPS, normalize)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double().cpu(), ref, **TOL[dtype])
    return out


MIXED = [1, 5, 1, 17, 3, 40, 2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 7, 64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("has_w", [False, True], ids=["plain", "rmsnorm"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "l2"])
def test_mixed_lengths(dtype, d, mode, has_w, normalize):
    hidden, cu, w = make_inputs(MIXED, d, dtype, seed=d, has_w=has_w)
    run_check(hidden, cu, mode, w, normalize)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_token(mode, dtype):
    for lens in ([1], [1, 1, 1]):
        hidden, cu, w = make_inputs(lens, 64, dtype)
        run_check(hidden, cu, mode, w, True)
        run_check(hidden, cu, mode, None, False)


@pytest.mark.parametrize("mode", MODES)
def test_many_short_sequences(mode):
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 5, (300,), generator=gen).tolist()
    for d, dtype, has_w, normalize in [(64, torch.float32, True, True), (7, torch.float16, False, False)]:
        hidden, cu, w = make_inputs(lens, d, dtype, seed=2, has_w=has_w)
        run_check(hidden, cu, mode, w, normalize)
    hidden, cu, w = make_inputs(lens, 64, torch.float32, seed=3)
    run_check(hidden, cu, mode, w, True, rows_per_program=7)  # many sequences cross tiles


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_wide_hidden(dtype, mode):
    hidden, cu, w = make_inputs([3, 1, 6], 2049, dtype)
    run_check(hidden, cu, mode, w, True)
    run_check(hidden, cu, mode, None, False)
    # forced column chunking (what d > MAX_BLOCK_D takes)
    run_check(hidden, cu, mode, w, True, max_block_d=1024, rows_per_program=4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d,max_block_d", [(7, 4), (64, 16), (1, 8)])
def test_chunked_columns(mode, d, max_block_d):
    hidden, cu, w = make_inputs(MIXED, d, torch.float32, seed=4)
    for has_w in (False, True):
        for normalize in (False, True):
            run_check(hidden, cu, mode, w if has_w else None, normalize, max_block_d=max_block_d)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_sequences_split_over_tiles(dtype):
    lens = [300, 1, 77, 150]
    hidden, cu, w = make_inputs(lens, 64, dtype, seed=5)
    for rows in (None, 16, 33, 1000):  # default tiling, many tiles, uneven tiles, one tile
        run_check(hidden, cu, "mean", w, True, rows_per_program=rows)
    run_check(hidden, cu, "mean", None, False, rows_per_program=16)
    run_check(hidden, cu, "last", w, True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_block_d", [8192, 8], ids=["one_chunk", "chunked"])
def test_zero_rows_stay_zero(mode, max_block_d):
    lens = [3, 1, 4]
    hidden, cu, w = make_inputs(lens, 33, torch.float32, seed=6)
    hidden[0:3] = 0  # sequence 0 all zero: every mode pools a zero vector
    hidden[3] = 0  # sequence 1 (length 1)
    for has_w in (False, True):
        for rows in (None, 2):
            out = run_check(hidden, cu, mode, w if has_w else None, True,
                            rows_per_program=rows, max_block_d=max_block_d)  # fmt: skip
            assert torch.all(out[:2] == 0)
    assert torch.all(out[2].abs().sum() > 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_noncontiguous_hidden_and_out(dtype, mode):
    d = 37
    big, cu, w = make_inputs(MIXED, d + 11, dtype, seed=7)
    hidden = big[:, 5 : 5 + d]  # column slice: row stride d + 11
    assert not hidden.is_contiguous()
    run_check(hidden, cu, mode, w[:d].contiguous(), True)
    out_big = torch.full((len(MIXED), d + 3), float("nan"), dtype=dtype, device=DEVICE)
    out = out_big[:, :d]
    run_check(hidden, cu, mode, None, False, out=out, rows_per_program=8)
    assert torch.isnan(out_big[:, d:]).all()  # nothing written outside out


def test_norm_weight_fp32_with_half_hidden():
    hidden, cu, w = make_inputs(MIXED, 64, torch.float16, seed=8)
    run_check(hidden, cu, "mean", w.float(), True)


# ----------------------------------------------------------------------------- backward


def run_grad_check(hidden, cu, mode, w, normalize, seed=0, grad_hidden=None, grad_out=None, **kw):
    """pool_backward against torch autograd through the fp64 reference."""
    B, d = cu.numel() - 1, hidden.shape[1]
    T = hidden.shape[0]
    dtype = hidden.dtype
    if grad_out is None:
        gen = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(B, d, generator=gen).to(dtype).to(DEVICE)
    h64 = hidden.detach().double().cpu().requires_grad_()
    w64 = None if w is None else w.detach().double().cpu().requires_grad_()
    reference(h64, cu, mode, w64, EPS, normalize).backward(grad_out.double().cpu())
    if grad_hidden is None:
        grad_hidden = torch.full((T, d), float("nan"), dtype=dtype, device=DEVICE)
    grad_w = None if w is None else torch.full((d,), float("nan"), dtype=torch.float32, device=DEVICE)
    pool_backward(hidden, cu, POOL_MODES[mode], w, EPS, normalize, grad_out, grad_hidden, grad_w, **kw)
    assert torch.isfinite(grad_hidden).all()
    tol = TOL[dtype]

    def close(got, want):  # scale tolerances by the gradient's magnitude
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double().cpu() / scale, want / scale, **tol)

    close(grad_hidden, h64.grad)
    if w is not None:
        close(grad_w, w64.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 7, 64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("has_w", [False, True], ids=["plain", "rmsnorm"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "l2"])
def test_backward_mixed_lengths(dtype, d, mode, has_w, normalize):
    hidden, cu, w = make_inputs(MIXED, d, dtype, seed=10 + d, has_w=has_w)
    run_grad_check(hidden, cu, mode, w, normalize, seed=d)


@pytest.mark.parametrize("mode", MODES)
def test_backward_tiling_chunking_and_strides(mode):
    lens = [30, 1, 7, 2, 19]
    big, cu, w = make_inputs(lens, 29 + 6, torch.float32, seed=11)
    hidden = big[:, 3:32]  # column slice
    w = w[:29].contiguous()
    gh_big = torch.full((sum(lens), 40), float("nan"), device=DEVICE)
    for kw in (dict(rows_per_program=4), dict(rows_per_program=5, max_block_d=8), dict(max_block_d=16)):
        run_grad_check(hidden, cu, mode, w, True, grad_hidden=gh_big[:, 2:31], **kw)
        run_grad_check(hidden, cu, mode, None, False, **kw)
    go_big = torch.randn(len(lens), 33, device=DEVICE)
    run_grad_check(hidden, cu, mode, w, True, grad_out=go_big[:, 1:30])  # strided grad_out


@pytest.mark.parametrize("mode", MODES)
def test_backward_wide_and_short(mode):
    hidden, cu, w = make_inputs([3, 1, 6], 2049, torch.float32, seed=12)
    run_grad_check(hidden, cu, mode, w, True)
    run_grad_check(hidden, cu, mode, w, True, max_block_d=1024, rows_per_program=4)
    gen = torch.Generator().manual_seed(13)
    lens = torch.randint(1, 5, (300,), generator=gen).tolist()
    hidden, cu, w = make_inputs(lens, 16, torch.float16, seed=14)
    run_grad_check(hidden, cu, mode, w, True)


@pytest.mark.parametrize("mode", MODES)
def test_backward_zero_rows_finite(mode):
    hidden, cu, w = make_inputs([3, 1, 4], 33, torch.float32, seed=15)
    hidden[0:4] = 0  # sequences 0 and 1 pool a zero vector
    run_grad_check(hidden, cu, mode, w, True)
    run_grad_check(hidden, cu, mode, None, True)
