"""Evaluation: retrieval metrics by trec_eval (pytrec_eval), generation metrics by sacrebleu and
rouge-score; `bsharedrag eval` is cli/eval.py.

    metrics = retrieval_metrics(run, qrels, ks=(3, 5, 10))   # {"ndcg@3": ..., "hit@3", "recall@3", "mrr@3", ...}
    write_trec_run(run, "run.trec", tag="bsharedrag")
    metrics, run = evaluate_retrieval(rt, index_or_corpus, queries, qrels, adapter="retrieval", ks=(3, 5))
    gen = generation_metrics(predictions, references)       # {"bleu3", "rougeL", "exact", "contains"}

Retrieval.  A run is ``{qid: {doc_id: score}}``, qrels ``{qid: {doc_id: grade}}``; pytrec_eval
scores it.  Each query's documents are ranked as trec_eval ranks them: score descending, ties broken
by doc id *descending* (trec_eval's ``comp_sim_docno``).  A grade >= 1 is relevant.  nDCG@k is
``ndcg_cut`` (linear gain, ideal ranking from the qrels), Hit@k ``success``, Recall@k ``recall``,
MRR@k ``recip_rank`` over the run cut to its top k (1/rank of the first relevant doc within the top
k, else 0).  Scores are means over *every query in the qrels*: a query the run misses scores 0
(``trec_eval -c``), and a query with no relevant doc scores 0 everywhere, as in trec_eval and BEIR.
Run queries absent from the qrels are ignored.

Generation.  All scores lie in [0, 1].  BLEU-3 is sacrebleu's corpus BLEU with ``max_ngram_order=3``
(exp smoothing, case-sensitive) / 100, tokenized "13a", or "zh" (each CJK character its own token)
when any reference holds CJK text.  ROUGE-L is rouge-score's LCS F1 per pair, averaged, over our
tokens: each CJK character is one token (character level for CJK text) and other words are
lowercased runs of letters and digits (as rouge-score's own tokenizer for ASCII text, which would
drop CJK text; no stemming).  Exact match and contains compare SQuAD-normalised text (lowercase,
punctuation and English articles removed, whitespace collapsed); contains asks whether the
reference occurs in the prediction, on word boundaries unless the reference is CJK.
"""
from __future__ import annotations

import functools
import importlib
import math
import re
import string
import unicodedata
import warnings
from typing import Any, Mapping, Sequence

from ..rag.pipeline import DEFAULT_MAX_LENGTH, embed_batches, index_corpus

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

RETRIEVAL_METRICS = ("ndcg", "hit", "recall", "mrr")

# ============================================================================ retrieval


def parse_ks(ks: Any) -> tuple[int, ...]:
    """Cutoffs from "3,5,10" or an iterable of ints: sorted, unique, each >= 1."""
    if isinstance(ks, str):
        try:
            ks = [int(x) for x in ks.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"k: expected comma-separated integers like 3,5,10, got {ks!r}") from None
    elif isinstance(ks, int):
        ks = [ks]
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"k: expected one or more integers >= 1, got {ks!r}")
    return tuple(sorted(set(ks)))


def rank_documents(scores: Mapping[str, float]) -> list[str]:
    """Doc ids in trec_eval order: score descending, equal scores by doc id descending."""
    return [d for d, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def _check_run(run: Run) -> None:
    if not isinstance(run, Mapping):
        raise ValueError(f"run must be a dict {{qid: {{doc_id: score}}}}, got {type(run).__name__}")
    for qid, scores in run.items():
        if not isinstance(scores, Mapping):
            raise ValueError(f"run[{qid!r}] must be a dict {{doc_id: score}}, got {type(scores).__name__}")
        # ids are strings everywhere (data.py makes them so): an int id would silently never match the qrels
        if not isinstance(qid, str) or not all(isinstance(d, str) for d in scores):
            raise ValueError(f"run[{qid!r}]: query and document ids must be strings")
        for doc_id, s in scores.items():
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ValueError(f"run[{qid!r}][{doc_id!r}]: score must be a finite number, got {s!r}")


def _library(module: str, package: str):
    """Import a metrics library, or a one-line error naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"evaluation needs {package} (pip install {package}, or the README's install command)") from None


def per_query_metrics(run: Run, qrels: Qrels, ks: Any = (3, 5, 10)) -> dict[str, dict[str, float]]:
    """{qid: {"ndcg@k", "hit@k", "recall@k", "mrr@k"}} for every query in the qrels, computed by
    trec_eval (pytrec_eval): ndcg_cut, success, recall; MRR@k is recip_rank over the run cut to
    its top k (trec_eval has no cut for it). A query the run lacks scores 0 (trec_eval -c)."""
    pytrec_eval = _library("pytrec_eval", "pytrec-eval-terrier")
    ks = parse_ks(ks)
    _check_run(run)
    if not qrels:
        raise ValueError("qrels are empty: nothing to evaluate")
    judged = {q: {d: int(g) for d, g in docs.items()} for q, docs in qrels.items()}
    ranked = {q: rank_documents(run.get(q, {})) for q in judged}
    scores = {q: {d: float(run[q][d]) for d in ranked[q]} for q in judged}
    cut = ",".join(map(str, ks))
    full = pytrec_eval.RelevanceEvaluator(judged, {f"ndcg_cut.{cut}", f"success.{cut}", f"recall.{cut}"})
    ref = full.evaluate(scores)
    rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"})
    first_k = {k: rr.evaluate({q: {d: scores[q][d] for d in ranked[q][:k]} for q in judged}) for k in ks}
    out = {}
    for q in judged:
        m, row = ref.get(q, {}), {}
        for k in ks:
            row[f"ndcg@{k}"] = m.get(f"ndcg_cut_{k}", 0.0)
            row[f"hit@{k}"] = m.get(f"success_{k}", 0.0)
            row[f"recall@{k}"] = m.get(f"recall_{k}", 0.0)
            row[f"mrr@{k}"] = first_k[k].get(q, {}).get("recip_rank", 0.0)
        out[q] = row
    return out


def retrieval_metrics(run: Run, qrels: Qrels, ks: Any = (3, 5, 10)) -> dict[str, float]:
    """Mean nDCG@k, Hit@k, Recall@k, MRR@k over the queries in the qrels (see the module docstring)."""
    return mean_metrics(per_query_metrics(run, qrels, ks), ks)


def mean_metrics(per_query: Mapping[str, Mapping[str, float]], ks: Any = (3, 5, 10)) -> dict[str, float]:
    """retrieval_metrics from per_query_metrics' rows (for a caller that needs both)."""
    names = [f"{m}@{k}" for m in RETRIEVAL_METRICS for k in parse_ks(ks)]
    return {name: sum(q[name] for q in per_query.values()) / len(per_query) for name in names}


def check_trec_word(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} cannot be written to a TREC run (empty or has whitespace)")


def write_trec_run(run: Run, path: str, tag: str = "bsharedrag") -> None:
    """A TREC run file: `qid Q0 doc_id rank score tag` per line, ranks in trec_eval order from 1."""
    _check_run(run)
    check_trec_word(tag, "run tag")
    for qid, scores in run.items():
        check_trec_word(qid, "query id")
        for doc_id in scores:
            check_trec_word(doc_id, "doc id")
    with open(path, "w", encoding="utf-8") as f:
        for qid, scores in run.items():
            for rank, doc_id in enumerate(rank_documents(scores), 1):
                f.write(f"{qid} Q0 {doc_id} {rank} {float(scores[doc_id])!r} {tag}\n")


def evaluate_retrieval(runtime, index_or_corpus, queries: Mapping[str, str], qrels: Qrels,
                       adapter="retrieval", ks: Any = (3, 5, 10), *, depth: int | None = None,
                       pooling: str = "last", query_prefix: str = "query: ", passage_prefix: str = "passage: ",
                       batch_size: int = 64, progress: bool = True,
                       max_length: int = DEFAULT_MAX_LENGTH) -> tuple[dict[str, float], dict]:
    """Embed each judged query with the shared engine, search the index (an HNSWIndex, or one built
    here from a {doc_id: doc} corpus) for the top `depth` (default max(ks)) documents and score the
    run; returns (metrics, run)."""
    import torch

    from ..index.hnsw import HNSWIndex

    ks = parse_ks(ks)
    depth = max(ks) if depth is None else depth
    if not isinstance(depth, int) or depth < max(ks):
        raise ValueError(f"depth must be an int >= the largest k ({max(ks)}), got {depth!r}")
    if not qrels:
        raise ValueError("qrels are empty: nothing to evaluate")
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise ValueError(f"{len(missing)} judged queries have no text, e.g. {missing[:5]}")
    if isinstance(index_or_corpus, HNSWIndex):
        index = index_or_corpus
        unindexed = {d for judged in qrels.values() for d in judged if d not in index}
        if unindexed:
            warnings.warn(f"{len(unindexed)} judged documents are not in the index; they can never be retrieved")
    elif isinstance(index_or_corpus, Mapping):
        index = index_corpus(runtime, index_or_corpus, adapter, pooling, passage_prefix, batch_size=batch_size,
                             progress=progress, max_length=max_length)
    else:
        raise ValueError(f"index_or_corpus must be an HNSWIndex or a {{doc_id: doc}} dict, "
                         f"got {type(index_or_corpus).__name__}")
    qids = list(qrels)
    vecs = torch.cat([v for _, v in embed_batches(runtime, [queries[q] for q in qids], adapter, pooling,
                                                       query_prefix, batch_size, "embedding queries", progress,
                                                       max_length)])
    hits = index.search(vecs, depth)
    run = {qid: dict(h) for qid, h in zip(qids, hits)}
    return retrieval_metrics(run, qrels, ks), run


# ============================================================================ generation

# CJK characters: sacrebleu's TokenizerZh table (astral ranges as intended), plus kana and
# Hangul syllables. A reference with any of them makes BLEU use sacrebleu's "zh" tokenizer and
# ROUGE-L count each such character as one token.
_CJK_RANGES = (
    (0x3400, 0x4DB5), (0x4E00, 0x9FA5), (0x9FA6, 0x9FBB), (0xF900, 0xFA2D), (0xFA30, 0xFA6A),
    (0xFA70, 0xFAD9), (0x20000, 0x2A6D6), (0x2F800, 0x2FA1D), (0xFF00, 0xFFEF), (0x2E80, 0x2EFF),
    (0x3000, 0x303F), (0x31C0, 0x31EF), (0x2F00, 0x2FDF), (0x2FF0, 0x2FFF), (0x3100, 0x312F),
    (0x31A0, 0x31BF), (0xFE10, 0xFE1F), (0xFE30, 0xFE4F), (0x2600, 0x26FF), (0x2700, 0x27BF),
    (0x3200, 0x32FF), (0x3300, 0x33FF), (0x3040, 0x30FF), (0xAC00, 0xD7AF),
)  # fmt: skip
_CJK = re.compile("[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in _CJK_RANGES) + "]")
_WORD = re.compile(r"[^\W_]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)


def has_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], max_order: int = 3) -> float:
    """Corpus BLEU in [0, 1]: sacrebleu's BLEU(max_ngram_order=max_order) / 100 (exp smoothing,
    case-sensitive), tokenized "zh" when any reference holds CJK text, else "13a"."""
    metrics = _library("sacrebleu.metrics", "sacrebleu")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not isinstance(max_order, int) or max_order < 1:
        raise ValueError(f"max_order must be an int >= 1, got {max_order!r}")
    tokenize = "zh" if any(has_cjk(r) for r in references) else "13a"
    bleu = metrics.BLEU(max_ngram_order=max_order, tokenize=tokenize)
    return bleu.corpus_score(list(predictions), [list(references)]).score / 100


def rouge_tokens(text: str) -> list[str]:
    """Lowercased tokens: each CJK character alone, other words as runs of letters and digits
    (rouge-score's own tokenizer keeps only [a-z0-9], which would drop Chinese text whole)."""
    return _WORD.findall(_CJK.sub(r" \g<0> ", text.lower()))


class _RougeTokens:
    """rouge-score's tokenizer interface over rouge_tokens."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return rouge_tokens(text)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    rouge_scorer = _library("rouge_score.rouge_scorer", "rouge-score")
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokens())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair by rouge-score (over rouge_tokens; 0 when either side has none)."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def normalize_answer(text: str) -> str:
    """SQuAD normalisation (lowercase, no punctuation, no a/an/the, single spaces); Unicode
    punctuation (e.g. CJK "，。") is removed too."""
    text = "".join(c for c in text.lower() if c not in _ASCII_PUNCT and not unicodedata.category(c).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _contains(prediction: str, reference: str) -> bool:
    if not reference:  # e.g. "The" or "A": nothing left to look for, so only an equally empty answer counts
        return not prediction
    if has_cjk(reference):
        return reference in prediction
    return f" {reference} " in f" {prediction} "


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{"bleu3", "rougeL", "exact", "contains"} in [0, 1] (see the module docstring)."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no predictions to evaluate")
    for what, items in (("prediction", predictions), ("reference", references)):
        for i, x in enumerate(items):
            if not isinstance(x, str):
                raise ValueError(f"{what} {i} must be a string, got {type(x).__name__}")
    for i, r in enumerate(references):
        if not r.strip():
            raise ValueError(f"reference {i} is empty")
    norm_pred = [normalize_answer(p) for p in predictions]
    norm_ref = [normalize_answer(r) for r in references]
    n = len(references)
    return {
        "bleu3": corpus_bleu(predictions, references, 3),
        "rougeL": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "exact": sum(p == r for p, r in zip(norm_pred, norm_ref)) / n,
        "contains": sum(_contains(p, r) for p, r in zip(norm_pred, norm_ref)) / n,
    }


# ============================================================================ command line


def format_table(metrics: Mapping[str, float]) -> str:
    """Metrics as a text table: one row per metric, one column per cutoff ("name@k" keys)."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        name, _, k = key.partition("@")
        rows.setdefault(name, {})["@" + k if k else "value"] = value
    cols = list(dict.fromkeys(c for r in rows.values() for c in r))
    width = max(len(n) for n in rows)
    lines = [" ".join([" " * width] + [f"{c:>8}" for c in cols])]
    for name, r in rows.items():
        lines.append(" ".join([f"{name:<{width}}"] + [f"{r[c]:8.4f}" if c in r else " " * 8 for c in cols]))
    return "\n".join(lines)


ID_FIELDS = ("id", "_id", "query_id", "query-id", "qid")  # what BEIR-style QA files name a question's id


def record_id(rec: dict) -> str | None:
    """A QA or prediction record's id under whichever BEIR-style name it has (ID_FIELDS)."""
    rid = next((rec[k] for k in ID_FIELDS if rec.get(k) is not None), None)
    return None if rid is None else str(rid)


def string_field(rec: dict, field: str, path: str, n: int) -> str:
    value = rec.get(field)
    if not isinstance(value, str):
        raise ValueError(f'{path}:{n}: "{field}" must be a string, got {value!r}')
    return value


def read_predictions(path: str, prediction_field: str = "prediction", references: str | None = None,
                     reference_field: str = "answer") -> tuple[list[str], list[str]]:
    """(predictions, references) from one JSONL with both fields, or from two JSONL files matched line by
    line (when records on both sides carry an "id", the ids must agree)."""
    from ..rag.data import enumerate_jsonl

    preds = list(enumerate_jsonl(path, "predictions"))
    if references is None:
        return ([string_field(r, prediction_field, path, n) for n, r in preds],
                [string_field(r, reference_field, path, n) for n, r in preds])
    refs = list(enumerate_jsonl(references, "references"))
    if len(preds) != len(refs):
        raise ValueError(f"{path} has {len(preds)} records but {references} has {len(refs)}")
    for (n, p), (m, r) in zip(preds, refs):
        pid, rid = record_id(p), record_id(r)
        if pid is not None and rid is not None and pid != rid:
            raise ValueError(f"{path}:{n} is id {pid!r} but {references}:{m} is id {rid!r}")
    return ([string_field(r, prediction_field, path, n) for n, r in preds],
            [string_field(r, reference_field, references, n) for n, r in refs])
