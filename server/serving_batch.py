"""One HTTP request's engine round trip: its prompts (a completion may have several; chat has one),
each an engine ``Request`` of ``n`` choices, submitted together and answered on one queue.

The engine queues all of a batch's requests in one go (``Engine.submit``), so its loop takes
them into the same step and their prefills batch. Events arrive tagged with their prompt's index;
a client that goes away aborts every request of the batch that has not finished.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator

from composer.modes import CompositionParams
from .engine import Engine, Event, Request, SamplingParams


@dataclass
class Collected:
    """One choice of a non-streamed request, gathered from its events."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    cumulative_logprob: float = 0.0


class Outbox:
    """Events from the engine's thread to one asyncio loop. Outside a step each event is handed over
    at once; during a step (the engine's ``hold()`` ... ``release()``) they wait and the loop is woken
    once for all of them: every ``call_soon_threadsafe`` makes the engine's thread give up the GIL to
    the loop's, so 16 rows' events handed over one by one stalled the next step up to 16 times."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, object]] = []
        self.held = False
        self.scheduled = False  # a delivery is scheduled on the loop and has not run yet

    @classmethod
    def of(cls, engine: Engine, loop: asyncio.AbstractEventLoop) -> "Outbox":
        """The engine's outbox for ``loop`` (made and registered on first use; called on the loop)."""
        for box in engine.outboxes:
            if box.loop is loop:
                return box
        box = cls(loop)
        engine.outboxes = [b for b in engine.outboxes if not b.loop.is_closed()] + [box]
        return box

    def put(self, q: asyncio.Queue, item) -> None:
        with self.lock:
            self.pending.append((q, item))
            if self.held:
                return
        self._wake()

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        with self.lock:
            self.held = False
        self._wake()

    def _wake(self) -> None:
        with self.lock:
            if self.scheduled or not self.pending:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop has closed (the server is stopping): nobody is listening
            with self.lock:
                self.pending.clear()
                self.scheduled = False

    def _deliver(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for q, item in items:
            q.put_nowait(item)


async def _next(q: asyncio.Queue, timeout: float):
    """``q``'s next item, or ``TimeoutError`` after ``timeout`` s. Once a token a stream: what is
    queued already without a timer, else ``asyncio.timeout`` (~35 us of the web thread's time an item
    against ~60 for ``asyncio.wait_for``, which wraps the wait in a task; docs/benchmarks.md)."""
    if not q.empty():
        return q.get_nowait()
    async with asyncio.timeout(timeout):
        return await q.get()


class Batch:
    """The engine requests of one HTTP request, in prompt order, and the queue of ``(prompt, Event)``."""

    def __init__(self, engine: Engine, reqs: list[Request], q: asyncio.Queue):
        self.engine, self.reqs, self.q = engine, reqs, q
        self.done = [0] * len(reqs)  # finished choices per prompt

    @classmethod
    def submit(cls, engine: Engine, prompts: list[list[int]], params: list[SamplingParams],
               composition: CompositionParams, n: int, fmasks: list[list[int] | None] | None = None,
               shape=None) -> "Batch":
        """Submit every prompt at once (all or none: the engine's ``QueueFull``, ``Draining`` and
        ``ValueError`` propagate). Each prompt is planned (fingerprinted) on its own."""
        box = Outbox.of(engine, asyncio.get_running_loop())
        q: asyncio.Queue = asyncio.Queue()

        def sink(p: int):
            return lambda e: box.put(q, (p, e))

        fmasks = fmasks or [None] * len(prompts)
        reqs = [Request(ids, sp, composition, n, fingerprint_mask=fm, emit=sink(p), shape=shape)
                for p, (ids, sp, fm) in enumerate(zip(prompts, params, fmasks))]
        engine.submit(*reqs)
        return cls(engine, reqs, q)

    @property
    def finished(self) -> bool:
        return all(d >= r.n for d, r in zip(self.done, self.reqs))

    def abort(self) -> None:
        """Stop every request not yet finished (the client went away, or a stream ended early)."""
        for d, r in zip(self.done, self.reqs):
            if d < r.n:
                self.engine.abort(r)

    def _count(self, p: int, e: Event) -> None:
        if e.finish_reason:
            self.done[p] += 1

    async def collect(self, http) -> list[dict[int, Collected]]:
        """Every choice of every prompt (``[prompt][choice]``); stops early if the client disconnects."""
        out = [{i: Collected() for i in range(r.n)} for r in self.reqs]
        try:
            while not self.finished:
                try:
                    p, e = await _next(self.q, 1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        self.abort()
                        return out
                    continue
                o = out[p][e.index]
                o.text += e.text
                o.ids += e.token_ids
                o.logprobs += e.logprobs
                if e.finish_reason:
                    o.finish, o.error = e.finish_reason, e.error
                    o.cumulative_logprob = e.cumulative_logprob or 0.0
                self._count(p, e)
        except asyncio.CancelledError:
            self.abort()
            raise
        return out

    async def events(self, keepalive_s: float) -> AsyncIterator[tuple[int, Event] | None]:
        """``(prompt, event)`` for a stream, in arrival order; None means 'send a keep-alive'. Whatever
        has not finished when the stream stops (a disconnect, an error) is aborted."""
        try:
            while not self.finished:
                try:
                    p, e = await _next(self.q, keepalive_s)
                except asyncio.TimeoutError:
                    yield None
                    continue
                self._count(p, e)
                yield p, e
        finally:
            if not self.finished:
                self.abort()
