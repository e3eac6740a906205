"""What a live catalog change costs a running server.

    .venv/bin/python -m bench.catalog_swap [--config CONFIG] [--streams 8] [--tokens 96]

A private copy of the constellation (the demo by default; its models are linked, not copied) is
served by ``constellation serve --admin-key`` (bench.served). ``--streams`` greedy streams decode;
once they run, the admin API removes the last specialist, and after that adds it back (its probes
fingerprinted again). For each change it reports: the admin call's duration (apply: check, probes,
index, snapshot, commit; then load and swap), the running streams' median inter-token gap and their
worst gap while the call ran, and the time to first token of a request sent 50 ms after the call
started (admitted on the old catalog or, once the swap is pending, right after it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.prefill_stall import _stream
from bench.serve_bench import PROMPTS

ADMIN = {"Authorization": "Bearer bench-admin"}


def private_copy(config: Path, dst: Path) -> Path:
    """The config and its index/probes copied, every model folder symlinked."""
    from index_store.config import load_config

    cfg = load_config(config)
    (dst / "models").mkdir(parents=True)
    (dst / "models" / "generalist").symlink_to(cfg.generalist.path)
    for name, path in cfg.specialists.items():
        (dst / "models" / name).symlink_to(path)
    shutil.copytree(cfg.index.path, dst / "index")
    shutil.copy(cfg.index.probes, dst / "probes.json")
    specs = "\n".join(f'{n} = "models/{n}"' for n in cfg.specialists)
    text = (f'[generalist]\npath = "models/generalist"\n\n[specialists]\n{specs}\n\n[index]\npath = "index"\n'
            f'probes = "probes.json"\nbasis = "{cfg.index.basis}"\nnoise_fraction = {cfg.index.noise_fraction}\n'
            f'seed = {cfg.index.seed}\nmax_tokens = {cfg.index.max_tokens}\n\n[composition]\n'
            f'top_k = {cfg.composition.top_k}\nlayers = {json.dumps(cfg.composition.layers)}\n'
            f'policy = "{cfg.composition.policy}"\nsignature = "{cfg.composition.signature}"\n\n[runtime]\n'
            f'device = "{cfg.runtime.device}"\ndtype = "{cfg.runtime.dtype}"\n\n[catalog]\n'
            f'models_root = "{list(cfg.specialists.values())[-1].resolve().parent}"\n')  # where the links point
    (dst / "constellation.toml").write_text(text)
    return dst / "constellation.toml"


async def _change(url, streams, tokens, request):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    stamps = [[] for _ in range(streams)]
    tasks = [asyncio.create_task(_stream(client, PROMPTS[i % len(PROMPTS)], tokens, stamps[i]))
             for i in range(streams)]
    while min(len(s) for s in stamps) < 4:
        await asyncio.sleep(0.01)
    async with httpx.AsyncClient(timeout=600) as http:
        t0 = time.perf_counter()
        admin = asyncio.create_task(request(http))
        await asyncio.sleep(0.05)
        late: list[float] = []
        late_task = asyncio.create_task(_stream(client, PROMPTS[0], 1, late))
        r = await admin
        t1 = time.perf_counter()
        await late_task
        await asyncio.gather(*tasks)
        ready = (await http.get(url + "/ready")).json()
    await client.close()
    if r.status_code != 200:
        raise SystemExit(f"admin call failed: {r.status_code} {r.text}")
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    during = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > t0 and a < t1]
    return {"call_s": t1 - t0, "median_gap_ms": 1000 * statistics.median(gaps),
            "worst_gap_during_ms": 1000 * max(during) if during else float("nan"),
            "late_ttft_s": late[0] - t0 - 0.05 if late else float("nan"), "version": ready["catalog_version"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="constellation config (default: the demo's)")
    ap.add_argument("--streams", type=int, default=8, help="streams decoding during each change")
    ap.add_argument("--tokens", type=int, default=96, help="tokens each stream generates")
    ap.add_argument("--log", default=".cache/bench/catalog_swap.log", help="the server's output")
    args = ap.parse_args()
    from bench.served import ServedConstellation
    from index_store.config import load_config
    from index_store.probes import load_probes
    from demo.build import demo_config

    config = Path(args.config) if args.config else demo_config()
    with tempfile.TemporaryDirectory(prefix="catalog-swap-") as tmp:
        conf = private_copy(config, Path(tmp))
        cfg = load_config(conf)
        last = list(cfg.specialists)[-1]
        probes = load_probes(cfg.index.probes)[last]
        path = str(cfg.specialists[last])

        async def remove(http):
            return await http.delete(url + f"/v1/specialists/{last}", headers=ADMIN)

        async def add(http):
            return await http.post(url + "/v1/specialists", headers=ADMIN,
                                   json={"name": last, "path": path, "probes": probes})

        with ServedConstellation(conf, Path(args.log), admin_key="bench-admin", catalog_poll=0) as url:
            rows = [(f"remove {last}", asyncio.run(_change(url, args.streams, args.tokens, remove))),
                    (f"add {last} ({len(probes)} probes)", asyncio.run(_change(url, args.streams, args.tokens, add)))]
    print(f"{args.streams} streams x {args.tokens} tokens; {config}")
    print(f"{'change':<28}{'admin call s':>13}{'median gap ms':>15}{'worst gap ms':>14}{'late TTFT s':>13}")
    for name, r in rows:
        print(f"{name:<28}{r['call_s']:>13.2f}{r['median_gap_ms']:>15.1f}{r['worst_gap_during_ms']:>14.1f}"
              f"{r['late_ttft_s']:>13.2f}")


if __name__ == "__main__":
    main()
