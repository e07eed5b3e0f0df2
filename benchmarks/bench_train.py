"""Training-step benchmark: our fused path vs transformers + peft, same model, batch and LoRA.

One training step = zero_grad, forward, loss, backward, AdamW step, for
  retriever  B queries + B x (1 + n) passages of mixed lengths, last-token embeddings
             (final norm + L2), InfoNCE at temperature 0.01 over all passages;
  generator  B RAG prompts + answers, cross-entropy on the answer tokens only.
Ours: bsharedrag_fast.Backbone (packed sequences, one ops.lora_linear per merged
projection, ops.pool, LM head on the answer rows only). Theirs: PeftModel over
AutoModelForCausalLM on the right-padded batch with an attention mask (pooling gathers
each sequence's last real token; labels -100 on prompt and padding). Both: LoRA r=32,
alpha=64, dropout 0.1 on q/k/v/o/gate/up/down (the paper's), fp32, the same random
checkpoint (benchmarks' synthetic presets).

Time: median seconds per step, the methods interleaved round-robin (_common.time_methods).
Memory: peak resident set size during the steps minus the resident size just before them,
each method in a fresh process (VmHWM reset through /proc/self/clear_refs, after one
warm-up step so both sides have their optimizer state): what the step adds on top of the
loaded model. The child runs with glibc's mmap threshold fixed at 64 KiB (MALLOC_ENV), so
freed tensors leave the RSS at once and the peak is the live peak, not the allocator's
cache. tracemalloc does not see torch's allocations, and torch has no CPU allocator
statistics, so RSS it is.

    python benchmarks/bench_train.py                      # tiny preset
    python benchmarks/bench_train.py --preset qwen2-0.5b --batch 4
    python benchmarks/bench_train.py --threads 1           # steadier on a busy machine
Prints the ratios and writes JSON to benchmarks/results/train_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

from bsharedrag_fast.bench.presets import PRESETS
from bsharedrag_fast.bench.synthetic import write_checkpoint
from bsharedrag_fast.util.sysinfo import peak_rss_bytes, rss_bytes
from bsharedrag_fast.model.backbone import Backbone, LoRASpec, pack
from bsharedrag_fast.train.cpt import causal_labels
from bsharedrag_fast.train.retriever import info_nce

from _common import RESULTS_DIR, machine_info, time_methods

METHODS = ("ours-retriever", "hf-retriever", "ours-generator", "hf-generator")
LORA = dict(r=32, alpha=64, dropout=0.1)
TEMPERATURE = 0.01
# glibc: every block >= 64 KiB is its own mmap, returned to the OS when freed (a fixed
# threshold also stops glibc raising it after the first frees), so RSS follows live memory.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def workload(vocab: int, batch: int, negatives: int, seed: int = 0) -> dict:
    """Token ids: queries (12-32), passages (48-160), prompts (96-256) with answers (8-32)."""
    g = torch.Generator().manual_seed(seed)

    def seqs(n, lo, hi):
        return [torch.randint(3, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
                for _ in range(n)]

    prompts, answers = seqs(batch, 96, 256), seqs(batch, 8, 32)
    return {"queries": seqs(batch, 12, 32), "passages": seqs(batch * (1 + negatives), 48, 160),
            "gen": [p + a for p, a in zip(prompts, answers)], "answer_start": [len(p) for p in prompts],
            "group": 1 + negatives}


def padded(seqs: list) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    return ids, mask


def ours(ckpt: str, w: dict, task: str):
    model = Backbone.from_pretrained(ckpt).add_lora(LoRASpec(**LORA)).train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-4)
    if task == "retriever":
        seqs, b = w["queries"] + w["passages"], len(w["queries"])
        ids, cu = pack(seqs)

        def loss():
            emb = model.embed_sequences(model.hidden(ids, cu), cu)
            return info_nce(emb[:b], emb[b:], w["group"], TEMPERATURE)
    else:
        ids, cu = pack(w["gen"])
        labels = causal_labels(w["gen"], w["answer_start"])
        count = int((labels != -100).sum())

        def loss():
            return model.lm_loss(model.hidden(ids, cu), labels)[0] / count

    return _step(loss, opt)


def theirs(ckpt: str, w: dict, task: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    pm = get_peft_model(hf, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                       target_modules=list(LoRASpec().targets))).train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    if task == "retriever":
        seqs, b = w["queries"] + w["passages"], len(w["queries"])
        ids, mask = padded(seqs)
        last = mask.sum(1) - 1
        decoder = pm.base_model.model.model  # the decoder stack, LoRA injected (no LM head)

        def loss():
            h = decoder(input_ids=ids, attention_mask=mask).last_hidden_state  # after the final norm
            emb = F.normalize(h[torch.arange(len(seqs)), last], dim=-1)
            return info_nce(emb[:b], emb[b:], w["group"], TEMPERATURE)
    else:
        ids, mask = padded(w["gen"])
        labels = torch.full_like(ids, -100)
        for i, (s, start) in enumerate(zip(w["gen"], w["answer_start"])):
            labels[i, start : len(s)] = torch.tensor(s[start:])

        def loss():
            return pm(input_ids=ids, attention_mask=mask, labels=labels).loss

    return _step(loss, opt)


def _step(loss_fn, opt):
    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def build(method: str, ckpt: str, w: dict):
    side, task = method.split("-")
    return (ours if side == "ours" else theirs)(ckpt, w, task)


def memory_child(method: str, ckpt: str, wfile: str, steps: int) -> None:
    """Run in a fresh process: print the peak RSS the steps add over the loaded model."""
    with open(wfile) as f:
        w = json.load(f)
    step = build(method, ckpt, w)
    step()  # warm-up: optimizer state exists on both sides
    before = rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        step()
    print(json.dumps({"peak_delta": peak_rss_bytes() - before, "rss_before": before}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--batch", type=int, default=4, help="queries / generation examples per step")
    ap.add_argument("--negatives", type=int, default=3, help="hard negatives per query")
    ap.add_argument("--budget", type=float, default=10.0, help="seconds of timing per method")
    ap.add_argument("--memory-steps", type=int, default=2, help="steps measured for peak memory")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "train_cpu.json"))
    ap.add_argument("--memory-child", nargs=3, metavar=("METHOD", "CKPT", "WORKLOAD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.memory_steps)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, args.preset)
        cfg = write_checkpoint(ckpt, PRESETS[args.preset])
        w = workload(cfg["vocab_size"], args.batch, args.negatives)
        wfile = os.path.join(tmp, "workload.json")
        with open(wfile, "w") as f:
            json.dump(w, f)
        print(f"[{args.preset}] timing {', '.join(METHODS)}", file=sys.stderr, flush=True)
        steps = {m: build(m, ckpt, w) for m in METHODS}
        times = time_methods(steps, "cpu", args.budget)
        del steps
        memory = {}
        for m in METHODS:
            print(f"[{args.preset}] memory {m}", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", m, ckpt, wfile,
                                  "--memory-steps", str(args.memory_steps), "--threads", str(torch.get_num_threads())],
                                 env=dict(os.environ, **MALLOC_ENV), check=True, capture_output=True,
                                 text=True).stdout  # fmt: skip
            memory[m] = json.loads(out.strip().splitlines()[-1])
    tokens = {"retriever": sum(map(len, w["queries"] + w["passages"])), "generator": sum(map(len, w["gen"]))}
    rows, goals = {}, []
    for task in ("retriever", "generator"):
        o, h = f"ours-{task}", f"hf-{task}"
        rows[task] = {
            "tokens": tokens[task], "ours_s": times[o], "hf_peft_s": times[h], "time_ratio": times[o] / times[h],
            "ours_tok_s": tokens[task] / times[o], "hf_peft_tok_s": tokens[task] / times[h],
            "ours_peak_delta_bytes": memory[o]["peak_delta"], "hf_peft_peak_delta_bytes": memory[h]["peak_delta"],
            "memory_ratio": memory[o]["peak_delta"] / max(1, memory[h]["peak_delta"]),
        }  # fmt: skip
        goals.append({"goal": f"{task}: step time <= 0.8x transformers+peft", "value": rows[task]["time_ratio"],
                      "met": rows[task]["time_ratio"] <= 0.8})
        goals.append({"goal": f"{task}: peak step memory <= transformers+peft", "value": rows[task]["memory_ratio"],
                      "met": rows[task]["memory_ratio"] <= 1.0})
    print(f"{'task':>9} | {'tokens':>6} | {'ours ms':>8} {'hf+peft ms':>10} {'ratio':>6} | "
          f"{'ours MB':>8} {'hf+peft MB':>10} {'ratio':>6}")
    for task, r in rows.items():
        print(f"{task:>9} | {r['tokens']:>6} | {r['ours_s'] * 1e3:>8.1f} {r['hf_peft_s'] * 1e3:>10.1f} "
              f"{r['time_ratio']:>6.2f} | {r['ours_peak_delta_bytes'] / 2**20:>8.1f} "
              f"{r['hf_peft_peak_delta_bytes'] / 2**20:>10.1f} {r['memory_ratio']:>6.2f}")
    result = {"machine": machine_info("cpu"), "preset": args.preset, "config": PRESETS[args.preset],
              "batch": args.batch, "negatives": args.negatives, "lora": LORA,
              "memory_method": "peak RSS delta over the steps (VmHWM reset via /proc/self/clear_refs), "
                               "fresh process per method, after one warm-up step, glibc mmap threshold 64 KiB",
              "tasks": rows, "goals": goals}  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
