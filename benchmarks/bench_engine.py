"""Engine benchmark: mixed workloads (N documents to embed while M answers are generated)
through one SharedRuntime, vs the same work as separate embed and generate phases, vs a
Separate RAG setup (two backbones: an embedder and a generator), in one run.

Setups: "mixed" (one SharedRuntime, the scheduler's cost model deciding when embedding rows
join generation steps: engine/cost.py), "mixed_always" (the same engine mixing whenever rows
fit), "separate_phases" (all embeddings, then all generations, on the one engine) and
"separate_rag" (two backbones: an embedder and a generator). Random Llama-shaped checkpoint
and two random r=16 adapters written to a temp dir (no download); greedy decoding; outputs
of every setup are checked identical.

    python benchmarks/bench_engine.py [--mixes embedding-heavy:128x4,even:64x8,generation-heavy:16x16]
Each mix runs the three setups in interleaved rounds (A B C A B C ...); the table gives the
medians, the JSON every round. Writes benchmarks/results/engine_cpu.json.
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

from bsharedrag_fast import Backbone
from bsharedrag_fast.engine.runtime import SharedRuntime

from bsharedrag_fast.bench.synthetic import token_workload, write_adapter, write_checkpoint
from bsharedrag_fast.util.sysinfo import rss_bytes

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


def interleaved(fns: dict, rounds: int) -> tuple[dict, dict]:
    """Each fn once per round, in turn (A B C A B C ...): {name: [seconds]} and {name: last output}."""
    times, outs = {k: [] for k in fns}, {}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return times, outs


MIXES = "embedding-heavy:128x4,even:64x8,generation-heavy:16x16"


def parse_mixes(text: str) -> list:
    """'name:DOCSxANSWERS,...' -> [(name, docs, answers)]."""
    out = []
    for item in text.split(","):
        name, _, size = item.partition(":")
        d, _, a = size.partition("x")
        out.append((name, int(d), int(a)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixes", default=MIXES, help=f"workloads, name:DOCSxANSWERS comma separated (default {MIXES})")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-batch-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per mix (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores this process may use)")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "engine_cpu.json"))
    args = ap.parse_args(argv)
    mixes = parse_mixes(args.mixes)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_checkpoint(tmp, SHAPE)
        write_adapter(os.path.join(tmp, "retrieval"), cfg, 1)
        write_adapter(os.path.join(tmp, "generation"), cfg, 2)
        rss0 = rss_bytes()
        shared = Backbone.from_pretrained(tmp)
        shared.load_adapter(os.path.join(tmp, "retrieval"), "retrieval")
        shared.load_adapter(os.path.join(tmp, "generation"), "generation")
        rt = SharedRuntime(shared, None, max_batch_tokens=args.max_batch_tokens)  # mixing="cost"
        rss_shared = rss_bytes() - rss0
        rt_always = SharedRuntime(shared, None, max_batch_tokens=args.max_batch_tokens, mixing="always")
        embedder, generator = Backbone.from_pretrained(tmp), Backbone.from_pretrained(tmp)
        embedder.load_adapter(os.path.join(tmp, "retrieval"), "retrieval")
        generator.load_adapter(os.path.join(tmp, "generation"), "generation")
        rt_e = SharedRuntime(embedder, None, max_batch_tokens=args.max_batch_tokens)
        rt_g = SharedRuntime(generator, None, max_batch_tokens=args.max_batch_tokens)
        rss_separate = rss_bytes() - rss0 - rss_shared
        run_mixed(rt, *token_workload(cfg["vocab_size"], 2, 1), 2)  # warm-up
        results = []
        for name, n_docs, n_answers in mixes:
            docs, prompts = token_workload(cfg["vocab_size"], n_docs, n_answers)
            times, outs = interleaved({
                "mixed": lambda: run_mixed(rt, docs, prompts, args.new_tokens),
                "mixed_always": lambda: run_mixed(rt_always, docs, prompts, args.new_tokens),
                "separate_phases": lambda: run_phases(rt, rt, docs, prompts, args.new_tokens),
                "separate_rag": lambda: run_phases(rt_e, rt_g, docs, prompts, args.new_tokens),
            }, args.rounds)
            (v_mixed, g_mixed), (v_ph, g_ph), (v_sep, g_sep) = outs["mixed"], outs["separate_phases"], outs["separate_rag"]
            v_al, g_al = outs["mixed_always"]
            identical = (g_mixed == g_al == g_ph == g_sep and torch.allclose(v_mixed, v_ph, atol=1e-5)
                         and torch.allclose(v_mixed, v_al, atol=1e-5) and torch.allclose(v_mixed, v_sep, atol=1e-5))
            med = {k: statistics.median(v) for k, v in times.items()}
            results.append({
                "mix": name, "docs": n_docs, "answers": n_answers, "outputs_identical": identical,
                "seconds": {k: {"median": med[k], "min": min(v), "all": v} for k, v in times.items()},
                "speedup_vs_phases": {"median": med["separate_phases"] / med["mixed"],
                                      "min": min(times["separate_phases"]) / min(times["mixed"])},
                "speedup_vs_separate_rag": {"median": med["separate_rag"] / med["mixed"],
                                            "min": min(times["separate_rag"]) / min(times["mixed"])},
                "speedup_vs_always_mixing": {"median": med["mixed_always"] / med["mixed"],
                                             "min": min(times["mixed_always"]) / min(times["mixed"])},
                "load_average": os.getloadavg(),
            })
    print(f"{'mix':>18} | {'mixed s':>8} {'always s':>8} {'phases s':>9} {'sep RAG s':>9} | {'vs phases':>9} "
          f"{'vs sep':>7} {'vs always':>9} | same")
    for r in results:
        sec = r["seconds"]
        print(f"{r['mix']:>18} | {sec['mixed']['median']:>8.3f} {sec['mixed_always']['median']:>8.3f} "
              f"{sec['separate_phases']['median']:>9.3f} {sec['separate_rag']['median']:>9.3f} | "
              f"{r['speedup_vs_phases']['median']:>8.2f}x {r['speedup_vs_separate_rag']['median']:>6.2f}x "
              f"{r['speedup_vs_always_mixing']['median']:>8.2f}x | {r['outputs_identical']}")
    worst = min(r["speedup_vs_phases"]["median"] for r in results)
    goal = {"goal": "mixed >= 1.0x separate phases at every mix (median), identical outputs", "value": worst,
            "met": worst >= 1.0 and all(r["outputs_identical"] for r in results)}
    print(f"goal {goal['goal']}: worst {worst:.3f} -> {'met' if goal['met'] else 'NOT met'}")
    res = {"shape": SHAPE, "new_tokens": args.new_tokens, "max_batch_tokens": args.max_batch_tokens,
           "rounds": args.rounds, "mixes": results,
           "resident": {"shared_bytes": shared.memory_report()["total"],
                        "separate_bytes": embedder.memory_report()["total"] + generator.memory_report()["total"],
                        "shared_rss": rss_shared, "separate_rss": rss_separate}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine_info("cpu"), "goals": [goal], **res}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
