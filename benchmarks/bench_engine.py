"""Engine benchmark: a mixed workload (N documents to embed while M answers are generated)
through one SharedRuntime, vs the same work as separate embed and generate phases, vs a
Separate RAG setup (two backbones: an embedder and a generator), in one run.

Random Llama-shaped checkpoint and two random r=16 adapters written to a temp dir (no
download); greedy decoding; outputs of the three setups are checked identical.

    python benchmarks/bench_engine.py [--docs 64 --answers 8 --new-tokens 32]
Prints a table and writes JSON to benchmarks/results/engine_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from bsharedrag_fast import Backbone
from bsharedrag_fast.runtime import SharedRuntime

from bsharedrag_fast.synthetic import token_workload, write_adapter, write_checkpoint
from bsharedrag_fast.sysinfo import rss_bytes

from _common import RESULTS_DIR, machine_info

SHAPE = dict(architectures=["LlamaForCausalLM"], hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, vocab_size=1024, tie_word_embeddings=False,
             max_position_embeddings=1024)


def run_mixed(rt, docs, prompts, new_tokens):
    handles = [rt.submit_embed(d, adapter="retrieval") for d in docs]
    handles += [rt.submit_generate(p, adapter="generation", max_new_tokens=new_tokens) for p in prompts]
    rt.run_until_done()
    res = [h.result() for h in handles]
    return torch.stack(res[: len(docs)]), [r.token_ids for r in res[len(docs):]]


def run_phases(rt_embed, rt_gen, docs, prompts, new_tokens):
    vecs = rt_embed.embed(docs, adapter="retrieval")
    outs = rt_gen.generate(prompts, adapter="generation", max_new_tokens=new_tokens)
    return vecs, [o.token_ids for o in outs]


def best_of(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=64, help="documents to embed")
    ap.add_argument("--answers", type=int, default=8, help="answers to generate")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-batch-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "engine_cpu.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_checkpoint(tmp, SHAPE)
        write_adapter(os.path.join(tmp, "retrieval"), cfg, 1)
        write_adapter(os.path.join(tmp, "generation"), cfg, 2)
        rss0 = rss_bytes()
        shared = Backbone.from_pretrained(tmp)
        shared.load_adapter(os.path.join(tmp, "retrieval"), "retrieval")
        shared.load_adapter(os.path.join(tmp, "generation"), "generation")
        rt = SharedRuntime(shared, None, max_batch_tokens=args.max_batch_tokens)
        rss_shared = rss_bytes() - rss0
        embedder, generator = Backbone.from_pretrained(tmp), Backbone.from_pretrained(tmp)
        embedder.load_adapter(os.path.join(tmp, "retrieval"), "retrieval")
        generator.load_adapter(os.path.join(tmp, "generation"), "generation")
        rt_e = SharedRuntime(embedder, None, max_batch_tokens=args.max_batch_tokens)
        rt_g = SharedRuntime(generator, None, max_batch_tokens=args.max_batch_tokens)
        rss_separate = rss_bytes() - rss0 - rss_shared
        docs, prompts = token_workload(cfg["vocab_size"], args.docs, args.answers)

        run_mixed(rt, docs[:2], prompts[:1], 2)  # warm-up
        t_mixed, (v_mixed, g_mixed) = best_of(lambda: run_mixed(rt, docs, prompts, args.new_tokens), args.repeats)
        steps_mixed = rt.stats["steps"]
        t_phases, (v_ph, g_ph) = best_of(lambda: run_phases(rt, rt, docs, prompts, args.new_tokens), args.repeats)
        t_sep, (v_sep, g_sep) = best_of(lambda: run_phases(rt_e, rt_g, docs, prompts, args.new_tokens), args.repeats)
    identical = g_mixed == g_ph == g_sep and torch.allclose(v_mixed, v_ph, atol=1e-5) and torch.allclose(v_mixed, v_sep, atol=1e-5)
    work = args.docs + args.answers
    res = {
        "shape": SHAPE, "docs": args.docs, "answers": args.answers, "new_tokens": args.new_tokens,
        "max_batch_tokens": args.max_batch_tokens, "outputs_identical": identical,
        "seconds": {"mixed": t_mixed, "separate_phases": t_phases, "separate_rag": t_sep},
        "requests_per_s": {"mixed": work / t_mixed, "separate_phases": work / t_phases, "separate_rag": work / t_sep},
        "speedup_vs_phases": t_phases / t_mixed, "speedup_vs_separate_rag": t_sep / t_mixed,
        "resident": {"shared_bytes": shared.memory_report()["total"],
                     "separate_bytes": embedder.memory_report()["total"] + generator.memory_report()["total"],
                     "shared_rss": rss_shared, "separate_rss": rss_separate},
        "engine_steps_total": steps_mixed,
    }
    print(f"{'setup':>16} | {'seconds':>8} {'req/s':>7}")
    for k in ("mixed", "separate_phases", "separate_rag"):
        print(f"{k:>16} | {res['seconds'][k]:>8.3f} {res['requests_per_s'][k]:>7.1f}")
    print(f"outputs identical: {identical}; resident Shared {res['resident']['shared_bytes'] / 2**20:.1f} MB vs "
          f"Separate RAG {res['resident']['separate_bytes'] / 2**20:.1f} MB")
    goal = {"goal": "mixed >= 1.2x separate phases, identical outputs", "value": res["speedup_vs_phases"],
            "met": res["speedup_vs_phases"] >= 1.2 and identical}
    print(f"goal {goal['goal']}: {goal['value']:.3f} -> {'met' if goal['met'] else 'NOT met'}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine_info("cpu"), "goals": [goal], **res}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
