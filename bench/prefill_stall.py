"""How much a long prompt arriving under load stalls the running streams.

    .venv/bin/python -m bench.prefill_stall [--config CONFIG] [--streams 15] [--prompt-tokens 1500]

Through the real HTTP server (demo by default): ``--streams`` greedy streams decode; once they are
running, a ``--prompt-tokens`` prompt arrives. Every running stream's inter-token gaps are
recorded; the report gives the median gap, the worst gap while the long prompt was being
prefilled, their ratio (target ≤ 3), and the long prompt's time to first token. Run twice in one
run: *chunked* (the engine's default: prefill sized to about one decode step while streams run)
and *whole* (``--prefill-chunk 4096 --prefill-chunk-min 4096``: the prompt in one step, as
before). Each is a ``constellation serve`` process started as users start it (bench.served).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from bench.serve_bench import PROMPTS


async def _stream(client, prompt, tokens, stamps: list[float]):
    s = await client.completions.create(model="constellation", prompt=prompt, max_tokens=tokens, temperature=0,
                                        stream=True, logprobs=0, extra_body={"ignore_eos": True})
    async for ch in s:
        if ch.choices and ch.choices[0].logprobs and ch.choices[0].logprobs.tokens:
            stamps.append(time.perf_counter())


async def _scenario(url, streams, long_ids, tokens):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    stamps = [[] for _ in range(streams)]
    tasks = [asyncio.create_task(_stream(client, PROMPTS[i % len(PROMPTS)], tokens, stamps[i]))
             for i in range(streams)]
    while min(len(s) for s in stamps) < 8:  # all running, past their start
        await asyncio.sleep(0.01)
    long_stamps: list[float] = []
    t0 = time.perf_counter()
    await _stream(client, long_ids, 1, long_stamps)
    t1 = long_stamps[0]
    await asyncio.gather(*tasks)
    await client.close()
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    during = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > t0 and a < t1]
    return {"median_gap": statistics.median(gaps), "worst_gap": max(during) if during else float("nan"),
            "long_ttft": t1 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Prints gaps in ms and the worst/median ratio for each variant.")
    ap.add_argument("--config", help="constellation config (default: the demo's)")
    ap.add_argument("--streams", type=int, default=15, help="streams decoding when the long prompt arrives")
    ap.add_argument("--prompt-tokens", type=int, default=1500, help="length of the long prompt")
    ap.add_argument("--tokens", type=int, default=160, help="tokens each running stream generates")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="the server's --dtype "
                    "(default: the config's)")
    ap.add_argument("--log-dir", default="/tmp", help="where the servers' logs go (default /tmp)")
    args = ap.parse_args()

    from bench.served import ServedConstellation
    from demo.build import demo_config
    from index_store.config import load_config
    from index_store.models import load_tokenizer, pick_device, pick_dtype

    config_path = Path(args.config) if args.config else demo_config()
    config = load_config(config_path)
    tokenizer = load_tokenizer(config.generalist.path)
    text = " ".join(PROMPTS) + " "
    long_ids = tokenizer(text * (1 + args.prompt_tokens // 100))["input_ids"][: args.prompt_tokens]
    base = dict(max_running=args.streams + 1, max_seq_len=args.prompt_tokens + 64,
                max_prompt_tokens=args.prompt_tokens, dtype=args.dtype)
    variants = {"chunked": {}, "whole": dict(prefill_chunk=4096, prefill_chunk_min=4096)}
    rows = {}
    for name, flags in variants.items():
        with ServedConstellation(config_path, Path(args.log_dir) / f"prefill-stall-{name}.log", **base, **flags) as url:
            asyncio.run(_scenario(url, 2, long_ids[:64], 12))  # warm-up
            rows[name] = asyncio.run(_scenario(url, args.streams, long_ids, args.tokens))
    dtype = pick_dtype(args.dtype or config.runtime.dtype, device := pick_device(config.runtime.device))
    print(f"{args.streams} running streams, a {len(long_ids)}-token prompt arrives "
          f"({device} {str(dtype).removeprefix('torch.')})")
    print(f"{'':10}{'median gap ms':>15}{'worst gap ms':>14}{'worst/median':>14}{'long TTFT s':>13}")
    for name, r in rows.items():
        print(f"{name:10}{r['median_gap'] * 1e3:15.1f}{r['worst_gap'] * 1e3:14.1f}"
              f"{r['worst_gap'] / r['median_gap']:14.2f}{r['long_ttft']:13.2f}")
    print("target: worst/median <= 3 (chunked)")


if __name__ == "__main__":
    main()
