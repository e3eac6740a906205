"""``constellation specialist add | replace | remove | list``: the catalog, offline (the same code
the admin API runs: ``index_store.catalog``)."""

from __future__ import annotations

import json
from pathlib import Path


def read_probe_texts(path: str, name: str) -> list[str]:
    """A domain's probe texts: a JSON list, a probe file ``{"domains": {NAME: [...]}}``, or a .txt
    file with one text per line."""
    from index_store.catalog import CatalogError

    p = Path(path)
    if not p.is_file():
        raise CatalogError(f"--probes {path}: file not found")
    text = p.read_text()
    if p.suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CatalogError(f"--probes {path}: not valid JSON ({e}); use a .txt file for one text per line") from None
    if isinstance(data, dict):
        doms = data.get("domains") if isinstance(data.get("domains"), dict) else {}
        if name not in doms:
            raise CatalogError(f"--probes {path}: no domains.{name} in it (has: {', '.join(doms) or 'none'})")
        data = doms[name]
    if not isinstance(data, list):
        raise CatalogError(f"--probes {path}: expected a list of texts")
    return data


def cmd_specialist_change(args) -> int:
    from index_store.catalog import Change, apply

    op = args.specialist_command
    probes = read_probe_texts(args.probes, args.name) if getattr(args, "probes", None) else None
    path = getattr(args, "path", None)
    change = Change(op, args.name, Path(path) if path else None, probes)
    r = apply(args.config, change, quiet=getattr(args, "quiet", False))
    diag = r.manifest["diagnostics"]
    print(f"{op} {args.name}: catalog version {r.version}; specialists: {', '.join(r.config.specialists)}")
    print(f"fingerprinted: {', '.join(r.fingerprinted) or 'nothing (centroids reused)'}; {r.seconds:.1f} s")
    print(f"mean collinearity {diag['mean_collinearity']:.3f}; recommendation: {diag['recommendation']} "
          f"({diag['recommendation_text']})")
    return 0


def cmd_specialist_list(args) -> int:
    from index_store.catalog import listing
    from index_store.config import load_config
    from index_store.store import read_manifest

    cfg = load_config(args.config)
    manifest = read_manifest(cfg.index.path)
    rows = listing(cfg, manifest)
    if args.json:
        print(json.dumps({"version": cfg.catalog.version, "specialists": rows}, indent=1))
        return 0
    from .cli import _fmt_table

    print(f"catalog version {cfg.catalog.version} ({cfg.source})")
    print(_fmt_table([[r["name"], r["kind"], str(r["rank"] or "-"), str(r["probes"]), r["path"]] for r in rows],
                     ["name", "kind", "rank", "probes", "path"]))
    return 0
