"""The model runner: prefill chunks and decode steps on the constellation's tensors.

Prefill of a request runs in two phases, each in chunks the scheduler sizes:

1. *generalist*: G's forward over the prompt (chunks of several requests padded into one batch).
   It writes the trunk's keys/values into the request's first slot, keeps the hidden state
   entering the first composed block, sums the fingerprint, and records what the in-pass
   signatures need. G's own keys/values of the composed blocks go to a scratch store (they are
   not the composed model's), except in modes where G itself is what runs (``generalist_only``).
2. *tail*: once the whole prompt is in, the plan is made (fingerprint → alpha → weights), and for
   each component row (one, or 1 + K in ``logit`` mode) the composed blocks run over the kept
   trunk state, chunk by chunk, into that row's slot.

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
from composer.signatures import PassRecord, in_pass_signatures
from .kv_cache import ChunkView, DecodeView, ScratchStore, SlotCache, SlotStore
from .types import Request, Row


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
        return "tail" if self.comp < len(self.comps) else "done"


class ModelRunner:
    def __init__(self, constellation: Constellation, cache: SlotCache, plan_for: Callable[[GeneralistPass, object], Plan]):
        self.c, self.g, self.cache = constellation, constellation.g, cache
        self.plan_for = plan_for
        self.tail_fraction = (self.c.n - self.c.first) / self.c.n  # cost of a tail token vs a full one
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

    def remaining_cost(self, job: PrefillJob) -> float:
        if job.phase == "generalist":
            return job.T - job.done
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
        share = (time.perf_counter() - t0) / len(batch)
        for job, _ in batch:
            job.seconds += share
            if job.done == job.T:
                self._plan(job)

    def _plan(self, job: PrefillJob) -> None:
        c, g = self.c, self.g
        T = job.T
        fp = (job.fp_sum / max(job.fp_n, 1.0))[None]
        am = torch.ones((1, T), dtype=torch.long, device=g.device)
        record = None
        if job.records:
            record = PassRecord(c, job.fmask[None])
            record.blocks = [(torch.cat([ch[li][0] for ch in job.records], 1),
                              [(nm, bias, torch.cat([ch[li][1][wi][2] for ch in job.records], 1))
                               for wi, (nm, bias, _) in enumerate(job.records[0][li][1])])
                             for li in range(len(job.records[0]))]
        # the whole prompt's context only serves the signatures that rerun blocks (trunk, full)
        ctx = None if c.settings.signature == "generalist" else g.context(am)
        gp = GeneralistPass(job.ids[None], am, ctx, torch.cat(job.trunk, 1), job.last_hidden, fp,
                            decompose.alpha(fp.cpu(), c.basis), job.fmask[None], record=record)
        gp.timings["fingerprint"] = job.seconds
        job.request.plan = plan = self.plan_for(gp, job.request.composition)
        if plan.kind == "logit":
            comps = [(None, _one_hot(len(c.domains), c.d, None))] + [
                (beta, _one_hot(len(c.domains), c.d, i)) for i, beta in plan.betas.items()]
        else:
            comps = [(None, plan.source_weights)]
        job.comps, job.trunk, job.records = comps, [gp.trunk], []
        for j, (beta, w) in enumerate(comps):
            job.rows[j].weights, job.rows[j].beta = w, beta
        if job.mode.generalist_only:  # G's own row: the generalist pass already ran it
            job.logits.append(g.logits(job.last_hidden)[0, -1].float().cpu())
            job.comp = 1

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
    def decode(self, rows: list[Row], last_tokens: list[int]) -> tuple[torch.Tensor, bool]:
        """One step for rows in slots 0..B-1: next-token logits ``[B, V]`` (fp32, CPU) and whether
        every row shared one composition."""
        g = self.g
        B = len(rows)
        assert [r.slot for r in rows] == list(range(B)), "slot cache not compact"
        tokens = torch.tensor(last_tokens, dtype=torch.long, device=g.device)[:, None]
        lengths = torch.tensor([r.length for r in rows], dtype=torch.long, device=g.device)
        span = int(lengths.max()) + 1
        mask = (torch.arange(span, device=g.device)[None, :] <= lengths[:, None])[:, None, None, :]
        ctx = g.positional_context(lengths[:, None], mask, DecodeView(self.cache, lengths, span))
        override, same = self._override(rows)
        x = g.run_blocks(g.embed(tokens, ctx), ctx, 0, g.mc.n_layers, override)
        logits = g.logits(g.final_norm(x))[:, 0].float().cpu()  # sampling runs on the CPU (seeded generators)
        for r in rows:
            r.length += 1
        return logits, same

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


def _one_hot(n_domains: int, d: int, index: int | None) -> torch.Tensor:
    w = torch.zeros(1 + n_domains, d)
    w[0 if index is None else 1 + index] = 1.0
    return w
