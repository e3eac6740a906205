"""Which thread decodes: one decode step timed from the main thread and from a second thread.

    .venv/bin/python -m bench.threads [--dtype bfloat16] [--rows 1] [--steps 30] [--threads N] [--model DIR]

Why ``constellation serve`` runs its engine loop on the main thread and its web thread never
touches torch (docs/benchmarks.md, "Which thread decodes"). Each scenario runs in a fresh process
(OpenMP's state is per process and never shrinks), loads the demo generalist on the main thread,
then times ``--steps`` decode steps of ``--rows`` rows (after 3 warm-ups) over a slot KV cache:

- ``main``: the steps on the main thread, the one that loaded the model (what ``constellation
  serve`` does);
- ``second thread``: on a second thread while the main thread waits (the engine thread of before);
- ``main, torch once on another thread``: on the main thread after another thread ran one
  parallel torch op;
- ``main, torch on another thread``: on the main thread after another thread computed a small
  entropy with torch (float64, [3, 4, 576], as the serving code did for a response's composition
  summary) once per step's time, as a web thread answering requests does.

Printed per scenario: ms per step, its ratio to ``main`` measured in this run, and the voluntary
context switches of the stepping thread per step (its OpenMP barrier sleeping instead of spinning).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SCENARIOS = ("main", "second thread", "main, torch once on another thread", "main, torch on another thread")


def measure(scenario: str, dtype: str, rows: int, steps: int, threads: int | None, model: str | None) -> dict:
    """Run one scenario in this process: ms per step and voluntary context switches per step."""
    import torch

    from bench.kernels import Slots, decode_step, default_model
    from composer.decompose import entropy_bits
    from composer.weights import load_model

    if threads:
        torch.set_num_threads(threads)
    m = load_model(Path(model) if model else default_model(), torch.device("cpu"), getattr(torch, dtype)).fuse()
    cache = Slots(m, rows, 512)
    tokens, lengths = torch.zeros(rows, dtype=torch.long), torch.full((rows,), 20)
    out: dict = {}

    def run() -> None:
        with torch.inference_mode():
            for _ in range(3):
                decode_step(m, tokens, lengths, cache)
            times, ctx0 = [], resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
            for _ in range(steps):
                t = time.perf_counter()
                decode_step(m, tokens, lengths, cache)
                times.append(time.perf_counter() - t)
        out["ms"] = statistics.median(times) * 1e3
        out["switches"] = (resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - ctx0) / steps

    def on_thread(fn) -> None:
        t = threading.Thread(target=fn)
        t.start()
        t.join()

    if scenario == "second thread":
        on_thread(run)
    elif scenario == "main, torch once on another thread":
        on_thread(lambda: torch.randn(512, 512).exp())
        run()
    elif scenario == "main, torch on another thread":
        stop = threading.Event()

        def web() -> None:
            w = torch.rand(4, 3, 576)
            while not stop.wait(0.02):
                float(entropy_bits(w / w.sum(-2, keepdim=True)).mean())

        t = threading.Thread(target=web)
        t.start()
        try:
            run()
        finally:
            stop.set()
            t.join()
    else:
        run()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="weights (default bfloat16)")
    ap.add_argument("--rows", type=int, default=1, help="rows per decode step (default 1)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per scenario (default 30)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--model", help="HF model folder (default: the demo generalist)")
    ap.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)  # a child process's one scenario
    args = ap.parse_args(argv)
    if args.rows < 1 or args.steps < 1 or (args.threads is not None and args.threads < 1):
        ap.error("--rows, --steps and --threads must be at least 1")
    if args.scenario:
        print(json.dumps(measure(args.scenario, args.dtype, args.rows, args.steps, args.threads, args.model)))
        return 0
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    res = {}
    for s in SCENARIOS:
        out = subprocess.run([sys.executable, "-m", "bench.threads", *passed, "--scenario", s], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1])
        if out.returncode:
            raise SystemExit(f"scenario {s!r} failed:\n{out.stderr}")
        res[s] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"decode step, {args.rows} row(s), {args.dtype}, median of {args.steps}")
    print(f"{'':36}{'ms/step':>9}{'x main':>8}{'ctx switches/step':>19}")
    for s, r in res.items():
        print(f"{s:36}{r['ms']:9.1f}{r['ms'] / res['main']['ms']:8.2f}{r['switches']:19.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
