"""``constellation demo report``: the demo's results table, measured on its evaluation probes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from composer.modes import CompositionParams
from eval.core import evaluate, retrieval, win_rate

HERE = Path(__file__).parent


def report(config: Path, probes: Path = HERE / "probes" / "eval.json", quiet: bool = False) -> str:
    from index_store.loader import load_constellation, load_probes

    t0 = time.perf_counter()
    loaded = load_constellation(config)
    c = loaded.constellation
    doms = load_probes(probes)
    index_probes = set()
    idx = loaded.config.index.probes
    if idx.is_file():
        index_probes = {t for ts in load_probes(idx).values() for t in ts}
    rows, all_results, truth = [], [], []
    for dom in c.domains:
        texts = doms.get(dom, [])
        if not texts:
            continue
        k = c.domains.index(dom)
        res = evaluate(loaded, texts, {
            "generalist": lambda i: CompositionParams(mode="generalist"),
            "specialist": lambda i, d=dom: CompositionParams(mode="weights", weights={d: 1.0}),
            "constellation": lambda i: CompositionParams(mode="constellation"),
        }, desc=f"{dom} probes", quiet=quiet)
        all_results += res
        truth += [k] * len(res)
        mean = lambda key: sum(r.losses[key] for r in res) / len(res)  # noqa: E731
        rows.append((dom, len(res), mean("generalist"), mean("specialist"), mean("constellation"),
                     retrieval(res, [k] * len(res)), win_rate(res, "constellation", "generalist")))
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
    lines.append(f"| **all** | {len(all_results)} | "
                 f"{sum(r.losses['generalist'] for r in all_results) / len(all_results):.3f} | "
                 f"{sum(r.losses['specialist'] for r in all_results) / len(all_results):.3f} | "
                 f"{sum(r.losses['constellation'] for r in all_results) / len(all_results):.3f} | "
                 f"{retrieval(all_results, truth):.2f} | {win_rate(all_results, 'constellation', 'generalist'):.2f} |")
    lines += ["", "Index diagnostics (raw centroid cosine, paper Table 1 layout):", "",
              "| | " + " | ".join(diag["domains"]) + " |", "| --- |" + " ---: |" * len(diag["domains"])]
    for d, row in zip(diag["domains"], diag["raw_cosine"]):
        lines.append(f"| {d} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    lines += ["", f"- mean collinearity: {diag['mean_collinearity']:.4f}",
              f"- post-orthogonalisation max |cos|: {diag['post_gs_max_abs_cos']:.1e}",
              "- Gram-Schmidt residual ratios (config order): "
              + ", ".join(f"{d} {diag['residual_ratios'][d]:.4f}" for d in diag["domains"]),
              f"- recommendation: {diag['recommendation_text']}",
              f"- basis: {loaded.manifest['settings']['basis']}; composition: top_k {c.settings.top_k}, "
              f"L {c.settings.layers}, policy {c.settings.policy}, signature {c.settings.signature}",
              f"- measured in {time.perf_counter() - t0:.0f} s on {loaded.report['device']} "
              f"({loaded.report['dtype']})"]
    return "\n".join(lines) + "\n"


def as_json(text: str) -> str:
    return json.dumps({"markdown": text})
