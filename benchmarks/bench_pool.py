"""Benchmark ops.pool (fused final RMSNorm + pooling + L2) against the unfused torch sequence.

The unfused sequence is what a model without the fused op runs: the final RMSNorm over
every token (HF style: fp32, pow, mean, rsqrt, scale, weight), then the gather of each
sequence's last row (or a segment mean), then F.normalize. Both run on the same packed
batch in one run; sequence lengths are drawn from a log-normal mix around the mean length.

    python benchmarks/bench_pool.py                   # CPU, d = 896 and 4096, B = 1..256
    python benchmarks/bench_pool.py --device cuda
Prints a table and writes JSON to benchmarks/results/pool_<device>.json.
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

DIMS = (896, 4096)
BATCHES = (1, 16, 64, 256)
MEAN_LEN = 128


def lengths(batch: int, mean_len: int, seed: int = 0) -> list:
    """Log-normal lengths around mean_len, clipped to [4, 8 * mean_len]: queries and passages mixed."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.empty(batch).log_normal_(0.0, 0.6, generator=g)
    return (raw / raw.mean() * mean_len).round().clamp(4, 8 * mean_len).long().tolist()


def unfused(hidden, cu, weight, mode, eps=1e-6):
    h32 = hidden.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype) * weight
    if mode == "last":
        pooled = normed.index_select(0, cu[1:].long() - 1)
    else:
        lens = (cu[1:] - cu[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(lens.shape[0], device=hidden.device), lens)
        pooled = torch.zeros(lens.shape[0], hidden.shape[1], device=hidden.device, dtype=torch.float32)
        pooled = pooled.index_add_(0, seq, normed.float()) / lens.unsqueeze(1)
    return F.normalize(pooled.float(), dim=-1).to(hidden.dtype)


def bench(d, batch, mode, device, dtype, budget_s) -> dict:
    lens = lengths(batch, MEAN_LEN)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.to(device)
    hidden = torch.randn(int(cu[-1]), d, device=device, dtype=dtype)
    weight = (torch.rand(d, device=device) + 0.5).to(dtype)
    times = time_methods(
        {
            "unfused": lambda: unfused(hidden, cu, weight, mode),
            "fused": lambda: ops.pool(hidden, cu, mode, True, weight),
        },
        device,
        budget_s,
    )
    return {"d": d, "batch": batch, "tokens": int(cu[-1]), "mode": mode,
            "times_us": {k: v * 1e6 for k, v in times.items()}, "speedup": times["unfused"] / times["fused"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(ap)
    ap.add_argument("--budget", type=float, default=0.2, help="seconds of timing per method and shape")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pool_<device>.json)")
    args = ap.parse_args(argv)
    dtype = device_dtype(ap, args)
    shapes = [(d, b, m) for d in DIMS for b in BATCHES for m in ("last", "mean")]
    rows = []
    for i, shape in enumerate(shapes, 1):
        print(f"[{i}/{len(shapes)}] d={shape[0]} B={shape[1]} {shape[2]}", file=sys.stderr, flush=True)
        rows.append(bench(*shape, args.device, dtype, args.budget))
    print(f"{'d':>5} {'B':>4} {'tokens':>7} {'mode':>5} | {'unfused us':>11} {'fused us':>10} | speedup")
    for r in rows:
        t = r["times_us"]
        print(f"{r['d']:>5} {r['batch']:>4} {r['tokens']:>7} {r['mode']:>5} | {t['unfused']:>11.1f} {t['fused']:>10.1f} |"
              f" {r['speedup']:>6.2f}x")
    goals = []
    key = next((r for r in rows if (r["d"], r["batch"], r["mode"]) == (4096, 64, "last")), None)
    if key:
        goals.append({"goal": "d=4096 B=64 last: fused >= 2x faster", "value": key["speedup"], "met": key["speedup"] >= 2})
    mean_rows = [r["speedup"] for r in rows if r["mode"] == "mean"]
    if mean_rows:
        goals.append({"goal": "mean: fused never slower", "value": min(mean_rows), "met": min(mean_rows) >= 1.0})
    for gl in goals:
        print(f"goal {gl['goal']}: {gl['value']:.2f} -> {'met' if gl['met'] else 'NOT met'}")
    out = args.out or os.path.join(RESULTS_DIR, f"pool_{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine_info(args.device), "dtype": str(dtype), "mean_len": MEAN_LEN,
                   "goals": goals, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
