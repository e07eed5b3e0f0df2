"""One engine of `bsharedrag bench --peers` in a process of its own, run by that engine's Python
(a peer may live in a venv of its own: this file imports only the standard library at its top,
and bsharedrag_fast only inside the engines that are ours or run beside it).

    PYTHON path/to/peer_worker.py SPEC.json

SPEC.json: {"engine": one of ENGINES, "model": HF directory, "gguf": file (llamacpp), "dtype",
"threads", "max_model_len", "kv_gib" (vLLM's cache), "adapters": {name: PEFT directory}, "rank"
(the adapters' largest), "speculate" (ours: draft tokens, SharedRuntime's default when absent)}.
Commands are JSON lines on stdin: {"op": "run", "generate": {"prompts": [[ids]], "adapters":
[name or null per prompt], "new_tokens": n} or null, "embed": {"texts": [[ids]], "adapter": name
or null} or null, "keep": bool, "profile": bool (ours: where the time goes, see Ours.PHASES)}
and {"op": "quit"}. A run does both parts as the engine would
serve them arriving together, and replies with its wall-clock start/end (time.time(), so the
parent can time two engines working at once) and, with keep, the outputs: greedy token ids
(EOS ignored: every prompt gets exactly n tokens) and L2-normalized last-token embeddings.
Reply lines start with REPLY; libraries may print other lines.

Engines:
  ours        SharedRuntime over one Backbone with every adapter; embedding and generation
              rows of a run share steps; greedy decoding drafts by prompt lookup unless the
              spec's "speculate" is 0.
  hf          transformers (+ peft with `adapter_names` per row): left-padded batches; a run's
              embeddings, then its generations.
  vllm        vLLM's LLM, generate runner, no LoRA (its fastest base configuration).
  vllm-lora   the same with enable_lora (max_loras = the adapters given, max_lora_rank = "rank").
  vllm-embed  vLLM's pooling runner (convert="embed", LAST pooling), LoRA when adapters are given.
  llamacpp    llama-cpp-python's Llama over a GGUF file; its Python API serves one request at
              a time, so prompts run one after another (KV cache reset before each).
"""
from __future__ import annotations

import json
import os
import sys
import time

REPLY = "REPLY "
INDEX_BATCH = 32  # documents per embedding call in the index workload: `bsharedrag index --batch-size`'s default
ENGINES = ("ours", "hf", "vllm", "vllm-lora", "vllm-embed", "llamacpp")


class WorkerProcess:
    """The parent's side of this protocol (bench/worker.py speaks it too): a worker process,
    its load reply, then one command and its reply at a time."""

    def __init__(self, name: str, argv: list, **popen_kw):
        import subprocess

        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **popen_kw)
        self.loaded = self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        code = self.proc.wait()
        raise RuntimeError(f"bench worker {self.name!r} exited with code {code} (its messages are above)")

    def send(self, cmd: dict) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def ask(self, cmd: dict) -> dict:
        self.send(cmd)
        return self.read()

    def close(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            try:
                self.send({"op": "quit"})
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.end()

    def end(self) -> None:
        """End what the quit left running."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Ours:
    # where a run's time goes (--profile): the cumulative cProfile time of these functions, by
    # (file path suffix, function); the rest is Python scheduling, step metadata and glue
    PHASES = {
        "linear (base GEMMs, LM head)": [("ops/linear.py", "linear")],
        # a base decode step's layers in one C++ call (ops.DecoderStack): its linears, attention
        # and row ops, which then do not pass through the Python ops above
        "decode layers in one C++ call": [("ops/decoder.py", "__call__")],
        "LoRA shrink/expand": [("ops/lora_linear.py", "add_")],
        "attention": [("model/attention.py", "attend")],
        "norms, rotary, SiLU": [("ops/rms_norm.py", "rms_norm"), ("ops/rms_norm.py", "add_rms_norm"),
                                ("ops/rope.py", "rope"), ("ops/silu_mul.py", "silu_mul")],
        "sampling": [("engine/runtime.py", "_sample")],
        "pooling": [("engine/runtime.py", "_pool")],
    }

    def __init__(self, spec: dict):
        import torch

        from bsharedrag_fast.engine.runtime import SharedRuntime
        from bsharedrag_fast.model.backbone import Backbone

        torch.set_num_threads(spec["threads"])
        torch.set_grad_enabled(False)
        model = Backbone.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
        for name, path in spec["adapters"].items():
            model.load_adapter(path, name)
        # the runtime's own defaults (step size, KV budget), as a user gets them
        kw = {"speculate": spec["speculate"]} if "speculate" in spec else {}
        self.rt = SharedRuntime(model, None, max_length=spec["max_model_len"], **kw)
        from bsharedrag_fast.util import malloc
        from bsharedrag_fast.util.threads import wait_description

        self.info = {"omp_wait": wait_description(), "malloc": malloc.POLICY,  # as this process imported us
                     "dtype": "int8" if model.quantized else str(model.dtype).replace("torch.", ""),
                     "speculate": self.rt.speculate,
                     "memory": model.memory_report(self.rt.cache)}  # what the peak RSS goal allows

    def run(self, generate, embed) -> tuple:
        if embed and embed.get("index"):
            return [], self._index(embed)
        rt = self.rt
        gens = [rt.submit_generate(p, adapter=a, max_new_tokens=generate["new_tokens"], eos_token_id=[])
                for p, a in zip(generate["prompts"], generate["adapters"])] if generate else []
        embs = [rt.submit_embed(t, adapter=embed["adapter"], pooling="last")
                for t in embed["texts"]] if embed else []
        rt.run_until_done()
        return [h.result().token_ids for h in gens], [h.result().tolist() for h in embs]

    def _index(self, embed: dict) -> list:
        """`bsharedrag index`'s loop (index.build.index_documents: embed in batches of the
        command's default size, upsert into HNSW + SQLite, save) into a fresh directory."""
        import tempfile

        from bsharedrag_fast.index.build import index_documents
        from bsharedrag_fast.index.hnsw import HNSWIndex

        docs = embed["index"]["docs"]
        vecs = []
        with tempfile.TemporaryDirectory(prefix="bsharedrag_peer_index_") as d:
            idx = HNSWIndex(self.rt.model.config.hidden_size, space="ip")
            for _, v in index_documents(self.rt, idx, docs, embed["texts"], adapter=embed["adapter"],
                                        max_length=embed["index"]["max_length"], batch_size=INDEX_BATCH,
                                        out=os.path.join(d, "index")):
                vecs += v.tolist()
            idx.close()
        return vecs


def left_padded(seqs: list) -> tuple:
    """(ids, attention mask) of token id lists, left-padded with 0 to the longest."""
    import torch

    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.tensor(s)
        mask[b, width - len(s):] = 1
    return ids, mask


def token_chunks(seqs: list, max_tokens: int) -> list:
    """Consecutive chunks whose padded size (rows x longest) stays within max_tokens (>= 1 row)."""
    chunks, cur = [], []
    for s in seqs:
        if cur and (len(cur) + 1) * max(len(s), *map(len, cur)) > max_tokens:
            chunks.append(cur)
            cur = []
        cur.append(s)
    return chunks + [cur] if cur else chunks


class HF:
    def __init__(self, spec: dict):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec["threads"])
        torch.set_grad_enabled(False)
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
        model.generation_config.eos_token_id = None  # every prompt gets exactly new_tokens
        self.pad = model.config.pad_token_id or 0
        adapters = list(spec["adapters"].items())
        if adapters:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapters[0][1], adapter_name=adapters[0][0])
            for name, path in adapters[1:]:
                model.load_adapter(path, adapter_name=name)
        self.model, self.peft = model.eval(), bool(adapters)
        self.max_batch_tokens = 2048  # padded tokens per embedding forward, as our runtime's step
        self._normed = None  # the final norm's output of the latest forward
        base = model.get_base_model() if self.peft else model
        base.model.norm.register_forward_hook(lambda mod, inp, out: setattr(self, "_normed", out))

    def _names(self, adapters: list) -> dict:
        return {"adapter_names": [a or "__base__" for a in adapters]} if self.peft else {}

    def run(self, generate, embed) -> tuple:
        import torch.nn.functional as F

        vecs = []
        for chunk in token_chunks(embed["texts"], self.max_batch_tokens) if embed else []:
            ids, mask = left_padded(chunk)
            self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1,
                       **self._names([embed["adapter"]] * len(chunk)))
            vecs += F.normalize(self._normed[:, -1].float(), dim=-1).tolist()
        tokens = []
        if generate:
            ids, mask = left_padded(generate["prompts"])
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=generate["new_tokens"],
                                      do_sample=False, pad_token_id=self.pad, **self._names(generate["adapters"]))
            tokens = out[:, ids.shape[1]:].tolist()
        return tokens, vecs


class VLLM:
    def __init__(self, spec: dict):
        threads = spec["threads"]
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["kv_gib"]))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        self.SamplingParams = SamplingParams
        engine, adapters = spec["engine"], spec["adapters"]
        # no prefix caching: the bench repeats its prompts every round, a user's prompts differ
        kw = dict(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0,
                  enable_prefix_caching=False)
        if engine == "vllm-embed":
            from vllm.config import PoolerConfig

            kw.update(runner="pooling", convert="embed", pooler_config=PoolerConfig(pooling_type="LAST"))
        if engine != "vllm" and adapters:
            # the smallest max_lora_rank vLLM takes that holds the adapters: its LoRA kernels pay for it
            rank = min(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= spec["rank"])
            kw.update(enable_lora=True, max_loras=len(adapters), max_lora_rank=rank)
        self.lora = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}
        self.llm = LLM(**kw)

    def _inputs(self, seqs: list) -> list:
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=s) for s in seqs]

    def run(self, generate, embed) -> tuple:
        vecs, tokens = [], []
        if embed:
            lora = self.lora[embed["adapter"]] if embed["adapter"] else None
            outs = self.llm.embed(self._inputs(embed["texts"]), lora_request=lora, use_tqdm=False)
            vecs = [o.outputs.embedding for o in outs]
        if generate:
            params = self.SamplingParams(temperature=0.0, max_tokens=generate["new_tokens"], ignore_eos=True,
                                         detokenize=False)
            loras = [self.lora[a] if a else None for a in generate["adapters"]]
            outs = self.llm.generate(self._inputs(generate["prompts"]), params,
                                     lora_request=loras if any(loras) else None, use_tqdm=False)
            tokens = [list(o.outputs[0].token_ids) for o in outs]
        return tokens, vecs


class LlamaCpp:
    def __init__(self, spec: dict):
        from llama_cpp import Llama

        self.llm = Llama(model_path=spec["gguf"], n_ctx=spec["max_model_len"], n_threads=spec["threads"],
                         n_threads_batch=spec["threads"], n_batch=512, seed=0, verbose=False)

    def run(self, generate, embed) -> tuple:
        if embed or any(generate["adapters"]):
            raise ValueError("llamacpp runs base-model generation only here")
        tokens = []
        for prompt in generate["prompts"]:
            self.llm.reset()  # no prefix reuse from the previous prompt or round
            out = []
            for tok in self.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                out.append(tok)
                if len(out) == generate["new_tokens"]:
                    break
            tokens.append(out)
        return tokens, []


def _reply(obj: dict) -> None:
    sys.stdout.write(REPLY + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _profile(engine, cmd: dict) -> dict:
    """One run under cProfile: {"seconds": the profiled run, "phases": {phase: seconds}} over
    engine.PHASES, "rest" being the remainder. cProfile taxes every Python call, so the rest
    (Python-side work) reads high against an unprofiled run."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(engine.run, cmd.get("generate"), cmd.get("embed"))
    seconds = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # (file, line, function) -> (calls, ..., tottime, cumtime, callers)
    phases = {}
    for phase, funcs in engine.PHASES.items():
        phases[phase] = sum(st[3] for (path, _, fn), st in stats.items()
                            if any(path.replace(os.sep, "/").endswith(suf) and fn == f for suf, f in funcs))
    phases["Python: scheduling, step metadata, glue"] = seconds - sum(phases.values())
    return {"seconds": seconds, "phases": phases}


def serve(spec: dict) -> None:
    cls = {"ours": Ours, "hf": HF, "llamacpp": LlamaCpp}.get(spec["engine"], VLLM)
    t0 = time.perf_counter()
    engine = cls(spec)
    _reply({"load_seconds": time.perf_counter() - t0, "pid": os.getpid(), **getattr(engine, "info", {})})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd.get("profile"):
            _reply(_profile(engine, cmd))
            continue
        start, t0 = time.time(), time.perf_counter()
        tokens, vecs = engine.run(cmd.get("generate"), cmd.get("embed"))
        seconds, end = time.perf_counter() - t0, time.time()
        reply = {"seconds": seconds, "start": start, "end": end, "generated": sum(map(len, tokens))}
        if cmd.get("keep"):
            reply.update(tokens=tokens, embeddings=vecs)
        _reply(reply)


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # run by path: the modules beside this file are not top-level modules
    with open(sys.argv[1]) as f:
        serve(json.load(f))
