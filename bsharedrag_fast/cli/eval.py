"""`bsharedrag eval retrieval|generation`: the command lines over eval/metrics.py."""
from __future__ import annotations

import json
from typing import Any, Mapping

from ..eval.metrics import (check_trec_word, evaluate_retrieval, format_table, generation_metrics, parse_ks,
                            read_predictions, record_id, string_field, write_trec_run)
from ..rag.pipeline import report_truncated


def _report(metrics: Mapping[str, float], out: str | None, extra: Mapping[str, Any]) -> None:
    print(format_table(metrics))
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"metrics": dict(metrics), **extra}, f, indent=2, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {out}")


def cmd_eval_retrieval(args) -> int:
    from ..rag.data import load_beir
    from .args import index_from_args, resolve_embedding_args, runtime_from_args

    ks = parse_ks(args.k)
    if args.run_file:  # fail before the work, not after it
        check_trec_word(args.run_tag, "run tag")
    data = load_beir(args.data, args.split)
    resolve_embedding_args(args, args.adapter)
    index_or_corpus = index_from_args(args, args.index, args.adapter) if args.index else data.corpus
    rt = runtime_from_args(args, {"retrieval": args.adapter})
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


def _rag_predictions(args) -> tuple[list[str], list[str]]:
    """Answer every question of --data with the RAG pipeline; optionally save the predictions."""
    from tqdm import tqdm

    from ..rag.data import enumerate_jsonl
    from .args import rag_from_args

    if not args.index:
        raise ValueError("--data needs --index (predictions are generated with the RAG pipeline)")
    records = [(n, r, string_field(r, args.question_field, args.data, n), string_field(r, args.reference_field, args.data, n))
               for n, r in enumerate_jsonl(args.data, "QA data")]
    if not records:
        raise ValueError(f"{args.data}: no questions")
    rag = rag_from_args(args, args.retrieve_k)
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
    from .args import add_embedder_args, add_index_load_args, add_model_args, add_rag_args

    ev = sub.add_parser("eval", help="evaluate retrieval (BEIR data) or generation (predictions vs answers)")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)

    p = ev_sub.add_parser("retrieval", help="nDCG/Hit/Recall/MRR@k of the retriever on a BEIR dataset",
                          description="Embeds the judged queries (and the corpus, unless --index is given) with "
                                      "the shared engine, searches the HNSW index and scores the run as trec_eval.")
    add_model_args(p)
    p.add_argument("--adapter", default=None, help="PEFT retrieval LoRA directory (default: base model)")
    p.add_argument("--data", required=True, help="BEIR directory: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    p.add_argument("--split", default="test", help="qrels split (default test)")
    p.add_argument("--index", default=None, help="index built by `bsharedrag index` (default: index the corpus here)")
    add_index_load_args(p)
    p.add_argument("--k", default="3,5,10", help="cutoffs, comma separated (default 3,5,10)")
    p.add_argument("--depth", type=int, default=None, help="documents retrieved per query (default: the largest k)")
    add_embedder_args(p)
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
    add_rag_args(rag, index_required=False, k_flag="--retrieve-k")
    rag.add_argument("--batch-size", type=int, default=16, help="questions answered together")
    rag.add_argument("--save-predictions", default=None, help="write question, prediction, answer, sources as JSONL")
    p.set_defaults(func=cmd_eval_generation)
