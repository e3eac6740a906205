"""``constellation eval``: the paper's five passes with its leaks removed (DESIGN §6).

Every loss goes through ``Constellation.composed_logits``, the composition code the server runs.
One generalist pass per probe batch serves every variant (fingerprint, alpha, trunk reuse).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from composer.constellation import Constellation
from composer.modes import CompositionParams
from .ablations import NOISE, run_ablations, sweep_noise, weighting_ablations
from .core import token_nll
from .passes import adaptive_targets, correlation, cross_domain, retrieval, single_domain, targets
from .stats import LAMBDAS, choose_lambda, mean, pearson, rate_ci, split_halves, wins

__all__ = ["NOISE", "LAMBDAS", "choose_lambda", "correlation", "cross_domain", "mean", "pearson", "rate_ci",
           "retrieval", "single_domain", "split_halves", "wins", "measure", "run", "variants"]


class EvalError(ValueError):
    pass


# ---- probes ----------------------------------------------------------------------------------------
def load_single(path: Path) -> dict[str, list[str]]:
    from index_store.probes import load_probes

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
    entropy: dict[str, float] = field(default_factory=dict)  # every variant's mean entropy (bits)


def variants(c: Constellation) -> dict[str, CompositionParams]:
    v = {"generalist": CompositionParams(mode="generalist"), "constellation": CompositionParams(mode="constellation"),
         "paper": CompositionParams(mode="paper"), "routed": CompositionParams(mode="routed"),
         "uniform": CompositionParams(mode="uniform"), "logit": CompositionParams(mode="logit")}
    for d in c.domains:
        v[f"spec:{d}"] = CompositionParams(mode="weights", weights={d: 1.0})
    for lam in LAMBDAS:
        v[f"ta:{lam}"] = CompositionParams(mode="task_arithmetic", **{"lambda": lam})
    cal = c.settings.calibrated
    for name in dict.fromkeys([*cal.sharpness, *cal.bands]):  # each calibrated weighting, default or not
        v[f"w:{name}"] = CompositionParams(mode="constellation", weighting=name)
    return v


def measure(loaded, c: Constellation, items: list[tuple[str, list[str]]], which: dict[str, CompositionParams],
            desc: str, quiet: bool, batch_size: int = 8, joint: bool = False) -> list[Row]:
    from tqdm import tqdm

    from index_store.models import tokenize

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
                    out[b].entropy[name] = plans[b].mean_entropy_bits
                if name == "constellation":
                    for b, p in enumerate(plans):
                        out[b].plan = {"selected": [c.domains[i] for i in p.selected],
                                       "weights": {c.domains[i]: float(p.node_weights[..., r, :].mean())
                                                   for r, i in enumerate(p.selected)},
                                       "entropy": p.mean_entropy_bits, "gini": p.gini, "fallback": p.fallback_fraction,
                                       "weighting": p.extra.get("weighting"), "sharpness": p.extra.get("sharpness")}
            rows.extend(out)
            bar.update(len(chunk))
    return rows


def index_probe_texts(loaded) -> set[str]:
    """The probes the index was built from (to tell in-sample evaluation probes apart)."""
    from index_store.probes import load_probes

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
                                       "basis": manifest["settings"]["basis"]},
                          "calibration": {k: v for k, v in (manifest.get("calibration") or {}).items()
                                          if k in ("weighting", "sharpness", "bands", "strength", "loss",
                                                   "held_out_loss", "reference_loss", "chosen_by", "profile",
                                                   "folds", "items", "skipped", "uncalibrated")}},
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
    results["targets"] = targets(results)
    if srows and "w:adaptive" in srows[0].losses:
        results["adaptive"] = adaptive_targets(srows, crows, domains)
    from index_store.store import read_index

    _, tensors = read_index(loaded.config.index_path)
    raw_c = tensors["raw_centroids"][: len(domains)].to(torch.float64)
    if noise_sweep:
        results["noise_sweep"] = sweep_noise(loaded, c, raw_c, cross or [], crows, quiet,
                                             int(manifest["settings"]["seed"]))
    if ablations:
        results["weightings"] = weighting_ablations(loaded, c, items, cross or [], srows, crows, quiet)
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


