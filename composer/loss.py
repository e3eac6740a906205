"""Loss of a text under a model: the mean next-token NLL over real tokens (DESIGN §6).

Used by index calibration (index_store.calibrate) and by the evaluation (eval/), so both measure
the same thing: padding is excluded from inputs and labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, ids: torch.Tensor, am: torch.Tensor, log_probs: bool = False) -> torch.Tensor:
    """Mean next-token NLL per row over real tokens: ``[B]``."""
    lp = logits[:, :-1].float() if log_probs else F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:, None])[..., 0]
    m = (am[:, 1:] * am[:, :-1]).float()
    return (nll * m).sum(1) / m.sum(1).clamp_min(1.0)
