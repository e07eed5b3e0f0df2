"""ops.paged_attention (the C++ varlen kernel) against the per-sequence SDPA reference and a
fp64 softmax by hand, over decode rows, prefill chunks on a cached past and cache-less
packed sequences; odd shapes, GQA ratios, block sizes, windows and dtypes; and the engine
and Backbone paths through it against the per-sequence SDPA loop."""
from __future__ import annotations

import math

import pytest
import torch

from bsharedrag_fast import ops
from conftest import requires_triton, triton_device

TRITON_DEV = triton_device() or "cpu"

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _case(new, past, H, KV, D, bs, dtype, seed=0):
    """Sequence b: new[b] query rows after past[b] cached keys. Random caches with scattered
    blocks: each sequence's blocks are a random subset."""
    g = torch.Generator().manual_seed(seed)
    lens = [n + p for n, p in zip(new, past)]
    need = [max(1, -(-n // bs)) for n in lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, i = [], 0
    for n in need:
        tables.append(perm[i : i + n])
        i += n
    width = max(need)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    k = torch.randn(num_blocks, bs, KV, D, generator=g).to(dtype)
    v = torch.randn(num_blocks, bs, KV, D, generator=g).to(dtype)
    q = torch.randn(sum(new), H, D, generator=g).to(dtype)
    cu = torch.tensor([0] + new, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return q, k, v, table, cu, torch.tensor(lens, dtype=torch.int32)


def _by_hand(q, k, v, table, cu, lens, window):
    """fp64 softmax(q k^T / sqrt(D)) v, query row by query row, key position by position."""
    T, H, D = q.shape
    bs, KV = k.shape[1], k.shape[2]
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for b in range(len(lens)):
        s, e, n = int(cu[b]), int(cu[b + 1]), int(lens[b])
        for t in range(s, e):
            pos = n - (e - s) + (t - s)
            keep = [p for p in range(pos + 1) if not window or pos - p < window]
            for h in range(H):
                kh = h // (H // KV)
                ks = torch.stack([k[table[b, p // bs], p % bs, kh].double() for p in keep])
                vs = torch.stack([v[table[b, p // bs], p % bs, kh].double() for p in keep])
                w = torch.softmax(ks @ q[t, h].double() / math.sqrt(D), 0)
                out[t, h] = w @ vs
    return out


@pytest.mark.parametrize("new,past,H,KV,D,bs", [
    ([1], [0], 1, 1, 8, 1),                             # one key
    ([1, 1, 1], [4, 0, 32], 4, 2, 64, 16),              # decode rows, GQA 2, across blocks
    ([17, 1, 3, 40], [0, 63, 5, 0], 9, 3, 64, 16),      # smollm2's heads: prefill, decode, a chunk
    ([70, 7], [30, 93], 8, 8, 128, 4),                  # no GQA, head_dim 128, tiles of many chunks
    ([31, 0, 29], [0, 5, 2], 6, 1, 80, 32),             # multi-query, odd head_dim, a sequence with no rows
    ([130], [0], 9, 3, 24, 1),                          # one long cache-less sequence, blocks of one token
    ([1, 1, 1, 1, 1], [0, 15, 16, 200, 37], 14, 2, 64, 16),  # decode rows (the one-position kernel): GQA 7
    ([1, 2, 1], [9, 70, 33], 72, 1, 5, 8),              # 72 heads per KV head: one-position tiles, head_dim 5
    ([1, 1], [300, 6], 4, 4, 40, 16),                   # decode, no GQA, head_dim not a multiple of a vector
])  # fmt: skip
@pytest.mark.parametrize("window", [None, 8])
def test_paged_attention_matches_the_reference(new, past, H, KV, D, bs, window):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, k, v, table, cu, lens = _case(new, past, H, KV, D, bs, dtype)
        got = ops.paged_attention(q, k, v, table, cu, lens, window=window, backend="cpp")
        ref = ops.paged_attention_reference(q, k, v, table, cu, lens, window=window)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])
        if dtype == torch.float32 and D <= 64:
            torch.testing.assert_close(got.double(), _by_hand(q, k, v, table, cu, lens, window), rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.parametrize("new,past,H,KV,D,bs,window", [
    ([1], [300], 9, 3, 64, 16, None),        # smollm2's heads, one decode row: 3 items in 3 parts each
    ([1], [1], 64, 1, 128, 16, None),        # 2 keys in 8 parts: 6 empty ones
    ([1, 1], [40, 700], 8, 2, 32, 16, 100),  # a window: the parts share its last 100 keys
    ([1, 1, 1], [500, 3, 77], 6, 2, 20, 8, None),  # 6 items in 2 parts, head_dim 20
])  # fmt: skip
@pytest.mark.parametrize("threads", [1, 3])
def test_decode_rows_split_into_key_parts_match_the_reference(new, past, H, KV, D, bs, window, threads):
    """A decode step of fewer (sequence, KV head) items than csrc/attention.cpp's kDecodeUnits
    splits each one's keys into parts (on any thread count), merged after: the result is the
    reference's, and the same on 1 and 3 threads, bit for bit (bsharedrag.h: results do not
    depend on the thread count)."""
    old = torch.get_num_threads()
    try:
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v, table, cu, lens = _case(new, past, H, KV, D, bs, dtype, seed=3)
            torch.set_num_threads(1)
            one = ops.paged_attention(q, k, v, table, cu, lens, window=window, backend="cpp")
            torch.set_num_threads(threads)
            got = ops.paged_attention(q, k, v, table, cu, lens, window=window, backend="cpp")
            ref = ops.paged_attention_reference(q, k, v, table, cu, lens, window=window)
            torch.testing.assert_close(got.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])
            assert torch.equal(got, one)
    finally:
        torch.set_num_threads(old)


TRITON_CASES = [
    ([1], [0], 1, 1, 8, 1),                               # one key, length 1
    ([17, 1, 3, 40], [0, 63, 5, 0], 9, 3, 64, 16),        # smollm2's heads: prefill, decode, a chunk
    ([70, 7], [30, 93], 8, 8, 128, 4),                    # no GQA (8 KV heads), head_dim 128, many blocks
    ([31, 0, 29], [0, 5, 2], 6, 1, 80, 32),               # multi-query, odd head_dim, an empty sequence
    ([1, 1, 1, 1, 1], [0, 15, 16, 200, 37], 14, 2, 64, 16),  # decode rows only (a decode grid), GQA 7
    ([1, 2, 1], [9, 70, 33], 72, 1, 5, 8),                # 72 heads per KV head: one row per tile, head_dim 5
    ([9, 1], [3, 140], 9, 9, 128, 7),                     # 9 KV heads, a block size that is no power of two
    ([130], [0], 9, 3, 24, 1),                            # a long sequence in one-token blocks (packed_tables)
]  # fmt: skip


@requires_triton
@pytest.mark.parametrize("new,past,H,KV,D,bs", TRITON_CASES)
@pytest.mark.parametrize("window", [None, 8])
def test_triton_paged_attention_matches_the_reference(new, past, H, KV, D, bs, window):
    """The Triton kernel (under TRITON_INTERPRET=1 without a GPU) against the per-sequence SDPA
    reference on the same rounded inputs, computed in fp32; the tolerance is the output dtype's."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, k, v, table, cu, lens = (t.to(TRITON_DEV) for t in _case(new, past, H, KV, D, bs, dtype))
        got = ops.paged_attention(q, k, v, table, cu, lens, window=window, backend="triton")
        ref = ops.paged_attention_reference(q.float(), k.float(), v.float(), table, cu, lens, window=window)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), ref, rtol=TOL[dtype], atol=TOL[dtype])


@requires_triton
def test_triton_paged_attention_reads_strided_inputs_and_checks_its_backend():
    """Views of a packed qkv (rows and tokens further apart than their heads) and strided caches
    give the contiguous inputs' result; float64 is refused by name."""
    q, k, v, table, cu, lens = (t.to(TRITON_DEV) for t in _case([3, 1], [6, 3], 4, 2, 16, 4, torch.float32))
    wide = torch.randn(4, 4, 32, device=TRITON_DEV)
    wide[:, :, :16] = q
    kv = torch.randn(k.shape[0], k.shape[1], 2, 2, 16, device=TRITON_DEV)
    kv[:, :, 0], kv[:, :, 1] = k, v
    want = ops.paged_attention_reference(q, k, v, table, cu, lens)
    got = ops.paged_attention(wide[:, :, :16], kv[:, :, 0], kv[:, :, 1], table, cu, lens, backend="triton")
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        ops.paged_attention(q.double(), k.double(), v.double(), table, cu, lens, backend="triton")
    if TRITON_DEV == "cuda":
        with pytest.raises(ValueError, match="block_tables must be on cuda"):
            ops.paged_attention(q, k, v, table.cpu(), cu, lens, backend="triton")


def test_packed_tables_read_cacheless_sequences():
    """Packed k / v seen as a cache of one-token blocks (packed_tables) == one causal SDPA per sequence."""
    g = torch.Generator().manual_seed(1)
    cu = [0, 5, 6, 40]
    q, k, v = torch.randn(40, 6, 32, generator=g), torch.randn(40, 2, 32, generator=g), torch.randn(40, 2, 32, generator=g)
    tables, lens = ops.packed_tables(cu)
    got = ops.paged_attention(q, k[:, None], v[:, None], tables, torch.tensor(cu, dtype=torch.int32), lens)
    for s, e in zip(cu[:-1], cu[1:]):
        want = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], v[s:e].transpose(0, 1)[None],
            is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        torch.testing.assert_close(got[s:e], want, rtol=2e-5, atol=2e-5)


def test_paged_attention_reads_strided_rows_and_checks_its_inputs():
    q, k, v, table, cu, lens = _case([3, 1], [6, 3], 4, 2, 16, 4, torch.float32)
    wide = torch.randn(4, 4, 32)
    wide[:, :, :16] = q  # a strided view of q: head_dim 16 of 32 columns
    kv = torch.randn(k.shape[0], k.shape[1], 2, 2, 16)  # k and v as views of one [.., 2, KV, D] tensor
    kv[:, :, 0], kv[:, :, 1] = k, v
    want = ops.paged_attention(q, k, v, table, cu, lens, backend="cpp")
    torch.testing.assert_close(ops.paged_attention(wide[:, :, :16], kv[:, :, 0], kv[:, :, 1], table, cu, lens,
                                                   backend="cpp"), want)
    with pytest.raises(ValueError, match="block_tables"):
        ops.paged_attention(q, k, v, table.long(), cu, lens)
    with pytest.raises(ValueError, match="multiple"):
        ops.paged_attention(torch.randn(4, 3, 16), k, v, table, cu, lens)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        ops.paged_attention(q, k, v, table, torch.tensor([0, 3, 5], dtype=torch.int32), lens)
    with pytest.raises(ValueError, match="context_lens"):  # the C ABI's own check: fewer keys than new rows
        ops.paged_attention(q, k, v, table, cu, torch.tensor([2, 4], dtype=torch.int32), backend="cpp")
    with pytest.raises(ValueError, match="context_lens"):  # a length past the table
        ops.paged_attention(q, k, v, table, cu, torch.tensor([9, 99], dtype=torch.int32), backend="cpp")
    with pytest.raises(ValueError, match="block_tables"):  # a block id that is not a block
        bad = table.clone()
        bad[0, 0] = 1000
        ops.paged_attention(q, k, v, bad, cu, lens, backend="cpp")


def _use(attention, monkeypatch, mode: str) -> None:
    """mode "triton": the kernel mode with the Triton kernel (the GPU's, interpreted on CPU)."""
    monkeypatch.setattr(attention, "ATTENTION", "kernel" if mode == "triton" else mode)
    monkeypatch.setattr(attention, "KERNEL_BACKEND", "triton" if mode == "triton" else "auto")


@pytest.mark.parametrize("mode", ["kernel", "loop"] + (["triton"] if triton_device() else []))
def test_engine_decode_through_the_kernel_equals_the_loop(mode, monkeypatch, tmp_path):
    """Greedy decoding of mixed-length prompts (GQA, a sliding window model) gives the same
    tokens with the C++ and the Triton kernels (prefill and decode) as with the per-sequence
    SDPA loop."""
    import bsharedrag_fast.model.attention as attention
    from bsharedrag_fast import Backbone, SharedRuntime
    from tiny_models import hf_model

    hf = hf_model("mistral", sliding_window=6)
    hf.save_pretrained(tmp_path)
    model = Backbone.from_pretrained(str(tmp_path))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (3, 11, 1, 7)]
    monkeypatch.setattr(attention, "ATTENTION", "loop")
    want = [r.token_ids for r in SharedRuntime(model).generate(prompts, adapter=None, max_new_tokens=12,
                                                               eos_token_id=[])]
    _use(attention, monkeypatch, mode)
    got = [r.token_ids for r in SharedRuntime(model).generate(prompts, adapter=None, max_new_tokens=12,
                                                              eos_token_id=[])]
    assert got == want


@pytest.mark.parametrize("mode", ["kernel"] + (["triton"] if triton_device() else []))
def test_cacheless_and_mixed_steps_through_the_kernel_equal_the_loop(mode, monkeypatch, tmp_path):
    """Backbone.hidden over packed cache-less sequences (sliding window, GQA), and an engine
    step mixing cache-less rows with a prefill chunk and a decode row: the C++ and Triton
    kernels' hidden states equal the SDPA loop's; under autograd the cache-less rows keep the
    SDPA path."""
    import bsharedrag_fast.model.attention as attention
    from bsharedrag_fast import Backbone
    from bsharedrag_fast.engine.kv_cache import KVCache
    from bsharedrag_fast.engine.step import run_step
    from bsharedrag_fast.model.backbone import pack
    from tiny_models import hf_model

    hf_model("mistral", sliding_window=6).save_pretrained(tmp_path)
    model = Backbone.from_pretrained(str(tmp_path))
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (9, 1, 20, 4)]
    ids, cu = pack(seqs)

    def run(mode):
        _use(attention, monkeypatch, mode)
        with torch.no_grad():
            h = model.hidden(ids, cu)
        cache = KVCache(model.config, 1 << 20, block_size=4)
        a, b = cache.allocate(), cache.allocate()
        run_step(model, ids[:9], cu[:2], [a], cache)  # a: 9 cached tokens
        run_step(model, ids[9:10], torch.tensor([0, 1], dtype=torch.int32), [b], cache)
        # one step: a cache-less sequence, a's chunk of 5, b's decode row, another cache-less one
        step_ids = torch.cat([ids[10:30], ids[:5], ids[30:31], ids[30:34]])
        step_cu = torch.tensor([0, 20, 25, 26, 30], dtype=torch.int32)
        mixed = run_step(model, step_ids, step_cu, [None, a, b, None], cache, return_hidden=True).hidden
        return h, mixed

    want, got = run("loop"), run(mode)
    for w, x in zip(want, got):
        torch.testing.assert_close(x, w, rtol=1e-5, atol=1e-5)
    model.requires_grad_(True)  # autograd: the cache-less rows take the differentiable SDPA path
    h = model.hidden(ids, cu)
    h.sum().backward()
    torch.testing.assert_close(h.detach(), want[0], rtol=1e-5, atol=1e-5)
    q_rows = model.config.num_attention_heads * model.config.head_dim  # q reaches h only through attention
    assert model.layers[0].qkv_weight.grad[:q_rows].abs().sum() > 0


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_every_isa_copy_of_the_kernel_matches_the_reference(isa):
    """The kernels are compiled once per ISA and the CPU's best runs above; BSHAREDRAG_ISA lowers
    it (read once per process: a child each), over decode rows and prefill chunks."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import torch, test_attention as t\n"
        "from bsharedrag_fast import ops\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for case in (([1, 1, 1, 2], [0, 40, 17, 9], 14, 2, 40, 16), ([17, 3], [0, 5], 9, 3, 64, 16)):\n"
        "        a = t._case(*case, dtype)\n"
        "        got = ops.paged_attention(*a, window=None, backend='cpp').float()\n"
        "        ref = ops.paged_attention_reference(*a).float()\n"
        "        torch.testing.assert_close(got, ref, rtol=t.TOL[dtype], atol=t.TOL[dtype])\n"
        "from bsharedrag_fast.ops import _backends\n"
        "print(_backends._import_cpp()._isa())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env=dict(os.environ, BSHAREDRAG_ISA=isa))
    assert run.returncode == 0, run.stderr[-2000:]
    ran = run.stdout.split()[-1]
    assert ran == isa or (isa == "avx2" and ran == "generic")  # a CPU without AVX2 runs the portable copy
