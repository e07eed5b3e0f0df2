"""SharedRuntime: one continuous-batching engine for embedding and generation requests.

    rt = SharedRuntime(model, tok, max_batch_tokens=2048, cache_budget_bytes=None)
    vecs = rt.embed(texts, adapter="retrieval", pooling="last", normalize=True, prefix="query: ")
    outs = rt.generate(prompts, adapter="generation", max_new_tokens=64, temperature=0.0)

    # mixing both kinds, results as they finish (synchronous, single-threaded stepping):
    hs = [rt.submit_embed(t, adapter="retrieval") for t in texts]
    hg = [rt.submit_generate(p, adapter="generation") for p in prompts]
    for h in rt.stream():          # steps until nothing is pending, yields finished handles
        print(h.kind, h.id, h.result())
    # or rt.run_until_done(); or h.result() (steps until h finishes); or drive rt.step()
    # yourself (a server thread): step() returns the handles that finished in that step.

Requests
--------
- An embedding request is `prefix + text` tokenized with the tokenizer's special tokens,
  with the EOS id appended (RepLLaMA / BSharedRAG); a list of ints is taken as the exact
  token ids (no prefix, no EOS). The result is a float32 tensor [d]. Embedding rows are
  cache-less: a request runs whole in ONE step, so its length is capped at
  `max_embed_tokens = min(max_length, max_batch_tokens)`. Longer inputs are a ValueError
  unless `truncate=True`, which keeps the first max_embed_tokens - 1 tokens and the EOS
  (the last-token pooling row stays the EOS). Empty text (or only whitespace) is a ValueError.
- A generation request is a prompt string (tokenized with special tokens) or token ids.
  The result is a generation.GenerationResult (.token_ids, .finish_reason, .text): EOS
  kept in token_ids; stop strings cut from the text; repetition penalty / temperature /
  top_k / top_p through generation.py's processors (transformers' order). Sampling is per
  request: `seed` drives a torch.Generator owned by that request (rt.generate(prompts,
  seed=s) gives prompt i seed s + i), so a request's tokens do not depend on what else
  shares its steps: greedy output is the same in any batch (tests hold it to transformers').
  `generate(model, tok, prompts, ...)` below runs a batch on an engine of its own.
- Unknown adapters, empty inputs, bad sampling parameters and requests that could never
  fit (prompt longer than max_length, or prompt + max_new_tokens beyond the whole cache)
  are a ValueError at submit time.

Scheduling (each step(), up to max_batch_tokens rows, one step.run_step call):
1. decode: every running generation past its prompt contributes its last token (1 row),
   and a greedy one up to `speculate` draft tokens found by prompt lookup, while the step's
   decode and draft rows stay within SPEC_MAX_ROWS; it keeps the drafts its own greedy
   tokens agree with, the cache drops the rest (engine/speculative.py);
2. prefill: generations still in their prompt get the next chunk (oldest first), as long
   as tokens are left in the budget (chunked prefill; only a chunk that completes the
   prompt gets a logits row);
3. waiting requests in submission order: an embedding request is packed whole if it fits
   the rest of the budget; a generation is admitted (KV-cache sequence allocated, first
   prompt chunk packed) if the cache can hold its WORST case (prompt + max_new_tokens - 1
   tokens) beside the worst cases of the running ones. Admission is FIFO per kind: an
   embedding that does not fit the rest of the budget holds back later embeddings and
   later generations (whose decode rows would keep eating the budget it needs); a
   generation that does not fit the cache holds back later generations only (embedding
   rows need no cache). Nothing is dropped: waiting requests wait; a finished generation
   frees its blocks at once. Reserving the worst case means a running sequence can never
   run out of cache (no preemption / recomputation is ever needed); the price is that
   sequences stopping early at EOS were over-reserved while they ran. With mixing="cost"
   (the default) waiting embeddings join a step that already holds generation rows only
   when the step costs measured so far say that is no dearer than steps of their own
   (engine/cost.py); one deferred MAX_EMBED_DEFER steps joins anyway.
One LoRAMeta covers the whole packed batch (each sequence with its own adapter); the LM
head runs only on the logits rows; embedding rows are gathered from the pre-final-norm
hidden states and pooled with the final RMSNorm fused (ops.pool(norm_weight=model.norm)).

Thread-safety: submit_* and step() take one lock, so a server thread may drive step()
while others submit and block on handle.wait(); result() / stream() / run_until_done()
step on the caller's thread. If a step's model call raises, that step's requests finish
with .error set (result() raises), their cache blocks are freed and step() re-raises.

Cancelling: rt.cancel(h) withdraws a waiting or running request between steps (a server
whose client went away): a running generation's KV-cache blocks are freed at once and
the handle finishes with .cancelled True and .error a RequestCancelled. While a
generation runs, h.tokens is a copy of the token ids generated so far (for streaming).
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch

from .. import ops
from ..util.pool_modes import MODES as POOL_MODES
from ..util.sysinfo import available_memory_bytes, release_free_heap
from .cost import StepCosts
from .generation import (GenerationResult, append_token, apply_repetition_penalty, check_sampling, eos_ids, primary_eos,
                         sample, stop_strings)
from .graphs import MODES as GRAPH_MODES
from .graphs import DecodeGraphs
from .kv_cache import CacheFullError, KVCache, kv_bytes_per_token
from .speculative import PromptLookup
from .step import StepOutput, run_step

__all__ = ["SharedRuntime", "RequestHandle", "RequestCancelled", "RequestFailed", "generate"]


# the most of the memory free at start-up that the default KV cache takes
KV_MEMORY_SHARE = 0.25


def default_kv_budget(cfg, dtype: torch.dtype, device, max_batch_tokens: int, max_length: int,
                      block_size: int) -> int:
    """Bytes of the default KV cache, sized to the model and the machine: room for 4 full steps
    or one longest sequence, whichever is more (4 x max_length had cost smollm2-135m, 8192
    positions, 1.5 GB of zeroed cache and 2-5 s at every start), but at most KV_MEMORY_SHARE
    of the memory free now (MemAvailable, or the GPU's free memory), never below one longest
    sequence."""
    per_token = kv_bytes_per_token(cfg, dtype)
    tokens = max(4 * max_batch_tokens, max_length)
    dev = torch.device(device)
    try:
        free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else available_memory_bytes()
    except OSError:  # no /proc/meminfo: not capped
        free = 0
    if free > 0:
        tokens = min(tokens, max(max_length, int(free * KV_MEMORY_SHARE) // per_token))
    return -(-tokens // block_size) * block_size * per_token


def worst_case_tokens(prompt_len: int, max_new_tokens: int) -> int:
    """The KV cache rows a generation may take: its prompt and every new token but the last
    (never fed back), and at least its prompt."""
    return prompt_len + max(max_new_tokens, 1) - 1


class RequestCancelled(Exception):
    """The error of a request withdrawn by SharedRuntime.cancel."""


class RequestFailed(RuntimeError):
    """The error of one request the engine stopped while it went on with the others: its
    sampling, its adapter or its logits failed. status: 400 when the request's own values
    caused it, 500 when the model did (e.g. non-finite logits)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@dataclass
class _EmbedSpec:
    ids: list
    adapter: object
    pooling: str
    normalize: bool
    deferred: int = 0  # steps it waited because mixing it in did not pay (see engine/cost.py)


@dataclass
class _GenSpec:
    prompt: list
    adapter: object
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    stop: list
    eos: set
    generator: Optional[torch.Generator]
    # engine state
    seq_id: object = None
    prefilled: int = 0  # prompt tokens already in the cache
    reserved_blocks: int = 0  # worst-case blocks (prompt + max_new_tokens - 1 tokens)
    lookup: Optional[PromptLookup] = None  # its n-gram index, once it drafts (engine/speculative.py)
    result: GenerationResult = field(default_factory=lambda: GenerationResult([], "length"))


class RequestHandle:
    """One submitted request. `kind` is "embed" or "generate"; `done` turns True when the
    engine finishes it; `result()` returns the float32 [d] embedding or the
    GenerationResult, stepping the engine on this thread until the request is done."""

    def __init__(self, runtime: "SharedRuntime", rid: int, kind: str, spec):
        self.runtime, self.id, self.kind, self._spec = runtime, rid, kind, spec
        self.done = False
        self.output = None
        self.error: Optional[BaseException] = None  # set when the step running it raised
        self.cancelled = False
        self._event = threading.Event()
        self.submitted_at = time.perf_counter()
        self.finished_at: Optional[float] = None

    @property
    def num_tokens(self) -> int:
        return len(self._spec.ids) if self.kind == "embed" else len(self._spec.prompt)

    @property
    def tokens(self) -> list:
        """Generation requests: the token ids generated so far (a copy)."""
        if self.kind != "generate":
            raise ValueError(f"request {self.id} is an embedding request: it has no generated tokens")
        return list(self._spec.result.token_ids)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until another thread's step() finishes this request (no stepping here)."""
        return self._event.wait(timeout)

    def result(self):
        while not self.done:
            if not self.runtime.step() and not self.done and not self.runtime.has_pending():
                raise RuntimeError(f"request {self.id} is not pending in its runtime")
        if isinstance(self.error, RequestFailed):  # a RuntimeError that already says which request and why
            raise self.error
        if self.error is not None:
            raise RuntimeError(f"request {self.id} failed: {self.error!r}") from self.error
        return self.output

    def __repr__(self):
        return f"RequestHandle(id={self.id}, kind={self.kind!r}, done={self.done})"


class SharedRuntime:
    """Continuous-batching engine over one Backbone; see the module docstring.

    max_batch_tokens: rows packed into one step (decode rows + prefill chunks + embedding rows).
    cache_budget_bytes: KV cache size; None -> room for max(4 x max_batch_tokens, max_length)
        tokens. Admission control (worst-case reservation) keeps every request within it.
    max_length: longest prompt / embedding input (default config.max_position_embeddings).
    max_running: most generations admitted at once (always <= max_batch_tokens, so every
        running generation gets its decode row in every step; None: otherwise only the cache limits).
    mixing: "cost" (default): embedding rows join a step that generates only when the step
        costs learned so far say it beats running them in full steps of their own (engine/cost.py;
        an embedding deferred MAX_EMBED_DEFER steps joins anyway); "always": whenever they fit.
    decode_graphs: "off" (default); "cuda": steps of decode rows only run as CUDA graphs, one
        captured per batch bucket (engine/graphs.py; CUDA with triton); "static": the same
        static-buffer path run eagerly (any device: what the graphs capture, for tests).
    speculate: draft tokens a greedy generation (temperature 0, no repetition penalty) may add
        to its decode row by prompt lookup (engine/speculative.py; same tokens, fewer steps),
        while the step's decode and draft rows stay within SPEC_MAX_ROWS; 0: off. None (the
        default): 4 for float32 weights, else 0. A bf16 model on the AVX2 EPYC gained nothing
        (53.8 against 53.6 tokens/s), and its several-row steps round differently from a
        decode row, so its greedy text parted from the plain one. int8 weights (a quarter of
        the bytes to stream) lost with drafts on the Zen 4: 117.8 against 122.9 tokens/s
        (smollm2-135m, 128 tokens, median of 3). Off with decode_graphs,
        whose captured steps take one row per sequence.
    """

    MAX_EMBED_DEFER = 64
    # After a CPU step of at least this many rows, the heap pages its activations freed go back
    # to the OS (util.malloc keeps freed memory for reuse; prefills, then embeddings of other
    # shapes, kept stacking it up). smollm2-135m, 16 x 64 generations then 128 embeddings: peak
    # RSS 1090 -> 1050 MB, after them 1090 -> 916; the time within noise (29.2 against 28.9 s).
    # Likewise the KV cache's pages when its last generation finishes (KVCache.release_pages).
    TRIM_ROWS = 256
    # Decode + draft rows of a step that may carry drafts: up to here a step still streams each
    # weight once and a row costs ~7% of it (engine/speculative.py); at 16 decode rows and
    # more, drafts would only make the big batches' steps dearer
    SPEC_MAX_ROWS = 8

    def __init__(self, model, tokenizer=None, max_batch_tokens: int = 2048,
                 cache_budget_bytes: Optional[int] = None, block_size: int = 16,
                 max_length: Optional[int] = None, max_running: Optional[int] = None, mixing: str = "cost",
                 decode_graphs: str = "off", speculate: Optional[int] = None):
        if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be an int >= 1, got {max_batch_tokens!r}")
        if mixing not in ("cost", "always"):
            raise ValueError(f"mixing must be 'cost' or 'always', got {mixing!r}")
        self.mixing, self.costs = mixing, StepCosts()
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.max_batch_tokens = max_batch_tokens
        self.max_length = int(max_length or cfg.max_position_embeddings)
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length!r}")
        self.max_embed_tokens = min(self.max_length, max_batch_tokens)
        self.truncated = 0  # embedding inputs cut to their limit so far
        if max_running is not None and max_running < 1:
            raise ValueError(f"max_running must be >= 1 or None, got {max_running!r}")
        self.max_running = max_running
        if cache_budget_bytes is None:
            cache_budget_bytes = default_kv_budget(cfg, model.dtype, model.device, max_batch_tokens, self.max_length,
                                                   block_size)
        self.cache = KVCache(cfg, int(cache_budget_bytes), model.dtype, model.device, block_size)
        if decode_graphs not in GRAPH_MODES:
            raise ValueError(f"decode_graphs must be one of {GRAPH_MODES}, got {decode_graphs!r}")
        self.graphs = None
        if decode_graphs != "off":
            self.graphs = DecodeGraphs(model, self.cache, decode_graphs)
        if speculate is None:
            speculate = 4 if model.dtype == torch.float32 and not model.quantized else 0
        if not isinstance(speculate, int) or isinstance(speculate, bool) or speculate < 0:
            raise ValueError(f"speculate must be an int >= 0, got {speculate!r}")
        self.speculate = speculate if self.graphs is None else 0
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._waiting: list[RequestHandle] = []  # submission order, both kinds
        self._running: list[RequestHandle] = []  # admitted generations, admission order
        self.stats = {"steps": 0, "rows": 0, "decode_rows": 0, "prefill_rows": 0, "embed_rows": 0,
                      "draft_rows": 0, "drafts_accepted": 0, "step_seconds": 0.0}

    @classmethod
    def from_pretrained(cls, model: str, adapters: Optional[dict] = None, *, dtype: torch.dtype = torch.float32,
                        device="cpu", **runtime_kw) -> "SharedRuntime":
        """The engine over a model directory / .gguf file / model name (model_store), its
        tokenizer, and the PEFT adapters in `adapters` ({name: directory}; None entries are
        skipped); runtime_kw: further SharedRuntime options."""
        from ..model.backbone import Backbone
        from ..model.tokenizer import Tokenizer

        backbone = Backbone.from_pretrained(model, dtype=dtype, device=device)
        for name, path in (adapters or {}).items():
            if path:
                backbone.load_adapter(path, name)
        return cls(backbone, Tokenizer.from_pretrained(model), **runtime_kw)

    # -- submission --------------------------------------------------------------------

    def _check_adapter(self, adapter):
        if adapter is None:
            return None
        if isinstance(adapter, str):
            if adapter not in self.model.adapter_slots:
                raise ValueError(f"unknown adapter {adapter!r}; loaded: {sorted(self.model.adapter_slots)}")
            return adapter
        if isinstance(adapter, int) and not isinstance(adapter, bool):
            if not 0 <= adapter < self.model.num_lora_slots:
                raise ValueError(f"adapter slot {adapter} out of range (0..{self.model.num_lora_slots - 1})")
            return adapter
        raise ValueError(f"adapter must be a name, a slot int or None, got {adapter!r}")

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer (or pass token ids)")
        return self.tokenizer

    def _eos_id(self) -> Optional[int]:
        return primary_eos(self.model, self.tokenizer)

    def _as_ids(self, x, what: str) -> Optional[list]:
        """A list/tuple/tensor of ints -> list; a str -> None (the caller tokenizes)."""
        if isinstance(x, str):
            return None
        if isinstance(x, torch.Tensor):
            x = x.tolist()
        if isinstance(x, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            ids = list(x)
            if not ids:
                raise ValueError(f"{what} is empty")
            V = self.model.config.vocab_size
            if any(not 0 <= t < V for t in ids):
                raise ValueError(f"{what} has token ids outside 0..{V - 1}")
            return ids
        raise ValueError(f"{what} must be a string or a list of token ids, got {type(x).__name__}")

    def _add(self, kind: str, spec) -> RequestHandle:
        with self._lock:
            h = RequestHandle(self, next(self._ids), kind, spec)
            self._waiting.append(h)
            return h

    def submit_embed(self, text, adapter="retrieval", pooling: str = "last", normalize: bool = True,
                     prefix: str = "query: ", truncate: bool = False,
                     max_tokens: Optional[int] = None) -> RequestHandle:
        """Queue one embedding request (text, or exact token ids); see the module docstring.
        Use prefix="passage: " for documents, prefix="" for none. max_tokens: cut the input to
        this many tokens, EOS included (as the retriever trainer's query/passage_max_len),
        instead of refusing it; self.truncated counts the inputs cut either way."""
        adapter = self._check_adapter(adapter)
        if pooling not in POOL_MODES:
            raise ValueError(f"pooling must be one of {POOL_MODES}, got {pooling!r}")
        ids, eos = self._as_ids(text, "embedding input"), None
        if ids is None:
            if not text.strip():
                raise ValueError("cannot embed an empty text")
            eos = self._eos_id()
            ids = embedding_ids(self._need_tokenizer("embedding text"), text, prefix, eos)
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
            raise ValueError(f"max_tokens must be an int >= 2, got {max_tokens!r}")
        limit = self.max_embed_tokens if max_tokens is None else min(max_tokens, self.max_embed_tokens)
        if len(ids) > limit:
            if not truncate and max_tokens is None:
                raise ValueError(
                    f"embedding input has {len(ids)} tokens, more than max_embed_tokens={self.max_embed_tokens} "
                    f"(min of max_length and max_batch_tokens); pass truncate=True to cut it"
                )
            ids = cut_embedding_ids(ids, limit, eos is not None)
            self.truncated += 1
        return self._add("embed", _EmbedSpec(ids, adapter, pooling, bool(normalize)))

    def submit_generate(self, prompt, adapter="generation", max_new_tokens: int = 64, temperature: float = 0.0,
                        top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                        stop: Union[None, str, Sequence[str]] = None, seed: Optional[int] = None,
                        eos_token_id: Union[None, int, Sequence[int]] = None,
                        clip_to_context: bool = False) -> RequestHandle:
        """Queue one generation request (prompt text or token ids); see the module docstring.
        Prompt + max_new_tokens beyond the model's positions is a ValueError, or, with
        clip_to_context, max_new_tokens shrinks to the room left (finish_reason "length" there)."""
        adapter = self._check_adapter(adapter)
        ids = self._as_ids(prompt, "prompt")
        if ids is None:
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self._need_tokenizer("a text prompt").encode(prompt, add_special_tokens=True)
            if not ids:
                raise ValueError(f"prompt {prompt!r} tokenizes to nothing")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        temperature, top_p, repetition_penalty = check_sampling(temperature, top_k, top_p, repetition_penalty)
        stop = stop_strings(stop, self.tokenizer)
        if len(ids) > self.max_length:
            raise ValueError(f"prompt has {len(ids)} tokens, more than max_length={self.max_length}")
        positions = self.model.config.max_position_embeddings
        if clip_to_context and len(ids) < positions:
            max_new_tokens = min(max_new_tokens, positions - len(ids))
        if len(ids) + max_new_tokens > positions:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens={max_new_tokens} exceeds the model's "
                             f"{positions} positions; ask for at most {max(0, positions - len(ids))} new tokens")
        blocks = self.cache.blocks_needed(worst_case_tokens(len(ids), max_new_tokens))
        if blocks > self.cache.num_blocks:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens={max_new_tokens} needs {blocks} KV cache blocks, "
                f"the whole cache has {self.cache.num_blocks}; raise cache_budget_bytes"
            )
        gen = None if seed is None else torch.Generator(device=self.model.device).manual_seed(int(seed))
        spec = _GenSpec(ids, adapter, max_new_tokens, temperature, int(top_k or 0), top_p, repetition_penalty, stop,
                        eos_ids(self.model, self.tokenizer, eos_token_id), gen)
        spec.reserved_blocks = blocks
        return self._add("generate", spec)

    # -- blocking convenience API ------------------------------------------------------

    def embed(self, texts, adapter="retrieval", pooling: str = "last", normalize: bool = True,
              prefix: str = "query: ", truncate: bool = False, max_tokens: Optional[int] = None) -> torch.Tensor:
        """float32 [n, d] embeddings of texts (strings or token-id lists), in order (see submit_embed)."""
        if isinstance(texts, str):
            texts = [texts]
        hs = []
        with self._submitting(hs):
            for t in texts:
                hs.append(self.submit_embed(t, adapter, pooling, normalize, prefix, truncate, max_tokens))
        if not hs:
            return torch.empty(0, self.model.config.hidden_size, dtype=torch.float32)
        return torch.stack([h.result() for h in hs])

    def generate(self, prompts, adapter="generation", max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop: Union[None, str, Sequence[str]] = None, seed: Optional[int] = None,
                 eos_token_id=None) -> list[GenerationResult]:
        """GenerationResults for prompts (strings or token-id lists), in order; prompt i
        samples with seed + i when a seed is given."""
        if isinstance(prompts, str):
            prompts = [prompts]
        hs = []
        with self._submitting(hs):
            for i, p in enumerate(prompts):
                hs.append(self.submit_generate(p, adapter, max_new_tokens, temperature, top_k, top_p,
                                               repetition_penalty, stop, None if seed is None else seed + i,
                                               eos_token_id))
        return [h.result() for h in hs]

    @contextlib.contextmanager
    def _submitting(self, handles: list):
        """All or nothing: if one submission of a batch fails, withdraw the earlier ones."""
        try:
            yield
        except BaseException:
            with self._lock:
                gone = set(id(h) for h in handles)
                self._waiting = [h for h in self._waiting if id(h) not in gone]
            raise

    def has_pending(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        """Submitted requests not yet admitted (both kinds)."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Admitted generations (holding KV-cache blocks)."""
        return len(self._running)

    def cancel(self, handle: RequestHandle) -> bool:
        """Withdraw a waiting or running request of this runtime; a running generation's cache
        blocks are freed. Returns False (and changes nothing) when it had already finished."""
        if handle.runtime is not self:
            raise ValueError(f"request {handle.id} belongs to another runtime")
        with self._lock:
            if handle.done:
                return False
            if handle in self._waiting:
                self._waiting.remove(handle)
            handle.cancelled = True
            self._fail(handle, RequestCancelled(f"request {handle.id} was cancelled"), [])
            return True

    def run_until_done(self) -> None:
        while self.has_pending():
            self.step()

    def stream(self) -> Iterator[RequestHandle]:
        """Step until nothing is pending, yielding each handle as it finishes."""
        while self.has_pending():
            yield from self.step()

    # -- the engine step ---------------------------------------------------------------

    def _outstanding_blocks(self) -> int:
        """Blocks the running generations may still take (worst case)."""
        return sum(max(0, h._spec.reserved_blocks - len(self.cache._tables[h._spec.seq_id])) for h in self._running)

    def step(self) -> list[RequestHandle]:
        """Pack and run one engine step; returns the requests that finished in it."""
        with self._lock, torch.inference_mode():
            return self._step()

    def _step(self) -> list[RequestHandle]:
        budget = self.max_batch_tokens
        ids: list[int] = []
        lens: list[int] = []
        seq_ids: list = []
        adapters: list = []
        # per packed sequence: ("gen", handle, needs_logits, draft) (decode row + its draft tokens,
        # or a prompt chunk) or ("emb", handle)
        items: list[tuple] = []

        def pack(toks, sid, adapter, item):
            ids.extend(toks)
            lens.append(len(toks))
            seq_ids.append(sid)
            adapters.append(adapter)
            items.append(item)

        # 1. decode rows (with their drafts while the step stays small); 2. prefill chunks of
        # admitted prompts (oldest first)
        n_dec = 0
        room = 0
        if self.speculate:
            room = self.SPEC_MAX_ROWS - sum(h._spec.prefilled == len(h._spec.prompt) for h in self._running)
        for h in self._running:
            s = h._spec
            if s.prefilled == len(s.prompt) and budget > 0:
                draft = self._draft(s, min(room, budget - 1)) if room > 0 else []
                room -= len(draft)
                pack([s.result.token_ids[-1]] + draft, s.seq_id, s.adapter, ("gen", h, True, draft))
                budget -= 1 + len(draft)
                n_dec += 1
        for h in self._running:
            s = h._spec
            if s.prefilled < len(s.prompt) and budget > 0:
                n = min(budget, len(s.prompt) - s.prefilled)
                pack(s.prompt[s.prefilled: s.prefilled + n], s.seq_id, s.adapter,
                     ("gen", h, s.prefilled + n == len(s.prompt), ()))
                budget -= n
        # 3. waiting requests, FIFO per kind; embeddings join a step that generates only where
        # that is cheaper than steps of their own (engine/cost.py), or once they waited long
        free = self.cache.num_free_blocks - self._outstanding_blocks()
        emb_blocked = gen_blocked = False
        if self.mixing == "cost" and ids:
            emb_blocked = not self._mixing_pays(len(ids), budget)
        admitted = []
        for h in self._waiting:
            if budget <= 0:
                break
            s = h._spec
            if h.kind == "embed":
                if emb_blocked:
                    continue
                if len(s.ids) > budget:
                    # later embeddings wait, and so do later generations: their decode rows
                    # would keep eating the budget this one needs (no starvation)
                    emb_blocked = gen_blocked = True
                    continue
                pack(s.ids, None, s.adapter, ("emb", h))
                budget -= len(s.ids)
                admitted.append(h)
            else:
                if gen_blocked:
                    continue
                if s.max_new_tokens == 0:  # nothing to compute
                    admitted.append(h)
                    continue
                cap = min(self.max_running or self.max_batch_tokens, self.max_batch_tokens)
                if s.reserved_blocks > free or len(self._running) >= cap:
                    gen_blocked = True
                    continue
                free -= s.reserved_blocks
                s.seq_id = self.cache.allocate()
                self._running.append(h)
                admitted.append(h)
                n = min(budget, len(s.prompt))
                pack(s.prompt[:n], s.seq_id, s.adapter, ("gen", h, n == len(s.prompt), ()))
                budget -= n
        if admitted:
            gone = set(id(h) for h in admitted)
            self._waiting = [h for h in self._waiting if id(h) not in gone]

        finished: list[RequestHandle] = []
        for h in admitted:
            if h.kind == "generate" and h._spec.max_new_tokens == 0:
                h._spec.result.text = "" if self.tokenizer is not None else None
                self._finish(h, h._spec.result, finished)
        if not items:
            return finished

        t0 = time.perf_counter()
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        # a decode row's logits and its drafts' (each checks the next draft token)
        logits_rows = [r for i, it in enumerate(items) if it[0] == "gen" and it[2]
                       for r in range(cu[i + 1] - 1 - len(it[3]), cu[i + 1])]
        emb_idx = [i for i, it in enumerate(items) if it[0] == "emb"]
        cache = self.cache if any(sid is not None for sid in seq_ids) else None
        try:
            if self.graphs is not None and n_dec == len(items) == len(ids) and self.graphs.takes(seq_ids):
                slots = [self.model.adapter_slot(a) for a in adapters]
                out = StepOutput(self.graphs.run(seq_ids, ids, slots), None)
            else:
                out = run_step(self.model, torch.tensor(ids, dtype=torch.long), torch.tensor(cu, dtype=torch.int32),
                               seq_ids, cache, adapters=adapters, logits_rows=logits_rows,
                               return_hidden=bool(emb_idx), final_norm=False)
        except Exception as exc:  # fail this step's requests (result() re-raises), keep the engine usable
            for it in items:
                self._fail(it[1], exc, finished)
            raise
        for i, it in enumerate(items):  # account prompt tokens now in the cache
            if it[0] == "gen":
                s = it[1]._spec
                if s.prefilled < len(s.prompt):
                    s.prefilled += lens[i]
        try:
            if emb_idx:
                self._pool(out.hidden, cu, lens, [items[i][1] for i in emb_idx], emb_idx, finished)
            gen_items = [it for it in items if it[0] == "gen" and it[2]]
            if gen_items:
                self._sample(out.logits, [it[1] for it in gen_items], finished, [it[3] for it in gen_items])
        except Exception as exc:  # a bug of ours: this step's unfinished requests fail, the engine goes on
            for it in items:
                self._fail(it[1], exc, finished)
            raise
        del out
        if cu[-1] >= self.TRIM_ROWS and self.model.device.type == "cpu":
            release_free_heap()
        if not self._running:  # the last generation finished: its KV pages need not stay resident
            self.cache.release_pages()
        st = self.stats
        st["steps"] += 1
        st["rows"] += cu[-1]
        st_emb = sum(lens[i] for i in emb_idx)
        st["embed_rows"] += st_emb
        drafted = sum(len(it[3]) for it in items if it[0] == "gen")
        st["decode_rows"] += n_dec
        st["draft_rows"] += drafted
        st["prefill_rows"] += cu[-1] - n_dec - drafted - st_emb
        elapsed = time.perf_counter() - t0
        st["step_seconds"] += elapsed
        self.costs.observe(cu[-1], elapsed)
        return finished

    def _mixing_pays(self, gen_rows: int, budget: int) -> bool:
        """Whether the waiting embeddings that fit in this step's budget should join its
        gen_rows generation rows (StepCosts.mixing_pays); those deferred too long always do."""
        rows, waits = 0, []
        for h in self._waiting:
            if h.kind == "embed":
                if rows + len(h._spec.ids) > budget:
                    break
                rows += len(h._spec.ids)
                waits.append(h._spec)
        if not waits or self.costs.mixing_pays(gen_rows, rows, self.max_batch_tokens):
            return True
        if max(s.deferred for s in waits) >= self.MAX_EMBED_DEFER:
            return True
        for s in waits:
            s.deferred += 1
        return False

    def _finish(self, h: RequestHandle, output, finished: list) -> None:
        h.output, h.done, h.finished_at = output, True, time.perf_counter()
        h._event.set()
        finished.append(h)

    def _fail(self, h: RequestHandle, exc: BaseException, finished: list) -> None:
        if h.done:
            return
        if h.kind == "generate" and h._spec.seq_id is not None:
            self.cache.free(h._spec.seq_id)
            h._spec.seq_id = None
            self._running.remove(h)
        h.error = exc
        self._finish(h, None, finished)

    def _pool(self, hidden, cu, lens, handles, idx, finished) -> None:
        dev = hidden.device
        groups: dict[tuple, list[int]] = {}
        for j, h in enumerate(handles):
            groups.setdefault((h._spec.pooling, h._spec.normalize), []).append(j)
        cfg = self.model.config
        for (mode, normalize), js in groups.items():
            rows = torch.cat([torch.arange(cu[idx[j]], cu[idx[j] + 1]) for j in js]).to(dev)
            sub_cu = [0]
            for j in js:
                sub_cu.append(sub_cu[-1] + lens[idx[j]])
            h_rows = hidden.index_select(0, rows)
            vecs = ops.pool(h_rows, torch.tensor(sub_cu, dtype=torch.int32, device=dev), mode,
                            normalize=normalize, norm_weight=self.model.norm, eps=cfg.rms_norm_eps)
            vecs = vecs.float().cpu()
            for k, j in enumerate(js):
                self._finish(handles[j], vecs[k].clone(), finished)

    def _draft(self, s: _GenSpec, room: int) -> list:
        """Draft tokens for a greedy generation's decode row (engine/speculative.py): at most
        `speculate`, `room`, and one fewer than the tokens it has left (the step emits one more)."""
        if s.temperature != 0.0 or s.repetition_penalty != 1.0:  # drafts are checked by argmax
            return []
        k = min(self.speculate, room, s.max_new_tokens - len(s.result.token_ids) - 1)
        if k <= 0:
            return []
        if s.lookup is None:
            s.lookup = PromptLookup()
            s.lookup.extend(s.prompt)
        s.lookup.extend(s.result.token_ids[len(s.lookup.tokens) - len(s.prompt):])
        return s.lookup.draft(k)

    def _sample(self, logits, handles, finished, drafts) -> None:
        """Pick each row's next token. A row that fails (non-finite logits from its adapter, a
        sampling error) fails its request alone: its KV blocks are freed, the others go on.
        drafts[i]: handle i's draft tokens, whose logits rows follow its own; it keeps the
        drafts its greedy tokens agree with, and the cache drops the rest."""
        scores = logits.float()
        first = list(itertools.accumulate((1 + len(d) for d in drafts), initial=0))  # handle -> its row
        # a row's sum is non-finite iff one of its logits is (or they overflow it, |logits| ~1e34:
        # a broken row too): one pass, where isfinite().all() took 150 us a step at 49k columns
        finite = torch.isfinite(scores.sum(dim=1)).tolist()
        live = []
        for i, h in enumerate(handles):
            if finite[first[i]]:
                live.append(i)
                continue
            s = h._spec
            self._fail(h, RequestFailed(
                f"request {h.id}: the model's logits are not finite (NaN or inf) at generated token "
                f"{len(s.result.token_ids) + 1} with adapter {s.adapter!r}; the request was stopped"), finished)
        # repetition penalty: rows grouped by penalty value (generate's helper, in place; no drafts)
        by_pen: dict[float, list[int]] = {}
        for i in live:
            by_pen.setdefault(handles[i]._spec.repetition_penalty, []).append(i)
        for pen, hs in by_pen.items():
            if pen != 1.0:
                rows = [first[i] for i in hs]
                sub = scores[rows]
                apply_repetition_penalty(sub, [handles[i]._spec.prompt + handles[i]._spec.result.token_ids
                                               for i in hs], pen)
                scores[rows] = sub
        toks: dict[int, int] = {}  # row -> token
        greedy = [r for i in live if handles[i]._spec.temperature == 0.0 for r in range(first[i], first[i + 1])]
        if greedy:  # (every row, the common case: no copy of the logits)
            greedy_scores = scores if len(greedy) == first[-1] else scores[greedy]
            toks.update(zip(greedy, sample(greedy_scores, 0.0).tolist()))
        for i in live:
            s = handles[i]._spec
            if s.temperature != 0.0:  # per request: its own generator and parameters
                r = first[i]
                try:
                    toks[r] = sample(scores[r: r + 1], s.temperature, s.top_k, s.top_p, s.generator).item()
                except RuntimeError as e:  # e.g. a distribution torch.multinomial refuses
                    self._fail(handles[i], RequestFailed(
                        f"request {handles[i].id}: sampling failed (temperature={s.temperature}, top_k={s.top_k}, "
                        f"top_p={s.top_p}, repetition_penalty={s.repetition_penalty}): {e}", status=400), finished)
        for i in live:
            h = handles[i]
            if h.done:  # (its sampling failed)
                continue
            s, r, draft = h._spec, h._spec.result, drafts[i]
            for j in range(len(draft) + 1):  # the decode row's token, then each agreeing draft's
                done = append_token(r, int(toks[first[i] + j]), s.eos, s.stop, self.tokenizer, s.max_new_tokens)
                if done is not None or j == len(draft) or r.token_ids[-1] != draft[j] or not finite[first[i] + j + 1]:
                    break
            if draft:
                self.stats["drafts_accepted"] += j
                # the cache holds the decode row and every draft; keep those before the last token
                self.cache.truncate(s.seq_id, self.cache.length(s.seq_id) - (len(draft) - j))
            if done is not None:
                r.finish_reason = done
                if r.text is None and self.tokenizer is not None:
                    r.text = self.tokenizer.decode_cut(r.token_ids)
                self.cache.free(s.seq_id)
                s.seq_id = None
                self._running.remove(h)
                self._finish(h, r, finished)


def embedding_ids(tokenizer, text: str, prefix: Optional[str], eos: Optional[int]) -> list:
    """The token ids a text is embedded as: prefix + text with the tokenizer's special tokens,
    then the EOS (last-token pooling reads it)."""
    ids = tokenizer.encode((prefix or "") + text, add_special_tokens=True)
    if eos is not None:
        ids.append(eos)
    if not ids:
        raise ValueError(f"text {text!r} tokenizes to nothing")
    return ids


def cut_embedding_ids(ids: list, limit: int, keep_eos: bool) -> list:
    """ids cut to limit tokens, the EOS kept last when the ids end with one (embedding_ids')."""
    if len(ids) <= limit:
        return ids
    return ids[: limit - 1] + [ids[-1]] if keep_eos else ids[:limit]


def generate(model, tokenizer=None, prompts: Sequence[Sequence[int]] = (), adapters=None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, stop: Union[None, str, Sequence[str]] = None,
             eos_token_id: Union[None, int, Sequence[int]] = None, seed: Optional[int] = None,
             cache_budget_bytes: Optional[int] = None, block_size: int = 16) -> list[GenerationResult]:
    """Generate for every prompt (lists of token ids) together, on an engine of their own: a
    SharedRuntime whose step takes every prompt at once (one prefill step, then one decode
    row per running prompt a step) and whose cache holds exactly their worst case.

    adapters: None, one adapter (name / slot) for all prompts, or a list with one per prompt.
    eos_token_id: None -> the tokenizer's EOS, else config.json's; [] disables EOS.
    seed: prompt i samples with its own generator seeded seed + i (as SharedRuntime.generate).
    cache_budget_bytes: None -> exactly what these prompts need; a budget that cannot hold
    every prompt + max_new_tokens raises CacheFullError before any work.
    """
    prompts = [list(map(int, p)) for p in prompts]
    B = len(prompts)
    if B == 0:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if adapters is None or isinstance(adapters, (str, int)):
        adapters = [adapters] * B
    adapters = list(adapters)
    if len(adapters) != B:
        raise ValueError(f"adapters must be one adapter or one per prompt ({B}), got {len(adapters)}")
    need_blocks = sum(-(-worst_case_tokens(len(p), max_new_tokens) // block_size) for p in prompts)
    block_bytes = kv_bytes_per_token(model.config, model.dtype) * block_size
    if cache_budget_bytes is None:
        cache_budget_bytes = need_blocks * block_bytes
    if cache_budget_bytes // block_bytes < need_blocks:
        raise CacheFullError(
            f"cache_budget_bytes={cache_budget_bytes} holds {cache_budget_bytes // block_bytes} blocks of "
            f"{block_size} tokens ({block_bytes} bytes each); these {B} prompts with max_new_tokens="
            f"{max_new_tokens} need {need_blocks} blocks ({need_blocks * block_bytes} bytes)"
        )
    rt = SharedRuntime(model, tokenizer, max_batch_tokens=sum(len(p) for p in prompts),
                       cache_budget_bytes=cache_budget_bytes, block_size=block_size)
    hs = [rt.submit_generate(p, a, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop,
                             None if seed is None else seed + i, eos_token_id)
          for i, (p, a) in enumerate(zip(prompts, adapters))]
    rt.run_until_done()
    return [h.result() for h in hs]
