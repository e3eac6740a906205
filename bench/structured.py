"""What constrained decoding costs a decode step: 16 streams, each its own JSON schema and its own
composition, beside the same 16 streams unconstrained, in one process on the same engine.

    python -m bench.structured [--config CONF] [--streams 16] [--tokens 128] [--no-capture]

Prints per side the engine's mean decode step and decode tok/s, and for the constrained side the
time per step spent filling the rows' token masks (llguidance) and applying them (the sampler),
as a share of the step; how many replies ended by their grammar and validated against their schema
(the rest were cut by ``--tokens``); and the worst
gap between two tokens of 4 running streams while a large schema (~60 KB) compiles on another
thread, beside the worst gap without it. By default the decode step is captured for the stream
count first, as ``serve`` does. ``--smoke`` runs a few tokens on any config (the tests).
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from pathlib import Path

PROMPTS = ["The patient presented with fever and", "def reverse(xs):", "The licensee shall indemnify the",
           "Photosynthesis converts light into", "In the court's opinion, the contract", "The enzyme binds its",
           "import numpy as np", "A 54-year-old man with chest pain"]


def schemas(n: int) -> list[dict]:
    """``n`` different schemas (string, enum, integer, boolean and array leaves)."""
    kinds = [{"type": "string", "maxLength": 40}, {"enum": ["low", "medium", "high"]},
             {"type": "integer", "minimum": 0, "maximum": 1000}, {"type": "boolean"},
             {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}]
    out = []
    for i in range(n):
        props = {f"field_{i}_{j}": kinds[(i + j) % len(kinds)] for j in range(2 + i % 4)}
        out.append({"type": "object", "properties": props, "required": list(props), "additionalProperties": False})
    return out


def big_schema() -> dict:
    props = {f"k{i}": {"type": "object", "properties": {f"s{j}": {"enum": [f"v{i}_{j}_{k}" for k in range(12)]}
                                                        for j in range(8)}} for i in range(40)}
    return {"type": "object", "properties": props}


class Timed:
    """Wraps the sampler's ``grammar.masks`` / ``grammar.apply`` and sums their seconds."""

    def __init__(self):
        from server.engine import sampler

        self.mod, self.seconds, self.calls = sampler.grammar, 0.0, 0
        self._masks, self._apply = self.mod.masks, self.mod.apply

    def _timed(self, fn, counts: bool):
        def wrapper(*a):
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += counts  # steps: one masks() call each

        return wrapper

    def __enter__(self):
        self.mod.masks, self.mod.apply = self._timed(self._masks, True), self._timed(self._apply, False)
        return self

    def __exit__(self, *exc):
        self.mod.masks, self.mod.apply = self._masks, self._apply


def run(engine, tok, jobs, n: int, grammars=None, finishes=None) -> tuple[list[str], float, list[float]]:
    """Texts, decode tok/s and every inter-token gap (seconds) of ``jobs`` = [(prompt, mode)]; each
    finish reason appended to ``finishes``."""
    from composer.modes import CompositionParams
    from server.engine import Request, SamplingParams

    qs = []
    for k, (prompt, mode) in enumerate(jobs):
        q: queue.Queue = queue.Queue()
        p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=grammars is None,
                           grammar=grammars[k] if grammars else None)
        engine.submit(Request(tok(prompt)["input_ids"], p, CompositionParams(mode=mode), emit=q.put))
        qs.append(q)
    texts, gaps, count, first, last = [], [], 0, None, 0.0
    for q in qs:
        ids, prev = [], None
        while True:
            e = q.get(timeout=900)
            if e.error:
                raise RuntimeError(e.error)
            now = time.perf_counter()
            if e.token_ids:
                first = now if first is None else min(first, now)
                if prev is not None:
                    gaps.append(now - prev)
                prev = now
            ids += e.token_ids
            if e.finish_reason:
                if finishes is not None:
                    finishes.append(e.finish_reason)
                break
        last, count = max(last, time.perf_counter()), count + max(len(ids) - 1, 0)
        texts.append(tok.decode(ids, skip_special_tokens=True))
    return texts, count / max(last - (first or last), 1e-9), gaps


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a constellation.toml (default: the embedded demo's)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--no-capture", action="store_true", help="decode eagerly (no compiled step)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--smoke", action="store_true", help="a few tokens, no capture (the test suite)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jsonschema

    from demo.build import demo_config
    from index_store.loader import load_constellation
    from server.engine import Engine, Limits
    from server.engine.grammar import GrammarSpec

    S, n = (4, 24) if args.smoke else (args.streams, args.tokens)
    loaded = load_constellation(Path(args.config) if args.config else demo_config())
    engine = Engine(loaded.constellation, loaded.tokenizer, Limits(max_running=max(S, 4), max_seq_len=512))
    engine.start()
    if not (args.smoke or args.no_capture):
        t0 = time.perf_counter()
        engine.capture([S, 4], background=False)
        print(f"captured the decode step for {S} and 4 rows in {time.perf_counter() - t0:.0f} s", flush=True)
    tok = loaded.tokenizer
    modes = ["constellation", "paper", "logit", "routed", "generalist", "uniform"]
    jobs = [(f"{PROMPTS[i % len(PROMPTS)]} (case {i})", modes[i % len(modes)]) for i in range(S)]
    sch = schemas(S)
    t0 = time.perf_counter()
    grammars = [engine.grammars.compile(GrammarSpec("json_schema", s)) for s in sch]
    compile_ms = (time.perf_counter() - t0) / S * 1e3
    out = {"streams": S, "tokens": n, "compile_ms_per_schema": round(compile_ms, 2)}
    for side in ("plain", "constrained"):
        steps0, secs0 = engine.steps, engine.runner.decode_seconds
        finishes: list[str] = []
        with Timed() as timed:
            texts, rate, _ = run(engine, tok, jobs, n, grammars if side == "constrained" else None, finishes)
        steps = max(engine.steps - steps0, 1)
        out[side] = {"tok_s": round(rate, 1), "step_ms": round((engine.runner.decode_seconds - secs0) / steps * 1e3, 2)}
        if side == "constrained":
            out[side]["mask_ms_per_step"] = round(timed.seconds / max(timed.calls, 1) * 1e3, 3)
            valid = 0
            for t, s, f in zip(texts, sch, finishes):
                if f != "stop":
                    continue
                try:
                    jsonschema.validate(json.loads(t), s)
                    valid += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
            stopped = finishes.count("stop")
            out[side]["valid_of_finished"] = f"{valid}/{stopped}"
            out[side]["cut_by_max_tokens"] = finishes.count("length")
    c = out["constrained"]
    c["mask_share_of_step"] = round(c["mask_ms_per_step"] / c["step_ms"], 3)
    # the engine goes on while a large schema compiles on another thread
    four = jobs[:4]
    _, _, gaps = run(engine, tok, four, n)
    big, stop, done = big_schema(), threading.Event(), []

    def compile_all_along():  # distinct schemas (no cache hits) until the streams end
        while not stop.is_set():
            t = time.perf_counter()
            engine.grammars.compile(GrammarSpec("json_schema", {**big, "title": f"v{len(done)}"}))
            done.append(time.perf_counter() - t)

    from server.structured import _lower_priority

    th = threading.Thread(target=lambda: (_lower_priority(), compile_all_along()))  # as the server's compiler
    th.start()
    _, _, gaps2 = run(engine, tok, four, n)
    stop.set()
    th.join()
    out["compile_gap"] = {"schema_bytes": len(json.dumps(big)), "compiles": len(done),
                          "compile_ms_each": round(sum(done) / max(len(done), 1) * 1e3, 1),
                          "worst_gap_ms_alone": round(max(gaps) * 1e3, 1),
                          "worst_gap_ms_while_compiling": round(max(gaps2) * 1e3, 1)}
    engine.stop()
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
