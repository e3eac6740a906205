"""Calibrating the composition on held-out index probes, at ``index build`` (docs/weightings.md).

Nothing here sees an evaluation probe: everything is measured on the index probes, cross-fitted.
The probes of every domain are split into F folds (F = 4, fewer if a domain has fewer probes); for
fold f the centroids and the basis are rebuilt from the other folds only, so the alphas of fold f's
probes are what a new prompt would get. The calibration set is

- every index probe (each specialist domain's, and the control domains', e.g. ``general``),
- the probe file's ``mixed`` probes: texts that blend two of its domains (fold = position mod F), and
- synthetic two-domain prompts: a probe of domain a and one of domain b from the same fold, joined
  by a blank line (without them or mixed probes calibration would learn only to route).

The objective is the mean loss (next-token NLL per token, ``composer.loss``) of each item kind
(single-domain, control, mixed, pair), the kinds weighted equally (``calibrate_fit.balance``).

1. **Strength** ``gamma_k`` per specialist domain: the loss of ``theta_G + gamma * (theta_S_k -
   theta_G)`` on domain k's own probes, for each gamma of a grid; the argmin. It corrects a
   specialist trained too little (gamma > 1) or too much (gamma < 1) for the text of its domain.
2. **Sharpness** of each weighting asked for (default: ``softmax`` and ``adaptive``), with the
   strengths of step 1: the argmin of its grid, or for ``adaptive`` its bands (``calibrate_fit``).
   The weighting with the lowest **held-out** loss (each fold scored with the parameters fitted on
   the others; the paper's rule included) becomes the index's default.
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
import time
from dataclasses import dataclass

import torch

from composer import basis as basis_mod
from composer.loss import token_nll
from composer.decompose import top_k as top_k_of
from composer.modes import CompositionParams, Plan
from composer.weightings import TEMPERATURES, WEIGHTINGS, Bands, second_alpha
from .calibrate_fit import Scored, balance, by_kind, fit_bands, fit_grid, held_out, mean, quartiles, wmean
from .fingerprints import index_basis
from .models import tokenize

FOLDS = 4
STRENGTHS = (0.5, 0.7, 0.85, 1.0, 1.15, 1.3, 1.5, 1.75, 2.0, 2.5)
DEFAULT_WEIGHTINGS = ("softmax", "adaptive")  # calibrated at index build (the paper's rule is always measured)
CHOICES = ("paper", "softmax", "adaptive")  # may become the index's default weighting


@dataclass
class Item:
    text: str
    domains: list[str]  # the probe's domain, or the two domains of a synthetic pair
    fold: int
    kind: str  # "single" (a specialist domain's probe), "control", "pair", "mixed"


def n_folds(probes: dict[str, list[str]], specialists: list[str]) -> int:
    return min(FOLDS, min(len(probes[d]) for d in specialists))


def calibration_items(probes: dict[str, list[str]], specialists: list[str], folds: int,
                      mixed: list[tuple[str, list[str]]] = ()) -> list[Item]:
    """Every probe (fold = its position mod F), every mixed probe (likewise) and, per fold, one joined
    pair per pair of specialist domains (at most a quarter as many pairs as the fold has specialist
    probes, at least one)."""
    out = [Item(t, [d], j % folds, "single" if d in specialists else "control")
           for d, texts in probes.items() for j, t in enumerate(texts)]
    out += [Item(t, list(doms), j % folds, "mixed") for j, (t, doms) in enumerate(mixed)]
    pairs = list(itertools.combinations(specialists, 2))
    for f in range(folds):
        in_fold = {d: [t for j, t in enumerate(probes[d]) if j % folds == f] for d in specialists}
        cap = max(1, sum(len(v) for v in in_fold.values()) // 4)
        for k, (a, b) in enumerate(pairs[:cap]):
            halves = [(a, in_fold[a][k % len(in_fold[a])]), (b, in_fold[b][(k + 1) % len(in_fold[b])])]
            if k % 2:  # alternate which domain comes first
                halves.reverse()
            out.append(Item(halves[0][1] + "\n\n" + halves[1][1], [d for d, _ in halves], f, "pair"))
    return out


def fold_basis(fps: dict[str, torch.Tensor], specialists: list[str], fold: int, folds: int, cfg) -> torch.Tensor:
    """The basis from every specialist domain's probes outside ``fold`` (noise as configured)."""
    cents = []
    for d in specialists:
        keep = [j for j in range(fps[d].shape[0]) if j % folds != fold]
        cents.append(fps[d][keep].to(torch.float64).mean(0))
    return index_basis(torch.stack(cents), cfg)[1]


@dataclass
class Batch:
    c: object  # the constellation with this fold's basis
    gp: object
    ids: torch.Tensor
    am: torch.Tensor
    items: list[Item]


KINDS = ("single", "control", "pair", "mixed")


def _batches(c, tok, items: list[Item], fps, cfg, folds: int, kinds=KINDS, bar=None):
    """The calibration set in batches, each with its generalist pass under its fold's basis. Made
    lazily: one batch's pass (hidden states, in-pass signature records) is resident at a time."""
    for f in range(folds):
        cf = copy.copy(c)  # shares the models; only the basis differs
        cf.basis = fold_basis(fps, c.domains, f, folds, cfg)
        for kind in kinds:
            group = [it for it in items if it.fold == f and it.kind == kind]
            for s in range(0, len(group), cfg.index.batch_size):
                chunk = group[s:s + cfg.index.batch_size]
                ids, am = tokenize(tok, [it.text for it in chunk], cfg.index.max_tokens * 2, c.g.device)
                if bar is not None:
                    bar.update(len(chunk))
                yield Batch(cf, cf.generalist_pass(ids, am), ids, am, chunk)


def _losses(b: Batch, plans: list[Plan]) -> list[float]:
    return token_nll(b.c.composed_logits(b.gp, plans, "mix"), b.ids, b.am).tolist()


def _scaled(c, b: Batch, row: int, domain: str, gamma: float) -> Plan:
    """The specialist of ``domain`` alone at strength ``gamma``: G + gamma * (S - G)."""
    i = c.domains.index(domain)
    w = torch.zeros(1 + len(c.domains), c.d)
    w[0] = 1.0 - gamma
    w[1 + i] = gamma
    return Plan("scaled", "params", b.gp.alpha[row], [i], source_weights=w)


def strengths(c, batches, bar) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Step 1: each specialist domain's strength (argmin of its probes' mean loss over STRENGTHS)."""
    per: dict[str, dict[float, list[float]]] = {d: {g: [] for g in STRENGTHS} for d in c.domains}
    for b in batches:
        for g in STRENGTHS:
            plans = [_scaled(c, b, r, it.domains[0], g) for r, it in enumerate(b.items)]
            for it, v in zip(b.items, _losses(b, plans)):
                per[it.domains[0]][g].append(v)
            bar.update(len(b.items))
    curves = {d: {str(g): mean(v) for g, v in gs.items()} for d, gs in per.items()}
    # argmin; among equal losses the value closest to 1 (the specialist as trained)
    best = {d: min(STRENGTHS, key=lambda g: (curves[d][str(g)], abs(g - 1.0))) for d in c.domains}
    return best, curves


def _params(name: str, s: float | None, strength: dict[str, float]) -> CompositionParams:
    if name == "paper":
        return CompositionParams(mode="constellation", weighting="paper", strength=strength)
    if WEIGHTINGS[name].profile is not None:  # an adaptive weighting's bands choose among softmax temperatures
        return CompositionParams(mode="constellation", weighting="softmax", sharpness=s, strength=strength)
    return CompositionParams(mode="constellation", weighting=name, sharpness=s, strength=strength)


REFERENCES = {"generalist": CompositionParams(mode="generalist"), "routed": CompositionParams(mode="routed"),
              "paper": CompositionParams(mode="paper")}


def _grid(name: str) -> tuple:
    w = WEIGHTINGS[name]
    return w.grid if w.sharpness else TEMPERATURES if w.profile is not None else (None,)


def item_losses(batches, candidates: dict, top_k: int, bar) -> list[Scored]:
    """Every candidate composition's loss on every calibration item, with the item's selected alphas
    (every candidate on a batch before the next batch's generalist pass; equal compositions once)."""
    unique: dict[str, list] = {}
    for key, params in candidates.items():
        unique.setdefault(params.model_dump_json(), [params, []])[1].append(key)
    rows: list[Scored] = []
    for b in batches:
        got = [Scored(it.kind, it.fold, b.gp.alpha[r][top_k_of(b.gp.alpha[r], top_k)])
               for r, it in enumerate(b.items)]
        for params, keys in unique.values():
            plans = [b.c.plan(b.gp, r, params) for r in range(len(b.items))]
            for row, v in zip(got, _losses(b, plans)):
                row.losses.update({k: v for k in keys})
            bar.update(len(b.items))
        rows += got
    return rows


def fit(rows: list[Scored], name: str):
    """A weighting's parameters fitted to ``rows``: its sharpness, its bands, or None (the paper's rule)."""
    w = WEIGHTINGS[name]
    if w.profile is not None:
        return fit_bands(rows, name, TEMPERATURES, w.profile)
    return fit_grid(rows, name, w.grid) if w.sharpness else None


def loss_with(row: Scored, name: str, params) -> float:
    if isinstance(params, Bands):
        return row.losses[(name, str(params.temperature(WEIGHTINGS[name].profile(row.alpha))))]
    return row.losses[(name, str(params))]


def sharpness(rows: list[Scored], weightings) -> dict[str, dict]:
    """Step 2: each weighting fitted on the whole set (``best``: a sharpness, ``Bands`` or None), its
    loss per item kind, the loss of each grid value (``curve``), and its held-out loss."""
    out = {}
    for name in weightings:
        best = fit(rows, name)
        curve = {str(s): wmean(rows, lambda r: r.losses[(name, str(s))]) for s in _grid(name)} \
            if WEIGHTINGS[name].sharpness else {}
        out[name] = {"best": best, "curve": curve, "loss": by_kind(rows, lambda r: loss_with(r, name, best)),
                     "held_out": held_out(rows, lambda rs: fit(rs, name), lambda r, p: loss_with(r, name, p))}
    return out


def calibrate(c, tok, probes: dict[str, list[str]], fps: dict[str, torch.Tensor], cfg,
              weightings=DEFAULT_WEIGHTINGS, strength: dict[str, float] | None = None, quiet: bool = False,
              mixed: list[tuple[str, list[str]]] = (), choices=CHOICES) -> dict:
    """The manifest's ``calibration`` section (see the module doc). ``fps``: every specialist
    domain's probe fingerprints ``[n, d]`` in probe order. ``strength`` given: step 1 is skipped.
    ``choices``: the weightings that may become the index's default."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    specialists = list(c.domains)
    folds = n_folds(probes, specialists)
    if folds < 2:
        return {"skipped": "calibration needs at least 2 index probes per specialist domain (cross-fitting)"}
    items = calibration_items(probes, specialists, folds, [m for m in mixed if set(m[1]) <= set(specialists)])
    names = ["paper"] + [w for w in weightings if w != "paper"]

    def candidates(gamma: dict[str, float]) -> dict:
        out = {(n, str(s)): _params(n, s, gamma) for n in names for s in _grid(n)}
        return out | {("ref", k): p for k, p in REFERENCES.items()}

    n_single = sum(it.kind == "single" for it in items)
    total = len(items) * (1 + len({p.model_dump_json() for p in candidates({}).values()})) \
        + (0 if strength is not None else n_single * (1 + len(STRENGTHS)))
    with tqdm(total=total, desc="calibrating the weighting", unit="pass", file=sys.stderr, disable=quiet) as bar:
        try:
            curves = None
            if strength is None:
                strength, curves = strengths(c, _batches(c, tok, items, fps, cfg, folds, ("single",), bar), bar)
            rows = item_losses(_batches(c, tok, items, fps, cfg, folds, bar=bar), candidates(strength),
                               c.settings.top_k, bar)
        except basis_mod.BasisError as e:
            return {"skipped": f"a fold's centroids have no basis ({e})"}
    found = sharpness(balance(rows), names)
    if not all(math.isfinite(f["loss"]["all"]) and math.isfinite(f["held_out"]) for f in found.values()):
        return {"skipped": "calibration losses are not finite"}
    eligible = [n for n in names if n in choices] or names
    chosen = min(eligible, key=lambda n: (round(found[n]["held_out"], 9), n != "softmax"))
    return {
        "weighting": chosen,
        "chosen_by": "the lowest held-out loss (each fold scored with the parameters fitted on the others) among "
                     + ", ".join(f"{n} {found[n]['held_out']:.4f}" for n in eligible),
        "domains": specialists,  # the catalog it was measured on
        "sharpness": {n: f["best"] for n, f in found.items() if WEIGHTINGS[n].sharpness},
        "bands": {n: f["best"].doc() for n, f in found.items() if isinstance(f["best"], Bands)},
        "strength": {d: float(strength[d]) for d in specialists},
        "loss": {n: f["loss"] for n, f in found.items()},
        "held_out_loss": {n: f["held_out"] for n, f in found.items()},
        "reference_loss": {k: by_kind(rows, lambda r: r.losses[("ref", k)]) for k in REFERENCES},
        "sharpness_curves": {n: f["curve"] for n, f in found.items() if f["curve"]},
        "strength_curves": curves,
        "profile": {k: quartiles(second_alpha(r.alpha) for r in rows if r.kind == k) for k in KINDS},
        "folds": folds,
        "items": {k: sum(it.kind == k for it in items) for k in KINDS},
        "objective": "mean next-token NLL per item kind (single-domain probes, controls, mixed probes, joined pairs "
                     "of probes; cross-fitted: each fold's alphas from the other folds' centroids), the kinds "
                     "weighted equally",
        "seconds": round(time.perf_counter() - t0, 1),
    }


def carried(calibration: dict | None, domains: list[str], changed: str | None) -> dict | None:
    """A catalog change keeps the index's calibration: strengths of the domains still there (the
    changed domain's dropped: strength 1 until the next ``index build``), listed as uncalibrated."""
    if not calibration or "weighting" not in calibration:
        return calibration
    out = dict(calibration)
    out["strength"] = {d: g for d, g in calibration.get("strength", {}).items() if d in domains and d != changed}
    stale = sorted(set(calibration.get("uncalibrated", [])) | ({changed} if changed in domains else set()))
    out["uncalibrated"] = [d for d in stale if d in domains]
    return out
