"""KV cache, Backbone.step and generate() against transformers on tiny random models.

Nothing is downloaded: every model is built with transformers and saved in tmp_path.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bsharedrag_fast import Tokenizer  # noqa: E402
from bsharedrag_fast.engine.generation import sample, warp_logits  # noqa: E402
from bsharedrag_fast.engine.runtime import generate  # noqa: E402
from bsharedrag_fast.engine.kv_cache import CacheFullError, KVCache  # noqa: E402
from bsharedrag_fast.engine.step import run_step  # noqa: E402
from bsharedrag_fast.model.adapters import LoRAStack  # noqa: E402
from tiny_models import GENERATION_CASES, cu_seqlens, saved_generation_case  # noqa: E402

TOL = 1e-4
V = 128
PROMPT_LENS = [3, 11, 6]
NEW = 10


@pytest.fixture(scope="module", params=sorted(GENERATION_CASES))
def case(request, tmp_path_factory):
    return (request.param, *saved_generation_case(request.param, tmp_path_factory))


def _prompts(lens=PROMPT_LENS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]


@torch.no_grad()
def _hf_generate(hf, prompt, n=NEW, **kw):
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------- generation vs HF


def test_greedy_matches_hf(case):
    _, hf, model = case
    prompts = _prompts()
    res = generate(model, None, prompts, max_new_tokens=NEW, eos_token_id=[])
    for p, r in zip(prompts, res):
        assert r.token_ids == _hf_generate(hf, p) and r.finish_reason == "length" and r.text is None
        assert len(set(r.token_ids)) > 3  # not a degenerate repeat-one-token run


def test_repetition_penalty_matches_hf(case):
    _, hf, model = case
    prompts = _prompts(seed=2)
    res = generate(model, None, prompts, max_new_tokens=NEW, repetition_penalty=1.5, eos_token_id=[])
    for p, r in zip(prompts, res):
        assert r.token_ids == _hf_generate(hf, p, repetition_penalty=1.5)


def test_adapters_match_hf_merged(case):
    """Prompts on adapters [0, None, 1] in one batch equal HF models with W + s B A merged in."""
    _, hf, model = case
    cfg = model.config
    L, r = 2, 4
    g = torch.Generator().manual_seed(3)
    scaling = torch.tensor([0.5, 2.0])
    stacks, merged = [], [copy.deepcopy(hf) for _ in range(L)]
    for l in range(cfg.num_hidden_layers):
        st = {}
        for mod, (fin, fout) in model.module_shapes.items():
            a = torch.randn(L, r, fin, generator=g) * 0.2
            b = torch.randn(L, fout, r, generator=g) * 0.2
            st[mod] = LoRAStack(a, b, scaling)
            group = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            for k in range(L):
                w = merged[k].get_parameter(f"model.layers.{l}.{group}.{mod}.weight")
                with torch.no_grad():
                    w.add_(scaling[k] * b[k] @ a[k])
        stacks.append(st)
    prompts = _prompts(seed=4)
    model.set_lora_stacks(stacks, L)
    try:
        res = generate(model, None, prompts, adapters=[0, None, 1], max_new_tokens=NEW, eos_token_id=[])
    finally:
        model.set_lora_stacks([{} for _ in model.layers], 0)
    refs = [merged[0], hf, merged[1]]
    for p, rr, ref in zip(prompts, res, refs):
        assert rr.token_ids == _hf_generate(ref, p)
    assert res[0].token_ids != res[1].token_ids or res[2].token_ids != res[1].token_ids  # adapters matter


def test_eos_finish_matches_hf(case):
    _, hf, model = case
    p = _prompts(seed=5)[1]
    full = generate(model, None, [p], max_new_tokens=NEW, eos_token_id=[])[0].token_ids
    eos = full[4]
    j = full.index(eos)
    r = generate(model, None, [p, p[:3]], max_new_tokens=NEW, eos_token_id=eos)[0]
    assert r.finish_reason == "eos" and r.token_ids == full[: j + 1]
    assert r.token_ids == _hf_generate(hf, p, eos_token_id=eos)


# ----------------------------------------------------------------------------- step + cache


@pytest.fixture(params=["kernel", "loop", "batched"])
def decode_mode(request, monkeypatch):
    import bsharedrag_fast.model.attention as model_mod

    monkeypatch.setattr(model_mod, "ATTENTION", request.param)
    return request.param


def test_chunked_prefill_and_decode_match_forward(case, decode_mode):
    """Two sequences interleaved in one cache (small blocks, so their tables interleave):
    prefill in 2 chunks, then decode steps with both rows in one batch == full forward."""
    _, _, model = case
    a, b = _prompts(lens=[16, 13], seed=6)
    full_a = model(torch.tensor(a), cu_seqlens([16]))
    full_b = model(torch.tensor(b), cu_seqlens([13]))
    cache = KVCache(model.config, 1 << 20, block_size=4)
    sa, sb = cache.allocate(), cache.allocate()
    outs_a, outs_b = [], []
    out = run_step(model, torch.tensor(a[:7] + b[:5]), cu_seqlens([7, 5]), [sa, sb], cache).logits
    outs_a.append(out[:7]), outs_b.append(out[7:])
    out = run_step(model, torch.tensor(a[7:12] + b[5:10]), cu_seqlens([5, 5]), [sa, sb], cache).logits
    outs_a.append(out[:5]), outs_b.append(out[5:])
    for t in range(3):  # decode: both sequences one token each, batched
        out = run_step(model, torch.tensor([a[12 + t], b[10 + t]]), cu_seqlens([1, 1]), [sa, sb], cache).logits
        outs_a.append(out[:1]), outs_b.append(out[1:])
    out = run_step(model, torch.tensor([a[15]]), cu_seqlens([1]), [sa], cache).logits
    outs_a.append(out)
    assert cache.length(sa) == 16 and cache.length(sb) == 13
    assert (torch.cat(outs_a) - full_a).abs().max().item() <= TOL
    assert (torch.cat(outs_b) - full_b).abs().max().item() <= TOL


def test_mixed_step_matches_separate(case, decode_mode):
    """One step with two decode rows, one prefill chunk and one cache-less (embedding) row."""
    _, _, model = case
    a, b, c, e = _prompts(lens=[10, 12, 19, 6], seed=7)
    cache = KVCache(model.config, 1 << 20, block_size=4)
    sa, sb, sc = cache.allocate(), cache.allocate(), cache.allocate()
    run_step(model, torch.tensor(a[:9] + b[:5] + c[:18]), cu_seqlens([9, 5, 18]), [sa, sb, sc], cache)
    ids = torch.tensor([a[9]] + b[5:] + [c[18]] + e)
    out = run_step(model, ids, cu_seqlens([1, 7, 1, 6]), [sa, sb, sc, None], cache, return_hidden=True)
    assert out.logits.shape == (15, V)
    ref_a = model(torch.tensor(a), cu_seqlens([10]))[-1:]
    ref_b = model(torch.tensor(b), cu_seqlens([12]))[5:]
    ref_c = model(torch.tensor(c), cu_seqlens([19]))[-1:]
    ref_e = model(torch.tensor(e), cu_seqlens([6]))
    ref = torch.cat([ref_a, ref_b, ref_c, ref_e])
    assert (out.logits - ref).abs().max().item() <= TOL
    hid_e = model.hidden_states(torch.tensor(e), cu_seqlens([6]))
    assert (out.hidden[9:] - hid_e).abs().max().item() <= TOL
    assert [cache.length(s) for s in (sa, sb, sc)] == [10, 12, 19]
    rows = run_step(model, torch.tensor([a[0]]), cu_seqlens([1]), [None], cache, logits_rows=[]).logits
    assert rows.shape == (0, V)


# ----------------------------------------------------------------------------- sampling


def test_sampling_seed_and_top_k_1(case):
    _, _, model = case
    prompts = _prompts(seed=8)
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_k=20, top_p=0.9, eos_token_id=[])
    r1 = [r.token_ids for r in generate(model, None, prompts, seed=123, **kw)]
    r2 = [r.token_ids for r in generate(model, None, prompts, seed=123, **kw)]
    r3 = [r.token_ids for r in generate(model, None, prompts, seed=7, **kw)]
    assert r1 == r2 and r1 != r3
    greedy = [r.token_ids for r in generate(model, None, prompts, max_new_tokens=NEW, eos_token_id=[])]
    top1 = generate(model, None, prompts, max_new_tokens=NEW, temperature=0.7, top_k=1, seed=1, eos_token_id=[])
    assert [r.token_ids for r in top1] == greedy


def test_warpers_match_hf():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )  # fmt: skip
    from bsharedrag_fast.engine.generation import apply_repetition_penalty

    for t, k, p in ((0.7, 0, 1.0), (1.3, 10, 1.0), (1.0, 0, 0.8), (0.5, 7, 0.6)):
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(warp_logits(logits, t, k, p), ref)
    hist = torch.randint(0, 50, (4, 9), generator=g)
    ref = RepetitionPenaltyLogitsProcessor(1.4)(hist, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits.clone(), hist.tolist(), 1.4), ref)
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))


# ----------------------------------------------------------------------------- stop strings


def _word_tokenizer():
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    tok = HFTok(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(tok, {"eos_token": "w2"})


def test_stop_string(case):
    _, _, model = case
    tok = _word_tokenizer()
    p = _prompts(seed=9)[1]
    full = generate(model, tok, [p], max_new_tokens=NEW, eos_token_id=[])[0]
    assert full.text == tok.decode(full.token_ids) and full.finish_reason == "length"
    stop = tok.decode(full.token_ids[3:5])
    k = next(k for k in range(1, NEW + 1) if stop in tok.decode(full.token_ids[:k]))
    r = generate(model, tok, [p, p[:4]], max_new_tokens=NEW, stop=[stop, "never-there"], eos_token_id=[])[0]
    assert r.finish_reason == "stop" and r.token_ids == full.token_ids[:k]
    assert r.text == full.text[: full.text.find(stop)]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, None, [p], stop="x")


# ----------------------------------------------------------------------------- cache budget


def test_cache_budget_errors_and_reuse(case):
    _, _, model = case
    cfg = model.config
    per_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * 4
    with pytest.raises(CacheFullError, match="below one block"):
        KVCache(cfg, per_block - 1, block_size=4)
    cache = KVCache(cfg, 3 * per_block, block_size=4)
    assert cache.num_blocks == 3 and cache.nbytes == 3 * per_block and cache.capacity_tokens == 12
    ids = _prompts(lens=[8, 5], seed=10)
    sa, sb = cache.allocate(), cache.allocate()
    run_step(model, torch.tensor(ids[0]), cu_seqlens([8]), [sa], cache)
    blocks_a = cache.block_table(sa)
    assert len(blocks_a) == 2 and cache.can_fit(4, sb) and not cache.can_fit(5, sb)
    with pytest.raises(CacheFullError, match="KV cache full"):
        run_step(model, torch.tensor(ids[0][:1] + ids[1]), cu_seqlens([1, 5]), [sa, sb], cache)
    assert cache.length(sa) == 8 and cache.length(sb) == 0 and cache.num_free_blocks == 1  # unchanged
    cache.free(sa)
    assert cache.can_fit(12, sb)
    sc = cache.allocate()
    ref = model(torch.tensor(ids[1]), cu_seqlens([5]))
    out = run_step(model, torch.tensor(ids[1]), cu_seqlens([5]), [sc], cache).logits
    assert set(cache.block_table(sc)) <= set(blocks_a)  # freed blocks handed out again
    assert (out - ref).abs().max().item() <= TOL
    with pytest.raises(KeyError):
        cache.length(sa)
    # generate: a budget that cannot hold prompts + max_new_tokens fails before any work
    with pytest.raises(CacheFullError, match="cache_budget_bytes"):
        generate(model, None, _prompts(), max_new_tokens=NEW, cache_budget_bytes=2 * per_block * 4, block_size=4)
    res = generate(model, None, _prompts(), max_new_tokens=3, cache_budget_bytes=1 << 20, eos_token_id=[])
    assert [len(r.token_ids) for r in res] == [3, 3, 3]


def test_step_argument_errors(case):
    _, _, model = case
    cache = KVCache(model.config, 1 << 16, block_size=4)
    sid = cache.allocate()
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="seq_ids"):
        run_step(model, ids, cu_seqlens([3]), [sid, None], cache)
    with pytest.raises(ValueError, match="no cache"):
        run_step(model, ids, cu_seqlens([3]), [sid])
    with pytest.raises(ValueError, match="twice"):
        run_step(model, ids, cu_seqlens([1, 2]), [sid, sid], cache)
    with pytest.raises(ValueError, match="already allocated"):
        cache.allocate(sid)
    assert cache.length(sid) == 0
    with pytest.raises(ValueError, match="different model config"):
        other = KVCache(model.config, 1 << 16, block_size=4)
        other.num_kv_heads += 1
        run_step(model, ids, cu_seqlens([3]), [other.allocate()], other)


def test_failed_step_restores_cache(case, monkeypatch):
    import bsharedrag_fast.model.attention as model_mod

    _, _, model = case
    cache = KVCache(model.config, 1 << 16, block_size=4)
    sid = cache.allocate()
    run_step(model, torch.tensor([1, 2, 3]), cu_seqlens([3]), [sid], cache)
    free, table = cache.num_free_blocks, cache.block_table(sid)
    monkeypatch.setattr(model_mod, "ATTENTION", "bogus")  # fails after the reserve
    with pytest.raises(ValueError, match="ATTENTION"):
        run_step(model, torch.tensor([4, 5, 6]), cu_seqlens([3]), [sid], cache)
    assert cache.length(sid) == 3 and cache.num_free_blocks == free and cache.block_table(sid) == table
