"""Argument checking of the ops, fuzzed (hypothesis): drawn shapes, dtypes, adapter maps and
cu_seqlens, valid or broken one way. A valid call equals the torch reference; a broken
one is a ValueError, never another exception or a crash in the C++ kernels."""
import pytest
import torch

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bsharedrag_fast import ops  # noqa: E402
from bsharedrag_fast.ops.lora_linear import lora_linear_reference  # noqa: E402
from bsharedrag_fast.ops.pool import pool_reference  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
BROKEN_LORA = [None, "x_dim", "a_in", "b_out", "b_rank", "a_slots", "scaling_len", "map_len", "map_dtype",
               "map_range", "dtype_mix", "weight_in"]


@FUZZ
@given(T=st.integers(1, 9), d_in=st.integers(1, 12), d_out=st.integers(1, 12), L=st.integers(1, 3),
       r=st.integers(1, 4), seed=st.integers(0, 2**16), bias=st.booleans(), backend=st.sampled_from(["cpp", "auto"]),
       broken=st.sampled_from(BROKEN_LORA))
def test_lora_linear_checks_its_arguments(T, d_in, d_out, L, r, seed, bias, backend, broken):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, generator=g) if bias else None
    A = torch.randn(L, r, d_in, generator=g)
    B = torch.randn(L, d_out, r, generator=g)
    s = torch.rand(L, generator=g)
    ta = torch.randint(-1, L, (T,), generator=g, dtype=torch.int32)
    if broken == "x_dim":
        x = x[None]
    elif broken == "a_in":
        A = torch.randn(L, r, d_in + 1, generator=g)
    elif broken == "b_out":
        B = torch.randn(L, d_out + 1, r, generator=g)
    elif broken == "b_rank":
        B = torch.randn(L, d_out, r + 1, generator=g)
    elif broken == "a_slots":
        A = torch.randn(L + 1, r, d_in, generator=g)
    elif broken == "scaling_len":
        s = torch.rand(L + 1, generator=g)
    elif broken == "map_len":
        ta = torch.zeros(T + 1, dtype=torch.int32)
    elif broken == "map_dtype":
        ta = ta.float()
    elif broken == "map_range":
        ta[0] = L if seed % 2 else -2
    elif broken == "dtype_mix":
        A = A.double()
    elif broken == "weight_in":
        w = torch.randn(d_out, d_in + 2, generator=g)
    if broken is None:
        got = ops.lora_linear(x, w, b, A, B, s, ta, backend=backend)
        ref = lora_linear_reference(x, w, b, A, B, s, ta.long())
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    else:
        with pytest.raises(ValueError):
            ops.lora_linear(x, w, b, A, B, s, ta, backend=backend)


@FUZZ
@given(lens=st.lists(st.integers(1, 6), min_size=1, max_size=5), d=st.integers(1, 10),
       mode=st.sampled_from(["last", "mean", "cls", "max", ""]), normalize=st.booleans(), norm=st.booleans(),
       seed=st.integers(0, 2**16), broken=st.sampled_from([None, "not_from_0", "short_end", "long_end", "decreasing",
                                                          "dtype", "hidden_dim", "norm_len", "one_entry"]))
def test_pool_checks_its_arguments(lens, d, mode, normalize, norm, seed, broken):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    h = torch.randn(T, d, generator=g)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    nw = torch.rand(d, generator=g) + 0.5 if norm else None
    dtype = torch.int32
    if broken == "not_from_0":
        cu[0] = 1
    elif broken == "short_end":
        cu[-1] -= 1
    elif broken == "long_end":
        cu[-1] += 1
    elif broken == "decreasing":
        cu.insert(1, cu[1])  # an empty sequence
    elif broken == "dtype":
        dtype = torch.float32
    elif broken == "hidden_dim":
        h = h[None]
    elif broken == "norm_len":
        nw = torch.rand(d + 1, generator=g)
    elif broken == "one_entry":
        cu = [0]
    cu_t = torch.tensor(cu, dtype=dtype)
    if broken is None and mode in ("last", "mean", "cls"):
        got = ops.pool(h, cu_t, mode, normalize=normalize, norm_weight=nw)
        ref = pool_reference(h, cu_t, mode, normalize=normalize, norm_weight=nw)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(ValueError):
            ops.pool(h, cu_t, mode, normalize=normalize, norm_weight=nw)
