"""Per-query decomposition: alpha, top-K selection, node weights, entropy, Gini (DESIGN §3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-8


def alpha(fingerprint: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``alpha_k = <g/||g||, e_k>`` in float64; ``fingerprint`` is ``[d]`` or ``[B, d]``."""
    g = fingerprint.to(torch.float64)
    g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return g @ basis.to(torch.float64).T


def top_k(alpha_row: torch.Tensor, k: int) -> list[int]:
    """Indices of the K largest alphas, best first (ties: lower index first)."""
    k = max(1, min(int(k), alpha_row.numel()))
    order = sorted(range(alpha_row.numel()), key=lambda i: (-float(alpha_row[i]), i))
    return order[:k]


@dataclass
class NodeWeights:
    weights: torch.Tensor  # [..., K, d] float32 (a leading dim per composed block), columns sum to ~1
    fallback: torch.Tensor  # bool [..., d]: columns whose raw weights were all zero (uniform 1/K)

    @property
    def fallback_fraction(self) -> float:
        return float(self.fallback.float().mean())


def node_weights(coef: torch.Tensor, signatures: torch.Tensor, joint: bool = False, eps: float = EPS) -> NodeWeights:
    """``r_ij = max(coef_i, 0) * a_ij``; ``w_ij = r_ij / sum_i r_ij`` (or the joint contrast).

    ``coef`` [K] (alpha of the selected domains, or caller weights), ``signatures`` [..., K, d] >= 0
    (a leading dimension for per-block signatures; each block is normalised on its own).
    """
    coef = coef.to(torch.float64).clamp_min(0)
    a = signatures.to(torch.float64)
    raw = coef[:, None] * a
    K = raw.shape[-2]
    if joint:
        total = raw.sum(dim=(-2, -1), keepdim=True)
        w = torch.where(total > 0, raw / (total + eps), torch.full_like(raw, 1.0 / (K * raw.shape[-1])))
        fb = (total == 0).squeeze(-1).expand(*raw.shape[:-2], raw.shape[-1])
        return NodeWeights(w.float(), fb.clone())
    col = raw.sum(dim=-2, keepdim=True)
    # The paper's "+ eps" only guards the division; zero columns fall back explicitly below, so we
    # divide by the exact sum and columns sum to 1 (a lone specialist gets weight exactly 1).
    w = raw / torch.where(col > 0, col, torch.ones_like(col))
    fb = col == 0
    w = torch.where(fb, torch.full_like(w, 1.0 / K), w)
    return NodeWeights(w.float(), fb.squeeze(-2))


def entropy_bits(w: torch.Tensor) -> torch.Tensor:
    """Per-node entropy ``H_j = -sum_i w_ij log2 w_ij`` (0 log 0 = 0) over the K axis (-2); ``[..., d]``."""
    w = w.to(torch.float64)
    return -(torch.where(w > 0, w * torch.log2(w.clamp_min(1e-300)), torch.zeros_like(w))).sum(-2)


def gini(values: torch.Tensor) -> float:
    """Gini coefficient of |values| (0 = all equal, (n-1)/n = one non-zero)."""
    x = values.to(torch.float64).abs().flatten().sort().values
    n = x.numel()
    if n == 0 or float(x.sum()) == 0:
        return 0.0
    idx = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * idx - n - 1) * x).sum() / (n * x.sum()))
