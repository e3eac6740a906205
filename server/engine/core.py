"""The engine: one thread that owns the models and runs the loop.

``constellation serve`` runs the loop on the process's main thread (``run``), the thread that loaded
the models, and the HTTP server beside it; the serving code never computes with torch. Each thread
that runs a torch parallel region gets its own OpenMP team, and with two teams libgomp counts more
threads than cores and lets its workers sleep between regions instead of spinning: a decode step
took about twice as long (docs/benchmarks.md, "Which thread decodes"). Tests and embedders may use
``start``, a background thread.

Everything other threads ask of the engine is a typed input on one queue (llama.cpp's server
queue): ``AddRequest``, ``Abort``, ``Call`` (a function run between steps), ``SwapCatalog``. Each
iteration takes every input, then (vLLM v1's engine core)::

    plan = scheduler.schedule()            # admissions, prefill work, the rows to decode
    out = runner.execute(plan)             # prefill chunks + one decode forward: logits
    self.update_from_output(plan, out)     # sample every sequence at once, stop checks, text, events
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable

import torch

from composer.constellation import Constellation, GeneralistPass
from composer.modes import CompositionParams, Plan, get_mode
from . import grammar
from .catalogs import CatalogSwitch
from .kv_pool import KVPool
from .output import OutputProcessor
from .jobs import PrefillJob
from .runner import ModelOutput, ModelRunner
from .scheduler import Scheduler, StepPlan
from .scoring import prompt_logprobs
from .types import (Abort, AddRequest, Call, Draining, EngineInput, Event, Limits, QueueFull, Request,
                    Sequence, SwapCatalog)

log = logging.getLogger("constellation.engine")


class Engine(CatalogSwitch, OutputProcessor):
    def __init__(self, constellation: Constellation, tokenizer, limits: Limits, metrics=None,
                 eos_ids: set[int] | None = None):
        self.c, self.g, self.tok, self.metrics = constellation, constellation.g, tokenizer, metrics
        self.limits = limits = limits.for_model(self.g)  # the defaults from the model (its context, KV bytes)
        mc = self.g.mc
        self.pool = KVPool(mc.n_layers, mc.n_kv_heads, mc.head_dim, limits.max_seq_len, limits.kv_tokens,
                           self.g.dtype, self.g.device)
        self.cache = self.pool  # (the name tests and benchmarks read ``.used`` from)
        tok_eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
        self.eos = set(eos_ids or ()) | set(mc.eos_token_ids) | tok_eos
        self.grammars = grammar.Grammars(  # compiled off this thread
            tokenizer, mc.vocab_size, self.eos, on_compile=lambda: self.metrics and self.metrics.grammars_compiled.inc())
        self.scheduler = Scheduler(limits, self.pool, self.rows_needed, lambda: self.c)
        self.runner = ModelRunner(self.pool, self.plan_for)
        self.scheduler.signature_fraction = self.runner.signature_fraction
        self.scheduler.tail_fraction = self.runner.tail_fraction
        self.inputs: deque[EngineInput] = deque()
        # sinks whose deliveries a step holds (``hold()``, ``release()``): a step's events reach each
        # consumer (the web server's event loop) in one wake-up, not one per event (``serving_batch``)
        self.outboxes: list = []
        self.lock = threading.Condition()
        self.queued = 0  # requests submitted and not yet admitted (the 429 bound)
        self.draining = False
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="constellation-engine", daemon=True)
        self.looping = False  # the loop is running, on whichever thread
        self.pending: SwapCatalog | None = None  # a catalog waiting to swap in
        self.settle_heap = False  # after a swap without captured steps, collect and freeze the heap (``heap``)
        self.swap_waits: list[int] = []  # per swap: loop iterations it waited for prompts being prefilled
        self._waited = 0
        self._union: tuple | None = None  # (catalogs' ids, Union, row weights mapped into it)
        self.union_steps = 0  # decode steps that ran several catalogs' rows together
        self.steps = 0  # decode steps run
        self.mixed_steps = 0  # of which with rows of different compositions
        self.prefill_steps = 0

    # ---- public API (any thread) -------------------------------------------------------------
    def start(self) -> None:
        """Run the loop on a background thread."""
        self.thread.start()

    def capture(self, buckets, background: bool = True, plain: bool | None = None,
                fold_rows: int | None = None, stack_share: float | None = None, settle: bool = False,
                above: int | None = None) -> None:
        """Capture the decode step per row bucket for the current catalog (and again, once, after each
        catalog change); steps that fit a ready bucket run it (``graphs``). ``plain``: also G's step
        alone per bucket, for batches of G's own rows (default: on CUDA); buckets of at most
        ``fold_rows`` rows take each row's adapters folded (``composer.folded``; None: the buckets where
        that reads few bytes, ``graphs.fold_plan``); the others multiply every row by the whole
        catalog's adapters while those are at most ``stack_share`` of G's bytes (None: ``STACK_SHARE``;
        0: never, ``graphs.stack_plan``). ``settle``: once built, collect and freeze the heap
        (``heap.settle``; a long-running server's, as ``serve`` asks). ``above``: also one graph for
        any row count from the largest bucket + 1 to ``above`` (a dynamic size, built last)."""
        from .graphs import DecodeGraphs

        self.runner.graphs = DecodeGraphs(buckets, background, plain, fold_rows, stack_share, settle, above)
        self.runner.graphs.build(self.c)

    def graph_status(self) -> dict | None:
        """Captured decode steps: buckets ready with their compile seconds (None: eager only)."""
        g = self.runner.graphs
        return None if g is None else {**g.status(), "steps": self.runner.captured_steps}

    def run(self) -> None:
        """Run the loop on the calling thread until ``stop``."""
        self._loop()

    def alive(self) -> bool:
        return self.looping

    def _put(self, item: EngineInput) -> None:
        with self.lock:
            self.inputs.append(item)
            self.lock.notify()

    def submit(self, *reqs: Request) -> None:
        """Queue requests (429 ``QueueFull`` once ``max_waiting`` are queued, ``Draining`` while draining,
        ``ValueError`` for one that could never run: too many rows, or more KV than the cache). Several
        (one HTTP request's prompts) go in together, all or none, so the loop takes them into one step."""
        for req in reqs:
            need = self.rows_needed(req)
            if need > self.limits.max_running:
                raise ValueError(f"this request needs {need} batch rows (n x components); "
                                 f"the server runs at most {self.limits.max_running}")
            longest = min(len(req.prompt_ids) + req.params.max_tokens, self.limits.max_seq_len)
            if not self.pool.could_fit([longest] * need):
                raise ValueError(f"this request's {need} rows of up to {longest} tokens exceed the KV cache "
                                 f"({self.pool.tokens} positions); lower n or max_tokens (`constellation serve "
                                 "--kv-cache-tokens` raises the cache)")
        with self.lock:
            if self.draining:
                raise Draining()
            if self.queued >= self.limits.max_waiting:
                raise QueueFull()
            self.queued += len(reqs)
            self.inputs.extend(AddRequest(r) for r in reqs)
            self.lock.notify()
        self._gauges()

    def abort(self, req: Request) -> None:
        """Stop ``req`` wherever it is (the client went away); its sequences end as ``abort``."""
        req.cancelled.set()
        self._put(Abort(req))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result (blocking)."""
        job = Call(fn)
        self._put(job)
        job.done.wait()
        if "error" in job.box:
            raise job.box["error"]
        return job.box["value"]

    def score_prompt(self, ids: list[int], composition: CompositionParams, fingerprint_mask: list[int] | None,
                     top: int):
        """Each prompt token's log-probability under the prompt's composition (``scoring``), computed
        on the engine thread between steps; blocks the caller."""
        return self.call(lambda: prompt_logprobs(self.c, ids, composition, fingerprint_mask, top))

    def drain(self) -> None:
        with self.lock:
            self.draining = True
            self.lock.notify()

    def idle(self) -> bool:
        with self.lock:
            return not self.queued and not self.inputs and not self.scheduler.running \
                and not self.scheduler.prefilling and not self.scheduler.waiting

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify()
        if self.thread.ident is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def prefilling(self) -> list[PrefillJob]:
        return self.scheduler.prefilling

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.prefilling)

    @property
    def num_waiting(self) -> int:
        return self.queued

    def rows_needed(self, req: Request) -> int:
        """Batch rows (KV slots) a request occupies while it runs: its mode's rows per choice x n."""
        try:
            mode = get_mode(req.composition.mode or self.c.settings.default_mode)
        except Exception:  # an unknown mode is refused when the job starts
            return req.n
        return mode.rows_per_choice(req.composition.top_k or self.c.settings.top_k) * req.n

    def plan_for(self, c: Constellation, gp: GeneralistPass, params: CompositionParams) -> Plan:
        """The plan (and its timing metrics) for a prompt: the one place generation and /explain use."""
        plan = c.plan(gp, 0, params)
        if self.metrics:
            self.metrics.observe_plan(plan, c.domains, gp.timings)
        return plan

    # ---- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        self.looping = True
        try:
            self._iterate(0.25 if threading.current_thread() is threading.main_thread() else None)
        finally:
            self.looping = False

    def _busy(self) -> bool:
        s = self.scheduler
        return bool(self.inputs or s.running or s.prefilling or s.waiting or self.pending is not None)

    def _wait_for_work(self, poll_s: float | None) -> bool:
        """Block until there is something to do; False once stopped. ``poll_s``: wake that often anyway
        (on the main thread, so that Python runs signal handlers that arrived while it slept)."""
        with self.lock:
            while not self.stopped and not self._busy():
                self.lock.wait(poll_s)
            return not self.stopped

    def _iterate(self, poll_s: float | None) -> None:
        while self._wait_for_work(poll_s):
            outboxes = list(self.outboxes)
            for box in outboxes:
                box.hold()
            try:
                self._process_inputs()
                swapping = self._swap_if_quiet()
                plan = self.scheduler.schedule(admit=not swapping)
                self._started(plan)
                if plan.prefill or plan.rows:
                    out = self.runner.execute(plan, self._decoder(plan.decode, plan.rows) if plan.rows else None)
                    self.update_from_output(plan, out)
            except Exception as e:  # a step failed: fail the running requests, keep serving
                log.exception("engine step failed")
                for seq in list(self.scheduler.running):
                    self._finish(seq, None, error=f"internal error: {type(e).__name__}: {e}")
            finally:
                for box in outboxes:
                    box.release()
            self._gauges()

    def _process_inputs(self) -> None:
        while True:
            with self.lock:
                if not self.inputs:
                    return
                item = self.inputs.popleft()
            if isinstance(item, AddRequest):
                self.scheduler.add(item.request)
            elif isinstance(item, Abort):
                self._abort(item.request)
            elif isinstance(item, Call):
                try:
                    item.box["value"] = item.fn()
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                    item.box["error"] = e
                item.done.set()
            elif isinstance(item, SwapCatalog):
                self.pending = item

    def _abort(self, req: Request) -> None:
        seqs, jobs, waited = self.scheduler.abort(req)
        for seq in seqs:
            self._finish(seq, "abort", notify=False)  # vLLM's name
        for job in jobs:
            self.scheduler.drop_job(job)
        if waited and req.started is None:
            self._queue_left(req)

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.running.set(self.num_running)
            self.metrics.waiting.set(self.num_waiting)
            self.metrics.kv_usage.set(self.pool.usage())

    def _started(self, plan: StepPlan) -> None:
        """Jobs the scheduler admitted: queue accounting, then their tensors (a refused composition ends
        the request with its error)."""
        for req in plan.dropped:
            self._queue_left(req)
        for seq in plan.preempted:
            if self.metrics:
                self.metrics.preemptions.inc()
        for job in plan.admitted:
            if job.resume is None:
                self._queue_left(job.request)
                job.request.started = time.perf_counter()
                if self.metrics:
                    self.metrics.queue_time.observe(job.request.started - job.request.arrival)
            try:
                self.runner.init(job)
            except Exception as e:  # e.g. a composition the constellation refuses
                self._fail_job(job, f"{type(e).__name__}: {e}")
                plan.prefill = [(j, s) for j, s in plan.prefill if j is not job]

    def _queue_left(self, req: Request) -> None:
        with self.lock:
            self.queued = max(0, self.queued - 1)

    def _fail_job(self, job: PrefillJob, error: str) -> None:
        self.scheduler.drop_job(job)
        if job.resume is not None:
            self._finish(job.resume, None, error=error)
            return
        for i in range(job.request.n):
            job.request.emit(Event(i, finish_reason="error", error=error))

    # ---- results -------------------------------------------------------------------------------
    def update_from_output(self, plan: StepPlan, out: ModelOutput) -> None:
        """New sequences from finished prompts, every sequence's next token, stop checks and events."""
        for job, error in out.failed:
            self._fail_job(job, error)
        self.scheduler.update_from_output(out)
        if plan.prefill:
            self.prefill_steps += 1
        seqs, logits, row_betas = [], [], []
        if out.decode_logits is not None:
            self.steps += 1
            self.mixed_steps += out.mixed
            if self.metrics:
                self.metrics.batch_size.observe(len(plan.rows))
            index = {id(r): k for k, r in enumerate(plan.rows)}
            order = sorted(plan.decode, key=lambda s: index[id(s.rows[0])])
            seqs, logits = order, [out.decode_logits]
            row_betas = [[(index[id(r)], r.beta) for r in s.rows] for s in order]
        base = len(plan.rows)
        for job in out.finished:
            for seq in self._sequences(job):
                seqs.append(seq)
                logits.append(torch.stack(job.logits))
                row_betas.append([(base + j, r.beta) for j, r in enumerate(seq.rows)])
                base += len(seq.rows)
        if seqs:
            self._sample_and_emit(seqs, torch.cat(logits), row_betas)

    def _finish(self, seq: Sequence, reason: str | None, error: str | None = None, notify: bool = True) -> None:
        if seq.finished:
            return
        seq.finished = True
        self.scheduler.finish(seq)
        if notify:
            seq.request.emit(Event(seq.index, "", finish_reason=reason if error is None else "error", error=error,
                                   cumulative_logprob=seq.cumulative_logprob))
        if self.metrics and reason and error is None:
            self.metrics.success.labels(reason).inc()
            self.metrics.e2e.observe(time.perf_counter() - seq.request.arrival)
