"""The engine's key/value memory: slots of a few capacities carved out of one budget.

``KVPool`` holds every row's keys/values in ``tokens`` positions per layer, cut into slabs of
equal size (about 16, each holding a whole number of the longest sequences). A slab serves one *capacity class* (16, 32, 64, ... positions, up to the longest
sequence) as a ``SlotCache`` over its memory; a row takes a slot of the smallest class that holds
it and, when it grows past its class, moves to the next one (one copy per doubling, so a token
costs O(1) copying on average). Memory goes where the tokens are — 64 sequences of 512 tokens fit
where 16 slots of 2048 did — and a decode step still reads each slab's rows as one strided view:
a row's keys are contiguous, a slab's decoding rows are ``k[:rows, :, :span]``, with no gather,
and a row attends over less padding than its own length (a row in a slab holds more than half its
class, but for prompts just admitted). ``bench.attention`` measured the alternative, paged blocks
gathered per step (vLLM's layout, without its C++ kernels): the gathers cost 5-8x the attention.

When no slot of a class is free and no slab is empty, the pool packs a class's rows into fewer
slabs (``compact``) before it reports ``NoRoom``; the engine then preempts (docs/server.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from composer import decode_kernel
from composer.attention import one_query_attention_bias
from .kv_cache import SlotCache

MIN_CLASS = 16  # the smallest slot capacity
SLABS = 16  # about this many slabs (each a whole number of the longest sequences)


class NoRoom(Exception):
    """No slot of the needed capacity can be made free now."""


class Slab(SlotCache):
    """Slots of one capacity over a piece of the pool's memory."""

    def __init__(self, index: int, cap: int, k: list[torch.Tensor], v: list[torch.Tensor]):
        base = SlotCache.over(k, v)
        self.__dict__.update(base.__dict__)
        self.index, self.cap = index, cap

    def _place(self, owner, slot: int) -> None:
        super()._place(owner, slot)
        owner.slab, owner.cap = self.index, self.cap


class KVPool:
    def __init__(self, n_layers: int, n_kv: int, head_dim: int, max_len: int, tokens: int, dtype, device,
                 slab_tokens: int | None = None):
        self.max_len = max_len
        self.slab_tokens = slab_tokens or max_len * max(1, tokens // max_len // SLABS)
        self.n_slabs = tokens // self.slab_tokens
        if self.n_slabs < 1:
            raise ValueError(f"a KV cache of {tokens} positions cannot hold one sequence of {max_len} tokens")
        self.n_kv, self.head_dim = n_kv, head_dim
        per = self.slab_tokens * n_kv * head_dim
        # zeros, not empty: a decode step reads every row up to its slab's longest row, and masked
        # positions still meet the values (0 * NaN from uninitialised memory would be NaN)
        self.k = [torch.zeros(self.n_slabs, per, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(self.n_slabs, per, dtype=dtype, device=device) for _ in range(n_layers)]
        self.classes = [c for c in (MIN_CLASS << k for k in range(32)) if c < max_len] + [max_len]
        self.slabs: list[Slab | None] = [None] * self.n_slabs
        self.moves = 0  # rows moved to another slab (growth and compaction)

    # ---- facts -------------------------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        return self.n_slabs * self.slab_tokens

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def used(self) -> int:
        """Rows holding a slot."""
        return sum(s.used for s in self.slabs if s is not None)

    def usage(self) -> float:
        """Share of the positions held by slots (rows' capacities) over all positions."""
        return sum(s.used * s.cap for s in self.slabs if s is not None) / self.tokens

    def class_for(self, need: int) -> int:
        """The smallest slot capacity holding ``need`` positions."""
        if need > self.max_len:
            raise ValueError(f"{need} positions exceed the longest sequence, {self.max_len}")
        return next(c for c in self.classes if c >= need)

    def per_slab(self, cap: int) -> int:
        return self.slab_tokens // cap

    # ---- placing rows ------------------------------------------------------------------------------
    def fits(self, needs: list[int]) -> bool:
        """Whether rows of ``needs`` positions could be staged now (counting what compaction frees)."""
        free = {c: 0 for c in self.classes}
        used = {c: 0 for c in self.classes}
        empty = 0
        for s in self.slabs:
            if s is None:
                empty += 1
            else:
                free[s.cap] += s.free
                used[s.cap] += s.used
        for c in self.classes:  # slabs compaction would empty
            m = self.per_slab(c)
            slabs = sum(1 for s in self.slabs if s is not None and s.cap == c)
            spare = slabs - -(-used[c] // m)
            empty += spare
            free[c] -= spare * m
        for need in sorted(needs, reverse=True):
            c = self.class_for(need)
            if free[c] == 0:
                if empty == 0:
                    return False
                empty -= 1
                free[c] += self.per_slab(c)
            free[c] -= 1
        return True

    def could_fit(self, needs: list[int]) -> bool:
        """Whether rows of ``needs`` positions could ever be held at once (in an empty pool)."""
        rows: dict[int, int] = {}
        for need in needs:
            c = self.class_for(min(need, self.max_len))
            rows[c] = rows.get(c, 0) + 1
        return sum(-(-n // self.per_slab(c)) for c, n in rows.items()) <= self.n_slabs

    def _slab_with_room(self, cap: int) -> Slab:
        """The fullest slab of class ``cap`` with a free slot, else a new one on an empty slab."""
        best = None
        for s in self.slabs:
            if s is not None and s.cap == cap and s.free and (best is None or s.used > best.used):
                best = s
        if best is not None:
            return best
        if None not in self.slabs and not self.compact():
            raise NoRoom(f"no free slot of {cap} positions")
        # next to a slab of the class if one is free there, so decode steps read both as one view
        after = [s.index + 1 for s in self.slabs if s is not None and s.cap == cap]
        index = next((i for i in after if i < self.n_slabs and self.slabs[i] is None), self.slabs.index(None))
        return self._new_slab(index, cap)

    def _new_slab(self, index: int, cap: int) -> Slab:
        m, per = self.per_slab(cap), self.n_kv * cap * self.head_dim
        shape = (m, self.n_kv, cap, self.head_dim)
        slab = Slab(index, cap, [t[index, :m * per].view(shape) for t in self.k],
                    [t[index, :m * per].view(shape) for t in self.v])
        self.slabs[index] = slab
        return slab

    def stage(self, row, need: int) -> None:
        """A slot holding ``need`` positions for a row about to be prefilled (``NoRoom`` if none)."""
        self._slab_with_room(self.class_for(need)).stage(row)

    def promote(self, row) -> None:
        self.slabs[row.slab].promote(row)

    def release(self, row) -> None:
        slab = self.slabs[row.slab]
        slab.release(row)
        row.slab = -1
        if slab.used == 0:
            self.slabs[slab.index] = None

    def release_all(self, rows) -> None:
        by_slab: dict[int, list] = {}
        for r in rows:
            by_slab.setdefault(r.slab, []).append(r)
        for index, group in by_slab.items():
            slab = self.slabs[index]
            slab.release_all(group)
            for r in group:
                r.slab = -1
            if slab.used == 0:
                self.slabs[index] = None

    def grow(self, row, need: int) -> None:
        """Move a decoding row to a slot holding ``need`` positions (``NoRoom`` if none can be made).
        When nothing else is free, the row's own slab is re-cut into the larger slots if its rows fit."""
        cap = self.class_for(need)
        if cap <= row.cap:
            return
        try:
            dst = self._slab_with_room(cap)
        except NoRoom:
            if self.slabs[row.slab].used > self.per_slab(cap):
                raise
            self._recut(self.slabs[row.slab], cap)
            return
        self._move(row, dst)

    def _recut(self, old: Slab, cap: int) -> None:
        """Re-cut slab ``old`` into slots of ``cap`` (larger), every row keeping its positions and state."""
        rows = sorted(old.owners.values(), key=lambda r: r.slot)
        decoding = [r for r in rows if r.slot < old.decoding]
        staged = [r for r in rows if r.slot >= old.decoding]
        kept = [[(k[r.slot, :, :r.length].clone(), v[r.slot, :, :r.length].clone()) for k, v in zip(old.k, old.v)]
                for r in rows]
        slab = self._new_slab(old.index, cap)
        for r in decoding:
            slab.decoding += 1
            slab._place(r, slab.decoding - 1)
        for r in staged:
            slab.staged += 1
            slab._place(r, slab.slots - slab.staged)
        for r, data in zip(rows, kept):
            for i, (k, v) in enumerate(data):
                slab.k[i][r.slot, :, :r.length] = k
                slab.v[i][r.slot, :, :r.length] = v
        self.moves += len(rows)

    def _move(self, row, dst: Slab) -> None:
        """Move ``row`` (its ``length`` positions) into ``dst``'s region for its state (decoding/staged)."""
        src = self.slabs[row.slab]
        decoding = row.slot < src.decoding
        slot = dst.decoding if decoding else dst.slots - dst.staged - 1
        for i in range(len(self.k)):
            dst.k[i][slot, :, :row.length] = src.k[i][row.slot, :, :row.length]
            dst.v[i][slot, :, :row.length] = src.v[i][row.slot, :, :row.length]
        length = row.length
        self.release(row)
        row.length = length
        if decoding:
            dst.decoding += 1
        else:
            dst.staged += 1
        dst._place(row, slot)
        self.moves += 1

    def compact(self) -> bool:
        """Empty one slab by moving its rows into free slots of slabs of its class; False if none can."""
        for cap in self.classes:
            slabs = sorted((s for s in self.slabs if s is not None and s.cap == cap), key=lambda s: s.used)
            if len(slabs) < 2:
                continue
            victim, others = slabs[0], slabs[1:]
            if sum(s.free for s in others) < victim.used:
                continue
            for row in list(victim.owners.values()):
                self._move(row, next(s for s in others if s.free))
            return True
        return False

    # ---- reading and writing ---------------------------------------------------------------------
    def kv(self, i: int, row) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s keys/values of ``row``'s slot: ``[H_kv, cap, head_dim]`` each."""
        return self.slabs[row.slab].kv(i, row)

    def copy(self, src, dst, length: int, layers: range | None = None) -> None:
        """The first ``length`` positions of row ``src`` into row ``dst`` (``layers``: all by default)."""
        a, b = self.slabs[src.slab], self.slabs[dst.slab]
        for i in layers if layers is not None else range(len(self.k)):
            b.k[i][dst.slot, :, :length] = a.k[i][src.slot, :, :length]
            b.v[i][dst.slot, :, :length] = a.v[i][src.slot, :, :length]

    def decode_order(self, rows: list) -> list:
        """``rows`` in the order a decode step runs them: by slab, then slot."""
        return sorted(rows, key=lambda r: (r.slab, r.slot))


@dataclass
class _Segment:
    first: int  # slabs first..last (adjacent, one class, all but the last full of decoding rows)
    last: int
    cap: int
    rows: slice  # the step's rows in these slabs (their decode regions, in slot order)
    lengths: list[int]


class SlabDecodeView:
    """A decode step over rows in ``KVPool.decode_order``: every row writes its new key/value at
    position ``length`` of its slot (one indexed copy into the pool per layer for all rows), then per
    slab the slab's decoding rows attend over its view up to their longest row (``attend``: the model
    calls it instead of ``update``)."""

    def __init__(self, pool: KVPool, rows: list, lengths: torch.Tensor):
        self.pool = pool
        device = lengths.device
        kv = pool.n_kv
        per = pool.slab_tokens * kv  # rows of head_dim per slab
        base, step, meta = [], [], []
        segs: list[_Segment] = []
        start = 0
        while start < len(rows):
            slab = pool.slabs[rows[start].slab]
            end = start
            while end < len(rows) and rows[end].slab == slab.index:
                end += 1
            n = end - start
            if [r.slot for r in rows[start:end]] != list(range(n)) or n != slab.decoding:
                raise AssertionError("a decode step must run every decoding row of a slab, in slot order")
            lens = [r.length for r in rows[start:end]]
            prev = segs[-1] if segs else None
            if (prev is not None and prev.cap == slab.cap and prev.last + 1 == slab.index
                    and pool.slabs[prev.last].decoding == pool.slabs[prev.last].slots
                    and slab.slots * slab.cap == pool.slab_tokens):  # one strided view over both
                prev.last, prev.rows = slab.index, slice(prev.rows.start, end)
                prev.lengths += lens
            else:
                segs.append(_Segment(slab.index, slab.index, slab.cap, slice(start, end), lens))
            for r in rows[start:end]:
                base.append(slab.index * per + r.slot * kv * slab.cap + r.length)
                step.append(slab.cap)
                meta.append(((slab.index * per + r.slot * kv * slab.cap) * pool.head_dim,
                             slab.cap * pool.head_dim, r.length + 1))
            start = end
        self.shape = (kv, pool.head_dim)
        # the CPU kernel's places per row: offset of head 0, stride between heads, positions after the write
        self.meta = torch.tensor(meta, dtype=torch.int64) if device.type == "cpu" else None
        self._kernel: bool | None = None  # whether the CPU kernel runs this step (known at the first layer)
        self.segments = segs  # one strided view each
        self._places = (base, step, device)  # the operators' path builds its tensors from these, once
        self._spans: list | None = None
        self._bias: dict[int, list[torch.Tensor]] = {}

    def _operators_path(self) -> None:
        """The tensors the PyTorch-operators path needs (not built when the CPU kernel runs)."""
        base, step, device = self._places
        self._spans = []
        for seg in self.segments:
            lens = torch.tensor(seg.lengths, device=device)
            span = int(lens.max()) + 1
            bias = torch.zeros(len(seg.lengths), span, device=device)
            bias.masked_fill_(torch.arange(span, device=device)[None, :] > lens[:, None], float("-inf"))
            self._spans.append((seg, span, bias))
        heads = torch.arange(self.shape[0], device=device)[None, :]
        self.flat = (torch.tensor(base, device=device)[:, None]
                     + heads * torch.tensor(step, device=device)[:, None]).flatten()  # [B * H_kv]

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Write each row's key/value ``k``/``v`` [B, H_kv, 1, hd] and attend its query ``q`` [B, H, 1, hd]."""
        pk, pv = self.pool.k[i], self.pool.v[i]
        kv, hd = self.shape
        if self._kernel is None:  # the same for every layer of the step
            self._kernel = self.meta is not None and decode_kernel.available(pk.device, pk.dtype, hd, q.shape[1] // kv)
        if self._kernel:
            return decode_kernel.attend(q, k, v, pk, pv, self.meta, scale)
        if self._spans is None:
            self._operators_path()
        pk.view(-1, hd).index_copy_(0, self.flat, k.reshape(-1, hd).to(pk.dtype))
        pv.view(-1, hd).index_copy_(0, self.flat, v.reshape(-1, hd).to(pv.dtype))
        G = q.shape[1] // kv
        if G not in self._bias:  # [n * H_kv, G, span] per segment, once per step
            self._bias[G] = [b[:, None, None, :].expand(-1, kv, G, -1).reshape(-1, G, span)
                             for _, span, b in self._spans]
        outs = []
        for (seg, span, _), bias in zip(self._spans, self._bias[G]):
            n = seg.rows.stop - seg.rows.start
            size = n * kv * seg.cap * hd  # (the segment's first n slots: its decoding rows)
            K = pk[seg.first:seg.last + 1].view(-1)[:size].view(n, kv, seg.cap, hd)[:, :, :span]
            V = pv[seg.first:seg.last + 1].view(-1)[:size].view(n, kv, seg.cap, hd)[:, :, :span]
            outs.append(one_query_attention_bias(q if len(self.segments) == 1 else q[seg.rows], K, V, bias, scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
