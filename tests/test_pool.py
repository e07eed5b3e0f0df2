"""ops.pool against the unfused torch reference (fp64) for every backend, mode and option."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bsharedrag_fast import ops
from bsharedrag_fast.util.pool_modes import POOL_MODES
from conftest import triton_device

TRITON_DEV = triton_device()
FAST_BACKENDS = ["cpp"] + (["triton"] if TRITON_DEV else [])
MODES = ["last", "mean", "cls"]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _device(backend: str) -> str:
    return TRITON_DEV if backend == "triton" else "cpu"


def make_batch(lengths, d, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    hidden = torch.randn(int(cu[-1]), d, generator=g, dtype=torch.float64) * 3
    weight = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    return hidden, cu, weight


def naive(hidden, cu, mode, normalize, weight, eps=1e-6):
    """Sequence by sequence: RMSNorm each row as the model would, then pool, then L2."""
    out = []
    for b in range(cu.shape[0] - 1):
        rows = hidden[int(cu[b]) : int(cu[b + 1])]
        if weight is not None:
            rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps) * weight
        v = {"last": rows[-1], "cls": rows[0], "mean": rows.mean(0)}[mode]
        out.append(v / v.norm().clamp_min(1e-12) if normalize else v)
    return torch.stack(out)


CASES = [  # lengths, d
    ([5], 1),
    ([1, 3, 1, 7], 7),
    ([2, 1, 4], 2049),
    ([1] * 150 + [2, 3, 4] * 50, 16),  # B = 300, many length-1 sequences
    ([300, 1, 77], 33),  # a long sequence: mean splits it over threads / programs
]


@pytest.mark.parametrize("lengths,d", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_naive(lengths, d, mode):
    hidden, cu, w = make_batch(lengths, d)
    for weight in (None, w):
        for normalize in (True, False):
            got = ops.pool_reference(hidden, cu, mode, normalize, weight)
            torch.testing.assert_close(got, naive(hidden, cu, mode, normalize, weight), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("lengths,d", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_fp32_matches_fp64_reference(backend, lengths, d, mode):
    hidden, cu, w = make_batch(lengths, d)
    dev = _device(backend)
    for weight in (None, w):
        for normalize in (True, False):
            got = ops.pool(hidden.float().to(dev), cu.to(dev), mode, normalize,
                           None if weight is None else weight.float().to(dev), backend=backend)
            ref = naive(hidden.float().double(), cu, mode, normalize, None if weight is None else weight.float().double())
            assert got.dtype == torch.float32 and got.shape == (len(lengths), d)
            scale = ref.abs().max().clamp_min(1.0)
            torch.testing.assert_close(got.cpu().double() / scale, ref / scale, rtol=0, atol=TOL[torch.float32])


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(backend, dtype):
    hidden, cu, w = make_batch([3, 1, 9, 2], 40)
    dev = _device(backend)
    h, wt = hidden.to(dtype), w.to(dtype)
    for mode in MODES:
        got = ops.pool(h.to(dev), cu.to(dev), mode, True, wt.to(dev), backend=backend)
        assert got.dtype == dtype
        ref = naive(h.double(), cu, mode, True, wt.double())
        torch.testing.assert_close(got.cpu().double(), ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_zero_vector_normalises_to_zero_and_strided_hidden(backend):
    dev = _device(backend)
    big = torch.randn(6, 20)
    big[2, 3:13] = 0  # sequence 1 (rows 2..2) is all zero
    hidden = big[:, 3:13]  # a column slice: row stride 20
    cu = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    for mode in MODES:
        got = ops.pool(hidden.to(dev), cu.to(dev), mode, True, torch.ones(10, device=dev), backend=backend).cpu()
        assert torch.isfinite(got).all()
        if mode != "mean":
            assert torch.equal(got[1], torch.zeros(10))
        torch.testing.assert_close(got, ops.pool_reference(hidden, cu, mode, True, torch.ones(10)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_autograd_on_reference(backend, mode):
    hidden, cu, w = make_batch([4, 1, 6, 2], 24, seed=2)
    g = torch.randn(4, 24, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    dev = _device(backend)
    for normalize in (True, False):
        grads = {}
        for name, dtype, be, device in [("fast", torch.float32, backend, dev), ("ref", torch.float64, "reference", "cpu")]:
            h = hidden.float().to(device=device, dtype=dtype).requires_grad_(True)
            wt = w.float().to(device=device, dtype=dtype).requires_grad_(True)
            out = ops.pool(h, cu.to(device), mode, normalize, wt, backend=be)
            (out * g.to(device=device, dtype=dtype)).sum().backward()
            grads[name] = (h.grad.cpu().double(), wt.grad.cpu().double())
        for what, fast, ref in zip(("hidden", "norm_weight"), grads["fast"], grads["ref"]):
            torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")
        if mode != "mean":  # only pooled rows get gradient
            pooled = cu[1:] - 1 if mode == "last" else cu[:-1]
            rest = torch.ones(hidden.shape[0], dtype=torch.bool)
            rest[pooled.long()] = False
            assert torch.equal(grads["fast"][0][rest], torch.zeros_like(grads["fast"][0][rest]))


def test_auto_matches_reference_and_float64_goes_to_reference():
    hidden, cu, w = make_batch([3, 5], 12)
    torch.testing.assert_close(ops.pool(hidden, cu, "mean", True, w), ops.pool_reference(hidden, cu, "mean", True, w),
                               rtol=0, atol=0)
    h32 = hidden.float()
    torch.testing.assert_close(ops.pool(h32, cu), ops.pool_reference(h32, cu), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "cu,match",
    [
        ([0, 3, 3, 6], "strictly increasing"),
        ([0, 4, 2, 6], "strictly increasing"),
        ([0, 3, 5], "must end at T = 6"),
        ([0, 3, 7], "must end at T = 6"),
        ([1, 3, 6], "must start at 0"),
        ([0], "int32 \\[B \\+ 1\\]"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    with pytest.raises(ValueError, match=match):
        ops.pool(torch.randn(6, 4), torch.tensor(cu, dtype=torch.int32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cu_seqlens=torch.tensor([0, 6], dtype=torch.int64)), "cu_seqlens must be int32"),
        (dict(cu_seqlens=[0, 6]), "cu_seqlens must be a torch.Tensor"),
        (dict(hidden=torch.randn(6)), "hidden must be 2-D"),
        (dict(hidden=torch.ones(6, 4, dtype=torch.int32)), "hidden must be float32"),
        (dict(mode="max"), "mode must be one of"),
        (dict(norm_weight=torch.ones(5)), "norm_weight must be a tensor \\[4\\]"),
        (dict(norm_weight=torch.ones(4, dtype=torch.float64)), "norm_weight must be torch.float32"),
        (dict(eps=0.0), "eps must be a float > 0"),
        (dict(backend="gpu"), "backend must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(hidden=torch.randn(6, 4), cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ops.pool(**args)


def test_cpp_backend_rejects_float64():
    with pytest.raises(ValueError, match="use 'reference' for float64"):
        ops.pool(torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 3], dtype=torch.int32), backend="cpp")


def test_matches_model_style_unfused_sequence():
    """The fused op equals: final RMSNorm over every token, then gather the last token, then F.normalize."""
    hidden, cu, w = make_batch([5, 2, 8], 32)
    h, wt = hidden.float(), w.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * wt
    expected = F.normalize(normed[cu[1:].long() - 1], dim=-1)
    torch.testing.assert_close(ops.pool(h, cu, "last", True, wt, backend="cpp"), expected, rtol=1e-5, atol=1e-6)


def test_modes_are_the_c_abi_enum():
    """util.pool_modes.POOL_MODES (what ops.pool gives the C++ and the Triton kernels) is enum bsr_pool_mode."""
    import os
    import re

    header = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "include",
                          "bsharedrag.h")
    with open(header, encoding="utf-8") as f:
        enum = re.search(r"typedef enum bsr_pool_mode \{(.*?)\} bsr_pool_mode;", f.read(), re.S).group(1)
    codes = {name.lower(): int(v) for name, v in re.findall(r"BSR_POOL_(\w+)\s*=\s*(\d+)", enum)}
    assert codes == POOL_MODES
