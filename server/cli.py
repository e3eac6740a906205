"""The ``constellation`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

EPILOG = """examples:
  constellation index build constellation.toml
  constellation index inspect index/ --json
  constellation explain --config constellation.toml "The patient presented with acute dyspnea"
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="constellation",
        description="Per-query composition of domain specialists: build and inspect constellation "
        "indexes, and explain how a prompt would be composed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    idx = sub.add_parser("index", help="build or inspect a constellation index")
    isub = idx.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    isub.required = True
    b = isub.add_parser("build", help="fingerprint the probes with the generalist and store the index",
                        description="Fingerprint every probe with the generalist, build the domain centroids, "
                        "the orthonormal basis ([index].basis) and the diagnostics, and store them "
                        "atomically at [index].path (an existing index is replaced only when the new one "
                        "is complete).")
    b.add_argument("config", metavar="CONFIG", help="constellation config file (TOML)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    i = isub.add_parser("inspect", help="print an index's diagnostics (verifies its checksums first)")
    i.add_argument("index_dir", metavar="INDEX_DIR", help="the index folder")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    e = sub.add_parser("explain", help="show how a prompt would be composed (what /explain returns)",
                       description="Fingerprint PROMPT with the generalist, project it on the index basis and "
                       "print per-domain alpha, the selected specialists, node-weight statistics, entropy, "
                       "Gini and fallback: exactly what the server composes for this prompt.")
    e.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    e.add_argument("--config", help="constellation config (default: the demo constellation)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--node-weights", action="store_true", help="include the K x d node weights")
    e.add_argument("--mode", help="composition mode (default: the config's [composition].mode)")
    e.add_argument("--top-k", type=int, help="override [composition].top_k")
    e.add_argument("--weights", help='per-domain weights for --mode weights, JSON, e.g. \'{"legal": 1}\'')
    e.add_argument("--lambda", dest="lambda_", type=float, help="task-arithmetic lambda / logit scale")
    return p


def _fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def inspect_doc(manifest: dict) -> dict:
    diag = manifest["diagnostics"]
    return {
        "domains": diag["domains"],
        "raw_cosine": diag["raw_cosine"],
        "mean_collinearity": diag["mean_collinearity"],
        "post_gs_max_abs_cos": diag["post_gs_max_abs_cos"],
        "residual_ratios": diag["residual_ratios"],
        "recommendation": diag["recommendation"],
        "recommendation_text": diag["recommendation_text"],
        "controls": diag.get("controls", {}),
        "basis": manifest["settings"]["basis"],
        "settings": manifest["settings"],
        "probe_counts": manifest["probe_counts"],
        "generalist_architecture": manifest.get("generalist_architecture"),
        "d": manifest["d"],
        "format_version": manifest["format_version"],
    }


def cmd_index_build(args) -> int:
    from index_store.config import load_config
    from index_store.loader import build_index

    cfg = load_config(args.config)
    manifest = build_index(cfg, quiet=args.quiet)
    diag = manifest["diagnostics"]
    print(f"index written: {cfg.index.path}")
    print(f"domains: {', '.join(manifest['domains'])}  basis: {manifest['settings']['basis']}  "
          f"probes: {sum(manifest['probe_counts'].values())}  ({manifest['build_seconds']:.1f} s)")
    print(f"mean collinearity {diag['mean_collinearity']:.4f}; post-GS max |cos| {diag['post_gs_max_abs_cos']:.1e}; "
          f"{diag['recommendation_text']}")
    return 0


def cmd_index_inspect(args) -> int:
    from index_store.store import read_manifest

    doc = inspect_doc(read_manifest(Path(args.index_dir)))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    doms = doc["domains"]
    print(f"index {args.index_dir}: {len(doms)} domains, d={doc['d']}, basis={doc['basis']}, "
          f"architecture {doc['generalist_architecture']}")
    print("\nraw centroid cosine (paper Table 1):")
    rows = [[a] + [f"{v:.4f}" for v in row] for a, row in zip(doms, doc["raw_cosine"])]
    print(_fmt_table(rows, ["", *doms]))
    print(f"\nmean collinearity      {doc['mean_collinearity']:.4f}")
    print(f"post-orth max |cos|    {doc['post_gs_max_abs_cos']:.2e}")
    print("Gram-Schmidt residual ratios (domain order): "
          + ", ".join(f"{d} {doc['residual_ratios'][d]:.4f}" for d in doms))
    for c, info in doc["controls"].items():
        print(f"control '{c}': cosine " + ", ".join(f"{d} {info['cosine'][d]:.3f}" for d in doms))
    print(f"recommendation: {doc['recommendation']} ({doc['recommendation_text']})")
    return 0


def default_config() -> Path:
    """The demo constellation's config (built on first use by ``constellation demo build``)."""
    raise SystemExit("error: no --config given and the demo constellation is not available yet; "
                     "pass --config CONFIG")


def load_summary(loaded) -> str:
    """One line on what is resident: the generalist, and per specialist only its differing tensors."""
    r = loaded.report
    parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in r["resident_bytes"].items())
    exact = [d for d, ok in r["trunk_exact"].items() if not ok]
    note = (f"; specialists differing outside the composed layers (signature=trunk approximates): {exact}"
            if exact else "; every specialist differs only in the composed layers (trunk signature exact)")
    return f"loaded on {r['device']} ({r['dtype']}) in {r['load_seconds']:.1f} s; resident: {parts}{note}"


def cmd_explain(args) -> int:
    from composer.modes import CompositionParams
    from index_store.loader import load_constellation

    config = args.config or default_config()
    weights = None
    if args.weights:
        try:
            weights = json.loads(args.weights)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: --weights is not valid JSON ({e})")
    params = CompositionParams(mode=args.mode, top_k=args.top_k, weights=weights, **{"lambda": args.lambda_})
    loaded = load_constellation(config)
    c = loaded.constellation
    print(load_summary(loaded), file=sys.stderr)
    gp = loaded.analyze([args.prompt])
    plan = c.plan(gp, 0, params)
    doc = c.explain(gp, plan, node_weights=args.node_weights)
    doc["index"] = inspect_doc(loaded.manifest)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"mode {doc['mode']}: composed layers {doc['composed_layers'][0]}..{doc['composed_layers'][1]} "
          f"(L={doc['layers']}), policy {doc['policy']}, signature {doc['signature']}, "
          f"{doc['prompt_tokens']} prompt tokens")
    rows = []
    for d in sorted(c.domains, key=lambda k: -doc["alpha"][k]):
        mw = doc["mean_node_weight"].get(d)
        rows.append([d, f"{doc['alpha'][d]:+.4f}", "yes" if d in doc["selected"] else "",
                     "" if mw is None else f"{mw:.4f}"])
    print(_fmt_table(rows, ["domain", "alpha", "selected", "mean node weight"]))
    print(f"entropy {doc['entropy_bits']:.3f} bits/node, gini {doc['gini']:.3f}, fallback {doc['fallback']:.3f}")
    if args.node_weights:
        for d, w in doc["node_weights"].items():
            print(f"{d}: " + " ".join(f"{v:.3f}" for v in w))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from composer.arch import ArchitectureError
    from composer.modes import CompositionError
    from composer.weights import WeightsError
    from index_store.config import ConfigError
    from index_store.loader import ProbeError
    from index_store.store import IndexStoreError
    from composer.basis import BasisError

    handlers = {("index", "build"): cmd_index_build, ("index", "inspect"): cmd_index_inspect,
                ("explain", None): cmd_explain}
    try:
        return handlers[(args.command, getattr(args, "index_command", None))](args)
    except (ConfigError, WeightsError, ArchitectureError, IndexStoreError, ProbeError, BasisError,
            CompositionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # pydantic validation of CLI-given composition, bad runtime settings
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
