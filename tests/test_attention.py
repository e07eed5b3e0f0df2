"""ops.paged_decode_attention (the C++ kernel) against the per-sequence SDPA reference and a
fp64 softmax by hand, over odd shapes, GQA ratios, block sizes, windows and dtypes; and the
engine's decode path through it against the per-sequence loop."""
from __future__ import annotations

import math

import pytest
import torch

from bsharedrag_fast import ops

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _case(lens, H, KV, D, bs, dtype, seed=0):
    """Random caches with scattered blocks: each sequence's blocks are a random subset."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
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
    q = torch.randn(len(lens), H, D, generator=g).to(dtype)
    return q, k, v, table, torch.tensor(lens, dtype=torch.int32)


def _by_hand(q, k, v, table, lens, window):
    """fp64 softmax(q k^T / sqrt(D)) v, position by position."""
    B, H, D = q.shape
    bs, KV = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        keep = range(max(0, n - window) if window else 0, n)
        for h in range(H):
            kh = h // (H // KV)
            ks = torch.stack([k[table[b, p // bs], p % bs, kh].double() for p in keep])
            vs = torch.stack([v[table[b, p // bs], p % bs, kh].double() for p in keep])
            w = torch.softmax(ks @ q[b, h].double() / math.sqrt(D), 0)
            out[b, h] = w @ vs
    return out


@pytest.mark.parametrize("lens,H,KV,D,bs", [
    ([1], 1, 1, 8, 1),                      # one key
    ([5, 1, 33], 4, 2, 64, 16),             # GQA 2, sequences across blocks, a length-1 one
    ([17, 64, 3, 40], 9, 3, 64, 16),        # smollm2's heads (9 / 3)
    ([100, 7], 8, 8, 128, 4),               # no GQA, head_dim 128, small blocks
    ([31, 29], 6, 1, 80, 32),               # multi-query, an odd head_dim
])  # fmt: skip
@pytest.mark.parametrize("window", [None, 8])
def test_decode_attention_matches_the_reference(lens, H, KV, D, bs, window):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, k, v, table, ctx = _case(lens, H, KV, D, bs, dtype)
        got = ops.paged_decode_attention(q, k, v, table, ctx, window=window, backend="cpp")
        ref = ops.paged_decode_attention_reference(q, k, v, table, ctx, window=window)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), _by_hand(q, k, v, table, ctx, window), rtol=1e-5, atol=1e-5)


def test_decode_attention_reads_strided_queries_and_checks_its_inputs():
    q, k, v, table, ctx = _case([9, 4], 4, 2, 16, 4, torch.float32)
    wide = torch.randn(2, 4, 32)
    wide[:, :, :16] = q  # a strided view of q: head_dim 16 of 32 columns
    torch.testing.assert_close(ops.paged_decode_attention(wide[:, :, :16], k, v, table, ctx, backend="cpp"),
                               ops.paged_decode_attention(q, k, v, table, ctx, backend="cpp"))
    with pytest.raises(ValueError, match="block_tables"):
        ops.paged_decode_attention(q, k, v, table.long(), ctx)
    with pytest.raises(ValueError, match="multiple"):
        ops.paged_decode_attention(torch.randn(2, 3, 16), k, v, table, ctx)
    with pytest.raises(ValueError, match="context_lens"):  # the C ABI's own check: a length past the table
        ops.paged_decode_attention(q, k, v, table, torch.tensor([9, 99], dtype=torch.int32), backend="cpp")
    with pytest.raises(ValueError, match="block_tables"):  # a block id that is not a block
        bad = table.clone()
        bad[0, 0] = 1000
        ops.paged_decode_attention(q, k, v, bad, ctx, backend="cpp")


@pytest.mark.parametrize("mode", ["kernel", "loop"])
def test_engine_decode_through_the_kernel_equals_the_loop(mode, monkeypatch, tmp_path):
    """Greedy decoding of mixed-length prompts (GQA, a sliding window model) gives the same
    tokens with the C++ decode kernel as with the per-sequence SDPA loop."""
    import bsharedrag_fast.model.attention as attention
    from bsharedrag_fast import Backbone, SharedRuntime
    from tiny_models import hf_model

    hf = hf_model("mistral", sliding_window=6)
    hf.save_pretrained(tmp_path)
    model = Backbone.from_pretrained(str(tmp_path))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (3, 11, 1, 7)]
    monkeypatch.setattr(attention, "DECODE_ATTENTION", "loop")
    want = [r.token_ids for r in SharedRuntime(model).generate(prompts, adapter=None, max_new_tokens=12,
                                                               eos_token_id=[])]
    monkeypatch.setattr(attention, "DECODE_ATTENTION", mode)
    got = [r.token_ids for r in SharedRuntime(model).generate(prompts, adapter=None, max_new_tokens=12,
                                                              eos_token_id=[])]
    assert got == want
