"""The engine: one thread that owns the models and runs the loop.

``constellation serve`` runs the loop on the process's main thread (``run``), the thread that loaded
the models, and the HTTP server beside it; the serving code never computes with torch. Each thread
that runs a torch parallel region gets its own OpenMP team, and with two teams libgomp counts more
threads than cores and lets its workers sleep between regions instead of spinning: a decode step
took about twice as long (docs/benchmarks.md, "Which thread decodes"). Tests and embedders may use
``start``, a background thread.

Each iteration: run jobs queued by other threads (``call``), drop cancelled work, admit waiting
requests into staged KV slots (scheduler), run one prefill step within the measured budget
(runner: chunks of several prompts batched), then one decode step for every decoding row, and turn
each row's logits into a token (sampler), text (detokenizer) and an ``Event`` for its request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

import torch

from composer.constellation import Constellation, GeneralistPass
from composer.modes import CompositionParams, Plan
from .catalogs import CatalogSwitch
from .detokenizer import Detokenizer
from .kv_cache import SlotCache
from .runner import ModelRunner, PrefillJob
from .sampler import logprob_entry, next_token_logprobs, sample
from .scheduler import Scheduler, split_budget
from .scoring import prompt_logprobs
from .types import Event, Limits, Request, Row, Sequence

log = logging.getLogger("constellation.engine")


class Engine(CatalogSwitch):
    def __init__(self, constellation: Constellation, tokenizer, limits: Limits, metrics=None,
                 eos_ids: set[int] | None = None):
        self.c, self.g, self.tok, self.limits, self.metrics = constellation, constellation.g, tokenizer, limits, metrics
        mc = self.g.mc
        # one slot per batch row: a sequence is one row, a logit-mode sequence 1 + K
        self.cache = SlotCache(mc.n_layers, limits.max_running, mc.n_kv_heads, limits.max_seq_len, mc.head_dim,
                               self.g.dtype, self.g.device)
        self.eos = set(eos_ids or ()) | set(mc.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos.add(int(tokenizer.eos_token_id))
        self.scheduler = Scheduler(limits, self.rows_needed, self.cache.slots)
        self.runner = ModelRunner(constellation, self.cache, self.plan_for)
        self.prefilling: list[PrefillJob] = []
        self.running: list[Sequence] = []
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="constellation-engine", daemon=True)
        self.looping = False  # the loop is running, on whichever thread
        self.pending: tuple[Constellation, threading.Event] | None = None  # a catalog waiting to swap in
        self.swap_waits: list[int] = []  # per swap: loop iterations it waited for prompts being prefilled
        self._waited = 0
        self.runners: dict[int, ModelRunner] = {}  # old catalogs' runners, while their sequences decode
        self._union: tuple | None = None  # (catalogs' ids, Union, its runner, row weights mapped into it)
        self.union_steps = 0  # decode steps that ran several catalogs' rows together
        self.steps = 0  # decode steps run
        self.mixed_steps = 0  # of which through the mix kernel (rows with different compositions)
        self.prefill_steps = 0

    # ---- public API (any thread) -------------------------------------------------------------
    def start(self) -> None:
        """Run the loop on a background thread."""
        self.thread.start()

    def run(self) -> None:
        """Run the loop on the calling thread until ``stop``."""
        self._loop()

    def alive(self) -> bool:
        return self.looping

    def submit(self, req: Request) -> None:
        self.scheduler.submit(req)
        self._gauges()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result (blocking)."""
        done, box = threading.Event(), {}

        def job():
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                box["error"] = e
            done.set()

        self.jobs.put(job)
        self.scheduler.wake()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def score_prompt(self, ids: list[int], composition: CompositionParams, fingerprint_mask: list[int] | None,
                     top: int):
        """Each prompt token's log-probability under the prompt's composition (``scoring``), computed
        on the engine thread between steps; blocks the caller."""
        return self.call(lambda: prompt_logprobs(self.c, ids, composition, fingerprint_mask, top))

    def drain(self) -> None:
        with self.scheduler.lock:
            self.scheduler.draining = True
            self.scheduler.lock.notify()

    def idle(self) -> bool:
        with self.scheduler.lock:
            return not self.scheduler.waiting and not self.running and not self.prefilling

    def stop(self) -> None:
        with self.scheduler.lock:
            self.scheduler.stopped = True
            self.scheduler.lock.notify()
        if self.thread.ident is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    @property
    def draining(self) -> bool:
        return self.scheduler.draining

    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def rows_needed(self, req: Request) -> int:
        """Batch rows (KV slots) a request occupies while it runs."""
        mode = req.composition.mode or self.c.settings.default_mode
        per = 1 + (req.composition.top_k or self.c.settings.top_k) if mode == "logit" else 1
        return per * req.n

    def plan_for(self, gp: GeneralistPass, params: CompositionParams) -> Plan:
        """The plan (and its timing metrics) for a prompt: the one place generation and /explain use."""
        plan = self.c.plan(gp, 0, params)
        if self.metrics:
            self.metrics.observe_plan(plan, self.c.domains, gp.timings)
        return plan

    # ---- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        self.looping = True
        try:
            self._iterate(0.25 if threading.current_thread() is threading.main_thread() else None)
        finally:
            self.looping = False

    def _iterate(self, poll_s: float | None) -> None:
        busy = lambda: bool(self.running or self.prefilling or not self.jobs.empty()  # noqa: E731
                            or self.pending is not None)
        while self.scheduler.wait_for_work(busy, poll_s):
            try:
                while not self.jobs.empty():
                    self.jobs.get_nowait()()
                self._reap_cancelled()
                if not self._swap_if_quiet():
                    self._admit()
                if self.prefilling:
                    self._prefill_step()
                if self.running:
                    t0 = time.perf_counter()
                    self._decode()
                    self.scheduler.observe_decode(time.perf_counter() - t0)
            except Exception as e:  # a step failed: fail the running requests, keep serving
                log.exception("engine step failed")
                for seq in list(self.running):
                    self._finish(seq, None, error=f"internal error: {type(e).__name__}: {e}")
            self._gauges()

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.running.set(self.num_running)
            self.metrics.waiting.set(self.num_waiting)

    def _reap_cancelled(self) -> None:
        for seq in list(self.running):
            if seq.request.cancelled.is_set():
                self._finish(seq, "abort", notify=False)  # vLLM's name
        for job in [j for j in self.prefilling if j.request.cancelled.is_set()]:
            self._drop(job)

    def _drop(self, job: PrefillJob, error: str | None = None) -> None:
        self.prefilling.remove(job)
        self.cache.release_all(job.rows)
        if error is not None:
            for i in range(job.request.n):
                job.request.emit(Event(i, finish_reason="error", error=error))

    # ---- prefill -------------------------------------------------------------------------------
    def _admit(self) -> None:
        for req in self.scheduler.admit(self.cache.free):
            req.started = time.perf_counter()
            if self.metrics:
                self.metrics.queue_time.observe(req.started - req.arrival)
            rows = [Row(-1, None, 0) for _ in range(self.rows_needed(req))]
            for r in rows:
                self.cache.stage(r)
            try:
                self.prefilling.append(self.runner.start(req, rows))
            except Exception as e:  # e.g. a composition the constellation refuses
                self.cache.release_all(rows)
                for i in range(req.n):
                    req.emit(Event(i, finish_reason="error", error=f"{type(e).__name__}: {e}"))

    def _prefill_step(self) -> None:
        t0 = time.perf_counter()
        jobs = list(self.prefilling)
        shares = split_budget([self.runner.remaining_cost(j) for j in jobs], self.scheduler.budget(bool(self.running)))
        batch, cost = [], 0.0
        for job, share in zip(jobs, shares):
            if job.phase == "generalist":
                if int(share) >= 1:
                    batch.append((job, int(share)))
            elif share > 0:
                spent = [0.0]
                self._guard([job], lambda: spent.__setitem__(0, self.runner.spend(job, share)))
                cost += spent[0]
        if batch and self._guard([j for j, _ in batch], lambda: self.runner.generalist_chunk(batch)):
            cost += sum(n for _, n in batch)
        self.prefill_steps += 1
        self.scheduler.observe_prefill(cost, time.perf_counter() - t0)
        for job in [j for j in self.prefilling if j.phase == "done"]:
            self._guard([job], lambda: self._start_sequences(job))

    def _guard(self, jobs: list[PrefillJob], fn: Callable[[], None]) -> bool:
        """Run a prefill piece; on failure the jobs it served end with an error event."""
        try:
            fn()
            return True
        except Exception as e:
            log.exception("prefill failed")
            for job in jobs:
                if job in self.prefilling:
                    self._drop(job, f"{type(e).__name__}: {e}")
            return False

    def _start_sequences(self, job: PrefillJob) -> None:
        req = job.request
        t1 = time.perf_counter()
        per_choice = self.runner.finish(job)
        self.prefilling.remove(job)
        seqs = []
        for i, rows in enumerate(per_choice):
            gen = None if req.params.seed is None else torch.Generator().manual_seed(int(req.params.seed) + i)
            seqs.append(Sequence(req, i, rows, job.request.plan.kind == "logit", gen, self.eos,
                                 Detokenizer(self.tok, req.params.stop), catalog=self.c))
        self.running.extend(seqs)
        for seq in seqs:
            self._sample_and_emit(seq, [lg.clone() for lg in job.logits])
        if self.metrics:
            self.metrics.compose_time(time.perf_counter() - t1)
            self.metrics.prompt_tokens.inc(job.T * req.n)
            self.metrics.requests_mode.labels(job.request.plan.mode).inc()

    # ---- decoding ------------------------------------------------------------------------------
    def _decode(self) -> None:
        rows = sorted((r for s in self.running for r in s.rows), key=lambda r: r.slot)
        owner = {id(r): s for s in self.running for r in s.rows}
        runner, weights = self._decoder(self.running, rows)
        logits, same = runner.decode(rows, [owner[id(r)].tokens[-1] for r in rows], weights)
        self.union_steps += weights is not None
        if weights is None and self._union is not None:
            self._union = None  # one catalog again
        self.steps += 1
        self.mixed_steps += 0 if same else 1
        if self.metrics:
            self.metrics.batch_size.observe(len(rows))
        by_row = {id(r): logits[k] for k, r in enumerate(rows)}
        for seq in list(self.running):
            if not seq.finished:
                self._sample_and_emit(seq, [by_row[id(r)] for r in seq.rows])

    def _sample_and_emit(self, seq: Sequence, logits: list[torch.Tensor]) -> None:
        p = seq.request.params
        logp = next_token_logprobs(logits, [r.beta for r in seq.rows])
        token = sample(logp, p, seq.eos, seq.tokens, seq.generator)
        now = time.perf_counter()
        if self.metrics:
            if seq.last_token_at:
                self.metrics.itl.observe(now - seq.last_token_at)
            else:
                self.metrics.ttft.observe(now - seq.request.arrival)
            self.metrics.generation_tokens.inc()
        seq.last_token_at = now
        # an EOS is a completion token (usage, logprobs, max_tokens), as at OpenAI and vLLM, but no text
        eos_hit = token in seq.eos and not p.ignore_eos  # (masked while below min_tokens)
        seq.tokens.append(token)
        value = float(logp[token])
        seq.cumulative_logprob += value
        entry = logprob_entry(logp, token, p.logprobs, value)
        finish = None
        if eos_hit:
            finish = "stop"
        elif len(seq.tokens) >= p.max_tokens:
            finish = "length"
        elif seq.rows[0].length + 1 >= min(self.limits.max_seq_len - 1, self.g.mc.max_positions - 1):
            finish = "length"
        delta = seq.detok.add(None if eos_hit else token, final=finish is not None)
        if seq.detok.stopped:
            finish = "stop"
        seq.request.emit(Event(seq.index, delta, [token], [entry] if entry else []))
        if finish:
            self._finish(seq, finish)

    def _finish(self, seq: Sequence, reason: str | None, error: str | None = None, notify: bool = True) -> None:
        if seq.finished:
            return
        seq.finished = True
        self.running.remove(seq)
        self.cache.release_all(seq.rows)
        if notify:
            seq.request.emit(Event(seq.index, "", finish_reason=reason if error is None else "error", error=error,
                                   cumulative_logprob=seq.cumulative_logprob))
        if self.metrics and reason and error is None:
            self.metrics.success.labels(reason).inc()
            self.metrics.e2e.observe(time.perf_counter() - seq.request.arrival)
