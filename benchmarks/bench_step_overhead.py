"""Per-layer kernel launches and Python overhead of one engine decode step with LoRA rows.

A random checkpoint (the "micro" shape below: d=64, so the matmuls cost next to nothing and
what is left is the Python and dispatch around them, or a synthetic preset) with two random
r=16 adapters on q/k/v/o/gate/up/down; B sequences decode one token each, half of them with
each adapter, through one engine step over a paged KV cache.

  launches    calls into the C++ LoRA kernels (shrink, expand, expanded slices, whole adds)
              during one step, per layer: separate q/k/v/gate/up modules take a shrink and an
              expand each (14 a layer); merged projections take one of each per group (8).
  step        wall time of one decode step: median and min over --steps steps, and per layer.

Only public APIs are used, so the same file measures an older checkout too:
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_step_overhead.py --json old.json
Run each checkout in turn (A B A B) and compare the medians; the machine and its load are printed.
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

from bsharedrag_fast import Backbone, KVCache
from bsharedrag_fast.ops import _backends

try:
    from bsharedrag_fast.bench.synthetic import PRESETS, write_adapter, write_checkpoint  # also in older checkouts
    from bsharedrag_fast.engine.step import run_step
    from bsharedrag_fast.util.sysinfo import machine_info
except ImportError:  # a checkout from before the layer folders and the engine-owned step
    from bsharedrag_fast.synthetic import PRESETS, write_adapter, write_checkpoint
    from bsharedrag_fast.sysinfo import machine_info

    def run_step(model, *args, **kw):
        return model.step(*args, **kw)


MICRO = dict(PRESETS["tiny"], hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512)
LORA_CALLS = ("lora_shrink", "lora_expand", "lora_expand_slices", "lora_add")


def count_calls(fn) -> dict:
    """{kernel: calls} of the C++ LoRA kernels while fn() runs."""
    lib = _backends.cpp()
    counts = {name: 0 for name in LORA_CALLS if hasattr(lib, name)}
    real = {name: getattr(lib, name) for name in counts}

    def counted(name):
        def call(*args, **kw):
            counts[name] += 1
            return real[name](*args, **kw)
        return call

    try:
        for name in counts:
            setattr(lib, name, counted(name))
        fn()
    finally:
        for name, f in real.items():
            setattr(lib, name, f)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="micro", choices=["micro", *PRESETS], help="model shape (default micro)")
    ap.add_argument("--batch", type=int, default=4, help="sequences decoding together (default 4)")
    ap.add_argument("--context", type=int, default=32, help="cached tokens per sequence (default 32)")
    ap.add_argument("--steps", type=int, default=200, help="timed decode steps (default 200)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = MICRO if args.preset == "micro" else PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_checkpoint(os.path.join(tmp, "model"), shape)
        model = Backbone.from_pretrained(os.path.join(tmp, "model"))
        for i, name in enumerate(("retrieval", "generation")):
            write_adapter(os.path.join(tmp, name), cfg, seed=i + 1)
            model.load_adapter(os.path.join(tmp, name), name)
    B, n_layers = args.batch, cfg["num_hidden_layers"]
    cache = KVCache(model.config, 64 << 20, model.dtype)
    seqs = [cache.allocate() for _ in range(B)]
    adapters = [("retrieval", "generation")[b % 2] for b in range(B)]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg["vocab_size"], (B * args.context,), generator=g)
    cu = torch.arange(0, B * args.context + 1, args.context, dtype=torch.int32)
    run_step(model, prompt, cu, seqs, cache, adapters, logits_rows=[])
    ids, dcu = torch.randint(0, cfg["vocab_size"], (B,), generator=g), torch.arange(B + 1, dtype=torch.int32)

    calls = count_calls(lambda: run_step(model, ids, dcu, seqs, cache, adapters))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        run_step(model, ids, dcu, seqs, cache, adapters)
        times.append(time.perf_counter() - t0)
    med, low = statistics.median(times), min(times)
    out = {
        "preset": args.preset, "batch": B, "context": args.context, "layers": n_layers, "threads": args.threads,
        "lora_launches_per_layer": sum(calls.values()) / n_layers, "lora_calls": calls,
        "step_ms": {"median": med * 1e3, "min": low * 1e3},
        "step_us_per_layer": {"median": med * 1e6 / n_layers, "min": low * 1e6 / n_layers},
        "machine": machine_info("cpu"), "load_average": os.getloadavg(),
    }
    print(f"{args.preset}: {n_layers} layers, {B} decode rows (2 adapters), {args.threads} thread(s)")
    print(f"  LoRA kernel launches per layer: {out['lora_launches_per_layer']:g}  {calls}")
    print(f"  decode step: median {med * 1e3:.3f} ms, min {low * 1e3:.3f} ms; "
          f"per layer median {med * 1e6 / n_layers:.1f} us, min {low * 1e6 / n_layers:.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
