"""SharedRuntime (continuous batching of embeddings + generations) against the standalone paths.

Tiny random Llama / Qwen2 models and a tiny BPE tokenizer are built in tmp dirs; adapters
are random LoRA stacks. Nothing is downloaded.
"""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from bsharedrag_fast import Backbone, Tokenizer, ops  # noqa: E402
from bsharedrag_fast.model.adapters import LoRAStack  # noqa: E402
from bsharedrag_fast.engine.runtime import RequestFailed, SharedRuntime, generate  # noqa: E402
from tiny_models import cu_seqlens, hf_model, write_tokenizer  # noqa: E402

V = 320  # >= the byte-level BPE vocab below
ADAPTERS = {"retrieval": 0, "generation": 1, "other": 2}
TEXTS = ["the quick brown fox", "shared backbone, retrieval and generation", "low rank", "a lazy dog jumps"]
CASES = {"llama": {}, "qwen2": dict(tie_word_embeddings=False)}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path)
    tk = Tokenizer.from_pretrained(path)
    assert tk.vocab_size <= V
    return tk


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request, tmp_path_factory):
    hf = hf_model(request.param, embed_scale=3.0, vocab_size=V, **CASES[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    m = Backbone.from_pretrained(path)
    g = torch.Generator().manual_seed(7)
    L, r = len(ADAPTERS), 4
    stacks = []
    for _ in range(m.config.num_hidden_layers):
        stacks.append({
            mod: LoRAStack(torch.randn(L, r, fin, generator=g) * 0.2, torch.randn(L, fout, r, generator=g) * 0.2,
                           torch.tensor([0.5, 2.0, 1.0]))
            for mod, (fin, fout) in m.module_shapes.items()
        })  # fmt: skip
    m.set_lora_stacks(stacks, L, ADAPTERS)
    return m


def _prompts(lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lens]


def _standalone_embed(model, ids, adapter, mode="last", normalize=True):
    h = model.hidden_states(torch.tensor(ids), cu_seqlens([len(ids)]), [adapter], final_norm=False)
    return ops.pool(h, cu_seqlens([len(ids)]), mode, normalize=normalize, norm_weight=model.norm,
                    eps=model.config.rms_norm_eps)[0].float()


def _standalone_generate(model, prompts, adapter, n, tok=None, **kw):
    return generate(model, tok, prompts, adapters=adapter, max_new_tokens=n, eos_token_id=[], **kw)


# ----------------------------------------------------------------------------- embeddings


def test_embed_matches_standalone(model, tok):
    rt = SharedRuntime(model, tok, max_batch_tokens=64)
    eos = tok.eos_token_id
    for adapter in ("retrieval", "other", None):
        for mode in ("last", "mean"):
            vecs = rt.embed(TEXTS, adapter=adapter, pooling=mode)
            assert vecs.dtype == torch.float32 and vecs.shape == (len(TEXTS), model.config.hidden_size)
            for t, v in zip(TEXTS, vecs):
                ids = tok.encode("query: " + t) + [eos]
                torch.testing.assert_close(v, _standalone_embed(model, ids, adapter, mode), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)
    # passage prefix, no normalisation, token-id input taken as is
    p = rt.embed(TEXTS[:2], adapter="retrieval", prefix="passage: ", normalize=False)
    ids = tok.encode("passage: " + TEXTS[0]) + [eos]
    torch.testing.assert_close(p[0], _standalone_embed(model, ids, "retrieval", normalize=False), atol=1e-5, rtol=1e-5)
    q = rt.embed([ids], adapter="retrieval", normalize=False)
    torch.testing.assert_close(q[0], p[0], atol=1e-5, rtol=1e-5)
    # adapters matter
    assert (rt.embed(TEXTS[:1], adapter="retrieval") - rt.embed(TEXTS[:1], adapter="other")).abs().max() > 1e-3


# ----------------------------------------------------------------------------- generation


def test_greedy_matches_generate(model):
    prompts = _prompts([3, 11, 6, 17])
    rt = SharedRuntime(model, None, max_batch_tokens=64)
    for adapter in ("generation", None):
        ref = _standalone_generate(model, prompts, adapter, 10)
        out = rt.generate(prompts, adapter=adapter, max_new_tokens=10, eos_token_id=[])
        assert [o.token_ids for o in out] == [r.token_ids for r in ref]
        assert all(o.finish_reason == "length" and o.text is None for o in out)
        assert len(set(out[0].token_ids)) > 3


def test_text_generation_stop_eos_and_sampling(model, tok):
    rt = SharedRuntime(model, tok, max_batch_tokens=64)
    prompts = ["the quick brown fox", "low rank adapters"]
    ids = [tok.encode(p) for p in prompts]
    ref = generate(model, tok, ids, adapters="generation", max_new_tokens=12, eos_token_id=[])
    out = rt.generate(prompts, max_new_tokens=12, eos_token_id=[])
    assert [(o.token_ids, o.text) for o in out] == [(r.token_ids, r.text) for r in ref]
    # a stop string taken from the greedy text: same cut as generate()
    text = ref[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2] if len(text) > 4 else None
    assert stop and stop.strip(), text
    r = generate(model, tok, ids[:1], adapters="generation", max_new_tokens=12, stop=stop, eos_token_id=[])[0]
    o = rt.generate(prompts[:1], max_new_tokens=12, stop=stop, eos_token_id=[])[0]
    assert (o.token_ids, o.text, o.finish_reason) == (r.token_ids, r.text, r.finish_reason)
    assert o.finish_reason == "stop"
    # EOS: the 4th greedy token as EOS
    eos = ref[1].token_ids[3]
    r = generate(model, tok, ids[1:], adapters="generation", max_new_tokens=12, eos_token_id=eos)[0]
    o = rt.generate(prompts[1:], max_new_tokens=12, eos_token_id=eos)[0]
    assert o.token_ids == r.token_ids and o.finish_reason == r.finish_reason == "eos"
    # seeded sampling of one prompt == generate() with the same seed (per-request generator)
    kw = dict(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.3, seed=5)
    r = generate(model, None, ids[:1], adapters="generation", max_new_tokens=12, eos_token_id=[], **kw)[0]
    o = rt.generate([ids[0]], max_new_tokens=12, eos_token_id=[], **kw)[0]
    assert o.token_ids == r.token_ids
    # ... and unaffected by a greedy neighbour sharing its steps
    h1 = rt.submit_generate(ids[0], max_new_tokens=12, eos_token_id=[], **kw)
    h2 = rt.submit_generate(ids[1], max_new_tokens=12, eos_token_id=[])
    rt.run_until_done()
    assert h1.result().token_ids == r.token_ids and h2.result().token_ids == out[1].token_ids
    assert rt.generate(prompts[:1], max_new_tokens=0)[0].token_ids == []


# ----------------------------------------------------------------------------- mixed, chunked, admission


def _mixed_workload(rt, tok, prompts):
    """Embeds on two adapters and generations on two adapters, interleaved, via submit/stream."""
    hs = []
    for i, p in enumerate(prompts):
        hs.append(rt.submit_embed(TEXTS[i % len(TEXTS)], adapter="retrieval"))
        hs.append(rt.submit_generate(p, adapter="generation" if i % 2 == 0 else "other", max_new_tokens=8,
                                     eos_token_id=[]))
        hs.append(rt.submit_embed(TEXTS[(i + 1) % len(TEXTS)], adapter="other", prefix="passage: "))
    seen = [h.id for h in rt.stream()]
    assert sorted(seen) == sorted(h.id for h in hs) and all(h.done for h in hs)
    return hs


def test_mixed_workload_equals_separate(model, tok):
    prompts = _prompts([5, 13, 2, 9, 7])
    rt = SharedRuntime(model, tok, max_batch_tokens=48)
    steps = []
    orig = rt._step

    def spy():
        before = dict(rt.stats)
        out = orig()
        steps.append((rt.stats["embed_rows"] - before["embed_rows"],
                      rt.stats["rows"] - before["rows"] - (rt.stats["embed_rows"] - before["embed_rows"])))
        return out

    rt._step = spy
    hs = _mixed_workload(rt, tok, prompts)
    assert any(e > 0 and g > 0 for e, g in steps)  # embeddings and generation shared a step
    gens = [h for h in hs if h.kind == "generate"]
    embs = [h for h in hs if h.kind == "embed"]
    alone = SharedRuntime(model, tok, max_batch_tokens=48)
    ref_g = [alone.generate([p], adapter="generation" if i % 2 == 0 else "other", max_new_tokens=8,
                            eos_token_id=[])[0] for i, p in enumerate(prompts)]
    assert [h.result().token_ids for h in gens] == [r.token_ids for r in ref_g]
    for i in range(len(prompts)):
        q = _standalone_embed(model, tok.encode("query: " + TEXTS[i % 4]) + [tok.eos_token_id], "retrieval")
        d = _standalone_embed(model, tok.encode("passage: " + TEXTS[(i + 1) % 4]) + [tok.eos_token_id], "other")
        torch.testing.assert_close(embs[2 * i].result(), q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(embs[2 * i + 1].result(), d, atol=1e-5, rtol=1e-5)
    # generate() standalone agrees too
    ref = _standalone_generate(model, prompts[0::2], "generation", 8)
    assert [h.result().token_ids for h in gens[0::2]] == [r.token_ids for r in ref]


def test_chunked_prefill_small_batch(model, tok):
    prompts = _prompts([19, 4, 11])
    ref = _standalone_generate(model, prompts, "generation", 8)
    rt = SharedRuntime(model, tok, max_batch_tokens=5)
    out = rt.generate(prompts, max_new_tokens=8, eos_token_id=[])
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    assert rt.stats["steps"] > sum(len(p) for p in prompts) // 5
    # embeddings longer than the step budget: error, or truncation on request
    with pytest.raises(ValueError, match="max_embed_tokens"):
        rt.embed(["shared backbone, retrieval and generation"])
    v = rt.embed(["shared backbone, retrieval and generation"], truncate=True)
    ids = tok.encode("query: shared backbone, retrieval and generation")[:4] + [tok.eos_token_id]
    torch.testing.assert_close(v[0], _standalone_embed(model, ids, "retrieval"), atol=1e-5, rtol=1e-5)


def test_admission_one_sequence_at_a_time(model, tok):
    prompts = _prompts([12, 10, 11, 9])  # 4-5 blocks each, the cache holds 5
    n = 6
    ref = _standalone_generate(model, prompts, "generation", n)
    cfg, bs = model.config, 4
    per_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * bs
    blocks = -(-(max(len(p) for p in prompts) + n - 1) // bs)
    rt = SharedRuntime(model, tok, max_batch_tokens=64, cache_budget_bytes=blocks * per_block, block_size=bs)
    hs = [rt.submit_generate(p, max_new_tokens=n, eos_token_id=[]) for p in prompts]
    es = [rt.submit_embed(t) for t in TEXTS]
    running = []
    while rt.has_pending():
        rt.step()
        running.append(len(rt._running))
    assert max(running) == 1 and rt.cache.num_free_blocks == rt.cache.num_blocks
    assert [h.result().token_ids for h in hs] == [r.token_ids for r in ref]
    torch.testing.assert_close(torch.stack([h.result() for h in es]), SharedRuntime(model, tok).embed(TEXTS),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cache"):  # could never fit: refused at submit time
        rt.submit_generate(prompts[0], max_new_tokens=blocks * bs)


# ----------------------------------------------------------------------------- bad input


def test_bad_input(model, tok):
    rt = SharedRuntime(model, tok, max_batch_tokens=32, max_length=16)
    with pytest.raises(ValueError, match="empty"):
        rt.embed([""])
    with pytest.raises(ValueError, match="empty"):
        rt.embed(["   "])
    with pytest.raises(ValueError, match="empty"):
        rt.generate([[]])
    with pytest.raises(ValueError, match="unknown adapter"):
        rt.submit_embed("x", adapter="nope")
    with pytest.raises(ValueError, match="unknown adapter"):
        rt.submit_generate("x", adapter="nope")
    with pytest.raises(ValueError, match="max_length"):
        rt.generate([list(range(3, 20))])
    with pytest.raises(ValueError, match="pooling"):
        rt.embed(["x"], pooling="max")
    with pytest.raises(ValueError, match="temperature"):
        rt.generate(["x"], temperature=-1.0)
    with pytest.raises(ValueError, match="token ids"):
        rt.embed([[V + 5]])
    assert not rt.has_pending()  # nothing half-submitted
    with pytest.raises(ValueError, match="tokenizer"):
        SharedRuntime(model, None).embed(["text"])


def test_failed_step_fails_its_requests_only(model, tok, monkeypatch):
    rt = SharedRuntime(model, tok, max_batch_tokens=64)
    h1, h2 = rt.submit_generate([5, 6, 7], max_new_tokens=4), rt.submit_embed("the quick brown fox")

    def boom(*a, **k):
        raise RuntimeError("device lost")

    with monkeypatch.context() as m:
        m.setattr(model, "compute", boom)
        with pytest.raises(RuntimeError, match="device lost"):
            rt.step()
    assert h1.done and h2.done and not rt.has_pending()
    assert rt.cache.num_free_blocks == rt.cache.num_blocks
    with pytest.raises(RuntimeError, match="failed"):
        h1.result()
    ref = generate(model, None, [[5, 6, 7]], adapters="generation", max_new_tokens=4, eos_token_id=tok.eos_token_id)
    assert rt.generate([[5, 6, 7]], max_new_tokens=4)[0].token_ids == ref[0].token_ids


def test_a_row_with_non_finite_logits_fails_alone(model, tok):
    """An adapter whose weights turned NaN breaks only its own request: it fails with a clear
    error, its KV blocks are freed, and the other rows of the same steps are unchanged."""
    prompts = _prompts([9, 5, 12])
    ref = _standalone_generate(model, [prompts[0], prompts[2]], "generation", 6)
    stack = model.resident_adapters.layers[-1].stacks["down_proj"]  # (NaN queries would not do: torch's CPU SDPA drops them)
    saved = stack.lora_b[ADAPTERS["other"]].clone()
    stack.lora_b[ADAPTERS["other"]].fill_(float("nan"))
    try:
        rt = SharedRuntime(model, tok, max_batch_tokens=64)
        hs = [rt.submit_generate(p, a, 6, eos_token_id=[])
              for p, a in zip(prompts, ("generation", "other", "generation"))]
        emb = rt.submit_embed("the quick brown fox", adapter="retrieval")
        rt.run_until_done()
    finally:
        stack.lora_b[ADAPTERS["other"]].copy_(saved)
    with pytest.raises(RequestFailed, match="logits are not finite .* adapter 'other'") as err:
        hs[1].result()
    assert err.value.status == 500
    assert [hs[0].result().token_ids, hs[2].result().token_ids] == [r.token_ids for r in ref]
    assert torch.isfinite(emb.result()).all()
    assert rt.cache.num_free_blocks == rt.cache.num_blocks and not rt.has_pending()


def test_sampling_values_are_checked_and_extremes_stay_finite(model, tok):
    rt = SharedRuntime(model, tok, max_batch_tokens=64)
    for kw, what in ((dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
                     (dict(top_p=float("nan")), "top_p"), (dict(top_p=0.0), "top_p"),
                     (dict(repetition_penalty=float("inf")), "repetition_penalty"),
                     (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(top_k=-1), "top_k"),
                     (dict(max_new_tokens=True), "max_new_tokens")):
        with pytest.raises(ValueError, match=what):
            rt.submit_generate([5, 6, 7], **kw)
    assert not rt.has_pending()
    greedy = rt.generate([[5, 6, 7]], max_new_tokens=6, eos_token_id=[])[0].token_ids
    assert rt.generate([[5, 6, 7]], max_new_tokens=6, temperature=1e-40, eos_token_id=[])[0].token_ids == greedy
    out = rt.generate([[5, 6, 7], [8, 9]], max_new_tokens=6, temperature=0.5, repetition_penalty=1e-300, seed=0,
                      eos_token_id=[])
    assert [len(o.token_ids) for o in out] == [6, 6]
    assert rt.cache.num_free_blocks == rt.cache.num_blocks


def test_generation_never_passes_the_models_positions(model, tok):
    positions = model.config.max_position_embeddings
    rt = SharedRuntime(model, tok, max_batch_tokens=256)
    prompt = _prompts([positions - 10])[0]
    with pytest.raises(ValueError, match=f"exceeds the model's {positions} positions; ask for at most 10"):
        rt.submit_generate(prompt, max_new_tokens=11)
    with pytest.raises(ValueError, match="positions"):
        generate(model, None, [prompt], max_new_tokens=11)
    h = rt.submit_generate(prompt, max_new_tokens=500, eos_token_id=[], clip_to_context=True)
    rt.run_until_done()
    assert len(h.result().token_ids) == 10 and h.result().finish_reason == "length"


def test_batch_submission_is_all_or_nothing(model, tok):
    rt = SharedRuntime(model, tok, max_batch_tokens=32)
    with pytest.raises(ValueError, match="empty"):
        rt.embed(["the quick brown fox", ""])
    with pytest.raises(ValueError, match="empty"):
        rt.generate(["the quick brown fox", ""])
    assert not rt.has_pending()
    h = rt.submit_embed("low rank")
    assert not h.wait(0.01)
    rt.run_until_done()
    assert h.wait(0) and h.result().shape == (model.config.hidden_size,)


def test_cancel_frees_cache_and_leaves_others_unchanged(model, tok):
    prompts = _prompts([9, 14, 6])
    n = 8
    ref = _standalone_generate(model, prompts, "generation", n)
    rt = SharedRuntime(model, tok, max_batch_tokens=64)
    hs = [rt.submit_generate(p, max_new_tokens=n, eos_token_id=[]) for p in prompts]
    waiting = rt.submit_embed("the quick brown fox")
    assert rt.cancel(waiting) and waiting.done and waiting.cancelled  # withdrawn before admission
    rt.step()
    rt.step()
    assert rt.num_running == 3 and len(hs[1].tokens) == 2 and hs[1].tokens == ref[1].token_ids[:2]
    used = rt.cache.num_blocks - rt.cache.num_free_blocks
    assert rt.cancel(hs[1])  # running: its blocks go back at once
    assert rt.num_running == 2 and rt.cache.num_blocks - rt.cache.num_free_blocks < used
    assert len(rt.cache.seq_ids) == 2
    rt.run_until_done()
    assert rt.cache.num_free_blocks == rt.cache.num_blocks and rt.num_waiting == 0
    assert [hs[0].result().token_ids, hs[2].result().token_ids] == [ref[0].token_ids, ref[2].token_ids]
    for h in (waiting, hs[1]):
        with pytest.raises(RuntimeError, match="cancelled"):
            h.result()
    assert not rt.cancel(hs[0])  # already finished
    with pytest.raises(ValueError, match="another runtime"):
        SharedRuntime(model, tok).cancel(hs[0])
    with pytest.raises(ValueError, match="embedding request"):
        waiting.tokens


def test_step_costs_learn_interpolate_and_decide():
    from bsharedrag_fast.engine.cost import StepCosts

    c = StepCosts(alpha=0.5)
    assert c.estimate(8) is None and c.mixing_pays(8, 40, 256)  # nothing known: mix (and learn)
    c.observe(8, 0.010)
    c.observe(8, 0.012)  # an EMA: halfway with alpha 0.5
    assert c.estimate(8) == pytest.approx(0.011)
    for rows, sec in ((48, 0.034), (256, 0.122), (192, 0.091)):
        c.observe(rows, sec)
    assert c.estimate(128) == pytest.approx(0.034 + (0.091 - 0.034) * (128 - 48) / (192 - 48))  # between seen buckets
    assert c.estimate(4) is None and c.estimate(4096) is None  # outside what was seen: unknown
    # measured on this CPU (engine/cost.py): 40 rows into a decode step cost more a row than in
    # full steps of their own, 184 rows cost less
    assert not c.mixing_pays(8, 40, 256) and c.mixing_pays(8, 184, 256)
    assert c.mixing_pays(0, 40, 256) and c.mixing_pays(8, 0, 256)
    assert c.bucket(1) == 1 and c.bucket(5) == 6 and c.bucket(11) == 12 and c.bucket(10**9) == c.bucket(10**8)


def test_cost_model_defers_embeddings_that_do_not_pay_and_answers_the_same(model, tok, monkeypatch):
    """With step costs that make mixing a loss, embeddings wait while a generation decodes
    (no step mixes the two) and run in steps of their own; results equal mixing="always"."""
    prompts, docs = _prompts([9]), _prompts([5, 7, 3], seed=4)
    ref = SharedRuntime(model, tok, max_batch_tokens=64, mixing="always")
    want_g = ref.generate(prompts, adapter="generation", max_new_tokens=6, eos_token_id=[])
    want_e = ref.embed(docs, adapter="retrieval")
    rt = SharedRuntime(model, tok, max_batch_tokens=64)
    for rows in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):  # a bandwidth-free machine: rows cost linearly,
        rt.costs.observe(rows, 0.001 * rows if rows > 1 else 0.0001)  # and mixing saves nothing
    monkeypatch.setattr(rt.costs, "observe", lambda rows, seconds: None)  # this machine's timings stay out
    gen = rt.submit_generate(prompts[0], adapter="generation", max_new_tokens=6, eos_token_id=[])
    rt.step()  # the prompt's prefill
    embs = [rt.submit_embed(d, adapter="retrieval") for d in docs]
    mixed_steps = 0
    while rt.has_pending():
        before = dict(rt.stats)
        rt.step()
        mixed_steps += rt.stats["embed_rows"] > before["embed_rows"] and rt.stats["decode_rows"] > before["decode_rows"]
    assert mixed_steps == 0
    assert gen.result().token_ids == want_g[0].token_ids
    assert torch.equal(torch.stack([h.result() for h in embs]), want_e)
    with pytest.raises(ValueError, match="mixing must be"):
        SharedRuntime(model, tok, mixing="sometimes")


def test_deferred_embeddings_join_after_max_defer(model, tok, monkeypatch):
    rt = SharedRuntime(model, tok, max_batch_tokens=64)
    monkeypatch.setattr(rt.costs, "mixing_pays", lambda *a: False)
    monkeypatch.setattr(SharedRuntime, "MAX_EMBED_DEFER", 2)
    gen = rt.submit_generate(_prompts([6])[0], adapter="generation", max_new_tokens=8, eos_token_id=[])
    rt.step()
    emb = rt.submit_embed(_prompts([4], seed=9)[0], adapter="retrieval")
    steps = 0
    while not emb.done:
        rt.step()
        steps += 1
    assert steps == 3 and not gen.done  # deferred twice, then mixed into the third decode step
    rt.run_until_done()
    assert gen.result().finish_reason == "length"


def test_default_kv_budget_is_sized_to_the_model_and_the_free_memory(monkeypatch):
    """Room for 4 full steps or one longest sequence, capped at a quarter of the free memory,
    never below one longest sequence; rounded up to whole blocks."""
    import bsharedrag_fast.engine.runtime as runtime
    from bsharedrag_fast import ModelConfig
    from bsharedrag_fast.engine.kv_cache import kv_bytes_per_token

    cfg = ModelConfig.from_hf(dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   architectures=["LlamaForCausalLM"]))
    per = kv_bytes_per_token(cfg, torch.float32)  # 2 layers x 2 x 2 heads x 8 x 4 bytes = 256
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 1 << 40)
    assert runtime.default_kv_budget(cfg, torch.float32, "cpu", 100, 300, 16) == 400 * per  # 4 steps
    assert runtime.default_kv_budget(cfg, torch.float32, "cpu", 10, 300, 16) == 304 * per  # one sequence, in blocks
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 4 * 350 * per)  # a quarter holds 350 tokens
    assert runtime.default_kv_budget(cfg, torch.float32, "cpu", 100, 300, 16) == 352 * per
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 4 * 10 * per)  # not even one sequence
    assert runtime.default_kv_budget(cfg, torch.float32, "cpu", 100, 300, 16) == 304 * per


def _cache_config():
    """The config of the KV-cache residency tests (only the cache is built from it)."""
    from bsharedrag_fast import ModelConfig

    return ModelConfig.from_hf(dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                    architectures=["LlamaForCausalLM"]))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_is_zero_and_resident_only_as_it_fills(dtype):
    """Every layer's k and v: zeroed, contiguous views of one buffer, whose pages the OS maps
    when written: a 256 MiB budget adds far less than that to the resident memory at start."""
    from bsharedrag_fast.engine.kv_cache import KVCache
    from bsharedrag_fast.util.sysinfo import rss_bytes

    cfg = _cache_config()
    before = rss_bytes()
    cache = KVCache(cfg, 256 << 20, dtype=dtype, block_size=16)
    grown = rss_bytes() - before
    assert cache.nbytes > 250 << 20 and grown < 32 << 20, grown
    for t in cache.k + cache.v:
        assert t.dtype == dtype and t.is_contiguous() and t.shape == cache.k[0].shape
    assert len({t.data_ptr() for t in cache.k + cache.v}) == 2 * cfg.num_hidden_layers
    assert not any(bool(t.any()) for t in (cache.k[0], cache.v[-1]))
    cache.k[1][3].fill_(1.0)  # layers do not alias each other
    assert not cache.k[0].any() and not cache.k[2].any() and not cache.v[1].any()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_an_empty_kv_cache_hands_its_pages_back():
    """release_pages: once no sequence holds a block, the written pages leave the resident
    memory and read as zeros; never while a sequence holds one, nor twice for nothing."""
    from bsharedrag_fast.engine.kv_cache import KVCache
    from bsharedrag_fast.util.sysinfo import rss_bytes

    cfg = _cache_config()
    cache = KVCache(cfg, 128 << 20, block_size=16)
    a, b = cache.allocate(), cache.allocate()
    cache.reserve([(a, 16), (b, 16)])
    for t in cache.k + cache.v:  # every page written, as a long run of generations leaves it
        t.fill_(1.0)
    cache.free(a)
    assert not cache.release_pages() and bool(cache.k[0].all())  # b still holds a block
    cache.free(b)
    before = rss_bytes()
    assert cache.release_pages()
    assert rss_bytes() < before - (96 << 20)
    assert not any(bool(t.any()) for t in cache.k + cache.v)
    assert not cache.release_pages()  # nothing written since
    c = cache.allocate()
    cache.reserve([(c, 3)])
    cache.free(c)
    assert cache.release_pages()


def test_the_engine_empties_the_kv_cache_when_its_last_generation_ends(model):
    rt = SharedRuntime(model, max_batch_tokens=64)
    prompts = _prompts([7, 12])
    first = rt.generate(prompts, max_new_tokens=6, eos_token_id=[])
    assert not any(bool(t.any()) for t in rt.cache.k + rt.cache.v)  # released, not just freed
    h = rt.submit_generate(prompts[0], max_new_tokens=6, eos_token_id=[])
    rt.step()
    assert rt.cache.k[0].any()  # a running generation keeps its pages
    assert h.result().token_ids == first[0].token_ids
    assert rt.generate(prompts, max_new_tokens=6, eos_token_id=[]) == first


def test_large_cpu_steps_hand_freed_heap_back(model, monkeypatch):
    """A CPU step of at least SharedRuntime.TRIM_ROWS rows returns the heap its activations
    freed (util.sysinfo.release_free_heap, glibc's malloc_trim); smaller steps (decode) do not."""
    from bsharedrag_fast.engine import runtime

    calls = []
    monkeypatch.setattr(runtime, "release_free_heap", lambda: calls.append(1))
    monkeypatch.setattr(SharedRuntime, "TRIM_ROWS", 40)
    rt = SharedRuntime(model, max_batch_tokens=64)
    h = rt.submit_generate(_prompts([50])[0], max_new_tokens=3, eos_token_id=[])
    rt.step()  # the 50-row prefill
    assert calls == [1]
    rt.run_until_done()  # decode rows only
    assert calls == [1] and len(h.result().token_ids) == 3
    rt.embed([list(range(1, 31)), list(range(2, 22))])  # 30 + 20 rows in one step
    assert calls == [1, 1]
