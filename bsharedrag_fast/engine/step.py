"""One engine step: the scheduler's packed batch made into a ForwardContext, run, and
rolled back if it fails (vLLM's forward context: the model only computes).

    out = run_step(model, input_ids, cu_seqlens, seq_ids, cache, adapters, logits_rows=[...])

build_step checks the batch, reserves the new tokens' slots in the engine's KV cache and
builds the context once: each row's position (past + offset for cached sequences), the
LoRA metadata, and the attention plan (the rows' cache slots, each cached sequence's block
table and past length). Prefill, chunked prefill, decode and cache-less rows (embeddings)
share one step. The KV cache belongs to the engine: only this module reserves, snapshots
and restores it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import ops
from ..model.attention import AttentionPlan
from ..model.backbone import Backbone, ForwardContext, check_packed, positions_from_cu_seqlens
from .kv_cache import KVCache


@dataclass
class StepOutput:
    logits: torch.Tensor  # [len(logits_rows) or T, vocab]
    hidden: Optional[torch.Tensor]  # [T, d] when return_hidden


def build_step(model: Backbone, cu: list, seq_ids: Sequence, cache: Optional[KVCache],
               adapters=None) -> ForwardContext:
    """The context of one step over B packed sequences (cu: their offsets).

    seq_ids: one entry per sequence: a KV cache sequence id (allocated in `cache`) or None
    for a cache-less row (e.g. an embedding request). A cached sequence's n new tokens take
    positions cache.length(sid) .. + n - 1 and are reserved in the cache here (all or
    nothing: CacheFullError before anything changes); the caller restores the cache if the
    step fails (run_step does). adapters: as Backbone.lora_meta."""
    cfg, dev = model.config, model.device
    B = len(cu) - 1
    seq_ids = list(seq_ids)
    if len(seq_ids) != B:
        raise ValueError(f"seq_ids must have one entry per sequence ({B}), got {len(seq_ids)}")
    cached = [b for b in range(B) if seq_ids[b] is not None]
    if cached:
        if cache is None:
            raise ValueError("seq_ids name cache sequences but no cache was given")
        if (cache.num_layers, cache.num_kv_heads, cache.head_dim) != (
                cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim):
            raise ValueError("cache was built for a different model config")
        if cache.dtype != model.dtype or cache.device != dev:
            raise ValueError(f"cache is {cache.dtype} on {cache.device}, model is {model.dtype} on {dev}")
    lora = model.lora_meta(adapters, cu)
    lens = [cu[b + 1] - cu[b] for b in range(B)]
    past = [0] * B
    if cached:
        reserved = cache.reserve([(seq_ids[b], lens[b]) for b in cached])
        for b, (p, _) in zip(cached, reserved):
            past[b] = p
        tables = {b: cache.block_table(seq_ids[b]) for b in cached}
        slots = torch.cat([sl for _, sl in reserved]).to(dev)
        plan = AttentionPlan.paged(cu, past, tables, slots, cache.k, cache.v, cache.block_size, cfg.sliding_window,
                                   dev)
    else:
        plan = AttentionPlan.packed(cu, cfg.sliding_window)
    return ForwardContext(positions_from_cu_seqlens(cu, dev, past), plan, lora=lora)


@torch.inference_mode()
def run_step(model: Backbone, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, seq_ids: Sequence,
             cache: Optional[KVCache] = None, adapters=None, logits_rows=None, return_hidden: bool = False,
             final_norm: bool = True) -> StepOutput:
    """One engine step (see build_step): a cached sequence's new tokens attend causally to its
    cached K/V plus themselves and are appended to the cache; a None sequence attends only
    to itself, exactly as Backbone.forward. A step that fails restores the cache's lengths
    and block tables. logits_rows: rows to run the LM head on (None: every row; []: none).
    return_hidden: also the hidden states [T, d] (after the final norm unless final_norm=False,
    for ops.pool(norm_weight=...))."""
    cu = check_packed(input_ids, cu_seqlens)
    cached = [sid for sid in seq_ids if sid is not None]
    snap = cache.snapshot(cached) if cached and cache is not None else {}
    try:
        h = model.compute(input_ids, build_step(model, cu, seq_ids, cache, adapters))
    except BaseException:
        if snap:
            cache.restore(snap)  # a failed step leaves the cache as it was
        raise
    hidden = None
    if return_hidden:
        hidden = ops.rms_norm(h, model.norm, model.config.rms_norm_eps) if final_norm else h
    return StepOutput(logits=model.logits(h, logits_rows), hidden=hidden)
