"""The captured decode step beside the eager one, in one process, on the same engine and catalog.

    python -m bench.captured [--config CONF] [--streams 1,16] [--tokens 64] [--buckets 1,16] [--above N] [--profile 200]

For each mode (generalist, constellation) and stream count: greedy generations of ``--tokens``
tokens (EOS ignored) through the engine, first eagerly, then with the decode step captured for
``--buckets`` (and with ``--above N`` one graph for any row count above the largest, up to N, as
``serve`` captures; compiled once, before measuring), interleaved per repeat. Prints decode tok/s (the
streams' tokens after their first, over the time from the first token to the last), the engine's
mean decode step, the ratio captured / eager, whether both gave the same tokens, and the compile
time per bucket. The one-stream figure is set beside the bound the weights' bytes give at the
machine's read bandwidth (a 1 GiB sum). ``--smoke`` runs a few tokens on any config (the tests). ``--profile POSITIONS`` then calls each
bucket's graph directly and prints where its time goes (``bench/profile_step.py``).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

PROMPTS = ["The patient presented with fever and", "def reverse(xs):\n    ", "The licensee shall indemnify the",
           "Photosynthesis converts light into", "In the court's opinion, the contract", "The enzyme binds its",
           "import numpy as np\n", "A 54-year-old man with chest pain"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.captured", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a constellation.toml (default: the embedded demo's)")
    p.add_argument("--weights", choices=["bf16", "int8", "int4"], default=None,
                   help="the generalist's weights format (default: the config's; its index must exist)")
    p.add_argument("--streams", default="1,16", help="comma-separated stream counts (default 1,16)")
    p.add_argument("--buckets", default=None, help="row buckets to capture (default: the stream counts)")
    p.add_argument("--above", type=int, default=None, metavar="N",
                   help="also one graph for every row count above the largest bucket, up to N (serve's "
                   "[runtime].compile_above; default: none)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per stream (default 64)")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, interleaved (default 2)")
    p.add_argument("--modes", default="generalist,constellation")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--profile", type=int, metavar="POSITIONS", default=None,
                   help="then call each bucket's graph directly (no engine; the rows G's): its step with attention "
                   "replaced by zeros and over POSITIONS cached positions, and torch.profiler's operators of the latter")
    p.add_argument("--smoke", action="store_true", help="a few tokens, one repeat (the test suite)")
    return p.parse_args(argv)


def read_bandwidth() -> float:
    """Bytes per second of a 1 GiB sum (the one-stream bound's denominator)."""
    x = torch.ones(1 << 28)
    x.sum()
    t = time.perf_counter()
    x.sum()
    return x.numel() * 4 / (time.perf_counter() - t)


def generate(engine, tok, prompts: list[str], comp: dict, n: int) -> tuple[list[list[int]], float, float]:
    """Greedy tokens per prompt, decode tok/s, mean decode step seconds (all decoding together)."""
    from bench.device_check import generate as run

    steps0, secs0 = engine.steps, engine.runner.decode_seconds
    out, rate = run(engine, [(tok(p)["input_ids"], comp) for p in prompts], n)
    return out, rate, (engine.runner.decode_seconds - secs0) / max(engine.steps - steps0, 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    from demo.build import demo_config
    from index_store.config import load_config
    from index_store.loader import load_constellation
    from server.engine import Engine, Limits

    streams = [int(s) for s in args.streams.split(",")]
    buckets = [int(s) for s in (args.buckets or args.streams).split(",")]
    tokens, repeats = (4, 1) if args.smoke else (args.tokens, args.repeats)
    cfg = load_config(Path(args.config) if args.config else demo_config())
    loaded = load_constellation(cfg.with_weights(args.weights) if args.weights else cfg)
    c = loaded.constellation
    if loaded.config.runtime.packed_weights:
        c.g.pack()  # (the eager side as served)
    engine = Engine(c, loaded.tokenizer, Limits(max_running=max(streams), max_seq_len=512))
    t0 = time.perf_counter()
    engine.capture(buckets, background=False, above=args.above)
    graphs, engine.runner.graphs = engine.runner.graphs, None
    print(f"captured the decode step for {buckets} rows in {time.perf_counter() - t0:.1f} s "
          f"({graphs.status()['ready']} s per bucket)", flush=True)
    weights = c.resident_bytes()["generalist"]  # (every matrix read once a step; quantized: their packed bytes)
    bw = read_bandwidth()
    rows: list[dict] = []
    failed: list[BaseException] = []

    def driver():
        try:
            measure(engine, loaded.tokenizer, graphs, args, streams, tokens, repeats, rows, bw, weights)
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            failed.append(e)
        finally:
            engine.stop()

    # the engine loop on the main thread, as `constellation serve` runs it (on a second thread a
    # one-row step took about twice as long: docs/benchmarks.md, "Which thread decodes")
    t = threading.Thread(target=driver, name="bench-driver")
    t.start()
    engine.run()
    t.join()
    if failed:
        raise failed[0]
    report(rows, graphs, bw, weights, args)
    if args.profile:
        from bench.profile_step import profile_graphs

        prof = profile_graphs(c, graphs, args.profile, reps=3 if args.smoke else 20)
        if args.json:
            doc = json.loads(Path(args.json).read_text())
            Path(args.json).write_text(json.dumps({**doc, "profile": prof}, indent=1))
    return 0


def measure(engine, tok, graphs, args, streams, tokens, repeats, rows, bw, weights) -> None:
    for mode in args.modes.split(","):
        for s in streams:
            prompts = (PROMPTS * (s // len(PROMPTS) + 1))[:s]
            got = {"eager": [], "captured": []}
            same = True
            for _ in range(repeats):
                for side in ("eager", "captured"):
                    engine.runner.graphs = graphs if side == "captured" else None
                    toks, rate, step = generate(engine, tok, prompts, {"mode": mode}, tokens)
                    got[side].append((rate, step, toks))
                same = same and got["eager"][-1][2] == got["captured"][-1][2]
            med = {k: sorted(v)[len(v) // 2] for k, v in got.items()}
            row = {"mode": mode, "streams": s, "eager_tok_s": round(med["eager"][0], 1),
                   "captured_tok_s": round(med["captured"][0], 1), "eager_step_ms": round(med["eager"][1] * 1e3, 2),
                   "captured_step_ms": round(med["captured"][1] * 1e3, 2),
                   "ratio": round(med["captured"][0] / med["eager"][0], 2), "same_tokens": same}
            if s == 1:
                row["bound_tok_s"] = round(bw / weights, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)


def report(rows, graphs, bw, weights, args) -> None:
    print(f"\n{'mode':14s} {'streams':>7s} {'eager tok/s':>11s} {'captured':>9s} {'ratio':>6s} "
          f"{'step ms e/c':>13s} {'bound':>6s} same")
    for r in rows:
        print(f"{r['mode']:14s} {r['streams']:7d} {r['eager_tok_s']:11.1f} {r['captured_tok_s']:9.1f} "
              f"{r['ratio']:6.2f} {r['eager_step_ms']:6.1f}/{r['captured_step_ms']:<6.1f} "
              f"{r.get('bound_tok_s', ''):>6} {r['same_tokens']}")
    print(f"(bound: {weights / 2**20:.0f} MiB of weights read per step at {bw / 1e9:.1f} GB/s; "
          f"compile seconds per bucket {graphs.status()['ready']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "compile_s": graphs.status()["ready"],
                                               "bandwidth_gb_s": round(bw / 1e9, 1)}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
