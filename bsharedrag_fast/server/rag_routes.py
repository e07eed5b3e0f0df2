"""POST /v1/rag/ask: retrieve with the retrieval model, answer with the generation model,
return the answer with its sources."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from fastapi import APIRouter, Request

from ..model.fingerprint import adapter_sha256
from ..rag.pipeline import build_prompt, encode_prompt
from .errors import APIError
from .schemas import RAGRequest
from .state import FINISH_REASONS, server, usage, wait_all

log = logging.getLogger("bsharedrag.server")
router = APIRouter()


@dataclass
class RAGService:
    """What /v1/rag/ask needs. The index is only ever touched on `pool`'s one thread (its
    SQLite doc store belongs to the thread that opened it: load it there too)."""

    index: object
    pool: ThreadPoolExecutor
    retrieval_model: str
    generation_model: str
    k: int = 3
    template: str = "en"
    chat: Optional[bool] = None  # the filled template as a chat's user turn (None: when the tokenizer has one)
    context_tokens: int = 768
    max_new_tokens: int = 128
    query_prefix: str = "query: "
    pooling: str = "last"
    allow_mismatch: bool = False  # serve an index whose recorded retrieval adapter differs (logged)

    def check_retrieval_adapter(self, name: str, path: str) -> None:
        """An adapter loaded as the RAG retrieval model must be the one the index was built
        with (its content, fingerprint.adapter_sha256): else a ValueError, or with
        allow_mismatch a logged warning."""
        embedder = self.index.embedder or {}
        if name != self.retrieval_model or "adapter_sha256" not in embedder:  # (an index of older records)
            return
        recorded, given = embedder["adapter_sha256"], adapter_sha256(path)
        if given != recorded:
            why = (f"adapter {name!r} from {path} is not the retrieval adapter the RAG index was built with "
                   f"(adapter_sha256: index has {recorded}, this one {given}); its queries would not match the "
                   f"indexed vectors")
            if not self.allow_mismatch:
                raise ValueError(why)
            log.warning("%s; loaded anyway (--allow-mismatch)", why)


@router.post("/v1/rag/ask")
async def rag_ask(req: RAGRequest, request: Request):
    st = server(request)
    rag, limits, driver = st.rag, st.limits, st.driver
    rt, tok = driver.rt, driver.rt.tokenizer
    if rag is None:
        raise APIError(404, "this server has no index: start it with --index DIR", code="no_index")
    question = req.question
    if not question.strip():
        raise APIError(400, "question is empty", param="question", code="invalid_value")
    k = rag.k if req.k is None else req.k
    if not 1 <= k <= limits.max_batch:
        raise APIError(400, f"k must be between 1 and {limits.max_batch}, got {k}", param="k", code="invalid_value")
    max_tokens = rag.max_new_tokens if req.max_tokens is None else req.max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}",
                       param="max_tokens", code="invalid_value")
    sub = [lambda a: rt.submit_embed(question, a, rag.pooling, True, rag.query_prefix)]
    [qh] = await wait_all(request, await driver.submit(rag.retrieval_model, sub))

    def retrieve():  # on the index's own thread
        hits = rag.index.search(qh.output[None], k)[0]
        docs = [rag.index.get(d) for d, _ in hits]
        chat = bool(tok.chat_template) if rag.chat is None else rag.chat
        prompt = build_prompt(tok, question, docs, rag.template, chat=chat, context_tokens=rag.context_tokens,
                              max_length=rt.max_length, max_new_tokens=max_tokens)
        return hits, docs, encode_prompt(tok, prompt, chat)

    hits, docs, prompt = await asyncio.get_running_loop().run_in_executor(rag.pool, retrieve)
    sub = [lambda a: rt.submit_generate(prompt, a, max_new_tokens=max_tokens, temperature=0.0)]
    [gh] = await wait_all(request, await driver.submit(rag.generation_model, sub))
    sources = [{"id": d, "score": s, "title": doc["title"], "text": doc["text"]} for (d, s), doc in zip(hits, docs)]
    return {"id": f"rag-{uuid.uuid4().hex}", "object": "rag.answer", "created": int(time.time()),
            "model": rag.generation_model, "answer": gh.output.text.strip(),
            "finish_reason": FINISH_REASONS[gh.output.finish_reason], "sources": sources,
            "usage": usage([qh, gh])}
