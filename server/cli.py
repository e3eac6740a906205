"""The ``constellation`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from server.cli_catalog import fmt_table, cmd_specialist_change, cmd_specialist_list
from server.cli_parser import parser
from server.summary import calibration_lines, describe_weighting, layer_ranges, load_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# a composition parameter (CompositionError.param, pydantic's field) -> the explain option that set it
OPTIONS = {"mode": "--mode", "top_k": "--top-k", "weights": "--weights", "lambda": "--lambda", "lambda_": "--lambda",
           "weighting": "--weighting", "sharpness": "--sharpness", "strength": "--strength"}


class UsageError(ValueError):
    """A bad option or argument found by a command (argparse reports the ones it can check itself);
    the message starts with the option: ``--port 8000: ...``."""


def checked_config(path, specialists: bool = True, args=None):
    """The config (the demo's without a path), its folders and files checked, before any loading;
    ``args``' ``--weights`` / ``--int4-group`` applied."""
    from index_store.config import check_paths, check_top_k, load_config

    cfg = load_config(Path(path) if path else default_config())
    check_paths(cfg, specialists)
    check_top_k(cfg)
    fmt, group = getattr(args, "weights", None), getattr(args, "int4_group", None)
    if fmt or group:
        cfg = cfg.with_weights(fmt or cfg.runtime.weights, group or cfg.runtime.int4_group)
    return cfg


def demo_index_for(cfg) -> None:
    """The demo served in quantized weights: build its index for them the first time (a config of
    one's own gets the message saying to run `index build --weights` instead)."""
    from index_store.indexing import ensure_index

    if cfg.runtime.weights != "bf16":
        ensure_index(cfg, lambda msg: print(f"demo: {msg}; a few minutes: fingerprints and calibration move with "
                                            "the weights", file=sys.stderr, flush=True))


def cmd_index_build(args) -> int:
    from index_store.indexing import build_index
    from index_store.store import recommendation_note

    cfg = checked_config(args.config, specialists=False, args=args)
    if cfg.index.calibrate:  # calibration composes the specialists
        from index_store.config import check_paths

        check_paths(cfg, True)
    manifest = build_index(cfg, quiet=args.quiet)
    diag = manifest["diagnostics"]
    print(f"index written: {cfg.index_path}")
    print(f"domains: {', '.join(manifest['domains'])}  basis: {manifest['settings']['basis']}  "
          f"probes: {sum(manifest['probe_counts'].values())}  ({manifest['build_seconds']:.1f} s)")
    print(f"mean collinearity {diag['mean_collinearity']:.4f}; post-GS max |cos| {diag['post_gs_max_abs_cos']:.1e}")
    print(f"recommendation: {recommendation_note(diag, cfg.composition.mode)}")
    for line in calibration_lines(manifest.get("calibration"), domains=manifest["domains"]):
        print(line)
    return 0


def cmd_index_inspect(args) -> int:
    from index_store.store import diagnostics_doc, read_manifest, recommendation_note, residual_note

    doc = diagnostics_doc(read_manifest(Path(args.index_dir)))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    doms = doc["domains"]
    print(f"index {args.index_dir}: {len(doms)} domains, d={doc['d']}, basis={doc['basis']}, "
          f"architecture {doc['generalist_architecture']}, fingerprinted with its {doc['weights']['format']} weights"
          + (f" (int4 groups of {doc['weights']['group']})" if doc["weights"].get("group") else ""))
    print("\nraw centroid cosine (paper Table 1):")
    rows = [[a] + [f"{v:.4f}" for v in row] for a, row in zip(doms, doc["raw_cosine"])]
    print(fmt_table(rows, ["", *doms]))
    print(f"\nmean collinearity      {doc['mean_collinearity']:.4f}")
    print(f"post-orth max |cos|    {doc['post_gs_max_abs_cos']:.2e}")
    print("Gram-Schmidt residual ratios (domain order): "
          + ", ".join(f"{d} {doc['residual_ratios'][d]:.4f}" for d in doms))
    print(f"  ({residual_note(doc['basis'])})")
    for c, info in doc["controls"].items():
        print(f"control '{c}': cosine " + ", ".join(f"{d} {info['cosine'][d]:.3f}" for d in doms))
    print(f"recommendation: {recommendation_note(doc)}")
    for line in calibration_lines(doc["calibration"], detail=True, domains=doc["domains"]):
        print(line)
    return 0


def default_config() -> Path:
    """The demo constellation's config (built on first use, as ``constellation demo build`` does)."""
    from demo.build import demo_config

    return demo_config()


def _json_option(value: str | None, option: str):
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise UsageError(f"{option}: not valid JSON ({e})") from None


def composition_params(args):
    """``explain``'s composition options as ``CompositionParams``; problems name the option."""
    from pydantic import ValidationError

    from composer.modes import CompositionParams

    weights, strength = _json_option(args.weights, "--weights"), _json_option(args.strength, "--strength")
    try:
        return CompositionParams(mode=args.mode, top_k=args.top_k, weights=weights, weighting=args.weighting,
                                 sharpness=args.sharpness, strength=strength, **{"lambda": args.lambda_})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:])
        raise UsageError(f"{OPTIONS.get(str(first['loc'][0]), first['loc'][0])}: "
                         f"{where + ': ' if where else ''}{first['msg']}") from None


def _calibration(cfg):
    from index_store.loader import calibrated_of
    from index_store.store import IndexStoreError, read_manifest

    try:
        return calibrated_of(read_manifest(cfg.index_path), cfg.index_path)
    except (IndexStoreError, OSError):
        return None  # loading reports what is wrong with the index


def cmd_explain(args) -> int:
    from composer.modes import CompositionError, validate
    from index_store.loader import load_constellation
    from index_store.store import diagnostics_doc

    if not args.prompt:
        raise UsageError("PROMPT: the prompt is empty (as /explain, explain needs text to fingerprint)")
    cfg = checked_config(args.config)
    params = composition_params(args)
    try:  # before minutes of loading; against the index's calibration when there is an index to read
        validate(params, list(cfg.specialists), cfg.composition.mode, _calibration(cfg))
    except CompositionError as e:
        option = OPTIONS.get(str(e.param).removeprefix("composition."))
        raise UsageError(f"{option}: {e}" if option else str(e)) from None
    loaded = load_constellation(cfg)
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
    print(fmt_table(rows, ["domain", "alpha", "selected", "mean node weight"]))
    print(f"entropy {doc['entropy_bits']:.3f} bits/node, gini {doc['gini']:.3f}, fallback {doc['fallback']:.3f}")
    if doc.get("weighting"):
        print(describe_weighting(doc["weighting"], doc.get("sharpness"), doc.get("strength"), doc.get("profile")))
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

    if args.probes and not Path(args.probes).is_file():
        raise UsageError(f"--probes: {args.probes}: probe file not found")
    kw = {"probes": Path(args.probes)} if args.probes else {}
    text = report(checked_config(args.config), **kw)
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")
    return 0


def listen(host: str, port: int) -> list:
    """Bind the server's address now (before the models load): a busy port is a usage error."""
    import errno
    import socket

    from server.serve import bind

    try:
        return bind(host, port)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    except OSError as e:
        option = f"--port {port}" if e.errno in (errno.EADDRINUSE, errno.EACCES) else f"--host {host}"
        reason = (e.strerror or str(e)).lower()
        raise UsageError(f"{option}: cannot listen on {host}:{port}: {reason}") from None


def cmd_serve(args) -> int:
    from server.engine import Limits
    from server.serve import serve

    if args.max_prompt_tokens and args.max_seq_len and args.max_prompt_tokens >= args.max_seq_len:
        raise UsageError(f"--max-prompt-tokens: {args.max_prompt_tokens} must be smaller than --max-seq-len "
                         f"({args.max_seq_len})")
    if args.kv_cache_tokens and args.max_seq_len and args.kv_cache_tokens < args.max_seq_len:
        raise UsageError(f"--kv-cache-tokens: {args.kv_cache_tokens} cannot hold one sequence of --max-seq-len "
                         f"({args.max_seq_len}) tokens")
    limits = Limits(max_running=args.max_running, max_waiting=args.max_waiting,
                    max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                    max_seq_len=args.max_seq_len, kv_cache_tokens=args.kv_cache_tokens,
                    max_body_bytes=args.max_body_bytes,
                    drain_timeout_s=args.drain_timeout, prefill_chunk_max=args.prefill_chunk,
                    prefill_chunk_min=min(args.prefill_chunk_min, args.prefill_chunk))
    config = checked_config(args.config, args=args)
    if args.dtype:
        config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"dtype": args.dtype})})
    if args.packed_weights is not None:
        config = config.model_copy(update={"runtime": config.runtime.model_copy(
            update={"packed_weights": args.packed_weights})})
    if args.compile is not None:
        config = config.model_copy(update={"runtime": config.runtime.model_copy(
            update={"compile": "on" if args.compile else "off"})})
    if args.compile_buckets is not None:
        config = config.model_copy(update={"runtime": config.runtime.model_copy(
            update={"compile_buckets": args.compile_buckets})})
    if args.compile_above is not None:
        config = config.model_copy(update={"runtime": config.runtime.model_copy(
            update={"compile_above": "on" if args.compile_above else "off"})})
    sockets = listen(args.host, args.port)
    try:
        if args.config is None:
            demo_index_for(config)
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        return serve(config, args.host, args.port, args.api_key or None, limits, args.model_name, args.log_level,
                     sockets=sockets, admin_key=args.admin_key or None, catalog_poll_s=args.catalog_poll or None)
    finally:
        for sock in sockets:
            sock.close()


def cmd_eval(args) -> int:
    from eval.report import headline
    from eval.run import load_cross, load_single, run
    from index_store.loader import load_constellation

    single = load_single(Path(args.probes))
    cross = load_cross(Path(args.cross)) if args.cross else None
    loaded = load_constellation(checked_config(args.config, args=args))
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
    print(fmt_table(rows, ["module", "kind", "shape", "rank", "energy", "rel. error"]))
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


def one_line(e: BaseException | str) -> str:
    """An error as ``constellation: FILE or --option: problem`` on one line."""
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return f"constellation: {text}"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done; 2 bad input (an option, the config or a file it names,
    a busy port, a model or index that cannot be used), one line on stderr; 1 the server could not
    start after loading; 130 interrupted while loading."""
    args = parser().parse_args(argv)
    from composer.arch import ArchitectureError
    from composer.basis import BasisError
    from composer.modes import CompositionError
    from composer.weights import WeightsError
    from demo.generalist import DemoError
    from eval.run import EvalError
    from index_store.catalog import CatalogError
    from index_store.config import ConfigError
    from index_store.probes import ProbeError
    from index_store.store import IndexStoreError

    handlers = {("index", "build"): cmd_index_build, ("index", "inspect"): cmd_index_inspect,
                ("explain", None): cmd_explain, ("demo", "train"): cmd_demo_train,
                ("demo", "build"): cmd_demo_build, ("demo", "report"): cmd_demo_report, ("serve", None): cmd_serve,
                ("eval", None): cmd_eval, ("specialist", "extract"): cmd_specialist_extract,
                ("specialist", "add"): cmd_specialist_change, ("specialist", "replace"): cmd_specialist_change,
                ("specialist", "remove"): cmd_specialist_change, ("specialist", "list"): cmd_specialist_list}
    try:
        sub = (getattr(args, "index_command", None) or getattr(args, "demo_command", None)
               or getattr(args, "specialist_command", None))
        return handlers[(args.command, sub)](args)
    except (ConfigError, WeightsError, ArchitectureError, IndexStoreError, ProbeError, BasisError,
            CompositionError, DemoError, EvalError, CatalogError, ValueError) as e:  # ValueError: bad runtime settings
        print(one_line(e), file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a file that cannot be read or written
        print(one_line(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("constellation: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
