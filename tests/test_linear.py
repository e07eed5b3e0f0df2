"""ops.linear (the dense base projection) against an fp64 reference, on every backend.

The C++ kernel (backend "cpp", and "auto" for few rows on CPU) must equal F.linear computed
in fp64 on the same rounded inputs within per-dtype tolerances, for odd shapes that leave
tails in every micro-tile, strided inputs, with and without a bias, and across the 128-row
passes it makes over the weight.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bsharedrag_fast import ops
from bsharedrag_fast.ops import _backends
from bsharedrag_fast.ops.linear import KERNEL_DTYPES, _machine, _onednn_op, cpp_pays, onednn_pays

pytestmark = pytest.mark.skipif(_backends._import_cpp() is None, reason="bsharedrag_fast._C is not built")

# relative to max |reference|: fp32 accumulation over K, then one rounding into the dtype
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

SHAPES = [  # rows, in, out
    (1, 1, 1), (1, 896, 37), (2, 17, 5), (3, 64, 4), (4, 33, 129), (5, 250, 7),
    (16, 48, 300), (127, 19, 9), (128, 16, 16), (129, 40, 21), (300, 70, 11),
]


def make(rows, k, n, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def check_close(y, x, w, b):
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.double() - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= TOL[x.dtype] * scale, f"max abs err {err:.3g} > {TOL[x.dtype] * scale:.3g}"


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_cpp_matches_fp64_reference(dtype, shape, bias):
    x, w, b = make(*shape, dtype, bias)
    check_close(ops.linear(x, w, b, backend="cpp"), x, w, b)


def test_strided_inputs():
    x, w, b = make(6, 40, 23, torch.float32)
    wide = torch.zeros(6, 57)
    wide[:, 3:43] = x
    xs = wide[:, 3:43]  # rows 57 apart
    assert xs.stride(0) == 57 and not xs.is_contiguous()
    y = ops.linear(xs, w, b, backend="cpp")
    check_close(y, x, w, b)
    # a transposed (column-major) weight view is copied to rows first
    check_close(ops.linear(x, w.t().contiguous().t(), b, backend="cpp"), x, w, b)
    # rows that overlap (a broadcast row, stride 0) are copied too, under auto as well
    xb = x[:1].expand(6, 40)
    assert xb.stride(0) == 0
    check_close(ops.linear(xb, w, b, backend="cpp"), xb.contiguous(), w, b)
    check_close(ops.linear(xb, w, b), xb.contiguous(), w, b)
    # a non-unit last stride of x is copied too
    xt = x.t().contiguous().t()
    assert torch.equal(ops.linear(xt, w, b, backend="cpp"), ops.linear(x, w, b, backend="cpp"))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_auto_picks_kernel_where_it_pays(dtype):
    for rows, k in [(1, 96), (2, 96), (8, 96), (9, 96), (16, 96), (17, 96), (200, 96), (17, 768), (200, 800)]:
        x, w, b = make(rows, k, 40, dtype, seed=rows)
        backend = ("cpp" if cpp_pays(dtype, rows, k) else "onednn" if onednn_pays(dtype, rows, k) and _onednn_op()
                   else "reference")
        assert torch.equal(ops.linear(x, w, b), ops.linear(x, w, b, backend=backend)), (rows, k)
        check_close(ops.linear(x, w, b), x, w, b)
    assert cpp_pays(torch.float32, 4, 64) and cpp_pays(torch.float32, 127, 896, isa="avx512")
    assert not cpp_pays(torch.float32, 128, 896, isa="avx512")  # oneDNN's gemm from 128 rows
    assert not cpp_pays(torch.float32, 64, 896, isa="avx2")  # the AVX2 kernel loses to the gemm from 32 rows
    assert not cpp_pays(torch.float32, 64, 256, isa="avx512") and not cpp_pays(torch.float16, 1, 896)
    assert not cpp_pays(torch.bfloat16, 16, 896, native_bf16=True) and not cpp_pays(torch.float64, 4, 896)
    assert cpp_pays(torch.bfloat16, 512, 896, native_bf16=False)  # torch emulates bf16 without AVX512-BF16


def test_onednn_takes_the_avx512_rows_the_kernel_leaves():
    assert onednn_pays(torch.float32, 17, 576, isa="avx512") and onednn_pays(torch.float32, 128, 1536, isa="avx512")
    assert not onednn_pays(torch.float32, 16, 576, isa="avx512")  # the C++ kernel's rows
    assert not onednn_pays(torch.float32, 127, 1536, isa="avx512")  # the AVX-512 kernel's, with >= 768 features
    assert not onednn_pays(torch.float32, 512, 576, isa="avx2")  # not measured there: F.linear
    assert not onednn_pays(torch.bfloat16, 512, 576, isa="avx512") and not onednn_pays(torch.float64, 512, 576,
                                                                                         isa="avx512")


@pytest.mark.skipif(_onednn_op() is None, reason="torch was built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_matches_fp64_reference(dtype, shape, bias):
    rows, k, n = shape
    x, w, b = make(rows, k, n, dtype, bias)
    check_close(ops.linear(x, w, b, backend="onednn"), x, w, b)
    xs = torch.cat([x, x], 1)[:, :k]  # rows with a stride: taken as they are
    check_close(ops.linear(xs, w, b, backend="onednn"), x, w, b)


@pytest.mark.skipif(_onednn_op() is None, reason="torch was built without oneDNN")
def test_onednn_is_inference_only():
    x, w, b = make(200, 32, 8, torch.float32)
    with pytest.raises(ValueError, match="backend='onednn' is inference only"):
        ops.linear(x.requires_grad_(), w, b, backend="onednn")
    with pytest.raises(ValueError, match="backend='onednn' supports float32, float16 and bfloat16"):
        ops.linear(x.detach().double(), w.double(), b.double(), backend="onednn")


def test_auto_is_reference_for_float64_and_graphs():
    x, w, b = make(4, 32, 8, torch.float64)
    assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))
    # with autograd it is F.linear, so gradients flow and equal F.linear's
    x, w, b = make(4, 32, 8, torch.float32)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    ops.linear(xg, wg, b).square().sum().backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.linear(xr, wr, b).square().sum().backward()
    assert torch.equal(xg.grad, xr.grad) and torch.equal(wg.grad, wr.grad)
    with torch.no_grad():  # no graph needed: the kernel
        assert torch.equal(ops.linear(xg, wg, b), ops.linear(x, w, b, backend="cpp"))


def rows_in_lanes(dtype, rows):
    """Whether the C++ kernel puts these rows in the lanes of its vectors (csrc linear_lanes):
    fp32 calls of 9-16 rows with the AVX-512 kernels."""
    return dtype == torch.float32 and _machine()[0] == "avx512" and 9 <= rows <= 16


@pytest.mark.parametrize("dtype", list(TOL))
def test_a_row_does_not_depend_on_its_batch(dtype):
    """The dot-product tiles (8 x 3 up to 16 rows, 4 x 4 beyond, 128-row passes) reduce every
    output the same way: a row gives the same bits alone or in a batch. Rows in lanes (fp32,
    9-16 rows on AVX-512) sum in k order instead, the same whichever 9-16 rows share the call,
    and within the tolerance of the others."""
    x, w, b = make(140, 200, 37, dtype)
    alone = torch.cat([ops.linear(x[i:i + 1], w, b, backend="cpp") for i in range(140)])
    for rows in (5, 16, 17, 140):
        y = ops.linear(x[:rows], w, b, backend="cpp")
        if rows_in_lanes(dtype, rows):
            assert torch.equal(y[3:12], ops.linear(x[3:12], w, b, backend="cpp"))
            assert not torch.equal(y, alone[:rows])  # another summation order: the test sees that path
            check_close(y, x[:rows], w, b)
        else:
            assert torch.equal(y, alone[:rows]), rows


@pytest.mark.parametrize("rows", [9, 12, 16])
@pytest.mark.parametrize("k, n", [(1, 1), (3, 23), (67, 25), (300, 49), (577, 97)])
def test_rows_in_lanes_for_odd_shapes(rows, k, n):
    """9-16 fp32 rows (in the lanes of the AVX-512 kernel; the tile elsewhere) against fp64:
    k not a multiple of the 4-step unroll, outputs not a multiple of the 24-output tile, with
    and without a bias, x with a row stride."""
    x, w, b = make(rows, k, n, torch.float32, seed=rows + k)
    check_close(ops.linear(x, w, b, backend="cpp"), x, w, b)
    check_close(ops.linear(x, w, None, backend="cpp"), x, w, None)
    wide = torch.cat([x, x], 1)[:, 1:k + 1]
    check_close(ops.linear(wide, w, b, backend="cpp"), wide, w, b)


def test_result_does_not_depend_on_threads():
    from bsharedrag_fast import _C

    x, w, b = make(9, 300, 1031, torch.float32)
    n = torch.get_num_threads()
    try:  # the kernels follow torch's thread count
        torch.set_num_threads(1)
        one = ops.linear(x, w, b, backend="cpp")
        assert _C.get_num_threads() == 1
        torch.set_num_threads(2)
        two = ops.linear(x, w, b, backend="cpp")
        assert _C.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)


def test_bad_input_is_a_clear_error():
    x, w, b = make(3, 8, 5, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.linear(x, w, b, backend="fast")
    with pytest.raises(ValueError, match=r"weight must be \[out, 8\]"):
        ops.linear(x, w[:, :7], b, backend="cpp")
    with pytest.raises(ValueError, match=r"bias must be \[5\]"):
        ops.linear(x, w, b[:4], backend="cpp")
    with pytest.raises(ValueError, match="weight must be a torch.float32 CPU tensor"):
        ops.linear(x, w.half(), b, backend="cpp")
    with pytest.raises(ValueError, match="supports float32, float16 and bfloat16"):
        ops.linear(x.double(), w.double(), b.double(), backend="cpp")
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.linear(x[None], w, b, backend="cpp")
    with pytest.raises(ValueError, match="inference only"):
        ops.linear(x.clone().requires_grad_(), w, b, backend="cpp")
    # auto never hands mismatched shapes to the kernel: torch reports them
    with pytest.raises(RuntimeError):
        ops.linear(x, w[:, :7], b)
