"""Serving benchmark: constellation vs generalist mode through the real HTTP server.

    .venv/bin/python -m bench.serve_bench [--config CONFIG] [--tokens 64] [--streams 16]

Against ``constellation serve`` in its own process, started as users start it (bench.served).
Greedy, ``ignore_eos``, N new tokens, streamed. For each mode: at 1 stream, time to first token
and decode tokens/s (tokens after the first / time after the first); at ``--streams`` concurrent
streams with different prompts across domains, mean TTFT and aggregate decode tokens/s. Prints
the ratios constellation / generalist measured in this one run, and resident weight memory.
Targets (issue 4): decode >= 0.9x at 1 stream, >= 0.7x at 16, TTFT <= 1.5x with signature=trunk.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

PROMPTS = [
    "The patient presented with acute dyspnea and bilateral infiltrates on the chest radiograph.",
    "A congenital abnormality of the heart characterized by a defect in the atrial septum.",
    "Fever, productive cough and pleuritic chest pain developed over three days.",
    "Reduced renal clearance of creatinine with elevated serum potassium.",
    "The licensee may not sublicense the software without prior written consent.",
    "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.",
    "Redistributions of source code must retain the above copyright notice.",
    "This agreement shall be governed by the laws of the State of New York.",
    "def parse_header(line):\n    key, _, value = line.partition(':')\n    return key.strip().lower(), value.strip()",
    "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity",
    "import os\nfor root, dirs, files in os.walk(path):\n    for name in files:",
    "try:\n    value = int(text)\nexcept ValueError:\n    value = None",
    "Catalysis of the reaction: ATP + a protein = ADP + a phosphoprotein.",
    "The chemical reactions and pathways resulting in the breakdown of glucose.",
    "A membrane-bounded organelle that contains the chromosomes of a eukaryotic cell.",
    "The process in which a photon is absorbed by a chlorophyll molecule.",
]


async def _one(client, model, prompt, mode, tokens):
    t0 = time.perf_counter()
    first = last = None
    n = 0
    # logprobs=0: every token arrives as its own chunk, even one whose text is still pending
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                             stream=True, logprobs=0,
                                             extra_body={"ignore_eos": True, "composition": {"mode": mode}})
    async for ch in stream:
        if ch.choices and ch.choices[0].logprobs and ch.choices[0].logprobs.tokens:
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
    return first - t0, first, last


async def _run(url, mode, prompts, tokens):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0)
    t0 = time.perf_counter()
    res = await asyncio.gather(*[_one(client, "constellation", p, mode, tokens) for p in prompts])
    await client.close()
    ttft = statistics.mean(r[0] for r in res)
    if len(prompts) == 1:
        decode = (tokens - 1) / (res[0][2] - res[0][1])
    else:  # aggregate: tokens after each stream's first, over the span from first first-token to last token
        decode = len(prompts) * (tokens - 1) / (max(r[2] for r in res) - min(r[1] for r in res))
    return ttft, decode, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="constellation config (default: the demo)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="single-stream runs per mode (median)")
    ap.add_argument("--log", default="/tmp/serve-bench.log", help="the server's log (default /tmp/serve-bench.log)")
    args = ap.parse_args()

    from bench.served import ServedConstellation
    from demo.build import demo_config
    from index_store.loader import load_constellation

    config = Path(args.config) if args.config else demo_config()
    slots, seq = max(16, args.streams), 512
    served = ServedConstellation(config, Path(args.log), max_running=slots, max_waiting=64, max_seq_len=seq,
                                 max_prompt_tokens=256, max_new_tokens=256)
    prompts = (PROMPTS * ((args.streams + len(PROMPTS) - 1) // len(PROMPTS)))[: args.streams]
    rows = {}
    with served as url:
        asyncio.run(_run(url, "generalist", prompts[:2], 8))  # warm-up
        asyncio.run(_run(url, "constellation", prompts[:2], 8))
        for mode in ("generalist", "constellation"):
            singles = [asyncio.run(_run(url, mode, [PROMPTS[i * 5 % len(PROMPTS)]], args.tokens))
                       for i in range(args.repeats)]
            ttft1 = statistics.median(s[0] for s in singles)
            dec1 = statistics.median(s[1] for s in singles)
            ttftn, decn, _ = asyncio.run(_run(url, mode, prompts, args.tokens))
            rows[mode] = (ttft1, dec1, ttftn, decn)

    loaded = load_constellation(config)  # for the settings and sizes printed (the server has its own copy)
    c, mc = loaded.constellation, loaded.constellation.g.mc
    g, k = rows["generalist"], rows["constellation"]
    res = c.resident_bytes()
    cache = 2 * mc.n_layers * slots * mc.n_kv_heads * seq * mc.head_dim * c.g.dtype.itemsize
    print(f"{loaded.report['device']} {loaded.report['dtype']}, signature={c.settings.signature}, "
          f"L={c.settings.layers}, K={c.settings.top_k}, {args.tokens} new tokens, greedy, ignore_eos")
    print(f"{'':28}{'generalist':>12}{'constellation':>15}{'ratio':>8}")
    print(f"{'TTFT, 1 stream (ms)':28}{g[0] * 1e3:12.1f}{k[0] * 1e3:15.1f}{k[0] / g[0]:8.2f}")
    print(f"{'decode tok/s, 1 stream':28}{g[1]:12.1f}{k[1]:15.1f}{k[1] / g[1]:8.2f}")
    print(f"{f'TTFT, {args.streams} streams (ms)':28}{g[2] * 1e3:12.1f}{k[2] * 1e3:15.1f}{k[2] / g[2]:8.2f}")
    print(f"{f'decode tok/s, {args.streams} streams':28}{g[3]:12.1f}{k[3]:15.1f}{k[3] / g[3]:8.2f}")
    total = sum(res.values())
    print(f"resident weights: generalist {res['generalist'] / 2**20:.1f} MiB, constellation {total / 2**20:.1f} MiB "
          f"({total / res['generalist']:.2f}x); KV slot cache {cache / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
