"""Prompt-lookup drafts (engine/speculative.py) in the engine: the same tokens as transformers'
greedy generate and as the engine without drafts, in fewer steps; the KV cache drops the
rejected drafts. Tiny random models saved in tmp dirs; nothing is downloaded."""
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bsharedrag_fast.engine.kv_cache import KVCache  # noqa: E402
from bsharedrag_fast.engine.runtime import SharedRuntime  # noqa: E402
from bsharedrag_fast.engine.speculative import PromptLookup  # noqa: E402
from tiny_models import GENERATION_CASES, hf_model, saved_generation_case  # noqa: E402

V = 128
NEW = 40


@pytest.fixture(scope="module", params=sorted(GENERATION_CASES))
def case(request, tmp_path_factory):
    return saved_generation_case(request.param, tmp_path_factory)


def _prompts(seed=1):
    """Prompts with repeated spans (what a RAG prompt quoting a passage twice looks like) and
    one without, so that drafts are found, accepted and rejected."""
    g = torch.Generator().manual_seed(seed)
    span = torch.randint(0, V, (6,), generator=g).tolist()
    other = torch.randint(0, V, (5,), generator=g).tolist()
    return [span + other + span + other[:2], other + span * 3, torch.randint(0, V, (9,), generator=g).tolist()]


@torch.no_grad()
def _hf_generate(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _lookup_reference(tokens, k, min_n=2, max_n=4):
    """Brute force: the longest tail n-gram's latest earlier occurrence, what followed it."""
    L = len(tokens)
    for n in range(min(max_n, L), min_n - 1, -1):
        for start in range(L - n - 1, -1, -1):
            if tokens[start: start + n] == tokens[L - n:]:
                return tokens[start + n: start + n + k]
    return []


def test_prompt_lookup_drafts_what_brute_force_finds():
    rng = random.Random(0)
    for trial in range(300):
        vocab = rng.choice([2, 3, 5, 20])
        toks = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
        lk = PromptLookup()
        cut = rng.randrange(len(toks) + 1)  # built in two parts, as the engine extends it
        lk.extend(toks[:cut])
        lk.extend(toks[cut:])
        for k in (0, 1, 3, 8):
            assert lk.draft(k) == (_lookup_reference(toks, k) if k else []), (toks, k)
    with pytest.raises(ValueError, match="min_n"):
        PromptLookup(min_n=3, max_n=2)


def test_greedy_with_drafts_gives_transformers_tokens_in_fewer_steps(case):
    hf, model = case
    prompts = _prompts()
    plain = SharedRuntime(model, None, max_batch_tokens=64, speculate=0)
    drafting = SharedRuntime(model, None, max_batch_tokens=64)  # the default: 4 draft tokens
    assert drafting.speculate == 4
    for p in prompts:  # one stream at a time, as a user's single request
        want = _hf_generate(hf, p, NEW)
        assert plain.generate([p], adapter=None, max_new_tokens=NEW, eos_token_id=[])[0].token_ids == want
        got = drafting.generate([p], adapter=None, max_new_tokens=NEW, eos_token_id=[])[0]
        assert got.token_ids == want and got.finish_reason == "length"
    st = drafting.stats
    assert 0 < st["drafts_accepted"] < st["draft_rows"]  # drafts were kept and rejected
    assert st["steps"] < plain.stats["steps"] - st["drafts_accepted"] // 2
    assert st["decode_rows"] + st["drafts_accepted"] == plain.stats["decode_rows"]
    assert drafting.cache.num_free_blocks == drafting.cache.num_blocks  # the rejected drafts' blocks came back
    # several streams at once share the SPEC_MAX_ROWS rows a step may carry
    outs = drafting.generate(prompts, adapter=None, max_new_tokens=NEW, eos_token_id=[])
    assert [o.token_ids for o in outs] == [_hf_generate(hf, p, NEW) for p in prompts]


def test_drafts_stop_where_the_plain_engine_stops(case):
    """EOS or the token limit inside an accepted draft ends the request there."""
    _, model = case
    p = _prompts()[1]
    plain = SharedRuntime(model, None, max_batch_tokens=64, speculate=0)
    drafting = SharedRuntime(model, None, max_batch_tokens=64, speculate=6)
    full = plain.generate([p], adapter=None, max_new_tokens=NEW, eos_token_id=[])[0].token_ids
    for n in (1, 2, 3, 7, 19):
        got = drafting.generate([p], adapter=None, max_new_tokens=n, eos_token_id=[])[0]
        assert got.token_ids == full[:n] and got.finish_reason == "length"
    for eos in sorted(set(full[5:]))[:4]:  # tokens the drafts may carry past
        want = plain.generate([p], adapter=None, max_new_tokens=NEW, eos_token_id=eos)[0]
        got = drafting.generate([p], adapter=None, max_new_tokens=NEW, eos_token_id=eos)[0]
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "eos"
    assert drafting.stats["drafts_accepted"] > 0
    assert drafting.cache.num_free_blocks == drafting.cache.num_blocks


def test_drafting_rows_share_steps_with_sampled_penalized_and_embedding_rows(case):
    _, model = case
    prompts = _prompts()
    texts = [[3, 4, 5, 6, 7], list(range(10, 30))]

    def run(rt):
        hs = [rt.submit_generate(prompts[0], adapter=None, max_new_tokens=NEW, eos_token_id=[]),
              rt.submit_generate(prompts[1], adapter=None, max_new_tokens=NEW, temperature=0.8, top_k=20, seed=3,
                                 eos_token_id=[]),
              rt.submit_generate(prompts[1], adapter=None, max_new_tokens=NEW, repetition_penalty=1.3,
                                 eos_token_id=[]),
              rt.submit_generate(prompts[2], adapter=None, max_new_tokens=NEW, eos_token_id=[])]
        es = [rt.submit_embed(t, adapter=None) for t in texts]
        rt.run_until_done()
        return [h.result().token_ids for h in hs], torch.stack([h.result() for h in es])

    want_tokens, want_vecs = run(SharedRuntime(model, None, max_batch_tokens=64, speculate=0))
    rt = SharedRuntime(model, None, max_batch_tokens=64, mixing="always")
    got_tokens, got_vecs = run(rt)
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_vecs, want_vecs, atol=1e-5, rtol=1e-5)
    assert rt.stats["draft_rows"] > 0


def test_kv_cache_truncate_frees_the_blocks_past_the_kept_tokens(case):
    _, model = case
    cache = KVCache(model.config, 1 << 20, block_size=4)
    sid = cache.allocate()
    cache.reserve([(sid, 10)])  # 3 blocks
    table = cache.block_table(sid)
    free = cache.num_free_blocks
    cache.truncate(sid, 8)  # 2 blocks
    assert cache.length(sid) == 8 and cache.block_table(sid) == table[:2] and cache.num_free_blocks == free + 1
    cache.truncate(sid, 8)
    assert cache.num_free_blocks == free + 1
    past, slots = cache.reserve([(sid, 3)])[0]
    assert past == 8 and cache.length(sid) == 11
    with pytest.raises(ValueError, match="outside 0..11"):
        cache.truncate(sid, 12)
    cache.truncate(sid, 0)
    assert cache.block_table(sid) == [] and cache.num_free_blocks == cache.num_blocks


def test_drafts_are_off_by_default_below_float32(tmp_path):
    """bf16 / fp16 steps of several rows round differently from a decode row: drafts would
    change the greedy text there, so they are only on by default for float32 weights."""
    from bsharedrag_fast import Backbone

    hf_model("llama").save_pretrained(tmp_path)
    for dtype, want in ((torch.float32, 4), (torch.bfloat16, 0), (torch.float16, 0)):
        model = Backbone.from_pretrained(tmp_path, dtype=dtype)
        assert SharedRuntime(model, None, max_batch_tokens=64).speculate == want
    assert SharedRuntime(model, None, max_batch_tokens=64, speculate=2).speculate == 2  # asked for


@pytest.mark.parametrize("bad", [-1, True, 1.5, "4"])
def test_speculate_is_checked(case, bad):
    _, model = case
    with pytest.raises(ValueError, match="speculate must be an int >= 0"):
        SharedRuntime(model, None, max_batch_tokens=64, speculate=bad)
