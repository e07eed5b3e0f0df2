"""RAG pipeline: retrieve with the retrieval LoRA, answer with the generation LoRA, one backbone.

ask() embeds the question with the retrieval adapter (query prefix, EOS appended, last-token
pooling), takes the top-k documents from the index, fills the prompt template with their
`title: text` contexts cut to a token budget, and generates with the generation adapter.
ask_many() sends every question's embedding, then every prompt, through the engine together.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

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


def read_template(template: str) -> str:
    """A command-line template argument: a built-in name (kept as it is), a file holding the
    template, or the template text itself."""
    if template not in TEMPLATES and os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            return f.read()
    return template


def _check_template(template: str) -> str:
    template = TEMPLATES.get(template, template)
    missing = [k for k in ("{context}", "{question}") if k not in template]
    if missing:
        raise ValueError(
            f"template must be one of {sorted(TEMPLATES)} or a string with {{context}} and {{question}}; "
            f"missing {', '.join(missing)}"
        )
    return template


class RAGPipeline:
    def __init__(self, runtime, index, retrieval_adapter: str = "retrieval",
                 generation_adapter: str = "generation", k: int = 3, template: str = "en",
                 context_tokens: int = 768, max_new_tokens: int = 128, temperature: float = 0.0,
                 query_prefix: str = "query: ", pooling: str = "last", retrieval_runtime=None):
        """retrieval_runtime: the engine that embeds questions when it is not `runtime`
        (Separate RAG: an embedder model beside the generator); default `runtime`."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if context_tokens < 1:
            raise ValueError(f"context_tokens must be >= 1, got {context_tokens}")
        self.runtime, self.index = runtime, index
        self.retrieval_runtime = runtime if retrieval_runtime is None else retrieval_runtime
        self.retrieval_adapter, self.generation_adapter = retrieval_adapter, generation_adapter
        self.k, self.template = k, _check_template(template)
        self.context_tokens, self.max_new_tokens, self.temperature = context_tokens, max_new_tokens, temperature
        self.query_prefix, self.pooling = query_prefix, pooling

    def contexts(self, doc_ids: Sequence[str], budget: int | None = None) -> str:
        """`title: text` of each document in rank order, cut to `budget` tokens in all (default
        context_tokens): each document gets an even share, and what a short one leaves goes on."""
        tok = self.runtime.tokenizer
        parts, left = [], self.context_tokens if budget is None else budget
        for i, doc_id in enumerate(doc_ids):
            doc = self.index.get(doc_id)
            title, text = doc.get("title") or "", doc.get("text") or ""
            body = f"{title}: {text}" if title else text
            ids = tok.encode(body, add_special_tokens=False)
            share = left // (len(doc_ids) - i)
            if len(ids) > share:
                body = tok.decode(ids[:share])
                ids = ids[:share]
            left -= len(ids)
            parts.append(f"[{i + 1}] {body}")
        return "\n".join(parts)

    def prompt(self, question: str, doc_ids: Sequence[str]) -> str:
        """The filled template; the contexts also shrink so prompt + answer fit the model's max_length."""
        tok = self.runtime.tokenizer
        fixed = len(tok.encode(self.template.format(context="", question=question)))
        markers = len(tok.encode("\n".join(f"[{i + 1}] " for i in range(len(doc_ids))), add_special_tokens=False))
        room = self.runtime.max_length - fixed - markers - self.max_new_tokens
        if room < 1:
            raise ValueError(
                f"question too long: the template and question take {fixed} tokens and the answer "
                f"{self.max_new_tokens}, leaving no room for contexts within max_length={self.runtime.max_length}"
            )
        return self.template.format(context=self.contexts(doc_ids, min(self.context_tokens, room)), question=question)

    def retrieve(self, questions: Sequence[str]) -> list:
        vecs = self.retrieval_runtime.embed(list(questions), adapter=self.retrieval_adapter, pooling=self.pooling,
                                  prefix=self.query_prefix)
        return self.index.search(vecs, self.k)

    def ask_many(self, questions: Sequence[str]) -> list[Answer]:
        questions = list(questions)
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"question {i} is empty")
        hits = self.retrieve(questions)
        prompts = [self.prompt(q, [d for d, _ in h]) for q, h in zip(questions, hits)]
        outs = self.runtime.generate(prompts, adapter=self.generation_adapter,
                                     max_new_tokens=self.max_new_tokens, temperature=self.temperature)
        return [
            Answer(text=o.text.strip(), sources=list(h), prompt=p, finish_reason=o.finish_reason)
            for o, h, p in zip(outs, hits, prompts)
        ]

    def ask(self, question: str) -> Answer:
        return self.ask_many([question])[0]
