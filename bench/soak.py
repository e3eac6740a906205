"""Soak test for people (`make soak`): a real server under mixed load for a while, loopback only.

    .venv/bin/python -m bench.soak [--minutes 10] [--concurrency 24] [--config CONFIG]

Waves of concurrent requests with random modes, stream or not, some cancelled mid-stream; checks
that every answer is a 200 or a 429 with Retry-After, that no slot leaks, and that /health stays
up. Prints counts and latency percentiles. Bounded in time and count; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path

MODES = ["constellation", "generalist", "routed", "uniform", "task_arithmetic", "logit"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--config")
    args = ap.parse_args()

    import httpx

    from bench.loopback import LoopbackServer

    from demo.build import demo_config
    from index_store.loader import load_constellation
    from server.app import create_app
    from server.engine import Limits

    loaded = load_constellation(Path(args.config) if args.config else demo_config())
    app = create_app(loaded, Limits(max_running=8, max_waiting=8, max_seq_len=512, max_prompt_tokens=256,
                                    max_new_tokens=64))
    srv = LoopbackServer(app)
    url = srv.__enter__()
    rng = random.Random(0)
    counts: dict[str, int] = {}
    latencies: list[float] = []
    deadline = time.monotonic() + 60 * args.minutes

    async def one(cl: httpx.AsyncClient) -> None:
        body = {"model": "constellation", "prompt": rng.choice(["The patient", "The licensee", "def f(x):",
                                                                "The enzyme"]) + f" {rng.random():.3f}",
                "max_tokens": rng.randint(1, 64), "temperature": rng.choice([0, 0.8]),
                "stream": rng.random() < 0.5, "composition": {"mode": rng.choice(MODES)}}
        t0 = time.perf_counter()
        if body["stream"] and rng.random() < 0.2:  # hang up mid-stream
            async with cl.stream("POST", url + "/v1/completions", json=body) as r:
                async for _ in r.aiter_lines():
                    break
            counts["cancelled"] = counts.get("cancelled", 0) + 1
            return
        r = await cl.post(url + "/v1/completions", json=body)
        key = str(r.status_code)
        counts[key] = counts.get(key, 0) + 1
        assert r.status_code in (200, 429), (r.status_code, r.text[:300])
        if r.status_code == 429:
            assert r.headers.get("Retry-After")
        else:
            latencies.append(time.perf_counter() - t0)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=120) as cl:
            while time.monotonic() < deadline:
                await asyncio.gather(*[one(cl) for _ in range(args.concurrency)])
                assert (await cl.get(url + "/health")).status_code == 200

    asyncio.run(run())
    time.sleep(1)
    eng = app.state.engine
    srv.__exit__(None, None, None)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 2 else [float("nan")] * 99
    print(f"{sum(counts.values())} requests in {args.minutes} min: {counts}")
    print(f"latency p50 {q[49]:.2f} s, p95 {q[94]:.2f} s, p99 {q[98]:.2f} s; "
          f"after: running {eng.num_running}, slots used {eng.cache.used}")
    assert eng.num_running == 0 and eng.cache.used == 0, "slots leaked"


if __name__ == "__main__":
    main()
