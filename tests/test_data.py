"""Data readers: JSONL, BEIR corpus/queries/qrels, TREC qrels; every bad-input path names what is wrong."""
import json
import random

import pytest

from bsharedrag_fast.rag.data import (BeirData, load_beir, load_corpus, load_qrels, load_queries, passage_text,
                                      read_corpus, read_jsonl)

CORPUS = {
    "d1": {"title": "Fox", "text": "a quick brown fox", "metadata": {"url": "x"}},
    "2": {"title": "", "text": "lazy dog", "metadata": {}},
    "d3": {"title": "Cat", "text": "猫在睡觉", "metadata": {}},
}
QUERIES = {"q1": "what fox?", "q2": "which dog", "q3": "unjudged in test"}
QRELS = {"q1": {"d1": 2, "2": 0}, "q2": {"2": 1}}


def _write_jsonl(path, records, blank_lines=False):
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n", encoding="utf-8")
    return path


def _write_beir(root, corpus=CORPUS, queries=QUERIES, qrels=QRELS, split="test"):
    root.mkdir(parents=True, exist_ok=True)
    # BEIR files hold integer ids too: write "2" as a JSON number.
    _write_jsonl(root / "corpus.jsonl", [{"_id": int(k) if k.isdigit() else k, **v} for k, v in corpus.items()])
    _write_jsonl(root / "queries.jsonl", [{"_id": k, "text": v, "metadata": {}} for k, v in queries.items()])
    (root / "qrels").mkdir(exist_ok=True)
    rows = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{r}" for q, j in qrels.items() for d, r in j.items()]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_read_jsonl_skips_blank_lines(tmp_path):
    recs = [{"a": 1}, {"b": [1, 2]}, {"c": "ü"}]
    assert list(read_jsonl(_write_jsonl(tmp_path / "x.jsonl", recs, blank_lines=True))) == recs


@pytest.mark.parametrize("content,msg", [
    ('{"a": 1}\n{"a": \n', "x.jsonl:2: not valid JSON"),
    ('{"a": 1}\n\n[1, 2]\n', "x.jsonl:3: expected a JSON object, got list"),
])
def test_read_jsonl_errors_name_the_line(tmp_path, content, msg):
    (tmp_path / "x.jsonl").write_text(content)
    with pytest.raises(ValueError, match=msg):
        list(read_jsonl(str(tmp_path / "x.jsonl")))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        load_corpus(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="qrels file not found"):
        load_qrels(str(tmp_path / "nope.tsv"))
    with pytest.raises(FileNotFoundError, match="BEIR data directory not found"):
        load_beir(str(tmp_path / "nodir"))


def test_load_beir_matches_what_was_written(tmp_path):
    data = load_beir(str(_write_beir(tmp_path / "beir")))
    assert isinstance(data, BeirData)
    assert data.corpus == CORPUS
    assert data.queries == {q: QUERIES[q] for q in QRELS}  # q3 is not judged in this split
    assert data.qrels == QRELS
    # read_corpus keeps file order and carries the id (cli index uses it)
    assert [d["id"] for d in read_corpus(str(tmp_path / "beir" / "corpus.jsonl"))] == list(CORPUS)


def test_load_beir_other_split_and_missing_split(tmp_path):
    root = _write_beir(tmp_path / "beir", split="dev")
    assert load_beir(str(root), split="dev").qrels == QRELS
    with pytest.raises(FileNotFoundError, match=r"test.tsv \(splits present: \['dev'\]\)"):
        load_beir(str(root))


def test_qrels_trec_format_matches_pytrec_eval(tmp_path):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(0)
    lines = [f"q{rng.randrange(20)} 0 doc{rng.randrange(50)} {rng.randrange(-1, 4)}" for _ in range(200)]
    seen, unique = set(), []
    for ln in lines:  # one grade per (query, doc): a conflicting repeat is an error (tested below)
        key = tuple(ln.split()[i] for i in (0, 2))
        if key not in seen:
            seen.add(key)
            unique.append(ln)
    path = tmp_path / "qrels.trec"
    path.write_text("\n".join(unique) + "\n")
    with open(path) as f:
        expected = pytrec_eval.parse_qrel(f)
    assert load_qrels(str(path)) == expected


def test_qrels_beir_without_header_and_float_grades(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text("q1\td1\t1.0\nq1\td2\t0\nq1\td1\t1\n")  # a repeat with the same grade is fine
    assert load_qrels(str(path)) == {"q1": {"d1": 1, "d2": 0}}


@pytest.mark.parametrize("content,msg", [
    ("query-id\tcorpus-id\tscore\nq1\td1\n", "q.tsv:2: expected `query-id corpus-id score`"),
    ("q1\td1\thigh\n", "q.tsv:1: relevance must be an integer, got 'high'"),
    ("q1\td1\t0.5\n", "q.tsv:1: relevance must be an integer"),
    ("q1\td1\t1\nq1\td1\t2\n", r"q.tsv:2: \('q1', 'd1'\) judged twice: 1 and 2"),
    ("query-id\tcorpus-id\tscore\n", "q.tsv: no judgements"),
    ("q1\t\t1\n", "q.tsv:1: empty query or document id"),
])
def test_qrels_errors(tmp_path, content, msg):
    (tmp_path / "q.tsv").write_text(content)
    with pytest.raises(ValueError, match=msg):
        load_qrels(str(tmp_path / "q.tsv"))


def test_title_only_documents_are_read_and_embedded_as_their_title(tmp_path):
    """BEIR allows an empty text when the title says it all; the passage is then the title."""
    path = _write_jsonl(tmp_path / "c.jsonl", [{"_id": "d0", "title": "Only a title", "text": ""},
                                               {"_id": "d1", "title": "Title two"}])
    corpus = load_corpus(str(path))
    assert corpus["d0"]["text"] == "" and corpus["d1"]["text"] == ""
    assert [passage_text(corpus[d]) for d in ("d0", "d1")] == ["Only a title", "Title two"]


@pytest.mark.parametrize("record,msg", [
    ({"title": "t", "text": "x"}, r'c.jsonl:2: missing "_id" \(or "id"\)'),
    ({"_id": "a", "title": ""}, "c.jsonl:2: document 'a' has neither a \"title\" nor a \"text\""),
    ({"_id": "a", "text": "  "}, "c.jsonl:2: document 'a' has neither a \"title\" nor a \"text\""),
    ({"_id": "a", "text": 3}, 'c.jsonl:2: "text" must be a string, got 3'),
    ({"_id": "a", "text": "x", "title": 3}, 'c.jsonl:2: "title" must be a string, got 3'),
    ({"_id": "a", "text": "x", "metadata": [1]}, 'c.jsonl:2: "metadata" must be a JSON object'),
    ({"_id": "d0", "text": "again"}, "c.jsonl: duplicate document id 'd0'"),
])
def test_corpus_errors(tmp_path, record, msg):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"_id": "d0", "text": "first"}, record])
    with pytest.raises(ValueError, match=msg):
        load_corpus(str(path))


@pytest.mark.parametrize("record,msg", [
    ({"_id": "q0", "text": "again"}, "q.jsonl:2: duplicate query id 'q0'"),
    ({"_id": "q1"}, 'q.jsonl:2: "text" must be a non-empty string'),
    ({"text": "who?"}, 'q.jsonl:2: missing "_id"'),
])
def test_query_errors(tmp_path, record, msg):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"_id": "q0", "text": "first"}, record])
    with pytest.raises(ValueError, match=msg):
        load_queries(str(path))


def test_beir_qrels_naming_unknown_ids(tmp_path):
    root = _write_beir(tmp_path / "a", qrels={"q1": {"d1": 1, "ghost": 1, "ghost2": 0}})
    with pytest.raises(ValueError, match="names 2 unknown documents: 'ghost', 'ghost2'"):
        load_beir(str(root))
    root = _write_beir(tmp_path / "b", qrels={"q9": {"d1": 1}})
    with pytest.raises(ValueError, match="names 1 unknown queries: 'q9'"):
        load_beir(str(root))
