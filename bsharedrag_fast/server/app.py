"""The FastAPI app: OpenAI-compatible endpoints over one EngineDriver, in three routers.

    POST /v1/embeddings, /v1/completions, /v1/chat/completions (SSE with "stream": true)
         and GET /v1/models: openai_routes.py
    POST /v1/rag/ask (retrieve + generate, with sources): rag_routes.py
    GET  /health, /metrics (Prometheus text); POST /admin/adapters {"name", "path"};
         DELETE /admin/adapters/{name}; GET /admin/stats: admin_routes.py

`model` names an adapter or the base model. With an API key, /v1/* and /admin/* need
`Authorization: Bearer KEY` (/health and /metrics stay open for probes and scrapers);
without one the admin endpoints are off (Gate, below). A client that disconnects has its
requests cancelled in the engine (their KV cache freed at once; state.wait_all).
"""
from __future__ import annotations

import contextlib
import hmac
import time
from typing import Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from . import admin_routes, openai_routes, rag_routes
from .engine import EngineDriver
from .errors import error_response, install_error_handlers
from .rag_routes import RAGService
from .state import Limits, ServerState


def create_app(driver: EngineDriver, limits: Limits, rag: Optional[RAGService] = None) -> FastAPI:
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
    app.state.server = ServerState(driver, limits, rag)
    install_error_handlers(app, driver.served_models)
    app.add_middleware(Gate, limits=limits, metrics=driver.metrics)
    for routes in (admin_routes, openai_routes, rag_routes):
        app.include_router(routes.router)
    return app


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


__all__ = ["Limits", "RAGService", "create_app"]
