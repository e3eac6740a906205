"""``constellation specialist add | replace | remove | list``: the catalog, offline (the same code
the admin API runs: ``index_store.catalog``)."""

from __future__ import annotations

import json
from pathlib import Path



def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def cmd_specialist_change(args) -> int:
    from index_store.catalog import NAME, CatalogError, Change, apply, read_probe_texts
    from index_store.store import recommendation_note

    op = args.specialist_command
    if not NAME.match(args.name):
        raise CatalogError(f"NAME {args.name!r}: letters, digits, '-' or '_' (at most 64), starting with a letter or "
                           "digit")
    probes = read_probe_texts(args.probes, args.name, "--probes") if getattr(args, "probes", None) else None
    path = getattr(args, "path", None)
    change = Change(op, args.name, Path(path) if path else None, probes)
    try:
        fmt = getattr(args, "weights", None)
        weights = (fmt, getattr(args, "int4_group", None)) if fmt else None
        r = apply(args.config, change, quiet=getattr(args, "quiet", False), weights=weights)
    except CatalogError as e:  # the API's words for what the CLI calls the arguments
        where = {"probes": f"--probes {getattr(args, 'probes', None)}", "path": "FOLDER", "name": "NAME"}.get(e.param)
        if where is None or (e.param == "probes" and not getattr(args, "probes", None)):
            raise
        msg = str(e)
        for head in (e.param + ": ", e.param + " "):
            msg = msg.removeprefix(head)
        raise CatalogError(f"{where}: {msg}", e.status, e.param) from None
    diag = r.manifest["diagnostics"]
    print(f"{op} {args.name}: catalog version {r.version}; specialists: {', '.join(r.config.specialists)}")
    print(f"fingerprinted: {', '.join(r.fingerprinted) or 'nothing (centroids reused)'}; {r.seconds:.1f} s")
    print(f"recommendation: {recommendation_note(diag, r.config.composition.mode)}")
    return 0


def cmd_specialist_list(args) -> int:
    from index_store.catalog import listing
    from index_store.config import load_config
    from index_store.store import read_manifest

    cfg = load_config(args.config)
    manifest = read_manifest(cfg.index_path) if (cfg.index_path / "manifest.json").is_file() else {}
    rows = listing(cfg, manifest)
    if args.json:
        print(json.dumps({"version": cfg.catalog.version, "specialists": rows}, indent=1))
        return 0
    print(f"catalog version {cfg.catalog.version} ({cfg.source})")
    print(fmt_table([[r["name"], r["kind"], str(r["rank"] or "-"), str(r["probes"]), r["path"]] for r in rows],
                     ["name", "kind", "rank", "probes", "path"]))
    return 0
