"""The model runner: prefill chunks and decode steps on the constellation's tensors.

Prefill of a request runs in two phases, each in chunks the scheduler sizes:

1. *generalist*: G's forward over the prompt (chunks of several requests padded into one batch).
   It writes the trunk's keys/values into the request's first slot, keeps the hidden state
   entering the first composed block, sums the fingerprint, and records what the in-pass
   signatures need. G's own keys/values of the composed blocks go to a scratch store (they are
   not the composed model's), except in modes where G itself is what runs (``generalist_only``).
2. *signatures*: once the whole prompt is in, the plan is made (fingerprint → alpha → weights). If
   the mode asks for in-pass (``generalist``) signatures, each requested specialist's is summed
   over the recorded chunks, a few chunks per step, so a long prompt's planning does not stall
   the decoding streams in one step.
3. *tail*: for each component row (one, or 1 + K in ``logit`` mode) the composed blocks run over
   the kept trunk state, chunk by chunk, into that row's slot.

Decode steps run every decoding row in one batch: materialized blocks when all rows share one
composition, the mix kernel otherwise (composer.kernels; both exact).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from composer import decompose
from composer.constellation import Constellation, GeneralistPass
from composer.kernels import stack_rows
from composer.modes import Plan
from composer.signatures import in_pass_signatures, specialist_abs_sum
from .kv_cache import ChunkView, DecodeView, ScratchStore, SlotCache, SlotStore
from .types import NeedSignature, PlanSummary, Request, Row, SignatureWork, PendingSignatures


@dataclass
class PrefillJob:
    request: Request
    rows: list[Row]  # staged slots: components x choices (row 0 receives the generalist pass)
    mode: object  # composer.modes.Mode
    ids: torch.Tensor  # [T]
    fmask: torch.Tensor  # [T]: tokens the fingerprint averages over
    store: object  # where the generalist pass writes keys/values
    done: int = 0  # prompt tokens through the generalist pass
    trunk: list[torch.Tensor] = field(default_factory=list)  # [1, t, d] chunks entering the first composed block
    records: list[list] = field(default_factory=list)  # per chunk: in-pass signature record blocks
    fp_sum: torch.Tensor | None = None
    fp_n: float = 0.0
    last_hidden: torch.Tensor | None = None  # G's final-normed hidden state of the last prompt token
    seconds: float = 0.0  # time spent in the generalist pass
    gp: GeneralistPass | None = None  # once the whole prompt is through G
    sig: SignatureWork | None = None  # an in-pass signature being computed
    comps: list[tuple[float | None, torch.Tensor]] = field(default_factory=list)
    comp: int = 0  # component whose tail is running
    tail_done: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)  # last-token logits per component

    @property
    def T(self) -> int:
        return int(self.ids.shape[0])

    @property
    def phase(self) -> str:
        if self.done < self.T:
            return "generalist"
        if self.sig is not None:
            return "signatures"
        return "tail" if self.comp < len(self.comps) else "done"


class ModelRunner:
    def __init__(self, constellation: Constellation, cache: SlotCache, plan_for: Callable[[GeneralistPass, object], Plan]):
        self.c, self.g, self.cache = constellation, constellation.g, cache
        self.plan_for = plan_for
        self.tail_fraction = (self.c.n - self.c.first) / self.c.n  # cost of a tail token vs a full one
        self.g_seconds_per_token: float | None = None  # measured: generalist chunks ...
        self.sig_seconds_per_token: float | None = None  # ... and signature chunks
        self._batch: tuple | None = None  # (row weight ids, weights, composed blocks, shared?)

    # ---- prefill ---------------------------------------------------------------------------------
    def start(self, req: Request, rows: list[Row]) -> PrefillJob:
        c, g = self.c, self.g
        mode = c.validate(req.composition)
        ids = torch.tensor(req.prompt_ids, dtype=torch.long, device=g.device)
        fmask = torch.ones_like(ids) if req.fingerprint_mask is None else torch.tensor(
            req.fingerprint_mask, dtype=torch.long, device=g.device)
        store = SlotStore(self.cache, rows[0])
        if not mode.generalist_only and c.first < c.n:
            mc = g.mc
            store = ScratchStore(store, range(c.first, c.n), mc.n_kv_heads, ids.shape[0], mc.head_dim,
                                 g.dtype, g.device)
        return PrefillJob(req, rows, mode, ids, fmask, store)

    @property
    def signature_fraction(self) -> float:
        """Cost of one prompt token of one specialist's signature vs one token through G (measured;
        0.05 until both have been)."""
        if self.g_seconds_per_token and self.sig_seconds_per_token:
            return self.sig_seconds_per_token / self.g_seconds_per_token
        return 0.05

    def remaining_cost(self, job: PrefillJob) -> float:
        """What is left of ``job``'s prefill, in tokens-through-G (the scheduler's budget unit)."""
        if job.phase == "generalist":
            return job.T - job.done
        if job.phase == "signatures":
            return (job.T - job.sig.pos) * self.signature_fraction
        if job.phase != "tail":
            return 0.0
        return ((len(job.comps) - job.comp) * job.T - job.tail_done) * self.tail_fraction

    @torch.inference_mode()
    def generalist_chunk(self, batch: list[tuple[PrefillJob, int]]) -> None:
        """The next ``n`` prompt tokens of each job through G, all jobs in one padded batch."""
        c, g = self.c, self.g
        t0 = time.perf_counter()
        Tc = max(n for _, n in batch)
        ids = torch.zeros((len(batch), Tc), dtype=torch.long, device=g.device)
        fm = torch.zeros((len(batch), Tc), dtype=torch.long, device=g.device)
        for b, (job, n) in enumerate(batch):
            ids[b, :n] = job.ids[job.done:job.done + n]
            fm[b, :n] = job.fmask[job.done:job.done + n]
        view = ChunkView([job.store for job, _ in batch], [job.done for job, _ in batch], [n for _, n in batch])
        ctx = view.context(g, g.device)
        x = g.run_blocks(g.embed(ids, ctx), ctx, 0, c.first)
        trunk = x
        rec = None
        if c.settings.signature == "generalist" and any(job.mode.uses_signatures for job, _ in batch):
            x, rec = in_pass_signatures(c, x, ctx, fm)
        else:
            x = g.run_blocks(x, ctx, c.first, c.n)
        final = g.final_norm(x)
        for b, (job, n) in enumerate(batch):
            job.trunk.append(trunk[b:b + 1, :n])
            if rec is not None and job.mode.uses_signatures:
                job.records.append([(h[b:b + 1, :n], [(nm, bias, xin[b:b + 1, :n]) for nm, bias, xin in seen])
                                    for h, seen in rec.blocks])
            m = fm[b, :n].to(torch.float32)
            s = (final[b, :n].float() * m[:, None]).sum(0)
            job.fp_sum = s if job.fp_sum is None else job.fp_sum + s
            job.fp_n += float(m.sum())
            job.last_hidden = final[b:b + 1, n - 1:n]
            job.done += n
            job.rows[0].length = job.done
        elapsed = time.perf_counter() - t0
        self.g_seconds_per_token = elapsed / sum(n for _, n in batch)
        share = elapsed / len(batch)
        for job, _ in batch:
            job.seconds += share
            if job.done == job.T:
                self._fingerprinted(job)

    def _fingerprinted(self, job: PrefillJob) -> None:
        """The whole prompt is through G: its generalist pass (fingerprint, alpha), then the plan."""
        c, g = self.c, self.g
        fp = (job.fp_sum / max(job.fp_n, 1.0))[None]
        am = torch.ones((1, job.T), dtype=torch.long, device=g.device)
        # the whole prompt's context only serves the signatures that rerun blocks (trunk, full)
        ctx = None if c.settings.signature == "generalist" else g.context(am)
        job.gp = GeneralistPass(job.ids[None], am, ctx, torch.cat(job.trunk, 1), job.last_hidden, fp,
                                decompose.alpha(fp.cpu(), c.basis), job.fmask[None],
                                record=PendingSignatures() if job.records else None)
        job.gp.timings["fingerprint"] = job.seconds
        job.trunk = [job.gp.trunk]
        self._try_plan(job)

    def _try_plan(self, job: PrefillJob) -> None:
        """Plan, unless the mode asks for an in-pass signature not computed yet: then that one is
        computed first, a few record chunks per step (``signature_chunks``), and planning resumes."""
        try:
            plan = self.plan_for(job.gp, job.request.composition)
        except NeedSignature as need:
            job.sig = SignatureWork(need.k)
            return
        job.records = []
        job.request.plan, job.request.summary = plan, PlanSummary.of(plan, self.c.domains)
        c, g = self.c, self.g
        if plan.kind == "logit":
            comps = [(None, _one_hot(len(c.domains), c.d, None))] + [
                (beta, _one_hot(len(c.domains), c.d, i)) for i, beta in plan.betas.items()]
        else:
            comps = [(None, plan.source_weights)]
        job.comps = comps
        for j, (beta, w) in enumerate(comps):
            job.rows[j].weights, job.rows[j].beta = w, beta
        if job.mode.generalist_only:  # G's own row: the generalist pass already ran it
            job.logits.append(g.logits(job.last_hidden)[0, -1].float().cpu())
            job.comp = 1

    def spend(self, job: PrefillJob, share: float) -> float:
        """Run ``job``'s signature or tail chunks worth about ``share`` tokens-through-G; the cost spent."""
        if job.phase == "signatures":
            frac = self.signature_fraction
            return self.signature_chunks(job, max(1, round(share / frac))) * frac
        frac, spent = self.tail_fraction, 0.0
        while job.phase == "tail" and share - spent >= frac / 2:
            n = max(1, min(job.T - job.tail_done, round((share - spent) / frac)))
            self.tail_chunk(job, n)
            spent += n * frac
        return spent

    @torch.inference_mode()
    def signature_chunks(self, job: PrefillJob, tokens: int) -> int:
        """The pending specialist's in-pass signature over the next record chunks, at least one and
        about ``tokens`` prompt tokens; returns the tokens covered."""
        w, t0, covered = job.sig, time.perf_counter(), 0
        while w.chunk < len(job.records) and (covered == 0 or covered < tokens):
            blocks = job.records[w.chunk]
            n = int(blocks[0][0].shape[1])
            total, count = specialist_abs_sum(self.c, blocks, job.fmask[None, w.pos:w.pos + n], w.k)
            w.total = total if w.total is None else w.total + total
            w.count = count if w.count is None else w.count + count
            w.chunk, w.pos, covered = w.chunk + 1, w.pos + n, covered + n
        seconds = time.perf_counter() - t0
        job.gp.timings["signature"] = job.gp.timings.get("signature", 0.0) + seconds
        self.sig_seconds_per_token = seconds / max(covered, 1)
        if w.chunk == len(job.records):
            job.gp._signatures[w.k] = w.total / w.count.clamp_min(1.0)[:, :, None]
            job.sig = None
            self._try_plan(job)
        return covered

    @torch.inference_mode()
    def tail_chunk(self, job: PrefillJob, n: int) -> None:
        """The next ``n`` prompt tokens of the current component through its composed blocks."""
        c, g = self.c, self.g
        row, (_, w) = job.rows[job.comp], job.comps[job.comp]
        if job.tail_done == 0:
            if job.comp > 0:
                self.cache.copy(job.rows[0].slot, row.slot, job.T, range(c.first))
            row.length = job.T
        s = job.tail_done
        n = min(n, job.T - s)
        view = ChunkView([SlotStore(self.cache, row)], [s], [n])
        ctx = view.context(g, g.device)
        x = g.run_blocks(job.trunk[0][:, s:s + n], ctx, c.first, c.n, c.materialized_for(w, cache=True))
        job.tail_done = s + n
        if job.tail_done == job.T:
            job.logits.append(g.logits(g.final_norm(x[:, -1:]))[0, -1].float().cpu())
            job.comp += 1
            job.tail_done = 0

    def finish(self, job: PrefillJob) -> list[list[Row]]:
        """Fork the components for every choice, promote the rows to decoding; rows per choice."""
        C, T = len(job.comps), job.T
        self.cache.release_all(job.rows[C * job.request.n:])
        per_choice = [job.rows[i * C:(i + 1) * C] for i in range(job.request.n)]
        for rows in per_choice[1:]:
            for base, r in zip(per_choice[0], rows):
                self.cache.copy(base.slot, r.slot, T)
                r.weights, r.beta, r.length = base.weights, base.beta, T
        for r in job.rows[:C * job.request.n]:
            r.length = T
            self.cache.promote(r)
        return per_choice

    # ---- decoding ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, rows: list[Row], last_tokens: list[int], weights: list[torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, bool]:
        """One step for rows in slots 0..B-1: next-token logits ``[B, V]`` (fp32, CPU) and whether
        every row shared one composition. ``weights``: the rows' source weights in this runner's
        constellation, when they differ from ``row.weights`` (rows of several catalogs, through a
        ``composer.union.Union``)."""
        g = self.g
        B = len(rows)
        assert [r.slot for r in rows] == list(range(B)), "slot cache not compact"
        tokens = torch.tensor(last_tokens, dtype=torch.long, device=g.device)[:, None]
        lengths = torch.tensor([r.length for r in rows], dtype=torch.long, device=g.device)
        span = int(lengths.max()) + 1
        mask = (torch.arange(span, device=g.device)[None, :] <= lengths[:, None])[:, None, None, :]
        ctx = g.positional_context(lengths[:, None], mask, DecodeView(self.cache, lengths, span))
        override, same = self._override(weights if weights is not None else [r.weights for r in rows])
        x = g.run_blocks(g.embed(tokens, ctx), ctx, 0, g.mc.n_layers, override)
        logits = g.logits(g.final_norm(x))[:, 0].float().cpu()  # sampling runs on the CPU (seeded generators)
        for r in rows:
            r.length += 1
        return logits, same

    def _override(self, ws: list[torch.Tensor]) -> tuple[dict, bool]:
        """The composed blocks for this batch: materialized when every row shares one composition,
        mixed per row otherwise. Kept while the batch's rows (their weight tensors) stay the same."""
        key = tuple(id(w) for w in ws)
        if self._batch is not None and self._batch[0] == key:
            return self._batch[2], self._batch[3]
        same = all(torch.equal(w, ws[0]) for w in ws[1:])
        override = self.c.materialized_for(ws[0], cache=True) if same else self.c.mixed_weights(stack_rows(ws))
        self._batch = (key, ws, override, same)  # ws keeps the tensors (and so their ids) alive
        return override, same


def _one_hot(n_domains: int, d: int, index: int | None) -> torch.Tensor:
    w = torch.zeros(1 + n_domains, d)
    w[0 if index is None else 1 + index] = 1.0
    return w
