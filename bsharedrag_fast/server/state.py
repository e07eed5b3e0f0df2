"""What every route of the server shares: its limits, the engine driver, the RAG service,
and the one way a handler waits for the engine (cancelling its requests if the client goes)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Optional

from fastapi import Request

from .engine import EngineDriver, Tracked
from .errors import APIError, request_error

DISCONNECT_POLL_S = 0.1
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # runtime -> OpenAI


@dataclass
class Limits:
    api_key: Optional[str] = None
    max_tokens: int = 512  # cap on max_tokens (also the chat default)
    max_batch: int = 64  # inputs per embeddings request; prompts x n per completion request
    max_request_bytes: int = 1 << 20
    default_completion_tokens: int = 16  # OpenAI's default for /v1/completions


@dataclass
class ServerState:
    """app.state.server: what create_app was given."""

    driver: EngineDriver
    limits: Limits
    rag: Optional[object] = None  # rag_routes.RAGService, when the server has an index
    started: float = field(default_factory=time.time)


def server(request: Request) -> ServerState:
    return request.app.state.server


async def wait_all(request: Request, tracked: list[Tracked]) -> list:
    """The finished handles; cancels them in the engine if the client goes away."""
    driver = server(request).driver
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


def usage(handles, n: int = 1) -> dict:
    """Token counts; with n choices per prompt (handles grouped by prompt) each prompt counts once."""
    prompt = sum(h.num_tokens for h in handles[::n])
    completion = sum(len(h.output.token_ids) for h in handles if h.kind == "generate")
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
