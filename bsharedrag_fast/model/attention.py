"""Attention over packed sequences: one entry point (AttentionPlan.attend) for training,
cache-less forwards and engine steps over the paged KV cache.

A plan is built once per forward, by Backbone.hidden (every sequence cache-less) or by the
engine's step (engine/step: cached sequences over their block tables), and every layer
calls plan.attend(layer, q, k, v). There is never a [T, T] mask and never any padding:
each cache-less sequence is one F.scaled_dot_product_attention(is_causal=True,
enable_gqa=True) call on [1, heads, len, D] views of the packed q/k/v. Measured on this CPU
(2 cores, fp32, H=32 KV=8 D=128, ms per call; loop4 = this):
  lens            3-D loop   loop4   loop4+repeat_interleave  padded+mask  block-diag [T,T] mask
  1,7,33            1.19      0.41          0.84                 1.34          0.61
  16 x 4            1.56      0.76          0.72                 1.12          1.41
  16,64,128,200    24.7      11.0          12.3                 26.2          33.9
  8 seqs, T=1355   96.4      57.2          77.3                286.5            -
  2048           2068       367           373                  491             -
The 4-D batch dim matters: 3-D inputs miss torch's CPU flash kernel (3-5x slower).
Sequences longer than a Mistral sliding window get a banded [len, len] boolean mask
(allowed iff 0 <= q_pos - k_pos < window), matching transformers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops

# How an engine step runs the attention of decode rows (1 new token on a cached sequence):
# "kernel": every decode row in one ops.paged_decode_attention call (the C++ kernel reads
# the cache through the block tables: no gather, no padding, no per-sequence loop);
# "loop": one SDPA per sequence on its own gathered blocks; "batched": one gather of all
# decode rows' padded block tables + one SDPA with a key-length mask; "auto": the kernel on
# CPU (fp32 / fp16 / bf16), batched elsewhere (until a GPU kernel is written). Measured on a
# 2-core CPU before the kernel (1 thread, fp32, H=32 KV=8 D=128,
# block 16, scattered blocks, min of 20, ms per layer):
#   decode rows x context     loop   batched(fresh gather)  batched(reused workspace)
#   4 x 64-128                0.59         1.08                   0.60
#   16 x 256-512             10.7         22-49                  16.6
#   32 x 256-512             20.6        100                     34.0
#   64 x 32-96                 8.1        17-25                  13.4
# On that CPU the padded gather cost more than the per-call overhead it saved (SDPA alone on
# the padded batch was already >= the loop), so CPU looped until the kernel replaced both
# (docs/benchmarks.md, decode attention); on a GPU the launch overhead of B tiny SDPAs
# dominates and the batched path is the usual choice (not yet measured).
# Whole generate() on an 8-layer d=512 Llama (fp32, 1 thread): 8 prompts of 20-120 tokens
# x 64 new: loop 1.93 s, batched 2.39 s; 16 prompts of 200-500 x 32 new: 6.49 s vs 7.25 s.
DECODE_ATTENTION = "auto"

_FULL = "full"  # mask sentinel: every key is visible (a decode query inside the window)


def _causal_mask(n: int, past: int, window: Optional[int], device):
    """Bool [n, past + n] (query i at position past + i may see key j), None when plain
    top-left is_causal is exact (no past, no window cut), or _FULL when n == 1 and the
    query sees every key."""
    if past == 0 and (window is None or n <= window):
        return None
    if n == 1 and (window is None or past < window):
        return _FULL
    qpos = torch.arange(past, past + n, device=device)[:, None]
    diff = qpos - torch.arange(past + n, device=device)[None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask


@dataclass
class AttentionPlan:
    """One forward's attention, built once and used by every layer (`attend`).

    - cache-less sequences (training, embeddings, Backbone.hidden): one SDPA per sequence on
      views of this forward's k/v, is_causal (a banded mask past a sliding window);
    - cached sequences with n > 1 new tokens (prefill / chunked prefill): write k/v into
      the cache, gather the sequence's blocks (past + n keys) and run one SDPA with an
      offset causal mask (no gather when past == 0);
    - cached sequences with 1 new token (decode): with DECODE_ATTENTION "kernel" (CPU
      default) all of them in ONE ops.paged_decode_attention call over the cache through
      their block tables; with "batched" (other devices) in ONE SDPA over their gathered,
      padded block tables [Bd, KV, max_blocks * block_size, D] with a key-length mask; with
      "loop" as the previous case, without a mask unless a sliding window cuts. See the
      measurements above DECODE_ATTENTION.
    Sliding windows are applied by masking; the per-sequence path gathers only the blocks
    that still hold keys inside the window (they stay allocated: no eviction yet).
    """

    window: Optional[int]
    k_cache: Optional[list]  # per layer [num_blocks, block_size, KV, D] (the engine's KVCache.k / .v)
    v_cache: Optional[list]
    self_seqs: list  # (s, e)
    chunk_seqs: list  # (s, e, past, first key position k0, blocks tensor from k0, mask)
    slot_rows: Optional[torch.Tensor]  # rows of this step that go into the cache
    slots: Optional[torch.Tensor]  # their flat cache slots
    dec_rows: Optional[torch.Tensor]  # [Bd]
    dec_table: Optional[torch.Tensor]  # [Bd, max_blocks]
    dec_mask: Optional[torch.Tensor]  # [Bd, 1, 1, max_blocks * block_size] ("batched")
    dec_lens: Optional[torch.Tensor] = None  # int32 [Bd] keys per decode row ("kernel"; dec_table int32 then)

    @classmethod
    def packed(cls, cu: list, window: Optional[int]) -> "AttentionPlan":
        """Every sequence attends to itself only (no cache)."""
        return cls(window, None, None, [(cu[b], cu[b + 1]) for b in range(len(cu) - 1)], [],
                   None, None, None, None, None)

    @classmethod
    def paged(cls, cu: list, past: list, tables: dict, slots: Optional[torch.Tensor], k_cache: list,
              v_cache: list, block_size: int, window: Optional[int], device) -> "AttentionPlan":
        """Sequences over the paged cache: tables {b: block table} for the cached ones (the
        others attend to themselves), past[b] tokens already cached; slots: the flat cache
        slots of the cached sequences' new rows, in row order."""
        B = len(cu) - 1
        lens = [cu[b + 1] - cu[b] for b in range(B)]
        cached = sorted(tables)
        self_seqs = [(cu[b], cu[b + 1]) for b in range(B) if b not in tables]
        chunk_seqs, dec = [], []
        mode = DECODE_ATTENTION
        if mode == "auto":
            on_cpu = torch.device(device).type == "cpu" and k_cache[0].dtype in (
                torch.float32, torch.float16, torch.bfloat16)
            mode = "kernel" if on_cpu else "batched"
        if mode not in ("kernel", "loop", "batched"):
            raise ValueError(f"DECODE_ATTENTION must be 'auto', 'kernel', 'loop' or 'batched', got {DECODE_ATTENTION!r}")
        slot_rows = dec_rows = dec_table = dec_mask = dec_lens = None
        if cached:
            slot_rows = torch.cat([torch.arange(cu[b], cu[b + 1]) for b in cached]).to(device)
            for b in cached:
                if lens[b] == 1 and mode != "loop":
                    dec.append(b)
                else:
                    blocks = torch.tensor(tables[b], dtype=torch.long, device=device)
                    mask = _causal_mask(lens[b], past[b], window, device)
                    k0 = 0  # first gathered key position: skip whole blocks left of the window
                    if window is not None and past[b] > 0 and isinstance(mask, torch.Tensor):
                        fb = max(0, past[b] - window + 1) // block_size
                        k0 = fb * block_size
                        blocks, mask = blocks[fb:], mask[:, k0:]
                    chunk_seqs.append((cu[b], cu[b + 1], past[b], k0, blocks, mask))
        if dec:
            nmax = max(len(tables[b]) for b in dec)
            padded = [tables[b] + [0] * (nmax - len(tables[b])) for b in dec]
            dec_rows = torch.tensor([cu[b] for b in dec], dtype=torch.long, device=device)
            if mode == "kernel":  # the C ABI's int32 tables and key counts, on the CPU
                dec_table = torch.tensor(padded, dtype=torch.int32)
                dec_lens = torch.tensor([past[b] + 1 for b in dec], dtype=torch.int32)
            else:
                dec_table = torch.tensor(padded, dtype=torch.long, device=device)
                ctx = torch.tensor([past[b] + 1 for b in dec], device=device)[:, None]
                kpos = torch.arange(nmax * block_size, device=device)[None, :]
                mask = kpos < ctx
                if window is not None:
                    mask &= (ctx - 1 - kpos) < window
                dec_mask = mask[:, None, None, :]
        return cls(window, k_cache, v_cache, self_seqs, chunk_seqs, slot_rows, slots, dec_rows, dec_table,
                   dec_mask, dec_lens)

    def attend(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Layer li: q [T, H, D], k/v [T, KV, D] (rotary applied) -> [T, H * D]; the cached
        sequences' new k/v are written into the cache first. Differentiable (training runs
        the cache-less path under autograd)."""
        T, H, D = q.shape
        KV = k.shape[1]
        gqa = KV != H
        out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
        kc = vc = None
        if self.slots is not None:
            kc, vc = self.k_cache[li], self.v_cache[li]  # [num_blocks, block_size, KV, D]
            kc.view(-1, KV, D).index_copy_(0, self.slots, k.index_select(0, self.slot_rows))
            vc.view(-1, KV, D).index_copy_(0, self.slots, v.index_select(0, self.slot_rows))

        def sdpa(qs, ks, vs, mask):  # [n, H, D], [L, KV, D] -> [n, H, D]
            qs, ks, vs = (t[None].transpose(1, 2) for t in (qs, ks, vs))
            if mask is None:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
            elif mask is _FULL:
                o = F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=gqa)
            else:
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa)
            return o[0].transpose(0, 1)

        for s, e in self.self_seqs:
            out[s:e] = sdpa(q[s:e], k[s:e], v[s:e], _causal_mask(e - s, 0, self.window, q.device))
        for s, e, past, k0, blocks, mask in self.chunk_seqs:
            if past == 0:
                out[s:e] = sdpa(q[s:e], k[s:e], v[s:e], mask)
            else:
                n = past + e - s - k0
                ks = kc.index_select(0, blocks).view(-1, KV, D)[:n]
                vs = vc.index_select(0, blocks).view(-1, KV, D)[:n]
                out[s:e] = sdpa(q[s:e], ks, vs, mask)
        if self.dec_lens is not None:  # every decode row in one kernel call
            o = ops.paged_decode_attention(q.index_select(0, self.dec_rows), kc, vc, self.dec_table, self.dec_lens,
                                           self.window)
            out.index_copy_(0, self.dec_rows, o)
        elif self.dec_rows is not None:
            Bd, nb = self.dec_table.shape
            ks = kc[self.dec_table].view(Bd, -1, KV, D).transpose(1, 2)  # [Bd, KV, L, D]
            vs = vc[self.dec_table].view(Bd, -1, KV, D).transpose(1, 2)
            qs = q.index_select(0, self.dec_rows)[:, :, None]  # [Bd, H, 1, D]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=self.dec_mask, enable_gqa=gqa)
            out.index_copy_(0, self.dec_rows, o[:, :, 0])
        return out.view(T, H * D)
