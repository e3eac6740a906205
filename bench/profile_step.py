"""Where a captured decode step's time goes: each bucket's graph called directly, without the engine.

``python -m bench.captured --profile POSITIONS`` runs this after its measurements. Per bucket B, with
every row G's (factors of 1, no adapter products): the step with attention replaced by zeros (the
graph's own work: products, norms, rotary, the opaque operators' dispatch), the step with attention
over ``POSITIONS`` cached positions per row (random keys/values, as a decode step reads them), and
torch.profiler's operators of the latter (self time per step, calls per step).
"""

from __future__ import annotations

import time

import torch

from composer import decode_kernel
from composer.attention import one_query_attention_bias
from composer.captured import StepContext, factor_shapes, step_context
from server.engine.graphs import _NoAttention, _new_step


class _Cached:
    """Attention of each row over ``S`` cached positions, as the engine's decode step runs it (the CPU
    kernel, ``composer.decode_kernel``, where it runs; else PyTorch's operators), random keys/values."""

    def __init__(self, B: int, S: int, kv: int, hd: int, dtype, device):
        self.k = torch.randn(B, kv, S, hd, dtype=dtype, device=device)
        self.v = torch.randn(B, kv, S, hd, dtype=dtype, device=device)
        self.bias = torch.zeros(B * kv, 1, S, device=device)
        self.meta = torch.tensor([[b * kv * S * hd, S * hd, S] for b in range(B)], dtype=torch.int64)

    def attend(self, layer, q, k, v, scale):
        G = q.shape[1] // self.k.shape[1]
        if decode_kernel.available(self.k.device, self.k.dtype, self.k.shape[-1], G):
            return decode_kernel.attend(q, k, v, self.k, self.v, self.meta[:q.shape[0]], scale)
        return one_query_attention_bias(q, self.k, self.v, self.bias.expand(-1, G, -1), scale)


def _call(fn, args):
    _new_step(args[0].device)
    return fn(*args)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, args, att, reps: int) -> float:
    with step_context(StepContext(att, None, args[0].shape[0])):
        for _ in range(3):
            _call(fn, args)
        _sync(args[0].device)
        t = time.perf_counter()
        for _ in range(reps):
            _call(fn, args)
        _sync(args[0].device)
        return (time.perf_counter() - t) / reps


@torch.inference_mode()
def profile_graphs(c, graphs, positions: int, reps: int = 20, top: int = 12, log=print) -> dict:
    """Per ready bucket: step ms without and with attention, and the top operators (ms and calls per step)."""
    g, out = c.g, {}
    shapes = factor_shapes(c.kernel, c.kernel.blocks)  # (the composed graph's factor inputs)
    for B, fn in sorted(graphs.ready.items()):
        dev = g.device
        args = (torch.zeros(B, 1, dtype=torch.long, device=dev),
                torch.full((B, 1), positions, dtype=torch.long, device=dev),
                [torch.ones(B, T, d, dtype=torch.float32, device=dev) for T, d in shapes])
        cached = _Cached(B, positions, g.mc.n_kv_heads, g.mc.head_dim, g.dtype, dev)
        zeros_s, att_s = _time(fn, args, _NoAttention(), reps), _time(fn, args, cached, reps)
        with step_context(StepContext(cached, None, B)), torch.profiler.profile() as prof:
            for _ in range(reps):
                _call(fn, args)
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
        out[str(B)] = {"positions": positions, "no_attention_ms": round(zeros_s * 1e3, 2),
                       "attention_ms": round(att_s * 1e3, 2),
                       "ops": [{"op": e.key, "ms": round(e.self_cpu_time_total / reps / 1e3, 3),
                                "calls": e.count // reps} for e in ops]}
        log(f"\n{B} row{'' if B == 1 else 's'}: step {zeros_s * 1e3:.2f} ms with attention as zeros, "
            f"{att_s * 1e3:.2f} ms attending over {positions} positions; operators per step (self time):")
        for e in out[str(B)]["ops"]:
            log(f"  {e['ms']:8.3f} ms  {e['calls']:5d} calls  {e['op']}")
    return out
