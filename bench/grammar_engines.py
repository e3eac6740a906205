"""llguidance beside xgrammar on the served tokenizer: what chose the grammar engine.

    python -m bench.grammar_engines [--config CONF] [--rows 16] [--steps 60]
    (xgrammar is not a dependency: pip install xgrammar into the venv first; without it, llguidance alone)

For ``--rows`` different JSON schemas on the generalist's tokenizer: seconds to read the vocabulary,
milliseconds to compile one schema, and per decode step the milliseconds to fill every row's token
mask and to apply the masks to ``[rows, vocab]`` scores (each engine's own apply, and the sampler's,
``server.engine.grammar.apply``). The steps follow random allowed tokens (each row's argmax of
random scores under its mask), so the matchers walk through their schemas as decoding does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.structured import schemas


def llguidance_side(tok, V, sch, steps):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lgt

    from server.engine import grammar

    t = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=V)
    init = time.perf_counter() - t
    t = time.perf_counter()
    ms = [llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(s, defaults=grammar.JSON_STYLE))
          for s in sch]
    comp = (time.perf_counter() - t) / len(sch)
    g = torch.Generator().manual_seed(0)
    fill = ours = 0.0
    for _ in range(steps):
        raw = torch.randn(len(ms), V, generator=g)
        t = time.perf_counter()
        allowed = grammar.masks(ms, V)
        t1 = time.perf_counter()
        scores = grammar.apply(raw, allowed)
        ours += time.perf_counter() - t1
        fill += t1 - t
        for m, tk in zip(ms, scores.argmax(-1).tolist()):
            grammar.advance(m, tk)
    bm = lgt.allocate_token_bitmask(len(ms), V)
    lgt.apply_token_bitmask_inplace(torch.randn(len(ms), V), bm)  # (its first call compiles a kernel)
    theirs = 0.0
    for _ in range(steps):
        raw = torch.randn(len(ms), V, generator=g)
        t = time.perf_counter()
        lgt.apply_token_bitmask_inplace(raw, bm)
        theirs += time.perf_counter() - t
    return {"vocab_s": round(init, 2), "compile_ms": round(comp * 1e3, 2), "fill_ms": round(fill / steps * 1e3, 3),
            "apply_ms_engine": round(theirs / steps * 1e3, 3), "apply_ms_sampler": round(ours / steps * 1e3, 3)}


def xgrammar_side(tok, V, sch, steps):
    import xgrammar as xgr

    t = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V), cache_enabled=False)
    init = time.perf_counter() - t
    t = time.perf_counter()
    ms = [xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(s), any_whitespace=False)) for s in sch]
    comp = (time.perf_counter() - t) / len(sch)
    bm = xgr.allocate_token_bitmask(len(ms), V)
    g = torch.Generator().manual_seed(0)
    fill = apply = 0.0
    for _ in range(steps):
        scores = torch.randn(len(ms), V, generator=g)
        t = time.perf_counter()
        for i, m in enumerate(ms):
            if not m.is_terminated():  # (a finished row keeps its last mask: it is not sampled any more)
                m.fill_next_token_bitmask(bm, i)
        t1 = time.perf_counter()
        xgr.apply_token_bitmask_inplace(scores, bm)
        apply += time.perf_counter() - t1
        fill += t1 - t
        for m, tk in zip(ms, scores.argmax(-1).tolist()):
            if not m.is_terminated():
                m.accept_token(tk)
    return {"vocab_s": round(init, 2), "compile_ms": round(comp * 1e3, 2), "fill_ms": round(fill / steps * 1e3, 3),
            "apply_ms_engine": round(apply / steps * 1e3, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grammar_engines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a constellation.toml (default: the embedded demo's)")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    from demo.build import demo_config
    from index_store.config import load_config
    from index_store.models import load_tokenizer

    cfg = load_config(Path(args.config) if args.config else demo_config())
    tok = load_tokenizer(cfg.generalist.path)
    V = json.loads((Path(cfg.generalist.path) / "config.json").read_text())["vocab_size"]
    sch = schemas(args.rows)
    out = {"rows": args.rows, "vocab": V, "llguidance": llguidance_side(tok, V, sch, args.steps)}
    try:
        out["xgrammar"] = xgrammar_side(tok, V, sch, args.steps)
    except ImportError:
        out["xgrammar"] = "not installed (pip install xgrammar)"
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
