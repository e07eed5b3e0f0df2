"""The whole decoder stack in one C++ call (ops.DecoderStack, FUSED_LAYERS "auto") against the
op-by-op layers ("off"), on the real model: single-stream and batched greedy decoding.

For each batch size B: B prompts (--prompt-len random tokens) generate --new-tokens tokens
each; the decode time (the first step, which prefills, excluded) per step and per token is
measured for both settings in turn (A B A B, --rounds rounds, after a warm-up of each), and
their tokens must be equal. The load average is recorded with each round.

    python benchmarks/bench_fused_decode.py [--model smollm2-135m] [--batches 1,16] [--threads 2]
Writes benchmarks/results/fused_decode.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

from bsharedrag_fast import Backbone, SharedRuntime
from bsharedrag_fast.model import backbone
from bsharedrag_fast.util.sysinfo import machine_info

from _common import RESULTS_DIR


def decode(rt: SharedRuntime, prompts: list, new_tokens: int) -> tuple[float, int, list]:
    """(decode seconds, decode steps, tokens): the steps after the one that prefills every prompt."""
    hs = [rt.submit_generate(p, adapter=None, max_new_tokens=new_tokens, eos_token_id=[]) for p in prompts]
    rt.step()
    t0, steps = time.perf_counter(), 0
    while rt.has_pending():
        rt.step()
        steps += 1
    return time.perf_counter() - t0, steps, [h.result().token_ids for h in hs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores this process may use)")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "fused_decode.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    model = Backbone.from_pretrained(args.model)
    rt = SharedRuntime(model, None, max_length=args.prompt_len + args.new_tokens + 8)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    modes = ("off", "auto")
    rows = []
    print(f"{args.model} {str(model.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads: "
          f"ms per decode step, FUSED_LAYERS off (op by op) vs auto (one C++ call per step)")
    for B in (int(b) for b in args.batches.split(",")):
        prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_len)] for _ in range(B)]
        ms = {m: [] for m in modes}
        tokens, loads = {}, []
        for m in modes:  # warm-up
            backbone.FUSED_LAYERS = m
            decode(rt, prompts, 4)
        for _ in range(args.rounds):
            for m in modes:
                backbone.FUSED_LAYERS = m
                s, steps, tokens[m] = decode(rt, prompts, args.new_tokens)
                ms[m].append(s / steps * 1e3)
                loads.append(os.getloadavg()[0])
        backbone.FUSED_LAYERS = "auto"
        stats = {m: {"median": statistics.median(v), "min": min(v), "rounds": v} for m, v in ms.items()}
        r = {"batch": B, "ms_per_step": stats, "tokens_equal": tokens["off"] == tokens["auto"],
             "tokens_per_s": {m: B * 1e3 / stats[m]["median"] for m in modes},
             "off_over_auto": stats["off"]["median"] / stats["auto"]["median"],
             "load_average_1min": {"min": min(loads), "max": max(loads)}}
        rows.append(r)
        print(f"B={B:>3}: off {stats['off']['median']:.2f} (min {stats['off']['min']:.2f})  auto "
              f"{stats['auto']['median']:.2f} (min {stats['auto']['min']:.2f})  -> {r['off_over_auto']:.2f}x, "
              f"{r['tokens_per_s']['auto']:.1f} tok/s, load {min(loads):.2f}-{max(loads):.2f}"
              f"{'' if r['tokens_equal'] else '  TOKENS DIFFER'}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine_info("cpu"), "model": args.model, "dtype": str(model.dtype),
                   "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(r["tokens_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
