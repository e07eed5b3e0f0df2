"""Benchmark ops.paged_attention (the varlen kernel: every row of a layer in one call; C++ on
CPU, Triton with --device cuda) against what the engine ran before it: one SDPA per sequence
(on a GPU torch's flash / memory-efficient SDPA kernels).

Shapes of one layer, SmolLM2-135M's heads (H=9, KV=3, D=64) and a Llama-8B's (32, 8, 128):
  prefill   B cache-less sequences of L tokens (embedding batches, prompts): the kernel
            reads the packed k / v as one-token blocks; before, one causal SDPA per sequence
            on [1, heads, L, D] views;
  decode    B decode rows over a paged cache (block 16, scattered blocks): before, one gather
            of the sequence's blocks and one SDPA per sequence;
  mixed     4 prefill chunks of 64 rows over 256 cached tokens + 12 decode rows, one step:
            before, per sequence a gather and one SDPA with an offset causal mask.
Methods are timed round-robin (A B A B), median and min.

    python benchmarks/bench_attention.py [--threads N] [--device cuda] [--dtype float32]
Writes benchmarks/results/attention_<device>.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from bsharedrag_fast import ops

from _common import RESULTS_DIR, add_device_args, device_dtype, machine_info, time_methods

HEADS = {"smollm2-135m": (9, 3, 64), "llama-8b": (32, 8, 128)}
BLOCK = 16


def _sdpa(q, k, v, mask=None, causal=False):  # [n, H, D], [L, KV, D] -> [n, H, D]
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
    return o[0].transpose(0, 1)


def prefill_case(B, L, H, KV, D, dtype, dev):
    g = torch.Generator().manual_seed(0)
    T = B * L
    q, k, v = (torch.randn(T, n, D, generator=g).to(dev, dtype) for n in (H, KV, KV))
    cu = list(range(0, T + 1, L))
    tables, lens = ops.packed_tables(cu, dev)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)

    def loop():
        out = torch.empty_like(q)
        for s, e in zip(cu[:-1], cu[1:]):
            out[s:e] = _sdpa(q[s:e], k[s:e], v[s:e], causal=True)
        return out

    return {"kernel": lambda: ops.paged_attention(q, k[:, None], v[:, None], tables, cu_t, lens), "loop": loop}


def paged_case(new, past, H, KV, D, dtype, dev):
    """Sequences with new[b] rows after past[b] cached tokens, over a scattered block cache."""
    g = torch.Generator().manual_seed(1)
    lens = [n + p for n, p in zip(new, past)]
    need = [-(-n // BLOCK) for n in lens]
    perm = torch.randperm(sum(need), generator=g)
    kc, vc = (torch.randn(sum(need), BLOCK, KV, D, generator=g).to(dev, dtype) for _ in range(2))
    blocks, i = [], 0
    for n in need:
        blocks.append(perm[i : i + n])
        i += n
    tables = torch.zeros(len(new), max(need), dtype=torch.int32)
    for b, bl in enumerate(blocks):
        tables[b, : len(bl)] = bl.int()
    q = torch.randn(sum(new), H, D, generator=g).to(dev, dtype)
    tables, blocks = tables.to(dev), [b.to(dev) for b in blocks]
    cu = [0]
    for n in new:
        cu.append(cu[-1] + n)
    cu_t, lens_t = (torch.tensor(x, dtype=torch.int32, device=dev) for x in (cu, lens))
    masks = [None if n == 1 else (torch.arange(p, p + n, device=dev)[:, None] >= torch.arange(p + n, device=dev)[None])
             for n, p in zip(new, past)]  # built once per step in the engine, so outside the timing

    def loop():
        out = torch.empty_like(q)
        for b in range(len(new)):
            ks = kc.index_select(0, blocks[b]).view(-1, KV, D)[: lens[b]]
            vs = vc.index_select(0, blocks[b]).view(-1, KV, D)[: lens[b]]
            out[cu[b] : cu[b + 1]] = _sdpa(q[cu[b] : cu[b + 1]], ks, vs, masks[b])
        return out

    return {"kernel": lambda: ops.paged_attention(q, kc, vc, tables, cu_t, lens_t), "loop": loop}


def cases(H, KV, D, dtype, dev):
    g = torch.Generator().manual_seed(2)

    def ctx(lo, hi, n):
        return torch.randint(lo, hi, (n,), generator=g).tolist()

    yield "prefill 16 x 128", prefill_case(16, 128, H, KV, D, dtype, dev)
    yield "prefill 4 x 512", prefill_case(4, 512, H, KV, D, dtype, dev)
    yield "prefill 64 x 32", prefill_case(64, 32, H, KV, D, dtype, dev)
    yield "prefill 1 x 2048", prefill_case(1, 2048, H, KV, D, dtype, dev)
    yield "decode 16, context 32-192", paged_case([1] * 16, ctx(31, 191, 16), H, KV, D, dtype, dev)
    yield "decode 64, context 32-96", paged_case([1] * 64, ctx(31, 95, 64), H, KV, D, dtype, dev)
    yield "decode 4, context 500-1000", paged_case([1] * 4, ctx(499, 999, 4), H, KV, D, dtype, dev)
    yield "mixed: 4 chunks of 64 on 256 + 12 decode", paged_case([64] * 4 + [1] * 12, [256] * 4 + ctx(31, 191, 12),
                                                                 H, KV, D, dtype, dev)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    add_device_args(ap)
    ap.add_argument("--models", default=",".join(HEADS), help=f"comma-separated, of {', '.join(HEADS)}")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of timing per method and case")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/attention_<device>.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    dtype, dev = device_dtype(ap, args), args.device
    args.out = args.out or os.path.join(RESULTS_DIR, f"attention_{dev}.json")
    rows = []
    load_before = os.getloadavg()
    print(f"{'heads':>13} {'case':<42} | {'kernel ms (min)':>16} {'loop ms (min)':>15} | loop / kernel")
    for model in args.models.split(","):
        H, KV, D = HEADS[model]
        for name, methods in cases(H, KV, D, dtype, dev):
            want = methods["loop"]()
            diff = (methods["kernel"]().float() - want.float()).abs().max().item()
            t = time_methods(methods, dev, args.budget, with_min=True)
            r = {"model": model, "heads": [H, KV, D], "case": name, "max_abs_diff": diff,
                 "ms": {m: {k: v * 1e3 for k, v in s.items()} for m, s in t.items()},
                 "loop_over_kernel": t["loop"]["median"] / t["kernel"]["median"]}
            rows.append(r)
            ms = r["ms"]
            print(f"{model:>13} {name:<42} | {ms['kernel']['median']:>8.3f} ({ms['kernel']['min']:.3f}) "
                  f"{ms['loop']['median']:>7.3f} ({ms['loop']['min']:.3f}) | {r['loop_over_kernel']:.2f}x", flush=True)
    paged = [r for r in rows if not r["case"].startswith("prefill")]
    worst = min((r["loop_over_kernel"] for r in paged), default=None)
    goals = [] if worst is None else [{"goal": "decode and mixed steps: kernel >= 1.0x one SDPA per sequence",
                                       "value": worst, "met": worst >= 1.0}]
    for gl in goals:
        print(f"goal {gl['goal']}: {gl['value']:.2f} -> {'met' if gl['met'] else 'NOT met'}")
    res = {"machine": machine_info(dev), "dtype": str(dtype).removeprefix("torch."), "goals": goals,
           "threads": torch.get_num_threads(),
           "load_average_before": load_before, "load_average_after": os.getloadavg(), "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
