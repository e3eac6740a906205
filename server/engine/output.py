"""Output processing: the sequences a finished prompt starts, and each step's sampled tokens as
events (vLLM's output processor). The part of ``Engine`` that samples, stops and emits; it owns
nothing of its own (``tok``, ``eos``, ``limits``, ``scheduler``, ``runner``, ``metrics`` are the
engine's)."""

from __future__ import annotations

import time

import torch

from . import grammar, sampler
from .detokenizer import Detokenizer
from .jobs import PrefillJob
from .types import Event, Sequence


class OutputProcessor:
    def _sequences(self, job: PrefillJob) -> list[Sequence]:
        """The sequences a finished prefill starts (none for a resumed one: it decodes on)."""
        req = job.request
        t0 = time.perf_counter()
        per_choice = self.runner.finish(job)
        if job.resume is not None:
            job.resume.rows = per_choice[0]
            self.scheduler.running.append(job.resume)
            return []
        seqs = []
        for i, rows in enumerate(per_choice):
            gen = None if req.params.seed is None else torch.Generator().manual_seed(int(req.params.seed) + i)
            g = req.params.grammar
            seqs.append(Sequence(req, i, rows, gen, self.eos, Detokenizer(self.tok, req.params.stop),
                                 catalog=job.c, order=self.scheduler.next_order(),
                                 matcher=g.matcher() if g is not None else None))
        self.scheduler.running.extend(seqs)
        if self.metrics:
            self.metrics.compose_time(time.perf_counter() - t0)
            self.metrics.prompt_tokens.inc(job.T * req.n)
            self.metrics.requests_mode.labels(req.plan.mode).inc()
        return seqs

    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor, row_betas: list) -> None:
        batch = sampler.Batch([rb[0][0] for rb in row_betas],
                              [[(k, b) for k, b in rb if b is not None] for rb in row_betas])
        logp = sampler.mix(logits, batch)
        tokens = sampler.sample(logp, seqs)
        chosen, entries = sampler.logprob_entries(logp, tokens, [s.request.params.logprobs for s in seqs])
        now = time.perf_counter()
        for seq, token, value, entry in zip(seqs, tokens, chosen, entries):
            self._emit(seq, token, value, entry, now)

    def _emit(self, seq: Sequence, token: int, value: float, entry: dict | None, now: float) -> None:
        p = seq.request.params
        if self.metrics:
            if seq.last_token_at:
                self.metrics.itl.observe(now - seq.last_token_at)
            else:
                self.metrics.ttft.observe(now - seq.request.arrival)
            self.metrics.generation_tokens.inc()
        seq.last_token_at = now
        # an EOS is a completion token (usage, logprobs, max_tokens), as at OpenAI and vLLM, but no text
        # (masked while below min_tokens; under a grammar, allowed only where the grammar may end)
        eos_hit = token in seq.eos and (not p.ignore_eos or seq.matcher is not None)
        done = seq.matcher is not None and grammar.advance(seq.matcher, token)
        seq.tokens.append(token)
        seq.cumulative_logprob += value
        finish = None
        if eos_hit or done:
            finish = "stop"
        elif len(seq.tokens) >= p.max_tokens:
            finish = "length"
        elif seq.length + 1 >= min(self.limits.max_seq_len - 1, self.g.mc.max_positions - 1):
            finish = "length"
        delta = seq.detok.add(None if eos_hit else token, final=finish is not None)
        if seq.detok.stopped:
            finish = "stop"
        seq.request.emit(Event(seq.index, delta, [token], [entry] if entry else []))
        if finish:
            self._finish(seq, finish)
