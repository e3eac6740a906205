"""Fingerprints and centroids: the generalist's view of the probes, and the basis made from them."""

from __future__ import annotations

import sys

import torch

from composer import basis as basis_mod
from composer.constellation import masked_mean
from .config import ConstellationConfig
from .models import tokenize
from .probes import ProbeError


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="probe", file=sys.stderr, disable=quiet, dynamic_ncols=True)


# ---- building -----------------------------------------------------------------------------------
@torch.inference_mode()
def fingerprints(g, tok, texts: list[str], max_tokens: int, batch_size: int, bar=None) -> torch.Tensor:
    """G's fingerprints of ``texts`` (batched, padding ignored), ``[len(texts), d]`` fp32 on CPU."""
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i: i + batch_size]
        ids, am = tokenize(tok, chunk, max_tokens, g.device)
        ctx = g.context(am)
        x = g.run_blocks(g.embed(ids, ctx), ctx, 0, g.mc.n_layers)
        out.append(masked_mean(g.final_norm(x), am).cpu())
        if bar is not None:
            bar.update(len(chunk))
    return torch.cat(out)


def centroids(g, tok, probes: dict[str, list[str]], order: list[str], cfg: ConstellationConfig,
              reuse: dict[str, torch.Tensor] | None = None, quiet: bool = False,
              keep: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Each domain's raw centroid ``[len(order), d]`` (fp64): the mean fingerprint of its probes.
    ``reuse``: centroids already known for domains whose probes did not change (a catalog change
    fingerprints only the new domain's probes). ``keep``: filled with each domain's fingerprints."""
    reuse = reuse or {}
    todo = [d for d in order if d not in reuse]
    out = dict(reuse)
    with _progress(sum(len(probes[d]) for d in todo), "fingerprinting probes", quiet or not todo) as bar:
        for dom in todo:
            fp = fingerprints(g, tok, probes[dom], cfg.index.max_tokens, cfg.index.batch_size, bar)
            out[dom] = fp.to(torch.float64).mean(0)
            if keep is not None:
                keep[dom] = fp
    return torch.stack([out[d] for d in order])


def index_basis(raw: torch.Tensor, cfg: ConstellationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The centroids used (with the configured noise) and their basis: for the index, and for each
    calibration fold (index_store.calibrate)."""
    used = basis_mod.add_noise(raw, cfg.index.noise_fraction, cfg.index.seed)
    return used, basis_mod.make_basis(used, cfg.index.basis)


def probe_order(cfg: ConstellationConfig, probes: dict[str, list[str]]) -> list[str]:
    missing = [d for d in cfg.specialists if d not in probes]
    if missing:
        raise ProbeError(f"{cfg.index.probes}: no probes for specialist domain(s) {missing}")
    return list(cfg.specialists) + [d for d in probes if d not in cfg.specialists]


