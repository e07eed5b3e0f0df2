"""EngineDriver: the one thread that owns a SharedRuntime and steps it for the HTTP handlers.

Handlers never touch the runtime. They hand the engine thread a command (submit, cancel,
load / unload an adapter) and await an asyncio future; the thread runs commands between
steps, then steps the runtime while anything is pending, so embedding and generation
requests from concurrent clients share each forward pass. After every step it reports
finished requests (and, for streams, new tokens) back to each request's event loop with
`loop.call_soon_threadsafe`.

Adapters are addressed by name. Loading one runs between two steps; unloading one first
stops new requests naming it (404), lets the requests already using it finish, then drops
it between two steps: other traffic keeps flowing throughout.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Optional

from ..engine.runtime import RequestHandle, SharedRuntime
from .metrics import ServerMetrics

log = logging.getLogger("bsharedrag.server")


class ModelNotFound(LookupError):
    """A request named a model that is neither the base nor a loaded adapter."""


class QueueFull(Exception):
    """The request would take the engine past max_queue requests (waiting + generating)."""


class AdapterConflict(Exception):
    """Load of a name that is already served."""


@dataclass
class Tracked:
    """One engine request as a handler sees it: `done` resolves with the finished handle.
    Streams share one `events` queue per HTTP request: (tracked, new token ids) after each
    step that added tokens, then (tracked, None) when it finished."""

    handle: RequestHandle
    loop: asyncio.AbstractEventLoop
    adapter: Optional[str]
    done: asyncio.Future
    events: Optional[asyncio.Queue] = None
    seen: int = 0  # generated tokens already accounted (engine thread only)


class EngineDriver:
    def __init__(self, runtime: SharedRuntime, base_name: str, max_queue: int, metrics: ServerMetrics):
        self.rt, self.base_name, self.max_queue, self.metrics = runtime, base_name, max_queue, metrics
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._tracked: list[Tracked] = []
        self._inflight: dict[Optional[str], int] = {}  # adapter -> unfinished requests naming it
        self._retiring: dict[str, Future] = {}  # adapter being unloaded -> done when it is
        self._served: tuple = ()  # replaced whole on the engine thread, so any thread may read it
        self.embedding_formats: dict[str, dict] = {}  # adapter -> how it was trained to embed (rag.EMBEDDING_FILE)
        self._refresh_served()
        self._thread = threading.Thread(target=self._loop, name="bsharedrag-engine", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish what is pending, then end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # -- called from handlers (any thread) ----------------------------------------------

    def call(self, fn: Callable) -> Future:
        """Run fn() on the engine thread between two steps; its result or error lands in the Future."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        fut: Future = Future()
        self._cmds.put((fn, fut))
        self._wake.set()
        return fut

    async def run(self, fn: Callable):
        return await asyncio.wrap_future(self.call(fn))

    def resolve(self, model: str) -> Optional[str]:
        """The adapter a request's `model` field names (None: the base); engine thread only."""
        if model == self.base_name:
            return None
        if model in self.rt.model.adapter_slots and model not in self._retiring:
            return model
        raise ModelNotFound(model)

    def served_models(self) -> list[str]:
        """The base model's name, then the adapters that take requests (not those unloading)."""
        return list(self._served)

    def _refresh_served(self) -> None:
        self._served = (self.base_name, *(a for a in self.rt.model.adapters if a not in self._retiring))

    async def submit(self, model: str, submits: list[Callable], stream: bool = False) -> list[Tracked]:
        """Submit a batch all-or-nothing: each callable gets the resolved adapter and returns a
        RequestHandle (rt.submit_embed / rt.submit_generate with the other arguments bound)."""
        loop = asyncio.get_running_loop()

        def cmd():
            adapter = self.resolve(model)
            if len(submits) > self.max_queue:
                raise ValueError(f"{len(submits)} inputs in one request exceed the server's queue of {self.max_queue}")
            busy = self.rt.num_waiting + self.rt.num_running
            if busy + len(submits) > self.max_queue:
                raise QueueFull(f"{busy} requests are in the engine and {len(submits)} more would pass the "
                                f"limit of {self.max_queue}")
            handles = []
            try:
                for fn in submits:
                    handles.append(fn(adapter))
            except BaseException:
                for h in handles:
                    self.rt.cancel(h)
                raise
            out = []
            events = asyncio.Queue() if stream else None
            for h in handles:
                t = Tracked(h, loop, adapter, loop.create_future(), events)
                self._tracked.append(t)
                self._inflight[adapter] = self._inflight.get(adapter, 0) + 1
                out.append(t)
            return out

        return await self.run(cmd)

    def cancel(self, tracked: list[Tracked]) -> None:
        """Withdraw unfinished requests (their client went away); frees their KV cache."""

        def cmd():
            for t in tracked:
                if self.rt.cancel(t.handle):
                    self.metrics.cancelled.inc()
            self._report()

        try:
            self.call(cmd)
        except RuntimeError:  # engine already stopped: nothing left to cancel
            pass

    async def load_adapter(self, name: str, path: str) -> None:
        """Read the adapter and build its stacks on a worker thread while the engine keeps
        stepping; only the swap runs on the engine thread, between two steps."""
        from ..model.adapters import commit_adapter, prepare_adapter
        from ..rag.pipeline import read_embedding_format

        def check():
            if name == self.base_name or name in self.rt.model.adapter_slots:
                raise AdapterConflict(f"model {name!r} is already served; unload it first")

        check()
        t0 = time.perf_counter()
        prepared = await asyncio.to_thread(prepare_adapter, self.rt.model, path, name)
        fmt = await asyncio.to_thread(read_embedding_format, path)

        def cmd():
            check()
            t1 = time.perf_counter()
            commit_adapter(self.rt.model, prepared)
            self.embedding_formats[name] = fmt
            self._refresh_served()
            log.info("loaded adapter %r from %s in %.1f ms (engine paused %.1f ms)", name, path,
                     1e3 * (time.perf_counter() - t0), 1e3 * (time.perf_counter() - t1))

        await self.run(cmd)

    async def unload_adapter(self, name: str) -> None:
        def cmd():
            if name == self.base_name:
                raise ValueError(f"{name!r} is the base model; only adapters can be unloaded")
            if name not in self.rt.model.adapter_slots:
                raise ModelNotFound(name)
            if name not in self._retiring:
                self._retiring[name] = Future()
                self._refresh_served()
            return self._retiring[name]

        await asyncio.wrap_future(await self.run(cmd))

    # -- the engine thread ---------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def _loop(self) -> None:
        while True:
            if not self.rt.has_pending():
                if self._stopping and self._cmds.empty():
                    break
                self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._run_commands()
                self._retire()
                if self.rt.has_pending():
                    self._step()
            except Exception:  # keep serving: a dead engine thread would hang every request
                log.exception("engine loop error")

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._cmds.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # the handler maps it to an HTTP status
                fut.set_exception(e)

    def _retire(self) -> None:
        for name, fut in list(self._retiring.items()):
            if self._inflight.get(name, 0) == 0:
                try:
                    self.rt.model.unload_adapter(name)
                    self.embedding_formats.pop(name, None)
                    fut.set_result(None)
                    log.info("unloaded adapter %r", name)
                except BaseException as e:
                    fut.set_exception(e)
                del self._retiring[name]
                self._refresh_served()

    def _step(self) -> None:
        before = dict(self.rt.stats)
        t0 = time.perf_counter()
        try:
            self.rt.step()
        except Exception:  # that step's requests carry .error; their handlers answer 500
            log.exception("engine step failed")
        self.metrics.observe_step(before, self.rt.stats, time.perf_counter() - t0)
        self._report()

    def _report(self) -> None:
        """Hand finished requests and new stream tokens back to their event loops."""
        still = []
        for t in self._tracked:
            h = t.handle
            if h.kind == "generate":
                toks = h.tokens
                if len(toks) > t.seen:
                    if t.seen == 0:
                        self.metrics.ttft.observe(time.perf_counter() - h.submitted_at)
                    self.metrics.observe_generated(len(toks) - t.seen)
                    if t.events is not None and not h.done:
                        self._send(t, t.events.put_nowait, (t, toks[t.seen:]))
                    t.seen = len(toks)
            if h.done:
                self._inflight[t.adapter] -= 1
                self._send(t, _resolve, t.done, h)
                if t.events is not None:
                    self._send(t, t.events.put_nowait, (t, None))
            else:
                still.append(t)
        self._tracked = still

    @staticmethod
    def _send(t: Tracked, fn, *args) -> None:
        try:
            t.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # that event loop is closed: nobody is waiting any more
            pass


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)
