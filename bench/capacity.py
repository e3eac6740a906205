"""Admission by KV memory: how many sequences decode together, and how long a short request waits.

    .venv/bin/python -m bench.capacity [--config CONFIG] [--sequences 64] [--length 512] [--long 16]
                                       [--long-tokens 1000] [--short-tokens 16] [--json OUT]

Through ``constellation serve`` (the demo by default) with ``--max-seq-len 2048`` and its default KV
cache — room for 16 sequences of 2048: what 16 fixed slots took before admission went by memory:

- **together**: ``--sequences`` concurrent requests whose prompt + ``max_tokens`` is ``--length``
  tokens (greedy, EOS ignored). Reported: how many were decoding at the same moment (the most streams
  between their first and last token at once), the largest batch a decode step ran
  (``constellation_batch_size``), preemptions (``constellation_num_preemptions_total``) and the
  aggregate decode rate. Target: ``--sequences`` (64) all decode together.
- **short under load**: a short request (``--short-tokens`` new tokens) alone on the idle server,
  then the same request sent once ``--long`` long generations (``--long-tokens`` each) are all
  decoding. Reported: both latencies (request to last token) and their ratio, and where the time
  went: the first token, the time a token after it, and the long streams' own time a token in the
  second before the short request (its steps then hold one row more). Target: <= 3x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from pathlib import Path

import httpx

from bench.serve_bench import PROMPTS


async def _stream(client, prompt, tokens: int) -> tuple[float, float, float, int]:
    """(sent, first token, last token, tokens) of one streamed completion."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    s = await client.completions.create(model="constellation", prompt=prompt, max_tokens=tokens, temperature=0,
                                        stream=True, logprobs=0, extra_body={"ignore_eos": True})
    async for ch in s:
        if ch.choices and ch.choices[0].logprobs and ch.choices[0].logprobs.tokens:
            now = time.perf_counter()
            first = first or now
            last = now
            n += len(ch.choices[0].logprobs.tokens)
    return t0, first, last, n


def _metric(text: str, name: str) -> float:
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


def _largest_batch(text: str) -> int:
    """The largest bucket bound of ``constellation_batch_size`` that holds steps beyond the one below."""
    buckets = [(float(le), float(v)) for le, v in re.findall(
        r'^constellation_batch_size_bucket{[^}]*le="([0-9.e+]+)"[^}]*} ([0-9.e+]+)$', text, re.M)]
    buckets.sort()
    prev, largest = 0.0, 0
    for le, count in buckets:
        if count > prev:
            largest = int(le)
        prev = count
    return largest


def _peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most (first token, last token) spans open at one moment: streams decoding together."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], -e[1]))
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


async def together(url: str, tokenizer, sequences: int, length: int, prompts: list[str] = PROMPTS) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=3600)
    prompts = [prompts[i % len(prompts)] for i in range(sequences)]
    news = [length - len(tokenizer(p)["input_ids"]) for p in prompts]
    before = httpx.get(url + "/metrics").text
    runs = await asyncio.gather(*[_stream(client, p, n) for p, n in zip(prompts, news)])
    after = httpx.get(url + "/metrics").text
    await client.close()
    overlapping = _peak_overlap([(r[1], r[2]) for r in runs])
    span = max(r[2] for r in runs) - min(r[1] for r in runs)
    return {"sequences": sequences, "length": length, "decoding_together": overlapping,
            "largest_batch": _largest_batch(after),
            "preemptions": _metric(after, "constellation_num_preemptions_total")
            - _metric(before, "constellation_num_preemptions_total"),
            "tokens": sum(r[3] for r in runs), "aggregate_tok_s": sum(r[3] - 1 for r in runs) / span}


async def short_under_load(url: str, long: int, long_tokens: int, short_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=3600)
    short = "The capital of France is"
    await _stream(client, short, short_tokens)  # warm-up
    i0, i_first, i1, i_n = await _stream(client, short, short_tokens)
    idle = i1 - i0
    seen: dict[int, list[float]] = {}  # long generation -> its chunks' arrival times

    async def one_long(i):
        s = await client.completions.create(model="constellation", prompt=PROMPTS[i % len(PROMPTS)],
                                            max_tokens=long_tokens, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        async for ch in s:
            if ch.choices and ch.choices[0].text:
                seen.setdefault(i, []).append(time.perf_counter())

    tasks = [asyncio.create_task(one_long(i)) for i in range(long)]
    while len(seen) < long:  # (every long generation has streamed its first token)
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    t0, f, t1, n = await _stream(client, short, short_tokens)
    loaded = t1 - t0
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()
    # the long streams' own pace in the second before the short request (a token a stream per step)
    gaps = [b - a for ts in seen.values() for a, b in zip(ts, ts[1:]) if t0 - 1.0 <= a and b <= t0]
    return {"long": long, "long_tokens": long_tokens, "short_tokens": short_tokens, "idle_s": idle,
            "loaded_s": loaded, "ratio": loaded / idle,
            "first_token_s": {"idle": i_first - i0, "loaded": f - t0},
            "per_token_ms": {"idle": 1000 * (i1 - i_first) / max(i_n - 1, 1),
                             "loaded": 1000 * (t1 - f) / max(n - 1, 1)},
            "long_step_ms": 1000 * sum(gaps) / len(gaps) if gaps else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    ap.add_argument("--config", help="constellation config (default: the demo's)")
    ap.add_argument("--sequences", type=int, default=64, help="concurrent sequences (default 64)")
    ap.add_argument("--length", type=int, default=512, help="prompt + new tokens per sequence (default 512)")
    ap.add_argument("--long", type=int, default=16, help="long generations running (default 16)")
    ap.add_argument("--long-tokens", type=int, default=1000, help="tokens each long generation asks (default 1000)")
    ap.add_argument("--short-tokens", type=int, default=16, help="the short request's new tokens (default 16)")
    ap.add_argument("--dtype", default=None, help="the server's --dtype (default: the config's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    from bench.served import ServedConstellation
    from demo.build import demo_config
    from demo.paths import cache_dir
    from index_store.config import load_config
    from index_store.models import load_tokenizer

    config = Path(a.config) if a.config else demo_config()
    tok = load_tokenizer(load_config(config).generalist.path)
    log = cache_dir() / "bench" / "capacity-serve.log"
    with ServedConstellation(config, log, dtype=a.dtype, max_waiting=max(64, a.sequences), max_seq_len=2048) as url:
        tog = asyncio.run(together(url, tok, a.sequences, a.length))
        short = asyncio.run(short_under_load(url, a.long, a.long_tokens, a.short_tokens))
    print(f"{a.sequences} sequences of {a.length} tokens, default KV cache: {tog['decoding_together']} decoding "
          f"together (target {a.sequences}), largest decode batch {tog['largest_batch']} rows, "
          f"{tog['preemptions']:.0f} preemptions, {tog['aggregate_tok_s']:.1f} tok/s aggregate")
    print(f"a short request ({a.short_tokens} tokens): {short['idle_s']:.2f} s idle, {short['loaded_s']:.2f} s "
          f"while {a.long} long generations run: {short['ratio']:.2f}x (target <= 3)")
    first, per = short["first_token_s"], short["per_token_ms"]
    print(f"  first token {first['idle']:.3f} s idle / {first['loaded']:.3f} s loaded; then {per['idle']:.1f} / "
          f"{per['loaded']:.1f} ms a token; the {a.long} long streams alone, the second before: "
          f"{short['long_step_ms'] or float('nan'):.1f} ms a token")
    if a.json:
        a.json.write_text(json.dumps({"together": tog, "short_under_load": short}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
