"""The paper's passes 2-5 over measured rows (DESIGN §6), with bootstrap intervals on every rate
and every mean loss, and the paired difference of the constellation's loss to each alternative."""

from __future__ import annotations

from .stats import choose_lambda, mean, mean_ci, pearson, rate_ci, split_halves, wins

# optional rows: compared against when the run measured them (and ``w:<weighting>``: each calibrated weighting)
OPTIONAL = ("routed", "paper")


def _optional(rows) -> list[str]:
    return [k for k in rows[0].losses if k in OPTIONAL or k.startswith("w:")] if rows else []


def retrieval(rows, domains: list[str]) -> dict:
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


def correlation(rows, domains: list[str]) -> dict:
    xs, ys = [], []
    for r in rows:
        for i, d in enumerate(domains):
            xs.append(r.alpha[i] * r.sig_norm[i])
            ys.append(r.losses[f"spec:{d}"])
    return {"pearson_r": pearson(xs, ys), "pairs": len(xs),
            "signal": "alpha_i x ||a_i|| (activation signature norm)", "target": "loss of specialist i"}


def _losses(rows, getters: dict) -> tuple[dict, dict, dict]:
    """Mean loss of each alternative, its bootstrap interval, and the constellation's paired difference."""
    means = {k: mean(g(r) for r in rows) for k, g in getters.items()}
    cis = {k: mean_ci([g(r) for r in rows])["ci95"] for k, g in getters.items()}
    diff = {k: mean_ci([r.losses["constellation"] - g(r) for r in rows]) for k, g in getters.items()
            if k != "constellation"}
    return means, cis, diff


def _get(name: str):
    return lambda r: r.losses[name]


def single_domain(rows, domains: list[str]) -> dict:
    spec = [r for r in rows if len(r.domains) == 1 and r.domains[0] in domains]
    oracle = lambda r: r.losses[f"spec:{r.domains[0]}"]  # noqa: E731
    sel, rep = split_halves(spec)
    ta = choose_lambda(sel, rep)
    extra = _optional(spec)
    getters = {"constellation": _get("constellation"), "generalist": _get("generalist"),
               "uniform": _get("uniform"), "oracle": oracle, "task_arithmetic": _get(f"ta:{ta['lambda']}"),
               **{k: _get(k) for k in extra}}
    means, cis, diff = _losses(spec, getters)
    out = {
        "n": len(spec),
        "win_rate": {"generalist": rate_ci(wins(spec, "constellation", "generalist")),
                     "uniform": rate_ci(wins(spec, "constellation", "uniform")),
                     "oracle": rate_ci(wins(spec, "constellation", oracle)),
                     "task_arithmetic": ta["win_rate"],
                     **{k: rate_ci(wins(spec, "constellation", k)) for k in extra}},
        "task_arithmetic": ta,
        "mean_loss": means, "mean_loss_ci95": cis, "loss_difference": diff,
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


def cross_domain(rows, domains: list[str]) -> dict:
    best_single = lambda r: min(r.losses[f"spec:{d}"] for d in domains)  # noqa: E731
    sel, rep = split_halves(rows)
    ta = choose_lambda(sel, rep)
    extra = _optional(rows)
    getters = {"constellation": _get("constellation"), "generalist": _get("generalist"),
               "best_single": best_single, "logit": _get("logit"),
               "task_arithmetic": _get(f"ta:{ta['lambda']}"), **{k: _get(k) for k in extra}}
    means, cis, diff = _losses(rows, getters)
    return {
        "n": len(rows),
        "win_rate": {"generalist": rate_ci(wins(rows, "constellation", "generalist")),
                     "best_single": rate_ci(wins(rows, "constellation", best_single)),
                     "task_arithmetic": ta["win_rate"],
                     "logit": rate_ci(wins(rows, "constellation", "logit")),
                     **{k: rate_ci(wins(rows, "constellation", k)) for k in extra}},
        "task_arithmetic": ta,
        "mean_loss": means, "mean_loss_ci95": cis, "loss_difference": diff,
        "mean_entropy_bits": mean(r.plan["entropy"] for r in rows),
    }


TARGETS = (  # issue 14's targets: (part, key, threshold)
    ("single_domain", "oracle", 0.55),
    ("single_domain", "generalist", 0.95),
    ("cross_domain", "best_single", 0.60),
    ("cross_domain", "task_arithmetic", 0.70),
)


def targets(results: dict) -> list[dict]:
    """Each target: the value measured, whether it is met, by how much it is missed."""
    out = []
    for part, key, thr in TARGETS:
        wr = results.get(part, {}).get("win_rate", {}).get(key)
        if wr and wr.get("rate") is not None:
            out.append({"target": f"{part}: win vs {key} >= {thr:.0%}", "value": wr["rate"], "ci95": wr["ci95"],
                        "met": wr["rate"] >= thr, "short_by": max(0.0, thr - wr["rate"])})
    sd = results.get("single_domain", {})
    if "routed" in sd.get("mean_loss", {}):
        c, k1 = sd["mean_loss"]["constellation"], sd["mean_loss"]["routed"]
        out.append({"target": "single_domain: mean loss below the K = 1 router's", "value": c, "router": k1,
                    "difference": sd["loss_difference"]["routed"], "met": c < k1, "short_by": max(0.0, c - k1)})
    return out


def _diff(rows, a: str, b) -> dict:
    get = b if callable(b) else (lambda r: r.losses[b])
    return mean_ci([r.losses[a] - get(r) for r in rows])


def adaptive_targets(srows, crows, domains: list[str], name: str = "w:adaptive", before: str = "w:softmax") -> dict:
    """Issue 25's targets for the adaptive weighting (whether or not it is the index's default): cross-domain
    mean loss no worse than the paper's rule's (paired interval covering or below 0), wins vs task
    arithmetic >= 70% and vs the best single specialist >= 55%; single-domain mean loss within +0.003
    of the softmax weighting's (the default before it), wins vs the own specialist >= 55%, vs the
    generalist >= 93%."""
    spec = [r for r in srows if len(r.domains) == 1 and r.domains[0] in domains]
    own = lambda r: r.losses[f"spec:{r.domains[0]}"]  # noqa: E731
    best = lambda r: min(r.losses[f"spec:{d}"] for d in domains)  # noqa: E731
    out = []

    def rate(label, w, thr):
        got = rate_ci(w)
        out.append({"target": f"{label} >= {thr:.0%}", "value": got["rate"], "ci95": got["ci95"], "n": got["n"],
                    "met": got["rate"] is not None and got["rate"] >= thr,
                    "short_by": max(0.0, thr - (got["rate"] or 0.0))})

    def loss(label, d, limit, judged):  # judged: the difference's "mean", or its interval's lower end
        v = d["ci95"][0] if judged == "interval" else d["mean"]
        out.append({"target": label, "difference": d, "met": v is not None and v <= limit,
                    "short_by": max(0.0, v - limit)})
    if crows:
        loss("cross: mean loss no worse than the paper's rule (interval covers or is below 0)",
             _diff(crows, name, "paper"), 0.0, "interval")
        lam = cross_domain(crows, domains)["task_arithmetic"]["lambda"]
        rate("cross: win vs task arithmetic (report half)", wins(split_halves(crows)[1], name, f"ta:{lam}"), 0.70)
        rate("cross: win vs the best single specialist", wins(crows, name, best), 0.55)
    if before in (spec[0].losses if spec else {}):
        loss("single: mean loss within +0.003 of the softmax weighting's", _diff(spec, name, before), 0.003, "mean")
    rate("single: win vs the own specialist", wins(spec, name, own), 0.55)
    rate("single: win vs the generalist", wins(spec, name, "generalist"), 0.93)
    return {"weighting": name[2:], "targets": out,
            "single_mean_loss": mean_ci([r.losses[name] for r in spec]),
            "cross_mean_loss": mean_ci([r.losses[name] for r in crows]) if crows else None,
            "entropy_bits": {"single": mean(r.entropy[name] for r in spec),
                             "cross": mean(r.entropy[name] for r in crows) if crows else None}}
