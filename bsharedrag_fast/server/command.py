"""`bsharedrag serve`: the OpenAI-compatible server on uvicorn.

    bsharedrag serve --model DIR --adapter retrieval=DIR --adapter generation=DIR \\
        [--index INDEX_DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [limits ...]

Heavy imports (fastapi, uvicorn, prometheus_client) happen inside cmd_serve, so the
parser stays cheap for `bsharedrag --help`.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys


def _adapter_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, path


def add_commands(sub) -> None:
    from ..cli.args import add_embedder_args, add_index_load_args, add_model_args, add_prompt_args, positive_int

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (embeddings, completions, chat, RAG) "
                                     "on one shared engine")
    add_model_args(p)
    p.add_argument("--adapter", type=_adapter_arg, action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT LoRA served as model NAME (repeatable)")
    p.add_argument("--served-model-name", default=None, help="the base model's name (default: the model dir's name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("BSHAREDRAG_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 and /admin (default: $BSHAREDRAG_API_KEY); "
                        "the admin endpoints are off without a key")
    g = p.add_argument_group("limits")
    g.add_argument("--max-tokens", type=positive_int, default=512, help="largest max_tokens (and the chat default)")
    g.add_argument("--max-batch", type=positive_int, default=64,
                   help="inputs per embeddings request; prompts x n per completion request")
    g.add_argument("--max-queue", type=positive_int, default=256,
                   help="requests in the engine (waiting + generating) before 429")
    g.add_argument("--max-request-bytes", type=positive_int, default=1 << 20, help="request body size before 413")
    g.add_argument("--max-input-tokens", type=positive_int, default=None,
                   help="longest prompt / embedding input (default: the model's max_position_embeddings)")
    g.add_argument("--max-running", type=positive_int, default=None, help="generations decoding at once")
    g.add_argument("--kv-cache-mb", type=positive_int, default=None, help="KV cache size (default: the engine's)")
    g.add_argument("--drain-timeout", type=positive_int, default=30,
                   help="seconds SIGTERM waits for in-flight requests before cancelling them")
    r = p.add_argument_group("RAG (/v1/rag/ask)")
    r.add_argument("--index", default=None, help="index directory built by `bsharedrag index`")
    r.add_argument("--rag-retrieval-model", default="retrieval", help="model (adapter) that embeds the question")
    r.add_argument("--rag-generation-model", default="generation", help="model (adapter) that answers")
    r.add_argument("--k", type=positive_int, default=3, help="documents retrieved per question")
    add_prompt_args(r)
    r.add_argument("--context-tokens", type=positive_int, default=768, help="token budget of the retrieved contexts")
    r.add_argument("--rag-max-tokens", type=positive_int, default=128, help="default answer length")
    add_index_load_args(r)
    add_embedder_args(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> int:
    import uvicorn

    from ..cli.args import index_from_args, resolve_embedding_args, runtime_from_args
    from ..rag.pipeline import read_embedding_format
    from .app import Limits, RAGService, create_app
    from .engine import EngineDriver
    from .metrics import ServerMetrics

    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise ValueError("--adapter: the same NAME is given twice")
    base = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    if base in adapters:
        raise ValueError(f"--adapter {base}: that name is the base model's (rename it or set --served-model-name)")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    if not _is_loopback(args.host) and not args.api_key:
        logging.getLogger("bsharedrag.server").warning(
            "serving on %s without --api-key: anyone who can reach it can use it", args.host)
    kv = None if args.kv_cache_mb is None else args.kv_cache_mb << 20
    rt = runtime_from_args(args, adapters, max_length=args.max_input_tokens, cache_budget_bytes=kv,
                           max_running=args.max_running)
    rag = None
    if args.index:
        from concurrent.futures import ThreadPoolExecutor

        from ..rag.pipeline import prompt_settings

        template, chat = prompt_settings(args.template, args.raw, adapters.get(args.rag_generation_model))
        pool = ThreadPoolExecutor(1, thread_name_prefix="bsharedrag-index")
        resolve_embedding_args(args, adapters.get(args.rag_retrieval_model))
        index = pool.submit(index_from_args, args, args.index, adapters.get(args.rag_retrieval_model)).result()
        rag = RAGService(index, pool, args.rag_retrieval_model, args.rag_generation_model, k=args.k,
                         template=template, chat=chat, context_tokens=args.context_tokens,
                         max_new_tokens=args.rag_max_tokens, query_prefix=args.query_prefix, pooling=args.pooling,
                         allow_mismatch=args.allow_mismatch)
    limits = Limits(api_key=args.api_key, max_tokens=args.max_tokens, max_batch=args.max_batch,
                    max_request_bytes=args.max_request_bytes)
    driver = EngineDriver(rt, base, args.max_queue, ServerMetrics(rt))
    driver.embedding_formats.update({name: read_embedding_format(path) for name, path in adapters.items()})
    app = create_app(driver, limits, rag)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout)
    server = uvicorn.Server(config)
    # uvicorn re-raises a captured SIGTERM once it has drained, under the handler that was
    # installed before it ran: this one, so a drained shutdown exits 0, not killed by -15
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    server.run()  # SIGTERM / SIGINT: stop accepting, drain in-flight requests, then the lifespan stops the engine
    return 0 if server.started else 1

