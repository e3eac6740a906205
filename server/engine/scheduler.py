"""Scheduling: the bounded waiting queue, admission into KV slots, and how many prompt tokens a
step may prefill.

Admission is first come, first served: a request is admitted (its slots staged) when every row it
needs fits; a request that does not fit blocks those behind it, so a large request is not starved.
A step's prefill budget follows measurement: while sequences decode, the prefill work of a step is
sized to take about as long as one decode step (two exponential moving averages: seconds per
decode step, prefill tokens per second), so running streams keep their pace while a long prompt
goes in by chunks; with nothing decoding the budget is the maximum chunk.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from .types import Draining, Limits, QueueFull, Request

EMA = 0.3  # weight of the newest measurement


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new


class Scheduler:
    def __init__(self, limits: Limits, rows_needed: Callable[[Request], int], capacity: int):
        self.limits = limits
        self.rows_needed = rows_needed
        self.capacity = capacity
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.draining = False
        self.stopped = False
        self.decode_s: float | None = None  # seconds per decode step
        self.prefill_rate: float | None = None  # prefilled tokens per second

    # ---- the queue (any thread) ----------------------------------------------------------------
    def submit(self, req: Request) -> None:
        with self.lock:
            if self.draining:
                raise Draining()
            if len(self.waiting) >= self.limits.max_waiting:
                raise QueueFull()
            need = self.rows_needed(req)
            if need > self.capacity:
                raise ValueError(f"this request needs {need} batch rows (n x components); "
                                 f"the server runs at most {self.capacity}")
            self.waiting.append(req)
            self.lock.notify()

    def wake(self) -> None:
        with self.lock:
            self.lock.notify()

    def wait_for_work(self, busy: Callable[[], bool], poll_s: float | None = None) -> bool:
        """Block until there is something to do; False once stopped. ``poll_s``: wake that often anyway
        (on the main thread, so that Python runs signal handlers that arrived while it slept)."""
        with self.lock:
            while not self.stopped and not self.waiting and not busy():
                self.lock.wait(poll_s)
            return not self.stopped

    # ---- admission (engine thread) -------------------------------------------------------------
    def admit(self, free_slots: int) -> list[Request]:
        """Waiting requests that fit in ``free_slots``, in arrival order (cancelled ones dropped)."""
        out = []
        with self.lock:
            while self.waiting:
                req = self.waiting[0]
                if req.cancelled.is_set():
                    self.waiting.popleft()
                    continue
                need = self.rows_needed(req)
                if need > free_slots:
                    break
                free_slots -= need
                out.append(self.waiting.popleft())
        return out

    # ---- prefill budget ------------------------------------------------------------------------
    def observe_decode(self, seconds: float) -> None:
        self.decode_s = _ema(self.decode_s, seconds)

    def observe_prefill(self, tokens: float, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill_rate = _ema(self.prefill_rate, tokens / seconds)

    def budget(self, decoding: bool) -> int:
        """Prompt tokens the next step may prefill."""
        lo, hi = self.limits.prefill_chunk_min, self.limits.prefill_chunk_max
        if not decoding:
            return hi
        if self.decode_s is None or self.prefill_rate is None:
            return lo
        return int(min(hi, max(lo, self.decode_s * self.prefill_rate)))


def split_budget(remaining: list[int], budget: int) -> list[int]:
    """Tokens each job (in order) gets from ``budget``: first come, first served; zeros at the end."""
    out = []
    for r in remaining:
        take = max(0, min(r, budget))
        out.append(take)
        budget -= take
    return out
