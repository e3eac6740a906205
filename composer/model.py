"""Plain functional decoder code for Llama-family and GPT-2 models over a dict of tensors.

Why not call the Hugging Face modules: composition replaces the parameters of the last L decoder
blocks per request (and, in one batch, differently per row). Writing the forward pass over
"something that can apply a named linear map / give a named vector" keeps that a parameter-source
swap: ``DenseParams`` is a plain state dict, ``kernels.MixedParams`` mixes stacked specialists at
run time. The tests check this code against transformers' own forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import torch.nn.functional as F

from .arch import GATE_UP, QKV, Arch, ModelConfig, rope_inv_freq
from .attention import one_query_attention
from .linear import ATEN_MAX_ROWS, can_pack, fused_base, linear_with, matmul_kernels, pack_weight
from .lowrank import LowRank
from .quant import QuantizedWeight, embedding


class LayerParams(Protocol):
    def linear(self, x: torch.Tensor, weight: str, bias: str | None) -> torch.Tensor: ...

    def vector(self, name: str) -> torch.Tensor | None: ...


def linears(p: LayerParams, x: torch.Tensor, modules: tuple[str, ...]) -> list[torch.Tensor]:
    """The linear maps ``modules`` (e.g. q/k/v) of one input: one matmul when ``p`` holds them fused."""
    fused = getattr(p, "linears", None)
    if fused is not None:
        return fused(x, modules)
    return [p.linear(x, m + ".weight", m + ".bias") for m in modules]


class DenseParams:
    """One decoder block's tensors as stored (HF names relative to the block).

    ``lr`` holds low-rank updates (a LoRA adapter's ``B @ A``) applied on top of ``t``'s dense
    weight of the same name: ``y = W x + B (A x)``. ``fused`` maps a group of modules (``arch.fused``)
    to the one weight (and bias) whose row blocks ``t``'s tensors of those modules are.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], arch: Arch, lowrank: dict[str, LowRank] | None = None,
                 fused: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
                 packed: dict[int, torch.Tensor] | None = None):
        self.t = tensors
        self.arch = arch
        self.lr = lowrank or {}
        self.fused = fused or {}
        self.packed = packed  # the model's prepacked weights (``Transformer.pack``), or None

    def linear(self, x, weight, bias):
        y = linear_with(x, self.t[weight], self.t.get(bias) if bias else None,
                        self.arch.roles[weight].layout == "conv1d", self.packed)
        lr = self.lr.get(weight)
        return y if lr is None else y + lr.apply(x)

    def linears(self, x, modules):
        if modules not in self.fused:
            return [self.linear(x, m + ".weight", m + ".bias") for m in modules]
        w, b = self.fused[modules]
        ys = linear_with(x, w, b, False, self.packed).split([self.t[m + ".weight"].shape[0] for m in modules], dim=-1)
        out = []
        for y, m in zip(ys, modules):
            lr = self.lr.get(m + ".weight")
            out.append(y if lr is None else y + lr.apply(x))
        return out

    def vector(self, name):
        return self.t.get(name)


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    return F.relu(x)


@dataclass
class KVCache:
    """Contiguous per-layer key/value cache: ``k[i]`` is ``[B, H_kv, T, head_dim]``."""

    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if i in self.k:
            k = torch.cat([self.k[i], k], dim=2)
            v = torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v


@dataclass
class Context:
    """What every block of one forward call shares: positions, rotary tables, the mask."""

    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor  # bool [B, 1, T, T_total], True = may attend
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    cache: KVCache | None = None

    def with_cache(self, cache=None) -> "Context":
        """The same positions, mask and rotary tables with another (or no) key/value cache."""
        return replace(self, cache=cache)


class Transformer:
    """A causal LM as plain code over ``params`` (HF tensor names).

    ``lowrank`` (full tensor name -> ``LowRank``) adds adapter updates to decoder-layer weights, so a
    LoRA specialist runs as the generalist's tensors plus its factors, never merged.

    Precision (docs/precision.md): the matmuls run in the dtype of ``params`` (``dtype``, which a
    key/value cache should hold too; an fp32 cache also works); the residual stream is kept in
    ``residual_dtype`` (fp32 for half-precision weights); norms and decode-step attention compute in
    fp32; ``logits`` are returned in fp32. ``aten_max_rows``: see ``matmul_kernels``.
    """

    def __init__(self, mc: ModelConfig, arch: Arch, params: dict[str, torch.Tensor],
                 lowrank: dict[str, LowRank] | None = None):
        self.mc = mc
        self.arch = arch
        self.params = params
        self.lowrank = dict(lowrank or {})
        self.residual_dtype = torch.promote_types(self.dtype, torch.float32)
        self.aten_max_rows = ATEN_MAX_ROWS  # see matmul_kernels
        self.packed: dict[int, torch.Tensor] = {}  # id(weight) -> its prepacked copy (``pack``)
        self.weights_format = "bf16"  # or int8 / int4: matrices quantized (``composer.quant.quantize_model``)
        self.weights_group: int | None = None  # int4's group size
        self._layers = [self._layer_params(i) for i in range(mc.n_layers)]
        self.inv_freq = rope_inv_freq(mc) if mc.family == "llama" else None

    def _layer_params(self, i: int) -> DenseParams:
        arch = self.arch
        t = {s: self.params[arch.layer_name(i, s)] for s in arch.roles if arch.layer_name(i, s) in self.params}
        lr = {s: self.lowrank[arch.layer_name(i, s)] for s in arch.roles if arch.layer_name(i, s) in self.lowrank}
        fused = {}
        for modules in arch.fused:  # groups whose tensors are row blocks of one matrix (see ``fuse``)
            if not all(m + ".weight" in t for m in modules):
                continue
            w = fused_base([t[m + ".weight"] for m in modules])
            biases = [t.get(m + ".bias") for m in modules]
            if all(x is None for x in biases):
                b = None
            elif any(x is None for x in biases) or (b := fused_base(biases)) is None:
                continue
            if w is not None:
                fused[modules] = (w, b)
        return DenseParams(t, arch, lr, fused, self.packed)

    def pack(self) -> "Transformer":
        """Hold every matrix of the decoder layers (each fused q/k/v and gate/up as one) and the output
        head a second time, in oneDNN's prepacked layout, which this model's forward (and composed
        blocks using these tensors, ``composer.batch``) then multiply with. On this machine class, fp32:
        1.3-1.5x faster than ``F.linear`` for a decode step, ~2.5x for the 49k-row output head at 16 rows
        (docs/benchmarks.md); it costs one more copy of those matrices. No-op where oneDNN cannot
        serve the dtype (``can_pack``)."""
        if not can_pack(self.dtype, self.device):
            return self
        for layer in self._layers:
            grouped = {m + ".weight" for modules in layer.fused for m in modules}
            for w, _ in layer.fused.values():
                if isinstance(w, torch.Tensor):
                    self.packed.setdefault(id(w), pack_weight(w))
            for name, t in layer.t.items():
                if isinstance(t, torch.Tensor) and t.dim() == 2 and name not in grouped and id(t) not in self.packed:
                    self.packed[id(t)] = pack_weight(t, self.arch.roles[name].layout == "conv1d")
        head = self.lm_head_weight()
        if isinstance(head, torch.Tensor):
            self.packed[id(head)] = pack_weight(head)
        return self

    @property
    def packed_bytes(self) -> int:
        """Bytes of the prepacked copies (``pack``)."""
        return sum(p.numel() * p.element_size() for p in self.packed.values())

    def fuse(self) -> "Transformer":
        """Store every layer's q/k/v and gate/up (``arch.fused``) as one matrix each, the separate
        tensors becoming views into it: a dense layer then runs one matmul per group, and anything
        that asks for ``model.layers.3.self_attn.k_proj.weight`` still gets that tensor. Models built
        on these tensors later (specialists sharing them) find the fused matrices without a copy."""
        for i in range(self.mc.n_layers):
            for modules in self.arch.fused:
                for suffix in (".weight", ".bias"):
                    names = [self.arch.layer_name(i, m + suffix) for m in modules]
                    if not all(n in self.params for n in names):
                        continue
                    parts = [self.params[n] for n in names]
                    if fused_base(parts) is not None or len({(p.dtype, p.shape[1:]) for p in parts}) != 1:
                        continue
                    whole = torch.cat([p.detach() for p in parts])
                    self.params.update(zip(names, whole.split([p.shape[0] for p in parts])))
        self._layers = [self._layer_params(i) for i in range(self.mc.n_layers)]
        return self

    # ---- parameters -------------------------------------------------------------------------
    def replace_params(self, updates: dict[str, "torch.Tensor | QuantizedWeight"]) -> None:
        """Replace tensors by name (e.g. matrices by their quantized form) and rebuild the layers' views."""
        self.params.update(updates)
        self._layers = [self._layer_params(i) for i in range(self.mc.n_layers)]

    def set_lowrank(self, name: str, lr: LowRank) -> None:
        """Replace the low-rank update of decoder-layer weight ``name`` (e.g. by a view into a stack)."""
        split = self.arch.split_layer_name(name, self.mc.n_layers)
        if split is None or name not in self.lowrank:
            raise KeyError(f"{name} has no low-rank update to replace")
        self.lowrank[name] = lr
        self._layers[split[0]].lr[split[1]] = lr

    @property
    def device(self) -> torch.device:
        return self.params[self.arch.embed].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[self.arch.embed].dtype

    def layer(self, i: int) -> DenseParams:
        return self._layers[i]

    def lm_head_weight(self) -> torch.Tensor:
        return self.params.get(self.arch.lm_head, self.params[self.arch.embed])

    # ---- forward pieces ---------------------------------------------------------------------
    def context(
        self,
        attention_mask: torch.Tensor,
        cache: KVCache | None = None,
        past_mask: torch.Tensor | None = None,
    ) -> Context:
        """Build positions and the causal+padding mask.

        ``attention_mask`` [B, T] marks the real tokens of the new input; ``past_mask`` [B, P] those
        already in ``cache``. Positions count real tokens only, so left or right padding and
        cached prefixes all give each token the position it would have alone.
        """
        dev = attention_mask.device
        am = attention_mask.to(torch.bool)
        full = am if past_mask is None else torch.cat([past_mask.to(torch.bool), am], dim=1)
        B, T = am.shape
        P = full.shape[1] - T
        positions = (full.long().cumsum(1) - 1).clamp(min=0)[:, P:]
        q_idx = torch.arange(P, P + T, device=dev)
        k_idx = torch.arange(P + T, device=dev)
        causal = k_idx[None, :] <= q_idx[:, None]  # [T, P+T]
        mask = causal[None, None] & full[:, None, None, :]
        # A padded query row that sees nothing would give NaN in softmax: let it see itself.
        diag = torch.zeros_like(mask)
        diag[:, :, torch.arange(T, device=dev), P + torch.arange(T, device=dev)] = True
        mask = mask | (diag & ~am[:, None, :, None])
        return self.positional_context(positions, mask, cache)

    def positional_context(self, positions: torch.Tensor, mask: torch.Tensor, cache=None) -> Context:
        """A context from explicit positions [B, T] and mask [B, 1, T, T_total] (rotary tables added)."""
        ctx = Context(positions=positions, mask=mask, cache=cache)
        if self.inv_freq is not None:
            freqs = positions[..., None].float() * self.inv_freq.to(positions.device)[None, None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            ctx.cos = emb.cos().to(self.dtype)[:, None]
            # sin with its first half negated: rotate_half(x) * sin == roll(x, half) * ctx.sin, bit for bit
            ctx.sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1).to(self.dtype)[:, None]
        return ctx

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The residual stream entering block 0, in ``residual_dtype``."""
        x = embedding(input_ids, self.params[self.arch.embed]).to(self.residual_dtype)
        if self.mc.family == "gpt2":
            x = x + F.embedding(ctx.positions, self.params["transformer.wpe.weight"])
        return x

    def _norm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """LayerNorm (GPT-2) or RMSNorm of the residual stream, computed in fp32, returned in ``dtype``."""
        x = x.float()
        if self.mc.family == "gpt2":
            # weight/bias may be per-row [B, 1, d] under the mix path: apply them after the norm.
            y = F.layer_norm(x, (x.shape[-1],), eps=self.mc.norm_eps) * w
            y = y + b if b is not None else y
        else:
            y = w * F.rms_norm(x, (x.shape[-1],), eps=self.mc.norm_eps)
        return y.to(self.dtype)

    def block(self, i: int, x: torch.Tensor, ctx: Context, p: LayerParams) -> torch.Tensor:
        if self.mc.family == "gpt2":
            h = self._norm(x, p.vector("ln_1.weight"), p.vector("ln_1.bias"))
            qkv = p.linear(h, "attn.c_attn.weight", "attn.c_attn.bias")
            q, k, v = qkv.split(self.mc.d, dim=-1)
            a = self._attention(i, q, k, v, ctx)
            x = x + p.linear(a, "attn.c_proj.weight", "attn.c_proj.bias")
            h = self._norm(x, p.vector("ln_2.weight"), p.vector("ln_2.bias"))
            h = _act(self.mc.activation, p.linear(h, "mlp.c_fc.weight", "mlp.c_fc.bias"))
            return x + p.linear(h, "mlp.c_proj.weight", "mlp.c_proj.bias")
        h = self._norm(x, p.vector("input_layernorm.weight"), None)
        q, k, v = linears(p, h, QKV)
        a = self._attention(i, q, k, v, ctx)
        x = x + p.linear(a, "self_attn.o_proj.weight", "self_attn.o_proj.bias")
        h = self._norm(x, p.vector("post_attention_layernorm.weight"), None)
        g, u = linears(p, h, GATE_UP)
        return x + p.linear(_act(self.mc.activation, g) * u, "mlp.down_proj.weight", "mlp.down_proj.bias")

    def _attention(self, i, q, k, v, ctx: Context) -> torch.Tensor:
        mc = self.mc
        B, T, _ = q.shape
        q = q.view(B, T, mc.n_heads, mc.head_dim).transpose(1, 2)
        k = k.view(B, T, mc.n_kv_heads, mc.head_dim).transpose(1, 2)
        v = v.view(B, T, mc.n_kv_heads, mc.head_dim).transpose(1, 2)
        if ctx.cos is not None:  # rotary: x * cos + rotate_half(x) * sin, with ctx.sin's halves signed
            half = mc.head_dim // 2
            q = q * ctx.cos + q.roll(half, -1) * ctx.sin
            k = k * ctx.cos + k.roll(half, -1) * ctx.sin
        scale = 1 / math.sqrt(mc.head_dim)
        attend = getattr(ctx.cache, "attend", None)
        if attend is not None:  # a cache that attends itself (the engine's slabs: writes, then attends)
            return attend(i, q, k, v, scale).transpose(1, 2).reshape(B, T, mc.n_heads * mc.head_dim)
        if ctx.cache is not None:
            k, v = ctx.cache.update(i, k, v)
        if T == 1:
            a = one_query_attention(q, k, v, ctx.mask, scale)
        else:  # (a cache may hold keys/values in another dtype than the queries')
            a = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=ctx.mask, scale=scale,
                                               enable_gqa=mc.n_kv_heads != mc.n_heads)
        return a.transpose(1, 2).reshape(B, T, mc.n_heads * mc.head_dim)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        names = self.arch.final_norm
        b = self.params[names[1]] if len(names) > 1 else None
        return self._norm(x, self.params[names[0]], b)

    def logits(self, h_normed: torch.Tensor) -> torch.Tensor:
        """Logits in fp32."""
        w = self.lm_head_weight()
        with matmul_kernels(h_normed.numel() // h_normed.shape[-1], w.dtype, w.device, self.aten_max_rows):
            return linear_with(h_normed.to(w.dtype), w, None, False, self.packed).float()

    def run_blocks(
        self,
        x: torch.Tensor,
        ctx: Context,
        start: int,
        stop: int,
        override: dict[int, LayerParams] | None = None,
    ) -> torch.Tensor:
        with matmul_kernels(x.shape[0] * x.shape[1], self.dtype, x.device, self.aten_max_rows):
            for i in range(start, stop):
                p = override.get(i) if override else None
                x = self.block(i, x, ctx, p or self._layers[i])
        return x

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        override: dict[int, LayerParams] | None = None,
    ) -> torch.Tensor:
        """Logits for a batch, with optional per-layer parameter overrides."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ctx = self.context(attention_mask)
        x = self.run_blocks(self.embed(input_ids, ctx), ctx, 0, self.mc.n_layers, override)
        return self.logits(self.final_norm(x))
