"""Sampling for a whole step at once: every sequence's next token from the rows' logits in one pass.

``mix``: each sequence's log-probabilities from its rows: the base row's ``log_softmax``, plus, where
a mode mixes several models (its rows carry weights ``beta``), ``sum_i beta_i (log p_i - log p_base)``
renormalised (the decode-time composition of seed 003). The rows' layout is data from the plan
(``Batch``), not a branch on the mode.

``sample``: OpenAI's adjustments on a copy (``logit_bias``; frequency and presence penalties over the
tokens generated so far, as vLLM), EOS masked below ``min_tokens`` or with ``ignore_eos`` (not in a
row under a grammar: the grammar says when it ends), the grammar's token mask (``grammar``), then greedy
rows take the argmax and the others draw from ``softmax(scores / temperature)`` cut to ``top_k`` and
``top_p`` (a batched sort, only for the rows that cut), by inverse CDF with one uniform number per
row (from the sequence's own generator when the request has a seed). The reported log-probabilities
are the model's, before the adjustments (vLLM's default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import grammar


@dataclass
class Batch:
    """Which rows make each sequence: ``base`` [S] row index; ``comps`` [S][...] (row, beta) pairs."""

    base: list[int]
    comps: list[list[tuple[int, float]]]

    @staticmethod
    def of(row_betas: list[list[float | None]]) -> "Batch":
        """From each sequence's rows' betas, rows numbered consecutively in that order."""
        base, comps, r = [], [], 0
        for betas in row_betas:
            base.append(r)
            comps.append([(r + j, b) for j, b in enumerate(betas) if b is not None])
            r += len(betas)
        return Batch(base, comps)


def mix(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Next-token log-probabilities ``[S, V]`` (fp32) of each sequence from the rows' logits ``[R, V]``."""
    lp = F.log_softmax(logits.float(), -1)
    S = len(batch.base)
    if S == lp.shape[0] and not any(batch.comps) and batch.base == list(range(S)):
        return lp  # one row per sequence, in order
    base = lp.index_select(0, torch.tensor(batch.base, device=lp.device))
    C = max(len(c) for c in batch.comps)
    if C == 0:
        return base
    mixed = [s for s in range(S) if batch.comps[s]]
    out = base.clone()
    sub = base[mixed]
    acc = sub.clone()
    for c in range(C):  # sum_i beta_i (log p_i - log p_base), one component at a time (as a single row)
        rows = [batch.comps[s][c][0] if c < len(batch.comps[s]) else batch.base[s] for s in mixed]
        beta = torch.tensor([batch.comps[s][c][1] if c < len(batch.comps[s]) else 0.0 for s in mixed],
                            device=lp.device)
        acc += beta[:, None] * (lp[rows] - sub)
    out[mixed] = F.log_softmax(acc, -1)
    return out


def _adjust(scores: torch.Tensor, seqs: list) -> torch.Tensor:
    """``logit_bias``, penalties and EOS masks applied to ``scores`` [S, V] (a copy when any applies)."""
    V = scores.shape[1]
    bias_idx, bias_val, pen = [[], []], [], []
    eos_rows, eos_ids = [], []
    for s, seq in enumerate(seqs):
        p = seq.request.params
        for t, b in p.logit_bias.items():
            bias_idx[0].append(s), bias_idx[1].append(t), bias_val.append(b)
        if seq.tokens and (p.presence_penalty or p.frequency_penalty):
            pen.append(s)
        if (p.ignore_eos or len(seq.tokens) < p.min_tokens) and getattr(seq, "matcher", None) is None:
            for e in seq.eos:
                if e < V:
                    eos_rows.append(s), eos_ids.append(e)
    if not (bias_val or pen or eos_rows):
        return scores
    scores = scores.clone()
    dev = scores.device
    if bias_val:
        scores.index_put_((torch.tensor(bias_idx[0], device=dev), torch.tensor(bias_idx[1], device=dev)),
                          torch.tensor(bias_val, dtype=scores.dtype, device=dev), accumulate=True)
    if pen:
        counts = torch.zeros(len(pen), V, dtype=scores.dtype, device=dev)
        for j, s in enumerate(pen):
            counts[j].index_add_(0, torch.tensor(seqs[s].tokens, dtype=torch.long, device=dev),
                                 torch.ones(len(seqs[s].tokens), dtype=scores.dtype, device=dev))
        fp = torch.tensor([seqs[s].request.params.frequency_penalty for s in pen], device=dev)[:, None]
        pp = torch.tensor([seqs[s].request.params.presence_penalty for s in pen], device=dev)[:, None]
        idx = torch.tensor(pen, device=dev)
        scores[idx] = scores[idx] - (counts * fp + (counts > 0).to(scores.dtype) * pp)
    if eos_rows:
        scores[torch.tensor(eos_rows, device=dev), torch.tensor(eos_ids, device=dev)] = float("-inf")
    return scores


def sample(logp: torch.Tensor, seqs: list) -> list[int]:
    """Each sequence's next token from ``logp`` [S, V] under its request's sampling parameters;
    ``seqs[s]``: ``.request.params``, ``.tokens`` (generated so far), ``.eos``, ``.generator``."""
    scores = _adjust(logp, seqs)
    scores = grammar.apply(scores, grammar.masks([getattr(s, "matcher", None) for s in seqs], scores.shape[1]))
    out = scores.argmax(-1)
    drawn = [s for s, seq in enumerate(seqs) if seq.request.params.temperature != 0]
    if drawn:
        idx = torch.tensor(drawn, device=scores.device)
        temp = torch.tensor([seqs[s].request.params.temperature for s in drawn], device=scores.device)
        probs = torch.softmax(scores[idx] / temp[:, None], -1)
        u = torch.cat([torch.rand(1, generator=seqs[s].generator) if seqs[s].generator is not None
                       else torch.rand(1) for s in drawn]).to(scores.device)
        out[idx] = _draw(probs, u, [seqs[s].request.params for s in drawn])
    return out.tolist()


def _draw(probs: torch.Tensor, u: torch.Tensor, params: list) -> torch.Tensor:
    """Inverse-CDF draws, one per row, after the rows' top-k / top-p cuts."""
    cut = [j for j, p in enumerate(params) if p.top_p < 1.0 or p.top_k > 0]
    tokens = _inverse_cdf(probs, u)
    if cut:
        idx = torch.tensor(cut, device=probs.device)
        sp, si = torch.sort(probs[idx], descending=True, stable=True)
        top_p = torch.tensor([params[j].top_p for j in cut], device=probs.device)[:, None]
        top_k = torch.tensor([params[j].top_k or sp.shape[1] for j in cut], device=probs.device)[:, None]
        rank = torch.arange(sp.shape[1], device=probs.device)[None, :]
        keep = ((torch.cumsum(sp, -1) - sp) < top_p) & (rank < top_k)
        keep[:, 0] = True
        tokens[idx] = si.gather(1, _inverse_cdf(sp * keep, u[idx])[:, None])[:, 0]
    return tokens


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cdf = torch.cumsum(probs, -1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return pick.clamp_(max=probs.shape[1] - 1)


def logprob_entries(logp: torch.Tensor, tokens: list[int], tops: list[int | None]) -> tuple[list[float], list]:
    """The chosen tokens' log-probabilities and, per sequence that asked (``tops[s]`` = k), an entry
    ``{"token_id", "logprob", "top": [(id, logprob) * k]}`` (None where not asked)."""
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    k = max((t for t in tops if t), default=0)
    top = torch.topk(logp, k, -1) if k else None
    ids, vals = (top.indices.tolist(), top.values.tolist()) if top is not None else (None, None)
    entries = []
    for s, t in enumerate(tops):
        if t is None:
            entries.append(None)
            continue
        entries.append({"token_id": tokens[s], "logprob": chosen[s],
                        "top": list(zip(ids[s][:t], vals[s][:t])) if t else []})
    return chosen, entries
