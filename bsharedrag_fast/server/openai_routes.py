"""The OpenAI-compatible routes: /v1/models, /v1/embeddings, /v1/completions and
/v1/chat/completions (SSE with "stream": true)."""
from __future__ import annotations

import base64
import json
import math
import time
import uuid
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..rag.pipeline import embedding_settings
from .engine import Tracked
from .errors import APIError, error_body, request_error
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .state import FINISH_REASONS, Limits, server, usage, wait_all

MAX_STOP_STRINGS = 4

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    st = server(request)
    created, base = int(st.started), st.driver.base_name
    data = [{"id": base, "object": "model", "created": created, "owned_by": "bsharedrag", "parent": None}]
    data += [{"id": a, "object": "model", "created": created, "owned_by": "bsharedrag", "parent": base}
             for a in st.driver.served_models()[1:]]
    return {"object": "list", "data": data}


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request):
    st = server(request)
    rt = st.driver.rt
    d = rt.model.config.hidden_size
    if req.dimensions is not None and req.dimensions != d:
        raise APIError(400, f"dimensions must be {d} (this model's size) or absent", param="dimensions",
                       code="invalid_value")
    items = _batch(req.input, "input", st.limits.max_batch)
    fmt = embedding_settings(None, **st.driver.embedding_formats.get(req.model, {}))
    pooling = req.pooling or fmt["pooling"]
    prefix = fmt["query_prefix"] if req.prefix is None else req.prefix
    subs = [lambda a, x=x: rt.submit_embed(x, a, pooling, req.normalize, prefix) for x in items]
    handles = await wait_all(request, await st.driver.submit(req.model, subs))
    data = []
    for i, h in enumerate(handles):
        v = h.output.numpy().astype("<f4")
        emb = base64.b64encode(v.tobytes()).decode() if req.encoding_format == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    u = usage(handles)
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": u["prompt_tokens"], "total_tokens": u["prompt_tokens"]}}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    limits = server(request).limits
    prompts = _batch(req.prompt, "prompt", limits.max_batch)
    params = _sampling(req, limits, limits.default_completion_tokens, len(prompts))
    return await _respond(request, req, False, prompts, params)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    import jinja2

    st = server(request)
    params = _sampling(req, st.limits, st.limits.max_tokens, 1)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        ids = st.driver.rt.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except jinja2.TemplateError as e:
        raise APIError(400, f"the chat template refused these messages: {e}", param="messages",
                       code="invalid_value") from None
    return await _respond(request, req, True, [ids], params)


# ----------------------------------------------------------------------------- generation


def _gen_submits(rt, prompts: list, n: int, params: dict, seed: Optional[int]) -> list:
    """One submit per (prompt, choice); choice i of the request samples with seed + i."""
    subs = []
    for p in prompts:
        for _ in range(n):
            s = None if seed is None else seed + len(subs)
            subs.append(lambda a, p=p, s=s: rt.submit_generate(p, a, seed=s, **params))
    return subs


async def _respond(request: Request, req, chat: bool, prompts: list, params: dict):
    driver = server(request).driver
    tracked = await driver.submit(req.model, _gen_submits(driver.rt, prompts, req.n, params, req.seed),
                                  stream=req.stream)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": req.model}
    if req.stream:
        return StreamingResponse(_stream(driver, tracked, head, chat, params["stop"], req.stream_options, req.n),
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
    return dict(head, choices=choices, usage=usage(handles, req.n))


async def _stream(driver, tracked: list[Tracked], head: dict, chat: bool, stop, options, n: int):
    head = dict(head, object="chat.completion.chunk" if chat else "text_completion")
    index = {id(t): i for i, t in enumerate(tracked)}
    texts = [TextStream(driver.rt.tokenizer, stop) for _ in tracked]
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
            yield _sse(dict(head, choices=[], usage=usage([t.handle for t in tracked], n)))
        yield "data: [DONE]\n\n"
    finally:  # also on client disconnect (Starlette cancels the stream)
        unfinished = [t for t in tracked if not t.handle.done]
        if unfinished:
            driver.cancel(unfinished)


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


class TextStream:
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

def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
