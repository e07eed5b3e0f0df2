"""RAG pipeline: retrieve with the retrieval LoRA, answer with the generation LoRA, one backbone.

ask() embeds the question with the retrieval adapter (query prefix, EOS appended, pooled as
the adapter was trained), takes the top-k documents from the index, fills the prompt
template with their `title: text` contexts cut to a token budget, and generates with the
generation adapter.
When the tokenizer has a chat template (and chat is not turned off), the filled template is
the user turn of a chat, as an instruction-tuned model expects. ask_many() sends every
question's embedding, then every prompt, through the engine together.

The generator trainer saves the template and the chat choice it trained with beside its
adapter (PROMPT_FILE), and `ask`, `eval generation` and the server read them from there.
Likewise the retriever trainer saves its pooling and prefixes beside the retrieval adapter
(EMBEDDING_FILE), and `index`, `embed`, `ask`, `eval`, `mine-negatives` and the server
embed as it was trained unless told otherwise.

build_prompt is the one prompt builder (a pure function of a tokenizer, the question and its
documents): RAGPipeline, the server, `eval generation` and generator training all use it.
load_rag assembles a pipeline from a model, adapters and an index directory; index_corpus
embeds a corpus into an HNSWIndex as `bsharedrag index` does.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

from ..util.jsonfile import write_json
from .data import passage_text

if TYPE_CHECKING:
    from ..index.hnsw import HNSWIndex

DEFAULT_MAX_LENGTH = 512  # longest embedded input in tokens (prefix and EOS included), everywhere
# The paper's setting (WorthBuying, Chinese e-commerce QA) and an English equivalent.
TEMPLATES = {
    "zh": "请根据以下参考资料回答问题。\n\n参考资料：\n{context}\n\n问题：{question}\n回答：",
    "en": "Answer the question using the reference documents.\n\nDocuments:\n{context}\n\nQuestion: {question}\nAnswer:",
}


@dataclass
class Answer:
    text: str
    sources: list = field(default_factory=list)  # [(doc_id, score)], best first
    prompt: str = ""
    finish_reason: str = ""
    completion_tokens: int = 0


def read_template(template: str) -> str:
    """A command-line template argument: a built-in name (kept as it is), a file holding the
    template, or the template text itself."""
    if template not in TEMPLATES and os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            return f.read()
    return template


PROMPT_FILE = "rag_prompt.json"  # beside a generation adapter: {"template", "chat"}


def _write_format(adapter_dir: str, name: str, rec: dict) -> None:
    write_json(os.path.join(adapter_dir, name), rec, ensure_ascii=False, indent=1)


def _read_format(adapter_dir: Optional[str], name: str, what: str, fields) -> tuple[Optional[str], dict]:
    """(path, fields(record)) of the format file `name` beside an adapter; {} when there is
    none; a file that is not JSON or lacks a field is a ValueError naming it."""
    path = os.path.join(adapter_dir, name) if adapter_dir else None
    if not path or not os.path.isfile(path):
        return path, {}
    try:
        with open(path, encoding="utf-8") as f:
            return path, fields(json.load(f))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not {what} file ({type(e).__name__}: {e})") from None


def save_prompt_format(adapter_dir: str, template: str, chat: bool) -> None:
    """Record how the prompts of the adapter in adapter_dir were built (see read_prompt_format)."""
    _write_format(adapter_dir, PROMPT_FILE, {"template": _check_template(template), "chat": bool(chat)})


def read_prompt_format(adapter_dir: Optional[str]) -> dict:
    """{"template", "chat"} an adapter was trained with; {} when it has no PROMPT_FILE."""
    path, fmt = _read_format(adapter_dir, PROMPT_FILE, "a prompt format",
                             lambda rec: {"template": _check_template(rec["template"]), "chat": rec["chat"]})
    if fmt and not isinstance(fmt["chat"], bool):
        raise ValueError(f'{path}: "chat" must be true or false')
    return fmt


def prompt_settings(template: Optional[str], raw: bool, adapter_dir: Optional[str]) -> tuple[str, Optional[bool]]:
    """(template, chat) for a command: the --template given, else the generation adapter's
    saved one, else "en"; chat off with --raw, else as the adapter was trained, else None
    (the pipeline's default: on when the tokenizer has a chat template)."""
    saved = read_prompt_format(adapter_dir)
    chat = False if raw else saved.get("chat")
    return (read_template(template) if template is not None else saved.get("template", "en")), chat


EMBEDDING_FILE = "embedding.json"  # beside a retrieval adapter: {"pooling", "query_prefix", "passage_prefix"}
EMBEDDING_DEFAULTS = {"pooling": "last", "query_prefix": "query: ", "passage_prefix": "passage: "}


def save_embedding_format(adapter_dir: str, pooling: str, query_prefix: str, passage_prefix: str) -> None:
    """Record how the retrieval adapter in adapter_dir embeds (see embedding_settings)."""
    _write_format(adapter_dir, EMBEDDING_FILE,
                  {"pooling": pooling, "query_prefix": query_prefix, "passage_prefix": passage_prefix})


def read_embedding_format(adapter_dir: Optional[str]) -> dict:
    """{"pooling", "query_prefix", "passage_prefix"} a retrieval adapter was trained with; {}
    when it has no EMBEDDING_FILE."""
    from ..util.pool_modes import MODES

    path, fmt = _read_format(adapter_dir, EMBEDDING_FILE, "an embedding format",
                             lambda rec: {k: rec[k] for k in EMBEDDING_DEFAULTS})
    if not fmt:
        return fmt
    if fmt["pooling"] not in MODES:
        raise ValueError(f'{path}: "pooling" must be one of {MODES}, got {fmt["pooling"]!r}')
    for k in ("query_prefix", "passage_prefix"):
        if not isinstance(fmt[k], str):
            raise ValueError(f'{path}: "{k}" must be a string')
    return fmt


def embedding_settings(adapter_dir: Optional[str], **given: Optional[str]) -> dict:
    """pooling, query_prefix and passage_prefix for a command: each as given when not None,
    else as the retrieval adapter was trained (its EMBEDDING_FILE), else EMBEDDING_DEFAULTS."""
    unknown = set(given) - set(EMBEDDING_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown embedding settings {sorted(unknown)}")
    saved = read_embedding_format(adapter_dir)
    return {k: given[k] if given.get(k) is not None else saved.get(k, d) for k, d in EMBEDDING_DEFAULTS.items()}


def chat_wrap(tok, text: str, chat: bool) -> str:
    """text as the model is prompted with it: the user turn of a chat, or as it is."""
    return tok.apply_chat_template([{"role": "user", "content": text}]) if chat else text


def encode_prompt(tok, prompt: str, chat: bool) -> list[int]:
    """Ids of a prompt from chat_wrap (a rendered chat already holds its special tokens)."""
    return tok.encode(prompt, add_special_tokens=not chat)


def _check_template(template: str) -> str:
    template = TEMPLATES.get(template, template)
    missing = [k for k in ("{context}", "{question}") if k not in template]
    if missing:
        raise ValueError(
            f"template must be one of {sorted(TEMPLATES)} or a string with {{context}} and {{question}}; "
            f"missing {', '.join(missing)}"
        )
    return template


def contexts(tok, docs: Sequence[Mapping], budget: int) -> str:
    """`[i] title: text` of each document in rank order, cut to `budget` tokens in all: each
    document gets an even share, and what a short one leaves goes on."""
    parts, left = [], budget
    for i, doc in enumerate(docs):
        title, text = doc.get("title") or "", doc.get("text") or ""
        body = f"{title}: {text}" if title else text
        ids = tok.encode(body, add_special_tokens=False)
        share = left // (len(docs) - i)
        if len(ids) > share:
            body = tok.decode_cut(ids[:share])
            ids = ids[:share]
        left -= len(ids)
        parts.append(f"[{i + 1}] {body}")
    return "\n".join(parts)


def build_prompt(tok, question: str, docs: Sequence[Mapping], template: str, *, chat: bool, context_tokens: int,
                 max_length: int, max_new_tokens: int) -> str:
    """The prompt of one question over its retrieved documents ({"title", "text"} dicts, best
    first): the template filled with their contexts, as the user turn of the chat template when
    chat. The contexts take at most context_tokens, and less where prompt + max_new_tokens
    would pass max_length. Pure (a tokenizer, no engine or index): generator training, `ask`,
    the server and eval all build their prompts here."""
    template = _check_template(template)
    fixed = len(encode_prompt(tok, chat_wrap(tok, template.format(context="", question=question), chat), chat))
    marks = "\n".join(f"[{i + 1}] " for i in range(len(docs)))
    markers = len(tok.encode(marks, add_special_tokens=False))
    room = max_length - fixed - markers - max_new_tokens
    if room < 1:
        raise ValueError(
            f"question too long: the template and question take {fixed} tokens and the answer "
            f"{max_new_tokens}, leaving no room for contexts within max_length={max_length}"
        )
    return chat_wrap(tok, template.format(context=contexts(tok, docs, min(context_tokens, room)), question=question),
                     chat)


class RAGPipeline:
    def __init__(self, runtime, index, retrieval_adapter: str = "retrieval",
                 generation_adapter: str = "generation", k: int = 3, template: str = "en",
                 context_tokens: int = 768, max_new_tokens: int = 128, temperature: float = 0.0,
                 query_prefix: str = "query: ", pooling: str = "last", retrieval_runtime=None,
                 chat: Optional[bool] = None, query_max_length: Optional[int] = None):
        """retrieval_runtime: the engine that embeds questions when it is not `runtime`
        (Separate RAG: an embedder model beside the generator); default `runtime`.
        chat: put the filled template in the tokenizer's chat template as the user turn;
        None: when the tokenizer has one. query_max_length: cut longer questions to this many
        tokens when embedding them (None: refuse what the engine cannot take)."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if context_tokens < 1:
            raise ValueError(f"context_tokens must be >= 1, got {context_tokens}")
        self.runtime, self.index = runtime, index
        self.retrieval_runtime = runtime if retrieval_runtime is None else retrieval_runtime
        self.retrieval_adapter, self.generation_adapter = retrieval_adapter, generation_adapter
        self.k, self.template = k, _check_template(template)
        self.context_tokens, self.max_new_tokens, self.temperature = context_tokens, max_new_tokens, temperature
        self.query_prefix, self.pooling, self.query_max_length = query_prefix, pooling, query_max_length
        tok = runtime.tokenizer
        self.chat = bool(tok.chat_template) if chat is None else chat
        if self.chat and not tok.chat_template:
            raise ValueError("chat=True needs a tokenizer with a chat template")

    def wrap(self, text: str) -> str:
        return chat_wrap(self.runtime.tokenizer, text, self.chat)

    def encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.runtime.tokenizer, prompt, self.chat)

    def prompt(self, question: str, doc_ids: Sequence[str]) -> str:
        """build_prompt over the indexed documents doc_ids, within this engine's max_length."""
        return build_prompt(self.runtime.tokenizer, question, [self.index.get(d) for d in doc_ids], self.template,
                            chat=self.chat, context_tokens=self.context_tokens, max_length=self.runtime.max_length,
                            max_new_tokens=self.max_new_tokens)

    def retrieve(self, questions: Sequence[str]) -> list:
        vecs = self.retrieval_runtime.embed(list(questions), adapter=self.retrieval_adapter, pooling=self.pooling,
                                            prefix=self.query_prefix, max_tokens=self.query_max_length)
        return self.index.search(vecs, self.k)

    def ask_many(self, questions: Sequence[str]) -> list[Answer]:
        questions = list(questions)
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"question {i} is empty")
        hits = self.retrieve(questions)
        prompts = [self.prompt(q, [d for d, _ in h]) for q, h in zip(questions, hits)]
        outs = self.runtime.generate([self.encode(p) for p in prompts], adapter=self.generation_adapter,
                                     max_new_tokens=self.max_new_tokens, temperature=self.temperature)
        return [
            Answer(text=o.text.strip(), sources=list(h), prompt=p, finish_reason=o.finish_reason,
                   completion_tokens=len(o.token_ids))
            for o, h, p in zip(outs, hits, prompts)
        ]

    def ask(self, question: str) -> Answer:
        return self.ask_many([question])[0]


def load_rag(model: str, index_dir: str, retrieval_adapter: Optional[str] = None,
             generation_adapter: Optional[str] = None, *, k: int = 3, template: Optional[str] = None,
             raw: bool = False, context_tokens: int = 768, max_new_tokens: int = 128, pooling: Optional[str] = None,
             query_prefix: Optional[str] = None, passage_prefix: Optional[str] = None,
             max_length: int = DEFAULT_MAX_LENGTH, dtype=None, device="cpu", max_batch_tokens: int = 2048,
             speculate: Optional[int] = None, verify: bool = True, allow_mismatch: bool = False) -> RAGPipeline:
    """The RAG pipeline over one backbone: `model` (a directory, .gguf or model name) with
    its retrieval and generation adapters (PEFT directories; None: the base model), and the
    index at index_dir, checked (sha256 unless verify=False) and matched against this
    embedder before the model loads, so a bad index costs nothing. The template and chat
    choice default to what the generation adapter was trained with, the pooling and
    prefixes to what the retrieval adapter was trained with (prompt_settings,
    embedding_settings). speculate: SharedRuntime's draft tokens."""
    import torch

    from ..engine.runtime import SharedRuntime
    from ..index.hnsw import HNSWIndex
    from ..model.fingerprint import embedder_fingerprint
    from ..model.store import resolve_model

    template, chat = prompt_settings(template, raw, generation_adapter)
    emb = embedding_settings(retrieval_adapter or model, pooling=pooling, query_prefix=query_prefix,
                             passage_prefix=passage_prefix)
    fp = embedder_fingerprint(resolve_model(model), retrieval_adapter, emb["pooling"], emb["query_prefix"],
                              emb["passage_prefix"], max_length)
    index = HNSWIndex.load(index_dir, embedder=fp, verify=verify, allow_mismatch=allow_mismatch)
    rt = SharedRuntime.from_pretrained(model, {"retrieval": retrieval_adapter, "generation": generation_adapter},
                                       dtype=dtype or torch.float32, device=device, max_batch_tokens=max_batch_tokens,
                                       speculate=speculate)
    return RAGPipeline(rt, index, "retrieval" if retrieval_adapter else None,
                       "generation" if generation_adapter else None, k=k, template=template,
                       context_tokens=context_tokens, max_new_tokens=max_new_tokens,
                       query_prefix=emb["query_prefix"], pooling=emb["pooling"], chat=chat, query_max_length=max_length)


# ----------------------------------------------------------------------------- indexing


def embed_batches(runtime, texts: Sequence[str], adapter, pooling: str, prefix: str, batch_size: int,
                      desc: str, progress: bool, max_length: int) -> Iterator[tuple[int, Any]]:
    """(start, float32 [n, d] embeddings) per batch of texts, with a progress bar; texts longer
    than max_length tokens are cut (runtime.truncated counts them)."""
    from tqdm import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
        for s in range(0, len(texts), batch_size):
            chunk = texts[s : s + batch_size]
            yield s, runtime.embed(chunk, adapter=adapter, pooling=pooling, prefix=prefix, max_tokens=max_length)
            bar.update(len(chunk))


def report_truncated(runtime, max_length: int) -> None:
    """One line on stderr when embedding inputs were cut to max_length (never an error)."""
    if runtime.truncated:
        print(f"note: {runtime.truncated} inputs were longer than --max-length {max_length} tokens and were cut",
              file=sys.stderr)


def index_corpus(runtime, corpus: Mapping[str, Mapping], adapter="retrieval", pooling: str = "last",
                 passage_prefix: str = "passage: ", space: str = "ip", batch_size: int = 64,
                 embedder: Any = None, progress: bool = True, max_length: int = DEFAULT_MAX_LENGTH) -> "HNSWIndex":
    """An HNSWIndex of a {doc_id: {"title", "text", "metadata"}} corpus, each document embedded as
    `passage_prefix + "title text"` (what `bsharedrag index` embeds), cut to max_length tokens.
    Batches go into the index as they are embedded, so only the index holds every vector."""
    from ..index.hnsw import HNSWIndex

    if not corpus:
        raise ValueError("corpus is empty: nothing to index")
    ids = list(corpus)
    for d in ids:
        if not isinstance(corpus[d], Mapping) or not isinstance(corpus[d].get("text"), str):
            raise ValueError(f'corpus[{d!r}] must be a dict with a "text" string')
    texts = [passage_text(corpus[d]) for d in ids]
    index = HNSWIndex(runtime.model.config.hidden_size, space=space, embedder=embedder)
    for s, vecs in embed_batches(runtime, texts, adapter, pooling, passage_prefix, batch_size,
                                     "embedding corpus", progress, max_length):
        batch = ids[s : s + len(vecs)]
        index.upsert(batch, vecs, [dict(corpus[d]) for d in batch])
    return index
