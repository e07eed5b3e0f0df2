"""Embedding a corpus into an index, batch by batch: the loop of `bsharedrag index`, also run
by the peer benchmark's "index" workload (so what it times is what the command does)."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

from .hnsw import HNSWIndex


def index_documents(rt, idx: HNSWIndex, docs: Sequence[dict], texts: Sequence, *, adapter: Optional[str],
                    pooling: str = "last", prefix: Optional[str] = None, max_length: Optional[int] = None,
                    batch_size: int = 64, save_every: Optional[int] = None,
                    out: Optional[str] = None) -> Iterator[tuple]:
    """Embed texts[i] (a string, or exact token ids) for docs[i] (its "id" and what the store
    keeps) with the SharedRuntime rt, batch_size at a time, and upsert each batch into idx;
    every save_every documents (and at the end) idx is saved to out, when out is given.
    Yields (the batch's docs, their vectors [n, d]) after each upsert: iterate it to run it."""
    if len(docs) != len(texts):
        raise ValueError(f"docs and texts must have the same length, got {len(docs)} and {len(texts)}")
    since_save = 0
    for s in range(0, len(docs), batch_size):
        batch = docs[s : s + batch_size]
        vecs = rt.embed(texts[s : s + batch_size], adapter=adapter, pooling=pooling, prefix=prefix,
                        max_tokens=max_length)
        idx.upsert([d["id"] for d in batch], vecs, batch)
        since_save += len(batch)
        if out is not None and save_every is not None and since_save >= save_every:
            idx.save(out)
            since_save = 0
        yield batch, vecs
    if out is not None:
        idx.save(out)
