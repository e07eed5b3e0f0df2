"""The three training loops on tiny models: the loss falls on a learnable task, resume is exact,
outputs load, hard negatives are right, bad data is a ValueError naming it, the CLI runs."""
import json
import re
import shutil

import pytest
import torch

from bsharedrag_fast import Backbone, Tokenizer
from bsharedrag_fast.cli.main import main
from bsharedrag_fast.train import (GeneratorConfig, PretrainConfig, RetrieverConfig, mine_negatives, pretrain,
                                   train_generator, train_retriever)
from bsharedrag_fast.train.generator import PromptBuilder
from bsharedrag_fast.model.backbone import pack
from train_tiny import beir_dir, model_dir, one_thread, qa_rows, write_jsonl  # noqa: F401  (one_thread: autouse)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FAST = dict(save_every=0, warmup_steps=2)
LORA = dict(r=8, alpha=16, dropout=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    texts = [{"text": f"the quick brown fox jumps over the lazy dog {i % 3}"} for i in range(16)]
    other = [{"text": "low rank adapters share one resident model"} for _ in range(16)]
    return {
        "root": root,
        "model": model_dir(root / "model"),
        "beir": beir_dir(root / "beir"),
        "qa": write_jsonl(root / "qa.jsonl", qa_rows()),
        "domain": write_jsonl(root / "domain.jsonl", texts),
        "general": write_jsonl(root / "general.jsonl", other),
    }


def _falls(losses, factor):
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < factor * first, (first, last)


# ----------------------------------------------------------------------------- the loss falls


def test_pretrain_learns_and_saves_loadable_model(tiny, tmp_path):
    out = tmp_path / "pt"
    r = pretrain(PretrainConfig(model=tiny["model"], out=str(out), domain=[tiny["domain"]], general=[tiny["general"]],
                                domain_ratio=0.7, seq_len=24, batch_size=4, steps=40, lr=5e-3, **FAST))
    _falls(r.losses, 0.6)
    assert r.steps == 40 and len(r.losses) == 40 and r.tokens_per_s > 0
    rows = [json.loads(line) for line in open(r.metrics_path)]
    assert [row["step"] for row in rows] == list(range(1, 41)) and rows[0]["tokens"] == 4 * 24
    assert open(r.plot_path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    transformers = pytest.importorskip("transformers")
    ids, cu = pack([[1, 5, 9, 30], [1, 40, 41]])
    ours = Backbone.from_pretrained(str(out))(ids, cu)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        ref = torch.cat([hf(input_ids=ids[s:e][None]).logits[0] for s, e in ((0, 4), (4, 7))])
    assert (ours - ref).abs().max() < 1e-4
    assert Tokenizer.from_pretrained(str(out)).eos_token_id == 2


@pytest.mark.parametrize("data", ["beir", "triples"])
def test_retriever_learns_and_adapter_loads(tiny, tmp_path, data):
    if data == "triples":
        rows = [{"query": f"{i} fox", "positive": {"title": "t", "text": f"doc {i} fox"},
                 "negatives": [f"doc {(i + 1) % 8} fox", f"doc {(i + 2) % 8} dog"]} for i in range(8)]
        src = write_jsonl(tmp_path / "triples.jsonl", rows)
    else:
        src = tiny["beir"]
    out = tmp_path / "ret"
    r = train_retriever(RetrieverConfig(model=tiny["model"], data=src, out=str(out), steps=40, lr=3e-3, batch_size=4,
                                        num_negatives=2, **LORA, **FAST))
    _falls(r.losses, 0.5)
    bb = Backbone.from_pretrained(tiny["model"])
    bb.load_adapter(str(out), "retrieval")
    assert bb.adapters == ["retrieval"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and len(cfg["target_modules"]) == 7


def test_full_finetune_retriever_is_a_separate_model(tiny, tmp_path):
    out = tmp_path / "sep"
    r = train_retriever(RetrieverConfig(model=tiny["model"], data=tiny["beir"], out=str(out), steps=40, lr=3e-3,
                                        batch_size=4, num_negatives=2, full_finetune=True, **FAST))
    _falls(r.losses, 0.5)
    assert not (out / "adapter_config.json").exists()
    tuned, base = Backbone.from_pretrained(str(out)), Backbone.from_pretrained(tiny["model"])
    assert not torch.equal(tuned.layers[0].qkv_weight, base.layers[0].qkv_weight)  # every weight trained
    assert not torch.equal(tuned.embed, base.embed)
    with pytest.raises(ValueError, match="full_finetune trains a whole model"):
        train_retriever(RetrieverConfig(model=tiny["model"], data=tiny["beir"], out=str(tmp_path / "x"),
                                        full_finetune=True, fully_shared=True, gen_data=tiny["qa"], **FAST))


def test_generator_learns_with_general_mix(tiny, tmp_path):
    general = write_jsonl(tmp_path / "inst.jsonl", [{"instruction": "say fox", "output": "fox"},
                                                    {"instruction": "say", "input": "dog", "output": "dog"}])
    r = train_generator(GeneratorConfig(model=tiny["model"], data=tiny["qa"], out=str(tmp_path / "gen"), steps=40,
                                        lr=1e-2, batch_size=4, general=general, general_ratio=0.25,
                                        context_tokens=40, **LORA, **FAST))
    _falls(r.losses, 0.5)
    Backbone.from_pretrained(tiny["model"]).load_adapter(str(tmp_path / "gen"), "generation")


def test_generator_prompt_is_the_rag_prompt_and_loss_is_on_answers(tiny):
    """The training prompt is RAGPipeline's (same template, contexts, budget); labels cover
    exactly the answer tokens and EOS."""
    from types import SimpleNamespace

    from bsharedrag_fast.rag.pipeline import RAGPipeline
    from bsharedrag_fast.train.cpt import causal_labels

    tok = Tokenizer.from_pretrained(tiny["model"])
    opts = GeneratorConfig(model="m", data="d", out="o", context_tokens=12, k=1)
    builder = PromptBuilder(opts, tok, 2, 256)
    rec = qa_rows(1)[0]
    ids, start = builder.rag(rec["question"], [dict(rec["contexts"][0]), {"title": "", "text": "unused"}],
                             rec["answer"], "x")
    rag = RAGPipeline(SimpleNamespace(tokenizer=tok, max_length=256), {"a": rec["contexts"][0]}, k=1,
                      context_tokens=12)
    prompt = tok.encode(rag.prompt(rec["question"], ["a"]))
    assert ids[:start] == prompt
    assert ids[start:] == tok.encode(" " + rec["answer"], add_special_tokens=False) + [2]
    labels = causal_labels([ids], [start])
    assert labels[start - 1 : -1].tolist() == ids[start:] and (labels[: start - 1] == -100).all()


def test_fully_shared_learns_both(tiny, tmp_path):
    r = train_retriever(RetrieverConfig(model=tiny["model"], data=tiny["beir"], out=str(tmp_path / "fs"), steps=40,
                                        lr=5e-3, batch_size=4, num_negatives=1, fully_shared=True,
                                        gen_data=tiny["qa"], gen_batch_size=2, gen_weight=0.5, context_tokens=40,
                                        **LORA, **FAST))
    _falls(r.losses, 0.6)
    Backbone.from_pretrained(tiny["model"]).load_adapter(str(tmp_path / "fs"), "shared")


def test_epochs_set_the_steps(tiny, tmp_path):
    r = train_retriever(RetrieverConfig(model=tiny["model"], data=tiny["beir"], out=str(tmp_path / "e"), epochs=1.0,
                                        batch_size=4, grad_accum=2, num_negatives=1, **LORA, **FAST))
    assert r.steps == 2  # 12 queries / (4 x 2) per step, rounded up


# ----------------------------------------------------------------------------- exact resume


def _stage(name, tiny, out, **kw):
    if name == "pretrain":
        return pretrain(PretrainConfig(model=tiny["model"], out=out, domain=[tiny["domain"]], general=[tiny["general"]],
                                       seq_len=16, batch_size=2, lr=1e-3, warmup_steps=2, **kw))
    if name == "retriever":
        return train_retriever(RetrieverConfig(model=tiny["model"], data=tiny["beir"], out=out, batch_size=4,
                                               num_negatives=2, r=4, alpha=8, dropout=0.1, lr=1e-3, warmup_steps=2,
                                               **kw))
    return train_generator(GeneratorConfig(model=tiny["model"], data=tiny["qa"], out=out, batch_size=2, r=4, alpha=8,
                                           dropout=0.1, lr=1e-3, warmup_steps=2, context_tokens=40, **kw))


@pytest.mark.parametrize("name", ["pretrain", "retriever", "generator"])
def test_resume_is_exact(tiny, tmp_path, name):
    """Stop after step 3 (copy its checkpoint elsewhere) and resume: steps 4-6 give the same
    losses as the uninterrupted run (dropout on: the RNG states are restored too)."""
    full = _stage(name, tiny, str(tmp_path / "full"), steps=6, save_every=3, grad_accum=2,
                  keep_finished_checkpoints=True)
    ckpt = tmp_path / "full" / "checkpoints" / "step-3"
    assert ckpt.is_dir()
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoints" / "step-3")
    resumed = _stage(name, tiny, str(tmp_path / "resumed"), steps=6, save_every=3, grad_accum=2)
    assert resumed.losses == full.losses  # bit for bit
    rows = [json.loads(line)["step"] for line in open(resumed.metrics_path)]
    assert rows == list(range(1, 7))
    weights = "model.safetensors" if name == "pretrain" else "adapter_model.safetensors"
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "full" / weights)), load_file(str(tmp_path / "resumed" / weights))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_resume_starts_over(tiny, tmp_path):
    out = str(tmp_path / "r")
    first = _stage("retriever", tiny, out, steps=4, save_every=2, keep_finished_checkpoints=True)
    again = _stage("retriever", tiny, out, steps=4, save_every=2, resume=False, keep_finished_checkpoints=True)
    assert again.losses == pytest.approx(first.losses, abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step-2"]


def test_a_finished_run_keeps_no_optimizer_state(tiny, tmp_path, capsys):
    _stage("retriever", tiny, str(tmp_path / "r"), steps=4, save_every=2)
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert (tmp_path / "r" / "adapter_model.safetensors").is_file()
    assert "removed" in capsys.readouterr().out


def test_resume_from_another_config_is_an_error(tiny, tmp_path):
    out = str(tmp_path / "r")
    _stage("retriever", tiny, out, steps=4, save_every=2, keep_finished_checkpoints=True)
    with pytest.raises(ValueError, match=r"belongs to another run: alpha=8 there, 4 in this run \(and 4 more: lr, "):
        train_retriever(RetrieverConfig(model=tiny["model"], data=tiny["beir"], out=out, batch_size=4, r=2, alpha=4,
                                        steps=4, save_every=2))
    with pytest.raises(ValueError, match=r"seed=0 there, 1 in this run; use another out or resume=False$"):
        _stage("retriever", tiny, out, steps=4, save_every=2, seed=1)
    # where it is written and how often it saves may change; that resumes
    assert _stage("retriever", tiny, out, steps=4, save_every=1, keep_checkpoints=5).steps == 4


def test_checkpoints_are_safetensors_and_json_and_pickle_is_never_loaded(tiny, tmp_path):
    import pickle

    out = tmp_path / "r"
    _stage("retriever", tiny, str(out), steps=4, save_every=2, keep_finished_checkpoints=True)
    ckpt = out / "checkpoints" / "step-2"
    assert sorted(p.name for p in ckpt.iterdir()) == ["rng-0.json", "rng-0.safetensors", "state.json",
                                                      "state.safetensors"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["lr"] == 1e-3 and len(state["history"]) == 2

    # a checkpoint of the old format is a pickle that runs code when loaded: it is refused unread
    planted = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(planted), "w"))

    old = tmp_path / "old"
    (old / "checkpoints" / "step-2").mkdir(parents=True)
    (old / "checkpoints" / "step-2" / "state.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="old pickle format .* never loaded"):
        _stage("retriever", tiny, str(old), steps=4, save_every=2)
    assert not planted.exists()

    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"step-2/state\.json: not valid JSON"):
        _stage("retriever", tiny, str(out), steps=4, save_every=2)


def test_the_package_unpickles_nothing():
    """No torch.load without weights_only=True, no pickle / np.load(allow_pickle) in the package."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "bsharedrag_fast"
    bad = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{path.name}: {m.group(0)}")
        for pattern in (r"\bpickle\.loads?\(", r"\bcloudpickle\b", r"allow_pickle\s*=\s*True", r"\bdill\b",
                        r"\bjoblib\.load\("):
            bad += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not bad, bad


# ----------------------------------------------------------------------------- mining


def test_mine_negatives_is_brute_force_top_k_minus_positives(tiny, tmp_path):
    path = mine_negatives(tiny["model"], None, tiny["beir"], str(tmp_path / "neg.jsonl"), k=4, batch_size=5)
    mined = {r["qid"]: r["negatives"] for r in map(json.loads, open(path))}
    from bsharedrag_fast.rag.data import load_beir
    from bsharedrag_fast.engine.runtime import SharedRuntime

    beir = load_beir(tiny["beir"], "train")
    rt = SharedRuntime(Backbone.from_pretrained(tiny["model"]), Tokenizer.from_pretrained(tiny["model"]))
    ids = list(beir.corpus)
    docs = rt.embed([f"{beir.corpus[d]['title']} {beir.corpus[d]['text']}" for d in ids], adapter=None,
                    prefix="passage: ")
    assert set(mined) == set(beir.qrels)
    for qid, negs in mined.items():
        scores = docs @ rt.embed([beir.queries[qid]], adapter=None)[0]
        ranked = [ids[i] for i in scores.argsort(descending=True).tolist() if ids[i] not in beir.qrels[qid]]
        assert negs == ranked[:4], qid
    r = train_retriever(RetrieverConfig(model=tiny["model"], data=tiny["beir"], negatives=path, out=str(tmp_path / "o"),
                                        steps=2, batch_size=4, num_negatives=3, **LORA, **FAST))
    assert r.steps == 2


def test_retriever_saves_how_it_embeds_and_the_tools_follow_it(tiny, tmp_path, capsys):
    """pooling and prefixes are saved beside the adapter; mining and `index` embed that way
    unless told otherwise; a bad format file is a one-line error naming it."""
    from bsharedrag_fast.rag.data import load_beir
    from bsharedrag_fast.index.hnsw import HNSWIndex
    from bsharedrag_fast.rag.pipeline import embedding_settings
    from bsharedrag_fast.engine.runtime import SharedRuntime

    out = tmp_path / "ret"
    train_retriever(RetrieverConfig(model=tiny["model"], data=tiny["beir"], out=str(out), steps=2, batch_size=4,
                                    num_negatives=1, pooling="mean", query_prefix="q: ", passage_prefix="p: ",
                                    **LORA, **FAST))
    fmt = {"pooling": "mean", "query_prefix": "q: ", "passage_prefix": "p: "}
    assert json.loads((out / "embedding.json").read_text()) == fmt
    assert embedding_settings(str(out), pooling="last") == dict(fmt, pooling="last")  # a given value wins
    assert embedding_settings(None) == {"pooling": "last", "query_prefix": "query: ", "passage_prefix": "passage: "}

    path = mine_negatives(tiny["model"], str(out), tiny["beir"], str(tmp_path / "neg.jsonl"), k=3)
    beir = load_beir(tiny["beir"], "train")
    bb = Backbone.from_pretrained(tiny["model"])
    bb.load_adapter(str(out), "retrieval")
    rt = SharedRuntime(bb, Tokenizer.from_pretrained(tiny["model"]))
    ids = list(beir.corpus)
    docs = rt.embed([f"{beir.corpus[d]['title']} {beir.corpus[d]['text']}" for d in ids], pooling="mean", prefix="p: ")
    for rec in map(json.loads, open(path)):
        q = rt.embed([beir.queries[rec["qid"]]], pooling="mean", prefix="q: ")[0]
        ranked = [ids[i] for i in (docs @ q).argsort(descending=True).tolist() if ids[i] not in beir.qrels[rec["qid"]]]
        assert rec["negatives"] == ranked[:3]

    index = tmp_path / "index"
    assert main(["index", "--model", tiny["model"], "--retrieval-adapter", str(out), "--corpus",
                 f"{tiny['beir']}/corpus.jsonl", "--out", str(index)]) == 0
    stored = HNSWIndex.load(str(index)).embedder
    assert (stored["pooling"], stored["query_prefix"], stored["passage_prefix"]) == ("mean", "q: ", "p: ")

    (out / "embedding.json").write_text('{"pooling": "max", "query_prefix": "", "passage_prefix": ""}')
    capsys.readouterr()  # what the runs before printed
    assert main(["index", "--model", tiny["model"], "--retrieval-adapter", str(out), "--corpus",
                 f"{tiny['beir']}/corpus.jsonl", "--out", str(tmp_path / "index2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bsharedrag index: error: ") and "embedding.json" in err and "\n" not in err
    assert '"pooling" must be one of' in err


# ----------------------------------------------------------------------------- bad data and options


@pytest.mark.parametrize("row, match", [
    ({"positive": "p"}, '"query" must be a non-empty string'),
    ({"query": "q"}, 'missing "positive"'),
    ({"query": "q", "positives": []}, '"positives" is empty'),
    ({"query": "q", "positive": {"title": "t"}}, "a passage must be"),
    ({"query": "q", "positive": "p", "negatives": "n"}, '"negatives" must be a list'),
])  # fmt: skip
def test_bad_triples(tiny, tmp_path, row, match):
    src = write_jsonl(tmp_path / "t.jsonl", [{"query": "ok", "positive": "fine"}, row])
    with pytest.raises(ValueError, match=match) as e:
        train_retriever(RetrieverConfig(model=tiny["model"], data=src, out=str(tmp_path / "o"), steps=1, **FAST))
    assert "t.jsonl:2" in str(e.value)


def test_beir_query_without_positive(tiny, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(tiny["beir"], d)
    with open(d / "qrels" / "train.tsv", "a") as f:
        f.write("q1\td2\t0\nq3\td3\t0\n")
    (d / "qrels" / "train.tsv").write_text((d / "qrels" / "train.tsv").read_text().replace("q3\td3\t1\n", ""))
    with pytest.raises(ValueError, match="query 'q3' has no positive"):
        train_retriever(RetrieverConfig(model=tiny["model"], data=str(d), out=str(tmp_path / "o"), steps=1, **FAST))


def test_bad_mined_negatives(tiny, tmp_path):
    neg = write_jsonl(tmp_path / "n.jsonl", [{"qid": "q0", "negatives": ["nope"]}])
    with pytest.raises(ValueError, match="unknown document ids"):
        train_retriever(RetrieverConfig(model=tiny["model"], data=tiny["beir"], negatives=neg,
                                        out=str(tmp_path / "o"), steps=1, **FAST))


@pytest.mark.parametrize("row, match", [
    ({"answer": "a", "contexts": []}, '"question" must be a non-empty string'),
    ({"question": "q", "contexts": []}, '"answer" must be a non-empty string'),
    ({"question": "q", "answer": "a"}, 'needs "contexts" or "doc_ids"'),
    ({"question": "q", "answer": "a", "doc_ids": ["d0"]}, '"doc_ids" needs a corpus'),
    ({"question": "q", "answer": "fox " * 40, "contexts": []}, "more than max_answer_tokens=16"),
    ({"question": "q", "answer": "a", "contexts": [{"title": "t"}]}, "each context must be"),
])  # fmt: skip
def test_bad_qa(tiny, tmp_path, row, match):
    src = write_jsonl(tmp_path / "qa.jsonl", [qa_rows(1)[0], row])
    with pytest.raises(ValueError, match=match) as e:
        train_generator(GeneratorConfig(model=tiny["model"], data=src, out=str(tmp_path / "o"), steps=1,
                                        max_answer_tokens=16, **FAST))
    assert "qa.jsonl:2" in str(e.value)


def test_every_over_long_answer_is_listed(tiny, tmp_path):
    rows = [qa_rows(1)[0]] + [{"question": "q", "answer": "fox " * n, "contexts": []} for n in (30, 40, 50)]
    src = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(ValueError, match="3 answers have more than max_answer_tokens=16") as e:
        train_generator(GeneratorConfig(model=tiny["model"], data=src, out=str(tmp_path / "o"), steps=1,
                                        max_answer_tokens=16, **FAST))
    msg = str(e.value)
    assert all(f"qa.jsonl:{n} (" in msg for n in (2, 3, 4)) and "\n" not in msg
    counts = [int(c) for c in re.findall(r"\((\d+)\)", msg)]
    assert len(counts) == 3 and counts == sorted(counts) and min(counts) > 16
    assert msg.endswith(f"--max-answer-tokens {max(counts)}")


def test_qa_doc_ids_and_unknown_ids(tiny, tmp_path):
    corpus = tiny["beir"] + "/corpus.jsonl"
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "answer": "fox", "doc_ids": ["d0", "d1"]}])
    r = train_generator(GeneratorConfig(model=tiny["model"], data=ok, corpus=corpus, out=str(tmp_path / "o"),
                                        steps=1, **FAST))
    assert r.steps == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "fox", "doc_ids": ["zz"]}])
    with pytest.raises(ValueError, match=r"unknown doc_ids \['zz'\]"):
        train_generator(GeneratorConfig(model=tiny["model"], data=bad, corpus=corpus, out=str(tmp_path / "o2"),
                                        steps=1, **FAST))


def test_prompt_too_long_for_max_length(tiny, tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "fox " * 60, "answer": "a", "contexts": ["x"]}])
    with pytest.raises(ValueError, match="question too long"):
        train_generator(GeneratorConfig(model=tiny["model"], data=src, out=str(tmp_path / "o"), steps=1,
                                        max_length=64, **FAST))


@pytest.mark.parametrize("kind, ratio", [("domain", 1.0), ("general", 0.0)])
def test_pretrain_infers_the_ratio_from_the_corpora_given(tiny, tmp_path, kind, ratio):
    cfg = PretrainConfig(model=tiny["model"], out=str(tmp_path / "o"), steps=1, **{kind: [tiny[kind]]}, **FAST)
    pretrain(cfg)
    assert cfg.domain_ratio == ratio


def test_bad_pretrain_text(tiny, tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine"}, {"body": "no text field"}])
    with pytest.raises(ValueError, match=r't.jsonl:2: "text" must be a non-empty string'):
        pretrain(PretrainConfig(model=tiny["model"], out=str(tmp_path / "o"), domain=[src], domain_ratio=1.0,
                                steps=1, **FAST))


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "steps must be >= 1"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(grad_accum=0), "grad_accum must be >= 1"),
    (dict(domain_ratio=1.5), r"domain_ratio must be in \[0, 1\]"),
    (dict(general=[], domain_ratio=0.5), "draws from the general corpora"),
    (dict(seq_len=1), "seq_len must be >= 2"),
    (dict(keep_checkpoints=0), "keep_checkpoints must be >= 1"),
    (dict(device="cuda:0" if not torch.cuda.is_available() else "nope"), "cuda|device"),
])  # fmt: skip
def test_bad_pretrain_options(tiny, tmp_path, kw, match):
    base = dict(model=tiny["model"], out=str(tmp_path / "o"), domain=[tiny["domain"]], general=[tiny["general"]])
    with pytest.raises((ValueError, RuntimeError), match=match):
        pretrain(PretrainConfig(**dict(base, **kw)))


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(num_negatives=-1), "num_negatives must be >= 0"),
    (dict(fully_shared=True), "fully_shared needs gen_data"),
    (dict(r=0), "LoRA r must be"),
    (dict(target_modules=["lm_head"]), "target modules"),
    (dict(batch_size=3, steps=1), None),  # fine on one process
])  # fmt: skip
def test_bad_retriever_options(tiny, tmp_path, kw, match):
    cfg = RetrieverConfig(**dict(dict(model=tiny["model"], data=tiny["beir"], out=str(tmp_path / "o"), **FAST), **kw))
    if match is None:
        assert train_retriever(cfg).steps == 1
        return
    with pytest.raises(ValueError, match=match):
        train_retriever(cfg)


# ----------------------------------------------------------------------------- command line


def test_cli_train_and_mine(tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", "retriever", "--model", tiny["model"], "--data", tiny["beir"], "--out", str(out),
               "--steps", "2", "--batch-size", "4", "--num-negatives", "1", "--r", "4", "--alpha", "8",
               "--target-modules", "q_proj", "v_proj", "--save-every", "0", "--fully-shared", "--gen-data", tiny["qa"],
               "--gen-batch-size", "2", "--context-tokens", "40"])
    assert rc == 0 and "2 steps" in capsys.readouterr().out
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["fully_shared"] is True and saved["r"] == 4
    rc = main(["mine-negatives", "--model", tiny["model"], "--adapter", str(out), "--data", tiny["beir"],
               "--out", str(tmp_path / "n.jsonl"), "--k", "2"])
    assert rc == 0 and len(open(tmp_path / "n.jsonl").readlines()) == 12


def test_cli_bad_data_is_a_clean_error(tiny, tmp_path, capsys):
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q"}])
    rc = main(["train", "generator", "--model", tiny["model"], "--data", src, "--out", str(tmp_path / "o")])
    assert rc == 2 and '"answer" must be a non-empty string' in capsys.readouterr().err


def test_cli_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "generator", "--help"])
    text = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(GeneratorConfig):
        assert "--" + f.name.replace("_", "-") in text
