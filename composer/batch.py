"""Many compositions in one batch, as tensors: one code path whatever the rows compose.

``composer.kernels`` holds the reference forms (``materialize``; ``ComposedParams`` for one
composition; ``MixedParams``, which builds its own bookkeeping per batch). This module is what the
engine's step runs: a catalog's structure is fixed once (``CatalogKernel``), and a batch enters it
only as tensors (``RowWeights`` per row, stacked by ``BatchComposition``):

- per row, the specialists it composes as source indices (``src`` [K]) and the weights of G and of
  those sources, ``w`` [Lb, 1 + K, d] (Lb = one set per composed block, or 1 for all blocks);
- per batch: ``src`` [R, K] padded with source 0 (G) at weight 0, ``w`` [R, Lb, 1 + K, d].

Per block and tensor, the catalog fixes the distinct dense tensors among the sources (G's, and a
full fine-tune's own), which source uses which (``owner``), the side the d-vector weights apply on,
and the stacked adapter factors (``Stack``) with each source's entry. A row's factor for a dense
tensor is the sum of its weights over the sources that use that tensor (one ``scatter_add``); the
adapters run over the (row, source) pairs grouped by adapter: each adapter's factors
are read once for all the rows that use it, none is gathered per row (SGMV: batched matmuls over the
adapters in use, their rows padded to the busiest one's count).

The arithmetic is the reference's: ``y = sum_t f_t(w) ⊙ (W_t x) + sum_s f(w_s) ⊙ B_s A_s x`` in fp32
composition weights, rounded once to the activations' dtype (docs/precision.md). The weights are
applied even where they sum to exactly 1, so no branch depends on what the rows compose.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .arch import Arch
from .kernels import side, scaled, wide
from .lowrank import Stack
from .linear import fused_base, linear_with


FOLD_TOKENS = 4  # rows of at least this many tokens (prompt tails) fold their adapters per row


@dataclass(frozen=True)
class RowWeights:
    """One row's composition: specialist sources ``src`` [K] (1-based source indices) and the
    weights ``w`` [Lb, 1 + K, d] of G (column 0) and of those sources; Lb = 1 (every block alike)
    or one per block of the catalog's span (``first .. n - 1``)."""

    src: torch.Tensor
    w: torch.Tensor

    @staticmethod
    def of(weights: torch.Tensor) -> "RowWeights":
        """From dense source weights ``[1 + N, d]`` or ``[Lb, 1 + N, d]`` (source 0 = G)."""
        w = weights if weights.dim() == 3 else weights[None]
        used = (w[:, 1:] != 0).any(-1).any(0)
        src = torch.nonzero(used).flatten() + 1
        cols = torch.cat([torch.zeros(1, dtype=torch.long), src])
        return RowWeights(src, w.index_select(1, cols).to(torch.float32).contiguous())

    @property
    def k(self) -> int:
        return int(self.src.shape[0])

    @functools.cached_property
    def plain(self) -> bool:
        """G alone at weight 1 everywhere: the row's composed blocks compute exactly G's layers."""
        return self.k == 0 and bool((self.w == 1).all())


@dataclass
class _Term:
    """How one tensor of one block composes."""

    tensors: list[torch.Tensor]  # distinct dense tensors, G's first
    owner: torch.Tensor  # long [S]: source -> index into ``tensors``
    side: str  # in | out | vec | mean
    conv: bool
    group: int  # this block's owner group (terms with the same ``owner`` share factors)
    stack: Stack | None = None
    pairs: int | None = None  # index of the catalog's pair ordering for ``stack.sources``


class CatalogKernel:
    """A constellation's composed blocks, fixed once: terms per block and tensor, owner groups,
    adapter stacks and the distinct source -> adapter-entry maps (one pair ordering each)."""

    def __init__(self, c):
        self.c = c
        self.arch: Arch = c.g.arch
        self.first, self.n, self.S = c.first, c.n, 1 + len(c.domains)
        self.packed = c.g.packed  # G's prepacked matrices, if it has them (``Transformer.pack``)
        self.blocks: dict[int, dict[str, _Term]] = {}
        self.groups: dict[int, list[torch.Tensor]] = {}  # block -> owner vector per group
        self.entry_maps: list[tuple[torch.Tensor, int]] = []  # (source -> entry or -1 [S], adapters)
        self.fused: dict[int, dict[tuple[str, ...], torch.Tensor]] = {}
        keys: dict[tuple, int] = {}
        for i in c.varied:
            terms, groups, gkeys = {}, [], {}
            for name, t0 in c.sources[i][0].items():
                distinct: dict[int, int] = {}
                tensors, owner = [], []
                for src in c.sources[i]:
                    t = src[name]
                    if id(t) not in distinct:
                        distinct[id(t)] = len(tensors)
                        tensors.append(t)
                    owner.append(distinct[id(t)])
                okey = tuple(owner)
                if okey not in gkeys:
                    gkeys[okey] = len(groups)
                    groups.append(torch.tensor(owner, dtype=torch.long, device=t0.device))
                layout = self.arch.role(name).layout
                term = _Term(tensors, groups[gkeys[okey]], side(c.policy, self.arch, name, tuple(t0.shape), c.d),
                             layout == "conv1d", gkeys[okey])
                st = c.stacks.get(i, {}).get(name)
                if st is not None:
                    skey = tuple(st.sources.tolist())
                    if skey not in keys:
                        emap = torch.full((self.S,), -1, dtype=torch.long)
                        emap[st.sources.cpu()] = torch.arange(len(skey))
                        keys[skey] = len(self.entry_maps)
                        self.entry_maps.append((emap.to(t0.device), len(skey)))
                    term.stack, term.pairs = st, keys[skey]
                terms[name] = term
            self.blocks[i], self.groups[i] = terms, groups
            self.fused[i] = self._fusable(terms)

    def _fusable(self, terms: dict[str, _Term]) -> dict[tuple[str, ...], torch.Tensor]:
        """Groups of ``arch.fused`` whose weights are one G matrix for every source (no full
        fine-tune changed them), with one owner group and the input side for all or for none."""
        out = {}
        for modules in self.arch.fused:
            ts = [terms.get(m + ".weight") for m in modules]
            if any(t is None or len(t.tensors) != 1 for t in ts) or len({t.group for t in ts}) != 1:
                continue
            if len({t.side == "in" for t in ts}) != 1:
                continue
            base = fused_base([t.tensors[0] for t in ts])
            if base is not None:
                out[modules] = base
        return out


class BatchComposition:
    """The composed blocks of one batch of rows (``RowWeights`` each, in this catalog's sources):
    per block a ``LayerParams`` computing every row under its own composition."""

    def __init__(self, kernel: CatalogKernel, rows: list[RowWeights]):
        self.kernel = kernel
        R = len(rows)
        K = max(r.k for r in rows)
        Lb = max(r.w.shape[0] for r in rows)
        d = rows[0].w.shape[-1]
        dev = kernel.c.g.device
        src = torch.zeros(R, K, dtype=torch.long)
        w = torch.zeros(R, Lb, 1 + K, d, dtype=torch.float32)
        for b, r in enumerate(rows):
            src[b, :r.k] = r.src
            w[b, :, :1 + r.k] = r.w  # (a row's single set broadcasts over the blocks)
        self.src, self.w = src.to(dev), w.to(dev)
        self.per_block = Lb > 1
        self.entries = [emap[self.src] for emap, _ in kernel.entry_maps]  # [R, K] stack entry, -1: none
        self.pairs = [self._pairs(e, na, K) for e, (_, na) in zip(self.entries, kernel.entry_maps)]
        self.params = {i: _BlockParams(self, i) for i in kernel.blocks}

    def _pairs(self, e: torch.Tensor, na: int, K: int):
        """The (row, source) pairs that use an adapter of this stack, grouped by adapter into a padded
        ``[U, m]`` layout (U adapters in use, m = the most rows one of them serves): rows [U, m] (padding:
        row 0), slots [U, m] (column in ``src``), valid [U, m], the adapters' entries ``ks`` [U], and
        when every row uses exactly one of them (no padding), ``inv`` [R]: each row's place in the
        layout, so the products go back by a gather instead of a scatter (None otherwise)."""
        valid = e >= 0
        flat = torch.where(valid, e, na).flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=na + 1)[:na]
        ks = torch.nonzero(counts).flatten()
        if ks.numel() == 0:
            return None
        m = int(counts.max())
        c = counts[ks]
        start = torch.cumsum(c, 0) - c
        pos = start[:, None] + torch.arange(m, device=e.device)[None, :]  # [U, m] into ``order``
        ok = torch.arange(m, device=e.device)[None, :] < c[:, None]
        pick = order[pos.clamp(max=order.numel() - 1)]
        Kc = max(K, 1)
        rows = torch.where(ok, pick // Kc, 0)
        slots = torch.where(ok, pick % Kc, 0)
        inv = None
        if rows.numel() == self.src.shape[0] and bool(ok.all()):  # (R pairs, R rows: a permutation if distinct)
            inv = torch.argsort(rows.flatten())
            if not torch.equal(rows.flatten()[inv], torch.arange(rows.numel(), device=rows.device)):
                inv = None
        return rows, slots, ok, ks, inv

    def block_weights(self, i: int) -> torch.Tensor:
        """``[R, 1 + K, d]``: the rows' weights in block ``i``."""
        return self.w[:, i - self.kernel.first if self.per_block else 0]


class BlockApply:
    """``LayerParams`` of one composed block over every row of a batch, given the rows' factors
    (``factors``: per owner group ``[R, T, d]``); the adapters' products come from ``_lowrank``.
    ``_BlockParams`` is the eager step's; ``composer.captured`` builds one inside a captured graph,
    its matrices those the graph holds as constants and its adapters one opaque operator."""

    terms: dict[str, _Term]
    fused: dict[tuple[str, ...], torch.Tensor]
    packed: dict[int, torch.Tensor] | None
    factors: list[torch.Tensor]

    def _lowrank(self, y: torch.Tensor, x: torch.Tensor, term: _Term, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _factor(self, term: _Term, t: int) -> torch.Tensor:
        f = self.factors[term.group][:, t, None, :]  # [R, 1, d]
        return f.mean(-1, keepdim=True) if term.side == "mean" else f

    def _dense(self, x: torch.Tensor, term: _Term) -> torch.Tensor:
        y = None
        for t, W in enumerate(term.tensors):
            f = self._factor(term, t)
            if term.side == "in":
                z = linear_with(scaled(x, f), W, None, term.conv, self.packed)
            else:
                z = scaled(linear_with(x, W, None, term.conv, self.packed), f)
            y = z if y is None else y + z
        return y

    def _finish(self, y: torch.Tensor, x: torch.Tensor, name: str, bias: str | None) -> torch.Tensor:
        term = self.terms[name]
        if term.stack is not None:
            y = self._lowrank(y, x, term, name)
        b = self.vector(bias) if bias else None
        return y if b is None else y + b

    # ---- LayerParams ---------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, weight: str, bias: str | None) -> torch.Tensor:
        return self._finish(self._dense(x, self.terms[weight]), x, weight, bias)

    def linears(self, x: torch.Tensor, modules: tuple[str, ...]) -> list[torch.Tensor]:
        """q/k/v or gate/up: one matmul on G's fused matrix when the catalog keeps it."""
        base = self.fused.get(modules)
        if base is None:
            return [self.linear(x, m + ".weight", m + ".bias") for m in modules]
        terms = [self.terms[m + ".weight"] for m in modules]
        inside = terms[0].side == "in"
        ys = linear_with(scaled(x, self._factor(terms[0], 0)) if inside else x, base, None, False,
                         self.packed).split([t.tensors[0].shape[0] for t in terms], dim=-1)
        return [self._finish(y if inside else scaled(y, self._factor(t, 0)), x, m + ".weight", m + ".bias")
                for y, t, m in zip(ys, terms, modules)]

    def vector(self, name: str) -> torch.Tensor | None:
        term = self.terms.get(name)
        if term is None:
            return None
        acc = None
        for t, v in enumerate(term.tensors):
            f = self._factor(term, t).to(wide(v.dtype))  # [R, 1, n|1]
            acc = f * v if acc is None else acc + f * v
        return acc.to(term.tensors[0].dtype)


class _BlockParams(BlockApply):
    """``LayerParams`` of one composed block for every row of a batch (factors and adapter pairs
    computed from the batch's tensors)."""

    def __init__(self, batch: BatchComposition, i: int):
        k = batch.kernel
        self.terms, self.fused, self.packed = k.blocks[i], k.fused[i], k.packed
        wb = batch.block_weights(i)  # [R, 1 + K, d]
        wg, wk = wb[:, 0], wb[:, 1:]
        R, K, d = wk.shape
        self.factors = []
        for owner in k.groups[i]:
            T = int(owner.max()) + 1
            if T == 1:
                self.factors.append((wg + wk.sum(1))[:, None])  # [R, 1, d]
                continue
            f = torch.zeros(R, T, d, dtype=wb.dtype, device=wb.device)
            f[:, 0] = wg
            f.scatter_add_(1, owner[batch.src][:, :, None].expand(R, K, d), wk)
            self.factors.append(f)
        self.wk, self.pairs = wk, []
        for pairs in batch.pairs:
            if pairs is None:
                self.pairs.append(None)
                continue
            rows, slots, ok, ks, inv = pairs  # pair weights [U, m, d], zero on padding
            self.pairs.append((rows, ks, wk[rows, slots] * ok[..., None].to(wk.dtype), inv))
        self._wide = None  # (x, x in the factors' dtype) of the last per-row product
        self.entries = batch.entries  # per pair ordering: each (row, source)'s stack entry [R, K], -1: none

    def _lowrank(self, y: torch.Tensor, x: torch.Tensor, term: _Term, name: str) -> torch.Tensor:
        """``y`` plus every row's ``sum_s f(w_s) ⊙ B_s A_s x``: per adapter in use, its rows gathered (padded
        to the busiest adapter's count, at weight 0), one batched shrink and one batched expand over those
        adapters (each adapter's factors read once), added back into ``y`` in place."""
        pairs = self.pairs[term.pairs]
        if pairs is None:
            return y
        rows, ks, wp, inv = pairs
        U, m = rows.shape
        R, T, n_in = x.shape
        if R > 1 and T >= FOLD_TOKENS:  # (before gathering the adapters in use: it takes the whole stack)
            return self._per_row(y, x, term)
        A, Bt = term.stack.products(ks)  # (fp32 copies of a half-precision stack on a CPU)
        if R == 1:
            return self._one_row(y, x, term, A, Bt, wp[:, 0])
        wp = (wp.mean(-1, keepdim=True) if term.side == "mean" else wp)[:, :, None, :]  # [U, m, 1, d|1]
        xg = x.index_select(0, rows.flatten()).view(U, m, T, n_in).to(A.dtype)
        if term.side == "in":
            xg = scaled(xg, wp)
        yp = torch.bmm(torch.bmm(xg.view(U, m * T, n_in), A.transpose(1, 2)), Bt).view(U, m, T, -1)
        if term.side != "in":
            yp = scaled(yp, wp)
        if inv is not None:  # each row once: a gather (index_add_'s scatter took 21 ms of a 145 ms bf16 step
            y[:inv.numel()].add_(yp.view(U * m, T, -1).index_select(0, inv))  # of 16 rows on 16 adapters;
            return y  # a captured step's y has padding rows after the batch's)
        if yp.dtype == y.dtype:
            return y.index_add_(0, rows.flatten(), yp.view(U * m, T, -1))
        delta = yp.new_zeros((R,) + tuple(y.shape[1:])).index_add_(0, rows.flatten(), yp.view(U * m, T, -1))
        return y.add_(delta)  # (a row's adapters summed in fp32, added to y rounded once)

    def _per_row(self, y: torch.Tensor, x: torch.Tensor, term: _Term) -> torch.Tensor:
        """Rows of many tokens (prompt tails): each row's adapters folded into one of rank ``K·r``
        (its weights scaled into ``A`` or ``Bt`` in fp32), then two batched products over the rows. The
        gathered form copies every (row, adapter) pair's tokens, ``K`` copies of each row's activations
        (measured on the demo, 14 prompts of ~50 tokens: the gathers, casts and scatters took twice G's
        own products in the composed blocks); folding copies factors, a few rows × ``K·r`` × width."""
        e = self.entries[term.pairs]  # [R, K]
        A, Bt = term.stack.factors
        w = self.wk * (e >= 0)[..., None].to(self.wk.dtype)  # [R, K, d]: 0 where a source has no adapter
        R, K = e.shape  # (index_select on the flattened entries: advanced indexing ran at ~4 GB/s)
        e = e.clamp(min=0).flatten()
        A, Bt = A.index_select(0, e).unflatten(0, (R, K)), Bt.index_select(0, e).unflatten(0, (R, K))
        if term.side == "in":
            A = scaled(A, w[:, :, None, :])
        else:
            Bt = scaled(Bt, w[:, :, None, :] if term.side == "out" else w.mean(-1)[:, :, None, None])
        r, n_in = A.shape[2:]
        if self._wide is None or self._wide[0] is not x or self._wide[1].dtype != A.dtype:
            self._wide = (x, x.reshape(R, -1, n_in).to(A.dtype))  # (q/k/v, gate/up: one input, cast once)
        h = torch.bmm(self._wide[1], A.view(R, K * r, n_in).transpose(1, 2))
        return y.add_(torch.bmm(h, Bt.view(R, K * r, -1)).view(y.shape))  # (fp32, added to y rounded once)

    @staticmethod
    def _one_row(y, x, term: _Term, A: torch.Tensor, Bt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One row (a prompt's composed tail, an eager one-row step): its ``U`` adapters folded into one
        plain adapter of rank ``U·r`` (``w [U, d]`` scaled into ``A`` or ``Bt`` in fp32, rounded once
        to the products' dtype), two products instead of the batched form's gathers and scatters."""
        if term.side == "in":
            A = scaled(A, w[:, None, :])
        else:
            Bt = scaled(Bt, w[:, None, :] if term.side == "out" else w.mean(-1)[:, None, None])
        U, r, n_in = A.shape
        h = x.reshape(-1, n_in).to(A.dtype) @ A.reshape(U * r, n_in).T
        return y.add_((h @ Bt.reshape(U * r, -1)).view(y.shape))  # (summed in fp32, added to y rounded once)
