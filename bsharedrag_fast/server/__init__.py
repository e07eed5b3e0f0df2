"""OpenAI-compatible HTTP server over one SharedRuntime (`bsharedrag serve`).

    command.py  the `serve` subcommand (argparse; heavy imports deferred to cmd_serve)
    app.py      FastAPI app: endpoints, API key + size gate, streaming (SSE)
    engine.py   EngineDriver: the one thread that steps the runtime for all handlers
    schemas.py  request bodies (strict pydantic)
    errors.py   OpenAI-style error bodies and exception -> status mapping
    metrics.py  Prometheus metrics
"""
from .command import add_commands

__all__ = ["add_commands"]
