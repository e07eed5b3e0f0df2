"""The FastAPI app: OpenAI-compatible endpoints over one EngineDriver.

    POST /v1/embeddings, /v1/completions, /v1/chat/completions (SSE with "stream": true),
         /v1/rag/ask (retrieve + generate, with sources)
    GET  /v1/models, /health, /metrics (Prometheus text)
    POST /admin/adapters {"name", "path"}; DELETE /admin/adapters/{name}; GET /admin/stats

`model` names an adapter or the base model. With an API key, /v1/* and /admin/* need
`Authorization: Bearer KEY` (/health and /metrics stay open for probes and scrapers);
without one the admin endpoints are off. A client that disconnects has its requests
cancelled in the engine (their KV cache freed at once).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..model.fingerprint import adapter_sha256
from ..rag.pipeline import build_prompt, embedding_settings, encode_prompt
from .engine import EngineDriver, Tracked
from .errors import APIError, error_body, error_response, install_error_handlers, request_error
from .schemas import AdapterLoadRequest, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, RAGRequest

DISCONNECT_POLL_S = 0.1
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # runtime -> OpenAI
MAX_STOP_STRINGS = 4

log = logging.getLogger("bsharedrag.server")


@dataclass
class Limits:
    api_key: Optional[str] = None
    max_tokens: int = 512  # cap on max_tokens (also the chat default)
    max_batch: int = 64  # inputs per embeddings request; prompts x n per completion request
    max_request_bytes: int = 1 << 20
    default_completion_tokens: int = 16  # OpenAI's default for /v1/completions


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


# ----------------------------------------------------------------------------- middleware

_ROUTES = ("/v1/embeddings", "/v1/completions", "/v1/chat/completions", "/v1/rag/ask", "/v1/models",
           "/health", "/metrics", "/admin/adapters", "/admin/stats", "/openapi.json")


def _route_label(path: str) -> str:
    for r in _ROUTES:
        if path == r or path.startswith(r + "/"):
            return r
    return "other"  # bounded label set whatever clients request


class Gate:
    """ASGI middleware before the app: API key, request size limit (413), request metrics.
    The body is read here (up to the limit) and replayed to the app."""

    def __init__(self, app, limits: Limits, metrics):
        self.app, self.limits, self.metrics = app, limits, metrics

    def _authorized(self, scope) -> bool:
        for k, v in scope["headers"]:
            if k == b"authorization":
                scheme, _, token = v.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                          self.limits.api_key.encode())
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        path = scope["path"]
        try:
            deny = self._deny(scope, path)
            if deny is not None:
                return await deny(scope, receive, send_status)
            body, limit = b"", self.limits.max_request_bytes
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    status[0] = 499
                    return
                body += msg.get("body", b"")
                if len(body) > limit:
                    return await _too_large(limit)(scope, receive, send_status)
                if not msg.get("more_body", False):
                    break
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_status)
        finally:
            self.metrics.observe_request(_route_label(path), status[0], time.perf_counter() - t0)

    def _deny(self, scope, path: str):
        guarded = path.startswith("/v1/") or path.startswith("/admin/")
        if path.startswith("/admin/") and not self.limits.api_key:
            return error_response(403, "admin endpoints are off: start the server with --api-key",
                                  code="admin_disabled")
        if guarded and self.limits.api_key and not self._authorized(scope):
            return error_response(401, "missing or incorrect API key: send `Authorization: Bearer KEY`",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return error_response(400, "Content-Length is not a number", code="invalid_header")
                if n > self.limits.max_request_bytes:
                    return _too_large(self.limits.max_request_bytes)
        return None


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"request body larger than the server's limit of {limit} bytes",
                          code="request_too_large")


# ----------------------------------------------------------------------------- request helpers


def _batch(value, name: str, limit: int) -> list:
    """An OpenAI input/prompt (str, [str], [int], [[int]]) as a list of items (str or id lists)."""
    if isinstance(value, str):
        items = [value]
    elif value and all(isinstance(x, int) for x in value):
        items = [value]
    else:
        items = list(value)
    if not items:
        raise APIError(400, f"{name} is empty", param=name, code="invalid_value")
    if len(items) > limit:
        raise APIError(400, f"{name} has {len(items)} items; this server takes at most {limit} per request",
                       param=name, code="batch_too_large")
    return items


def _sampling(req, limits: Limits, default_max_tokens: int, n_prompts: int) -> dict:
    """Checked sampling parameters as submit_generate keywords."""
    bad = req.unsupported()
    if bad:
        raise APIError(400, f"{bad} is not supported by this server", param=bad, code="unsupported_parameter")
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    asked = max_tokens is not None
    if not asked:
        max_tokens = default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}",
                       param="max_tokens", code="invalid_value")
    checks = [
        (0.0 <= req.temperature <= 2.0, "temperature", "between 0 and 2"),
        (0.0 < req.top_p <= 1.0, "top_p", "in (0, 1]"),
        (req.top_k >= 0, "top_k", ">= 0"),
        (0 < req.repetition_penalty < math.inf, "repetition_penalty", "finite and > 0"),
        (1 <= req.n and req.n * n_prompts <= limits.max_batch, "n",
         f"between 1 and {limits.max_batch} prompts x n in all"),
    ]
    for ok, name, what in checks:
        if not ok:
            raise APIError(400, f"{name} must be {what}, got {getattr(req, name)!r}", param=name,
                           code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings", param="stop", code="invalid_value")
    # without a max_tokens of the client's, a long prompt gets what room the model's context has left
    return dict(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                repetition_penalty=req.repetition_penalty, stop=stop or None,
                eos_token_id=[] if req.ignore_eos else None, clip_to_context=not asked)


class _TextStream:
    """Incremental text of one generation, decoding only the newest tokens (with the
    previous piece as context, as TGI / vLLM do: O(1) per step). A piece that ends in half
    a UTF-8 character waits for the next token; text that may still turn out to start a
    stop string (the last len(longest stop) - 1 characters) is held back, so the deltas
    add up to the final, stop-cut text."""

    def __init__(self, tokenizer, stop: Optional[list]):
        self.tok, self.ids, self.sent, self.pending = tokenizer, [], "", ""
        self.prefix = self.read = 0  # ids[prefix:read]: the last piece decoded, context for the next
        self.hold = max((len(s) for s in stop or []), default=1) - 1

    def update(self, new_ids: list) -> str:
        self.ids += new_ids
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.pending += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        cut = max(0, len(self.pending) - self.hold)
        delta, self.pending = self.pending[:cut], self.pending[cut:]
        self.sent += delta
        return delta

    def finish(self, final: str) -> str:
        delta = final[len(self.sent):] if final.startswith(self.sent) else ""
        self.sent = final
        return delta


def _usage(handles, n: int = 1) -> dict:
    """Token counts; with n choices per prompt (handles grouped by prompt) each prompt counts once."""
    prompt = sum(h.num_tokens for h in handles[::n])
    completion = sum(len(h.output.token_ids) for h in handles if h.kind == "generate")
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------- the app


def create_app(driver: EngineDriver, limits: Limits, rag: Optional[RAGService] = None) -> FastAPI:
    rt, metrics = driver.rt, driver.metrics
    tok = rt.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        driver.start()
        try:
            yield
        finally:  # uvicorn has drained the in-flight requests by now (SIGTERM)
            driver.stop()
            if rag is not None:
                rag.pool.submit(rag.index.close).result()
                rag.pool.shutdown()

    # the OpenAPI schema is served (clients, schemathesis), the interactive docs pages are not
    app = FastAPI(title="bsharedrag", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    install_error_handlers(app, driver.served_models)
    app.add_middleware(Gate, limits=limits, metrics=metrics)

    async def wait_all(request: Request, tracked: list[Tracked]) -> list:
        """The finished handles; cancels them in the engine if the client goes away."""
        waiter = asyncio.gather(*(t.done for t in tracked))
        try:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
                if not waiter.done() and await request.is_disconnected():
                    driver.cancel(tracked)
                    raise APIError(499, "client closed the request", code="client_closed_request")
        except asyncio.CancelledError:
            driver.cancel(tracked)
            raise
        handles = waiter.result()
        failed = [h for h in handles if h.error is not None]
        if failed:
            raise request_error(failed[0])
        return handles

    def gen_submits(prompts: list, n: int, params: dict, seed: Optional[int]) -> list:
        """One submit per (prompt, choice); choice i of the request samples with seed + i."""
        subs = []
        for p in prompts:
            for _ in range(n):
                s = None if seed is None else seed + len(subs)
                subs.append(lambda a, p=p, s=s: rt.submit_generate(p, a, seed=s, **params))
        return subs

    # -- endpoints -----------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not driver.alive:
            return error_response(503, "the engine is not running", code="engine_down")
        return {"status": "ok", "models": driver.served_models()}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        created = int(app.state.started)
        data = [{"id": driver.base_name, "object": "model", "created": created, "owned_by": "bsharedrag",
                 "parent": None}]
        data += [{"id": a, "object": "model", "created": created, "owned_by": "bsharedrag",
                  "parent": driver.base_name} for a in driver.served_models()[1:]]
        return {"object": "list", "data": data}

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request):
        d = rt.model.config.hidden_size
        if req.dimensions is not None and req.dimensions != d:
            raise APIError(400, f"dimensions must be {d} (this model's size) or absent", param="dimensions",
                           code="invalid_value")
        items = _batch(req.input, "input", limits.max_batch)
        fmt = embedding_settings(None, **driver.embedding_formats.get(req.model, {}))
        pooling = req.pooling or fmt["pooling"]
        prefix = fmt["query_prefix"] if req.prefix is None else req.prefix
        subs = [lambda a, x=x: rt.submit_embed(x, a, pooling, req.normalize, prefix) for x in items]
        handles = await wait_all(request, await driver.submit(req.model, subs))
        data = []
        for i, h in enumerate(handles):
            v = h.output.numpy().astype("<f4")
            emb = base64.b64encode(v.tobytes()).decode() if req.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        u = _usage(handles)
        return {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": u["prompt_tokens"], "total_tokens": u["prompt_tokens"]}}

    async def respond(request: Request, req, chat: bool, prompts: list, params: dict):
        tracked = await driver.submit(req.model, gen_submits(prompts, req.n, params, req.seed), stream=req.stream)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": req.model}
        if req.stream:
            return StreamingResponse(stream(tracked, head, chat, params["stop"], req.stream_options, req.n),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        handles = await wait_all(request, tracked)
        choices = []
        for i, h in enumerate(handles):
            reason = FINISH_REASONS[h.output.finish_reason]
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": h.output.text},
                                "finish_reason": reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": h.output.text, "finish_reason": reason, "logprobs": None})
        return dict(head, choices=choices, usage=_usage(handles, req.n))

    async def stream(tracked: list[Tracked], head: dict, chat: bool, stop, options, n: int):
        head = dict(head, object="chat.completion.chunk" if chat else "text_completion")
        index = {id(t): i for i, t in enumerate(tracked)}
        texts = [_TextStream(tok, stop) for _ in tracked]
        left = len(tracked)

        def chunk(i: int, text: Optional[str], reason: Optional[str] = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                c = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                c = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}
            return _sse(dict(head, choices=[c]))

        try:
            if chat:
                for i in range(len(tracked)):
                    yield chunk(i, None, role=True)
            events = tracked[0].events
            while left:
                t, toks = await events.get()
                i = index[id(t)]
                if toks is not None:
                    delta = texts[i].update(toks)
                    if delta:
                        yield chunk(i, delta)
                    continue
                left -= 1
                h = t.handle
                if h.error is not None:
                    err = request_error(h)
                    yield _sse(error_body(err.status, err.message, err.param, err.code))
                    return
                delta = texts[i].finish(h.output.text)
                if delta:
                    yield chunk(i, delta)
                yield chunk(i, None, FINISH_REASONS[h.output.finish_reason])
            if options and options.get("include_usage"):
                yield _sse(dict(head, choices=[], usage=_usage([t.handle for t in tracked], n)))
            yield "data: [DONE]\n\n"
        finally:  # also on client disconnect (Starlette cancels the stream)
            unfinished = [t for t in tracked if not t.handle.done]
            if unfinished:
                driver.cancel(unfinished)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts = _batch(req.prompt, "prompt", limits.max_batch)
        params = _sampling(req, limits, limits.default_completion_tokens, len(prompts))
        return await respond(request, req, False, prompts, params)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        import jinja2

        params = _sampling(req, limits, limits.max_tokens, 1)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except jinja2.TemplateError as e:
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages",
                           code="invalid_value") from None
        return await respond(request, req, True, [ids], params)

    @app.post("/v1/rag/ask")
    async def rag_ask(req: RAGRequest, request: Request):
        if rag is None:
            raise APIError(404, "this server has no index: start it with --index DIR", code="no_index")
        question = req.question
        if not question.strip():
            raise APIError(400, "question is empty", param="question", code="invalid_value")
        k = rag.k if req.k is None else req.k
        if not 1 <= k <= limits.max_batch:
            raise APIError(400, f"k must be between 1 and {limits.max_batch}, got {k}", param="k",
                           code="invalid_value")
        max_tokens = rag.max_new_tokens if req.max_tokens is None else req.max_tokens
        if not 1 <= max_tokens <= limits.max_tokens:
            raise APIError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}",
                           param="max_tokens", code="invalid_value")
        sub = [lambda a: rt.submit_embed(question, a, rag.pooling, True, rag.query_prefix)]
        [qh] = await wait_all(request, await driver.submit(rag.retrieval_model, sub))

        def retrieve():
            hits = rag.index.search(qh.output[None], k)[0]
            docs = [rag.index.get(d) for d, _ in hits]
            chat = bool(tok.chat_template) if rag.chat is None else rag.chat
            prompt = build_prompt(tok, question, docs, rag.template, chat=chat, context_tokens=rag.context_tokens,
                                  max_length=rt.max_length, max_new_tokens=max_tokens)
            return hits, docs, encode_prompt(tok, prompt, chat)

        hits, docs, prompt = await asyncio.get_running_loop().run_in_executor(rag.pool, retrieve)
        sub = [lambda a: rt.submit_generate(prompt, a, max_new_tokens=max_tokens, temperature=0.0)]
        [gh] = await wait_all(request, await driver.submit(rag.generation_model, sub))
        sources = [{"id": d, "score": s, "title": doc["title"], "text": doc["text"]}
                   for (d, s), doc in zip(hits, docs)]
        return {"id": f"rag-{uuid.uuid4().hex}", "object": "rag.answer", "created": int(time.time()),
                "model": rag.generation_model, "answer": gh.output.text.strip(),
                "finish_reason": FINISH_REASONS[gh.output.finish_reason], "sources": sources,
                "usage": _usage([qh, gh])}

    # -- admin -------------------------------------------------------------------------

    @app.post("/admin/adapters")
    async def load_adapter(req: AdapterLoadRequest):
        if rag is not None and req.name not in driver.served_models():  # (a served name: the driver's 409)
            await asyncio.to_thread(rag.check_retrieval_adapter, req.name, req.path)
        await driver.load_adapter(req.name, req.path)
        return {"loaded": req.name, "models": driver.served_models()}

    @app.delete("/admin/adapters/{name}")
    async def unload_adapter(name: str):
        await driver.unload_adapter(name)
        return {"unloaded": name, "models": driver.served_models()}

    @app.get("/admin/stats")
    async def stats():
        def snapshot():
            c = rt.cache
            return {"waiting": rt.num_waiting, "running": rt.num_running,
                    "kv_cache_blocks_used": c.num_blocks - c.num_free_blocks, "kv_cache_blocks_total": c.num_blocks,
                    "kv_cache_sequences": len(c.seq_ids), "adapters": rt.model.adapters, **rt.stats}

        return await driver.run(snapshot)

    app.state.started = time.time()
    return app


__all__ = ["Limits", "RAGService", "create_app"]
