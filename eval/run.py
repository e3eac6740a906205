"""``constellation eval``: the paper's five passes with its leaks removed (DESIGN §6).

Every loss goes through ``Constellation.composed_logits``, the composition code the server runs.
One generalist pass per probe batch serves every variant (fingerprint, alpha, trunk reuse).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from composer import basis as basis_mod
from composer.constellation import Constellation
from composer.modes import CompositionParams
from .core import token_nll

LAMBDAS = (0.3, 0.5, 1.0)
NOISE = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1)
BOOTSTRAP = 1000


class EvalError(ValueError):
    pass


# ---- probes ----------------------------------------------------------------------------------------
def load_single(path: Path) -> dict[str, list[str]]:
    from index_store.loader import load_probes

    return load_probes(path)


def load_cross(path: Path) -> list[tuple[str, list[str]]]:
    try:
        data = json.loads(Path(path).read_text())
        items = [(p["text"], list(p["domains"])) for p in data["probes"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise EvalError(f'{path}: expected {{"probes": [{{"text": ..., "domains": [...]}}, ...]}} ({e})') from None
    if not items or not all(isinstance(t, str) and t.strip() for t, _ in items):
        raise EvalError(f"{path}: needs at least one probe with non-empty text")
    return items


# ---- measuring ---------------------------------------------------------------------------------------
@dataclass
class Row:
    text: str
    domains: list[str]  # true domain(s)
    alpha: list[float]
    sig_norm: list[float]  # ||a_i|| of every specialist
    losses: dict[str, float]
    plan: dict | None = None  # constellation plan summary


def variants(c: Constellation) -> dict[str, CompositionParams]:
    v = {"generalist": CompositionParams(mode="generalist"), "constellation": CompositionParams(mode="constellation"),
         "uniform": CompositionParams(mode="uniform"), "logit": CompositionParams(mode="logit")}
    for d in c.domains:
        v[f"spec:{d}"] = CompositionParams(mode="weights", weights={d: 1.0})
    for lam in LAMBDAS:
        v[f"ta:{lam}"] = CompositionParams(mode="task_arithmetic", **{"lambda": lam})
    return v


def measure(loaded, c: Constellation, items: list[tuple[str, list[str]]], which: dict[str, CompositionParams],
            desc: str, quiet: bool, batch_size: int = 8, joint: bool = False) -> list[Row]:
    from tqdm import tqdm

    from index_store.loader import tokenize

    rows: list[Row] = []
    with tqdm(total=len(items), desc=desc, unit="probe", file=sys.stderr, disable=quiet) as bar:
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            ids, am = tokenize(loaded.tokenizer, [t for t, _ in chunk], 1 << 30, c.g.device)
            gp = c.generalist_pass(ids, am)
            norms = torch.stack([c.signature(gp, i).flatten(1).norm(dim=-1) for i in range(len(c.domains))], 1)
            out = [Row(t, doms, [float(a) for a in gp.alpha[b]], [float(x) for x in norms[b]], {})
                   for b, (t, doms) in enumerate(chunk)]
            for name, params in which.items():
                plans = [c.plan(gp, b, params, joint=joint and name == "constellation") for b in range(len(chunk))]
                logits = c.composed_logits(gp, plans, "mix")
                for b, v in enumerate(token_nll(logits, ids, am, log_probs=plans[0].kind == "logit").tolist()):
                    out[b].losses[name] = v
                if name == "constellation":
                    for b, p in enumerate(plans):
                        out[b].plan = {"selected": [c.domains[i] for i in p.selected],
                                       "weights": {c.domains[i]: float(p.node_weights[..., r, :].mean())
                                                   for r, i in enumerate(p.selected)},
                                       "entropy": p.mean_entropy_bits, "gini": p.gini, "fallback": p.fallback_fraction}
            rows.extend(out)
            bar.update(len(chunk))
    return rows


# ---- statistics --------------------------------------------------------------------------------------
def wins(rows: list[Row], a: str, b) -> list[int]:
    """Per-probe strict wins of variant ``a`` over ``b`` (a name, or a function of the row)."""
    get = b if callable(b) else (lambda r: r.losses[b])
    return [int(r.losses[a] < get(r)) for r in rows]


def rate_ci(w: list[int], seed: int = 0) -> dict:
    if not w:
        return {"rate": None, "ci95": [None, None], "n": 0}
    rng = random.Random(seed)
    n = len(w)
    boots = sorted(sum(w[rng.randrange(n)] for _ in range(n)) / n for _ in range(BOOTSTRAP))
    return {"rate": sum(w) / n, "ci95": [boots[int(0.025 * BOOTSTRAP)], boots[int(0.975 * BOOTSTRAP) - 1]], "n": n}


def pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def mean(v):
    v = list(v)
    return sum(v) / len(v) if v else None


def split_halves(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """Deterministic halves: even positions choose lambda, odd positions report."""
    return rows[0::2], rows[1::2]


def choose_lambda(select: list[Row], report: list[Row]) -> dict:
    best = min(LAMBDAS, key=lambda lam: (mean(r.losses[f"ta:{lam}"] for r in select), lam))
    oracle = lambda r: min(r.losses[f"ta:{lam}"] for lam in LAMBDAS)  # noqa: E731 - the paper's per-probe pick
    return {"lambda": best, "select_n": len(select), "report_n": len(report),
            "select_mean_loss": {str(lam): mean(r.losses[f"ta:{lam}"] for r in select) for lam in LAMBDAS},
            "win_rate": rate_ci(wins(report, "constellation", f"ta:{best}")),
            "win_rate_vs_per_probe_oracle_lambda": rate_ci(wins(report, "constellation", oracle))}


# ---- the passes ---------------------------------------------------------------------------------------
def retrieval(rows: list[Row], domains: list[str]) -> dict:
    per = {}
    for d in domains:
        rs = [r for r in rows if r.domains == [d]]
        if not rs:
            continue
        ranks = [sorted(range(len(domains)), key=lambda i: -r.alpha[i]) for r in rs]
        k = domains.index(d)
        per[d] = {"n": len(rs), "top1": mean(int(o[0] == k) for o in ranks),
                  "top3": mean(int(k in o[:3]) for o in ranks)}
    n = sum(p["n"] for p in per.values())
    return {"top1": sum(p["top1"] * p["n"] for p in per.values()) / n if n else None,
            "top3": sum(p["top3"] * p["n"] for p in per.values()) / n if n else None, "per_domain": per}


def correlation(rows: list[Row], domains: list[str]) -> dict:
    xs, ys = [], []
    for r in rows:
        for i, d in enumerate(domains):
            xs.append(r.alpha[i] * r.sig_norm[i])
            ys.append(r.losses[f"spec:{d}"])
    return {"pearson_r": pearson(xs, ys), "pairs": len(xs),
            "signal": "alpha_i x ||a_i|| (activation signature norm)", "target": "loss of specialist i"}


def single_domain(rows: list[Row], domains: list[str]) -> dict:
    spec = [r for r in rows if len(r.domains) == 1 and r.domains[0] in domains]
    oracle = lambda r: r.losses[f"spec:{r.domains[0]}"]  # noqa: E731
    sel, rep = split_halves(spec)
    ta = choose_lambda(sel, rep)
    out = {
        "n": len(spec),
        "win_rate": {"generalist": rate_ci(wins(spec, "constellation", "generalist")),
                     "uniform": rate_ci(wins(spec, "constellation", "uniform")),
                     "oracle": rate_ci(wins(spec, "constellation", oracle)),
                     "task_arithmetic": ta["win_rate"]},
        "task_arithmetic": ta,
        "mean_loss": {"constellation": mean(r.losses["constellation"] for r in spec),
                      "generalist": mean(r.losses["generalist"] for r in spec),
                      "uniform": mean(r.losses["uniform"] for r in spec),
                      "oracle": mean(oracle(r) for r in spec),
                      "task_arithmetic": mean(r.losses[f"ta:{ta['lambda']}"] for r in spec)},
        "gini": mean(r.plan["gini"] for r in spec),
        "mean_entropy_bits": mean(r.plan["entropy"] for r in spec),
        "per_domain": {},
    }
    for d in domains:
        rs = [r for r in spec if r.domains[0] == d]
        if rs:
            out["per_domain"][d] = {
                "n": len(rs), "win_vs_generalist": rate_ci(wins(rs, "constellation", "generalist"))["rate"],
                "win_vs_oracle": rate_ci(wins(rs, "constellation", oracle))["rate"],
                "loss": {k: mean(r.losses[v] for r in rs) for k, v in
                         (("generalist", "generalist"), ("constellation", "constellation"), ("oracle", f"spec:{d}"))},
                "entropy_bits": mean(r.plan["entropy"] for r in rs)}
    controls = [r for r in rows if len(r.domains) == 1 and r.domains[0] not in domains]
    if controls:
        out["controls"] = {"n": len(controls),
                           "win_vs_generalist": rate_ci(wins(controls, "constellation", "generalist")),
                           "mean_loss": {"constellation": mean(r.losses["constellation"] for r in controls),
                                         "generalist": mean(r.losses["generalist"] for r in controls)}}
    return out


def cross_domain(rows: list[Row], domains: list[str]) -> dict:
    best_single = lambda r: min(r.losses[f"spec:{d}"] for d in domains)  # noqa: E731
    sel, rep = split_halves(rows)
    ta = choose_lambda(sel, rep)
    return {
        "n": len(rows),
        "win_rate": {"generalist": rate_ci(wins(rows, "constellation", "generalist")),
                     "best_single": rate_ci(wins(rows, "constellation", best_single)),
                     "task_arithmetic": ta["win_rate"],
                     "logit": rate_ci(wins(rows, "constellation", "logit"))},
        "task_arithmetic": ta,
        "mean_loss": {"constellation": mean(r.losses["constellation"] for r in rows),
                      "generalist": mean(r.losses["generalist"] for r in rows),
                      "best_single": mean(best_single(r) for r in rows),
                      "logit": mean(r.losses["logit"] for r in rows),
                      "task_arithmetic": mean(r.losses[f"ta:{ta['lambda']}"] for r in rows)},
        "mean_entropy_bits": mean(r.plan["entropy"] for r in rows),
    }


# ---- variants of the constellation for sweeps and ablations --------------------------------------------
def with_basis(c: Constellation, E: torch.Tensor) -> Constellation:
    return Constellation(c.g, dict(zip(c.domains, c.specialists)), E, c.settings, c.differences)


def with_settings(c: Constellation, **kw) -> Constellation:
    return Constellation(c.g, dict(zip(c.domains, c.specialists)), c.basis, replace(c.settings, **kw), c.differences)


def gs_in_order(raw: torch.Tensor, order: list[int]) -> torch.Tensor:
    E = basis_mod.gram_schmidt(raw[order])[0]
    out = torch.empty_like(E)
    for pos, i in enumerate(order):
        out[i] = E[pos]
    return out


def index_probe_texts(loaded) -> set[str]:
    """The probes the index was built from (to tell in-sample evaluation probes apart)."""
    from index_store.loader import load_probes

    path = loaded.config.index.probes
    return {t for ts in load_probes(path).values() for t in ts} if path.is_file() else set()


def run(loaded, single: dict[str, list[str]], cross: list | None, out: Path, noise_sweep: bool = False,
        ablations: bool = False, quiet: bool = False, probe_paths: dict | None = None) -> dict:
    t0 = time.perf_counter()
    c = loaded.constellation
    domains = c.domains
    out.mkdir(parents=True, exist_ok=True)
    manifest = loaded.manifest
    index_probes = index_probe_texts(loaded)
    items = [(t, [d]) for d, ts in single.items() for t in ts]
    overlap_single = sum(t in index_probes for t, _ in items)
    overlap_cross = sum(t in index_probes for t, _ in (cross or []))
    allv = variants(c)
    srows = measure(loaded, c, items, allv, "single-domain probes", quiet)
    crows = measure(loaded, c, cross, allv, "cross-domain probes", quiet) if cross else []
    diag = manifest["diagnostics"]
    results = {
        "constellation": {"config": str(loaded.config.source), "domains": domains,
                          "generalist": manifest.get("generalist_architecture"), "d": c.d,
                          "settings": {"top_k": c.settings.top_k, "layers": c.settings.layers,
                                       "policy": c.settings.policy, "signature": c.settings.signature,
                                       "basis": manifest["settings"]["basis"]}},
        "probes": {"single": str((probe_paths or {}).get("single", "")), "cross": str((probe_paths or {}).get("cross", "")),
                   "single_n": len(items), "cross_n": len(cross or []),
                   "overlap_with_index_probes": {"single": overlap_single, "cross": overlap_cross},
                   "in_sample": bool(overlap_single or overlap_cross)},
        "index": {"mean_collinearity": diag["mean_collinearity"], "post_gs_max_abs_cos": diag["post_gs_max_abs_cos"],
                  "raw_cosine": diag["raw_cosine"], "residual_ratios": diag["residual_ratios"],
                  "recommendation": diag["recommendation"], "recommendation_text": diag["recommendation_text"]},
        "retrieval": retrieval(srows, domains),
        "correlation": correlation(srows + crows, domains),
        "single_domain": single_domain(srows, domains),
    }
    if crows:
        results["cross_domain"] = cross_domain(crows, domains)
    from index_store.store import read_index

    _, tensors = read_index(loaded.config.index.path)
    raw_c = tensors["raw_centroids"][: len(domains)].to(torch.float64)
    if noise_sweep:
        results["noise_sweep"] = sweep_noise(loaded, c, raw_c, cross or [], crows, quiet,
                                             int(manifest["settings"]["seed"]))
    if ablations:
        results["ablations"] = run_ablations(loaded, c, raw_c, items, cross or [], srows, crows, quiet)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["per_probe"] = {"single": [_row_doc(r) for r in srows], "cross": [_row_doc(r) for r in crows]}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    from .report import plots, write_report

    plots(results, domains, out)
    write_report(results, out)
    return results


def _row_doc(r: Row) -> dict:
    # No probe text in the results: evaluation probes may be held-out sets that must not be copied
    # anywhere. Rows are in the probe file's order; the hash identifies the text.
    return {"sha256": hashlib.sha256(r.text.encode()).hexdigest()[:16], "domains": r.domains, "alpha": r.alpha,
            "losses": r.losses, "plan": r.plan}


def sweep_noise(loaded, c, raw_c, cross, crows, quiet, seed: int) -> dict:
    if not crows:
        return {"skipped": "no cross-domain probes"}
    lam = cross_domain(crows, c.domains)["task_arithmetic"]["lambda"]
    out = {"lambda": lam, "points": []}
    kind = loaded.manifest["settings"]["basis"]
    for s in NOISE:
        E = basis_mod.make_basis(basis_mod.add_noise(raw_c, s, seed), kind)
        cv = with_basis(c, E)
        rows = measure(loaded, cv, cross, {"constellation": CompositionParams(mode="constellation")},
                       f"noise s={s}", quiet)
        for r, base in zip(rows, crows):
            r.losses[f"ta:{lam}"] = base.losses[f"ta:{lam}"]
        _, report = split_halves(rows)  # the half task arithmetic is reported on
        out["points"].append({"s": s, "win_rate_vs_task_arithmetic": rate_ci(wins(report, "constellation", f"ta:{lam}"))})
    return out


def run_ablations(loaded, c, raw_c, items, cross, srows, crows, quiet) -> dict:
    """Each variant's constellation vs the default run's generalist (single) and task arithmetic (cross)."""
    lam = cross_domain(crows, c.domains)["task_arithmetic"]["lambda"] if crows else None
    n = len(c.domains)
    orders = [list(range(n)), list(range(n))[::-1], list(range(1, n)) + [0]]
    cases: dict[str, tuple[str, Constellation, bool]] = {
        "basis=symmetric": ("basis", with_basis(c, basis_mod.symmetric(raw_c)), False)}
    for o in orders:
        cases["basis=gram_schmidt order=" + ",".join(c.domains[i] for i in o)] = ("basis", with_basis(c, gs_in_order(raw_c, o)), False)
    for p in ("residual", "shape"):
        cases[f"policy={p}"] = ("policy", with_settings(c, policy=p), False)
    for sgn in ("generalist", "trunk", "full"):
        cases[f"signature={sgn}"] = ("signature", with_settings(c, signature=sgn), False)
    for k in range(1, n + 1):
        cases[f"K={k}"] = ("K", with_settings(c, top_k=k), False)
    skipped = {}
    for L in (1, 2, 4, 8):
        if L <= c.g.mc.n_layers:
            cases[f"L={L}"] = ("L", with_settings(c, layers=L), False)
        else:
            skipped[f"L={L}"] = {"group": "L", "skipped": f"the model has {c.g.mc.n_layers} layers"}
    cases["normalisation=two-stage"] = ("normalisation", c, False)
    cases["normalisation=joint"] = ("normalisation", c, True)
    out = {}
    for name, (group, cv, joint) in cases.items():
        one = {"constellation": CompositionParams(mode="constellation")}
        s = measure(loaded, cv, items, one, name, quiet, joint=joint)
        for r, base in zip(s, srows):
            r.losses["generalist"] = base.losses["generalist"]
        spec = [r for r in s if r.domains[0] in c.domains]
        doc = {"group": group,
               "retrieval_top1": retrieval(s, c.domains)["top1"],
               "single_win_vs_generalist": rate_ci(wins(spec, "constellation", "generalist")),
               "single_mean_loss": mean(r.losses["constellation"] for r in spec),
               "mean_entropy_bits": mean(r.plan["entropy"] for r in spec)}
        if crows:
            x = measure(loaded, cv, cross, one, name + " (cross)", quiet, joint=joint)
            for r, base in zip(x, crows):
                r.losses[f"ta:{lam}"] = base.losses[f"ta:{lam}"]
            doc["cross_win_vs_task_arithmetic"] = rate_ci(wins(split_halves(x)[1], "constellation", f"ta:{lam}"))
        out[name] = doc
    out.update(skipped)
    return out
