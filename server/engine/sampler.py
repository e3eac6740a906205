"""Sampling: next-token log-probabilities (mixed across rows in ``logit`` mode), EOS masking,
temperature and top-p, seeded generators, and the logprobs a request asked for."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import SamplingParams


def next_token_logprobs(logits: list[torch.Tensor], betas: list[float | None]) -> torch.Tensor:
    """One row: ``log_softmax(logits[0])``. Logit mode (1 + K rows): G's log-probabilities plus
    ``Σ β_i (log p_i − log p_G)``, renormalised."""
    base = F.log_softmax(logits[0].float(), -1)
    if len(logits) == 1:
        return base
    mix = base.clone()
    for beta, lg in zip(betas[1:], logits[1:]):
        mix += beta * (F.log_softmax(lg.float(), -1) - base)
    return F.log_softmax(mix, -1)


def sample(logp: torch.Tensor, p: SamplingParams, eos: set[int], n_generated: int,
           generator: torch.Generator | None) -> int:
    """Pick the next token from ``logp`` [V] under ``p`` (EOS masked while below ``min_tokens`` or
    with ``ignore_eos``)."""
    scores = logp
    if p.ignore_eos or n_generated < p.min_tokens:
        scores = logp.clone()
        for e in eos:
            if e < scores.shape[0]:
                scores[e] = float("-inf")
    if p.temperature == 0:
        return int(torch.argmax(scores))
    probs = torch.softmax(scores / p.temperature, -1)
    if p.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < p.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def logprob_entry(logp: torch.Tensor, token: int, top: int | None) -> dict | None:
    """The chosen token's log-probability and the ``top`` most likely alternatives (None: not asked)."""
    if top is None:
        return None
    entry = {"token_id": token, "logprob": float(logp[token]), "top": []}
    if top > 0:
        t = torch.topk(logp, top)
        entry["top"] = [(int(i), float(v)) for v, i in zip(t.values, t.indices)]
    return entry
