"""Orthonormal domain bases from centroids (DESIGN §2.4) and the index diagnostics (§2.5)."""

from __future__ import annotations

import torch


class BasisError(ValueError):
    """The centroids cannot be orthogonalised (e.g. two domains share one centroid)."""


def add_noise(centroids: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Stochastic-resonance noise: ``c_k += N(0, (s * mean_k ||c_k||)^2 I)`` with a fixed seed."""
    c = centroids.to(torch.float64)
    if fraction <= 0:
        return c.clone()
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    sigma = fraction * c.norm(dim=1).mean()
    return c + sigma * torch.randn(c.shape, generator=g, dtype=torch.float64)


def gram_schmidt(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Modified Gram-Schmidt in the given order; returns ``(E, residual_ratios)``.

    ``residual_ratios[k] = ||r_k|| / ||c_k||`` is the signal left in domain k after removing the
    directions of the domains before it. A second projection pass ("twice is enough") keeps the
    basis orthonormal to ~1e-15 even for centroids with cosine 0.99+.
    """
    c = centroids.to(torch.float64)
    n = c.shape[0]
    E = torch.zeros_like(c)
    ratios = torch.zeros(n, dtype=torch.float64)
    for k in range(n):
        r = c[k].clone()
        for _ in range(2):
            for j in range(k):
                r = r - (r @ E[j]) * E[j]
            if _ == 0:
                ratios[k] = r.norm() / c[k].norm()
        norm = r.norm()
        if norm <= 1e-12 * max(c[k].norm().item(), 1e-300):
            raise BasisError(f"centroid {k} lies in the span of the earlier ones; cannot orthogonalise")
        E[k] = r / norm
    return E, ratios


def symmetric(centroids: torch.Tensor) -> torch.Tensor:
    """Löwdin orthogonalisation ``E = (C C^T)^(-1/2) C``: the orthonormal basis closest to C."""
    c = centroids.to(torch.float64)
    gram = c @ c.T
    evals, evecs = torch.linalg.eigh(gram)
    if evals.min() <= 1e-12 * evals.max():
        raise BasisError("the centroids are linearly dependent; the symmetric basis does not exist")
    inv_sqrt = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    E = inv_sqrt @ c
    # One Newton-Schulz-free clean-up: re-run Löwdin on E itself (E E^T is ~I, so this is exact-ish).
    g2 = E @ E.T
    ev2, vec2 = torch.linalg.eigh(g2)
    return vec2 @ torch.diag(ev2.rsqrt()) @ vec2.T @ E


BASES = {"symmetric": "Löwdin (C C^T)^(-1/2) C, order-invariant (DESIGN §2.4)",
         "gram_schmidt": "modified Gram-Schmidt in domain order (the paper, Eq. 3)"}


def make_basis(centroids: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "symmetric":
        return symmetric(centroids)
    if kind == "gram_schmidt":
        return gram_schmidt(centroids)[0]
    raise BasisError(f"unknown basis '{kind}' (choose from {', '.join(BASES)})")


def cosine_matrix(c: torch.Tensor) -> torch.Tensor:
    c = c.to(torch.float64)
    u = c / c.norm(dim=1, keepdim=True)
    return u @ u.T


def max_abs_offdiag(m: torch.Tensor) -> float:
    n = m.shape[0]
    if n < 2:
        return 0.0
    off = m - torch.diag(torch.diagonal(m))
    return float(off.abs().max())


def recommendation(mean_collinearity: float) -> str:
    """The paper's rule of thumb (DESIGN §2.5)."""
    if mean_collinearity < 0.93:
        return "task_arithmetic"  # low collinearity: task arithmetic suffices
    if mean_collinearity <= 0.97:
        return "constellation"
    return "noise_assisted"


RECOMMENDATION_TEXT = {
    "task_arithmetic": "mean collinearity < 0.93: task arithmetic suffices",
    "constellation": "mean collinearity 0.93-0.97: constellation composition",
    "noise_assisted": "mean collinearity > 0.97: consider noise-assisted decomposition (index.noise_fraction)",
}


def diagnostics(centroids: torch.Tensor, basis: torch.Tensor, domains: list[str]) -> dict:
    """Pairwise raw cosine (paper Table 1), post-orthogonalisation max |cos|, GS residual ratios."""
    raw = cosine_matrix(centroids)
    n = raw.shape[0]
    pairs = [float(raw[i, j]) for i in range(n) for j in range(i + 1, n)]
    mean_col = sum(pairs) / len(pairs) if pairs else 0.0
    _, ratios = gram_schmidt(centroids)
    rec = recommendation(mean_col)
    return {
        "domains": list(domains),
        "raw_cosine": [[float(v) for v in row] for row in raw],
        "mean_collinearity": mean_col,
        "post_gs_max_abs_cos": max_abs_offdiag(basis @ basis.T),
        "residual_ratios": {d: float(r) for d, r in zip(domains, ratios)},
        "recommendation": rec,
        "recommendation_text": RECOMMENDATION_TEXT[rec],
    }
