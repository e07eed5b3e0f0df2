"""Evaluation metrics against pytrec_eval, sacrebleu, rouge-score and brute force; `bsharedrag eval` end to end."""
import itertools
import json
import random

import pytest

from bsharedrag_fast.eval.metrics import (corpus_bleu, format_table, generation_metrics, normalize_answer, parse_ks,
                                          per_query_metrics, retrieval_metrics, rouge_l, rouge_tokens, write_trec_run)

KS = (1, 3, 5, 10, 50)


def _random_case(seed: int, n_queries: int = 25, n_docs: int = 40):
    """Graded qrels and a run whose integer scores tie often (doc ids like d1, d10, d2 test the tie order)."""
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(n_docs)]
    qrels = {f"q{i}": {d: rng.choice([0, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 8))}
             for i in range(n_queries)}
    qrels["q0"] = {"d3": 0, "d4": 0}  # judged, nothing relevant
    run = {q: {d: float(rng.randint(0, 5)) for d in rng.sample(docs, rng.randint(0, 20))} for q in qrels}
    run["q1"] = {}  # retrieved nothing
    run["extra"] = {"d1": 1.0}  # not judged: ignored
    return run, qrels


def _pytrec(run, qrels, ks=KS):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    cut = ",".join(map(str, ks))
    ev = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{cut}", f"recall.{cut}", f"success.{cut}", "recip_rank"})
    return ev.evaluate(run)


def _expected(ref: dict, ks=KS) -> dict:
    """Our metric names from pytrec_eval's per-query measures; MRR@k is recip_rank cut at rank k."""
    out = {}
    for k in ks:
        out[f"ndcg@{k}"] = ref[f"ndcg_cut_{k}"]
        out[f"hit@{k}"] = ref[f"success_{k}"]
        out[f"recall@{k}"] = ref[f"recall_{k}"]
        rr = ref["recip_rank"]
        out[f"mrr@{k}"] = rr if rr > 0 and round(1 / rr) <= k else 0.0
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_metrics_match_pytrec_eval(seed):
    run, qrels = _random_case(seed)
    ref = _pytrec(run, qrels)
    ours = per_query_metrics(run, qrels, KS)
    assert set(ours) == set(qrels) == set(ref)
    for qid in qrels:
        assert ours[qid] == pytest.approx(_expected(ref[qid]), abs=1e-12), qid
    mean = retrieval_metrics(run, qrels, KS)
    for name, value in mean.items():
        assert value == pytest.approx(sum(_expected(ref[q])[name] for q in qrels) / len(qrels), abs=1e-12)
    assert list(mean)[:2] == ["ndcg@1", "ndcg@3"] and len(mean) == 4 * len(KS)


def test_ties_follow_trec_eval_doc_id_descending():
    qrels = {"q": {"a": 1}}
    run = {"q": {"a": 0.5, "b": 0.5, "c": 0.1}}  # a and b tie: trec_eval ranks b first
    m = retrieval_metrics(run, qrels, (1, 2))
    assert m["mrr@1"] == 0.0 and m["mrr@2"] == 0.5 and m["hit@1"] == 0.0
    expected = _expected(_pytrec(run, qrels, (1, 2))["q"], (1, 2))
    assert per_query_metrics(run, qrels, (1, 2))["q"] == pytest.approx(expected)


def test_edge_cases():
    qrels = {"q1": {"a": 2, "b": 1}, "q2": {"x": 0}}
    # k larger than the run; q2 has no relevant document; nDCG by hand: (2/1 + 1/log2(3)) ideal vs run order b, a
    run = {"q1": {"a": 1.0, "b": 2.0}, "q2": {"x": 3.0}}
    m = per_query_metrics(run, qrels, (10,))
    idcg = 2 + 1 / 1.5849625007211562
    assert m["q1"] == pytest.approx({"ndcg@10": (1 + 2 / 1.5849625007211562) / idcg, "hit@10": 1.0,
                                     "recall@10": 1.0, "mrr@10": 1.0})
    assert set(m["q2"].values()) == {0.0}
    assert retrieval_metrics(run, qrels, (10,))["hit@10"] == 0.5  # q2 counts, as 0
    # an empty run, or queries missing from it, score 0
    assert set(retrieval_metrics({}, qrels, (1, 5)).values()) == {0.0}
    assert set(retrieval_metrics({"q1": {}}, qrels, (1, 5)).values()) == {0.0}
    assert retrieval_metrics({"q1": {"a": 1.0}}, qrels, 1) == {"ndcg@1": 0.5, "hit@1": 0.5, "recall@1": 0.25,
                                                               "mrr@1": 0.5}


def test_trec_run_file_round_trips_through_pytrec_eval(tmp_path):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    run, qrels = _random_case(5)
    run["q2"] = {"d1": 0.1 + 0.2, "d2": 1e-17, "d3": -2.5}  # scores must survive the text format exactly
    path = tmp_path / "run.trec"
    write_trec_run(run, str(path), tag="mytag")
    lines = [ln.split() for ln in path.read_text().splitlines()]
    assert all(len(ln) == 6 and ln[1] == "Q0" and ln[5] == "mytag" for ln in lines)
    q2 = [ln for ln in lines if ln[0] == "q2"]
    assert [(ln[2], ln[3]) for ln in q2] == [("d1", "1"), ("d2", "2"), ("d3", "3")]
    with open(path) as f:
        parsed = pytrec_eval.parse_run(f)
    assert parsed == {q: s for q, s in run.items() if s}  # trec_eval files cannot hold an empty query
    assert retrieval_metrics(parsed, qrels, KS) == retrieval_metrics(run, qrels, KS)


@pytest.mark.parametrize("run,msg", [
    ([("q", "d")], "run must be a dict"),
    ({"q": ["d"]}, r"run\['q'\] must be a dict"),
    ({"q": {"d": float("nan")}}, r"run\['q'\]\['d'\]: score must be a finite number"),
    ({"q": {"d": "1.0"}}, "score must be a finite number, got '1.0'"),
    ({"q": {7: 1.0}}, r"run\['q'\]: query and document ids must be strings"),
    ({1: {"d": 1.0}}, r"run\[1\]: query and document ids must be strings"),
])
def test_bad_runs(run, msg):
    with pytest.raises(ValueError, match=msg):
        retrieval_metrics(run, {"q": {"d": 1}})


@pytest.mark.parametrize("ks,msg", [("3,x", "comma-separated integers"), (0, "integers >= 1"), ([], "integers >= 1"),
                                    ([3, True], "integers >= 1")])
def test_bad_cutoffs(ks, msg):
    with pytest.raises(ValueError, match=msg):
        retrieval_metrics({}, {"q": {"d": 1}}, ks)


def test_parse_ks_and_empty_qrels():
    assert parse_ks("10, 3,5,3") == (3, 5, 10)
    with pytest.raises(ValueError, match="qrels are empty"):
        retrieval_metrics({}, {})


@pytest.mark.parametrize("run,tag,msg", [
    ({"q": {"d": 1.0}}, "two words", "run tag 'two words'"),
    ({"q": {"d 1": 1.0}}, "t", "doc id 'd 1'"),
    ({"": {"d": 1.0}}, "t", "query id ''"),
])
def test_trec_run_bad_ids(tmp_path, run, tag, msg):
    with pytest.raises(ValueError, match=msg):
        write_trec_run(run, str(tmp_path / "r.trec"), tag)
    assert not (tmp_path / "r.trec").exists()


# ----------------------------------------------------------------------------- generation

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "fast", "a", "big", "red", "ball", "3.5", "U.S.",
         "it's", "well-known", "(note)", "yes,", "no!", "&amp;", "e-mail"]
HANZI = list("我爱北京天安门今天气很好们去公园吧不错这是一个问题答案")


def _sentences(rng, vocab, n, lo=1, hi=12, sep=" "):
    return [sep.join(rng.choice(vocab) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_bleu3_matches_sacrebleu(seed):
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = random.Random(seed)
    refs = _sentences(rng, WORDS, 30)
    # seed 3: short predictions (brevity penalty, orders with few or no matches: exp smoothing)
    preds = _sentences(rng, WORDS, 30, 1, 3 if seed == 3 else 12)
    preds[0] = refs[0]
    expected = sacrebleu.BLEU(max_ngram_order=3).corpus_score(preds, [refs]).score
    assert corpus_bleu(preds, refs) * 100 == pytest.approx(expected, abs=1e-9)
    assert generation_metrics(preds, refs)["bleu3"] * 100 == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("preds,refs", [
    (["x y z"], ["a b c"]),              # no match at all
    (["a b"], ["a b c d"]),              # no trigram in the output: sacrebleu scores 0
    (["a x b y c"], ["a b c"]),          # unigrams match, bigrams and trigrams do not (smoothing)
    (["我爱北京天安门", "今天天气很好，我们去公园。", "ok 3.5 美元"], ["我爱北京", "今天天气不错，我们去公园吧。", "OK 3.5美元"]),
])
def test_bleu3_corner_cases_match_sacrebleu(preds, refs):
    sacrebleu = pytest.importorskip("sacrebleu")
    tokenize = "zh" if any("\u4e00" <= c <= "\u9fff" for r in refs for c in r) else "13a"
    expected = sacrebleu.BLEU(max_ngram_order=3, tokenize=tokenize).corpus_score(preds, [refs]).score
    assert corpus_bleu(preds, refs) * 100 == pytest.approx(expected, abs=1e-9)


def test_bleu3_chinese_matches_sacrebleu_zh():
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = random.Random(7)
    refs = _sentences(rng, HANZI + ["，", "。", "iPhone", "15"], 20, 2, 15, sep="")
    preds = _sentences(rng, HANZI + ["，", "。", "iPhone", "15"], 20, 2, 15, sep="")
    expected = sacrebleu.BLEU(max_ngram_order=3, tokenize="zh").corpus_score(preds, [refs]).score
    assert corpus_bleu(preds, refs) * 100 == pytest.approx(expected, abs=1e-9)


def test_rouge_l_matches_rouge_score_on_words():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rng = random.Random(3)
    refs = _sentences(rng, WORDS + ["The", "CAT"], 40, 0, 15)
    preds = _sentences(rng, WORDS + ["The", "CAT"], 40, 0, 15)
    expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    assert [rouge_l(p, r) for p, r in zip(preds, refs)] == pytest.approx(expected, abs=1e-12)
    assert generation_metrics(preds, ["x" + r for r in refs])["rougeL"] == pytest.approx(
        sum(scorer.score("x" + r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(refs), abs=1e-12)


def _brute_force_lcs(a: str, b: str) -> int:
    """Longest subsequence of a (by trying every subset, longest first) that is also one of b."""
    def is_subsequence(s, t):
        it = iter(t)
        return all(c in it for c in s)
    for n in range(len(a), 0, -1):
        if any(is_subsequence(sub, b) for sub in itertools.combinations(a, n)):
            return n
    return 0


def test_rouge_l_is_character_level_for_cjk():
    rng = random.Random(11)
    for _ in range(30):
        a = "".join(rng.choice(HANZI[:8]) for _ in range(rng.randint(1, 8)))
        b = "".join(rng.choice(HANZI[:8]) for _ in range(rng.randint(1, 8)))
        lcs = _brute_force_lcs(a, b)
        f1 = 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))
        assert rouge_l(a, b) == pytest.approx(f1, abs=1e-12), (a, b)
    # punctuation is not a token; mixed text keeps words whole and splits the CJK characters
    assert rouge_tokens("iPhone 15 很好！") == ["iphone", "15", "很", "好"]


def test_exact_and_contains():
    assert normalize_answer("  The Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("北京。") == "北京"
    preds = ["The Eiffel Tower.", "It is the Eiffel Tower, in Paris.", "concatenate", "我住在北京。", "Paris"]
    refs = ["eiffel tower", "Eiffel tower", "cat", "北京", "London"]
    m = generation_metrics(preds, refs)
    assert m["exact"] == pytest.approx(1 / 5) and m["contains"] == pytest.approx(3 / 5)
    # a reference with nothing left after normalisation is only matched by an equally empty answer
    assert generation_metrics(["The.", "an apple", "A"], ["the", "A", "a"])["contains"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("preds,refs,msg", [
    (["a"], ["a", "b"], "1 predictions but 2 references"),
    ([], [], "no predictions"),
    ([None], ["a"], "prediction 0 must be a string"),
    (["a", "b"], ["a", " \n"], "reference 1 is empty"),
])
def test_generation_bad_input(preds, refs, msg):
    with pytest.raises(ValueError, match=msg):
        generation_metrics(preds, refs)


def test_corpus_bleu_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        corpus_bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="max_order must be an int >= 1"):
        corpus_bleu(["a"], ["a"], 0)


def test_format_table():
    table = format_table({"ndcg@3": 0.5, "ndcg@10": 0.25, "hit@3": 1.0, "hit@10": 1.0})
    assert table.splitlines()[0].split() == ["@3", "@10"]
    assert table.splitlines()[1].split() == ["ndcg", "0.5000", "0.2500"]
    assert format_table({"bleu3": 0.125}).splitlines()[1].split() == ["bleu3", "0.1250"]


# ----------------------------------------------------------------------------- command line, end to end

DOCS = {f"d{i}": {"title": f"item {i}", "text": t} for i, t in enumerate([
    "the quick brown fox jumps over the lazy dog", "shared backbone, retrieval and generation",
    "low rank adapters share one resident model", "the lazy dog sleeps", "a brown fox runs",
    "retrieval adapters embed passages", "generation adapters answer questions", "one model, two adapters",
    "query and passage prefixes", "the fox and the dog share one model",
])}  # fmt: skip
QUERIES = {"q1": "what does the fox do?", "q2": "which model?", "q3": "lazy dog", "q4": "adapters", "q5": "unjudged"}
QRELS = {"q1": {"d0": 2, "d4": 1}, "q2": {"d2": 1, "d7": 2, "d9": 1}, "q3": {"d3": 1, "d0": 0},
         "q4": {"d5": 1, "d6": 1}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("peft")
    pytest.importorskip("hnswlib")
    from tiny_models import rag_checkpoint

    root = tmp_path_factory.mktemp("eval")
    rag_checkpoint(root, adapters=(("retrieval", 1, 4), ("generation", 2, 4)))
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, **v}) + "\n" for d, v in DOCS.items()))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items()))
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{r}\n" for q, j in QRELS.items() for d, r in j.items()))
    return root


def _brute_force_run(root) -> dict:
    """Exact inner-product search over every document, embedded with the same runtime settings."""
    from bsharedrag_fast import Backbone, Tokenizer
    from bsharedrag_fast.engine.runtime import SharedRuntime

    model = Backbone.from_pretrained(root / "model")
    model.load_adapter(str(root / "retrieval"), "retrieval")
    rt = SharedRuntime(model, Tokenizer.from_pretrained(root / "model"))
    docs = rt.embed([f"{d['title']} {d['text']}" for d in DOCS.values()], adapter="retrieval", prefix="passage: ")
    qs = rt.embed([QUERIES[q] for q in QRELS], adapter="retrieval", prefix="query: ")
    scores = (qs.double() @ docs.double().T).tolist()
    return {q: dict(zip(DOCS, row)) for q, row in zip(QRELS, scores)}


def test_cli_eval_retrieval_matches_brute_force(tiny, tmp_path, capsys):
    from bsharedrag_fast.cli.main import main

    base = ["--model", str(tiny / "model")]
    ks = (1, 3, 5)
    expected = {}
    for qid, ref in _pytrec(_brute_force_run(tiny), QRELS, ks).items():
        for name, v in _expected(ref, ks).items():
            expected[name] = expected.get(name, 0.0) + v / len(QRELS)
    # the corpus indexed on the fly, then an index built by `bsharedrag index`: the same metrics
    assert main(["eval", "retrieval", *base, "--adapter", str(tiny / "retrieval"), "--data", str(tiny / "beir"),
                 "--k", "5,1,3", "--run-file", str(tmp_path / "run.trec"), "--out", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "ndcg" in printed and "@5" in printed
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["metrics"] == pytest.approx(expected, abs=1e-6)
    assert report["queries"] == len(QRELS) and report["documents"] == len(DOCS)
    run_lines = (tmp_path / "run.trec").read_text().splitlines()
    assert len(run_lines) == 5 * len(QRELS) and run_lines[0].startswith("q1 Q0 ")

    assert main(["index", *base, "--retrieval-adapter", str(tiny / "retrieval"),
                 "--corpus", str(tiny / "beir" / "corpus.jsonl"), "--out", str(tmp_path / "idx")]) == 0
    assert main(["eval", "retrieval", *base, "--adapter", str(tiny / "retrieval"), "--data", str(tiny / "beir"),
                 "--index", str(tmp_path / "idx"), "--k", "1,3,5", "--out", str(tmp_path / "m2.json")]) == 0
    assert json.loads((tmp_path / "m2.json").read_text())["metrics"] == pytest.approx(expected, abs=1e-6)


def test_cli_eval_retrieval_errors(tiny, tmp_path, capsys):
    from bsharedrag_fast.cli.main import main

    base = ["eval", "retrieval", "--model", str(tiny / "model"), "--data", str(tiny / "beir")]
    assert main([*base, "--split", "dev"]) == 2
    assert "qrels file not found" in capsys.readouterr().err
    assert main([*base, "--k", "3,zero"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main([*base, "--k", "5", "--depth", "2"]) == 2
    assert "depth must be an int >= the largest k (5)" in capsys.readouterr().err
    assert main([*base, "--run-file", str(tmp_path / "r.trec"), "--run-tag", "a b"]) == 2
    assert "run tag 'a b'" in capsys.readouterr().err
    # an index embedded with another adapter is refused
    assert main(["index", "--model", str(tiny / "model"), "--corpus", str(tiny / "beir" / "corpus.jsonl"),
                 "--out", str(tmp_path / "base_idx")]) == 0
    capsys.readouterr()
    assert main([*base, "--adapter", str(tiny / "retrieval"), "--index", str(tmp_path / "base_idx")]) == 2
    assert "adapter" in capsys.readouterr().err


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_cli_eval_generation_from_files(tmp_path, capsys):
    from bsharedrag_fast.cli.main import main

    preds = ["The Eiffel Tower.", "a quick brown fox", "我住在北京。"]
    refs = ["eiffel tower", "the quick brown fox jumps", "北京"]
    expected = generation_metrics(preds, refs)
    one = _write_jsonl(tmp_path / "one.jsonl", [{"id": i, "prediction": p, "answer": r}
                                                for i, (p, r) in enumerate(zip(preds, refs))])
    assert main(["eval", "generation", "--predictions", one, "--out", str(tmp_path / "g.json")]) == 0
    assert "bleu3" in capsys.readouterr().out
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["metrics"] == pytest.approx(expected) and report["examples"] == 3

    p = _write_jsonl(tmp_path / "p.jsonl", [{"id": i, "text": x} for i, x in enumerate(preds)])
    r = _write_jsonl(tmp_path / "r.jsonl", [{"id": i, "gold": x} for i, x in enumerate(refs)])
    assert main(["eval", "generation", "--predictions", p, "--references", r, "--prediction-field", "text",
                 "--reference-field", "gold", "--out", str(tmp_path / "g2.json")]) == 0
    assert json.loads((tmp_path / "g2.json").read_text())["metrics"] == pytest.approx(expected)

    capsys.readouterr()
    shuffled = _write_jsonl(tmp_path / "s.jsonl", [{"id": i, "gold": x} for i, x in reversed(list(enumerate(refs)))])
    assert main(["eval", "generation", "--predictions", p, "--references", shuffled, "--prediction-field", "text",
                 "--reference-field", "gold"]) == 2
    assert "p.jsonl:1 is id '0' but" in capsys.readouterr().err
    short = _write_jsonl(tmp_path / "short.jsonl", [{"gold": "x"}])
    assert main(["eval", "generation", "--predictions", p, "--references", short, "--reference-field", "gold"]) == 2
    assert "has 3 records but" in capsys.readouterr().err
    assert main(["eval", "generation", "--predictions", one, "--prediction-field", "nope"]) == 2
    assert 'one.jsonl:1: "nope" must be a string' in capsys.readouterr().err
    assert main(["eval", "generation", "--data", one]) == 2
    assert "--data needs --index" in capsys.readouterr().err
    assert main(["eval", "generation", "--data", one, "--references", r]) == 2
    assert "--references goes with --predictions" in capsys.readouterr().err


def test_cli_eval_generation_with_rag(tiny, tmp_path, capsys):
    from bsharedrag_fast import Backbone, Tokenizer
    from bsharedrag_fast.cli.main import main
    from bsharedrag_fast.index.hnsw import HNSWIndex
    from bsharedrag_fast.rag.pipeline import RAGPipeline
    from bsharedrag_fast.engine.runtime import SharedRuntime

    base = ["--model", str(tiny / "model"), "--retrieval-adapter", str(tiny / "retrieval")]
    assert main(["index", *base, "--corpus", str(tiny / "beir" / "corpus.jsonl"), "--out", str(tmp_path / "idx")]) == 0
    qa = [{"query_id": "a", "question": "what does the fox do?", "answer": "it jumps"},  # each BEIR-style id name
          {"_id": "b", "question": "which model?", "answer": "one model"},
          {"id": "c", "question": "who sleeps?", "answer": "the lazy dog"}]
    data = _write_jsonl(tmp_path / "qa.jsonl", qa)
    saved = tmp_path / "preds.jsonl"
    assert main(["eval", "generation", "--data", data, *base, "--generation-adapter", str(tiny / "generation"),
                 "--index", str(tmp_path / "idx"), "--max-new-tokens", "4", "--batch-size", "2",
                 "--save-predictions", str(saved), "--out", str(tmp_path / "g.json")]) == 0
    capsys.readouterr()
    rows = [json.loads(x) for x in saved.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"] and all(len(r["sources"]) == 3 for r in rows)

    # the same answers as the pipeline run directly
    model = Backbone.from_pretrained(tiny / "model")
    model.load_adapter(str(tiny / "retrieval"), "retrieval")
    model.load_adapter(str(tiny / "generation"), "generation")
    rag = RAGPipeline(SharedRuntime(model, Tokenizer.from_pretrained(tiny / "model")),
                      HNSWIndex.load(str(tmp_path / "idx")), max_new_tokens=4)
    direct = [a.text for a in rag.ask_many([r["question"] for r in qa])]
    assert [r["prediction"] for r in rows] == direct
    expected = generation_metrics(direct, [r["answer"] for r in qa])
    assert json.loads((tmp_path / "g.json").read_text())["metrics"] == pytest.approx(expected)
    # the saved predictions score the same when read back
    assert main(["eval", "generation", "--predictions", str(saved), "--out", str(tmp_path / "g2.json")]) == 0
    assert json.loads((tmp_path / "g2.json").read_text())["metrics"] == pytest.approx(expected)


def test_evaluate_retrieval_api_checks(tiny):
    from bsharedrag_fast import Backbone, Tokenizer
    from bsharedrag_fast.eval.metrics import evaluate_retrieval, index_corpus
    from bsharedrag_fast.engine.runtime import SharedRuntime

    rt = SharedRuntime(Backbone.from_pretrained(tiny / "model"), Tokenizer.from_pretrained(tiny / "model"))
    with pytest.raises(ValueError, match="1 judged queries have no text"):
        evaluate_retrieval(rt, DOCS, {"q1": "x"}, {"q1": {"d0": 1}, "q9": {"d1": 1}}, None)
    with pytest.raises(ValueError, match="must be an HNSWIndex or a"):
        evaluate_retrieval(rt, ["d0"], QUERIES, QRELS, None)
    with pytest.raises(ValueError, match="corpus is empty"):
        evaluate_retrieval(rt, {}, QUERIES, QRELS, None)
    with pytest.raises(ValueError, match="corpus\\['d0'\\] must be a dict with a \"text\" string"):
        evaluate_retrieval(rt, {"d0": {"title": "t"}}, QUERIES, QRELS, None)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        evaluate_retrieval(rt, DOCS, QUERIES, QRELS, None, batch_size=0)
    partial = index_corpus(rt, {d: DOCS[d] for d in ("d0", "d1", "d2")}, None, batch_size=2, progress=False)
    with pytest.warns(UserWarning, match="judged documents are not in the index"):
        metrics, _ = evaluate_retrieval(rt, partial, QUERIES, {"q1": {"d0": 1, "d4": 1}}, None, ks=(3,))
    assert metrics["recall@3"] == 0.5 and len(partial) == 3
    metrics, run = evaluate_retrieval(rt, DOCS, QUERIES, QRELS, None, ks=(2,), depth=4, progress=False)
    assert set(run) == set(QRELS) and all(len(hits) == 4 for hits in run.values())
    assert metrics == retrieval_metrics(run, QRELS, (2,))
