"""Sweeps and ablations of ``constellation eval``: the noise sweep, one setting changed at a time,
and the weightings (docs/weightings.md): each calibrated on the index probes, never on these."""

from __future__ import annotations

from dataclasses import replace

import torch

from composer import basis as basis_mod
from composer.constellation import Constellation
from composer.modes import CompositionParams
from composer.weightings import WEIGHTINGS
from .passes import cross_domain, retrieval
from .stats import mean, mean_ci, rate_ci, split_halves, wins

NOISE = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1)


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


def sweep_noise(loaded, c, raw_c, cross, crows, quiet, seed: int) -> dict:
    from .run import measure

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
    from .run import measure

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


def _calibrate_others(loaded, c, names: list[str], strength: dict[str, float], quiet: bool) -> dict:
    """Each weighting's sharpness calibrated as ``index build`` does, on the index probes."""
    from index_store.calibrate import calibrate
    from index_store.fingerprints import fingerprints
    from index_store.probes import load_mixed, load_probes

    cfg = loaded.config
    probes = load_probes(cfg.index.probes)
    fps = {d: fingerprints(c.g, loaded.tokenizer, probes[d], cfg.index.max_tokens, cfg.index.batch_size)
           for d in c.domains}
    return calibrate(c, loaded.tokenizer, probes, fps, cfg, weightings=names, strength=strength, quiet=quiet,
                     mixed=load_mixed(cfg.index.probes))


def _summary(s_rows, x_rows, name: str, domains: list[str], lam) -> dict:
    own = lambda r: r.losses[f"spec:{r.domains[0]}"]  # noqa: E731
    best = lambda r: min(r.losses[f"spec:{d}"] for d in domains)  # noqa: E731
    spec = [r for r in s_rows if r.domains[0] in domains]
    doc = {"single_win_vs_own": rate_ci(wins(spec, name, own)),
           "single_win_vs_generalist": rate_ci(wins(spec, name, "generalist")),
           "single_mean_loss": mean_ci([r.losses[name] for r in spec]),
           "single_mean_entropy_bits": mean(r.entropy[name] for r in spec)}
    if x_rows:
        doc["cross_win_vs_best_single"] = rate_ci(wins(x_rows, name, best))
        doc["cross_win_vs_task_arithmetic"] = rate_ci(wins(split_halves(x_rows)[1], name, f"ta:{lam}"))
        doc["cross_mean_loss"] = mean_ci([r.losses[name] for r in x_rows])
    return doc


def weighting_ablations(loaded, c, items, cross, srows, crows, quiet) -> dict:
    """The calibrated composition taken apart: the paper's rule, strength 1, the router with and without
    the strengths, every other weighting at its own calibrated sharpness, and the default weighting's
    sharpness swept over its grid on these probes (to show where sharpening loses, not to choose)."""
    from .run import measure

    cal = c.settings.calibrated
    lam = cross_domain(crows, c.domains)["task_arithmetic"]["lambda"] if crows else None
    ones = {d: 1.0 for d in c.domains}
    others = [w for w in WEIGHTINGS if w not in ("paper", cal.weighting) and WEIGHTINGS[w].sharpness]
    found = _calibrate_others(loaded, c, others, {d: cal.strength.get(d, 1.0) for d in c.domains}, quiet)
    cases = {
        "strength 1 (weighting and sharpness only)": CompositionParams(mode="constellation", strength=ones),
        "paper's rule with the strengths": CompositionParams(mode="constellation", weighting="paper"),
        "K=1 with the strengths (a router with them)": CompositionParams(mode="constellation", top_k=1),
    }
    for w in others:
        s = found.get("sharpness", {}).get(w)
        if s is not None:
            cases[f"weighting={w} ({WEIGHTINGS[w].sharpness} {s:g}, calibrated)"] = CompositionParams(
                mode="constellation", weighting=w, sharpness=s)
    swept = cal.weighting if WEIGHTINGS[cal.weighting].sharpness else "softmax"  # adaptive: its temperatures
    for s in WEIGHTINGS[swept].grid:
        cases[f"{swept} {WEIGHTINGS[swept].sharpness} {s:g}"] = CompositionParams(
            mode="constellation", weighting=swept, sharpness=s)
    s_rows = measure(loaded, c, items, cases, "weightings", quiet)
    x_rows = measure(loaded, c, cross, cases, "weightings (cross)", quiet) if cross else []
    calibrated = [k for k in (srows[0].losses if srows else {}) if k.startswith("w:")]
    for new, base in zip(s_rows + x_rows, srows + crows):
        for k in ("generalist", *(f"spec:{d}" for d in c.domains), "constellation", "paper", "routed", *calibrated,
                  *((f"ta:{lam}",) if lam is not None else ())):
            new.losses[k] = base.losses[k]
            new.entropy[k] = base.entropy.get(k, 0.0)
    out = {"calibrated on the index probes": {k: found.get(k) for k in ("sharpness", "loss", "skipped")}, "rows": {}}
    for name in ("constellation", "paper", "routed", *calibrated, *cases):
        label = {"constellation": f"calibrated (the default: {cal.weighting})", "paper": "the paper's rule (mode paper)",
                 "routed": "router, K=1 (mode routed)"}.get(name, name)
        label = f"weighting={name[2:]} (calibrated at index build)" if name.startswith("w:") else label
        out["rows"][label] = _summary(s_rows, x_rows, name, c.domains, lam)
    return out
