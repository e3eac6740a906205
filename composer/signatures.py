"""Activation signatures: how much each specialist drives each node (DESIGN §3.4, §4.2).

Node weights are ``r_ij = max(alpha_i, 0) * a_ij``; the signature ``a_i`` says which of the ``d``
residual nodes specialist ``i`` drives on this prompt. A registry entry each:

- ``full``: the paper's definition: each selected specialist runs the whole prompt;
  ``mean_t |h_last(S_i)|`` after the final norm, one d-vector used in every composed block.
- ``trunk``: the selected specialist's composed blocks run on G's hidden state entering the first
  composed block. Exact (equal to ``full``) when specialists differ only inside the composed
  blocks; otherwise an approximation.
- ``generalist``: per composed block, inside the one generalist pass: every specialist's node
  activations on the generalist's own inputs, ``a_il = mean_t |h_G,l + Δ_il|``, where ``Δ_il`` is the
  specialist's change to the block's writes into the residual stream (o_proj/down_proj; GPT-2
  ``c_proj``) applied to G's own inputs of those matrices. For a low-rank specialist that costs
  its rank per token; no extra forward pass. Per block it equals the specialist's own block on G's
  input when only the MLP's writer differs, and approximates it otherwise (docs/lowrank.md reports
  how far from ``full`` on the demo).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .kernels import _apply
from .model import linears

if TYPE_CHECKING:
    from .constellation import Constellation
    from .model import Context


@dataclass(frozen=True)
class Signature:
    name: str
    description: str
    source: str
    per_block: bool  # one d-vector per composed block (else one for all blocks)


SIGNATURES: dict[str, Signature] = {}


def register(sig: Signature) -> Signature:
    SIGNATURES[sig.name] = sig
    return sig


register(Signature("full", "each selected specialist's whole forward pass; |last hidden state| after the final "
                   "norm, mean over tokens", "Constellation-Indexed Model Composition (seed 001), DESIGN §3.4",
                   False))
register(Signature("trunk", "the selected specialist's composed blocks on G's trunk state; exact when "
                   "specialists differ only inside the composed blocks", "DESIGN §3.4", False))
register(Signature("generalist", "per composed block, inside the one generalist pass: |G's block output + the "
                   "specialist's residual writes on G's own inputs|, mean over tokens", "DESIGN §4.2", True))


class _Recorder:
    """G's block parameters, recording the inputs of the matrices that write the residual stream."""

    def __init__(self, inner, writers: set[str]):
        self.inner, self.writers, self.seen = inner, writers, []

    def linear(self, x, weight, bias):
        if weight in self.writers:
            self.seen.append((weight, bias, x))
        return self.inner.linear(x, weight, bias)

    def linears(self, x, modules):
        if any(m + ".weight" in self.writers for m in modules):
            return [self.linear(x, m + ".weight", m + ".bias") for m in modules]
        return linears(self.inner, x, modules)

    def vector(self, name):
        return self.inner.vector(name)


class PassRecord:
    """What the generalist pass keeps for the ``generalist`` signature: per composed block, G's
    output and the inputs of its residual writers. A specialist's signature is computed from it
    only when asked (the selected K, or the domains a caller names), at the cost of its rank."""

    def __init__(self, c: "Constellation", fmask: torch.Tensor):
        self.c, self.fmask = c, fmask
        self.blocks: list[tuple[torch.Tensor, list]] = []

    def specialists(self, ks: list[int]) -> dict[int, torch.Tensor]:
        """Specialists ``ks``' signatures ``[B, Lc, d]`` each: ``mean_t |h_G,l + Δ_kl|`` for every
        composed block l, computed together (one pass over the record for all of them)."""
        return signature_means(ks, *specialist_abs_sum(self.c, self.blocks, self.fmask, ks))


def signature_means(ks: list[int], total: torch.Tensor, count: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each of ``ks``' signature ``[B, Lc, d]`` from ``specialist_abs_sum``'s sums (``[K, B, Lc, d]``,
    ``[B, 1]``), whole prompt's or added up chunk by chunk."""
    return {k: total[j] / count.clamp_min(1.0)[:, :, None] for j, k in enumerate(ks)}


def specialist_abs_sum(c: "Constellation", blocks: list, fmask: torch.Tensor, ks: list[int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_t mask_t |h_G,l + Δ_kl|`` per specialist k of ``ks`` and composed block, ``[K, B, Lc, d]``,
    and ``Σ_t mask_t`` ``[B, 1]``, fp32 on the CPU, over the tokens of ``blocks`` (a ``PassRecord``'s,
    or one prompt chunk's): sums of consecutive chunks add up to the whole prompt's, so a long
    prompt's signatures can be computed a chunk at a time. The K specialists' low-rank deltas of
    a writer are one product with their stacked ``A`` and one batched product with their ``B``."""
    m = fmask.to(torch.float32)[..., None]
    out = []
    for li, (h, seen) in enumerate(blocks):
        delta = None
        for name, bias, xin in seen:  # in fp32: a difference of two half-precision outputs would cancel
            t = _writer_deltas(c, c.first + li, ks, name, bias, xin)
            if t is not None:
                delta = t if delta is None else delta + t
        x = h.float()[None] if delta is None else h[None] + delta
        s = (x.abs() * m).sum(-2)
        out.append(s.expand(len(ks), *s.shape[1:]).cpu())
    return torch.stack(out, dim=2), m.sum(-2).cpu()


def _writer_deltas(c: "Constellation", i: int, ks: list[int], name: str, bias: str | None,
                   xin: torch.Tensor) -> torch.Tensor | None:
    """Specialists ``ks``' changes to writer ``name``'s output on G's input ``xin``, fp32
    ``[K, *xin.shape[:-1], out]`` (None: none of them changes it)."""
    gsrc, conv = c.sources[i][0], c.g.arch.roles[name].layout == "conv1d"
    lrs = [c.lowrank[i][k + 1].get(name) for k in ks]
    have = [j for j, lr in enumerate(lrs) if lr is not None]
    full = None
    if have:
        z = xin @ torch.cat([lrs[j].A for j in have]).T  # [..., Σ r]: one product for all K
        ranks = {lrs[j].rank for j in have}
        if len(ranks) == 1:  # (one batched product with their B; unequal ranks: one product each)
            zk = z.unflatten(-1, (len(have), ranks.pop())).movedim(-2, 0)  # [K', ..., r]
            low = zk.reshape(len(have), -1, zk.shape[-1]) @ torch.stack([lrs[j].B.T for j in have])
            low = low.view(len(have), *z.shape[:-1], -1).float()
        else:
            offs = [0]
            for j in have:
                offs.append(offs[-1] + lrs[j].rank)
            low = torch.stack([(z[..., a:b] @ lrs[j].B.T).float() for j, a, b in zip(have, offs, offs[1:])])
        if len(have) == len(ks):
            full = low
        else:
            full = low.new_zeros(len(ks), *low.shape[1:])
            full[have] = low
    for j, k in enumerate(ks):
        src, extra = c.sources[i][k + 1], None
        if src[name] is not gsrc[name]:  # a dense writer that differs from G's
            extra = _apply(xin.float(), src[name].float() - gsrc[name].float(), conv)
        if bias and bias in src and src[bias] is not gsrc[bias]:
            b = src[bias].float() - gsrc[bias].float()
            extra = b if extra is None else extra + b
        if extra is not None:
            if full is None:
                full = torch.zeros(len(ks), *xin.shape[:-1], extra.shape[-1], dtype=torch.float32, device=xin.device)
            full[j] += extra
    return full


@torch.inference_mode()
def in_pass_signatures(c: "Constellation", x: torch.Tensor, ctx: "Context", fmask: torch.Tensor
                       ) -> tuple[torch.Tensor, PassRecord]:
    """Run G's blocks ``first..n-1`` on ``x``, recording what the ``generalist`` signature needs.

    Returns G's hidden state after the last block and the record.
    """
    g = c.g
    writers = {name for name, role in g.arch.roles.items() if role.role == "write"}
    rec = PassRecord(c, fmask)
    for i in range(c.first, c.n):
        r = _Recorder(g.layer(i), writers)
        h = g.block(i, x, ctx, r)
        rec.blocks.append((h, r.seen if i in c.varied else []))
        x = h
    return x, rec
