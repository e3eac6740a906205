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

from .arch import Arch, ModelConfig, rope_inv_freq
from .lowrank import LowRank


class LayerParams(Protocol):
    def linear(self, x: torch.Tensor, weight: str, bias: str | None) -> torch.Tensor: ...

    def vector(self, name: str) -> torch.Tensor | None: ...


class DenseParams:
    """One decoder block's tensors as stored (HF names relative to the block).

    ``lr`` holds low-rank updates (a LoRA adapter's ``B @ A``) applied on top of ``t``'s dense
    weight of the same name: ``y = W x + B (A x)``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], arch: Arch, lowrank: dict[str, LowRank] | None = None):
        self.t = tensors
        self.arch = arch
        self.lr = lowrank or {}

    def linear(self, x, weight, bias):
        w = self.t[weight]
        b = self.t.get(bias) if bias else None
        if self.arch.roles[weight].layout == "conv1d":
            y = x @ w
            y = y + b if b is not None else y
        else:
            y = F.linear(x, w, b)
        lr = self.lr.get(weight)
        return y if lr is None else y + lr.apply(x)

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
    """

    def __init__(self, mc: ModelConfig, arch: Arch, params: dict[str, torch.Tensor],
                 lowrank: dict[str, LowRank] | None = None):
        self.mc = mc
        self.arch = arch
        self.params = params
        self.lowrank = dict(lowrank or {})
        self._layers = [
            DenseParams(
                {s: params[arch.layer_name(i, s)] for s in arch.roles if arch.layer_name(i, s) in params},
                arch,
                {s: self.lowrank[arch.layer_name(i, s)] for s in arch.roles
                 if arch.layer_name(i, s) in self.lowrank},
            )
            for i in range(mc.n_layers)
        ]
        self.inv_freq = rope_inv_freq(mc) if mc.family == "llama" else None

    # ---- parameters -------------------------------------------------------------------------
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
            ctx.sin = emb.sin().to(self.dtype)[:, None]
        return ctx

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        x = F.embedding(input_ids, self.params[self.arch.embed])
        if self.mc.family == "gpt2":
            x = x + F.embedding(ctx.positions, self.params["transformer.wpe.weight"])
        return x

    def _norm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.mc.family == "gpt2":
            # weight/bias may be per-row [B, 1, d] under the mix path: apply them after the norm.
            y = F.layer_norm(x, (x.shape[-1],), eps=self.mc.norm_eps) * w
            return y + b if b is not None else y
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.mc.norm_eps)
        return w * y.to(x.dtype)

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
        q = p.linear(h, "self_attn.q_proj.weight", "self_attn.q_proj.bias")
        k = p.linear(h, "self_attn.k_proj.weight", "self_attn.k_proj.bias")
        v = p.linear(h, "self_attn.v_proj.weight", "self_attn.v_proj.bias")
        a = self._attention(i, q, k, v, ctx)
        x = x + p.linear(a, "self_attn.o_proj.weight", "self_attn.o_proj.bias")
        h = self._norm(x, p.vector("post_attention_layernorm.weight"), None)
        g = _act(self.mc.activation, p.linear(h, "mlp.gate_proj.weight", "mlp.gate_proj.bias"))
        u = p.linear(h, "mlp.up_proj.weight", "mlp.up_proj.bias")
        return x + p.linear(g * u, "mlp.down_proj.weight", "mlp.down_proj.bias")

    def _attention(self, i, q, k, v, ctx: Context) -> torch.Tensor:
        mc = self.mc
        B, T, _ = q.shape
        q = q.view(B, T, mc.n_heads, mc.head_dim).transpose(1, 2)
        k = k.view(B, T, mc.n_kv_heads, mc.head_dim).transpose(1, 2)
        v = v.view(B, T, mc.n_kv_heads, mc.head_dim).transpose(1, 2)
        if ctx.cos is not None:
            q = q * ctx.cos + _rotate_half(q) * ctx.sin
            k = k * ctx.cos + _rotate_half(k) * ctx.sin
        if ctx.cache is not None:
            k, v = ctx.cache.update(i, k, v)
        if mc.n_kv_heads != mc.n_heads:
            rep = mc.n_heads // mc.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, scale=1 / math.sqrt(mc.head_dim))
        return a.transpose(1, 2).reshape(B, T, mc.n_heads * mc.head_dim)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        names = self.arch.final_norm
        b = self.params[names[1]] if len(names) > 1 else None
        return self._norm(x, self.params[names[0]], b)

    def logits(self, h_normed: torch.Tensor) -> torch.Tensor:
        return F.linear(h_normed, self.lm_head_weight())

    def run_blocks(
        self,
        x: torch.Tensor,
        ctx: Context,
        start: int,
        stop: int,
        override: dict[int, LayerParams] | None = None,
    ) -> torch.Tensor:
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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)
