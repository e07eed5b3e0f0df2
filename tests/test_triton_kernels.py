"""Triton shrink / expand kernels against an fp64 torch reference.

Without a GPU the kernels run on CPU tensors through the Triton interpreter: the env var
must be set before the kernels module is imported (triton.jit reads it at decoration
time). The interpreter's bf16 tl.dot is wrong, so bf16 runs only on CUDA.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

try:
    from bsharedrag_fast.kernels import lora_expand, lora_shrink  # noqa: E402
except ImportError:  # not installed: import the source tree's kernels/ directly
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kernels import lora_expand, lora_shrink  # noqa: E402

if torch.cuda.is_available():
    DEVICE = "cuda"
    DTYPES = [torch.float32, torch.float16, torch.bfloat16]
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
    DTYPES = [torch.float32, torch.float16]
else:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

NUM_ADAPTERS = 7
UNUSED = (1, 4)  # adapters that never get a row


def build_meta(token_adapter, num_adapters):
    """sorted_idx, starts, counts, active, max_count as ops.LoRAMeta builds them."""
    ta = token_adapter.long()
    valid = ta >= 0
    counts = torch.bincount(ta[valid], minlength=num_adapters)
    starts = torch.cumsum(counts, 0) - counts
    key = torch.where(valid, ta, torch.full_like(ta, num_adapters))
    sorted_idx = torch.argsort(key, stable=True)[: int(valid.sum())]
    active = torch.nonzero(counts > 0).flatten()
    max_count = int(counts.max()) if counts.numel() else 0
    dev = token_adapter.device
    i32 = dict(dtype=torch.int32, device=dev)
    return (sorted_idx.to(**i32), starts.to(**i32), counts.to(**i32), active.to(**i32), max_count)


def make_token_adapter(T, gen, none_frac=0.25):
    used = [a for a in range(NUM_ADAPTERS) if a not in UNUSED]
    ta = torch.tensor(used, dtype=torch.int32)[torch.randint(len(used), (T,), generator=gen)]
    ta[torch.rand(T, generator=gen) < none_frac] = -1
    if T > 1:
        ta[0], ta[-1] = used[0], -1  # at least one LoRA row and one base row
    return ta.to(DEVICE)


def ref_shrink(x, lora_a, token_adapter, sorted_idx):
    rows = sorted_idx.long()
    a = token_adapter.long()[rows]
    return torch.einsum("pk,prk->pr", x.double()[rows], lora_a.double()[a])


def ref_expand(v, lora_b, scaling, token_adapter, sorted_idx, y):
    rows = sorted_idx.long()
    a = token_adapter.long()[rows]
    out = y.double().clone()
    out[rows] += scaling.double()[a][:, None] * torch.einsum("pr,pnr->pn", v.double(), lora_b.double()[a])
    return out


def rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype=dtype).to(DEVICE)


def tols(dtype, kind):
    if dtype == torch.float32:
        return dict(atol=1e-4, rtol=1e-4)
    if kind == "shrink":  # low-precision inputs, fp32 accumulation: only summation order differs
        return dict(atol=2e-3, rtol=2e-3)
    if dtype == torch.float16:  # v rounded to fp16 + y rounded to fp16
        return dict(atol=5e-3, rtol=5e-3)
    return dict(atol=4e-2, rtol=3e-2)  # bf16


def run_shrink(x, lora_a, meta, split_k=None, poison=True):
    sorted_idx, starts, counts, active, max_count = meta
    v = torch.empty(sorted_idx.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    if poison:
        v.fill_(float("nan"))  # the kernel must overwrite every element
    lora_shrink(x, lora_a, sorted_idx, starts, counts, active, max_count, v, split_k=split_k)
    return v


# (T, K, N, R): odd sizes; K=2049 / N=1023 only with tiny T and R to keep the interpreter quick
SHAPES = [
    (1, 64, 48, 16),
    (3, 2049, 1023, 1),
    (3, 40, 33, 5),
    (129, 64, 96, 16),
    (129, 33, 17, 5),
    (17, 48, 40, 128),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,N,R", SHAPES)
@pytest.mark.parametrize("split_k", [1, None, 4], ids=["sk1", "skauto", "sk4"])
def test_shrink_expand(T, K, N, R, dtype, split_k):
    gen = torch.Generator().manual_seed(T * 1000 + K + R)
    ta = make_token_adapter(T, gen)
    meta = build_meta(ta, NUM_ADAPTERS)
    x = rand((T, K), dtype, gen)
    lora_a = rand((NUM_ADAPTERS, R, K), dtype, gen, scale=K ** -0.5)
    lora_b = rand((NUM_ADAPTERS, N, R), dtype, gen, scale=R ** -0.5)
    scaling = (torch.rand(NUM_ADAPTERS, generator=gen) + 0.5).to(DEVICE)

    v = run_shrink(x, lora_a, meta, split_k=split_k)
    torch.testing.assert_close(v.double(), ref_shrink(x, lora_a, ta, meta[0]), **tols(dtype, "shrink"))

    y = rand((T, N), dtype, gen)
    y0 = y.clone()
    lora_expand(v, lora_b, scaling, *meta[:4], meta[4], y)
    expected = ref_expand(v, lora_b, scaling, ta, meta[0], y0)
    torch.testing.assert_close(y.double(), expected, **tols(dtype, "expand"))
    base = ta < 0
    assert torch.equal(y[base], y0[base]), "rows with adapter -1 must be bit-identical"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_views(dtype):
    """Backward-style calls: lora_b^T as lora_a, lora_a^T as lora_b, sliced x and y."""
    gen = torch.Generator().manual_seed(7)
    T, d_in, d_out, R = 37, 72, 56, 5
    ta = make_token_adapter(T, gen)
    meta = build_meta(ta, NUM_ADAPTERS)
    lora_a = rand((NUM_ADAPTERS, R, d_in), dtype, gen, scale=d_in ** -0.5)  # [L, r, in]
    lora_b = rand((NUM_ADAPTERS, d_out, R), dtype, gen, scale=R ** -0.5)  # [L, out, r]
    scaling = (torch.rand(NUM_ADAPTERS, generator=gen) + 0.5).to(DEVICE)

    # grad_y [T, out] as a column slice of a wider buffer; shrink with B^T: [L, r, out]
    gy_big = rand((T, d_out + 11), dtype, gen)
    gy = gy_big[:, 3 : 3 + d_out]
    b_t = lora_b.transpose(1, 2)
    assert not gy.is_contiguous() and not b_t.is_contiguous()
    for split_k in (1, 3):
        v = run_shrink(gy, b_t, meta, split_k=split_k)
        torch.testing.assert_close(v.double(), ref_shrink(gy, b_t, ta, meta[0]), **tols(dtype, "shrink"))

    # x as a transposed view (unit stride along rows)
    x_t = rand((d_in, T), dtype, gen).t()
    v_x = run_shrink(x_t, lora_a, meta)
    torch.testing.assert_close(v_x.double(), ref_shrink(x_t, lora_a, ta, meta[0]), **tols(dtype, "shrink"))

    # expand with A^T: [L, in, r] into grad_x, a column slice of a wider buffer
    a_t = lora_a.transpose(1, 2)
    gx_big = rand((T, d_in + 5), dtype, gen)
    gx_big0 = gx_big.clone()
    gx = gx_big[:, 2 : 2 + d_in]
    lora_expand(v, a_t, scaling, *meta[:4], meta[4], gx)
    expected = ref_expand(v, a_t, scaling, ta, meta[0], gx_big0[:, 2 : 2 + d_in])
    torch.testing.assert_close(gx.double(), expected, **tols(dtype, "expand"))
    base = ta < 0
    assert torch.equal(gx_big[base], gx_big0[base])
    assert torch.equal(gx_big[:, :2], gx_big0[:, :2]) and torch.equal(gx_big[:, 2 + d_in :], gx_big0[:, 2 + d_in :])

    # v with a row stride (a slice of a wider fp32 buffer)
    v_big = torch.zeros(v.shape[0], R + 3, dtype=torch.float32, device=DEVICE)
    v_big[:, 1 : 1 + R] = v
    y = rand((T, d_out), dtype, gen)
    y0 = y.clone()
    lora_expand(v_big[:, 1 : 1 + R], lora_b, scaling, *meta[:4], meta[4], y)
    torch.testing.assert_close(y.double(), ref_expand(v, lora_b, scaling, ta, meta[0], y0), **tols(dtype, "expand"))


def test_no_lora_rows_launch_nothing():
    T, K, N, R = 5, 16, 24, 4
    ta = torch.full((T,), -1, dtype=torch.int32, device=DEVICE)
    meta = build_meta(ta, NUM_ADAPTERS)
    assert meta[0].numel() == 0 and meta[3].numel() == 0 and meta[4] == 0
    x = torch.randn(T, K, device=DEVICE)
    lora_a = torch.randn(NUM_ADAPTERS, R, K, device=DEVICE)
    lora_b = torch.randn(NUM_ADAPTERS, N, R, device=DEVICE)
    v = torch.empty(0, R, device=DEVICE)
    lora_shrink(x, lora_a, *meta[:4], meta[4], v)
    lora_shrink(x, lora_a, *meta[:4], meta[4], v, split_k=4)
    y = torch.randn(T, N, device=DEVICE)
    y0 = y.clone()
    lora_expand(v, lora_b, torch.ones(NUM_ADAPTERS, device=DEVICE), *meta[:4], meta[4], y)
    assert torch.equal(y, y0)


def test_single_adapter_all_rows_and_unsorted_ids():
    """Every row on one adapter (one segment) and ids in descending order (sorting matters)."""
    gen = torch.Generator().manual_seed(3)
    T, K, N, R = 70, 32, 20, 8
    for ta in (
        torch.full((T,), 6, dtype=torch.int32),
        torch.arange(T, dtype=torch.int32).flip(0) % NUM_ADAPTERS,
    ):
        ta = ta.to(DEVICE)
        meta = build_meta(ta, NUM_ADAPTERS)
        x = rand((T, K), torch.float32, gen)
        lora_a = rand((NUM_ADAPTERS, R, K), torch.float32, gen)
        lora_b = rand((NUM_ADAPTERS, N, R), torch.float32, gen)
        scaling = torch.rand(NUM_ADAPTERS, generator=gen).to(DEVICE)
        v = run_shrink(x, lora_a, meta)
        torch.testing.assert_close(v.double(), ref_shrink(x, lora_a, ta, meta[0]), **tols(torch.float32, "shrink"))
        y = rand((T, N), torch.float32, gen)
        y0 = y.clone()
        lora_expand(v, lora_b, scaling, *meta[:4], meta[4], y)
        torch.testing.assert_close(y.double(), ref_expand(v, lora_b, scaling, ta, meta[0], y0),
                                   **tols(torch.float32, "expand"))  # fmt: skip
