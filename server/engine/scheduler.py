"""The scheduler: which requests run, where their keys/values go, and what each step does.

``schedule()`` returns a ``StepPlan`` — rows to decode, prompts to admit and how much of each
prompt's prefill to run — and ``update_from_output`` folds the step's measurements back in (vLLM
v1's split: schedule → execute → update). The scheduler owns the waiting queue, the prefilling
jobs and the running sequences, and the cost model that sizes prefill work.

**Admission by memory.** A request is admitted when every row it needs (n choices x the rows its
mode runs per choice) gets a KV slot for its prompt in ``KVPool``, first come first served (a
request that does not fit blocks those behind it, so a large one is not starved), up to
``max_running`` rows. Rows grow into larger slots as they decode. When a row cannot grow, the
newest running sequence is *preempted*: its slots are freed and it goes back to the head of the
queue, to be recomputed (prompt + tokens so far, the same plan) when memory allows — vLLM's
recompute policy. A request whose prompt + ``max_tokens`` could never fit is refused at submission.

**Prefill budget.** While sequences decode, a step's prefill work is sized to take about as long
as one decode step (two exponential moving averages: seconds per decode step, prefill tokens per
second), so running streams keep their pace while a long prompt goes in by chunks; with nothing
decoding the budget is the maximum chunk. Work is counted in tokens-through-G: a generalist-pass
token is 1, a composed-tail token the composed share of the layers, a signature token its measured
cost relative to a G token.
"""

from __future__ import annotations

import math

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .kv_pool import KVPool, NoRoom
from .jobs import PrefillJob, tail_fraction
from .types import Limits, Request, Row, Sequence

EMA = 0.3  # weight of the newest measurement


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new


def split_budget(remaining: list[float], budget: float) -> list[float]:
    """Work each job (in order) gets from ``budget``: first come, first served; zeros at the end."""
    out = []
    for r in remaining:
        take = max(0, min(r, budget))
        out.append(take)
        budget -= take
    return out


@dataclass
class StepPlan:
    admitted: list[PrefillJob] = field(default_factory=list)  # jobs whose slots were staged this step
    prefill: list[tuple[PrefillJob, float]] = field(default_factory=list)  # (job, tokens-through-G)
    decode: list[Sequence] = field(default_factory=list)  # sequences decoding, in their rows' order
    rows: list[Row] = field(default_factory=list)  # their rows, in ``KVPool.decode_order``
    tokens: list[int] = field(default_factory=list)  # each row's input token
    preempted: list[Sequence] = field(default_factory=list)
    dropped: list[Request] = field(default_factory=list)  # cancelled while waiting

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.rows or self.preempted or self.dropped or self.admitted)


class Scheduler:
    def __init__(self, limits: Limits, pool: KVPool, rows_needed: Callable[[Request], int],
                 catalog: Callable[[], object]):
        self.limits, self.pool = limits, pool
        self.rows_needed = rows_needed
        self.catalog = catalog  # the catalog new requests are planned on
        self.waiting: deque[Request | Sequence] = deque()  # a Sequence: preempted, to resume
        self.prefilling: list[PrefillJob] = []
        self.running: list[Sequence] = []
        self.decode_s: float | None = None  # seconds per decode step
        self.prefill_rate: float | None = None  # prefilled tokens-through-G per second
        self.preemptions = 0
        self._order = 0
        self.signature_fraction: Callable[[], float] = lambda: 0.05  # the runner's measured ratios
        self.tail_fraction: Callable[[object], float] = tail_fraction

    # ---- queue -------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def abort(self, req: Request) -> tuple[list[Sequence], list[PrefillJob], bool]:
        """Remove ``req`` wherever it is: its running sequences and prefill jobs (to be finished by the
        caller) and whether it was still waiting."""
        seqs = [s for s in self.running if s.request is req]
        jobs = [j for j in self.prefilling if j.request is req]
        before = len(self.waiting)
        self.waiting = deque(w for w in self.waiting if (w if isinstance(w, Request) else w.request) is not req)
        return seqs, jobs, len(self.waiting) != before

    @property
    def rows_in_use(self) -> int:
        return sum(len(s.rows) for s in self.running) + sum(len(j.rows) for j in self.prefilling)

    # ---- planning ----------------------------------------------------------------------------------
    def schedule(self, admit: bool = True) -> StepPlan:
        """The next step: room for every decoding row's next token (preempting if memory runs out),
        admissions (unless ``admit`` is False: a catalog swap waits), and the prefill work."""
        plan = StepPlan()
        self._make_room(plan)
        if admit:
            self._admit(plan)
        plan.prefill = list(zip(self.prefilling, self.shares(self.budget(self._decode_first()))))
        by_row = {id(r): s for s in self.running for r in s.rows}
        plan.rows = self.pool.decode_order([r for s in self.running for r in s.rows])
        plan.tokens = [by_row[id(r)].tokens[-1] for r in plan.rows]
        plan.decode = list(self.running)
        return plan

    def _make_room(self, plan: StepPlan) -> None:
        """Every decoding row gets a slot holding its next position; the newest sequences give theirs up."""
        for seq in sorted(self.running, key=lambda s: s.order):
            if seq not in self.running:
                continue  # preempted below for an older one
            for row in seq.rows:
                while row.length + 1 > row.cap:
                    try:
                        self.pool.grow(row, row.length + 1)
                    except NoRoom:
                        victim = max(self.running, key=lambda s: s.order)
                        self._preempt(victim, plan)
                        if victim is seq:
                            break
                if seq not in self.running:
                    break

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.pool.release_all(seq.rows)
        seq.preempted += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    def _admit(self, plan: StepPlan) -> None:
        """Waiting requests (and preempted sequences, first) whose rows fit, in arrival order."""
        while self.waiting:
            item = self.waiting[0]
            if isinstance(item, Request) and item.cancelled.is_set():
                plan.dropped.append(self.waiting.popleft())
                continue
            if isinstance(item, Sequence):
                n_rows, T, req, c = len(item.rows), len(item.request.prompt_ids) + len(item.tokens) - 1, \
                    item.request, item.catalog
            else:
                n_rows, T, req, c = self.rows_needed(item), len(item.prompt_ids), item, self.catalog()
            if self.rows_in_use + n_rows > self.limits.max_running or not self.pool.fits([T + 1] * n_rows):
                break
            self.waiting.popleft()
            rows = [Row() for _ in range(n_rows)]
            for r in rows:
                self.pool.stage(r, T + 1)
            if isinstance(item, Sequence):
                job = PrefillJob(req, rows, c, req.prompt_ids + item.tokens[:-1], resume=item)
            else:
                job = PrefillJob(req, rows, c, list(req.prompt_ids))
            self.prefilling.append(job)
            plan.admitted.append(job)

    def next_order(self) -> int:
        self._order += 1
        return self._order

    def shares(self, budget: float) -> list[float]:
        """Each prefilling job's share of ``budget`` (tokens-through-G), first come first served,
        every phase of a job counted: the first prompts of a burst go through all their phases (G,
        signatures, tails) and give their first tokens in the first step, rather than every prompt's
        pass through G going first and all the first tokens coming together at the end. The runner
        carries a phase's unspent share into the next and batches each phase across the jobs. A job
        whose whole rest fits gets ``inf``: finished this step whatever the estimates' error (a crumb
        left for the next step would cost its first token a whole step)."""
        costs = [self.remaining_cost(j) for j in self.prefilling]
        return [math.inf if 0 < s >= c - 1e-9 else s for s, c in zip(split_budget(costs, budget), costs)]

    def remaining_cost(self, job: PrefillJob) -> float:
        """What is left of ``job``'s prefill, in tokens-through-G (the budget's unit), every phase counted."""
        return sum(self.phase_costs(job))

    def phase_costs(self, job: PrefillJob) -> tuple[float, float]:
        """(the rest of the phase ``job`` is in, the phases after it). Phases not reached yet are
        estimates: the in-pass signatures over the whole prompt (unless the job is known not to need
        them), a tail per component its rows allow."""
        phase = job.phase
        if phase == "generalist":
            return (job.T - job.done) * job.g_cost, self._signatures_cost(job, job.T) + self._tails_cost(job)
        if phase == "signatures":
            return (job.T - job.sig.pos) * self.signature_fraction(), self._tails_cost(job)
        if phase != "tail":
            return 0.0, 0.0
        return ((len(job.comps) - job.comp) * job.T - job.tail_done) * self.tail_fraction(job.c), 0.0

    def _signatures_cost(self, job: PrefillJob, tokens: int) -> float:
        mode = job.mode  # None until the runner has initialised the job: assume the signatures
        if job.resume is not None or job.c.settings.signature != "generalist" or (mode is not None and
                                                                                  not mode.uses_signatures):
            return 0.0
        return tokens * self.signature_fraction()

    def _tails_cost(self, job: PrefillJob) -> float:
        """The composed tails of a job not planned yet: a component per row of one choice, the first
        none where the mode's first row is G's own (the generalist pass wrote it)."""
        comps = len(job.rows) // (1 if job.resume is not None else max(1, job.request.n))
        if job.mode is not None and job.mode.generalist_only:
            comps -= 1
        return max(0, comps) * job.T * self.tail_fraction(job.c)

    def _decode_first(self) -> bool:
        """Whether decoding rows' pace bounds the step's prefill: not when more rows wait for their
        first token than decode (a burst of requests goes in at once, as with nothing decoding). Only
        rows that were decoding when the oldest waiting prompt arrived count: the first prompts of a
        burst, done early (``shares``), do not slow the rest of their own burst (a preempted sequence's
        recomputation is paced by every decoding row)."""
        oldest = min((j.request.arrival for j in self.prefilling if j.resume is None), default=math.inf)
        decoding = sum(len(s.rows) for s in self.running if s.since < oldest)
        return decoding > 0 and decoding >= sum(len(j.rows) for j in self.prefilling)

    def budget(self, decoding: bool) -> int:
        """Prompt tokens (through G) the next step may prefill."""
        lo, hi = self.limits.prefill_chunk_min, self.limits.prefill_chunk_max
        if not decoding:
            return hi
        if self.decode_s is None or self.prefill_rate is None:
            return lo
        return int(min(hi, max(lo, self.decode_s * self.prefill_rate)))

    # ---- results -----------------------------------------------------------------------------------
    def update_from_output(self, out) -> None:
        """Fold a step's measurements into the cost model and retire its finished prefill jobs."""
        if out.decode_seconds > 0:
            self.decode_s = _ema(self.decode_s, out.decode_seconds)
        if out.prefill_cost > 0 and out.prefill_seconds > 0:
            self.prefill_rate = _ema(self.prefill_rate, out.prefill_cost / out.prefill_seconds)
        for job in out.finished:
            if job in self.prefilling:
                self.prefilling.remove(job)

    def drop_job(self, job: PrefillJob) -> None:
        if job in self.prefilling:
            self.prefilling.remove(job)
        self.pool.release_all(job.rows)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.pool.release_all(seq.rows)
