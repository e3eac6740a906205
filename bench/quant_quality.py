"""What quantizing the generalist does to the model and to the index, on the demo's evaluation probes.

    python -m bench.quant_quality [--config CONF] [--probes demo/probes/eval.json] [--formats int8,int4]

For bf16 and each quantized format (``[runtime].weights``; each needs its own index: ``constellation
index build --weights …``): the generalist's mean next-token NLL over the probes (every real token,
texts truncated to 256 tokens), retrieval top-1 (argmax alpha = the probe's domain, single-domain
probes with a specialist), and how far each probe's alpha moves from bf16's (mean and largest
|difference|, and how many probes keep their top domain). ``constellation eval --weights`` gives the
composition's losses and win rates in each format; this is the part about the weights themselves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.quant_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a constellation.toml (default: the embedded demo's)")
    p.add_argument("--probes", default="demo/probes/eval.json", help="single-domain probes (default: the demo's "
                   "evaluation probes)")
    p.add_argument("--formats", default="int8,int4", help="quantized formats beside bf16 (default int8,int4)")
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args(argv)


@torch.inference_mode()
def mean_nll(loaded, texts: list[str], batch: int = 8) -> float:
    from index_store.models import tokenize

    g, total, count = loaded.constellation.g, 0.0, 0
    for i in range(0, len(texts), batch):
        ids, am = tokenize(loaded.tokenizer, texts[i:i + batch], 256, g.device)
        logits = g.forward(ids, am).float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        real = (am[:, 1:] * am[:, :-1]).flatten().bool()
        total += float(nll[real].double().sum())
        count += int(real.sum())
    return total / count


def main(argv=None) -> int:
    args = parse_args(argv)
    from demo.build import demo_config
    from index_store.config import load_config
    from index_store.loader import load_constellation
    from index_store.probes import load_probes

    cfg = load_config(Path(args.config) if args.config else demo_config())
    probes = load_probes(Path(args.probes))
    texts = [t for ts in probes.values() for t in ts]
    rows, alphas = [], {}
    for fmt in ["bf16"] + [f.strip() for f in args.formats.split(",") if f.strip()]:
        loaded = load_constellation(cfg.with_weights(fmt))
        c = loaded.constellation
        al, hits, n = [], 0, 0
        for dom, ts in probes.items():
            for i in range(0, len(ts), 8):
                a = loaded.analyze(ts[i:i + 8]).alpha.float()
                al.append(a)
                if dom in c.domains:
                    hits += sum(c.domains[int(j)] == dom for j in a.argmax(-1))
                    n += a.shape[0]
        alphas[fmt] = torch.cat(al)
        row = {"weights": fmt, "generalist_nll": round(mean_nll(loaded, texts), 4), "retrieval_top1": round(hits / n, 4),
               "resident_mib": round(c.resident_bytes()["generalist"] / 2**20, 1)}
        if fmt != "bf16":
            d = (alphas[fmt] - alphas["bf16"]).abs()
            same = int((alphas[fmt].argmax(-1) == alphas["bf16"].argmax(-1)).sum())
            row.update(nll_vs_bf16=round(row["generalist_nll"] - rows[0]["generalist_nll"], 4),
                       alpha_diff_mean=round(float(d.mean()), 4), alpha_diff_max=round(float(d.max()), 4),
                       same_top_domain=f"{same}/{d.shape[0]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'weights':8s} {'MiB':>7s} {'NLL':>7s} {'vs bf16':>8s} {'top-1':>6s} {'|d alpha| mean/max':>19s} same top")
    for r in rows:
        print(f"{r['weights']:8s} {r['resident_mib']:7.1f} {r['generalist_nll']:7.4f} {r.get('nll_vs_bf16', 0):+8.4f} "
              f"{r['retrieval_top1']:6.3f} {r.get('alpha_diff_mean', 0):9.4f}/{r.get('alpha_diff_max', 0):<9.4f} "
              f"{r.get('same_top_domain', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
