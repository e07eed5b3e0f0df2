"""Probes and administration: GET /health, /metrics (Prometheus text), /admin/stats;
POST /admin/adapters {"name", "path"}; DELETE /admin/adapters/{name}."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .errors import error_response
from .schemas import AdapterLoadRequest
from .state import server

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    driver = server(request).driver
    if not driver.alive:
        return error_response(503, "the engine is not running", code="engine_down")
    return {"status": "ok", "models": driver.served_models()}


@router.get("/metrics")
async def prometheus(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(server(request).driver.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/adapters")
async def load_adapter(req: AdapterLoadRequest, request: Request):
    st = server(request)
    if st.rag is not None and req.name not in st.driver.served_models():  # (a served name: the driver's 409)
        await asyncio.to_thread(st.rag.check_retrieval_adapter, req.name, req.path)
    await st.driver.load_adapter(req.name, req.path)
    return {"loaded": req.name, "models": st.driver.served_models()}


@router.delete("/admin/adapters/{name}")
async def unload_adapter(name: str, request: Request):
    driver = server(request).driver
    await driver.unload_adapter(name)
    return {"unloaded": name, "models": driver.served_models()}


@router.get("/admin/stats")
async def stats(request: Request):
    driver = server(request).driver
    rt = driver.rt

    def snapshot():
        c = rt.cache
        return {"waiting": rt.num_waiting, "running": rt.num_running,
                "kv_cache_blocks_used": c.num_blocks - c.num_free_blocks, "kv_cache_blocks_total": c.num_blocks,
                # the requests' sequences: each admitted generation holds one (the decode graphs' padding
                # block is a cache sequence of the runner's own, counted in the blocks only)
                "kv_cache_sequences": rt.num_running, "adapters": rt.model.adapters, **rt.stats}

    return await driver.run(snapshot)
