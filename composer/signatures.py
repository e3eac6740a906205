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
  its rank per token; no extra forward pass. It equals ``full`` when only the last block's writers
  differ and approximates it otherwise (docs/lowrank.md reports how far on the demo).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

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

    def vector(self, name):
        return self.inner.vector(name)


def _masked_abs_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``h`` [..., B, T, d], ``mask`` [B, T] -> mean over real tokens of |h|, [..., B, d] fp32."""
    m = mask.to(torch.float32)[..., None]
    return (h.float().abs() * m).sum(-2) / m.sum(-2).clamp_min(1.0)


@torch.inference_mode()
def in_pass_signatures(c: "Constellation", x: torch.Tensor, ctx: "Context", fmask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run G's blocks ``first..n-1`` on ``x`` and compute every specialist's per-block signature.

    Returns G's hidden state after the last block and signatures ``[B, N, Lc, d]`` (fp32, on the CPU).
    """
    g, N = c.g, len(c.specialists)
    B, T, d = x.shape
    writers = {name for name, role in g.arch.roles.items() if role.role == "write"}
    out = torch.empty(B, N, c.n - c.first, d)
    for li, i in enumerate(range(c.first, c.n)):
        rec = _Recorder(g.layer(i), writers)
        h = g.block(i, x, ctx, rec)
        if i not in c.varied:
            out[:, :, li] = _masked_abs_mean(h, fmask).cpu()[:, None]
            x = h
            continue
        delta = h.new_zeros(N, B, T, d)
        conv = {name: g.arch.roles[name].layout == "conv1d" for name in writers}
        for name, bias, xin in rec.seen:
            g_t = c.sources[i][0][name]
            for s in range(1, N + 1):  # dense sources whose writer differs from G's
                t = c.sources[i][s][name]
                if t is not g_t:
                    delta[s - 1] += (xin @ t if conv[name] else xin @ t.T) - (xin @ g_t if conv[name] else xin @ g_t.T)
                if bias and bias in c.sources[i][s] and c.sources[i][s][bias] is not c.sources[i][0][bias]:
                    delta[s - 1] += c.sources[i][s][bias] - c.sources[i][0][bias]
            st = c.stacks.get(i, {}).get(name)
            if st is not None:  # every adapter's B (A x) at once
                Na, r, n_in = st.A.shape
                z = (xin.reshape(B * T, n_in) @ st.A.reshape(Na * r, n_in).T).view(B * T, Na, r).transpose(0, 1)
                delta.index_add_(0, st.sources - 1, torch.bmm(z, st.Bt).view(Na, B, T, d))
        out[:, :, li] = _masked_abs_mean(h[None] + delta, fmask).transpose(0, 1).cpu()
        x = h
    return x, out
