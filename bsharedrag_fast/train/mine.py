"""Hard-negative mining: the current retriever's top-k per training query, positives removed."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..rag.pipeline import DEFAULT_MAX_LENGTH, embedding_settings, index_corpus, report_truncated


def mine_negatives(model: str, adapter: Optional[str], data: str, out: str, k: int = 30, split: str = "train",
                   skip: int = 0, query_prefix: Optional[str] = None, passage_prefix: Optional[str] = None,
                   pooling: Optional[str] = None, batch_size: int = 64, dtype: torch.dtype = torch.float32,
                   device: str = "cpu",
                   max_batch_tokens: int = 4096, max_length: int = DEFAULT_MAX_LENGTH) -> str:
    """Embed the corpus of a BEIR directory with model (+ PEFT retrieval adapter), index it
    (HNSW, inner product over L2-normalised vectors) and write, per judged query of
    `split`, {"qid", "negatives": [doc ids]}: its top (skip + k) documents minus its
    judged positives, minus the first `skip` ranks (the very top often holds unjudged
    positives). Returns out. The retriever trainer reads the file as `negatives`. Pooling and
    prefixes left None are the adapter's (rag.EMBEDDING_FILE), else the defaults."""
    from tqdm import tqdm

    from ..engine.runtime import SharedRuntime
    from ..rag.data import load_beir

    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not isinstance(skip, int) or skip < 0:
        raise ValueError(f"skip must be an int >= 0, got {skip!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fmt = embedding_settings(adapter or model, pooling=pooling, query_prefix=query_prefix,
                             passage_prefix=passage_prefix)
    beir = load_beir(data, split)
    rt = SharedRuntime.from_pretrained(model, {"retrieval": adapter}, dtype=dtype, device=device,
                                       max_batch_tokens=max_batch_tokens)
    name = "retrieval" if adapter else None
    index = index_corpus(rt, beir.corpus, adapter=name, pooling=fmt["pooling"], passage_prefix=fmt["passage_prefix"],
                         batch_size=batch_size, max_length=max_length)
    qids = list(beir.qrels)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for s in tqdm(range(0, len(qids), batch_size), desc="mining", unit="batch"):
            chunk = qids[s : s + batch_size]
            vecs = rt.embed([beir.queries[q] for q in chunk], adapter=name, pooling=fmt["pooling"],
                            prefix=fmt["query_prefix"], max_tokens=max_length)
            depth = skip + k + max(len(beir.qrels[q]) for q in chunk)  # room for the positives removed
            for qid, hits in zip(chunk, index.search(vecs, depth)):
                judged = beir.qrels[qid]
                ranked = [d for d, _ in hits][skip:]
                negs = [d for d in ranked if d not in judged or judged[d] <= 0][:k]
                f.write(json.dumps({"qid": qid, "negatives": negs}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    index.close()
    report_truncated(rt, max_length)
    return out
