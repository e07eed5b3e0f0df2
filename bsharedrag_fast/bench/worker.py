"""One `bsharedrag bench` setup in a process of its own, so its memory figures are its own.

    python -m bsharedrag_fast.bench_worker SPEC.json

SPEC.json: {"setup": "shared"|"separate"|"hf_peft", "model", "adapters": [retrieval, generation],
"dtype", "device" ("cpu" or "cuda"), "threads", "docs", "prompts" (token id lists), "new_tokens",
"max_batch_tokens"}. On CPU memory is the process's RSS; on CUDA it is the device memory torch
allocated (memory_allocated / max_memory_allocated), timings wait for the device to finish.
The worker loads its setup, replies with its memory, then runs the commands it reads on stdin
(one JSON object per line: {"op": "embed"|"generate"|"mixed"|"outputs"|"memory"|"quit"}) while
the parent keeps the other workers idle. Replies are stdout lines starting with REPLY (libraries
may print other lines).

Setups (same checkpoint, same two LoRA adapters, greedy decoding, no tokenizer: token ids):
  shared    one Backbone with both adapters, one SharedRuntime; the mixed workload is submitted
            together, so embedding rows and generation rows share steps.
  separate  Separate RAG: an embedder Backbone (retrieval adapter) and a generator Backbone
            (generation adapter), each with its runtime; the mixed workload runs on both in turn.
  hf_peft   transformers + peft with both adapters; padded batches with `adapter_names`; the
            mixed workload is ONE padded generate() over documents and prompts (the documents'
            embeddings are the first forward's last-token hidden states; their rows decode too).
"""
from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from ..util.sysinfo import peak_rss_bytes, rss_bytes
from .peer_worker import REPLY, left_padded, token_chunks
from .presets import SETUPS


class OursSetup:
    """shared (one backbone, both adapters) or separate (embedder + generator backbones)."""

    def __init__(self, spec: dict, separate: bool):
        from ..engine.kv_cache import kv_bytes_per_token
        from ..engine.runtime import SharedRuntime
        from ..model.backbone import Backbone

        dtype, device = getattr(torch, spec["dtype"]), spec["device"]
        retrieval, generation = spec["adapters"]
        mbt, block = spec["max_batch_tokens"], 16
        first = Backbone.from_pretrained(spec["model"], dtype=dtype, device=device)
        cfg = first.config
        per_token = kv_bytes_per_token(cfg, first.dtype)
        # every answer admitted at once: its worst case (prompt + new tokens), in whole blocks
        gen_blocks = sum(-(-(len(p) + spec["new_tokens"]) // block) for p in spec["prompts"])
        gen_budget = gen_blocks * block * per_token
        if separate:
            second = Backbone.from_pretrained(spec["model"], dtype=dtype, device=device)
            first.load_adapter(retrieval, "retrieval")
            second.load_adapter(generation, "generation")
            self.models = [first, second]
            # the embedder never generates: its cache is one block
            self.rt_embed = SharedRuntime(first, None, mbt, cache_budget_bytes=block * per_token, block_size=block)
            self.rt_gen = SharedRuntime(second, None, mbt, cache_budget_bytes=gen_budget, block_size=block)
        else:
            first.load_adapter(retrieval, "retrieval")
            first.load_adapter(generation, "generation")
            self.models = [first]
            self.rt_embed = self.rt_gen = SharedRuntime(first, None, mbt, cache_budget_bytes=gen_budget,
                                                        block_size=block)

    def weights_bytes(self) -> int:
        return sum(m.memory_report()["total"] for m in self.models)

    def embed(self, docs: list) -> torch.Tensor:
        return self.rt_embed.embed(docs, adapter="retrieval")

    def generate(self, prompts: list, new_tokens: int) -> list:
        return [r.token_ids for r in self.rt_gen.generate(prompts, adapter="generation", max_new_tokens=new_tokens)]

    def mixed(self, docs: list, prompts: list, new_tokens: int) -> tuple:
        if self.rt_embed is not self.rt_gen:
            return self.embed(docs), self.generate(prompts, new_tokens)
        rt = self.rt_embed
        handles = [rt.submit_embed(d, adapter="retrieval") for d in docs]
        handles += [rt.submit_generate(p, adapter="generation", max_new_tokens=new_tokens) for p in prompts]
        rt.run_until_done()
        res = [h.result() for h in handles]
        return torch.stack(res[: len(docs)]), [r.token_ids for r in res[len(docs):]]


class HFPeftSetup:
    """transformers + peft, both adapters on one model, `adapter_names` per row."""

    def __init__(self, spec: dict):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        retrieval, generation = spec["adapters"]
        base = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
        self.device = torch.device(spec["device"])
        base.to(self.device)
        model = PeftModel.from_pretrained(base, retrieval, adapter_name="retrieval")
        model.load_adapter(generation, adapter_name="generation")
        self.model = model.eval()
        self.max_batch_tokens = spec["max_batch_tokens"]
        # the final norm's output of the latest forward: embeddings without output_hidden_states
        self._normed = None
        model.get_base_model().model.norm.register_forward_hook(lambda mod, inp, out: setattr(self, "_normed", out))

    def weights_bytes(self) -> int:
        seen, total = set(), 0
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    def _pooled(self, rows: int) -> torch.Tensor:
        return F.normalize(self._normed[:rows, -1].float(), dim=-1)

    @torch.inference_mode()
    def embed(self, docs: list) -> torch.Tensor:
        out = []
        for chunk in token_chunks(docs, self.max_batch_tokens):
            ids, mask = (t.to(self.device) for t in left_padded(chunk))
            self.model(input_ids=ids, attention_mask=mask, adapter_names=["retrieval"] * len(chunk), logits_to_keep=1)
            out.append(self._pooled(len(chunk)))
        return torch.cat(out)

    def _generate(self, rows: list, adapters: list, new_tokens: int) -> torch.Tensor:
        ids, mask = (t.to(self.device) for t in left_padded(rows))
        out = self.model.generate(input_ids=ids, attention_mask=mask, adapter_names=adapters,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)
        return out[:, ids.shape[1]:]

    @torch.inference_mode()
    def generate(self, prompts: list, new_tokens: int) -> list:
        return self._generate(prompts, ["generation"] * len(prompts), new_tokens).tolist()

    @torch.inference_mode()
    def mixed(self, docs: list, prompts: list, new_tokens: int) -> tuple:
        vecs = []
        hook = self.model.get_base_model().model.norm.register_forward_hook(
            lambda mod, inp, out: vecs.append(out) if not vecs else None)  # the prefill forward only
        try:
            gen = self._generate(docs + prompts, ["retrieval"] * len(docs) + ["generation"] * len(prompts), new_tokens)
        finally:
            hook.remove()
        return F.normalize(vecs[0][: len(docs), -1].float(), dim=-1), gen[len(docs):].tolist()


def _reply(obj: dict) -> None:
    sys.stdout.write(REPLY + json.dumps(obj) + "\n")
    sys.stdout.flush()


class _Meter:
    """Memory over the level before loading (RSS on CPU, torch's allocations on CUDA), and a
    clock that waits for the device."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.base, self.base_rss = self._now(), rss_bytes()

    def _now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else rss_bytes()

    def peak(self) -> int:
        return (torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes()) - self.base

    def used(self) -> int:
        return self._now() - self.base

    def time(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def serve(spec: dict) -> None:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec["setup"] == "hf_peft":  # imported before the baseline: library code is not model memory
        import peft  # noqa: F401
        import transformers  # noqa: F401
    else:
        from ..engine import runtime  # noqa: F401
        from ..model import backbone as model
    torch.set_grad_enabled(False)
    meter = _Meter(spec["device"])
    t0 = meter.time()
    setup = HFPeftSetup(spec) if spec["setup"] == "hf_peft" else OursSetup(spec, spec["setup"] == "separate")
    _reply({"load_seconds": meter.time() - t0, "base_rss_bytes": meter.base_rss,
            "loaded_bytes": meter.used(), "peak_load_bytes": meter.peak(),
            "weights_bytes": setup.weights_bytes()})
    docs, prompts, n = spec["docs"], spec["prompts"], spec["new_tokens"]
    last = {}
    for line in sys.stdin:
        op = json.loads(line)["op"]
        if op == "quit":
            break
        if op == "memory":
            # after the workloads ran: weights read lazily from a memory map are resident by now
            _reply({"resident_bytes": meter.used(), "peak_bytes": meter.peak()})
        elif op == "outputs":  # what the latest runs returned, for the cross-setup check
            vecs, tokens = last["mixed"]
            _reply({"embeddings": last["embed"][:4].tolist(), "tokens": last["generate"][:2],
                    "mixed_embeddings": vecs[:4].tolist(), "mixed_tokens": tokens[:2]})
        elif op in ("embed", "generate", "mixed"):
            t0 = meter.time()
            if op == "embed":
                last[op], generated = setup.embed(docs), []
            elif op == "generate":
                last[op] = generated = setup.generate(prompts, n)
            else:
                last[op] = setup.mixed(docs, prompts, n)
                generated = last[op][1]
            _reply({"seconds": meter.time() - t0, "generated_tokens": sum(map(len, generated))})
        else:
            raise ValueError(f"unknown op {op!r}")


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        serve(json.load(f))
