"""The engine on an accelerator node, with nothing but the project and torch: exactness and speed.

    python -m bench.device_check OUT_DIR [--sizes 1b,8b] [--adapters 16] [--streams 1,16,64]
    python -m bench.device_check OUT_DIR --smoke        # tiny model on the CPU, seconds (the tests)

Builds synthetic Llama models with random weights made on the device (shapes of Llama 3.2 1B and
Llama 3.1 8B; nothing is downloaded), and N random rank-16 LoRA adapters (PEFT's ``B A`` with its
``alpha / r`` scale) on every linear of every layer as the catalog. Then, per size:

1. exactness: the composed logits of four compositions in the serving dtype (bf16 on CUDA) against
   the same computed in fp32, and the captured decode step against the eager one, token for token;
2. the engine end to end: every stream of a batch gets its tokens, in each mode;
3. decode tok/s at each stream count in ``generalist`` and ``constellation`` mode (a different
   composition per stream: random weights over 3 adapters), captured when ``--compile``, beside
   the bound ``streams x bandwidth / bytes read per step`` with the device's measured copy bandwidth.

Figures go to ``OUT_DIR/device_check.json`` (and the console). Budget: under 8 minutes on one GPU
for the default sizes. Needs torch >= 2.11, and the project's own dependencies (pydantic,
safetensors; no transformers, no peft, no tokenizer files: a byte tokenizer stands in).
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import random
import time
from pathlib import Path

import torch

SIZES = {  # (d, layers, heads, kv heads, d_ff, vocab)
    "tiny": (64, 4, 4, 2, 128, 512),
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "8b": (4096, 32, 32, 8, 14336, 128256),
}


class ByteTokenizer:
    """Stands in for a tokenizer: UTF-8 bytes are the ids (the model's vocabulary is larger)."""

    eos_token_id = None

    def __call__(self, text: str) -> dict:
        return {"input_ids": list(text.encode())}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def synthetic_llama(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ``composer.model.Transformer`` of ``size``'s shapes, random weights made on ``device``."""
    from composer.arch import resolve
    from composer.model import Transformer

    d, n, h, kv, ff, vocab = SIZES[size]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d, "num_hidden_layers": n,
           "num_attention_heads": h, "num_key_value_heads": kv, "intermediate_size": ff, "vocab_size": vocab,
           "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": size != "8b",
           "hidden_act": "silu", "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": 2}
    arch, mc = resolve(cfg, f"synthetic {size}")
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    params = {arch.embed: rand(vocab, d, scale=0.02), arch.final_norm[0]: torch.ones(d, device=device, dtype=dtype)}
    if not mc.tie_embeddings:
        params[arch.lm_head] = rand(vocab, d, scale=0.02)
    hd = d // h
    shapes = {"self_attn.q_proj.weight": (h * hd, d), "self_attn.k_proj.weight": (kv * hd, d),
              "self_attn.v_proj.weight": (kv * hd, d), "self_attn.o_proj.weight": (d, h * hd),
              "mlp.gate_proj.weight": (ff, d), "mlp.up_proj.weight": (ff, d), "mlp.down_proj.weight": (d, ff)}
    for i in range(n):
        for name, shape in shapes.items():
            params[arch.layer_name(i, name)] = rand(*shape, scale=shape[1] ** -0.5)
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            params[arch.layer_name(i, name)] = torch.ones(d, device=device, dtype=dtype)
    return Transformer(mc, arch, params).fuse()


def catalog(g, adapters: int, rank: int = 16, seed: int = 0):
    """A constellation of ``adapters`` random rank-``rank`` LoRAs on every linear of every layer."""
    from composer.constellation import Constellation, Settings
    from composer.lowrank import LowRank
    from composer.model import Transformer

    gen = torch.Generator(device=g.device).manual_seed(1000 + seed)
    specialists = {}
    for k in range(adapters):
        lr = {}
        for i in range(g.mc.n_layers):
            for s, role in g.arch.roles.items():
                if role.role not in ("read", "write"):
                    continue
                w = g.params[g.arch.layer_name(i, s)]
                A = torch.randn(rank, w.shape[1], generator=gen, device=g.device) / w.shape[1] ** 0.5
                B = torch.randn(w.shape[0], rank, generator=gen, device=g.device) * (0.05 / w.shape[1] ** 0.5)
                lr[g.arch.layer_name(i, s)] = LowRank(A.to(g.dtype), (2.0 * B).to(g.dtype))  # alpha / r = 2, folded
        specialists[f"a{k:02d}"] = Transformer(g.mc, g.arch, dict(g.params), lr)
    q = torch.linalg.qr(torch.randn(g.mc.d, adapters, generator=torch.Generator().manual_seed(seed),
                                    dtype=torch.float64))[0]
    return Constellation(g, specialists, q.T.contiguous().float().to(g.device),
                         Settings(top_k=min(3, adapters), layers="auto", signature="generalist"))


def bandwidth(device: torch.device) -> float:
    """Bytes per second of a 1 GiB device copy (read + write)."""
    x = torch.empty(1 << 28, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(3):
        y.copy_(x)
    sync(device)
    return 2 * x.nbytes * 3 / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(engine, jobs: list[tuple[list[int], dict]], n: int) -> tuple[list[list[int]], float]:
    """Greedy tokens per job (all decoding together) and the decode tok/s."""
    from composer.modes import CompositionParams
    from server.engine import Request, SamplingParams

    qs = []
    for ids, comp in jobs:
        q: queue.Queue = queue.Queue()
        engine.submit(Request(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                              CompositionParams.model_validate(comp), emit=q.put))
        qs.append(q)
    out, firsts, last = [], [], 0.0
    for q in qs:
        toks = []
        while True:
            e = q.get(timeout=600)
            if e.error:
                raise RuntimeError(e.error)
            if e.token_ids and not toks:
                firsts.append(time.perf_counter())
            toks += e.token_ids
            if e.finish_reason:
                break
        last = max(last, time.perf_counter())
        out.append(toks)
    return out, len(jobs) * (n - 1) / max(last - min(firsts), 1e-9)


def exactness(c32, c, prompts: list[list[int]], comps: list[dict]) -> dict:
    """Composed prompt logits in ``c``'s dtype against fp32 (``c32``): the largest absolute error
    over the fp32 logits' scale, and whether the last tokens' argmax agree."""
    from composer.modes import CompositionParams

    out = {}
    with torch.inference_mode():
        for comp in comps:
            errs, agree = [], 0
            for ids in prompts:
                x = torch.tensor([ids], device=c.g.device)
                params = CompositionParams.model_validate(comp)
                ref = c32.composed_logits(c32.generalist_pass(x), [c32.plan(c32.generalist_pass(x), 0, params)])
                got = c.composed_logits(c.generalist_pass(x), [c.plan(c.generalist_pass(x), 0, params)]).float()
                errs.append(float((got - ref).abs().max() / ref.abs().max()))
                agree += int(got[0, -1].argmax() == ref[0, -1].argmax())
            out[comp.get("mode", "?") + ("" if "weights" not in comp else "/weights")] = {
                "max_rel_err": round(max(errs), 5), "last_token_argmax_agree": f"{agree}/{len(prompts)}"}
    return out


def throughput(engine, g, prompts: list[list[int]], args, rng: random.Random, log) -> tuple[float, list[dict]]:
    """Decode tok/s per mode and stream count beside ``streams x bandwidth / weight bytes``."""
    wbytes = engine.c.resident_bytes()["generalist"]  # (quantized: the packed bytes read)
    bw = bandwidth(g.device)
    doms = engine.c.domains
    rows = []
    for mode in ("generalist", "constellation"):
        for n in args.streams_list:
            if mode == "generalist":
                js = [(prompts[i % len(prompts)], {"mode": "generalist"}) for i in range(n)]
            else:  # a different composition per stream
                js = [(prompts[i % len(prompts)], {"mode": "weights", "weights": {
                    d: round(rng.uniform(0.2, 1), 3) for d in rng.sample(doms, min(3, len(doms)))}}) for i in range(n)]
            _, rate = generate(engine, js, args.tokens)
            row = {"mode": mode, "streams": n, "tok_s": round(rate, 1), "bound_tok_s": round(n * bw / wbytes, 1)}
            row["of_bound"] = round(row["tok_s"] / row["bound_tok_s"], 4)
            rows.append(row)
            log(f"{mode:13s} {n:3d} streams: {row['tok_s']:8.1f} tok/s (bound {row['bound_tok_s']}, "
                f"{row['of_bound']:.2f} of it)")
    return round(bw / 1e9, 1), rows


def dequantized(g):
    """``g`` with its quantized matrices as fp32 tensors (the reference its composition is checked against)."""
    from composer.model import Transformer
    from composer.quant import QuantizedWeight

    return Transformer(g.mc, g.arch, {n: (t.dequantize(torch.float32) if isinstance(t, QuantizedWeight) else t.float())
                                      for n, t in g.params.items()})


def check_size(size: str, args, device: torch.device, dtype: torch.dtype, log, weights: str = "bf16") -> dict:
    from composer.quant import quantize_model
    from server.engine import Engine, Limits

    t0 = time.perf_counter()
    g = synthetic_llama(size, device, dtype)
    if weights != "bf16":
        quantize_model(g.fuse(), weights, 32)
    c = catalog(g, args.adapters)
    sync(device)
    res = {"size": size, "weights": weights, "params": sum(t.numel() for t in g.params.values()), "dtype": str(dtype),
           "adapters": args.adapters, "build_s": round(time.perf_counter() - t0, 1),
           "weight_bytes": c.resident_bytes()["generalist"]}
    size = f"{size} {weights}" if weights != "bf16" else size
    log(f"[{size}] built: {res['params'] / 1e9:.2f} B parameters, {args.adapters} adapters, {res['build_s']} s")
    rng = random.Random(0)
    doms = c.domains
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(8, 24))] for _ in range(max(args.streams_list))]
    comps = [{"mode": "generalist"}, {"mode": "constellation"}, {"mode": "routed"},
             {"mode": "weights", "weights": {d: round(rng.uniform(0.2, 1), 3) for d in rng.sample(doms, min(3, len(doms)))}}]
    if weights != "bf16":  # against the same composition over the dequantized matrices in fp32
        res["exactness_vs_dequantized_fp32"] = exactness(catalog(dequantized(g), args.adapters), c, prompts[:2], comps)
        log(f"[{size}] vs the dequantized model in fp32: {res['exactness_vs_dequantized_fp32']}")
    elif dtype != torch.float32:
        g32 = synthetic_llama(size, device, torch.float32)
        res["exactness_vs_fp32"] = exactness(catalog(g32, args.adapters), c, prompts[:2], comps)
        del g32
        log(f"[{size}] {dtype} vs fp32: {res['exactness_vs_fp32']}")
    engine = Engine(c, ByteTokenizer(), Limits(max_running=max(args.streams_list), max_seq_len=256,
                                               kv_cache_tokens=256 * max(args.streams_list)))
    engine.start()
    try:
        jobs = [(p, comp) for p, comp in zip(prompts, comps)]
        eager, _ = generate(engine, jobs, 8)
        res["engine_end_to_end"] = all(len(t) == 8 for t in eager)
        if args.compile:
            t1 = time.perf_counter()
            engine.capture(args.buckets, background=False, plain={"auto": None, "on": True, "off": False}[args.plain])
            status = engine.graph_status()
            res["compile_s"] = status["ready"]
            if status["error"]:
                res["compile_error"] = status["error"]
                log(f"[{size}] capturing the decode step FAILED (eager from here): {status['error']}")
            log(f"[{size}] captured the decode step for {args.buckets} rows in {time.perf_counter() - t1:.1f} s")
            captured, _ = generate(engine, jobs, 8)
            res["captured_equals_eager"] = captured == eager
            res["captured_tokens_differing"] = sum(a != b for x, y in zip(captured, eager) for a, b in zip(x, y))
        res["bandwidth_gb_s"], res["decode"] = throughput(engine, g, prompts, args, rng, lambda m: log(f"[{size}] {m}"))
        res["captured_steps"], res["plain_steps"] = engine.runner.captured_steps, engine.runner.plain_steps
    finally:
        engine.stop()
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.device_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for device_check.json")
    p.add_argument("--sizes", default="1b,8b", help="model shapes: tiny, 1b, 8b (default 1b,8b)")
    p.add_argument("--adapters", type=int, default=16, help="random rank-16 LoRA adapters (default 16)")
    p.add_argument("--streams", default="1,16,64", help="stream counts (default 1,16,64)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per stream (default 64)")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on a CPU), bfloat16 or float32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also capture the decode step (default on)")
    p.add_argument("--buckets", default=None, help="row buckets to capture (default: the stream counts)")
    p.add_argument("--plain", choices=["auto", "on", "off"], default="auto",
                   help="also capture G's step alone per bucket for batches of G's own rows (auto: on CUDA)")
    p.add_argument("--weights", default="bf16", help="comma-separated generalist formats, each checked in turn: "
                   "bf16 (full precision, --dtype), int8, int4 (quantized; composition checked against the "
                   "dequantized model in fp32; default bf16)")
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU, 2 adapters, few tokens (the tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.adapters, args.streams, args.tokens, args.device = "tiny", 2, "1,2", 4, "cpu"
        args.buckets = args.buckets or "2"
        args.weights = args.weights if args.weights != "bf16" else "bf16,int8"
    args.streams_list = [int(x) for x in args.streams.split(",")]
    args.buckets = [int(x) for x in (args.buckets or args.streams).split(",")]
    args.weights_list = [w.strip() for w in args.weights.split(",") if w.strip()]
    if not args.weights_list or any(w not in ("bf16", "int8", "int4") for w in args.weights_list):
        p.error("--weights: a comma-separated list of bf16, int8, int4")
    bad = [s for s in args.sizes.split(",") if s not in SIZES]
    if bad:
        p.error(f"--sizes: unknown {bad} (choose from {', '.join(SIZES)})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - t0:6.1f}s {msg}", flush=True)

    report = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "args": {k: v for k, v in vars(args).items() if k != "out"}, "sizes": []}
    for size in args.sizes.split(","):
        for weights in args.weights_list:
            report["sizes"].append(check_size(size, args, device, dtype, log, weights))
            (out / "device_check.json").write_text(json.dumps(report, indent=1))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "device_check.json").write_text(json.dumps(report, indent=1))
    log(f"done: {out / 'device_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
