"""Data readers shared by indexing, training and evaluation: JSONL and BEIR-format datasets.

    for rec in read_jsonl("train.jsonl"): ...             # dicts; errors name the file and line
    corpus = load_corpus("corpus.jsonl")                  # {doc_id: {"title", "text", "metadata"}}
    queries = load_queries("queries.jsonl")               # {qid: text}
    qrels = load_qrels("qrels/test.tsv")                  # {qid: {doc_id: relevance}}
    data = load_beir("scifact", split="test")             # BeirData(corpus, queries, qrels)

BEIR layout: ``corpus.jsonl`` (``_id``, ``title``, ``text``, ``metadata``), ``queries.jsonl``
(``_id``, ``text``) and ``qrels/<split>.tsv`` (header ``query-id corpus-id score``, tab separated).
Qrels files in TREC format (``qid 0 docid rel``, whitespace separated) are read too.
Ids are always strings: BEIR files hold both ``"_id": "12"`` and ``"_id": 12``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator

_QRELS_HEADER = ("query-id", "corpus-id", "score")


def _open(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    return open(path, encoding="utf-8")


def enumerate_jsonl(path: str, what: str = "JSONL") -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSONL file whose lines are JSON objects."""
    with _open(path, what) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            yield n, rec


def read_jsonl(path: str) -> Iterator[dict]:
    """The JSON objects of a JSONL file, one per non-blank line; errors name the file and line."""
    for _, rec in enumerate_jsonl(path):
        yield rec


def write_jsonl(path: str, records) -> None:
    """One JSON object per line (UTF-8, unescaped), the records in order."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _record_id(rec: dict, path: str, n: int) -> str:
    rid = rec.get("_id", rec.get("id"))
    if rid is None or isinstance(rid, (dict, list, bool)) or not str(rid).strip():
        raise ValueError(f'{path}:{n}: missing "_id" (or "id")')
    return str(rid)


def _text(rec: dict, field: str, path: str, n: int, required: bool) -> str:
    value = rec.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValueError(f'{path}:{n}: "{field}" must be a {"non-empty " if required else ""}string, got {value!r}')
    return value


def passage_text(doc: dict) -> str:
    """What a retriever embeds of a document (after the passage prefix): "title text". Index
    building, mining and training all use this, so their vectors agree."""
    return f"{doc.get('title') or ''} {doc['text']}".strip()


def read_corpus(path: str, with_lines: bool = False) -> Iterator:
    """Documents of a JSONL corpus (BEIR corpus.jsonl): {"id", "title", "text", "metadata"} per line,
    in file order (with_lines: (line number, document) pairs); "title", "text" and "metadata" are
    optional, but a document needs a non-empty title or text (BEIR has documents that are a
    title alone)."""
    for n, rec in enumerate_jsonl(path, "corpus"):
        doc_id = _record_id(rec, path, n)
        meta = rec.get("metadata") or {}
        if not isinstance(meta, dict):
            raise ValueError(f'{path}:{n}: "metadata" must be a JSON object, got {type(meta).__name__}')
        title, text = _text(rec, "title", path, n, required=False), _text(rec, "text", path, n, required=False)
        if not title.strip() and not text.strip():
            raise ValueError(f'{path}:{n}: document {doc_id!r} has neither a "title" nor a "text"')
        doc = {"id": doc_id, "title": title, "text": text, "metadata": meta}
        yield (n, doc) if with_lines else doc


def load_corpus(path: str) -> dict[str, dict]:
    """{doc_id: {"title", "text", "metadata"}} from a JSONL corpus; a repeated id is an error."""
    corpus: dict[str, dict] = {}
    for doc in read_corpus(path):
        doc_id = doc.pop("id")
        if doc_id in corpus:
            raise ValueError(f"{path}: duplicate document id {doc_id!r}")
        corpus[doc_id] = doc
    return corpus


def load_queries(path: str) -> dict[str, str]:
    """{qid: text} from a JSONL file of {"_id" (or "id"), "text"} (BEIR queries.jsonl)."""
    queries: dict[str, str] = {}
    for n, rec in enumerate_jsonl(path, "queries"):
        qid = _record_id(rec, path, n)
        if qid in queries:
            raise ValueError(f"{path}:{n}: duplicate query id {qid!r}")
        queries[qid] = _text(rec, "text", path, n, required=True)
    return queries


def _parse_relevance(value: str, path: str, n: int) -> int:
    # BEIR writes integer grades; some converted files carry them as "1.0".
    try:
        grade = float(value)
    except ValueError:
        grade = float("nan")
    if not grade.is_integer():
        raise ValueError(f"{path}:{n}: relevance must be an integer, got {value!r}")
    return int(grade)


def load_qrels(path: str) -> dict[str, dict[str, int]]:
    """{qid: {doc_id: relevance}} from BEIR qrels (tab separated ``query-id corpus-id score`` with an
    optional header line) or TREC qrels (``qid iteration docid relevance``). Grades may be 0 or negative
    (judged non-relevant); a (query, doc) pair given twice with different grades is an error."""
    qrels: dict[str, dict[str, int]] = {}
    with _open(path, "qrels") as f:
        for n, line in enumerate(f, 1):
            cols = line.split("\t") if "\t" in line else line.split()
            cols = [c.strip() for c in cols]
            if not any(cols):
                continue
            if n == 1 and tuple(c.lower() for c in cols) == _QRELS_HEADER:
                continue
            if len(cols) == 3:
                qid, doc_id, rel = cols
            elif len(cols) == 4:
                qid, _, doc_id, rel = cols
            else:
                raise ValueError(f"{path}:{n}: expected `query-id corpus-id score` (BEIR) or "
                                 f"`qid 0 docid rel` (TREC), got {len(cols)} columns")
            if not qid or not doc_id:
                raise ValueError(f"{path}:{n}: empty query or document id")
            grade = _parse_relevance(rel, path, n)
            known = qrels.setdefault(qid, {})
            if known.get(doc_id, grade) != grade:
                raise ValueError(f"{path}:{n}: ({qid!r}, {doc_id!r}) judged twice: {known[doc_id]} and {grade}")
            known[doc_id] = grade
    if not qrels:
        raise ValueError(f"{path}: no judgements")
    return qrels


@dataclass
class BeirData:
    corpus: dict[str, dict]            # doc_id -> {"title", "text", "metadata"}
    queries: dict[str, str]            # qid -> text, only the queries judged in the split
    qrels: dict[str, dict[str, int]]   # qid -> {doc_id: relevance}


def _unknown(ids: set, what: str, path: str) -> ValueError:
    shown = ", ".join(repr(i) for i in sorted(ids)[:5])
    more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    return ValueError(f"{path} names {len(ids)} unknown {what}: {shown}{more}")


def load_beir(data_dir: str, split: str = "test") -> BeirData:
    """A BEIR dataset directory: corpus.jsonl, queries.jsonl and qrels/<split>.tsv. Queries are
    restricted to those the split judges; qrels naming an unknown query or document are an error."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"BEIR data directory not found: {data_dir}")
    qrels_path = os.path.join(data_dir, "qrels", f"{split}.tsv")
    if not os.path.isfile(qrels_path):
        qdir = os.path.join(data_dir, "qrels")
        splits = sorted(f[:-4] for f in os.listdir(qdir) if f.endswith(".tsv")) if os.path.isdir(qdir) else []
        raise FileNotFoundError(f"qrels file not found: {qrels_path} (splits present: {splits or 'none'})")
    corpus = load_corpus(os.path.join(data_dir, "corpus.jsonl"))
    all_queries = load_queries(os.path.join(data_dir, "queries.jsonl"))
    qrels = load_qrels(qrels_path)
    missing_q = set(qrels) - set(all_queries)
    if missing_q:
        raise _unknown(missing_q, "queries", qrels_path)
    missing_d = {d for judged in qrels.values() for d in judged if d not in corpus}
    if missing_d:
        raise _unknown(missing_d, "documents", qrels_path)
    return BeirData(corpus, {qid: all_queries[qid] for qid in qrels}, qrels)
