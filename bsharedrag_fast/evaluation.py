"""Evaluation: retrieval metrics (trec_eval semantics), generation metrics, and `bsharedrag eval`.

    metrics = retrieval_metrics(run, qrels, ks=(3, 5, 10))   # {"ndcg@3": ..., "hit@3", "recall@3", "mrr@3", ...}
    write_trec_run(run, "run.trec", tag="bsharedrag")
    metrics, run = evaluate_retrieval(rt, index_or_corpus, queries, qrels, adapter="retrieval", ks=(3, 5))
    gen = generation_metrics(predictions, references)       # {"bleu3", "rougeL", "exact", "contains"}

Retrieval.  A run is ``{qid: {doc_id: score}}``, qrels ``{qid: {doc_id: grade}}``.  Each query's
documents are ranked as trec_eval ranks them: score descending, ties broken by doc id *descending*
(trec_eval's ``comp_sim_docno``; the run's own rank column is ignored).  A grade >= 1 is relevant.
nDCG@k: linear gain (the grade), 1/log2(rank + 1) discount, ideal ranking from the qrels
(trec_eval ``ndcg_cut``).  Hit@k: 1 if a relevant doc is in the top k (``success``).  Recall@k:
relevant docs in the top k / all relevant (``recall``).  MRR@k: 1/rank of the first relevant doc
when it is within the top k, else 0.  Scores are means over *every query in the qrels*: a query the
run misses scores 0 (``trec_eval -c``), and a query with no relevant doc scores 0 everywhere, as in
trec_eval and BEIR.  Run queries absent from the qrels are ignored.

Generation.  All scores lie in [0, 1].  BLEU-3 is corpus-level BLEU as sacrebleu computes it with
``max_ngram_order=3`` (exp smoothing, case-sensitive; 100 x ours = sacrebleu's score), tokenized with
mteval-13a, or with sacrebleu's "zh" rule (each CJK character its own token, the rest 13a) when any
reference holds CJK text.  Our CJK table is sacrebleu's with its two 5-digit escapes read as meant
(U+20000..U+2A6D6, U+2F800..U+2FA1D; sacrebleu's typo also splits U+2001..U+2A6D: dashes, ellipses,
currency signs) plus kana and Hangul.  ROUGE-L is the mean per-pair LCS F1 over tokens: each CJK
character is one token (character level for CJK text) and other words are lowercased runs of letters
and digits (word level, as rouge-score tokenizes ASCII text, without stemming).  Exact match and
contains compare SQuAD-normalised text (lowercase, punctuation and English articles removed,
whitespace collapsed); contains asks whether the reference occurs in the prediction, on word
boundaries unless the reference is CJK.
"""
from __future__ import annotations

import json
import math
import re
import string
import sys
import unicodedata
import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from .data import passage_text

if TYPE_CHECKING:
    from .index import HNSWIndex

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


def _query_metrics(ranked: Sequence[str], judged: Mapping[str, int], ks: Sequence[int]) -> dict[str, float]:
    grades = [judged.get(d, 0) for d in ranked[: max(ks)]]
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)
    first = next((i for i, g in enumerate(grades) if g > 0), None)  # 0-based rank of the first relevant doc
    out: dict[str, float] = {}
    for k in ks:
        top = grades[:k]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(top) if g > 0)
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
        found = sum(1 for g in top if g > 0)
        out[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
        out[f"hit@{k}"] = float(found > 0)
        out[f"recall@{k}"] = found / len(ideal) if ideal else 0.0
        out[f"mrr@{k}"] = 1.0 / (first + 1) if first is not None and first < k else 0.0
    return out


def per_query_metrics(run: Run, qrels: Qrels, ks: Any = (3, 5, 10)) -> dict[str, dict[str, float]]:
    """{qid: {"ndcg@k", "hit@k", "recall@k", "mrr@k"}} for every query in the qrels."""
    ks = parse_ks(ks)
    _check_run(run)
    if not qrels:
        raise ValueError("qrels are empty: nothing to evaluate")
    return {qid: _query_metrics(rank_documents(run.get(qid, {})), judged, ks) for qid, judged in qrels.items()}


def retrieval_metrics(run: Run, qrels: Qrels, ks: Any = (3, 5, 10)) -> dict[str, float]:
    """Mean nDCG@k, Hit@k, Recall@k, MRR@k over the queries in the qrels (see the module docstring)."""
    ks = parse_ks(ks)
    per_query = per_query_metrics(run, qrels, ks)
    names = [f"{m}@{k}" for m in RETRIEVAL_METRICS for k in ks]
    return {name: sum(q[name] for q in per_query.values()) / len(per_query) for name in names}


def _check_trec_word(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} cannot be written to a TREC run (empty or has whitespace)")


def write_trec_run(run: Run, path: str, tag: str = "bsharedrag") -> None:
    """A TREC run file: `qid Q0 doc_id rank score tag` per line, ranks in trec_eval order from 1."""
    _check_run(run)
    _check_trec_word(tag, "run tag")
    for qid, scores in run.items():
        _check_trec_word(qid, "query id")
        for doc_id in scores:
            _check_trec_word(doc_id, "doc id")
    with open(path, "w", encoding="utf-8") as f:
        for qid, scores in run.items():
            for rank, doc_id in enumerate(rank_documents(scores), 1):
                f.write(f"{qid} Q0 {doc_id} {rank} {float(scores[doc_id])!r} {tag}\n")


DEFAULT_MAX_LENGTH = 512  # longest embedded input in tokens (prefix and EOS included), everywhere


def _embedded_batches(runtime, texts: Sequence[str], adapter, pooling: str, prefix: str, batch_size: int,
                      desc: str, progress: bool, max_length: int) -> Iterator[tuple[int, Any]]:
    """(start, float32 [n, d] embeddings) per batch of texts, with a progress bar; texts longer
    than max_length tokens are cut (runtime.truncated counts them)."""
    from tqdm import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
        for s in range(0, len(texts), batch_size):
            chunk = texts[s : s + batch_size]
            yield s, runtime.embed(chunk, adapter=adapter, pooling=pooling, prefix=prefix, max_tokens=max_length)
            bar.update(len(chunk))


def report_truncated(runtime, max_length: int) -> None:
    """One line on stderr when embedding inputs were cut to max_length (never an error)."""
    if runtime.truncated:
        print(f"note: {runtime.truncated} inputs were longer than --max-length {max_length} tokens and were cut",
              file=sys.stderr)


def index_corpus(runtime, corpus: Mapping[str, Mapping], adapter="retrieval", pooling: str = "last",
                 passage_prefix: str = "passage: ", space: str = "ip", batch_size: int = 64,
                 embedder: Any = None, progress: bool = True, max_length: int = DEFAULT_MAX_LENGTH) -> "HNSWIndex":
    """An HNSWIndex of a {doc_id: {"title", "text", "metadata"}} corpus, each document embedded as
    `passage_prefix + "title text"` (what `bsharedrag index` embeds), cut to max_length tokens.
    Batches go into the index as they are embedded, so only the index holds every vector."""
    from .index import HNSWIndex

    if not corpus:
        raise ValueError("corpus is empty: nothing to index")
    ids = list(corpus)
    for d in ids:
        if not isinstance(corpus[d], Mapping) or not isinstance(corpus[d].get("text"), str):
            raise ValueError(f'corpus[{d!r}] must be a dict with a "text" string')
    texts = [passage_text(corpus[d]) for d in ids]
    index = HNSWIndex(runtime.model.config.hidden_size, space=space, embedder=embedder)
    for s, vecs in _embedded_batches(runtime, texts, adapter, pooling, passage_prefix, batch_size,
                                     "embedding corpus", progress, max_length):
        batch = ids[s : s + len(vecs)]
        index.upsert(batch, vecs, [dict(corpus[d]) for d in batch])
    return index


def evaluate_retrieval(runtime, index_or_corpus, queries: Mapping[str, str], qrels: Qrels,
                       adapter="retrieval", ks: Any = (3, 5, 10), *, depth: int | None = None,
                       pooling: str = "last", query_prefix: str = "query: ", passage_prefix: str = "passage: ",
                       batch_size: int = 64, progress: bool = True,
                       max_length: int = DEFAULT_MAX_LENGTH) -> tuple[dict[str, float], dict]:
    """Embed each judged query with the shared engine, search the index (an HNSWIndex, or one built
    here from a {doc_id: doc} corpus) for the top `depth` (default max(ks)) documents and score the
    run; returns (metrics, run)."""
    import torch

    from .index import HNSWIndex

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
    vecs = torch.cat([v for _, v in _embedded_batches(runtime, [queries[q] for q in qids], adapter, pooling,
                                                       query_prefix, batch_size, "embedding queries", progress,
                                                       max_length)])
    hits = index.search(vecs, depth)
    run = {qid: dict(h) for qid, h in zip(qids, hits)}
    return retrieval_metrics(run, qrels, ks), run


# ============================================================================ generation

# sacrebleu's TokenizerZh table (astral ranges as intended), plus Hiragana/Katakana and Hangul syllables.
_CJK_RANGES = (
    (0x3400, 0x4DB5), (0x4E00, 0x9FA5), (0x9FA6, 0x9FBB), (0xF900, 0xFA2D), (0xFA30, 0xFA6A),
    (0xFA70, 0xFAD9), (0x20000, 0x2A6D6), (0x2F800, 0x2FA1D), (0xFF00, 0xFFEF), (0x2E80, 0x2EFF),
    (0x3000, 0x303F), (0x31C0, 0x31EF), (0x2F00, 0x2FDF), (0x2FF0, 0x2FFF), (0x3100, 0x312F),
    (0x31A0, 0x31BF), (0xFE10, 0xFE1F), (0xFE30, 0xFE4F), (0x2600, 0x26FF), (0x2700, 0x27BF),
    (0x3200, 0x32FF), (0x3300, 0x33FF), (0x3040, 0x30FF), (0xAC00, 0xD7AF),
)  # fmt: skip
_CJK = re.compile("[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in _CJK_RANGES) + "]")
# mteval-v13a's tokenization rules, as sacrebleu's TokenizerRegexp applies them.
_MTEVAL_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)
_WORD = re.compile(r"[^\W_]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)


def has_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


def bleu_tokens(line: str, cjk: bool) -> list[str]:
    """sacrebleu's tokenization of one segment: "zh" when cjk, else "13a"."""
    line = line.rstrip()
    if cjk:
        line = _CJK.sub(r" \g<0> ", line.strip())
    else:
        line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
        if "&" in line:
            line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    for pattern, repl in _MTEVAL_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], max_order: int = 3) -> float:
    """Corpus BLEU in [0, 1] as sacrebleu's BLEU(max_ngram_order=max_order) (exp smoothing)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not isinstance(max_order, int) or max_order < 1:
        raise ValueError(f"max_order must be an int >= 1, got {max_order!r}")
    cjk = any(has_cjk(r) for r in references)
    correct, total = [0] * max_order, [0] * max_order
    sys_len = ref_len = 0
    for pred, ref in zip(predictions, references):
        hyp, gold = bleu_tokens(pred, cjk), bleu_tokens(ref, cjk)
        sys_len, ref_len = sys_len + len(hyp), ref_len + len(gold)
        for n in range(1, max_order + 1):
            h, r = _ngrams(hyp, n), _ngrams(gold, n)
            total[n - 1] += sum(h.values())
            correct[n - 1] += sum(min(c, r[g]) for g, c in h.items())
    if not any(correct) or not all(total):  # sacrebleu scores both as 0
        return 0.0
    log_p, smooth = 0.0, 1.0
    for c, t in zip(correct, total):
        if c == 0:  # exp smoothing: each order with no match halves the pseudo-count again
            smooth *= 2
            log_p += math.log(1.0 / (smooth * t))
        else:
            log_p += math.log(c / t)
    bp = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len)
    return bp * math.exp(log_p / max_order)


def rouge_tokens(text: str) -> list[str]:
    """Lowercased tokens: each CJK character alone, other words as runs of letters and digits."""
    return _WORD.findall(_CJK.sub(r" \g<0> ", text.lower()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row of the shorter side)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair (0 when either side has no tokens, as rouge-score)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


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


def _report(metrics: Mapping[str, float], out: str | None, extra: Mapping[str, Any]) -> None:
    print(format_table(metrics))
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"metrics": dict(metrics), **extra}, f, indent=2, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {out}")


def cmd_eval_retrieval(args) -> int:
    from .cli import _load_runtime, load_index, resolve_embedding_args
    from .data import load_beir

    ks = parse_ks(args.k)
    if args.run_file:  # fail before the work, not after it
        _check_trec_word(args.run_tag, "run tag")
    data = load_beir(args.data, args.split)
    resolve_embedding_args(args, args.adapter)
    index_or_corpus = load_index(args, args.index, args.adapter) if args.index else data.corpus
    rt = _load_runtime(args, {"retrieval": args.adapter})
    adapter = "retrieval" if args.adapter else None
    metrics, run = evaluate_retrieval(rt, index_or_corpus, data.queries, data.qrels, adapter, ks, depth=args.depth,
                                      pooling=args.pooling, query_prefix=args.query_prefix,
                                      passage_prefix=args.passage_prefix, batch_size=args.batch_size,
                                      max_length=args.max_length)
    report_truncated(rt, args.max_length)
    if args.run_file:
        write_trec_run(run, args.run_file, args.run_tag)
        print(f"wrote {args.run_file}")
    _report(metrics, args.out, {"data": args.data, "split": args.split, "queries": len(data.queries),
                                "documents": len(data.corpus), "model": args.model, "adapter": args.adapter,
                                "index": args.index})
    return 0


ID_FIELDS = ("id", "_id", "query_id", "query-id", "qid")  # what BEIR-style QA files name a question's id


def record_id(rec: dict) -> str | None:
    """A QA or prediction record's id under whichever BEIR-style name it has (ID_FIELDS)."""
    rid = next((rec[k] for k in ID_FIELDS if rec.get(k) is not None), None)
    return None if rid is None else str(rid)


def _field(rec: dict, field: str, path: str, n: int) -> str:
    value = rec.get(field)
    if not isinstance(value, str):
        raise ValueError(f'{path}:{n}: "{field}" must be a string, got {value!r}')
    return value


def read_predictions(path: str, prediction_field: str = "prediction", references: str | None = None,
                     reference_field: str = "answer") -> tuple[list[str], list[str]]:
    """(predictions, references) from one JSONL with both fields, or from two JSONL files matched line by
    line (when records on both sides carry an "id", the ids must agree)."""
    from .data import enumerate_jsonl

    preds = list(enumerate_jsonl(path, "predictions"))
    if references is None:
        return ([_field(r, prediction_field, path, n) for n, r in preds],
                [_field(r, reference_field, path, n) for n, r in preds])
    refs = list(enumerate_jsonl(references, "references"))
    if len(preds) != len(refs):
        raise ValueError(f"{path} has {len(preds)} records but {references} has {len(refs)}")
    for (n, p), (m, r) in zip(preds, refs):
        pid, rid = record_id(p), record_id(r)
        if pid is not None and rid is not None and pid != rid:
            raise ValueError(f"{path}:{n} is id {pid!r} but {references}:{m} is id {rid!r}")
    return ([_field(r, prediction_field, path, n) for n, r in preds],
            [_field(r, reference_field, references, n) for n, r in refs])


def _rag_predictions(args) -> tuple[list[str], list[str]]:
    """Answer every question of --data with the RAG pipeline; optionally save the predictions."""
    from tqdm import tqdm

    from .cli import load_rag
    from .data import enumerate_jsonl

    if not args.index:
        raise ValueError("--data needs --index (predictions are generated with the RAG pipeline)")
    records = [(n, r, _field(r, args.question_field, args.data, n), _field(r, args.reference_field, args.data, n))
               for n, r in enumerate_jsonl(args.data, "QA data")]
    if not records:
        raise ValueError(f"{args.data}: no questions")
    rag = load_rag(args, args.retrieve_k)
    answers = []
    with tqdm(total=len(records), desc="answering", unit="question") as bar:
        for s in range(0, len(records), args.batch_size):
            chunk = records[s : s + args.batch_size]
            answers += rag.ask_many([q for _, _, q, _ in chunk])
            bar.update(len(chunk))
    if args.save_predictions:
        with open(args.save_predictions, "w", encoding="utf-8") as f:
            for (_, rec, q, ref), ans in zip(records, answers):
                out = {"id": record_id(rec), "question": q, args.prediction_field: ans.text,
                       args.reference_field: ref, "sources": [[d, s] for d, s in ans.sources]}
                f.write(json.dumps(out, ensure_ascii=False) + "\n")
        print(f"wrote {args.save_predictions}")
    return [a.text for a in answers], [ref for _, _, _, ref in records]


def cmd_eval_generation(args) -> int:
    if args.predictions:
        preds, refs = read_predictions(args.predictions, args.prediction_field, args.references, args.reference_field)
        source = {"predictions": args.predictions, "references": args.references or args.predictions}
    else:
        if args.references:
            raise ValueError("--references goes with --predictions; --data already holds the answers")
        preds, refs = _rag_predictions(args)
        source = {"data": args.data, "model": args.model, "retrieval_adapter": args.retrieval_adapter,
                  "generation_adapter": args.generation_adapter, "index": args.index}
    _report(generation_metrics(preds, refs), args.out, {"examples": len(refs), **source})
    return 0


def add_commands(sub) -> None:
    """Register `bsharedrag eval retrieval|generation` on the CLI's subparsers."""
    from .cli import _add_embedder_args, _add_index_load_args, _add_model_args, _add_prompt_args

    ev = sub.add_parser("eval", help="evaluate retrieval (BEIR data) or generation (predictions vs answers)")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)

    p = ev_sub.add_parser("retrieval", help="nDCG/Hit/Recall/MRR@k of the retriever on a BEIR dataset",
                          description="Embeds the judged queries (and the corpus, unless --index is given) with "
                                      "the shared engine, searches the HNSW index and scores the run as trec_eval.")
    _add_model_args(p)
    p.add_argument("--adapter", default=None, help="PEFT retrieval LoRA directory (default: base model)")
    p.add_argument("--data", required=True, help="BEIR directory: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    p.add_argument("--split", default="test", help="qrels split (default test)")
    p.add_argument("--index", default=None, help="index built by `bsharedrag index` (default: index the corpus here)")
    _add_index_load_args(p)
    p.add_argument("--k", default="3,5,10", help="cutoffs, comma separated (default 3,5,10)")
    p.add_argument("--depth", type=int, default=None, help="documents retrieved per query (default: the largest k)")
    _add_embedder_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="texts embedded per call")
    p.add_argument("--run-file", default=None, help="write the run in TREC format (qid Q0 doc rank score tag)")
    p.add_argument("--run-tag", default="bsharedrag", help="tag column of the run file")
    p.add_argument("--out", default=None, help="write the metrics as JSON")
    p.set_defaults(func=cmd_eval_retrieval)

    p = ev_sub.add_parser("generation", help="BLEU-3, ROUGE-L, exact and contains accuracy of answers",
                          description="Scores predictions against reference answers: from JSONL files, or "
                                      "generated here with the RAG pipeline from QA data (--data).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", help="JSONL with the prediction field (and the reference field "
                                           "unless --references is given)")
    src.add_argument("--data", help="QA JSONL (question + answer fields): answer each with the RAG pipeline")
    p.add_argument("--references", default=None, help="JSONL with the reference field, line by line with --predictions")
    p.add_argument("--prediction-field", default="prediction", help='(default "prediction")')
    p.add_argument("--reference-field", default="answer", help='(default "answer")')
    p.add_argument("--question-field", default="question", help='question field of --data (default "question")')
    p.add_argument("--out", default=None, help="write the metrics as JSON")
    rag = p.add_argument_group("RAG generation (with --data)")
    _add_model_args(rag)
    rag.add_argument("--retrieval-adapter", default=None, help="PEFT retrieval LoRA directory")
    rag.add_argument("--generation-adapter", default=None, help="PEFT generation LoRA directory")
    rag.add_argument("--index", default=None, help="index directory built by `bsharedrag index`")
    _add_index_load_args(rag)
    rag.add_argument("--retrieve-k", type=int, default=3, help="documents retrieved per question (default 3)")
    _add_prompt_args(rag)
    rag.add_argument("--context-tokens", type=int, default=768, help="token budget of the retrieved contexts")
    _add_embedder_args(rag)
    rag.add_argument("--max-new-tokens", type=int, default=128)
    rag.add_argument("--batch-size", type=int, default=16, help="questions answered together")
    rag.add_argument("--save-predictions", default=None, help="write question, prediction, answer, sources as JSONL")
    p.set_defaults(func=cmd_eval_generation)
