"""Kernel choices by measurement: storage/compute dtype and layout per batch size (docs/precision.md).

    .venv/bin/python -m bench.kernels [--threads N] [--repeats R] [--steps S] [--batches 1,2,4,16]
                                      [--model DIR] [--candidates a,b] [--compile] [--quick] [--json OUT]

Every candidate is the demo generalist (SmolLM2-135M; ``--model DIR`` for another HF folder) run by
``composer.model.Transformer`` in one precision/layout (the list is printed at the end). For each
batch size B, B prompts are prefilled one by one into a slot KV cache (as the server does) and then
decoded together for ``--steps`` tokens, teacher-forced on the fp32 reference's greedy tokens, so
every candidate sees the same inputs and its logits can be compared position by position:

- ``step ms``: median wall time of one B-row decode step (embedding to fp32 logits); ``× fp32``: that
  over the fp32 reference's step in the same round (rounds interleave the candidates; the median
  ratio over ``--repeats`` rounds is shown, which is steadier than the times on a shared machine);
- ``max|Δlogit|`` / ``max|Δlogp|``: largest absolute difference to the fp32 reference's logits /
  log-probabilities, over every row, step and vocabulary entry (prefill's last position included);
- ``top-1``: share of positions whose argmax equals the reference's greedy token; ``prefix``: the
  shortest and the median (over rows) run of identical greedy tokens before the first disagreement,
  i.e. how many tokens free-running greedy decoding reproduces (out of ``--steps`` + 1).

``prefill ms`` times one 128-token prompt. The last lines name, per B, the fastest candidate within
tolerance (max|Δlogp| <= ``LOGPROB_TOL`` and top-1 >= ``TOP1_MIN``) and, since one model is held
for every batch size, the candidate within tolerance at every B with the lowest geometric-mean
ratio (within ``TIE`` of it, the first listed, plainer one): the choice ``runtime.dtype = "auto"``
makes on a CPU (``index_store.models.pick_dtype``).
``--compile`` then times that candidate's decode step under ``torch.compile`` (compile time
included). ``--quick`` is a smoke run: B in {1, 2}, 3 steps, one round, short prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from composer.linear import matmul_kernels
from composer.model import Transformer
from composer.weights import load_model
from server.engine.kv_cache import DecodeView, PrefillView, SlotCache

# The tolerance a candidate must meet on the demo to be chosen (real 135M model, 64 decode steps).
LOGPROB_TOL = 1.0  # max |Δ log-prob| against fp32 over every position and vocabulary entry
TOP1_MIN = 0.95  # share of positions whose greedy token equals fp32's
TIE = 0.05  # time ratios closer than this are within the noise of a shared machine

PROMPTS = [
    "The patient presented with a persistent cough and a low-grade fever, so the doctor",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Under the terms of this agreement, the licensee shall",
    "Photosynthesis converts light energy into chemical energy in",
    "Once upon a time, in a small village by the sea,",
    "The capital of France is",
    "import numpy as np\nx = np.linspace(0, 1, 100)\n",
    "In 1969, astronauts first landed on",
    "The court held that the contract was void because",
    "Mitochondria are often called the powerhouse of the cell because they",
    "My favourite recipe for a quick dinner is",
    "SELECT name, age FROM users WHERE",
    "The weather today is sunny with a chance of",
    "Quantum entanglement describes a situation in which",
    "To install the package, run the following command:",
    "Dear hiring manager, I am writing to apply for",
]


@dataclass
class Candidate:
    name: str
    description: str
    build: Callable[[Transformer], Transformer]
    kv: torch.dtype | None = None  # the KV cache's dtype (default: the model's compute dtype)


class Head16(Transformer):
    """(A candidate only) logits of a single row from an fp16 copy of the LM head."""

    def fuse(self):
        self.head16 = self.lm_head_weight().to(torch.float16)
        return super().fuse()

    def logits(self, h):
        if h.numel() == h.shape[-1]:
            return F.linear(h.to(torch.float16), self.head16).float()
        return super().logits(h)


def _cast(ref: Transformer, dtype: torch.dtype, cls=Transformer) -> Transformer:
    return cls(ref.mc, ref.arch, {k: v.to(dtype) for k, v in ref.params.items()}).fuse()


def _with(m: Transformer, residual: torch.dtype | None = None, aten_max_rows: int | None = None) -> Transformer:
    if residual is not None:
        m.residual_dtype = residual
    if aten_max_rows is not None:
        m.aten_max_rows = aten_max_rows
    return m


CANDIDATES = [
    Candidate("fp32", "fp32 weights, separate q/k/v and gate/up (the reference; what ran before)",
              lambda ref: ref),
    Candidate("fp32-fused", "fp32, q/k/v and gate/up fused", lambda ref: _cast(ref, torch.float32)),
    Candidate("bf16", "bf16 weights and KV cache, fused, fp32 residual stream; matmuls of <= 2 rows on ATen's "
              "kernels, larger on oneDNN", lambda ref: _cast(ref, torch.bfloat16)),
    Candidate("bf16-unfused", "as bf16, q/k/v and gate/up as separate matmuls",
              lambda ref: Transformer(ref.mc, ref.arch, {k: v.to(torch.bfloat16) for k, v in ref.params.items()})),
    Candidate("bf16-onednn", "as bf16, every matmul on oneDNN (torch's default)",
              lambda ref: _with(_cast(ref, torch.bfloat16), aten_max_rows=0)),
    Candidate("bf16-aten", "as bf16, every matmul on ATen's kernels (oneDNN off)",
              lambda ref: _with(_cast(ref, torch.bfloat16), aten_max_rows=1 << 30)),
    Candidate("bf16-resid16", "as bf16, residual stream in bf16 too",
              lambda ref: _with(_cast(ref, torch.bfloat16), residual=torch.bfloat16)),
    Candidate("bf16-kv32", "as bf16, KV cache in fp32", lambda ref: _cast(ref, torch.bfloat16), kv=torch.float32),
    Candidate("fp16", "fp16 weights and KV cache, fused, fp32 residual stream",
              lambda ref: _cast(ref, torch.float16)),
    Candidate("bf16+head16", "bf16, plus an fp16 copy of the LM head for single-row logits",
              lambda ref: _cast(ref, torch.bfloat16, Head16)),
]


# ---- the engine's slot KV cache and its views -------------------------------------------------------------
def Slots(m: Transformer, slots: int, max_len: int, dtype: torch.dtype | None = None) -> SlotCache:
    return SlotCache(m.mc.n_layers, slots, m.mc.n_kv_heads, max_len, m.mc.head_dim, dtype or m.dtype, m.device)


def decode_step(m: Transformer, tokens: torch.Tensor, lengths: torch.Tensor, cache: SlotCache) -> torch.Tensor:
    """One B-row decode step: fp32 logits ``[B, V]``."""
    return _step(m, tokens, lengths, int(lengths.max()) + 1, cache)


def _step(m: Transformer, tokens, lengths, span: int, cache: SlotCache) -> torch.Tensor:
    mask = (torch.arange(span)[None, :] <= lengths[:, None])[:, None, None, :]
    ctx = m.positional_context(lengths[:, None], mask, DecodeView(cache, lengths, span))
    x = m.run_blocks(m.embed(tokens[:, None], ctx), ctx, 0, m.mc.n_layers)
    return m.logits(m.final_norm(x))[:, 0]


def compiled_step():
    """``decode_step`` with the model's part under ``torch.compile(dynamic=True)``; the bf16 kernel
    routing (``matmul_kernels``, a process-wide switch) is entered around the compiled call."""
    fn = torch.compile(_step, dynamic=True)

    def step(m, tokens, lengths, cache):
        with matmul_kernels(tokens.shape[0], m.dtype, m.device, m.aten_max_rows):
            return fn(m, tokens, lengths, int(lengths.max()) + 1, cache)
    return step


@torch.inference_mode()
def run(m: Transformer, prompts: list[list[int]], steps: int, forced: torch.Tensor | None = None,
        step_fn=decode_step, kv: torch.dtype | None = None) -> tuple[torch.Tensor, list[float]]:
    """Prefill ``prompts`` into a slot cache (of ``kv`` dtype), decode ``steps`` tokens (teacher-forced
    on ``forced`` ``[B, steps]`` when given, else greedy). Returns the logits ``[B, steps + 1, V]`` and
    the step times."""
    B = len(prompts)
    cache = Slots(m, B, max(len(p) for p in prompts) + steps + 1, kv)
    first = []
    for b, p in enumerate(prompts):
        ids = torch.tensor([p])
        ctx = m.context(torch.ones_like(ids), PrefillView(cache, b))
        x = m.run_blocks(m.embed(ids, ctx), ctx, 0, m.mc.n_layers)
        first.append(m.logits(m.final_norm(x[:, -1:]))[0, -1])
    out = [torch.stack(first)]
    lengths = torch.tensor([len(p) for p in prompts])
    times = []
    for s in range(steps):
        tok = forced[:, s] if forced is not None else out[-1].argmax(-1)
        t0 = time.perf_counter()
        out.append(step_fn(m, tok, lengths, cache))
        times.append(time.perf_counter() - t0)
        lengths = lengths + 1
    return torch.stack(out, 1), times


@torch.inference_mode()
def prefill_ms(m: Transformer, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    ctx = m.context(torch.ones_like(ids), None)
    m.logits(m.final_norm(m.run_blocks(m.embed(ids, ctx), ctx, 0, m.mc.n_layers)[:, -1:]))
    return (time.perf_counter() - t0) * 1e3


def accuracy(got: torch.Tensor, ref: torch.Tensor, ref_tokens: torch.Tensor) -> dict:
    """``got``/``ref`` ``[B, S+1, V]`` fp32; ``ref_tokens`` ``[B, S+1]`` the reference's greedy tokens."""
    dl = (got - ref).abs().max().item()
    dlp = (F.log_softmax(got, -1) - F.log_softmax(ref, -1)).abs().max().item()
    same = got.argmax(-1) == ref_tokens
    miss = (~same).float()
    first = torch.where(miss.any(1), miss.argmax(1), torch.full_like(miss[:, 0], same.shape[1], dtype=torch.long))
    return {"max_dlogit": dl, "max_dlogp": dlp, "top1": same.float().mean().item(), "prefix": int(first.min()),
            "prefix_median": int(first.median())}


def default_model() -> Path:
    from demo.build import demo_config
    from index_store.config import load_config

    return load_config(demo_config()).generalist.path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per run (default 64)")
    ap.add_argument("--batches", default="1,2,4,16", help="batch sizes (default 1,2,4,16)")
    ap.add_argument("--model", type=Path, default=None, help="HF model folder (default: the demo generalist)")
    ap.add_argument("--candidates", default=None,
                    help=f"comma-separated subset of {','.join(c.name for c in CANDIDATES)} (fp32 always runs)")
    ap.add_argument("--compile", action="store_true", help="also time the chosen candidate under torch.compile")
    ap.add_argument("--quick", action="store_true", help="smoke run: batches 1,2; 3 steps; one round")
    ap.add_argument("--json", type=Path, default=None, help="write the measurements here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    batches = [1, 2] if a.quick else [int(b) for b in a.batches.split(",")]
    steps = 3 if a.quick else a.steps
    repeats = 1 if a.quick else a.repeats
    names = None if a.candidates is None else {"fp32", *a.candidates.split(",")}
    cands = [c for c in CANDIDATES if names is None or c.name in names]
    folder = a.model or default_model()

    from index_store.models import load_tokenizer

    ref = load_model(folder, "cpu", torch.float32)
    tok = load_tokenizer(folder)
    texts = [t[:24] for t in PROMPTS] if a.quick else PROMPTS
    enc = [tok(t)["input_ids"] or [0] for t in texts]
    models = {c.name: c.build(ref) for c in cands}
    print(f"# bench.kernels: {folder.name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"avx512_bf16={torch.cpu._is_avx512_bf16_supported()}, steps={steps}, rounds={repeats}", flush=True)

    results: dict = {"config": {"model": str(folder), "threads": torch.get_num_threads(), "steps": steps,
                                "repeats": repeats, "torch": torch.__version__}, "rows": [], "prefill": {}}
    refs = {}
    for B in batches:
        prompts = [enc[b % len(enc)] for b in range(B)]
        logits, _ = run(ref, prompts, steps)
        refs[B] = (prompts, logits, logits.argmax(-1))
    acc = {}
    step_ms: dict = {(c.name, B): [] for c in cands for B in batches}
    ratios: dict = {(c.name, B): [] for c in cands for B in batches}
    long_ids = torch.tensor([(sum(enc, []) * 20)[:128]])
    pre: dict = {c.name: [] for c in cands}
    for r in range(repeats):
        for B in batches:
            prompts, ref_logits, ref_tokens = refs[B]
            this = {}
            for c in cands:
                logits, times = run(models[c.name], prompts, steps, ref_tokens[:, :-1], kv=c.kv)
                if (c.name, B) not in acc:
                    acc[c.name, B] = accuracy(logits, ref_logits, ref_tokens)
                this[c.name] = statistics.median(times[1:] if len(times) > 2 else times) * 1e3
                step_ms[c.name, B].append(this[c.name])
            for c in cands:
                ratios[c.name, B].append(this[c.name] / this["fp32"])
        for c in cands:
            pre[c.name].append(prefill_ms(models[c.name], long_ids))
        print(f"  round {r + 1}/{repeats} done", file=sys.stderr, flush=True)

    print("\n| candidate | B | step ms | × fp32 | max\\|Δlogit\\| | max\\|Δlogp\\| | top-1 | prefix min/median |")
    print("|---|---|---|---|---|---|---|---|")
    for B in batches:
        for c in cands:
            ms, ra, ac = statistics.median(step_ms[c.name, B]), statistics.median(ratios[c.name, B]), acc[c.name, B]
            print(f"| {c.name} | {B} | {ms:.1f} | {ra:.2f} | {ac['max_dlogit']:.3g} | {ac['max_dlogp']:.3g} | "
                  f"{ac['top1'] * 100:.1f}% | {ac['prefix']}, {ac['prefix_median']} /{steps + 1} |")
            results["rows"].append({"candidate": c.name, "batch": B, "step_ms": ms, "ratio_vs_fp32": ra,
                                    "step_ms_rounds": step_ms[c.name, B], **ac})
    print("\n| candidate | prefill ms (1×128) | × fp32 |")
    print("|---|---|---|")
    for c in cands:
        ms = statistics.median(pre[c.name])
        results["prefill"][c.name] = ms
        print(f"| {c.name} | {ms:.0f} | {ms / statistics.median(pre['fp32']):.2f} |")
    print("\ncandidates:")
    for c in cands:
        print(f"  {c.name}: {c.description}")

    print(f"\nfastest within tolerance (max|Δlogp| <= {LOGPROB_TOL}, top-1 >= {TOP1_MIN:.0%}):")
    chosen = {}
    ok = {B: [c.name for c in cands if acc[c.name, B]["max_dlogp"] <= LOGPROB_TOL
              and acc[c.name, B]["top1"] >= TOP1_MIN] for B in batches}
    for B in batches:
        best = min(ok[B], key=lambda n: statistics.median(ratios[n, B]))
        chosen[B] = best
        print(f"  B={B}: {best} ({statistics.median(ratios[best, B]):.2f}x fp32)")
    # One model is held for every B: the candidate within tolerance at every B with the lowest
    # geometric-mean time ratio; within TIE of the lowest, the first listed (the plainer) one.
    everywhere = [c.name for c in cands if all(c.name in ok[B] for B in batches)]
    gm = {n: statistics.geometric_mean([statistics.median(ratios[n, B]) for B in batches]) for n in everywhere}
    overall = next(n for n in everywhere if gm[n] <= min(gm.values()) * (1 + TIE))
    ranked = ", ".join(f"{n} {v:.2f}x" for n, v in sorted(gm.items(), key=lambda kv: kv[1]))
    print(f"  over all B (geometric mean of the ratios; ties within {TIE:.0%} go to the first listed): "
          f"{overall} ({gm[overall]:.2f}x fp32); {ranked}")
    results["chosen"] = chosen
    results["overall"] = {"candidate": overall, "geomean_ratio": gm}

    if a.compile:
        results["compile"] = compile_report(models, {c.name: c for c in cands}, refs, batches, steps, overall,
                                            repeats)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return results


def compile_report(models, cands, refs, batches, steps, name, repeats) -> dict:
    """Candidate ``name``'s decode step under ``torch.compile`` against eager, per batch size: the
    first run (compiling) and then interleaved rounds of both."""
    import torch._dynamo

    out = {}
    print("\ntorch.compile(dynamic=True) of the decode step (model part; prefill stays eager):")
    m, kv = models[name], cands[name].kv
    for B in batches:
        prompts, ref_logits, ref_tokens = refs[B]
        torch._dynamo.reset()
        step = compiled_step()
        t0 = time.perf_counter()
        logits, _ = run(m, prompts, steps, ref_tokens[:, :-1], step_fn=step, kv=kv)
        first = time.perf_counter() - t0
        eager, compiled = [], []
        for _ in range(max(repeats, 2)):
            eager.append(statistics.median(run(m, prompts, steps, ref_tokens[:, :-1], kv=kv)[1]))
            compiled.append(statistics.median(run(m, prompts, steps, ref_tokens[:, :-1], step_fn=step, kv=kv)[1]))
        ms_c, ms_e = statistics.median(compiled) * 1e3, statistics.median(eager) * 1e3
        ac = accuracy(logits, ref_logits, ref_tokens)
        out[B] = {"candidate": name, "first_run_s": first, "compiled_ms": ms_c, "eager_ms": ms_e, **ac}
        print(f"  B={B} {name}: first run (compiling) {first:.1f} s; step {ms_c:.1f} ms compiled vs {ms_e:.1f} ms "
              f"eager ({ms_c / ms_e:.2f}x); max|Δlogp| vs fp32 {ac['max_dlogp']:.3g}, top-1 {ac['top1']:.1%}",
              flush=True)
    return out


if __name__ == "__main__":
    main()
