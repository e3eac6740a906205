"""``constellation demo report``: the demo's results table, measured on its evaluation probes."""

from __future__ import annotations

import time
from pathlib import Path

from composer.modes import CompositionParams
from eval.run import index_probe_texts, mean, measure, rate_ci, retrieval, wins

HERE = Path(__file__).parent


def report(config: Path, probes: Path = HERE / "probes" / "eval.json", quiet: bool = False) -> str:
    from index_store.loader import load_constellation
    from index_store.probes import load_probes
    from index_store.store import recommendation_note

    t0 = time.perf_counter()
    loaded = load_constellation(config)
    c = loaded.constellation
    doms = load_probes(probes)
    index_probes = index_probe_texts(loaded)
    which = {"generalist": CompositionParams(mode="generalist"),
             "constellation": CompositionParams(mode="constellation")}
    for d in c.domains:
        which[f"spec:{d}"] = CompositionParams(mode="weights", weights={d: 1.0})
    items = [(t, [d]) for d in c.domains for t in doms.get(d, [])]
    res = measure(loaded, c, items, which, "evaluation probes", quiet)
    rows = []
    for dom in c.domains:
        rs = [r for r in res if r.domains == [dom]]
        if rs:
            rows.append((dom, len(rs), mean(r.losses["generalist"] for r in rs),
                         mean(r.losses[f"spec:{dom}"] for r in rs), mean(r.losses["constellation"] for r in rs),
                         retrieval(rs, c.domains)["top1"], rate_ci(wins(rs, "constellation", "generalist"))["rate"]))
    diag = loaded.manifest["diagnostics"]
    overlap = sum(t in index_probes for ts in doms.values() for t in ts)
    lines = [
        f"Evaluation probes: `{probes.name}` ({sum(r[1] for r in rows)} single-domain probes; "
        f"{overlap} of them also in the index probes" + (" — in-sample figures" if overlap else ", held out") + ").",
        "",
        "| domain | probes | generalist loss | own specialist loss | constellation loss | retrieval top-1 | "
        "constellation win rate vs generalist |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dom, n, lg, ls, lc, top1, wr in rows:
        lines.append(f"| {dom} | {n} | {lg:.3f} | {ls:.3f} | {lc:.3f} | {top1:.2f} | {wr:.2f} |")
    lines.append(f"| **all** | {len(res)} | {mean(r.losses['generalist'] for r in res):.3f} | "
                 f"{mean(r.losses[f'spec:{r.domains[0]}'] for r in res):.3f} | "
                 f"{mean(r.losses['constellation'] for r in res):.3f} | {retrieval(res, c.domains)['top1']:.2f} | "
                 f"{rate_ci(wins(res, 'constellation', 'generalist'))['rate']:.2f} |")
    lines += ["", "Index diagnostics (raw centroid cosine, paper Table 1 layout):", "",
              "| | " + " | ".join(diag["domains"]) + " |", "| --- |" + " ---: |" * len(diag["domains"])]
    for d, row in zip(diag["domains"], diag["raw_cosine"]):
        lines.append(f"| {d} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    lines += ["", f"- mean collinearity: {diag['mean_collinearity']:.4f}",
              f"- post-orthogonalisation max |cos|: {diag['post_gs_max_abs_cos']:.1e}",
              "- Gram-Schmidt residual ratios (config order): "
              + ", ".join(f"{d} {diag['residual_ratios'][d]:.4f}" for d in diag["domains"]),
              f"- recommendation: {recommendation_note(diag, c.settings.default_mode)}",
              f"- basis: {loaded.manifest['settings']['basis']}; composition: top_k {c.settings.top_k}, "
              f"L {c.settings.layers}, policy {c.settings.policy}, signature {c.settings.signature}",
              f"- measured in {time.perf_counter() - t0:.0f} s on {loaded.report['device']} "
              f"({loaded.report['dtype']})"]
    return "\n".join(lines) + "\n"


