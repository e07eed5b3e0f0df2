"""`bsharedrag demo --data DIR`: the demo's pipeline on a user's BEIR-layout data set.

DIR holds corpus.jsonl, queries.jsonl, qrels/train.tsv and qrels/test.tsv (BEIR), and
optionally answers.jsonl: one {"<id>", "answer"} per line, where <id> is the query's id
under any BEIR-style name (query_id, _id, id, qid). With answers, the generation LoRA and
the Fully-shared baseline are trained on the train queries' answers (contexts: their judged
documents at first, then what the retriever returns) and the test queries are answered;
without, the demo trains and compares the retrievers only.

The corpus is the domain text of continual pre-training (title + text of each document); no
general corpus is mixed in. prepare() writes what the pipeline reads into a work directory
and returns the same fields generate_worthbuying() does (general and updates: None).
"""
from __future__ import annotations

import os
from typing import Optional

from ..eval.metrics import ID_FIELDS, record_id
from ..rag.data import enumerate_jsonl, load_beir, load_corpus, passage_text, write_jsonl
from .worthbuying import WorthBuyingPaths

ANSWERS = "answers.jsonl"


def read_answers(path: str) -> dict[str, str]:
    """{query id: answer} of an answers file; bad lines are errors naming file:line."""
    answers: dict[str, str] = {}
    for n, rec in enumerate_jsonl(path, "answers"):
        qid = record_id(rec)
        if qid is None:
            raise ValueError(f"{path}:{n}: no query id (one of {', '.join(ID_FIELDS)})")
        ans = rec.get("answer")
        if not isinstance(ans, str) or not ans.strip():
            raise ValueError(f'{path}:{n}: "answer" must be a non-empty string, got {ans!r}')
        if qid in answers:
            raise ValueError(f"{path}:{n}: a second answer for query {qid!r}")
        answers[qid] = ans
    return answers


def _qa(split, answers: dict) -> list[dict]:
    return [{"question": split.queries[q], "answer": answers[q], "query_id": q,
             "doc_ids": [d for d, rel in split.qrels[q].items() if rel > 0]}
            for q in split.queries if q in answers and any(r > 0 for r in split.qrels[q].values())]


def prepare(data_dir: str, work_dir: str) -> WorthBuyingPaths:
    """Check DIR (both splits load, answers name known queries) and write the pipeline's inputs."""
    data_dir = os.path.abspath(data_dir)
    train, test = load_beir(data_dir, "train"), load_beir(data_dir, "test")
    os.makedirs(work_dir, exist_ok=True)
    corpus_path = os.path.join(data_dir, "corpus.jsonl")
    domain = os.path.join(work_dir, "domain.jsonl")
    write_jsonl(domain, ({"text": passage_text(d)} for d in load_corpus(corpus_path).values()))
    qa_train: Optional[str] = None
    qa_test: Optional[str] = None
    answers_path = os.path.join(data_dir, ANSWERS)
    if os.path.isfile(answers_path):
        answers = read_answers(answers_path)
        known = set(train.queries) | set(test.queries)
        unknown = sorted(set(answers) - known)
        if unknown:
            raise ValueError(f"{answers_path}: {len(unknown)} answers name queries in neither qrels split, "
                             f"e.g. {unknown[:5]}")
        rows_train, rows_test = _qa(train, answers), _qa(test, answers)
        if not rows_train or not rows_test:
            raise ValueError(f"{answers_path}: needs answers for train and test queries "
                             f"(has {len(rows_train)} train, {len(rows_test)} test)")
        qa_train, qa_test = os.path.join(work_dir, "qa_train.jsonl"), os.path.join(work_dir, "qa_test.jsonl")
        write_jsonl(qa_train, rows_train)
        write_jsonl(qa_test, rows_test)
    return WorthBuyingPaths(root=data_dir, corpus=corpus_path, queries=os.path.join(data_dir, "queries.jsonl"),
                            qrels_train=os.path.join(data_dir, "qrels", "train.tsv"),
                            qrels_test=os.path.join(data_dir, "qrels", "test.tsv"), qa_train=qa_train,
                            qa_test=qa_test, domain=domain, general=None, updates=None)
