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


def adjusted(logp: torch.Tensor, p: SamplingParams, generated: list[int]) -> torch.Tensor:
    """OpenAI's adjustments: ``logit_bias`` added, and for each token generated ``c`` times so far,
    ``c * frequency_penalty + (c > 0) * presence_penalty`` subtracted (as vLLM: over the output
    tokens, not the prompt). The logprobs a request reports stay the model's (before these)."""
    scores = logp.clone()
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=scores.device)
        scores[ids] += torch.tensor(list(p.logit_bias.values()), dtype=scores.dtype, device=scores.device)
    if generated and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long, device=scores.device),
                                minlength=scores.shape[0])[:scores.shape[0]].to(scores.dtype)
        scores -= counts * p.frequency_penalty + (counts > 0).to(scores.dtype) * p.presence_penalty
    return scores


def sample(logp: torch.Tensor, p: SamplingParams, eos: set[int], generated: list[int],
           generator: torch.Generator | None) -> int:
    """Pick the next token from ``logp`` [V] under ``p`` (EOS masked while below ``min_tokens`` or
    with ``ignore_eos``); ``generated``: the tokens so far."""
    scores = adjusted(logp, p, generated) if p.adjusts_scores else logp
    if p.ignore_eos or len(generated) < p.min_tokens:
        scores = scores.clone() if scores is logp else scores
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


def logprob_entry(logp: torch.Tensor, token: int, top: int | None, value: float) -> dict | None:
    """The chosen token's log-probability ``value`` and the ``top`` most likely alternatives (None:
    not asked)."""
    if top is None:
        return None
    entry = {"token_id": token, "logprob": value, "top": []}
    if top > 0:
        t = torch.topk(logp, top)
        entry["top"] = [(int(i), float(v)) for v, i in zip(t.values, t.indices)]
    return entry
