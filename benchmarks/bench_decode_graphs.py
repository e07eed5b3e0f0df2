"""Decode steps as CUDA graphs (SharedRuntime(decode_graphs="cuda")) against the engine's eager
steps, on a random checkpoint with two LoRAs (half the sequences each), greedy.

For each batch size B: B prompts of 16 tokens generate --new-tokens tokens each; the time
from the first decode step to the last, per step, is measured for both engines in turn
(A B A B, --rounds rounds; each engine warmed up first, so capture and Triton compiles are
not timed), and their tokens must agree. On CPU "--mode static" times the same static-buffer
path run eagerly (no capture exists there).

    python benchmarks/bench_decode_graphs.py --device cuda [--preset qwen2-0.5b] [--batches 1,8,32]
Writes benchmarks/results/decode_graphs_<device>.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from bsharedrag_fast import Backbone, SharedRuntime
from bsharedrag_fast.bench.synthetic import PRESETS, write_adapter, write_checkpoint

from _common import RESULTS_DIR, add_device_args, device_dtype, machine_info


def decode_seconds(rt: SharedRuntime, prompts: list, new_tokens: int) -> tuple[float, list]:
    """Seconds per decode step (the steps after every prompt is in the cache) and the tokens."""
    hs = [rt.submit_generate(p, adapter=("a", "b")[i % 2], max_new_tokens=new_tokens, eos_token_id=[])
          for i, p in enumerate(prompts)]
    rt.step()  # the prefill step (every prompt fits one step)
    sync = torch.cuda.synchronize if rt.model.device.type == "cuda" else (lambda: None)
    sync()
    t0, steps = time.perf_counter(), 0
    while rt.has_pending():
        rt.step()
        steps += 1
    sync()
    return (time.perf_counter() - t0) / max(steps, 1), [h.result().token_ids for h in hs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(ap)
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="model shape (default qwen2-0.5b on cuda, tiny on cpu)")
    ap.add_argument("--mode", default=None, choices=["cuda", "static"], help="default: cuda on cuda, else static")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores this process may use)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/decode_graphs_<device>.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    dtype, dev = device_dtype(ap, args), args.device
    preset = args.preset or ("qwen2-0.5b" if dev == "cuda" else "tiny")
    mode = args.mode or ("cuda" if dev == "cuda" else "static")
    out = args.out or os.path.join(RESULTS_DIR, f"decode_graphs_{dev}.json")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_checkpoint(tmp, PRESETS[preset], dtype)
        model = Backbone.from_pretrained(tmp, dtype=dtype, device=dev)
        for i, name in enumerate("ab"):
            write_adapter(os.path.join(tmp, name), cfg, seed=i + 1)
            model.load_adapter(os.path.join(tmp, name), name)
        g = torch.Generator().manual_seed(0)
        engines = {"eager": SharedRuntime(model, max_running=256),
                   "graphs": SharedRuntime(model, max_running=256, decode_graphs=mode)}
        print(f"{preset} {str(dtype).removeprefix('torch.')} on {dev}, graphs mode {mode!r}: ms per decode step")
        for B in (int(b) for b in args.batches.split(",")):
            prompts = [torch.randint(3, cfg["vocab_size"], (16,), generator=g).tolist() for _ in range(B)]
            times = {name: [] for name in engines}
            tokens = {}
            for name, rt in engines.items():  # warm-up: captures, compiles
                tokens[name] = decode_seconds(rt, prompts, 4)[1]
            for _ in range(args.rounds):
                for name, rt in engines.items():
                    s, tokens[name] = decode_seconds(rt, prompts, args.new_tokens)
                    times[name].append(s * 1e3)
            agree = tokens["eager"] == tokens["graphs"]
            ms = {n: {"median": statistics.median(v), "min": min(v)} for n, v in times.items()}
            r = {"batch": B, "ms_per_step": ms, "tokens_agree": agree}
            r["eager_over_graphs"] = r["ms_per_step"]["eager"]["median"] / r["ms_per_step"]["graphs"]["median"]
            rows.append(r)
            print(f"B={B:>4}: eager {ms['eager']['median']:.3f} (min {ms['eager']['min']:.3f})  graphs "
                  f"{ms['graphs']['median']:.3f} (min {ms['graphs']['min']:.3f})  -> {r['eager_over_graphs']:.2f}x"
                  f"{'' if agree else '  TOKENS DIFFER'}", flush=True)
    goals = [{"goal": "graph decode tokens equal the eager engine's", "value": all(r["tokens_agree"] for r in rows),
              "met": all(r["tokens_agree"] for r in rows)}]
    small = [r for r in rows if r["batch"] <= 8]
    if small and mode == "cuda":
        v = min(r["eager_over_graphs"] for r in small)
        goals.append({"goal": "B <= 8: graph decode step >= 1.0x eager", "value": v, "met": v >= 1.0})
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine_info(dev), "preset": preset, "dtype": str(dtype), "mode": mode,
                   "new_tokens": args.new_tokens, "rows": rows, "goals": goals}, f, indent=1)
    print(f"wrote {out}", file=sys.stderr)
    return 0 if goals[0]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
