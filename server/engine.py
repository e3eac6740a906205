"""The engine: continuous batching of requests that each run their own composed model.

One background thread owns the models. Each step it admits waiting requests (prefill: one
generalist pass gives the fingerprint, the plan, and the trunk's keys/values; then the composed
last L blocks run with the request's own parameters), and then runs one decode step for every
running sequence in a single batch. Rows with different compositions share the batch through the
mix kernel; when every row composes the same parameters (e.g. one request alone) the engine uses
materialized tensors instead. Both paths are exact (DESIGN §4).

Keys/values live in a slot cache: ``[slots, H_kv, max_len, head_dim]`` per layer, rows of the
running batch kept in slots ``0..B-1`` (a finished row's slot is refilled by moving the last row
into it), so a decode step reads a view, never a copy.

A ``logit``-mode sequence runs as 1 + K rows (the generalist and each selected specialist, each
composed one-hot), whose next-token log-probabilities are mixed before sampling.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from composer.constellation import Constellation, GeneralistPass
from composer.kernels import stack_rows
from composer.modes import CompositionParams, Plan

log = logging.getLogger("constellation.engine")


# ---- limits and per-request parameters -----------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    max_running: int = 16  # batch rows decoded together (a logit-mode sequence takes 1 + K)
    max_waiting: int = 64  # queued requests; beyond that: 429
    max_prompt_tokens: int = 1536
    max_new_tokens: int = 1024  # cap on max_tokens
    max_seq_len: int = 2048  # prompt + generated, per sequence (the KV cache's length)
    max_body_bytes: int = 1 << 20
    drain_timeout_s: float = 120.0
    keepalive_s: float = 10.0


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: chosen token + top-k alternatives


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


@dataclass
class Event:
    """What the engine reports about one choice (sequence) of a request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # one per token: token, logprob, top
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    composition: CompositionParams
    n: int = 1
    fingerprint_mask: list[int] | None = None  # chat: the message-content tokens (None: all)
    emit: Callable[[Event], None] = lambda e: None  # thread-safe sink (set by the server)
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled by the engine
    plan: Plan | None = None
    started: float | None = None


@dataclass
class Row:
    """One KV-cache slot and the source weights its composed blocks use."""

    slot: int
    weights: torch.Tensor  # [1 + N, d], or per composed block [Lc, 1 + N, d]
    length: int  # tokens in the cache
    beta: float | None = None  # logit mode: component weight (None: the generalist term)


@dataclass
class Sequence:
    request: Request
    index: int
    rows: list[Row]
    logit_mode: bool
    generator: torch.Generator | None
    eos: set[int]
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
    last_token_at: float = 0.0
    finished: bool = False


# ---- the KV slot cache ---------------------------------------------------------------------------
class SlotCache:
    def __init__(self, n_layers: int, slots: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        shape = (slots, n_kv, max_len, head_dim)
        # zeros, not empty: a decode step reads every row up to the longest row's length, and masked
        # positions still meet the values (0 * NaN from uninitialised memory would be NaN)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.slots = slots
        self.used = 0

    def alloc(self) -> int:
        if self.used >= self.slots:
            raise RuntimeError("no free KV slot")
        self.used += 1
        return self.used - 1

    def copy(self, src: int, dst: int, length: int, layers: range | None = None) -> None:
        for i in layers if layers is not None else range(len(self.k)):
            self.k[i][dst, :, :length] = self.k[i][src, :, :length]
            self.v[i][dst, :, :length] = self.v[i][src, :, :length]

    def release(self, slot: int, length_of_last: int) -> int | None:
        """Free ``slot``; the last used slot moves into it. Returns the moved slot's old index."""
        last = self.used - 1
        self.used -= 1
        if slot == last:
            return None
        self.copy(last, slot, length_of_last)
        return last


class PrefillView:
    def __init__(self, cache: SlotCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, i, k, v):
        T = k.shape[2]
        self.cache.k[i][self.slot, :, :T] = k[0]
        self.cache.v[i][self.slot, :, :T] = v[0]
        return k, v


class DecodeView:
    def __init__(self, cache: SlotCache, lengths: torch.Tensor, span: int):
        self.cache, self.lengths, self.span = cache, lengths, span
        self.rows = torch.arange(lengths.shape[0], device=lengths.device)

    def update(self, i, k, v):
        B = k.shape[0]
        self.cache.k[i][self.rows, :, self.lengths] = k[:, :, 0]
        self.cache.v[i][self.rows, :, self.lengths] = v[:, :, 0]
        return self.cache.k[i][:B, :, : self.span], self.cache.v[i][:B, :, : self.span]


# ---- the engine ----------------------------------------------------------------------------------
class Engine:
    def __init__(self, constellation: Constellation, tokenizer, limits: Limits, metrics=None,
                 eos_ids: set[int] | None = None):
        self.c = constellation
        self.g = constellation.g
        self.tok = tokenizer
        self.limits = limits
        self.metrics = metrics
        mc = self.g.mc
        # one slot per batch row: a sequence is one row, a logit-mode sequence 1 + K rows
        self.cache = SlotCache(mc.n_layers, limits.max_running, mc.n_kv_heads, limits.max_seq_len, mc.head_dim,
                               self.g.dtype, self.g.device)
        self.eos = set(eos_ids or ()) | set(mc.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos.add(int(tokenizer.eos_token_id))
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Condition()
        self.draining = False
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="constellation-engine", daemon=True)
        self._batch: tuple | None = None  # (row weight ids, weights, composed blocks, shared?)
        self.steps = 0  # decode steps run
        self.mixed_steps = 0  # of which through the mix kernel (rows with different compositions)

    # ---- public API (any thread) -------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.lock:
            if self.draining:
                raise Draining()
            if len(self.waiting) >= self.limits.max_waiting:
                raise QueueFull()
            if self.rows_needed(req) > self.cache.slots:
                raise ValueError(f"this request needs {self.rows_needed(req)} batch rows (n x components); "
                                 f"the server runs at most {self.cache.slots}")
            self.waiting.append(req)
            self._gauges()
            self.lock.notify()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result (blocking)."""
        done = threading.Event()
        box: dict = {}

        def job():
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                box["error"] = e
            done.set()

        self.jobs.put(job)
        with self.lock:
            self.lock.notify()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def drain(self) -> None:
        with self.lock:
            self.draining = True
            self.lock.notify()

    def idle(self) -> bool:
        with self.lock:
            return not self.waiting and not self.running

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify()
        self.thread.join(timeout=10)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.stopped and not self.waiting and not self.running and self.jobs.empty():
                    self.lock.wait()
                if self.stopped:
                    return
            try:
                self._run_jobs()
                self._reap_cancelled()
                self._admit()
                if self.running:
                    self._decode()
            except Exception as e:  # a step failed: fail the running requests, keep serving
                log.exception("engine step failed")
                for seq in list(self.running):
                    self._finish(seq, None, error=f"internal error: {type(e).__name__}: {e}")
            self._gauges()

    def _run_jobs(self) -> None:
        while not self.jobs.empty():
            self.jobs.get_nowait()()

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.running.set(len(self.running))
            self.metrics.waiting.set(len(self.waiting))

    def _reap_cancelled(self) -> None:
        for seq in list(self.running):
            if seq.request.cancelled.is_set():
                self._finish(seq, "cancelled", notify=False)

    # ---- admission and prefill -----------------------------------------------------------------
    def rows_needed(self, req: Request) -> int:
        """Batch rows (KV slots) a request occupies while it runs."""
        mode = req.composition.mode or self.c.settings.default_mode
        per = 1 + (req.composition.top_k or self.c.settings.top_k) if mode == "logit" else 1
        return per * req.n

    def _admit(self) -> None:
        while True:
            with self.lock:
                if not self.waiting:
                    return
                req = self.waiting[0]
                if req.cancelled.is_set():
                    self.waiting.popleft()
                    continue
                if self.cache.used + self.rows_needed(req) > self.cache.slots:
                    return
                self.waiting.popleft()
            used_before = self.cache.used
            try:
                self._prefill(req)
            except Exception as e:
                log.exception("prefill failed")
                for seq in [s for s in self.running if s.request is req]:
                    self.running.remove(seq)
                self.cache.used = used_before  # its slots were the top ones
                for i in range(req.n):
                    req.emit(Event(i, finish_reason="error", error=f"{type(e).__name__}: {e}"))

    def plan_for(self, gp: GeneralistPass, params: CompositionParams) -> Plan:
        """The plan (and its timing metrics) for a prompt: the one place generation and /explain use."""
        plan = self.c.plan(gp, 0, params)
        if self.metrics:
            self.metrics.observe_plan(plan, self.c.domains, gp.timings)
        return plan

    @torch.inference_mode()
    def _prefill(self, req: Request) -> None:
        c, g = self.c, self.g
        t0 = time.perf_counter()
        req.started = t0
        if self.metrics:
            self.metrics.queue_time.observe(t0 - req.arrival)
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=g.device)
        am = torch.ones_like(ids)
        slot = self.cache.alloc()
        fmask = None if req.fingerprint_mask is None else torch.tensor([req.fingerprint_mask], device=g.device)
        mode = c.validate(req.composition)
        # a mode whose first row is G itself keeps every layer's keys/values from this one pass
        gp = c.generalist_pass(ids, am, cache=PrefillView(self.cache, slot), fingerprint_mask=fmask,
                               signatures=mode.uses_signatures, cache_all=mode.generalist_only)
        plan = self.plan_for(gp, req.composition)
        req.plan = plan
        T = ids.shape[1]
        if plan.kind == "logit":
            n_dom = len(c.domains)
            comps = [(None, _one_hot(n_dom, c.d, None))] + [
                (beta, _one_hot(n_dom, c.d, i)) for i, beta in plan.betas.items()]
        else:
            comps = [(None, plan.source_weights)]
        t1 = time.perf_counter()
        base_rows: list[Row] = []
        logps = []
        for j, (beta, w) in enumerate(comps):
            s = slot if j == 0 else self.cache.alloc()
            if j:
                self.cache.copy(slot, s, T, range(c.first))
            if j == 0 and mode.generalist_only:  # G's own row: the generalist pass already ran it
                logits = g.logits(gp.final[:, -1:])[0, -1].float().cpu()
            else:
                x = g.run_blocks(gp.trunk, gp.ctx.with_cache(PrefillView(self.cache, s)), c.first, c.n,
                                 c.materialized_for(w, cache=True))
                logits = g.logits(g.final_norm(x[:, -1:]))[0, -1].float().cpu()
            base_rows.append(Row(s, w, T, beta))
            logps.append(logits)
        if self.metrics:
            self.metrics.compose_time(time.perf_counter() - t1)
        seqs = []
        for i in range(req.n):  # fork every choice before any can finish and free its slots
            rows = base_rows if i == 0 else [self._fork(r, T) for r in base_rows]
            gen = None
            if req.params.seed is not None:
                gen = torch.Generator().manual_seed(int(req.params.seed) + i)
            seqs.append(Sequence(req, i, rows, plan.kind == "logit", gen, self.eos))
        self.running.extend(seqs)
        for seq in seqs:
            self._sample_and_emit(seq, [lp.clone() for lp in logps])
        if self.metrics:
            self.metrics.prompt_tokens.inc(T * req.n)
            self.metrics.requests_mode.labels(plan.mode).inc()

    def _fork(self, row: Row, length: int) -> Row:
        s = self.cache.alloc()
        self.cache.copy(row.slot, s, length)
        return Row(s, row.weights, length, row.beta)

    # ---- decoding ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _decode(self) -> None:
        g = self.g
        rows = sorted((r for s in self.running for r in s.rows), key=lambda r: r.slot)
        B = len(rows)
        assert [r.slot for r in rows] == list(range(B)), "slot cache not compact"
        owner = {id(r): s for s in self.running for r in s.rows}
        tokens = torch.tensor([[owner[id(r)].tokens[-1]] for r in rows], dtype=torch.long, device=g.device)
        lengths = torch.tensor([r.length for r in rows], dtype=torch.long, device=g.device)
        span = int(lengths.max()) + 1
        positions = lengths[:, None]
        mask = (torch.arange(span, device=g.device)[None, :] <= lengths[:, None])[:, None, None, :]
        ctx = g.positional_context(positions, mask, DecodeView(self.cache, lengths, span))
        override, same = self._override(rows)
        self.mixed_steps += 0 if same else 1
        x = g.run_blocks(g.embed(tokens, ctx), ctx, 0, g.mc.n_layers, override)
        logits = g.logits(g.final_norm(x))[:, 0].float().cpu()  # sampling runs on the CPU (seeded generators)
        if self.metrics:
            self.metrics.batch_size.observe(B)
        self.steps += 1
        by_row = {id(r): logits[k] for k, r in enumerate(rows)}
        for r in rows:
            r.length += 1
        for seq in list(self.running):
            if seq.finished:
                continue
            self._sample_and_emit(seq, [by_row[id(r)] for r in seq.rows])

    def _override(self, rows: list[Row]) -> tuple[dict, bool]:
        """The composed blocks for this batch: materialized when every row shares one composition,
        mixed per row otherwise. Kept while the batch's rows (their weight tensors) stay the same."""
        key = tuple(id(r.weights) for r in rows)
        if self._batch is not None and self._batch[0] == key:
            return self._batch[2], self._batch[3]
        ws = [r.weights for r in rows]
        same = all(torch.equal(w, ws[0]) for w in ws[1:])
        override = self.c.materialized_for(ws[0], cache=True) if same else self.c.mixed_weights(stack_rows(ws))
        self._batch = (key, ws, override, same)  # ws keeps the tensors (and so their ids) alive
        return override, same

    def _sample_and_emit(self, seq: Sequence, logits: list[torch.Tensor]) -> None:
        p = seq.request.params
        if seq.logit_mode:
            base = F.log_softmax(logits[0], -1)
            mix = base.clone()
            for r, lg in zip(seq.rows[1:], logits[1:]):
                mix += r.beta * (F.log_softmax(lg, -1) - base)
            logp = F.log_softmax(mix, -1)
        else:
            logp = F.log_softmax(logits[0], -1)
        scores = logp.clone()
        if p.ignore_eos or len(seq.tokens) < p.min_tokens:
            for e in seq.eos:
                if e < scores.shape[0]:
                    scores[e] = float("-inf")
        if p.temperature == 0:
            token = int(torch.argmax(scores))
        else:
            probs = torch.softmax(scores / p.temperature, -1)
            if p.top_p < 1.0:
                sp, si = torch.sort(probs, descending=True)
                keep = torch.cumsum(sp, 0) - sp < p.top_p
                keep[0] = True
                probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
                probs = probs / probs.sum()
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        now = time.perf_counter()
        m = self.metrics
        if m:
            if not seq.tokens:
                m.ttft.observe(now - seq.request.arrival)
            else:
                m.itl.observe(now - seq.last_token_at)
            m.generation_tokens.inc()
        seq.last_token_at = now
        seq.tokens.append(token)
        lp_entry = None
        if p.logprobs is not None:
            lp_entry = {"token_id": token, "logprob": float(logp[token]), "top": []}
            if p.logprobs > 0:
                top = torch.topk(logp, p.logprobs)
                lp_entry["top"] = [(int(i), float(v)) for v, i in zip(top.values, top.indices)]
        finish = None
        eos_hit = token in seq.eos and not p.ignore_eos  # (masked above while below min_tokens)
        if eos_hit:
            finish = "stop"
            seq.tokens.pop()  # the EOS token is not part of the output
            lp_entry = None
        elif len(seq.tokens) >= p.max_tokens:
            finish = "length"
        max_len = min(self.limits.max_seq_len - 1, self.g.mc.max_positions - 1)
        if finish is None and seq.rows[0].length + 1 >= max_len:
            finish = "length"
        text = self.tok.decode(seq.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") and finish is None:  # an incomplete UTF-8 character: wait
            seq.request.emit(Event(seq.index, "", [token], [lp_entry] if lp_entry else []))
            return
        cut = None
        if p.stop:
            start = max(0, seq.emitted - max(len(s) for s in p.stop))
            hits = [i for i in (text.find(s, start) for s in p.stop) if i != -1]
            if hits:
                cut = min(hits)
                finish = "stop"
        if cut is not None:
            text = text[:cut]
        hold = 0
        if finish is None and p.stop:  # keep back a possible stop-string prefix
            for s in p.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
        upto = max(seq.emitted, len(text) - hold)
        delta = text[seq.emitted:upto]
        seq.emitted = upto
        ids = [] if eos_hit else [token]
        seq.request.emit(Event(seq.index, delta, ids, [lp_entry] if lp_entry else []))
        if finish:
            self._finish(seq, finish)

    def _finish(self, seq: Sequence, reason: str | None, error: str | None = None, notify: bool = True) -> None:
        if seq.finished:
            return
        seq.finished = True
        self.running.remove(seq)
        self._release(seq.rows)
        if notify:
            seq.request.emit(Event(seq.index, "", finish_reason=reason if error is None else "error", error=error))
        if self.metrics and reason and error is None:
            self.metrics.success.labels(reason).inc()
            self.metrics.e2e.observe(time.perf_counter() - seq.request.arrival)

    def _release(self, rows: list[Row]) -> None:
        """Free the rows' slots, highest first; the last used slot moves into each hole."""
        for r in sorted(rows, key=lambda r: -r.slot):
            last = self.cache.used - 1
            if r.slot != last:
                mover = next(o for s in self.running for o in s.rows if o.slot == last)
                self.cache.copy(last, r.slot, mover.length)
                mover.slot = r.slot
            self.cache.used -= 1


def _one_hot(n_domains: int, d: int, index: int | None) -> torch.Tensor:
    w = torch.zeros(1 + n_domains, d)
    w[0 if index is None else 1 + index] = 1.0
    return w
