"""The evaluation's PNG plots and its readable ``report.md``."""

from __future__ import annotations

from pathlib import Path


def _fmt(x, pct=True):
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _wr(d: dict) -> str:
    if not d or d.get("rate") is None:
        return "—"
    lo, hi = d["ci95"]
    return f"{100 * d['rate']:.1f}% [{100 * lo:.0f}–{100 * hi:.0f}] (n={d['n']})"


def _ci(d) -> str:
    if not d or d.get("mean") is None:
        return "—"
    return f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"


def _loss(part: dict, k: str) -> str:
    ci = part.get("mean_loss_ci95", {}).get(k)
    v = part["mean_loss"][k]
    return f"{v:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def _win_table(part: dict) -> list[str]:
    rows = ["| constellation vs | win rate [95% CI] | mean loss of the alternative [95% CI] | "
            "constellation − alternative, mean per probe [95% CI] |", "| --- | --- | ---: | ---: |"]
    rows += [f"| {k} | {_wr(v)} | {_loss(part, k)} | {_ci(part.get('loss_difference', {}).get(k))} |"
             for k, v in part["win_rate"].items()]
    return rows + [f"| *(the constellation itself)* | | {_loss(part, 'constellation')} | |"]


def _targets(r: dict) -> list[str]:
    L = ["## Targets\n", "| target | measured | met | short by |", "| --- | --- | :---: | ---: |"]
    for t in r.get("targets", []):
        if "router" in t:
            got = (f"{t['value']:.4f} vs router {t['router']:.4f} (difference {_ci(t['difference'])})")
            short = f"{t['short_by']:.4f} nats" if not t["met"] else ""
        else:
            got = f"{100 * t['value']:.1f}% [{100 * t['ci95'][0]:.0f}–{100 * t['ci95'][1]:.0f}]"
            short = f"{100 * t['short_by']:.1f} points" if not t["met"] else ""
        L.append(f"| {t['target']} | {got} | {'yes' if t['met'] else 'no'} | {short} |")
    return L + [""]


def _ml(d) -> str:
    return "—" if not d or d.get("mean") is None else f"{d['mean']:.4f} [{d['ci95'][0]:.4f}, {d['ci95'][1]:.4f}]"


def _adaptive(a: dict, cal: dict) -> list[str]:
    bands = (cal.get("bands") or {}).get(a["weighting"])
    how = ""
    if bands:
        from composer.weightings import WEIGHTINGS, Bands

        how = f" ({Bands.of(bands).describe(WEIGHTINGS[a['weighting']].profile_name)})"
    L = [f"## The adaptive weighting{how}\n",
         f"Measured whether or not it is the index's default (default: `{cal.get('weighting', 'paper')}`). Mean loss "
         f"single {_ml(a['single_mean_loss'])}, cross {_ml(a['cross_mean_loss'])}; "
         f"node entropy single {_fmt(a['entropy_bits']['single'], pct=False)}, cross "
         f"{_fmt(a['entropy_bits']['cross'], pct=False)} bits.\n",
         "| target | measured | met | short by |", "| --- | --- | :---: | ---: |"]
    for t in a["targets"]:
        if "difference" in t:
            got, short = f"difference {_ci(t['difference'])}", f"{t['short_by']:.4f} nats"
        else:
            got, short = _wr({**t, "rate": t["value"]}), f"{100 * t['short_by']:.1f} points"
        L.append(f"| {t['target']} | {got} | {'yes' if t['met'] else 'no'} | {'' if t['met'] else short} |")
    return L + [""]


def _weightings(w: dict) -> list[str]:
    L = ["## Weightings, taken apart\n",
         "Every row is measured on these probes; every sharpness was calibrated on the index probes only "
         "(`index build`, or the same calibration rerun for the other weightings), except the sweep rows, "
         "which show the default weighting at each value of its grid. Cross win vs TA is on the report half.\n",
         "| composition | single: win vs own specialist | single: win vs generalist | single: mean loss [95% CI] | "
         "cross: win vs best single | cross: win vs TA | cross: mean loss [95% CI] | entropy (bits) |",
         "| --- | --- | --- | ---: | --- | --- | ---: | ---: |"]
    ml = _ml
    for name, v in w["rows"].items():
        L.append(f"| {name} | {_wr(v['single_win_vs_own'])} | {_wr(v['single_win_vs_generalist'])} | "
                 f"{ml(v['single_mean_loss'])} | {_wr(v.get('cross_win_vs_best_single'))} | "
                 f"{_wr(v.get('cross_win_vs_task_arithmetic'))} | {ml(v.get('cross_mean_loss'))} | "
                 f"{_fmt(v['single_mean_entropy_bits'], pct=False)} |")
    return L + [""]


def plots(results: dict, domains: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 1. collinearity heatmap
    m = results["index"]["raw_cosine"]
    fig, ax = plt.subplots(figsize=(1.3 * len(domains) + 2, 1.1 * len(domains) + 1.5))
    im = ax.imshow(m, vmin=min(min(r) for r in m), vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_yticks(range(len(domains)), domains)
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < 0.99 else "black", fontsize=9)
    ax.set_title(f"Raw centroid cosine (mean collinearity {results['index']['mean_collinearity']:.3f})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "collinearity.png", dpi=110)
    plt.close(fig)

    # 2. per-probe domain weights (stacked), single-domain probes grouped by true domain
    rows = [r for r in results["per_probe"]["single"] if r["plan"]]
    if rows:
        fig, ax = plt.subplots(figsize=(max(8, 0.09 * len(rows) + 3), 4))
        colors = plt.get_cmap("tab10")
        bottom = [0.0] * len(rows)
        for k, d in enumerate(domains):
            vals = [r["plan"]["weights"].get(d, 0.0) for r in rows]
            ax.bar(range(len(rows)), vals, bottom=bottom, color=colors(k), label=d, width=1.0)
            bottom = [b + v for b, v in zip(bottom, vals)]
        edges, prev = [], None
        for i, r in enumerate(rows):
            if r["domains"][0] != prev:
                edges.append((i, r["domains"][0]))
                prev = r["domains"][0]
        for i, d in edges:
            ax.axvline(i - 0.5, color="black", lw=0.8)
            ax.text(i + 0.5, 1.02, d, fontsize=8, va="bottom")
        ax.set_ylim(0, 1.12)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_xlabel("single-domain probes, grouped by their domain")
        ax.set_ylabel("mean node weight")
        ax.set_title("Composition per probe: mean node weight of each selected specialist", pad=18)
        ax.legend(loc="upper right", bbox_to_anchor=(1.0, -0.12), ncol=len(domains), fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "domain_weights.png", dpi=110)
        plt.close(fig)

    # 3. win-rate bars with bootstrap CIs
    bars = [(f"single vs {k}", v) for k, v in results["single_domain"]["win_rate"].items()]
    if "cross_domain" in results:
        bars += [(f"cross vs {k}", v) for k, v in results["cross_domain"]["win_rate"].items()]
    bars = [(k, v) for k, v in bars if v.get("rate") is not None]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1.2))
    ys = range(len(bars))
    rates = [v["rate"] for _, v in bars]
    err = [[v["rate"] - v["ci95"][0] for _, v in bars], [v["ci95"][1] - v["rate"] for _, v in bars]]
    ax.barh(list(ys), rates, xerr=err, color=["tab:blue" if k.startswith("single") else "tab:orange" for k, _ in bars],
            capsize=3)
    ax.axvline(0.5, color="gray", ls="--", lw=0.8)
    ax.set_yticks(list(ys), [k for k, _ in bars])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("constellation win rate (strictly lower loss), 95% bootstrap CI")
    ax.set_title("Constellation vs the alternatives")
    fig.tight_layout()
    fig.savefig(out / "win_rates.png", dpi=110)
    plt.close(fig)

    # 4. the noise curve (paper Figure 2 shape)
    sweep = results.get("noise_sweep", {})
    if sweep.get("points"):
        s = [p["s"] for p in sweep["points"]]
        r = [p["win_rate_vs_task_arithmetic"]["rate"] for p in sweep["points"]]
        lo = [p["win_rate_vs_task_arithmetic"]["ci95"][0] for p in sweep["points"]]
        hi = [p["win_rate_vs_task_arithmetic"]["ci95"][1] for p in sweep["points"]]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        xs = range(len(s))
        ax.plot(list(xs), r, marker="o")
        ax.fill_between(list(xs), lo, hi, alpha=0.2)
        ax.set_xticks(list(xs), [str(v) for v in s])
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("noise fraction s")
        ax.set_ylabel("cross-domain win rate vs task arithmetic")
        ax.set_title(f"Stochastic-resonance noise sweep (lambda={sweep['lambda']})")
        fig.tight_layout()
        fig.savefig(out / "noise_sweep.png", dpi=110)
        plt.close(fig)


def write_report(r: dict, out: Path) -> None:
    c = r["constellation"]
    doms = c["domains"]
    L = []
    add = L.append
    add("# Constellation evaluation\n")
    add(f"- constellation: `{c['config']}` — {c['generalist']}, d={c['d']}, domains {', '.join(doms)}")
    s = c["settings"]
    add(f"- settings: basis {s['basis']}, top_k {s['top_k']}, L {s['layers']}, policy {s['policy']}, "
        f"signature {s['signature']}")
    cal = c.get("calibration") or {}
    if "weighting" in cal:
        w = cal["weighting"]
        sh = cal["sharpness"].get(w)
        add(f"- calibrated at index build on held-out index probes ({cal['folds']} folds): weighting {w}"
            + (f", sharpness {sh:g}" if sh is not None else "") + "; strength "
            + ", ".join(f"{d} {g:g}" for d, g in cal["strength"].items())
            + (f"; chosen by {cal['chosen_by']}" if cal.get("chosen_by") else ""))
    else:
        add("- not calibrated: the paper's rule, strength 1")
    p = r["probes"]
    add(f"- probes: single-domain `{p['single']}` ({p['single_n']}), cross-domain `{p['cross']}` ({p['cross_n']})")
    ov = p["overlap_with_index_probes"]
    if p["in_sample"]:
        add(f"- **In-sample:** {ov['single']} single-domain and {ov['cross']} cross-domain evaluation probes are also "
            "index probes (they built the centroids). Figures on them are in-sample, not held-out.")
    else:
        add("- Held out: no evaluation probe is among the probes the index was built from.")
    add(f"- run time: {r.get('seconds', 0):.0f} s\n")
    add("Win rates are the fraction of probes where the constellation's loss (mean next-token NLL over real "
        "tokens) is strictly lower; brackets are 95% bootstrap intervals.\n")

    L.extend(_targets(r))
    add("## Pass 1 — index diagnostics (paper Table 1 layout)\n")
    add("| | " + " | ".join(doms) + " |")
    add("| --- |" + " ---: |" * len(doms))
    for d, row in zip(doms, r["index"]["raw_cosine"]):
        add(f"| {d} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    add("")
    add(f"Mean collinearity {r['index']['mean_collinearity']:.4f}; max |cos| after orthogonalisation "
        f"{r['index']['post_gs_max_abs_cos']:.1e}; Gram-Schmidt residual ratios "
        + ", ".join(f"{d} {r['index']['residual_ratios'][d]:.3f}" for d in doms)
        + f". Recommendation: {r['index']['recommendation_text']}.\n")
    add("![collinearity](collinearity.png)\n")

    rt = r["retrieval"]
    add("## Pass 2 — retrieval (argmax alpha = the probe's domain)\n")
    add("| domain | probes | top-1 | top-3 |")
    add("| --- | ---: | ---: | ---: |")
    for d, v in rt["per_domain"].items():
        add(f"| {d} | {v['n']} | {_fmt(v['top1'])} | {_fmt(v['top3'])} |")
    add(f"| **all** | {sum(v['n'] for v in rt['per_domain'].values())} | **{_fmt(rt['top1'])}** | **{_fmt(rt['top3'])}** |\n")

    co = r["correlation"]
    add("## Pass 3 — does the combined signal track specialist loss?\n")
    add(f"Pearson r between alpha_i × ||a_i|| and specialist i's loss over {co['pairs']} (probe, specialist) pairs: "
        f"**{_fmt(co['pearson_r'], pct=False)}** (negative = more signal, lower loss).\n")

    sd = r["single_domain"]
    add("## Pass 4 — single-domain probes\n")
    L.extend(_win_table(sd))
    add(f"\nConstellation mean loss {_fmt(sd['mean_loss']['constellation'], pct=False)}; Gini of |alpha| "
        f"{_fmt(sd['gini'], pct=False)}; mean node entropy {_fmt(sd['mean_entropy_bits'], pct=False)} bits. "
        f"'oracle' is the probe's own domain specialist.\n")
    ta = sd["task_arithmetic"]
    add(f"Task arithmetic: lambda = {ta['lambda']} chosen on {ta['select_n']} probes (mean loss per lambda: "
        + ", ".join(f"{k}: {v:.3f}" for k, v in ta["select_mean_loss"].items())
        + f"), reported on the other {ta['report_n']}. Beside it, labelled, the paper's per-probe oracle lambda: "
        f"{_wr(ta['win_rate_vs_per_probe_oracle_lambda'])}.\n")
    add("| domain | probes | win vs generalist | win vs oracle | loss G | loss constellation | loss oracle | entropy |")
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for d, v in sd["per_domain"].items():
        add(f"| {d} | {v['n']} | {_fmt(v['win_vs_generalist'])} | {_fmt(v['win_vs_oracle'])} | "
            f"{v['loss']['generalist']:.3f} | {v['loss']['constellation']:.3f} | {v['loss']['oracle']:.3f} | "
            f"{v['entropy_bits']:.2f} |")
    if "controls" in sd:
        cc = sd["controls"]
        add(f"\nControl probes (no specialist; {cc['n']}): constellation vs generalist {_wr(cc['win_vs_generalist'])}, "
            f"mean loss {cc['mean_loss']['constellation']:.3f} vs {cc['mean_loss']['generalist']:.3f}.")
    add("\n![domain weights](domain_weights.png)\n")

    if "cross_domain" in r:
        cd = r["cross_domain"]
        add("## Pass 5 — cross-domain probes\n")
        L.extend(_win_table(cd))
        t = cd["task_arithmetic"]
        add(f"\nConstellation mean loss {_fmt(cd['mean_loss']['constellation'], pct=False)}; mean node entropy "
            f"{_fmt(cd['mean_entropy_bits'], pct=False)} bits. 'best_single' is, per probe, the best of all "
            f"specialists (an oracle). Task arithmetic lambda = {t['lambda']} chosen on {t['select_n']} probes, "
            f"reported on {t['report_n']}; per-probe oracle lambda (the paper's): "
            f"{_wr(t['win_rate_vs_per_probe_oracle_lambda'])}.\n")
    add("![win rates](win_rates.png)\n")

    if r.get("noise_sweep", {}).get("points"):
        ns = r["noise_sweep"]
        add("## Noise sweep (stochastic resonance)\n")
        add("| s | cross-domain win rate vs task arithmetic |")
        add("| ---: | --- |")
        for pt in ns["points"]:
            add(f"| {pt['s']} | {_wr(pt['win_rate_vs_task_arithmetic'])} |")
        add("\n![noise sweep](noise_sweep.png)\n")
    if r.get("adaptive"):
        L.extend(_adaptive(r["adaptive"], r["constellation"].get("calibration") or {}))
    if r.get("weightings"):
        L.extend(_weightings(r["weightings"]))
    if r.get("ablations"):
        add("## Ablations\n")
        add("Each row changes one setting; baselines (generalist, task arithmetic at the chosen lambda) are the "
            "default run's.\n")
        add("| variant | retrieval top-1 | single: win vs generalist | single: mean loss | cross: win vs TA | entropy |")
        add("| --- | ---: | --- | ---: | --- | ---: |")
        for name, v in r["ablations"].items():
            if "skipped" in v:
                add(f"| {name} | skipped: {v['skipped']} | | | | |")
                continue
            add(f"| {name} | {_fmt(v['retrieval_top1'])} | {_wr(v['single_win_vs_generalist'])} | "
                f"{v['single_mean_loss']:.4f} | {_wr(v.get('cross_win_vs_task_arithmetic'))} | "
                f"{_fmt(v['mean_entropy_bits'], pct=False)} |")
        add("")
    (out / "report.md").write_text("\n".join(L) + "\n")


def headline(r: dict) -> str:
    rows = [("retrieval top-1", _fmt(r["retrieval"]["top1"])), ("retrieval top-3", _fmt(r["retrieval"]["top3"]))]
    rows += [(f"single: vs {k}", _wr(v)) for k, v in r["single_domain"]["win_rate"].items()]
    if "cross_domain" in r:
        rows += [(f"cross: vs {k}", _wr(v)) for k, v in r["cross_domain"]["win_rate"].items()]
    rows += [("mean collinearity", f"{r['index']['mean_collinearity']:.4f}")]
    rows += [(f"target {t['target']}", "met" if t["met"] else "missed") for t in r.get("targets", [])]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)
