"""`bsharedrag demo` end to end with a few steps per stage: every stage runs, the report is
complete, and its figures agree with what the saved models and index give when re-measured."""
import dataclasses
import json

import pytest

from bsharedrag_fast import Backbone, HNSWIndex
from bsharedrag_fast.cli.main import main
from bsharedrag_fast.rag.data import load_beir, read_jsonl
from bsharedrag_fast.demo.pipeline import TINY, TINY_PLANS, run_demo
from bsharedrag_fast.eval.metrics import retrieval_metrics

SMOKE = dataclasses.replace(TINY_PLANS["quick"], general_steps=4, cpt_steps=4, retriever_steps=3, separate_steps=3,
                            generator_steps=3, mine_k=3, eval_questions=4, max_new_tokens=4)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(str(out), quick=True, seed=0, plan=SMOKE, base=TINY)


def test_report_is_complete(demo):
    out, res = demo
    rep = out / "report"
    for name in ("results.json", "report.md", "retrieval_ndcg5.png", "loss_curves.png", "memory.png"):
        assert (rep / name).stat().st_size > 0, name
    saved = json.loads((rep / "results.json").read_text())
    assert saved["retrieval"] == res["retrieval"] and saved["generation"] == res["generation"]
    assert saved["machine"]["cpu_capability"] and saved["machine"]["threads"] >= 1  # the report names its machine
    assert set(res["retrieval"]) == {"BSharedRAG", "w/o hard negatives", "w/o continual pre-training",
                                     "Fully-shared", "base model (no LoRA, no CPT)", "Separate RAG retriever (full copy)"}
    for m in res["retrieval"].values():
        assert all(0.0 <= v <= 1.0 for v in m.values())
    for m in res["generation"].values():
        assert set(m) >= {"exact", "contains", "bleu3", "rougeL"}
    assert set(res["loss_curves"]) >= {"general", "cpt", "retrieval", "generation"}
    assert len(res["loss_curves"]["cpt"]) == SMOKE.cpt_steps
    goals = res["goals"]
    nd = [res["retrieval"][n]["ndcg@5"] for n in ("BSharedRAG", "w/o hard negatives", "w/o continual pre-training",
                                                 "Fully-shared")]
    assert goals["retrieval_order"]["met"] == (nd[0] > nd[1] > nd[2] > nd[3])
    pairs = goals["retrieval_order"]["pairs"]  # each neighbouring pair: the mean difference and its interval
    assert [p["pair"] for p in pairs] == ["BSharedRAG - w/o hard negatives",
                                          "w/o hard negatives - w/o continual pre-training",
                                          "w/o continual pre-training - Fully-shared"]
    for p, a, b in zip(pairs, nd, nd[1:]):
        lo, hi = p["ci95"]
        assert p["difference"] == pytest.approx(a - b) and lo <= p["difference"] <= hi
        assert p["resolved"] == (lo > 0 or hi < 0)
    acc = {n: m["contains"] for n, m in res["generation"].items()}
    best_other = max(v for n, v in acc.items() if n != "BSharedRAG")
    assert goals["answer_accuracy"]["met"] == (acc["BSharedRAG"] >= 0.6 and acc["BSharedRAG"] > best_other)
    assert goals["updates"]["updated"] == sum(u["after_is_new"] for u in res["updates"])
    assert "| BSharedRAG |" in (rep / "report.md").read_text()


def test_figures_match_the_saved_artifacts(demo):
    out, res = demo
    # memory: recomputed from the saved backbones and adapters
    cpt = Backbone.from_pretrained(out / "models" / "cpt")
    cpt.load_adapter(out / "adapters" / "retrieval", "retrieval")
    cpt.load_adapter(out / "adapters" / "generation", "generation")
    sep = Backbone.from_pretrained(out / "adapters" / "separate_retriever")
    rep = cpt.memory_report()
    shared = rep["backbone"] + rep["adapters"]["retrieval"] + rep["adapters"]["generation"]
    separate = sep.memory_report()["backbone"] + rep["backbone"] + rep["adapters"]["generation"]
    assert res["memory"]["shared_bytes"] == shared and res["memory"]["separate_bytes"] == separate

    # retrieval: the BSharedRAG row re-measured by brute force over freshly embedded vectors
    from bsharedrag_fast import SharedRuntime, Tokenizer

    rt = SharedRuntime(cpt, Tokenizer.from_pretrained(out / "models" / "cpt"))
    test = load_beir(str(out / "data"), split="test")
    ids = list(test.corpus)
    docs = rt.embed([f"{test.corpus[d]['title']} {test.corpus[d]['text']}" for d in ids], adapter="retrieval",
                    prefix="passage: ", truncate=True)
    qids = list(test.queries)
    q = rt.embed([test.queries[i] for i in qids], adapter="retrieval", prefix="query: ", truncate=True)
    s, j = (q @ docs.T).topk(10, dim=1)
    run = {qid: {ids[c]: float(v) for v, c in zip(sr.tolist(), jr.tolist())} for qid, sr, jr in zip(qids, s, j)}
    ref = retrieval_metrics(run, test.qrels, ks=(3, 5, 10))
    for k, v in res["retrieval"]["BSharedRAG"].items():
        assert v == pytest.approx(ref[k], abs=1e-6), k

    # the update stream reached the saved index
    idx = HNSWIndex.load(str(out / "index"))
    for u in res["updates"]:
        rec = next(r for r in read_jsonl(str(out / "data" / "updates.jsonl")) if r["doc_id"] == u["doc_id"])
        assert idx.get(u["doc_id"])["text"] == rec["text"]


def test_demo_command_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_saved_index_answers_through_the_cli(demo, capsys):
    out, res = demo
    question = res["samples"][0]["question"]
    assert main(["ask", "--model", str(out / "models" / "cpt"),
                 "--retrieval-adapter", str(out / "adapters" / "retrieval"),
                 "--generation-adapter", str(out / "adapters" / "generation"), "--index", str(out / "index"),
                 "--max-length", str(res["plan"]["passage_max_len"]), "--max-new-tokens", "4",
                 question]) == 0  # the index records the demo's embedder
    rec = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert len(rec["sources"]) == 3 and isinstance(rec["answer"], str)


def test_paired_interval_is_the_bootstrap_interval_of_the_mean_difference():
    import numpy as np

    from bsharedrag_fast.demo.pipeline import _paired_interval

    d = np.random.default_rng(0).normal(0.1, 0.2, 400)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))  # the normal approximation, which n = 400 reaches
    lo, hi = _paired_interval(d.tolist(), seed=0)
    assert lo == pytest.approx(d.mean() - half, abs=0.004) and hi == pytest.approx(d.mean() + half, abs=0.004)
    assert _paired_interval([0.25] * 5, seed=0) == [0.25, 0.25]  # no spread: the difference itself
    lo, hi = _paired_interval([1.0, -1.0] * 20, seed=0)  # as many queries better as worse
    assert lo < 0 < hi
