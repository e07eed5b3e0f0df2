"""Per-step multi-LoRA metadata: built once from the token->adapter map, reused by every layer.

Rows that use an adapter are stably sorted by adapter id, so each adapter owns one
contiguous segment [starts[a], starts[a] + counts[a]) of `sorted_idx`. Kernels walk
those segments (shrink/expand, Punica's SGMV layout); `active` lets them launch only
for adapters that have rows, and `no_lora` lets a layer skip the LoRA part entirely.

`build` reads the counts on the host (one sync) to size everything exactly; `bounded_build` builds
the same segments on the device with sizes that depend only on the shapes (T rows, L slots):
no sync, so a CUDA graph can capture it (engine/graphs.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAMeta:
    token_adapter: torch.Tensor  # int32 [T]: adapter slot per row, -1 = base only
    num_adapters: int  # L: adapter slots of the stacked lora_a / lora_b
    sorted_idx: torch.Tensor  # int32 [num_lora]: rows with an adapter, grouped by adapter
    counts: torch.Tensor  # int32 [L]: rows per adapter
    starts: torch.Tensor  # int32 [L]: start of each adapter's segment in sorted_idx
    active: torch.Tensor  # int32 [n_active]: adapters with at least one row
    num_lora: int  # rows with an adapter
    max_count: int  # largest segment: sizes the kernels' grids
    counts_list: tuple[int, ...]  # host copies, so per-adapter loops never sync the device
    starts_list: tuple[int, ...]  # (both empty in a bounded meta: the counts live on the device only)
    bounded: bool = False  # num_lora and max_count are bounds (T), not counts: inference kernels only

    @property
    def num_tokens(self) -> int:
        return self.token_adapter.shape[0]

    @property
    def no_lora(self) -> bool:
        return self.num_lora == 0

    @property
    def device(self) -> torch.device:
        return self.token_adapter.device

    @property
    def active_list(self) -> tuple[int, ...]:
        if self.bounded:
            raise ValueError("a bounded LoRAMeta has no host counts (inference only): build it with LoRAMeta.build")
        return tuple(a for a, c in enumerate(self.counts_list) if c > 0)

    @classmethod
    def bounded_build(cls, token_adapter: torch.Tensor, num_adapters: int) -> "LoRAMeta":
        """The segments built on token_adapter's device without reading anything back: every
        slot is `active` (kernels exit at once for an empty one), sorted_idx holds all T rows
        (those with an adapter first, grouped; kernels read only each adapter's segment), and
        num_lora = max_count = T bound the kernels' buffers and grids. The ids are not
        checked (that would sync): the engine builds them from slots it validated."""
        ta = token_adapter
        if not isinstance(ta, torch.Tensor) or ta.dtype != torch.int32 or ta.dim() != 1:
            raise ValueError(f"token_adapter must be an int32 [T] tensor, got {getattr(token_adapter, 'dtype', None)} "
                             f"{tuple(getattr(token_adapter, 'shape', ()))}")
        T, L = ta.shape[0], num_adapters
        key = torch.where(ta < 0, L, ta).long()  # base rows (-1) sort last
        counts = torch.zeros(L + 1, dtype=torch.int32, device=ta.device)
        counts.scatter_add_(0, key, torch.ones_like(ta))
        counts = counts[:L]
        starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
        return cls(token_adapter=ta, num_adapters=L, counts=counts, starts=starts,
                   sorted_idx=torch.argsort(key, stable=True).to(torch.int32),
                   active=torch.arange(L, dtype=torch.int32, device=ta.device),
                   num_lora=T, max_count=T, counts_list=(), starts_list=(), bounded=True)

    @classmethod
    def build(cls, token_adapter: torch.Tensor, num_adapters: int) -> "LoRAMeta":
        """Validate the token->adapter map and build the sorted segments (one host sync)."""
        if not isinstance(token_adapter, torch.Tensor):
            raise ValueError(f"token_adapter must be a torch.Tensor, got {type(token_adapter).__name__}")
        if token_adapter.dtype != torch.int32:
            raise ValueError(f"token_adapter must be int32, got {token_adapter.dtype}")
        if token_adapter.dim() != 1:
            raise ValueError(f"token_adapter must be 1-D [T], got shape {tuple(token_adapter.shape)}")
        if not isinstance(num_adapters, int) or isinstance(num_adapters, bool) or num_adapters < 0:
            raise ValueError(f"num_adapters must be an int >= 0, got {num_adapters!r}")
        ta = token_adapter.contiguous()
        # bincount over id + 1: slot 0 counts base rows, slot a + 1 counts adapter a
        per_id = torch.bincount(ta.clamp(-1, num_adapters).long() + 1, minlength=num_adapters + 2)
        stats = torch.cat([per_id, torch.stack([ta.min(), ta.max()]).long()]) if ta.numel() else per_id
        host = stats.tolist()
        if ta.numel():
            lo, hi = host[-2], host[-1]
            if lo < -1 or hi >= num_adapters:
                bad = lo if lo < -1 else hi
                raise ValueError(
                    f"token_adapter holds adapter id {bad}, outside [-1, {num_adapters}) "
                    f"for num_adapters={num_adapters}"
                )
        counts_list = tuple(int(c) for c in host[1 : num_adapters + 1])
        starts_list, total = [], 0
        for c in counts_list:
            starts_list.append(total)
            total += c
        # base rows (-1) sort last; stable so rows keep their order inside a segment
        key = torch.where(ta < 0, torch.full_like(ta, num_adapters), ta)
        sorted_idx = torch.argsort(key, stable=True)[:total].to(torch.int32)
        dev = ta.device
        counts = torch.tensor(counts_list, dtype=torch.int32, device=dev)
        return cls(
            token_adapter=ta,
            num_adapters=num_adapters,
            sorted_idx=sorted_idx,
            counts=counts,
            starts=torch.tensor(starts_list, dtype=torch.int32, device=dev),
            active=torch.tensor(
                [a for a, c in enumerate(counts_list) if c > 0], dtype=torch.int32, device=dev
            ),
            num_lora=total,
            max_count=max(counts_list, default=0),
            counts_list=counts_list,
            starts_list=tuple(starts_list),
        )
