"""Prometheus metrics of the server: engine queue, batch composition, tokens/s, latencies.

One CollectorRegistry per app (not the process-global one), so several apps in one process
(tests) do not collide. The engine thread feeds the step metrics, the HTTP middleware the
request metrics; gauges that mirror engine state are read when /metrics is scraped.
"""
from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROW_KINDS = ("embed", "prefill", "decode", "draft")
_ROW_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATE_WINDOW_S = 10.0


class _Rate:
    """Events per second over the last RATE_WINDOW_S seconds (thread-safe)."""

    def __init__(self):
        self._events: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append((now, n))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - RATE_WINDOW_S:
            self._events.popleft()

    def per_second(self) -> float:
        with self._lock:
            self._trim(time.monotonic())
            return sum(n for _, n in self._events) / RATE_WINDOW_S


class ServerMetrics:
    def __init__(self, runtime):
        r = self.registry = CollectorRegistry()
        rt = runtime
        Gauge("bsharedrag_queue_depth", "requests waiting for admission into the engine",
              registry=r).set_function(lambda: rt.num_waiting)
        Gauge("bsharedrag_running_generations", "generations holding KV-cache blocks",
              registry=r).set_function(lambda: rt.num_running)
        Gauge("bsharedrag_kv_cache_blocks_used", "KV-cache blocks in use",
              registry=r).set_function(lambda: rt.cache.num_blocks - rt.cache.num_free_blocks)
        Gauge("bsharedrag_kv_cache_blocks_total", "KV-cache blocks in all", registry=r).set(rt.cache.num_blocks)
        Gauge("bsharedrag_adapters_loaded", "resident LoRA adapters",
              registry=r).set_function(lambda: len(rt.model.adapter_slots))
        self.steps = Counter("bsharedrag_engine_steps", "engine steps run", registry=r)
        self.step_seconds = Histogram("bsharedrag_engine_step_seconds", "wall time of one engine step",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.rows = Counter("bsharedrag_engine_rows", "rows packed into engine steps, by kind", ["kind"], registry=r)
        self.step_rows = Histogram("bsharedrag_step_rows", "batch composition: rows of each kind per step",
                                   ["kind"], buckets=_ROW_BUCKETS, registry=r)
        self.generated = Counter("bsharedrag_generated_tokens", "tokens generated", registry=r)
        self._gen_rate, self._row_rate = _Rate(), _Rate()
        tps = Gauge("bsharedrag_tokens_per_second", f"tokens per second over the last {RATE_WINDOW_S:g} s "
                    "(generated: sampled tokens; processed: all rows through the model)", ["kind"], registry=r)
        tps.labels("generated").set_function(self._gen_rate.per_second)
        tps.labels("processed").set_function(self._row_rate.per_second)
        self.ttft = Histogram("bsharedrag_time_to_first_token_seconds", "submission to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("bsharedrag_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("bsharedrag_http_request_seconds", "HTTP request latency (to the last byte)",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.cancelled = Counter("bsharedrag_cancelled_requests", "engine requests cancelled by a client "
                                 "disconnect", registry=r)

    def observe_step(self, before: dict, after: dict, seconds: float) -> None:
        """Step metrics from SharedRuntime.stats before and after one step()."""
        self.steps.inc()
        self.step_seconds.observe(seconds)
        total = 0
        for kind in ROW_KINDS:
            n = after[f"{kind}_rows"] - before[f"{kind}_rows"]
            total += n
            self.rows.labels(kind).inc(n)
            self.step_rows.labels(kind).observe(n)
        self._row_rate.add(total)

    def observe_generated(self, n: int) -> None:
        if n:
            self.generated.inc(n)
            self._gen_rate.add(n)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
