"""ops.lora_linear and ops.LoRAMeta against the pure-torch reference (fp64) and F.linear.

The Triton backend runs here through TRITON_INTERPRET=1 (see conftest.py) on CPU
tensors, and natively when a GPU is present; bf16 tl.dot is wrong in the interpreter,
so Triton bf16 is only checked on a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bsharedrag_fast import ops
from bsharedrag_fast.ops.lora_linear import CPU_AUTO_BACKEND
from conftest import triton_device

TRITON_DEV = triton_device()
FAST_BACKENDS = ["cpp"] + (["triton"] if TRITON_DEV else [])

# forward tolerance: fp32 vs the fp64 reference; half types vs the reference in the same
# dtype (same base GEMM, so only the LoRA sum order and one final rounding differ)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _device(backend: str) -> str:
    return TRITON_DEV if backend == "triton" else "cpu"


def _half_dtypes(backend: str) -> list:
    # the Triton interpreter's bf16 tl.dot gives wrong results on CPU tensors: bf16 Triton runs on a GPU only
    if backend == "triton" and TRITON_DEV == "cpu":
        return [torch.float16]
    return [torch.float16, torch.bfloat16]


def make_case(in_f, out_f, rank, n_ad, n_tok, *, seed=0, ranks=None, token_adapter=None, bias=True):
    """Random fp64 problem with O(1) outputs; adapters listed in `ranks` are zero-padded to `rank`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tok, in_f, generator=g, dtype=torch.float64)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    b = torch.randn(out_f, generator=g, dtype=torch.float64) if bias else None
    a = torch.randn(n_ad, rank, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    bb = torch.randn(n_ad, out_f, rank, generator=g, dtype=torch.float64) / rank**0.5
    for ad, r_ad in (ranks or {}).items():
        a[ad, r_ad:] = 0
        bb[ad, :, r_ad:] = 0
    s = torch.rand(n_ad, generator=g, dtype=torch.float64).mul(1.5).add(0.5).float()
    if token_adapter is None:
        token_adapter = torch.randint(-1, n_ad, (n_tok,), generator=g, dtype=torch.int32)
    return [x, w, b, a, bb, s, token_adapter]


def cast(case, dtype, device="cpu"):
    """x, weight, bias, lora_a, lora_b in `dtype`; scaling stays fp32 and token_adapter int32."""
    conv = [None if t is None else t.to(device=device, dtype=dtype) for t in case[:5]]
    return conv + [case[5].to(device), case[6].to(device)]


def naive(x, w, b, a, bb, s, ta):
    """Row-by-row definition of the op: what the reference itself must equal."""
    y = F.linear(x, w, b).clone()
    for t, ad in enumerate(ta.tolist()):
        if ad >= 0:
            y[t] += float(s[ad]) * (bb[ad] @ (a[ad] @ x[t]))
    return y


def check_base_rows_bit_identical(y, x, w, b, ta):
    base = ta.cpu() < 0
    if base.any():
        assert torch.equal(y.cpu()[base], F.linear(x, w, b).cpu()[base])


SHAPES = [  # in, out, rank, adapters, tokens
    (2049, 1023, 1, 7, 1),
    (2049, 1023, 128, 7, 3),
    (67, 33, 5, 7, 129),
    (64, 80, 16, 4, 129),
    (1, 1, 1, 1, 3),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_row_by_row_definition(shape):
    case = make_case(*shape)
    torch.testing.assert_close(ops.lora_linear_reference(*case), naive(*case), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_fp32_matches_fp64_reference(backend, shape):
    case = make_case(*shape)
    args = cast(case, torch.float32, _device(backend))
    y = ops.lora_linear(*args, backend=backend)
    assert y.dtype == torch.float32 and y.shape == (shape[4], shape[1])
    # ground truth: the fp64 reference on exactly the fp32 inputs
    ref64 = ops.lora_linear_reference(*cast(cast(case, torch.float32), torch.float64))
    torch.testing.assert_close(y.cpu().double(), ref64, rtol=TOL[torch.float32], atol=TOL[torch.float32])
    check_base_rows_bit_identical(y, *args[:3], args[6])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_forward_half_dtypes(backend):
    case = make_case(96, 40, 8, 3, 37)
    for dtype in _half_dtypes(backend):
        args = cast(case, dtype, _device(backend))
        y = ops.lora_linear(*args, backend=backend)
        assert y.dtype == dtype
        ref = ops.lora_linear_reference(*args)
        torch.testing.assert_close(y.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])
        check_base_rows_bit_identical(y, *args[:3], args[6])


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
@pytest.mark.parametrize("mode", ["all_base", "all_one_adapter", "unused_adapters", "mixed_ranks"])
def test_adapter_maps(backend, mode):
    n_tok, n_ad = 33, 7
    ta = {
        "all_base": torch.full((n_tok,), -1, dtype=torch.int32),
        "all_one_adapter": torch.full((n_tok,), 5, dtype=torch.int32),
        "unused_adapters": torch.tensor([6, -1, 0] * 11, dtype=torch.int32),
        "mixed_ranks": torch.arange(n_tok, dtype=torch.int32) % (n_ad + 1) - 1,
    }[mode]
    ranks = {0: 1, 1: 3, 2: 16, 3: 7, 4: 2} if mode == "mixed_ranks" else None
    case = make_case(45, 31, 16, n_ad, n_tok, token_adapter=ta, ranks=ranks)
    args = cast(case, torch.float32, _device(backend))
    y = ops.lora_linear(*args, backend=backend)
    # adapters of lower rank: the zero-padded result equals the truly low-rank product
    x, w, b, a, bb, s, _ = cast(cast(case, torch.float32), torch.float64)
    truth = F.linear(x, w, b).clone()
    for t, ad in enumerate(ta.tolist()):
        if ad >= 0:
            r_ad = (ranks or {}).get(ad, 16)
            truth[t] += float(s[ad]) * (bb[ad, :, :r_ad] @ (a[ad, :r_ad] @ x[t]))
    torch.testing.assert_close(y.cpu().double(), truth, rtol=2e-5, atol=2e-5)
    check_base_rows_bit_identical(y, *args[:3], args[6])
    if mode == "all_base":
        assert torch.equal(y.cpu(), F.linear(*cast(case, torch.float32)[:3]))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_contiguous_inputs(backend):
    dev = _device(backend)
    case = make_case(50, 24, 6, 3, 19)
    x, w, b, a, bb, s, ta = cast(case, torch.float32, dev)
    x_nc = torch.zeros(19, 71, device=dev)[:, 7:57]  # a column slice: row stride 71
    x_nc.copy_(x)
    w_nc = w.t().contiguous().t()  # transposed storage
    a_nc = torch.zeros(3, 9, 50, device=dev)[:, 2:8]  # rank slice of a bigger buffer
    a_nc.copy_(a)
    bb_nc = bb.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (x_nc.is_contiguous() or w_nc.is_contiguous() or a_nc.is_contiguous() or bb_nc.is_contiguous())
    y = ops.lora_linear(x_nc, w_nc, b, a_nc, bb_nc, s, ta, backend=backend)
    torch.testing.assert_close(y, ops.lora_linear_reference(x, w, b, a, bb, s, ta), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shape", [(67, 33, 5, 3, 41), (2049, 1023, 1, 7, 3), (40, 24, 128, 2, 9)])
def test_gradients_match_autograd_on_reference(backend, shape):
    case = make_case(*shape, seed=3)
    dev = _device(backend)
    grads = {}
    for name, dtype, be, device in [("fast", torch.float32, backend, dev), ("ref", torch.float64, "reference", "cpu")]:
        args = cast(cast(case, torch.float32), dtype, device)
        for t in args[:5]:
            t.requires_grad_(True)
        y = ops.lora_linear(*args, backend=be)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (y * g.to(device=device, dtype=dtype)).sum().backward()
        grads[name] = [t.grad.cpu().double() for t in args[:5]]
    for what, fast, ref in zip(["x", "weight", "bias", "lora_a", "lora_b"], grads["fast"], grads["ref"]):
        scale = ref.abs().max().clamp_min(1.0)
        torch.testing.assert_close(fast / scale, ref / scale, rtol=0, atol=5e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradients_frozen_base_and_no_lora_rows(backend):
    dev = _device(backend)
    case = make_case(20, 12, 4, 3, 7, token_adapter=torch.full((7,), -1, dtype=torch.int32))
    x, w, b, a, bb, s, ta = cast(case, torch.float32, dev)
    for t in (x, a, bb):
        t.requires_grad_(True)
    ops.lora_linear(x, w, b, a, bb, s, ta, backend=backend).sum().backward()
    assert w.grad is None and b.grad is None
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(bb.grad, torch.zeros_like(bb))
    torch.testing.assert_close(x.grad, torch.ones(7, 12, device=dev) @ w)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_meta_reused_across_layers(backend):
    dev = _device(backend)
    ta = torch.tensor([2, -1, 0, 2, 2, -1, 0, 1], dtype=torch.int32)
    meta = ops.LoRAMeta.build(ta.to(dev), 4)
    assert meta.sorted_idx.tolist() == [2, 6, 7, 0, 3, 4]
    assert meta.counts.tolist() == [2, 1, 3, 0] and meta.starts.tolist() == [0, 2, 3, 6]
    assert meta.active.tolist() == [0, 1, 2] and meta.num_lora == 6 and meta.max_count == 3
    assert not meta.no_lora and ops.LoRAMeta.build(torch.full((3,), -1, dtype=torch.int32), 4).no_lora
    h = torch.randn(8, 24, dtype=torch.float64)
    for layer, (i, o) in enumerate([(24, 40), (40, 16), (16, 24)]):
        case = make_case(i, o, 8, 4, 8, seed=layer, token_adapter=ta)
        x, w, b, a, bb, s, _ = cast(case, torch.float32, dev)
        y = ops.lora_linear(h.float().to(dev), w, b, a, bb, s, meta, backend=backend)
        ref = ops.lora_linear_reference(h.float(), *cast(case, torch.float32)[1:])
        torch.testing.assert_close(y.cpu(), ref, rtol=2e-5, atol=2e-5)
        h = y.cpu().double()


def test_auto_on_cpu_uses_fast_path_and_float64_reference():
    case = make_case(33, 17, 4, 3, 11)
    args32 = cast(case, torch.float32)
    assert torch.equal(ops.lora_linear(*args32), ops.lora_linear(*args32, backend=CPU_AUTO_BACKEND))
    torch.testing.assert_close(ops.lora_linear(*case), ops.lora_linear_reference(*case), rtol=0, atol=0)


def test_cpp_matches_c_abi_lora_add():
    from bsharedrag_fast import _C

    x, w, b, a, bb, s, ta = cast(make_case(70, 36, 3, 5, 23), torch.float32)
    y = F.linear(x, w, b)
    _C.lora_add(_C.DTYPE_F32, x.data_ptr(), x.stride(0), 70, a.data_ptr(), bb.data_ptr(), s.data_ptr(),
                5, 3, 36, ta.data_ptr(), 23, y.data_ptr(), y.stride(0))  # fmt: skip
    torch.testing.assert_close(y, ops.lora_linear(x, w, b, a, bb, s, ta, backend="cpp"), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- errors


def _good():
    return cast(make_case(8, 6, 2, 3, 5), torch.float32)


@pytest.mark.parametrize(
    "position,bad,match",
    [
        (0, torch.randn(5, 8, 1), "x must be 2-D"),
        (0, torch.randint(0, 3, (5, 8)), "x must be float32"),
        (1, torch.randn(6, 9), "weight must be"),
        (1, torch.randn(6, 8, dtype=torch.float64), "weight must have dtype"),
        (1, torch.randn(6, 8, device="meta"), "weight must be on cpu"),
        (2, torch.randn(7), "bias must be"),
        (3, torch.randn(3, 2, 9), "lora_a must be"),
        (3, torch.randn(3, 0, 8), "lora_a must have rank >= 1"),
        (4, torch.randn(3, 6, 3), "lora_b must be"),
        (4, torch.randn(2, 6, 2), "lora_b must be"),
        (5, torch.ones(3, dtype=torch.float64), "scaling must be float32"),
        (5, torch.ones(2), "scaling must be float32"),
        (6, torch.zeros(5, dtype=torch.int64), "token_adapter must be int32"),
        (6, torch.zeros(4, dtype=torch.int32), "token_adapter has 4 rows"),
        (6, torch.tensor([0, 1, 3, -1, 0], dtype=torch.int32), "adapter id 3"),
        (6, torch.tensor([0, -2, 1, -1, 0], dtype=torch.int32), "adapter id -2"),
        (6, [0, 1, 2, -1, 0], "token_adapter must be a torch.Tensor"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(position, bad, match):
    args = _good()
    args[position] = bad
    with pytest.raises(ValueError, match=match):
        ops.lora_linear(*args)


def test_bad_backend_and_meta():
    args = _good()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.lora_linear(*args, backend="cuda")
    with pytest.raises(ValueError, match="meta was built for 4 adapters"):
        ops.lora_linear(*args[:6], ops.LoRAMeta.build(args[6], 4))
    with pytest.raises(ValueError, match="use 'reference' for float64"):
        ops.lora_linear(*cast(make_case(8, 6, 2, 3, 5), torch.float64), backend="cpp")


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        ops.lora_linear(*_good(), backend="triton")


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
def test_add_lora_into_a_merged_projection_slice(backend):
    """One GEMM over a merged [q; k] weight, then the LoRA of each slice added in place."""
    dev = _device(backend)
    q = cast(make_case(40, 24, 4, 3, 11, seed=5), torch.float32, dev)
    k = cast(make_case(40, 8, 4, 3, 11, seed=6, token_adapter=q[6].cpu()), torch.float32, dev)
    x, ta = q[0], q[6]
    k[0] = x
    meta = ops.LoRAMeta.build(ta, 3)
    fused = F.linear(x, torch.cat([q[1], k[1]]), torch.cat([q[2], k[2]]))
    ops.add_lora_(fused[:, :24], x, *q[3:6], meta, backend=backend)
    ops.add_lora_(fused[:, 24:], x, *k[3:6], meta, backend=backend)
    for got, case in [(fused[:, :24], q), (fused[:, 24:], k)]:
        torch.testing.assert_close(got, ops.lora_linear_reference(*case), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="y must be"):
        ops.add_lora_(fused[:5], x, *q[3:6], meta, backend=backend)


def _merged_case(dtype, dev, ranks=(4, 3, 8), outs=(24, 9, 9), in_f=40, n_ad=3, n_tok=23, seed=11):
    """A merged projection: one stacked A [L, sum r, in], one slice per module, and fp64 originals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tok, in_f, generator=g, dtype=torch.float64)
    a = torch.randn(n_ad, sum(ranks), in_f, generator=g, dtype=torch.float64) / in_f**0.5
    bs = [torch.randn(n_ad, o, r, generator=g, dtype=torch.float64) / r**0.5 for r, o in zip(ranks, outs)]
    ss = [torch.rand(n_ad, generator=g).mul(1.5).add(0.5) for _ in ranks]
    y = torch.randn(n_tok, sum(outs), generator=g, dtype=torch.float64)
    ta = torch.randint(-1, n_ad, (n_tok,), generator=g, dtype=torch.int32)
    offs = [sum(ranks[:i]) for i in range(len(ranks))]
    cols = [sum(outs[:i]) for i in range(len(outs))]
    slices = [ops.LoRASlice(o, b.to(dev, dtype), s.to(dev), c) for o, b, s, c in zip(offs, bs, ss, cols)]
    return x, a, bs, ss, y, ta, offs, cols, slices


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
@pytest.mark.parametrize("n_tok", [1, 23, 70])
def test_add_lora_slices_matches_one_add_per_module(backend, n_tok):
    """One shrink over the stacked A and one expand writing every slice (q/k/v of odd widths and
    ranks) equals each module's own LoRA added into its columns, in fp64 (the definition)."""
    dev = _device(backend)
    for dtype in [torch.float32] + _half_dtypes(backend):
        x, a, bs, ss, y, ta, offs, cols, slices = _merged_case(dtype, dev, n_tok=n_tok)
        meta = ops.LoRAMeta.build(ta.to(dev), 3)
        got = ops.add_lora_slices_(y.to(dev, dtype), x.to(dev, dtype), a.to(dev, dtype), slices, meta, backend=backend)
        ref = y.clone()
        for o, b, s, c in zip(offs, bs, ss, cols):
            cols_ = ref[:, c : c + b.shape[1]]
            cols_.copy_(ops.lora_linear_reference(x, torch.zeros(b.shape[1], x.shape[1], dtype=torch.float64), None,
                                                  a[:, o : o + b.shape[2]], b, s, ta) + cols_)
        tol = TOL[dtype] * 4
        torch.testing.assert_close(got.double().cpu(), ref, rtol=tol, atol=tol)


def test_add_lora_slices_skips_what_it_should_and_checks_what_it_gets():
    x, a, bs, ss, y, ta, offs, cols, slices = _merged_case(torch.float32, "cpu")
    x, a, y = x.float(), a.float(), y.float()
    none = ops.LoRAMeta.build(torch.full((x.shape[0],), -1, dtype=torch.int32), 3)
    assert torch.equal(ops.add_lora_slices_(y.clone(), x, a, slices, none), y)  # no adapter rows: untouched
    meta = ops.LoRAMeta.build(ta, 3)
    assert torch.equal(ops.add_lora_slices_(y.clone(), x, a, [], meta), y)
    part = ops.add_lora_slices_(y.clone(), x, a, slices[1:2], meta)  # one slice: the other columns untouched
    c0, c1 = cols[1], cols[1] + bs[1].shape[1]
    assert torch.equal(part[:, :c0], y[:, :c0]) and torch.equal(part[:, c1:], y[:, c1:])
    bad = [ops.LoRASlice(a.shape[1] - 2, slices[2].lora_b, slices[2].scaling, cols[2])]  # rank 8 from row R - 2
    with pytest.raises(ValueError, match="does not fit|do not fit"):
        ops.add_lora_slices_(y.clone(), x, a, bad, meta)
    with pytest.raises(ValueError, match="scaling must be float32"):
        ops.add_lora_slices_(y.clone(), x, a, [ops.LoRASlice(0, slices[0].lora_b, slices[0].scaling.double(), 0)],
                             meta)
    with pytest.raises(ValueError, match="must match the adapters"):
        ops.add_lora_slices_(y[:3], x, a, slices, meta)
    merged = ops.MergedLoRA(a, slices)  # built once, called every step: the same sums as the one-off call
    assert torch.equal(merged.add_(y.clone(), x, meta), ops.add_lora_slices_(y.clone(), x, a, slices, meta))
    with pytest.raises(ValueError, match="must match the adapters"):
        merged.add_(y.clone(), x.double(), meta)
