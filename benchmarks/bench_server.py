"""Server benchmark: mixed embedding + chat load against a `bsharedrag serve` process.

At each concurrency level (closed loop: that many clients, each sending its next request
when the last one is answered) it sends --requests requests, --embed-share of them
embeddings and the rest greedy chat completions of --max-tokens tokens (ignore_eos, so
every answer has the same length), and reports throughput (requests/s, generated
tokens/s), p50/p99 latency per kind, and the engine's batch composition from /metrics
(embedding / prefill / decode rows per step: how much the two kinds share a forward pass).

Default model: a random Qwen2 checkpoint of synthetic.PRESETS[--preset] with two random
r=16 adapters and a byte-level BPE tokenizer trained on a few sentences, in a temp dir
(no download). Or bring one: --model DIR --adapter retrieval=DIR --adapter generation=DIR.

    python benchmarks/bench_server.py [--concurrency 1,8,32 --requests 128 --max-tokens 32]
Prints a table and writes JSON to benchmarks/results/server_cpu.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from bsharedrag_fast.demo.tokenizer_train import train_bpe_tokenizer
from bsharedrag_fast.bench.presets import PRESETS
from bsharedrag_fast.bench.synthetic import write_adapter, write_checkpoint

from _common import RESULTS_DIR, machine_info

WORDS = ("the quick brown fox jumps over a lazy dog while shared backbones serve retrieval and generation "
         "adapters with low rank updates on one resident model for questions about products prices and "
         "reviews").split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(xs: list, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _metrics(url: str) -> dict:
    """{sample name with labels: value} from the Prometheus text."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _composition(before: dict, after: dict) -> dict:
    steps = after["bsharedrag_engine_steps_total"] - before["bsharedrag_engine_steps_total"]
    per_step = {}
    for kind in ("embed", "prefill", "decode"):
        key = f'bsharedrag_engine_rows_total{{kind="{kind}"}}'
        per_step[kind] = (after[key] - before[key]) / max(steps, 1)
    return {"steps": int(steps), "rows_per_step": per_step}


async def _level(url: str, concurrency: int, n: int, embed_share: float, max_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    work = [("embed" if rng.random() < embed_share else "chat", _sentence(rng, 8, 48)) for _ in range(n)]
    latencies = {"embed": [], "chat": []}
    generated = 0
    queue = list(enumerate(work))

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def client():
            nonlocal generated
            while queue:
                _, (kind, text) = queue.pop()
                t0 = time.perf_counter()
                if kind == "embed":
                    r = await c.post("/v1/embeddings", json={"model": "retrieval", "input": text})
                else:
                    r = await c.post("/v1/chat/completions", json={
                        "model": "generation", "messages": [{"role": "user", "content": text}],
                        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
                r.raise_for_status()
                latencies[kind].append(time.perf_counter() - t0)
                if kind == "chat":
                    generated += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    res = {"concurrency": concurrency, "requests": n, "seconds": wall, "requests_per_s": n / wall,
           "generated_tokens_per_s": generated / wall, "latency_s": {}}
    for kind, xs in latencies.items():
        if xs:
            res["latency_s"][kind] = {"count": len(xs), "p50": statistics.median(xs), "p99": _percentile(xs, 0.99),
                                      "mean": statistics.fmean(xs)}
    return res


def _start(cmd: list, url: str, log) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start in 300 s")
        time.sleep(0.3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model dir with a tokenizer (default: a synthetic one)")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="with --model: the retrieval and generation adapters")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="synthetic model shape")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    ap.add_argument("--embed-share", type=float, default=0.5, help="fraction of requests that are embeddings")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per chat answer")
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="default: benchmarks/results/server_{device}.json")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    if args.model and {a.partition("=")[0] for a in args.adapter} != {"retrieval", "generation"}:
        ap.error("--model needs --adapter retrieval=DIR and --adapter generation=DIR")

    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = args.model, list(args.adapter)
        if model is None:
            model = os.path.join(tmp, "model")
            cfg = write_checkpoint(model, PRESETS[args.preset])
            train_bpe_tokenizer([" ".join(WORDS)] * 50, model, vocab_size=min(cfg["vocab_size"], 512), min_frequency=1)
            for i, name in enumerate(("retrieval", "generation")):
                write_adapter(os.path.join(tmp, name), cfg, i + 1)
                adapters.append(f"{name}={os.path.join(tmp, name)}")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "bsharedrag_fast.cli", "serve", "--model", model, "--port", str(port),
               "--device", args.device, "--max-batch-tokens", str(args.max_batch_tokens),
               "--max-queue", str(max(levels) * 4), "--log-level", "warning"]
        for a in adapters:
            cmd += ["--adapter", a]
        with open(os.path.join(tmp, "server.log"), "w+") as log:
            proc = _start(cmd, url, log)
            try:
                asyncio.run(_level(url, 2, 8, args.embed_share, 4, seed=0))  # warm-up
                results = []
                for conc in levels:
                    before = _metrics(url)
                    res = asyncio.run(_level(url, conc, args.requests, args.embed_share, args.max_tokens, seed=conc))
                    res["engine"] = _composition(before, _metrics(url))
                    results.append(res)
                    lat = " | ".join(f"{kind} p50/p99 {v['p50'] * 1e3:7.1f}/{v['p99'] * 1e3:7.1f} ms"
                                     for kind, v in res["latency_s"].items())
                    rows = " ".join(f"{k} {v:.1f}" for k, v in res["engine"]["rows_per_step"].items())
                    print(f"concurrency {conc:>3}: {res['requests_per_s']:7.1f} req/s "
                          f"{res['generated_tokens_per_s']:8.1f} tok/s | {lat} | rows/step {rows}")
            finally:
                proc.terminate()
                proc.wait(60)
    out = args.out or os.path.join(RESULTS_DIR, f"server_{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine_info(args.device), "model": args.model or f"synthetic:{args.preset}",
                   "embed_share": args.embed_share, "max_tokens": args.max_tokens,
                   "max_batch_tokens": args.max_batch_tokens, "levels": results}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
