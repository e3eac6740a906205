"""Prompt fingerprints for ``POST /v1/embeddings``: the vector the index projects a prompt from.

Runs on the engine thread (the serving code hands it over with ``Engine.call``, a batch of prompts at
a time, so decode steps go on between batches): the generalist pass every request's planning runs,
without the activation signatures.
"""

from __future__ import annotations

import torch

from composer.constellation import Constellation


@torch.inference_mode()
def fingerprints(c: Constellation, prompts: list[list[int]]) -> list[bytes]:
    """Each prompt's fingerprint, L2-normalised, as little-endian float32 bytes (``[d]`` each).

    The fingerprint is G's final-norm hidden state averaged over the prompt's tokens; alpha is its
    normalised form projected on the basis (``composer.decompose.alpha``), so ``alpha_k = <e, b_k>``
    for the embedding ``e`` returned here. The prompts are right-padded into one batch; padding is
    masked out of attention and of the mean, so each row is the prompt's own.
    """
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        mask[i, :len(p)] = 1
    dev = c.g.device
    gp = c.generalist_pass(ids.to(dev), mask.to(dev), signatures=False)
    fp = gp.fingerprint.to(torch.float64).cpu()
    unit = (fp / fp.norm(dim=-1, keepdim=True).clamp_min(1e-300)).to(torch.float32)
    return [row.numpy().astype("<f4").tobytes() for row in unit]
