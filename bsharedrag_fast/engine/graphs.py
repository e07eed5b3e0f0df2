"""Decode steps from static buffers, captured as CUDA graphs per batch-size bucket.

A decode step (every sequence cached, one new token each) has the same shapes from step to
step for a given batch size: only the values change (token ids, positions, cache slots,
block tables, key counts, adapter slots). DecodeGraphs keeps those values in static device
buffers sized for the largest bucket, pads a step of B sequences to the next bucket (padded
rows: base model, one key, their k / v written to a scratch slot the runner holds in the
cache), and runs the model on the buffers with metadata built on the device without reading
anything back: the attention plan is one Triton paged-attention call over the static block
tables (AttentionPlan.decode), the LoRA metadata is LoRAMeta.bounded_build (grids sized by T
and the slot count, not by the counts). With mode "cuda" each bucket is captured once
(torch.cuda.graph, after a warm-up run that compiles the kernels) and later steps replay it:
one launch of the whole graph instead of ~30 kernel launches per layer. Mode "static" runs the
same code eagerly on any device: what tests check (no host sync in it) on CPU under
TRITON_INTERPRET=1.

Graphs are dropped and recaptured when the resident adapters change (their tensors are
baked into the graph). Sampling stays outside the graph: the step's one sync is reading the
chosen tokens.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..model.attention import AttentionPlan
from ..model.backbone import Backbone, ForwardContext
from ..ops import LoRAMeta
from .kv_cache import KVCache

MODES = ("off", "static", "cuda")
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_PAD_SEQ = ("decode-graphs", "padding")  # the runner's own cache sequence: one block for padded rows


class DecodeGraphs:
    """Static-buffer decode steps for batches of up to max(buckets) sequences.

    model, cache: the engine's; mode "static" (eager, any device) or "cuda" (capture and
    replay, CUDA only); buckets: the batch sizes captured (a step of B sequences runs in the
    smallest bucket >= B); max_context: longest sequence (sizes the block-table buffer)."""

    def __init__(self, model: Backbone, cache: KVCache, mode: str = "cuda",
                 buckets: Sequence[int] = DEFAULT_BUCKETS, max_context: Optional[int] = None):
        if mode not in ("static", "cuda"):
            raise ValueError(f"mode must be 'static' or 'cuda', got {mode!r}")
        if mode == "cuda" and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, got {model.device}")
        buckets = sorted(set(int(b) for b in buckets))
        if not buckets or buckets[0] < 1:
            raise ValueError(f"buckets must be ints >= 1, got {buckets}")
        self.model, self.cache, self.mode, self.buckets = model, cache, mode, buckets
        cfg, dev, bmax = model.config, model.device, buckets[-1]
        max_context = int(max_context or cfg.max_position_embeddings)
        self.max_blocks = -(-max_context // cache.block_size)
        # the padded rows' k / v go to a block of their own, never read by a real sequence
        cache.allocate(_PAD_SEQ)
        (_, pad), = cache.reserve([(_PAD_SEQ, 1)], on_host=True)
        self.pad_slot = int(pad[0])
        self.pad_block = self.pad_slot // cache.block_size
        i32, i64 = dict(dtype=torch.int32, device=dev), dict(dtype=torch.long, device=dev)
        self.ids = torch.zeros(bmax, **i64)
        self.positions = torch.zeros(bmax, **i64)
        self.slots = torch.full((bmax,), self.pad_slot, **i64)
        self.tables = torch.full((bmax, self.max_blocks), self.pad_block, **i32)
        self.lens = torch.ones(bmax, **i32)
        self.token_adapter = torch.full((bmax,), -1, **i32)
        self.cu = torch.arange(bmax + 1, **i32)
        self._graphs: dict[int, tuple] = {}  # bucket -> (graph or None, logits buffer)
        self._adapters = None  # the ResidentAdapters the graphs were captured with
        self._pool = None
        self.captures = 0  # graphs captured so far (tests, logs)

    def close(self) -> None:
        """Give the scratch block back to the cache."""
        self._graphs.clear()
        self.cache.free(_PAD_SEQ)

    def bucket(self, batch: int) -> Optional[int]:
        """The smallest bucket that holds `batch` sequences (None: too many)."""
        return next((b for b in self.buckets if b >= batch), None)

    def takes(self, seq_ids: Sequence) -> bool:
        """Whether a decode step of these cached sequences fits the buckets and max_context."""
        if not seq_ids or self.bucket(len(seq_ids)) is None:
            return False
        return max(self.cache.length(sid) for sid in seq_ids) < self.max_blocks * self.cache.block_size

    def _forward(self, n: int) -> torch.Tensor:
        """The model over the first n static rows: what a graph captures (no host sync)."""
        model = self.model
        lora = None
        if model.num_lora_slots:
            lora = LoRAMeta.bounded_build(self.token_adapter[:n], model.num_lora_slots)
        plan = AttentionPlan.decode(self.cu[: n + 1], self.tables[:n], self.lens[:n], self.slots[:n], self.cache.k,
                                    self.cache.v, model.config.sliding_window)
        h = model.compute(self.ids[:n], ForwardContext(self.positions[:n], plan, lora=lora))
        return model.logits(h)

    def _capture(self, n: int) -> tuple:
        if self.mode == "static":
            return None, None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up on a side stream: Triton compiles here, not in the capture
            self._forward(n)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(n)
        self._pool = graph.pool()  # buckets share one memory pool
        self.captures += 1
        return graph, out

    def run(self, seq_ids: Sequence, token_ids: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        """One decode step: sequence i (a cache id) gets token token_ids[i] with adapter slot
        slots[i] (-1: base). Reserves the rows' cache slots (restored if the step fails) and
        returns the logits [B, vocab]. B must fit the largest bucket."""
        B = len(seq_ids)
        n = self.bucket(B)
        if n is None or B == 0:
            raise ValueError(f"a decode-graph step takes 1..{self.buckets[-1]} sequences, got {B}")
        num_slots = self.model.num_lora_slots
        bad = [a for a in slots if not -1 <= int(a) < num_slots]
        if bad:  # (bounded_build trusts the ids: a wrong one would read past the stacks)
            raise ValueError(f"adapter slot {bad[0]} is outside [-1, {num_slots})")
        if self.model.resident_adapters is not self._adapters:  # adapters swapped: their tensors are in the graphs
            self._graphs.clear()
            self._adapters = self.model.resident_adapters
        cache = self.cache
        snap = cache.snapshot(seq_ids)
        try:
            reserved = cache.reserve([(sid, 1) for sid in seq_ids], on_host=True)
            tables = [cache.block_table(sid) for sid in seq_ids]
            w = max(len(t) for t in tables)  # table columns past w are never read (no sequence has that many)
            if w > self.max_blocks:
                raise ValueError(f"a sequence holds {w} blocks, past the decode graphs' max_context "
                                 f"({self.max_blocks} blocks; see takes())")
            # every value of the step in one host tensor, padded rows included (a larger step may have
            # left its values there): one copy to the device, then one per buffer on the device
            rows = [[tok, past, int(sl[0]), past + 1, a] + t + [self.pad_block] * (w - len(t))
                    for tok, (past, sl), a, t in zip(token_ids, reserved, slots, tables)]
            rows += [[0, 0, self.pad_slot, 1, -1] + [self.pad_block] * w] * (n - B)
            step = torch.tensor(rows, dtype=torch.long).to(self.ids.device, non_blocking=True)
            for buf, col in ((self.ids, 0), (self.positions, 1), (self.slots, 2), (self.lens, 3),
                             (self.token_adapter, 4)):
                buf[:n].copy_(step[:, col])
            self.tables[:n, :w].copy_(step[:, 5:])
            if n not in self._graphs:
                self._graphs[n] = self._capture(n)
            graph, out = self._graphs[n]
            if graph is None:
                out = self._forward(n)
            else:
                graph.replay()
            return out[:B]
        except BaseException:
            cache.restore(snap)
            raise
