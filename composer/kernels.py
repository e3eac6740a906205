"""The exact ways to run a composed decoder block (DESIGN §4, §4.1).

A composition of one block is a weight tensor over *sources* (the generalist and the
specialists): ``weights[s]`` is a d-vector, and every tensor is ``sum_s f(weights[s]) ⊙ theta_s``
where the broadcast policy decides ``f``. Constellation, routed, uniform, caller weights and task
arithmetic are all such combinations (task arithmetic: ``1 - lambda*N`` on G, ``lambda`` on each
specialist, constant over nodes).

A source tensor is dense (a full fine-tune's tensor, or G's own) or low-rank (``W_G + B A``, a LoRA
adapter: its dense entry *is* G's tensor object and its factors sit in a ``LowRank``). Sources that
share one dense tensor object are merged before any arithmetic (``f`` is linear, their weights add),
so a constellation of adapters runs G's matmul once, scaled on the activations by ``f(sum_s w_s)``,
plus each adapter's ``B (A x)`` at the cost of its rank.

- ``materialize``: the dense composed tensors (the reference; low-rank updates merged in).
- ``ComposedParams``: one composition shared by a batch: the dense part kept or built once, the
  adapters folded into one plain adapter of rank ``sum r_s`` (never A and B mixed apart).
- ``MixedParams``: every batch row with its own composition: dense sources mixed per row, adapters
  through one shrink and one expand per linear over the active adapters' stacked factors.

In half precision (docs/precision.md) the composition weights stay fp32: composed tensors are
summed in fp32 and rounded once to the storage dtype, and a weight applied to activations is
multiplied in fp32 and rounded once to the activations' dtype.
"""

from __future__ import annotations

import torch

from .arch import Arch
from .lowrank import LowRank, Segments, Stack, fold, segment_weights, segmented_delta
from .linear import fused_base, linear_with
from .policies import BroadcastPolicy
from .quant import dense

Source = dict[str, torch.Tensor]  # one decoder block's dense tensors (names relative to the block)
LowRankSource = dict[str, LowRank]  # one decoder block's low-rank updates


def active_sources(weights: torch.Tensor) -> list[int]:
    """Sources with any non-zero weight; ``weights`` is ``[..., S, d]``."""
    flat = weights.reshape(-1, weights.shape[-2], weights.shape[-1])
    return [int(s) for s in torch.nonzero((flat != 0).any(-1).any(0)).flatten()]


def stack_rows(ws: list[torch.Tensor]) -> torch.Tensor:
    """Rows' source weights ``[S, d]`` or per block ``[Lc, S, d]`` as one batch tensor ``[B, (Lc,) S, d]``."""
    per_block = next((w.shape[0] for w in ws if w.dim() == 3), None)
    if per_block is not None:
        ws = [w if w.dim() == 3 else w.expand(per_block, *w.shape) for w in ws]
    return torch.stack(ws)


def side(policy: BroadcastPolicy, arch: Arch, name: str, shape: tuple[int, ...], d: int) -> str:
    """How the d-vector weights apply to a tensor: ``in`` (input columns), ``out`` (output rows),
    ``vec`` (a vector elementwise) or ``mean`` (the whole tensor by the mean weight)."""
    role = arch.role(name)
    axis = policy.axis(role, shape, d)
    if axis is None:
        return "mean"
    if len(shape) == 1:
        return "vec"
    in_axis = 0 if role.layout == "conv1d" else 1
    return "in" if axis == in_axis else "out"


def _factor(w: torch.Tensor, how: str, ndim: int) -> torch.Tensor:
    """Shape a weight d-vector ``[d]`` to broadcast over a stored tensor of ``ndim`` dimensions."""
    if how == "mean":
        return w.mean(-1).reshape(*([1] * ndim))
    return w if ndim == 1 else w.unsqueeze(-1 if how == "row" else -2)


def _storage_how(how: str, layout: str) -> str:
    """``in``/``out`` in storage terms: which stored axis the vector runs along (row or column)."""
    if how in ("mean", "vec"):
        return "mean" if how == "mean" else "row"
    conv = layout == "conv1d"
    return ("row" if conv else "col") if how == "in" else ("col" if conv else "row")


def _groups(sources: list[Source], name: str, weights: torch.Tensor, active: list[int]
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(tensor, summed weight)]`` over the distinct tensor objects of the active sources.

    ``weights`` is ``[S, d]`` or ``[B, S, d]``.
    """
    out: dict[int, list] = {}
    for s in active:
        t = sources[s][name]
        w = weights[..., s, :]
        if id(t) in out:
            out[id(t)][1] = out[id(t)][1] + w
        else:
            out[id(t)] = [t, w]
    return [(t, w) for t, w in out.values()]


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype composition arithmetic runs in for tensors stored in ``dtype`` (fp32 or wider)."""
    return torch.promote_types(dtype, torch.float32)


def scaled(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``x * f`` computed in ``f``'s (fp32) precision, rounded once to ``x``'s dtype."""
    return (x * f).to(x.dtype)


def _dense_sum(groups, how: str, t0: torch.Tensor) -> torch.Tensor:
    """``sum f(w) ⊙ t`` over the groups, in fp32 (or wider), **not** yet rounded to the storage dtype
    (a quantized matrix enters dequantized: the reference of what its kernel computes)."""
    acc = None
    for t, w in groups:
        t = dense(t)
        f = _factor(w.to(wide(t.dtype)), how, t.ndim)
        if acc is None:
            acc = t * f
        else:
            acc.addcmul_(t, f)  # in place: one pass, no temporary per source
    return acc if acc is not None else torch.zeros(tuple(t0.shape), dtype=wide(t0.dtype), device=t0.device)


def materialize(sources: list[Source], weights: torch.Tensor, policy: BroadcastPolicy, arch: Arch, d: int,
                lowrank: list[LowRankSource] | None = None) -> dict[str, torch.Tensor]:
    """Composed dense tensors of one block for one composition ``weights`` [S, d] (low-rank merged)."""
    active = active_sources(weights)
    out = {}
    for name, t0 in sources[0].items():
        how_sem = side(policy, arch, name, tuple(t0.shape), d)
        layout = arch.role(name).layout
        how = _storage_how(how_sem, layout)
        acc = _dense_sum(_groups(sources, name, weights, active), how, t0)
        for s in active if lowrank else ():
            lr = lowrank[s].get(name)
            if lr is not None:
                delta = lr.delta(layout, acc.dtype)
                acc = acc + delta * _factor(weights[s].to(acc.dtype), how, delta.ndim)
        out[name] = acc.to(t0.dtype)
    return out


def _apply(x: torch.Tensor, w: torch.Tensor, conv: bool) -> torch.Tensor:
    return linear_with(x, w, None, conv, None)


def _fusable(arch: Arch, part) -> dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor | None, list[int]]]:
    """The groups of ``arch.fused`` a composed block can still run as one matmul: their weights are
    row blocks of one matrix (G's, ``Transformer.fuse``), kept as they are by the composition, and any
    factor on their (shared) input is the same. ``part(name)`` is ``(tensor, input factor or None)``
    or None when the weight is not kept as one tensor. Returns group -> (matrix, input factor, row counts)."""
    out = {}
    for modules in arch.fused:
        parts = [part(m + ".weight") for m in modules]
        if any(p is None for p in parts):
            continue
        base = fused_base([t for t, _ in parts])
        fs = [f for _, f in parts]
        sizes = [t.shape[0] for t, _ in parts]
        if base is None:
            continue
        if all(f is None for f in fs):
            out[modules] = (base, None, sizes)
        elif all(f is not None and torch.equal(f, fs[0]) for f in fs):
            out[modules] = (base, fs[0], sizes)
    return out


class ComposedParams:
    """One block under one composition ``weights`` [S, d], shared by every row of a batch.

    A weight whose active sources all share one dense tensor (G's, for adapters) is kept as that
    tensor with the summed weight applied to the activations (``f(Σw) ⊙ (W x)`` or ``W (f(Σw) ⊙ x)``);
    several distinct dense tensors are summed once. Adapters fold into one low-rank update.
    """

    def __init__(self, sources: list[Source], weights: torch.Tensor, policy: BroadcastPolicy, arch: Arch,
                 d: int, lowrank: list[LowRankSource] | None = None):
        self.arch = arch
        self.t: dict[str, torch.Tensor] = {}
        self.scale: dict[str, tuple[str, torch.Tensor]] = {}  # name -> (in|out|mean, factor)
        self.lr: dict[str, LowRank] = {}
        active = active_sources(weights)
        for name, t0 in sources[0].items():
            how = side(policy, arch, name, tuple(t0.shape), d)
            layout = arch.role(name).layout
            groups = _groups(sources, name, weights, active)
            if t0.ndim == 2 and len(groups) == 1:
                t, w = groups[0]
                self.t[name] = t
                f = w.mean() if how == "mean" else w
                if not bool(torch.all((f - 1).abs() < 1e-6)):  # sums of weights are 1 up to rounding
                    self.scale[name] = (how, f.to(wide(t.dtype)))
            else:
                self.t[name] = _dense_sum(groups, _storage_how(how, layout), t0).to(t0.dtype)
            if lowrank and t0.ndim == 2:
                folded = fold([(lowrank[s][name], weights[s]) for s in active if name in lowrank[s]], how)
                if folded is not None:
                    self.lr[name] = folded
        self.fused = _fusable(arch, self._part)

    def _part(self, name: str):
        t = self.t.get(name)
        how, f = self.scale.get(name, (None, None))
        return None if t is None else (t, f if how == "in" else None)

    def linear(self, x: torch.Tensor, weight: str, bias: str | None) -> torch.Tensor:
        conv = self.arch.roles[weight].layout == "conv1d"
        how, f = self.scale.get(weight, (None, None))
        y = _apply(scaled(x, f) if how == "in" else x, self.t[weight], conv)
        return self._finish(y, x, weight, bias)

    def linears(self, x: torch.Tensor, modules: tuple[str, ...]) -> list[torch.Tensor]:
        """Linear maps of one input (q/k/v, gate/up): one matmul when G's fused matrix serves them."""
        ys = _fused_outputs(self.fused, x, modules)
        if ys is None:
            return [self.linear(x, m + ".weight", m + ".bias") for m in modules]
        return [self._finish(y, x, m + ".weight", m + ".bias") for y, m in zip(ys, modules)]

    def _finish(self, y: torch.Tensor, x: torch.Tensor, weight: str, bias: str | None) -> torch.Tensor:
        """The dense product ``y`` with the output-side factor, the folded adapter and the bias."""
        how, f = self.scale.get(weight, (None, None))
        if how in ("out", "mean"):
            y = scaled(y, f)
        lr = self.lr.get(weight)
        if lr is not None:
            y = y + lr.apply(x)
        b = self.t.get(bias) if bias else None
        return y if b is None else y + b

    def vector(self, name: str) -> torch.Tensor | None:
        return self.t.get(name)


class MixedParams:
    """One block whose tensors are mixed per batch row at run time (``weights`` [B, S, d]).

    Built once per batch (the engine keeps it while the batch's rows stay the same): the summed
    weight of every distinct dense tensor, the composed vectors, and for every weight with stacked
    adapters the rows that use each adapter (``Segments``) with their weights.
    """

    def __init__(self, sources: list[Source], weights: torch.Tensor, policy: BroadcastPolicy, arch: Arch, d: int,
                 stacks: dict[str, Stack] | None = None, row_use: torch.Tensor | None = None,
                 segments: dict | None = None):
        self.arch = arch
        B = weights.shape[0]
        row_use = (weights != 0).any(-1) if row_use is None else row_use  # [B, S]
        active = [int(s) for s in torch.nonzero(row_use.any(0)).flatten()]
        self.dense: dict[str, list[tuple[torch.Tensor, str, torch.Tensor | None]]] = {}
        self.vec: dict[str, torch.Tensor] = {}
        self.lr: dict[str, tuple] = {}
        for name, t0 in sources[0].items():
            how = side(policy, arch, name, tuple(t0.shape), d)
            groups = _groups(sources, name, weights, active)
            if t0.ndim == 1:
                acc = t0.new_zeros(B, t0.shape[0], dtype=wide(t0.dtype))
                for t, w in groups:
                    w = w.to(acc.dtype)
                    acc = acc + (w.mean(-1, keepdim=True) if how == "mean" else w) * t
                self.vec[name] = acc.to(t0.dtype)[:, None, :]  # [B, 1, n] broadcasts over tokens
                continue
            terms = []
            for t, w in groups:
                f = (w.mean(-1, keepdim=True) if how == "mean" else w).to(wide(t.dtype))[:, None, :]  # [B, 1, d|1]
                terms.append((t, how, None if bool(torch.all((f - 1).abs() < 1e-6)) else f))
            self.dense[name] = terms or [(t0, "mean", torch.zeros(B, 1, 1, dtype=t0.dtype, device=t0.device))]
        segments = {} if segments is None else segments
        for name, st in (stacks or {}).items():
            key = tuple(st.sources.tolist())
            if key not in segments:
                segments[key] = Segments.build(row_use.index_select(1, st.sources))
            seg = segments[key]
            if seg is not None:
                how = side(policy, arch, name, tuple(sources[0][name].shape), d)
                self.lr[name] = (st, seg, segment_weights(weights, st, seg, how), how)
        self.fused = _fusable(arch, self._part)

    def _part(self, name: str):
        terms = self.dense.get(name)
        if terms is None or len(terms) != 1:
            return None
        t, how, f = terms[0]
        return t, f if how == "in" else None

    def vector(self, name: str) -> torch.Tensor | None:
        return self.vec.get(name)

    def linear(self, x: torch.Tensor, weight: str, bias: str | None) -> torch.Tensor:
        conv = self.arch.role(weight).layout == "conv1d"
        y = None
        for t, how, f in self.dense[weight]:
            z = _apply(scaled(x, f) if how == "in" and f is not None else x, t, conv)
            if how != "in" and f is not None:
                z = scaled(z, f)
            y = z if y is None else y + z
        return self._finish(y, x, weight, bias)

    def linears(self, x: torch.Tensor, modules: tuple[str, ...]) -> list[torch.Tensor]:
        """Linear maps of one input (q/k/v, gate/up): one matmul when G's fused matrix serves them."""
        ys = _fused_outputs(self.fused, x, modules)
        if ys is None:
            return [self.linear(x, m + ".weight", m + ".bias") for m in modules]
        out = []
        for y, m in zip(ys, modules):
            _, how, g = self.dense[m + ".weight"][0]
            out.append(self._finish(y if how == "in" or g is None else scaled(y, g), x, m + ".weight", m + ".bias"))
        return out

    def _finish(self, y: torch.Tensor, x: torch.Tensor, weight: str, bias: str | None) -> torch.Tensor:
        """The dense part ``y`` plus the rows' adapters and composed bias."""
        lr = self.lr.get(weight)
        if lr is not None:
            y = y + segmented_delta(x, *lr)
        if bias and bias in self.vec:
            y = y + self.vec[bias]
        return y


def _fused_outputs(fused: dict, x: torch.Tensor, modules: tuple[str, ...]) -> tuple[torch.Tensor, ...] | None:
    """G's fused matrix for ``modules`` applied once (its input factor first), split per module;
    None when the composition does not keep that matrix."""
    if modules not in fused:
        return None
    w, f, sizes = fused[modules]
    return linear_with(x if f is None else scaled(x, f), w, None, False, None).split(sizes, dim=-1)
