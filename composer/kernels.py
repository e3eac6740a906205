"""The two exact ways to run a composed decoder block (DESIGN §4).

A composition of one block is a weight tensor over *sources* (the generalist and the
specialists): ``weights[s]`` is a d-vector, and every tensor is ``sum_s f(weights[s]) ⊙ theta_s``
where the broadcast policy decides ``f``. Constellation, routed, uniform, caller weights and task
arithmetic are all such combinations (task arithmetic: ``1 - lambda*N`` on G, ``lambda`` on each
specialist, constant over nodes).

- ``materialize`` builds the composed tensors once (one request, or many sharing a composition).
- ``MixedParams`` keeps the sources apart and mixes at run time, so each row of a batch may carry
  its own composition: row weighting ``y = sum_s w_s ⊙ (W_s x)``, column weighting
  ``y = sum_s W_s (w_s ⊙ x)``; biases and norm vectors are composed per row (cheap) and applied once.

Sources that share one tensor object (a specialist equal to G there) are merged before any
arithmetic: ``f`` is linear, so their weights simply add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .arch import Arch
from .policies import BroadcastPolicy

Source = dict[str, torch.Tensor]  # one decoder block's tensors (names relative to the block)


def _factor(w: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    """Shape a weight d-vector (or a batch ``[B, d]``) to broadcast over a tensor of ``ndim``."""
    if axis is None:
        return w.mean(-1).reshape(*w.shape[:-1], *([1] * ndim))
    if ndim == 1:
        return w
    return w.unsqueeze(-1) if axis == 0 else w.unsqueeze(-2)


def _groups(sources: list[Source], name: str, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(tensor, summed weight)]`` over distinct tensor objects with any non-zero weight.

    ``weights`` is ``[S, d]`` or ``[B, S, d]``.
    """
    out: dict[int, list] = {}
    for s, src in enumerate(sources):
        w = weights[..., s, :]
        if not bool(torch.any(w != 0)):
            continue
        t = src[name]
        key = id(t)
        if key in out:
            out[key][1] = out[key][1] + w
        else:
            out[key] = [t, w]
    return [(t, w) for t, w in out.values()]


def materialize(
    sources: list[Source], weights: torch.Tensor, policy: BroadcastPolicy, arch: Arch, d: int
) -> dict[str, torch.Tensor]:
    """Composed tensors of one block for one composition ``weights`` [S, d]."""
    out = {}
    for name in sources[0]:
        t0 = sources[0][name]
        axis = policy.axis(arch.role(name), tuple(t0.shape), d)
        acc = None
        for t, w in _groups(sources, name, weights):
            f = _factor(w.to(t.dtype), axis, t.ndim)
            if acc is None:
                acc = t * f
            else:
                acc.addcmul_(t, f)  # in place: one pass, no temporary per source
        out[name] = acc if acc is not None else torch.zeros_like(t0)
    return out


class MixedParams:
    """One block whose tensors are mixed per batch row at run time (``weights`` [B, S, d])."""

    def __init__(self, sources: list[Source], weights: torch.Tensor, policy: BroadcastPolicy, arch: Arch, d: int):
        self.sources = sources
        self.weights = weights
        self.policy = policy
        self.arch = arch
        self.d = d

    def _axis(self, name: str) -> int | None:
        t = self.sources[0][name]
        return self.policy.axis(self.arch.role(name), tuple(t.shape), self.d)

    def vector(self, name: str) -> torch.Tensor | None:
        if name not in self.sources[0]:
            return None
        axis = self._axis(name)
        acc = None
        for t, w in _groups(self.sources, name, self.weights):
            term = _factor(w.to(t.dtype), axis, 1) * t  # [B, n]
            acc = term if acc is None else acc + term
        if acc is None:
            acc = torch.zeros(self.weights.shape[0], self.sources[0][name].shape[0],
                              dtype=self.sources[0][name].dtype, device=self.sources[0][name].device)
        return acc[:, None, :]  # [B, 1, n] broadcasts over tokens

    def linear(self, x: torch.Tensor, weight: str, bias: str | None) -> torch.Tensor:
        role = self.arch.role(weight)
        axis = self._axis(weight)
        conv = role.layout == "conv1d"
        in_axis = 0 if conv else 1
        y = None
        for t, w in _groups(self.sources, weight, self.weights):
            w = w.to(x.dtype)  # [B, d]
            if axis == in_axis:
                z = _apply(x * w[:, None, :], t, conv)
            else:
                z = _apply(x, t, conv)
                z = z * (w.mean(-1)[:, None, None] if axis is None else w[:, None, :])
            y = z if y is None else y + z
        if y is None:
            out_dim = self.sources[0][weight].shape[1 if conv else 0]
            y = x.new_zeros(*x.shape[:-1], out_dim)
        if bias and bias in self.sources[0]:
            y = y + self.vector(bias)
        return y


def _apply(x: torch.Tensor, w: torch.Tensor, conv: bool) -> torch.Tensor:
    return x @ w if conv else F.linear(x, w)
