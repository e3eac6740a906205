"""Evaluation building blocks, all through the composition code the server runs (DESIGN §6).

Loss of a text = mean next-token NLL over real tokens (no padding in inputs or labels).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from composer.modes import CompositionParams


def token_nll(logits: torch.Tensor, ids: torch.Tensor, am: torch.Tensor, log_probs: bool = False) -> torch.Tensor:
    """Mean next-token NLL per row over real tokens: ``[B]``."""
    lp = logits[:, :-1].float() if log_probs else F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:, None])[..., 0]
    m = (am[:, 1:] * am[:, :-1]).float()
    return (nll * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass
class ProbeResult:
    text: str
    alpha: list[float]
    losses: dict[str, float]  # variant name -> loss


def evaluate(loaded, texts: list[str], variants: dict[str, Callable[[int], CompositionParams]],
             batch_size: int = 8, desc: str = "evaluating", quiet: bool = False) -> list[ProbeResult]:
    """Loss of every text under every variant; ``variants[name](row_index)`` gives its composition.

    One generalist pass per batch serves every variant (fingerprint, alpha, trunk reuse).
    """
    from tqdm import tqdm

    c = loaded.constellation
    out: list[ProbeResult] = []
    with tqdm(total=len(texts), desc=desc, unit="probe", file=sys.stderr, disable=quiet) as bar:
        for s in range(0, len(texts), batch_size):
            chunk = texts[s:s + batch_size]
            ids, am = loaded.encode(chunk)
            gp = c.generalist_pass(ids, am)
            rows = [ProbeResult(t, [float(a) for a in gp.alpha[b]], {}) for b, t in enumerate(chunk)]
            for name, make in variants.items():
                plans = [c.plan(gp, b, make(s + b)) for b in range(len(chunk))]
                logit_mode = any(p.kind == "logit" for p in plans)
                logits = c.composed_logits(gp, plans, "mix")
                for b, v in enumerate(token_nll(logits, ids, am, log_probs=logit_mode).tolist()):
                    rows[b].losses[name] = v
            out.extend(rows)
            bar.update(len(chunk))
    return out


def win_rate(results: list[ProbeResult], a: str, b: str) -> float:
    """Fraction of probes with loss_a < loss_b (strict)."""
    if not results:
        return float("nan")
    return sum(r.losses[a] < r.losses[b] for r in results) / len(results)


def retrieval(results: list[ProbeResult], truth: list[int], k: int = 1) -> float:
    hits = 0
    for r, t in zip(results, truth):
        order = sorted(range(len(r.alpha)), key=lambda i: -r.alpha[i])
        hits += t in order[:k]
    return hits / max(1, len(results))
