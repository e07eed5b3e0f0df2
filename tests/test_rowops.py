"""ops.rms_norm / ops.add_rms_norm / ops.silu_mul / ops.rope (the C++ row kernels, csrc/rowops.cpp)
against their torch references (transformers' LlamaRMSNorm; F.silu(gate) * up; x * cos +
rotate_half(x) * sin) over odd widths,
strided rows, the threaded path, every dtype; and the fallbacks: autograd keeps the
differentiable reference, bad input is a ValueError naming it."""
from __future__ import annotations

import pytest
import torch

from bsharedrag_fast import ops

# fp16 / bf16: 2 ulps (the kernel rounds where torch does, but an ulp-different rsqrt can round twice apart)
TOL = {torch.float32: (2e-6, 2e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
SHAPES = [(1, 1), (3, 5), (16, 576), (7, 1000), (130, 576)]  # 130 x 576: past the threads' threshold


def _rows(T, d, dtype, g, pad=0):
    """[T, d] with rows d + pad apart (a strided view when pad > 0), values in a few scales."""
    base = torch.randn(T, d + pad, generator=g) * torch.logspace(-1, 1, T)[:, None]
    return base.to(dtype)[:, :d]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,d", SHAPES)
def test_rms_norm_and_its_residual_add_match_the_reference(T, d, dtype):
    g = torch.Generator().manual_seed(T * 1000 + d)
    rtol, atol = TOL[dtype]
    for pad in (0, 3):
        x, add = _rows(T, d, dtype, g, pad), _rows(T, d, dtype, g, pad)
        w = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
        x0, add0 = x.clone(), add.clone()
        got = ops.rms_norm(x, w, 1e-6, backend="cpp")
        torch.testing.assert_close(got, ops.rms_norm_reference(x, w, 1e-6), rtol=rtol, atol=atol)
        s, normed = ops.add_rms_norm(x, add, w, 1e-5, backend="cpp")
        assert torch.equal(s, x + add)  # the residual sum is exact: one add, rounded once
        torch.testing.assert_close(normed, ops.rms_norm_reference(x + add, w, 1e-5), rtol=rtol, atol=atol)
        assert torch.equal(x, x0) and torch.equal(add, add0)  # inputs untouched


def test_rms_norm_in_fp32_equals_an_fp64_norm():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 576, generator=g), torch.randn(576, generator=g)
    want = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double())
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, backend="cpp").double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,d", SHAPES)
def test_silu_mul_matches_the_reference(T, d, dtype):
    g = torch.Generator().manual_seed(T + d)
    rtol, atol = TOL[dtype]
    x = _rows(T, 2 * d, dtype, g, pad=5) * 4  # strided rows; gates well into both tails of the sigmoid
    got = ops.silu_mul(x, backend="cpp")
    assert got.shape == (T, d) and got.dtype == dtype
    torch.testing.assert_close(got, ops.silu_mul_reference(x), rtol=rtol, atol=atol)


def test_silu_mul_at_extreme_gates():
    x = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, 1.0] * 2])
    torch.testing.assert_close(ops.silu_mul(x, backend="cpp"), ops.silu_mul_reference(x), rtol=1e-6, atol=1e-6)


def _rotate_half(x):  # transformers' Llama rotate_half, written out
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,q_heads,kv_heads,D", [(1, 9, 3, 64), (5, 2, 1, 2), (13, 4, 4, 6), (70, 12, 2, 128)])
def test_rope_equals_transformers_rotate_half_bit_for_bit(T, q_heads, kv_heads, D, dtype):
    """q and k heads of a merged qkv row at once (a strided view, as the model passes them);
    every product and sum rounded where torch rounds them: equal, not close."""
    g = torch.Generator().manual_seed(T * D + q_heads)
    qkv = (torch.randn(T, (q_heads + 2 * kv_heads) * D, generator=g) * 3).to(dtype)
    x = qkv[:, : (q_heads + kv_heads) * D].view(T, q_heads + kv_heads, D)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    positions = torch.randint(0, 4096, (T,), generator=g)
    cos, sin = ops.rope_cos_sin(inv_freq, positions, dtype)
    emb = torch.cat([positions[:, None].float() * inv_freq] * 2, -1)
    c, s = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    want = x * c + _rotate_half(x) * s  # transformers' apply_rotary_pos_emb
    got = ops.rope(x, cos, sin, backend="cpp")
    assert got.shape == x.shape and got.is_contiguous()
    assert torch.equal(got, want)
    assert torch.equal(ops.rope_reference(x, cos, sin), want)


def test_rope_bad_input_and_fallbacks():
    x = torch.randn(2, 3, 8)
    cos, sin = ops.rope_cos_sin(torch.ones(4), torch.arange(2), torch.float32)
    with pytest.raises(ValueError, match="even head_dim"):
        ops.rope(torch.randn(2, 3, 7), cos[:, :7], sin[:, :7], backend="cpp")
    with pytest.raises(ValueError, match="backend"):
        ops.rope(x, cos, sin, backend="triton")
    xd = x.double().requires_grad_()
    out = ops.rope(xd, cos.double(), sin.double())  # float64 under autograd: the reference, differentiable
    out.sum().backward()
    assert xd.grad is not None


def test_autograd_takes_the_reference_and_gradients_flow():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, generator=g, requires_grad=True)
    w = torch.randn(8, generator=g)
    s, out = ops.add_rms_norm(x, torch.randn(4, 8, generator=g), w, 1e-6)
    (out.sum() + ops.silu_mul(torch.cat([x, x], 1)).sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="autograd"):
        ops.rms_norm(x, w, 1e-6, backend="cpp")


def test_bad_input_is_a_value_error_naming_it():
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match="backend"):
        ops.rms_norm(x, w, 1e-6, backend="triton")
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(x, w.double(), 1e-6, backend="cpp")
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(x, w, 0.0, backend="cpp")
    with pytest.raises(ValueError, match="even"):
        ops.silu_mul(torch.randn(2, 7))
    # mixed dtypes and float64 take the reference under auto, as torch would compute them
    torch.testing.assert_close(ops.rms_norm(x.double(), w, 1e-6), ops.rms_norm_reference(x.double(), w, 1e-6))
