"""The ``constellation`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from server.cli_parser import parser
from server.summary import layer_ranges, load_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

def _fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


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
    from index_store.store import diagnostics_doc, read_manifest

    doc = diagnostics_doc(read_manifest(Path(args.index_dir)))
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
    """The demo constellation's config (built on first use, as ``constellation demo build`` does)."""
    from demo.build import demo_config

    return demo_config()


def cmd_explain(args) -> int:
    from composer.modes import CompositionParams
    from index_store.loader import load_constellation
    from index_store.store import diagnostics_doc

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
    doc["index"] = diagnostics_doc(loaded.manifest)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"mode {doc['mode']}: composed layers {layer_ranges(doc['composed_layers'])} "
          f"(layers={doc['layers']}), policy {doc['policy']}, signature {doc['signature']}, "
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


def cmd_demo_train(args) -> int:
    from demo.paths import cache_dir
    from demo.train import ARTIFACTS, TrainConfig, parse_layers, run

    parse_layers(args.layers, None)  # the syntax, before minutes of loading (the range is checked later)
    tc = TrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, rank=args.rank, lr=args.lr,
                     alpha=2.0 * args.rank, seed=args.seed, layers=args.layers)
    work = Path(args.work) if args.work else cache_dir() / "train"
    out = Path(args.out) if args.out else ARTIFACTS
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    manifest = run(domains, tc, work, out)
    for d in domains:
        info = manifest["specialists"][d]
        print(f"{d}: held-out loss {info['heldout_loss']['generalist']:.3f} -> {info['heldout_loss']['specialist']:.3f}")
    print(out.resolve() / "manifest.json")
    return 0


def cmd_demo_build(args) -> int:
    from demo.build import build

    print(build(Path(args.cache) if args.cache else None))
    return 0


def cmd_demo_report(args) -> int:
    from demo.report import report

    kw = {"probes": Path(args.probes)} if args.probes else {}
    text = report(Path(args.config) if args.config else default_config(), **kw)
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")
    return 0


def cmd_serve(args) -> int:
    from index_store.config import load_config
    from server.engine import Limits
    from server.serve import serve

    for name in ("max_running", "max_waiting", "max_prompt_tokens", "max_new_tokens", "max_seq_len", "max_body_bytes",
                 "prefill_chunk", "prefill_chunk_min"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_prompt_tokens >= args.max_seq_len:
        raise ValueError("--max-prompt-tokens must be smaller than --max-seq-len")
    limits = Limits(max_running=args.max_running, max_waiting=args.max_waiting,
                    max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                    max_seq_len=args.max_seq_len, max_body_bytes=args.max_body_bytes,
                    drain_timeout_s=args.drain_timeout, prefill_chunk_max=args.prefill_chunk,
                    prefill_chunk_min=min(args.prefill_chunk_min, args.prefill_chunk))
    config = load_config(Path(args.config) if args.config else default_config())
    if args.dtype:
        config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"dtype": args.dtype})})
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    return serve(config, args.host, args.port, args.api_key or None, limits, args.model_name, args.log_level)


def cmd_eval(args) -> int:
    from eval.report import headline
    from eval.run import load_cross, load_single, run
    from index_store.loader import load_constellation

    single = load_single(Path(args.probes))
    cross = load_cross(Path(args.cross)) if args.cross else None
    loaded = load_constellation(Path(args.config) if args.config else default_config())
    results = run(loaded, single, cross, Path(args.out), args.noise_sweep, args.ablations, args.quiet,
                  {"single": args.probes, "cross": args.cross or ""})
    print(headline(results))
    print(Path(args.out).resolve() / "report.md")
    return 0


def cmd_specialist_extract(args) -> int:
    from index_store.extract import extract

    ex = extract(args.full, args.base, args.out, rank=args.rank, energy=args.energy, heldout=args.heldout,
                 max_tokens=args.max_tokens, force=args.force, quiet=args.quiet)
    rows = []
    for m in ex.modules:
        if m.kind == "lora":
            rows.append([m.module, "lora+bias" if m.bias else "lora", "x".join(map(str, m.shape)),
                         f"{m.rank}/{m.full_rank}", f"{m.energy:.6f}", f"{m.rel_error:.4e}"])
        else:
            rows.append([m.module, "dense", "x".join(map(str, m.shape)), "-", "-", "0"])
    print(_fmt_table(rows, ["module", "kind", "shape", "rank", "energy", "rel. error"]))
    lora = [m for m in ex.modules if m.kind == "lora"]
    dense = len(ex.modules) - len(lora)
    print(f"{len(lora)} LoRA modules (r max {ex.config['r']}), {dense} modules saved whole; overall relative "
          f"error {ex.overall_rel_error:.4e}")
    print(f"adapter {ex.adapter_bytes / 2**20:.2f} MiB ({ex.adapter_bytes} bytes) vs full delta "
          f"{ex.delta_bytes / 2**20:.2f} MiB ({ex.delta_bytes} bytes): {ex.adapter_bytes / ex.delta_bytes:.1%}")
    print("outside the decoder layers: unchanged (embeddings, final norm"
          + (", lm_head tied to the embeddings)" if ex.tied_lm_head else ", lm_head)"))
    if ex.heldout:
        h = ex.heldout
        print(f"held-out loss ({h['texts']} texts, {h['tokens']} tokens): generalist {h['generalist']:.6f}, "
              f"full fine-tune {h['full']:.6f}, generalist + adapter {h['adapter']:.6f}")
    print(f"adapter written: {Path(args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from composer.arch import ArchitectureError
    from composer.modes import CompositionError
    from composer.weights import WeightsError
    from index_store.config import ConfigError
    from index_store.loader import ProbeError
    from index_store.store import IndexStoreError
    from composer.basis import BasisError
    from demo.generalist import DemoError
    from eval.run import EvalError

    handlers = {("index", "build"): cmd_index_build, ("index", "inspect"): cmd_index_inspect,
                ("explain", None): cmd_explain, ("demo", "train"): cmd_demo_train,
                ("demo", "build"): cmd_demo_build, ("demo", "report"): cmd_demo_report, ("serve", None): cmd_serve, ("eval", None): cmd_eval,
                ("specialist", "extract"): cmd_specialist_extract}
    try:
        sub = (getattr(args, "index_command", None) or getattr(args, "demo_command", None)
               or getattr(args, "specialist_command", None))
        return handlers[(args.command, sub)](args)
    except (ConfigError, WeightsError, ArchitectureError, IndexStoreError, ProbeError, BasisError,
            CompositionError, DemoError, EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # pydantic validation of CLI-given composition, bad runtime settings
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
