"""Statistics of the evaluation: strict win rates and mean losses with bootstrap intervals."""

from __future__ import annotations

import random

BOOTSTRAP = 1000
LAMBDAS = (0.3, 0.5, 1.0)


def mean(v):
    v = list(v)
    return sum(v) / len(v) if v else None


def wins(rows, a: str, b) -> list[int]:
    """Per-probe strict wins of variant ``a`` over ``b`` (a name, or a function of the row)."""
    get = b if callable(b) else (lambda r: r.losses[b])
    return [int(r.losses[a] < get(r)) for r in rows]


def _boot(values: list[float], seed: int) -> list[float]:
    rng = random.Random(seed)
    n = len(values)
    return sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(BOOTSTRAP))


def rate_ci(w: list[int], seed: int = 0) -> dict:
    if not w:
        return {"rate": None, "ci95": [None, None], "n": 0}
    boots = _boot(w, seed)
    return {"rate": sum(w) / len(w), "ci95": [boots[int(0.025 * BOOTSTRAP)], boots[int(0.975 * BOOTSTRAP) - 1]],
            "n": len(w)}


def mean_ci(values: list[float], seed: int = 0) -> dict:
    """Mean with a 95% bootstrap interval (a loss, or a per-probe loss difference)."""
    if not values:
        return {"mean": None, "ci95": [None, None], "n": 0}
    boots = _boot(list(values), seed)
    return {"mean": sum(values) / len(values),
            "ci95": [boots[int(0.025 * BOOTSTRAP)], boots[int(0.975 * BOOTSTRAP) - 1]], "n": len(values)}


def pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def split_halves(rows: list) -> tuple[list, list]:
    """Deterministic halves: even positions choose lambda, odd positions report."""
    return rows[0::2], rows[1::2]


def choose_lambda(select: list, report: list) -> dict:
    best = min(LAMBDAS, key=lambda lam: (mean(r.losses[f"ta:{lam}"] for r in select), lam))
    oracle = lambda r: min(r.losses[f"ta:{lam}"] for lam in LAMBDAS)  # noqa: E731 - the paper's per-probe pick
    return {"lambda": best, "select_n": len(select), "report_n": len(report),
            "select_mean_loss": {str(lam): mean(r.losses[f"ta:{lam}"] for r in select) for lam in LAMBDAS},
            "win_rate": rate_ci(wins(report, "constellation", f"ta:{best}")),
            "win_rate_vs_per_probe_oracle_lambda": rate_ci(wins(report, "constellation", oracle))}
