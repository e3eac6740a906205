"""Prompt log-probabilities under a prompt's own composition (completions' ``echo`` with ``logprobs``).

Runs on the engine thread (``Engine.score_prompt`` hands it over with ``call``): one generalist pass
plans the composition exactly as generation would, then the composed model's logits over the whole
prompt give each token's log-probability given the tokens before it (the library's
``composed_logits``, which the engine's own prefill equals within 1e-4; tests/test_engine.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from composer.constellation import Constellation
from composer.modes import CompositionParams
from .types import PlanSummary

ROWS = 256  # prompt positions turned into log-probabilities at a time (bounds the [rows, V] float copy)


@torch.inference_mode()
def prompt_logprobs(c: Constellation, ids: list[int], composition: CompositionParams,
                    fingerprint_mask: list[int] | None, top: int) -> tuple[list[dict], PlanSummary]:
    """One entry per prompt token, as the sampler's ``logprob_entry`` makes them: ``{"token_id",
    "logprob", "top": [(id, logprob), ...]}``; the first token's logprob and top are None (nothing
    precedes it)."""
    dev = c.g.device
    t = torch.tensor([ids], dtype=torch.long, device=dev)
    fm = None if fingerprint_mask is None else torch.tensor([fingerprint_mask], device=dev)
    gp = c.generalist_pass(t, torch.ones_like(t), fingerprint_mask=fm)
    plan = c.plan(gp, 0, composition)
    logits = c.composed_logits(gp, [plan])[0]  # [T, V]: logits, or log-probabilities in logit mode
    entries: list[dict] = [{"token_id": ids[0], "logprob": None, "top": None}]
    for s in range(0, len(ids) - 1, ROWS):
        e = min(s + ROWS, len(ids) - 1)
        logp = F.log_softmax(logits[s:e].float(), -1)
        nxt = torch.tensor(ids[s + 1:e + 1], dtype=torch.long, device=dev)
        chosen = logp.gather(1, nxt[:, None])[:, 0].tolist()
        tops = torch.topk(logp, top, -1) if top > 0 else None
        for r in range(e - s):
            entry = {"token_id": ids[s + 1 + r], "logprob": chosen[r], "top": []}
            if tops is not None:
                entry["top"] = list(zip(tops.indices[r].tolist(), tops.values[r].tolist()))
            entries.append(entry)
    return entries, PlanSummary.of(plan, c.domains)
