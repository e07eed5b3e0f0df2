"""Backbone benchmark: resident memory of Shared vs Separate RAG, and prefill / decode
throughput of our packed forward vs transformers + peft on the same weights, in one run.

For each preset a random checkpoint (HF layout, safetensors) and two random PEFT LoRA
adapters ("retrieval", "generation": r=16, alpha=32, q/k/v/o/gate/up/down) are written
to a temp dir; nothing is downloaded.

  memory      Shared: one Backbone + both adapters; Separate RAG: two Backbones (an
              embedder and a generator of the same size), each with its adapter.
  prefill     B prompts of mixed lengths, logits of the last rows: our packed forward
              vs PeftModel on the padded batch.
  decode      greedy generation of N tokens for the B prompts: bsharedrag_fast.generate
              (KV cache, packed decode steps) vs PeftModel.generate.

    python benchmarks/bench_backbone.py                       # tiny + qwen2-0.5b presets
    python benchmarks/bench_backbone.py --preset tiny
Prints a table and writes JSON to benchmarks/results/backbone_cpu.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

from bsharedrag_fast import Backbone
from bsharedrag_fast.engine.runtime import generate
from bsharedrag_fast.bench.presets import PRESETS as SHAPES
from bsharedrag_fast.bench.synthetic import write_adapter, write_checkpoint
from bsharedrag_fast.util.sysinfo import rss_bytes

from _common import RESULTS_DIR, machine_info

# the two shapes this script compares (bsharedrag bench covers the larger presets)
PRESETS = {name: SHAPES[name] for name in ("tiny", "qwen2-0.5b")}


def prompts_for(vocab: int, batch: int, mean_len: int) -> list:
    g = torch.Generator().manual_seed(1)
    lens = [max(4, int(mean_len * f)) for f in torch.linspace(0.5, 1.5, batch).tolist()]
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_preset(name: str, workdir: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    print(f"[{name}] writing random checkpoint and adapters", file=sys.stderr, flush=True)
    ckpt = os.path.join(workdir, name)
    cfg = write_checkpoint(ckpt, PRESETS[name])
    write_adapter(os.path.join(ckpt, "retrieval"), cfg, 1)
    write_adapter(os.path.join(ckpt, "generation"), cfg, 2)
    res = {"preset": name, "config": PRESETS[name]}

    # -- memory: Shared vs Separate RAG --------------------------------------------------
    gc.collect()
    rss0 = rss_bytes()
    shared = Backbone.from_pretrained(ckpt)
    shared.load_adapter(os.path.join(ckpt, "retrieval"), "retrieval")
    shared.load_adapter(os.path.join(ckpt, "generation"), "generation")
    rss_shared = rss_bytes() - rss0
    rep = shared.memory_report()
    embedder = Backbone.from_pretrained(ckpt)
    embedder.load_adapter(os.path.join(ckpt, "retrieval"), "retrieval")
    generator = Backbone.from_pretrained(ckpt)
    generator.load_adapter(os.path.join(ckpt, "generation"), "generation")
    sep_bytes = embedder.memory_report()["total"] + generator.memory_report()["total"]
    rss_separate = rss_bytes() - rss0 - rss_shared
    res["memory"] = {
        "shared_bytes": rep["total"], "separate_bytes": sep_bytes, "ratio": rep["total"] / sep_bytes,
        "shared_rss": rss_shared, "separate_rss": rss_separate, "report": rep,
    }
    del embedder, generator
    gc.collect()

    # -- throughput vs transformers + peft ---------------------------------------------------
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    hf = PeftModel.from_pretrained(hf, os.path.join(ckpt, "generation"), adapter_name="generation").eval()
    prompts = prompts_for(cfg["vocab_size"], batch, prompt_len)
    n_prompt = sum(map(len, prompts))
    ids = torch.tensor([t for p in prompts for t in p])
    cu = torch.tensor([0] + torch.tensor([len(p) for p in prompts]).cumsum(0).tolist(), dtype=torch.int32)
    last = (cu[1:] - 1).long()
    width = max(map(len, prompts))
    padded = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding, as for generation
        padded[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1

    def ours_prefill():
        shared.forward(ids, cu, adapters=["generation"] * batch, logits_rows=last)

    @torch.inference_mode()
    def hf_prefill():
        hf(input_ids=padded, attention_mask=mask, logits_to_keep=1)

    def ours_decode():
        generate(shared, None, prompts, adapters="generation", max_new_tokens=new_tokens, temperature=0.0)

    @torch.inference_mode()
    def hf_decode():
        hf.generate(input_ids=padded, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=0)

    print(f"[{name}] prefill", file=sys.stderr, flush=True)
    t_ours, t_hf = best_of(ours_prefill, repeats), best_of(hf_prefill, repeats)
    res["prefill"] = {"tokens": n_prompt, "ours_tok_s": n_prompt / t_ours, "hf_peft_tok_s": n_prompt / t_hf,
                      "speedup": t_hf / t_ours}
    print(f"[{name}] decode", file=sys.stderr, flush=True)
    t_ours, t_hf = best_of(ours_decode, repeats), best_of(hf_decode, repeats)
    n_gen = batch * new_tokens
    res["decode"] = {"tokens": n_gen, "ours_tok_s": n_gen / t_ours, "hf_peft_tok_s": n_gen / t_hf,
                     "speedup": t_hf / t_ours, "note": "end-to-end generate incl. prefill"}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["all", *PRESETS], default="all")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "backbone_cpu.json"))
    args = ap.parse_args(argv)
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(bench_preset(name, tmp, args.batch, args.prompt_len, args.new_tokens, args.repeats))
    print(f"{'preset':>11} | {'shared MB':>9} {'separate MB':>11} {'ratio':>6} | "
          f"{'prefill tok/s ours':>18} {'hf+peft':>8} {'x':>6} | {'decode tok/s ours':>17} {'hf+peft':>8} {'x':>6}")
    for r in rows:
        m, p, d = r["memory"], r["prefill"], r["decode"]
        print(f"{r['preset']:>11} | {m['shared_bytes'] / 2**20:>9.1f} {m['separate_bytes'] / 2**20:>11.1f} {m['ratio']:>6.3f} |"
              f" {p['ours_tok_s']:>18.1f} {p['hf_peft_tok_s']:>8.1f} {p['speedup']:>5.2f}x |"
              f" {d['ours_tok_s']:>17.1f} {d['hf_peft_tok_s']:>8.1f} {d['speedup']:>5.2f}x")
    goals = []
    for r in rows:
        goals += [
            {"goal": f"{r['preset']}: memory Shared/Separate <= 0.55", "value": r["memory"]["ratio"],
             "met": r["memory"]["ratio"] <= 0.55},
            {"goal": f"{r['preset']}: prefill >= 1.5x transformers+peft", "value": r["prefill"]["speedup"],
             "met": r["prefill"]["speedup"] >= 1.5},
            {"goal": f"{r['preset']}: decode >= 1.5x transformers+peft", "value": r["decode"]["speedup"],
             "met": r["decode"]["speedup"] >= 1.5},
        ]
    for gl in goals:
        print(f"goal {gl['goal']}: {gl['value']:.3f} -> {'met' if gl['met'] else 'NOT met'}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine_info("cpu"), "batch": args.batch, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "goals": goals, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
