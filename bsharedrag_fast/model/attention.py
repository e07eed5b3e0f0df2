"""Attention over packed sequences: one entry point (AttentionPlan.attend) for training,
cache-less forwards and engine steps over the paged KV cache.

A plan is built once per forward, by Backbone.hidden (every sequence cache-less) or by the
engine's step (engine/step: cached sequences over their block tables), and every layer
calls plan.attend(layer, q, k, v). There is never a [T, T] mask and never any padding.

With ATTENTION "kernel" (the default on CPU, and on CUDA where triton is installed) every
row of a layer goes through ops.paged_attention, the varlen kernel (C++ on CPU, Triton on a
GPU): one call for the sequences over the paged cache
(prefill chunks and decode rows together), one for the cache-less sequences (their packed
k / v read as a cache of one-token blocks). No per-sequence Python loop, no gather, and on
CUDA no host sync (a decode step can be captured in a CUDA graph: engine/graphs.py).
Under autograd (training) and without a kernel each cache-less sequence is one
F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) call on [1, heads, len, D]
views of the packed q/k/v. Measured before the kernel on this CPU (2 cores, fp32, H=32 KV=8
D=128, ms per call; loop4 = that SDPA loop):
  lens            3-D loop   loop4   loop4+repeat_interleave  padded+mask  block-diag [T,T] mask
  1,7,33            1.19      0.41          0.84                 1.34          0.61
  16 x 4            1.56      0.76          0.72                 1.12          1.41
  16,64,128,200    24.7      11.0          12.3                 26.2          33.9
  8 seqs, T=1355   96.4      57.2          77.3                286.5            -
  2048           2068       367           373                  491             -
The 4-D batch dim matters: 3-D inputs miss torch's CPU flash kernel (3-5x slower). The
kernel against loop4 (AVX2, 2 threads, SmolLM2's H=9 KV=3 D=64): docs/benchmarks.md.
Sequences longer than a Mistral sliding window get a banded [len, len] boolean mask on the
SDPA path (allowed iff 0 <= q_pos - k_pos < window), matching transformers; the kernel
applies the same rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops

# How attention runs. "kernel": ops.paged_attention (C++), every row of a layer in one call
# per source (the paged cache; the packed k / v of cache-less sequences), except under
# autograd, where cache-less sequences take the SDPA loop; "loop": one SDPA per sequence
# (cached ones on their gathered blocks); "batched": as "loop", but the decode rows (1 new
# token on a cached sequence) in ONE SDPA over their gathered, padded block tables with a
# key-length mask; "auto": the kernel for fp32 / fp16 / bf16 on CPU, and on CUDA where triton
# is installed; batched elsewhere. Decode rows, measured on a 2-core CPU before the
# kernel (1 thread, fp32, H=32 KV=8 D=128, block 16, scattered blocks, min of 20, ms per layer):
#   decode rows x context     loop   batched(fresh gather)  batched(reused workspace)
#   4 x 64-128                0.59         1.08                   0.60
#   16 x 256-512             10.7         22-49                  16.6
#   32 x 256-512             20.6        100                     34.0
#   64 x 32-96                 8.1        17-25                  13.4
# On that CPU the padded gather cost more than the per-call overhead it saved; on a GPU the
# launch overhead of B tiny SDPAs dominates and the batched path is the usual choice (not
# yet measured). The kernel against both: docs/benchmarks.md (decode attention).
ATTENTION = "auto"
_MODES = ("kernel", "loop", "batched")
# ops.paged_attention's backend in "kernel" mode: "auto" (C++ on CPU, Triton on CUDA), or
# "triton" to run the GPU kernel on CPU tensors under TRITON_INTERPRET=1 (tests).
KERNEL_BACKEND = "auto"

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


def _mode(device, dtype) -> str:
    mode = ATTENTION
    if mode == "auto":
        kind = torch.device(device).type
        fast = dtype in (torch.float32, torch.float16, torch.bfloat16)
        kernel = kind == "cpu" or (kind == "cuda" and ops.triton_available())
        mode = "kernel" if fast and kernel else "batched"
    if mode not in _MODES:
        raise ValueError(f"ATTENTION must be 'auto', 'kernel', 'loop' or 'batched', got {ATTENTION!r}")
    return mode


def _int32(values, device=None) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


@dataclass
class _KernelCall:
    """One ops.paged_attention call: the rows it covers (None: all of them, in order), their
    sequences' cu_seqlens, block tables and key counts (int32, the C ABI's)."""

    rows: Optional[torch.Tensor]
    cu: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor


@dataclass
class AttentionPlan:
    """One forward's attention, built once and used by every layer (`attend`).

    - cache-less sequences (training, embeddings, Backbone.hidden): with the kernel, one
      ops.paged_attention call over this forward's packed k/v (one-token blocks); under
      autograd or off CPU one SDPA per sequence on views of k/v, is_causal (a banded mask
      past a sliding window);
    - cached sequences (prefill, chunked prefill, decode): their new k/v are written into the
      cache first; with the kernel, all of them in ONE ops.paged_attention call through their
      block tables. Otherwise: n > 1 new rows gather the sequence's blocks and run one SDPA
      with an offset causal mask (no gather when past == 0); decode rows run in ONE SDPA over
      their gathered, padded block tables ("batched") or one SDPA each ("loop").
    Sliding windows are applied by masking (the kernel skips keys left of the window); the
    SDPA path gathers only the blocks that still hold keys inside the window (they stay
    allocated: no eviction yet).
    """

    window: Optional[int]
    mode: Optional[str]  # None: decided at the first attend from q's device and dtype (packed plans)
    cu: list  # every sequence's rows
    self_seqs: list  # (s, e) of the cache-less sequences
    k_cache: Optional[list] = None  # per layer [num_blocks, block_size, KV, D] (the engine's KVCache.k / .v)
    v_cache: Optional[list] = None
    slot_rows: Optional[torch.Tensor] = None  # rows of this step that go into the cache (None: every row, in order)
    slots: Optional[torch.Tensor] = None  # their flat cache slots
    paged_call: Optional[_KernelCall] = None  # "kernel": every cached sequence
    chunk_seqs: list = field(default_factory=list)  # SDPA: (s, e, past, first key position k0, blocks from k0, mask)
    dec_rows: Optional[torch.Tensor] = None  # "batched": the decode rows [Bd] ("loop" runs them as chunks)
    dec_table: Optional[torch.Tensor] = None  # [Bd, max_blocks]
    dec_mask: Optional[torch.Tensor] = None  # [Bd, 1, 1, max_blocks * block_size]
    _self_call: Optional[_KernelCall] = None  # "kernel": the cache-less sequences, built at the first attend

    @classmethod
    def packed(cls, cu: list, window: Optional[int]) -> "AttentionPlan":
        """Every sequence attends to itself only (no cache)."""
        return cls(window, None, list(cu), [(cu[b], cu[b + 1]) for b in range(len(cu) - 1)])

    @classmethod
    def paged(cls, cu: list, past: list, tables: dict, slots: Optional[torch.Tensor], k_cache: list,
              v_cache: list, block_size: int, window: Optional[int], device) -> "AttentionPlan":
        """Sequences over the paged cache: tables {b: block table} for the cached ones (the
        others attend to themselves), past[b] tokens already cached; slots: the flat cache
        slots of the cached sequences' new rows, in row order."""
        B = len(cu) - 1
        lens = [cu[b + 1] - cu[b] for b in range(B)]
        cached = sorted(tables)
        plan = cls(window, _mode(device, k_cache[0].dtype), list(cu),
                   [(cu[b], cu[b + 1]) for b in range(B) if b not in tables], k_cache, v_cache)
        if not cached:
            return plan
        if len(cached) < B:  # (when every row goes into the cache, in order, slot_rows stays None: no gather)
            plan.slot_rows = torch.cat([torch.arange(cu[b], cu[b + 1]) for b in cached]).to(device)
        plan.slots = slots
        if plan.mode == "kernel":
            nmax = max(len(tables[b]) for b in cached)
            ccu = [0]
            for b in cached:
                ccu.append(ccu[-1] + lens[b])
            plan.paged_call = _KernelCall(plan.slot_rows, _int32(ccu, device),
                                          _int32([tables[b] + [0] * (nmax - len(tables[b])) for b in cached], device),
                                          _int32([past[b] + lens[b] for b in cached], device))
            return plan
        dec = []
        for b in cached:
            if lens[b] == 1 and plan.mode == "batched":
                dec.append(b)
                continue
            blocks = torch.tensor(tables[b], dtype=torch.long, device=device)
            mask = _causal_mask(lens[b], past[b], window, device)
            k0 = 0  # first gathered key position: skip whole blocks left of the window
            if window is not None and past[b] > 0 and isinstance(mask, torch.Tensor):
                fb = max(0, past[b] - window + 1) // block_size
                k0 = fb * block_size
                blocks, mask = blocks[fb:], mask[:, k0:]
            plan.chunk_seqs.append((cu[b], cu[b + 1], past[b], k0, blocks, mask))
        if dec:
            nmax = max(len(tables[b]) for b in dec)
            plan.dec_rows = torch.tensor([cu[b] for b in dec], dtype=torch.long, device=device)
            plan.dec_table = torch.tensor([tables[b] + [0] * (nmax - len(tables[b])) for b in dec], dtype=torch.long,
                                          device=device)
            ctx = torch.tensor([past[b] + 1 for b in dec], device=device)[:, None]
            kpos = torch.arange(nmax * block_size, device=device)[None, :]
            mask = kpos < ctx
            if window is not None:
                mask &= (ctx - 1 - kpos) < window
            plan.dec_mask = mask[:, None, None, :]
        return plan

    @classmethod
    def decode(cls, cu: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, slots: torch.Tensor,
               k_cache: list, v_cache: list, window: Optional[int]) -> "AttentionPlan":
        """A step of cached sequences from device tensors only (engine/graphs.py's static
        buffers): cu int32 [B + 1], tables int32 [B, max_blocks], lens int32 [B] (keys after
        this step), slots int64 [T] (where each row's k / v go). One kernel call, built
        without reading any tensor back (what a CUDA graph captures)."""
        plan = cls(window, "kernel", [], [], k_cache, v_cache, slots=slots)
        plan.paged_call = _KernelCall(None, cu, tables, lens)
        return plan

    def whole_step_call(self) -> Optional[_KernelCall]:
        """The kernel call when this step is nothing else: every row a cached sequence's, in
        order, written to `slots` then attending in one paged call (what ops.DecoderStack
        runs, with the C++ kernel: not when KERNEL_BACKEND forces another); None otherwise."""
        # (a kernel-mode plan has no SDPA parts; its paged call's rows are slot_rows)
        if self.mode != "kernel" or KERNEL_BACKEND != "auto" or self.slot_rows is not None or self.self_seqs:
            return None
        return self.paged_call

    def _self_kernel_call(self, device) -> _KernelCall:
        """The cache-less sequences as one kernel call over their packed k / v."""
        if self._self_call is None:
            seqs = self.self_seqs
            every = len(seqs) == len(self.cu) - 1
            rows = None if every else torch.cat([torch.arange(s, e) for s, e in seqs]).to(device)
            cu = [0]
            for s, e in seqs:
                cu.append(cu[-1] + e - s)
            tables, lens = ops.packed_tables(cu, device)  # sequence i's keys: rows cu[i] .. cu[i + 1] of k / v
            self._self_call = _KernelCall(rows, _int32(cu, device), tables, lens)
        return self._self_call

    def attend(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Layer li: q [T, H, D], k/v [T, KV, D] (rotary applied) -> [T, H * D]; the cached
        sequences' new k/v are written into the cache first. Differentiable (training runs
        the cache-less SDPA path under autograd)."""
        T, H, D = q.shape
        KV = k.shape[1]
        gqa = KV != H
        if self.mode is None:
            self.mode = _mode(q.device, q.dtype)
        kernel = self.mode == "kernel"
        out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
        kc = vc = None
        if self.slots is not None:
            kc, vc = self.k_cache[li], self.v_cache[li]  # [num_blocks, block_size, KV, D]
            rows = self.slot_rows
            kc.view(-1, KV, D).index_copy_(0, self.slots, k if rows is None else k.index_select(0, rows))
            vc.view(-1, KV, D).index_copy_(0, self.slots, v if rows is None else v.index_select(0, rows))

        def call(c: _KernelCall, kk, vv):
            qs = q if c.rows is None else q.index_select(0, c.rows)
            o = ops.paged_attention(qs, kk, vv, c.tables, c.cu, c.lens, self.window, backend=KERNEL_BACKEND)
            if c.rows is None:
                return o
            out.index_copy_(0, c.rows, o)
            return out

        def sdpa(qs, ks, vs, mask):  # [n, H, D], [L, KV, D] -> [n, H, D]
            qs, ks, vs = (t[None].transpose(1, 2) for t in (qs, ks, vs))
            if mask is None:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
            elif mask is _FULL:
                o = F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=gqa)
            else:
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa)
            return o[0].transpose(0, 1)

        if self.self_seqs:
            if kernel and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
                c = self._self_kernel_call(q.device)
                kk, vv = (k, v) if c.rows is None else (k.index_select(0, c.rows), v.index_select(0, c.rows))
                out = call(c, kk[:, None], vv[:, None])
            else:
                for s, e in self.self_seqs:
                    out[s:e] = sdpa(q[s:e], k[s:e], v[s:e], _causal_mask(e - s, 0, self.window, q.device))
        if self.paged_call is not None:
            out = call(self.paged_call, kc, vc)
        for s, e, past, k0, blocks, mask in self.chunk_seqs:
            if past == 0:
                out[s:e] = sdpa(q[s:e], k[s:e], v[s:e], mask)
            else:
                n = past + e - s - k0
                ks = kc.index_select(0, blocks).view(-1, KV, D)[:n]
                vs = vc.index_select(0, blocks).view(-1, KV, D)[:n]
                out[s:e] = sdpa(q[s:e], ks, vs, mask)
        if self.dec_rows is not None:
            Bd, nb = self.dec_table.shape
            ks = kc[self.dec_table].view(Bd, -1, KV, D).transpose(1, 2)  # [Bd, KV, L, D]
            vs = vc[self.dec_table].view(Bd, -1, KV, D).transpose(1, 2)
            qs = q.index_select(0, self.dec_rows)[:, :, None]  # [Bd, H, 1, D]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=self.dec_mask, enable_gqa=gqa)
            out.index_copy_(0, self.dec_rows, o[:, :, 0])
        return out.view(T, H * D)
