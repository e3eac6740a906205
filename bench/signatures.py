"""How far the in-pass ``generalist`` signature is from the exact per-specialist ``full`` one.

    .venv/bin/python -m bench.signatures [--config CONFIG] [--probes demo/probes/eval.json] [--limit 24]

For every probe (single-domain probes of the given file, all domains), the constellation plan is
built twice on the same generalist pass: with ``signature = "generalist"`` (node weights per
composed block, computed inside the generalist pass) and with ``signature = "full"`` (each selected
specialist's own forward pass, one d-vector for all blocks). Printed, over probes:

- Pearson correlation of the two node-weight vectors (each block's ``K x d`` weights against the
  full signature's), its mean and minimum;
- mean |Δw| per node, and the share of nodes whose largest-weight specialist is the same;
- mean node entropy under each;
- the loss of the composed model under each, and the share of probes where ``generalist`` is
  lower (the eval's win rates under each signature: ``constellation eval`` with the config's
  ``signature`` set, see docs/lowrank.md);
- time per prompt for the signatures alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="constellation config (default: the demo)")
    ap.add_argument("--probes", default=str(Path(__file__).parents[1] / "demo" / "probes" / "eval.json"))
    ap.add_argument("--limit", type=int, default=24, help="probes per domain (default 24)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    from composer.constellation import Constellation
    from composer.modes import CompositionParams
    from demo.build import demo_config
    from eval.core import token_nll
    from index_store.loader import load_constellation
    from index_store.probes import load_probes

    loaded = load_constellation(Path(args.config) if args.config else demo_config())
    base = loaded.constellation

    def variant(sig: str) -> Constellation:
        return Constellation(base.g, dict(zip(base.domains, base.specialists)), base.basis,
                             replace(base.settings, signature=sig), base.differences)

    gen, full = variant("generalist"), variant("full")
    probes = load_probes(Path(args.probes))
    texts = [t for d in base.domains if d in probes for t in probes[d][: args.limit]]
    corr, dw, agree, ent_g, ent_f, wins, loss_g, loss_f, t_g, t_f = ([] for _ in range(10))
    params = CompositionParams(mode="constellation")
    for text in texts:
        ids, am = loaded.encode([text])
        t0 = time.perf_counter()
        gp_g = gen.generalist_pass(ids, am)
        pg = gen.plan(gp_g, 0, params)
        t1 = time.perf_counter()
        gp_f = full.generalist_pass(ids, am)
        pf = full.plan(gp_f, 0, params)
        t2 = time.perf_counter()
        t_g.append(t1 - t0)
        t_f.append(t2 - t1)
        wg = pg.node_weights if pg.node_weights.dim() == 3 else pg.node_weights[None]
        wf = pf.node_weights
        corr.extend(_pearson(w, wf) for w in wg)
        dw.append(float((wg - wf[None]).abs().mean()))
        agree.append(float((wg.argmax(-2) == wf.argmax(-2)[None]).float().mean()))
        ent_g.append(pg.mean_entropy_bits)
        ent_f.append(pf.mean_entropy_bits)
        lg = float(token_nll(gen.composed_logits(gp_g, [pg], "mix"), ids, am)[0])
        lf = float(token_nll(full.composed_logits(gp_f, [pf], "mix"), ids, am)[0])
        loss_g.append(lg)
        loss_f.append(lf)
        wins.append(lg < lf)
    out = {
        "probes": len(texts),
        "composed_layers": base.layers,
        "node_weight_correlation_mean": statistics.mean(corr),
        "node_weight_correlation_min": min(corr),
        "mean_abs_weight_difference": statistics.mean(dw),
        "same_top_specialist_per_node": statistics.mean(agree),
        "entropy_bits": {"generalist": statistics.mean(ent_g), "full": statistics.mean(ent_f)},
        "mean_loss": {"generalist": statistics.mean(loss_g), "full": statistics.mean(loss_f)},
        "generalist_lower_loss_share": statistics.mean(wins),
        "seconds_per_prompt_pass_and_plan": {"generalist": statistics.median(t_g), "full": statistics.median(t_f)},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
