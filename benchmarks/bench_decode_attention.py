"""Batch decoding through the engine with each decode-attention mode, interleaved.

"kernel": every row of a step in one ops.paged_attention call per source (C++: prefill and decode);
"loop": one SDPA per sequence on its gathered blocks (the CPU path before the kernel);
"batched": one SDPA over the padded, gathered block tables.
B prompts of 32-128 tokens each generate N tokens greedily (the same tokens in every mode,
checked); each round runs every mode once, in turn.

    python benchmarks/bench_decode_attention.py [--model smollm2-135m --batch 16 --new-tokens 64]
Writes benchmarks/results/decode_attention_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import bsharedrag_fast.model.attention as attention
from bsharedrag_fast import SharedRuntime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, machine_info  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="kernel,loop,batched")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores this process may use)")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "decode_attention_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    rt = SharedRuntime.from_pretrained(args.model, max_batch_tokens=4096)
    g = torch.Generator().manual_seed(0)
    vocab = rt.model.config.vocab_size
    prompts = [torch.randint(100, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(32, 129, (args.batch,), generator=g)]
    modes = args.modes.split(",")
    times, tokens = {m: [] for m in modes}, {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for m in modes:
            attention.ATTENTION = m
            t0 = time.perf_counter()
            out = rt.generate(prompts, adapter=None, max_new_tokens=args.new_tokens, eos_token_id=[])
            dt = time.perf_counter() - t0
            tokens[m] = [o.token_ids for o in out]
            if r:
                times[m].append(dt)
    same = all(tokens[m] == tokens[modes[0]] for m in modes)
    n_tok = args.batch * args.new_tokens
    res = {"model": args.model, "dtype": "float32", "batch": args.batch, "new_tokens": args.new_tokens,
           "rounds": args.rounds, "same_tokens": same, "load_average": os.getloadavg(),
           "seconds": {m: {"median": statistics.median(v), "min": min(v), "all": v} for m, v in times.items()},
           "tokens_per_s": {m: n_tok / statistics.median(v) for m, v in times.items()},
           "machine": machine_info("cpu")}
    for m in modes:
        print(f"{m:>8}: median {res['seconds'][m]['median']:.2f} s, min {res['seconds'][m]['min']:.2f} s, "
              f"{res['tokens_per_s'][m]:.1f} tok/s")
    print(f"same tokens in every mode: {same}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
