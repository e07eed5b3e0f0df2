"""Paged KV cache with a byte budget (vLLM-style block table).

Storage is one tensor per layer for K and one for V, each `[num_blocks, block_size, KV, D]`,
allocated once from `budget_bytes`. A sequence owns a list of block ids (its block table);
token t of a sequence lives in block `table[t // block_size]`, row `t % block_size`.
Freed blocks go back to a free list (LIFO) and are reused by the next sequence.

Why paged blocks and not fixed per-sequence slots: with a byte budget, fixed slots must
reserve max_len tokens for every sequence (a 20-token embedding-sized prompt would pin
as much memory as a 2048-token one), so admission control would be in units of the
worst case. Blocks waste at most block_size - 1 tokens per sequence, so `can_fit`
answers for the actual lengths. The price is a gather of a sequence's blocks before
attention (no paged-attention kernel on CPU). Measured on this 2-core CPU (1 thread, fp32,
H=32 KV=8 D=128, block 16, scattered blocks, decode attention per layer, min of 20):
    decode rows x context   paged (per-seq gather + SDPA)   fixed slots (SDPA on views)
    4 x 64-128                     0.59 ms                         0.47 ms
    16 x 256-512                  10.7  ms                        10.3  ms
    32 x 256-512                  20.6  ms                        19.9  ms
    64 x 32-96                     8.1  ms                         7.6  ms
so the gather costs 3-25% of the attention alone; in a whole decode step GEMMs dominate
(8-layer d=512 Llama, 8 sequences: aten::mm 67% of step time, gathers + SDPA 17%).
The memory win decides it. Both paths of step's decode attention are in
model.attention.ATTENTION.

API:
    cache = KVCache(model.config, budget_bytes, dtype, device, block_size=16)
    sid = cache.allocate()            # or allocate(my_id); no blocks until tokens arrive
    cache.length(sid)                 # tokens stored for sid
    cache.can_fit(n, sid=None)        # would n more tokens (for sid, or a new sequence) fit?
    cache.blocks_needed(n, sid=None)  # blocks that would take; sum these across requests
    cache.free(sid)                   # blocks back to the free list
    cache.truncate(sid, n)            # keep its first n tokens (rejected draft tokens)
    cache.release_pages()             # empty: the CPU map's pages back to the OS
    cache.nbytes, cache.num_blocks, cache.num_free_blocks, cache.capacity_tokens
Running out of blocks raises CacheFullError (a RuntimeError) before anything is changed.
"""
from __future__ import annotations

import itertools
from typing import Hashable, Optional

import torch

from ..util.mapped import drop_pages, mapped_zeros


class CacheFullError(RuntimeError):
    """The KV cache budget cannot hold the requested tokens."""


def kv_bytes_per_token(model_config, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take over all layers (the one place this is computed)."""
    cfg, esize = model_config, torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * esize


class KVCache:
    def __init__(self, model_config, budget_bytes: int, dtype: torch.dtype = torch.float32, device="cpu",
                 block_size: int = 16):
        cfg = model_config
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"budget_bytes must be an int >= 0, got {budget_bytes!r}")
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.bytes_per_token = kv_bytes_per_token(cfg, dtype)
        self.bytes_per_block = self.bytes_per_token * block_size
        self.num_blocks = budget_bytes // self.bytes_per_block
        if self.num_blocks < 1:
            raise CacheFullError(
                f"KV cache budget of {budget_bytes} bytes is below one block "
                f"({self.bytes_per_block} bytes = {block_size} tokens x {self.bytes_per_token} bytes/token)"
            )
        shape = (self.num_blocks, block_size, self.num_kv_heads, self.head_dim)
        kv_shape = (2, self.num_layers) + shape  # one buffer: every layer's k, then v
        # on CPU, a map whose pages become resident as the cache fills (util.mapped)
        kv = mapped_zeros(kv_shape, dtype) if self.device.type == "cpu" else torch.zeros(kv_shape, dtype=dtype,
                                                                                          device=self.device)
        self.k, self.v = list(kv[0].unbind(0)), list(kv[1].unbind(0))
        self._storage = kv if self.device.type == "cpu" else None  # the map release_pages empties
        self._written = False  # a token was reserved since the map was last emptied
        self.device = self.k[0].device  # "cuda" -> "cuda:0", comparable with the model's device
        self._free = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}
        self._ids = itertools.count()

    # -- bookkeeping -------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def seq_ids(self) -> list:
        return list(self._tables)

    def allocate(self, seq_id: Optional[Hashable] = None) -> Hashable:
        """Register a sequence (no blocks yet); returns its id (a fresh int if None)."""
        if seq_id is None:
            seq_id = next(self._ids)
            while seq_id in self._tables:
                seq_id = next(self._ids)
        elif seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} is already allocated in the KV cache")
        self._tables[seq_id] = []
        self._lengths[seq_id] = 0
        return seq_id

    def free(self, seq_id: Hashable) -> None:
        self._check(seq_id)
        self._free.extend(reversed(self._tables.pop(seq_id)))
        del self._lengths[seq_id]

    def length(self, seq_id: Hashable) -> int:
        self._check(seq_id)
        return self._lengths[seq_id]

    def block_table(self, seq_id: Hashable) -> list[int]:
        self._check(seq_id)
        return list(self._tables[seq_id])

    def blocks_needed(self, extra_tokens: int, seq_id: Optional[Hashable] = None) -> int:
        """New blocks that extra_tokens more tokens need (for seq_id, or a new sequence)."""
        n = 0 if seq_id is None else self.length(seq_id)
        have = -(-n // self.block_size)
        return -(-(n + extra_tokens) // self.block_size) - have

    def can_fit(self, extra_tokens: int, seq_id: Optional[Hashable] = None) -> bool:
        return self.blocks_needed(extra_tokens, seq_id) <= len(self._free)

    def _check(self, seq_id):
        if seq_id not in self._tables:
            raise KeyError(f"sequence {seq_id!r} is not allocated in the KV cache")

    # -- used by the engine step (step.py) -------------------------------------------------

    def reserve(self, requests: list[tuple[Hashable, int]], on_host: bool = False) -> list[tuple[int, torch.Tensor]]:
        """Append n slots to each (seq_id, n): all or nothing. Returns per request
        (past_length, slot indices int64 [n] into the flattened [num_blocks * block_size]) on
        the cache's device, or on the CPU with on_host (the caller batches its own copies)."""
        need = 0
        seen = set()
        for sid, n in requests:
            self._check(sid)
            if sid in seen:
                raise ValueError(f"sequence {sid!r} appears twice in one step")
            seen.add(sid)
            need += self.blocks_needed(n, sid)
        if need > len(self._free):
            raise CacheFullError(
                f"KV cache full: this step needs {need} more blocks of {self.block_size} tokens, "
                f"{len(self._free)} of {self.num_blocks} are free (budget {self.nbytes} bytes); "
                f"free finished sequences or raise the budget"
            )
        out = []
        bs = self.block_size
        self._written = True
        for sid, n in requests:
            table, past = self._tables[sid], self._lengths[sid]
            for _ in range(self.blocks_needed(n, sid)):
                table.append(self._free.pop())
            # (in Python: a decode row's one slot took 5 tensor ops, ~80 us on a cold cache)
            slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(past, past + n)], dtype=torch.long)
            out.append((past, slots if on_host else slots.to(self.device)))
            self._lengths[sid] = past + n
        return out

    def release_pages(self) -> bool:
        """When no sequence holds a block: the CPU cache's pages go back to the OS, to become
        resident again as tokens are written (util.mapped.drop_pages). True if it released."""
        if self._storage is None or not self._written or len(self._free) < self.num_blocks:
            return False
        self._written = False
        return drop_pages(self._storage)

    def truncate(self, seq_id: Hashable, length: int) -> None:
        """Keep the first `length` tokens of seq_id (rejected draft tokens: engine/speculative.py);
        blocks past them go back to the free list."""
        self._check(seq_id)
        if not 0 <= length <= self._lengths[seq_id]:
            raise ValueError(f"truncate: length {length} outside 0..{self._lengths[seq_id]} of sequence {seq_id!r}")
        table = self._tables[seq_id]
        keep = -(-length // self.block_size)
        self._free.extend(reversed(table[keep:]))
        del table[keep:]
        self._lengths[seq_id] = length

    def snapshot(self, seq_ids) -> dict:
        """The lengths of seq_ids, for restore() if a step fails."""
        return {sid: self._lengths[sid] for sid in seq_ids if sid in self._tables}

    def restore(self, snap: dict) -> None:
        """Undo reserve()s since snapshot(): lengths back, newly taken blocks freed."""
        for sid, n in snap.items():
            if sid in self._tables:
                self.truncate(sid, n)
