"""Fitting each weighting's parameters to the calibration set's per-item losses (index_store.calibrate),
and the loss each fit gets on folds it did not see.

Every candidate composition's loss is measured once per calibration item; fitting is then arithmetic
on that table: the argmin of a grid for a weighting with one sharpness, and for an adaptive
weighting (``composer.weightings.Bands``) the best non-decreasing temperature per band of the
prompt's alpha profile, over every way of cutting the profile into at most ``MAX_BANDS`` bands at
``BAND_EDGES``. The **held-out** loss of a fit refits it with each fold left out and scores the fold
with the parameters fitted on the others, so a weighting with more parameters gains nothing from
fitting the calibration set's noise: the default weighting is the one with the lowest held-out loss.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from composer.weightings import BAND_EDGES, MAX_BANDS, Bands

MIN_BAND_SHARE = 0.05  # a band holds at least this share of the items (and at least MIN_BAND_ITEMS)
MIN_BAND_ITEMS = 4
BAND_TOLERANCE = 1e-4  # nats: one more band must lower the mean loss by more than this


@dataclass
class Scored:
    """One calibration item: its kind, fold, selected alphas (cross-fitted) and every candidate's loss."""

    kind: str
    fold: int
    alpha: torch.Tensor  # the top-K alphas, what an adaptive weighting's profile reads
    losses: dict = field(default_factory=dict)  # candidate key -> loss
    weight: float = 1.0  # its share of the objective (``balance``)


def mean(v) -> float:
    v = list(v)
    return sum(v) / len(v)


def balance(rows: list[Scored]) -> list[Scored]:
    """Weight every item kind present equally (each item 1 / its kind's count): the objective is then
    the mean of the kinds' mean losses, so the most numerous kind (the single-domain probes) does not
    decide alone how prompts of the others are composed. Weights sum to the number of items."""
    counts = {k: sum(r.kind == k for r in rows) for k in {r.kind for r in rows}}
    for r in rows:
        r.weight = len(rows) / (len(counts) * counts[r.kind])
    return rows


def wmean(rows: list[Scored], loss: Callable[[Scored], float]) -> float:
    """The objective: the weighted mean loss of ``rows``."""
    return sum(r.weight * loss(r) for r in rows) / sum(r.weight for r in rows)


def by_kind(rows: list[Scored], loss: Callable[[Scored], float]) -> dict[str, float]:
    """Mean loss per item kind, and the objective over all items (``all``)."""
    out = {k: mean(loss(r) for r in rows if r.kind == k) for k in dict.fromkeys(r.kind for r in rows)}
    out["all"] = wmean(rows, loss)
    return out


def fit_grid(rows: list[Scored], name: str, grid) -> float:
    """The sharpness of ``grid`` with the lowest mean loss (candidate keys ``(name, str(s))``)."""
    return min(grid, key=lambda s: wmean(rows, lambda r: r.losses[(name, str(s))]))


def fit_bands(rows: list[Scored], source: str, temperatures, profile: Callable[[torch.Tensor], float]) -> Bands:
    """The bands of ``profile`` (the weighting's, of each item's alphas) with the lowest mean loss: edges from ``BAND_EDGES`` (at most ``MAX_BANDS`` bands, each
    holding enough items), a non-decreasing temperature per band from ``temperatures`` (candidate keys
    ``(source, str(t))``); fewer bands unless more lower the loss by ``BAND_TOLERANCE``."""
    temps = sorted(temperatures)
    table = torch.tensor([[r.weight * r.losses[(source, str(t))] for t in temps] for r in rows], dtype=torch.float64)
    total_weight = sum(r.weight for r in rows)
    x = torch.tensor([profile(r.alpha) for r in rows], dtype=torch.float64)
    least = max(MIN_BAND_ITEMS, int(MIN_BAND_SHARE * len(rows)))
    best: tuple[float, Bands] | None = None
    for n in range(MAX_BANDS):
        for edges in itertools.combinations(BAND_EDGES, n):
            band = (x[:, None] >= torch.tensor(edges, dtype=torch.float64)[None, :]).sum(1) if edges else \
                torch.zeros(len(rows), dtype=torch.long)
            counts = torch.bincount(band, minlength=n + 1)
            if int(counts.min()) < least:
                continue
            sums = torch.zeros(n + 1, len(temps), dtype=torch.float64).index_add_(0, band, table)
            total, chosen = _monotone(sums)
            loss = total / total_weight
            if best is None or loss < best[0] - BAND_TOLERANCE:
                best = (loss, Bands(tuple(edges), tuple(temps[i] for i in chosen)))
    if best is None:  # too few items to cut: one band
        return Bands((), (temps[int(table.sum(0).argmin())],))
    return best[1]


def _monotone(sums: torch.Tensor) -> tuple[float, list[int]]:
    """Per band (rows of ``sums``: summed loss per temperature) the temperature index, non-decreasing
    from band to band, with the lowest total (dynamic programming)."""
    nb, nt = sums.shape
    cost = sums[0].clone()
    back = []
    for b in range(1, nb):
        run, arg = torch.cummin(cost, 0)  # best of the previous band at a temperature <= t
        back.append(arg)
        cost = sums[b] + run
    t = int(cost.argmin())
    total = float(cost[t])
    chosen = [t]
    for arg in reversed(back):
        t = int(arg[t])
        chosen.append(t)
    return total, chosen[::-1]


def held_out(rows: list[Scored], fit: Callable[[list[Scored]], object],
             loss: Callable[[Scored, object], float]) -> float:
    """The objective over every item, each under the parameters fitted on the other folds' items."""
    out = {}
    for f in sorted({r.fold for r in rows}):
        params = fit([r for r in rows if r.fold != f])
        out.update({id(r): loss(r, params) for r in rows if r.fold == f})
    return wmean(rows, lambda r: out[id(r)])


def quartiles(values) -> list[float]:
    v = sorted(values)
    return [round(v[round(q * (len(v) - 1))], 3) for q in (0, 0.25, 0.5, 0.75, 1)] if v else []
