"""Benchmark ops.linear's C++ kernel against F.linear (torch's BLAS) and torch's oneDNN gemm
(backend "onednn", where torch has it) on CPU, side by side.

The shapes are Qwen2-0.5B's projections and LM head; row counts span decode steps (1-16
rows), mixed steps (64-128) and prefill (256-512). Each call uses the next of enough
copies of the weight to fill 256 MiB, so the weights stream from memory as they do in a
model's forward (one copy would sit in cache and flatter both sides). The row range
where `cpp` wins, per dtype, is what ops/linear.py's `cpp_pays` encodes, and where oneDNN's
gemm wins past it, `onednn_pays`.

    python benchmarks/bench_linear.py                  # float32, float16, bfloat16
    python benchmarks/bench_linear.py --dtype float32
Prints a table and writes JSON to benchmarks/results/linear_cpu.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

from bsharedrag_fast import ops
from bsharedrag_fast.ops.linear import _onednn_op

from _common import RESULTS_DIR, machine_info, time_methods

SHAPES = {  # name: (in_features, out_features)
    "qkv 896->1152": (896, 1152),
    "gate_up 896->9728": (896, 9728),
    "down 4864->896": (4864, 896),
    "lm_head 896->151936": (896, 151936),
}
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
STREAM_BYTES = 256 << 20


def bench_shape(k: int, n: int, rows: int, dtype: torch.dtype, budget_s: float) -> dict:
    nbytes = k * n * torch.finfo(dtype).bits // 8
    copies = max(1, -(-STREAM_BYTES // nbytes))
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=g) / k**0.5).to(dtype) for _ in range(copies)]
    x = torch.randn(rows, k, generator=g).to(dtype)
    cycle_cpp, cycle_torch, cycle_dnn = itertools.cycle(weights), itertools.cycle(weights), itertools.cycle(weights)
    methods = {
        "cpp": lambda: ops.linear(x, next(cycle_cpp), backend="cpp"),
        "torch": lambda: F.linear(x, next(cycle_torch)),
    }
    if _onednn_op() is not None:
        methods["onednn"] = lambda: ops.linear(x, next(cycle_dnn), backend="onednn")
    t = time_methods(methods, "cpu", budget_s)
    out = {"in": k, "out": n, "rows": rows, "dtype": str(dtype).removeprefix("torch."),
           "cpp_ms": t["cpp"] * 1e3, "torch_ms": t["torch"] * 1e3, "speedup": t["torch"] / t["cpp"],
           "cpp_gb_s": nbytes / t["cpp"] / 1e9, "cpp_gflops": 2 * rows * k * n / t["cpp"] / 1e9}
    if "onednn" in t:
        out.update(onednn_ms=t["onednn"] * 1e3, onednn_over_torch=t["torch"] / t["onednn"],
                   onednn_over_cpp=t["cpp"] / t["onednn"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"],
                    help="repeatable; default: all three")
    ap.add_argument("--rows", type=int, action="append", help=f"repeatable; default: {ROWS}")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timing per method and case")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "linear_cpu.json"))
    args = ap.parse_args(argv)
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float32", "float16", "bfloat16"])]
    rows_list = args.rows or ROWS
    results = []
    print(f"{'dtype':<9} {'shape':<20} {'rows':>5} {'cpp ms':>9} {'torch ms':>9} {'speedup':>8} {'cpp GB/s':>9} "
          f"{'onednn ms':>9}")
    for dtype in dtypes:
        for name, (k, n) in SHAPES.items():
            for rows in rows_list:
                if name.startswith("lm_head") and rows > 128:
                    continue  # the LM head only ever sees the rows that need logits
                r = bench_shape(k, n, rows, dtype, args.budget)
                r["shape"] = name
                results.append(r)
                print(f"{r['dtype']:<9} {name:<20} {rows:>5} {r['cpp_ms']:>9.3f} {r['torch_ms']:>9.3f} "
                      f"{r['speedup']:>7.2f}x {r['cpp_gb_s']:>9.1f} {r.get('onednn_ms', float('nan')):>9.3f}",
                      flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine_info("cpu"), "results": results}, f, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
