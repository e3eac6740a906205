"""Slot key/value caches and the views the model code writes through.

``SlotCache`` holds ``[slots, H_kv, max_len, head_dim]`` per layer (``KVPool``'s slabs are
``SlotCache``s over its memory, ``kv_pool``). Rows that are decoding live in slots ``0..decoding-1``
(compact, so a decode step reads a view, never a copy); rows still being prefilled are *staged* at
the top, ``slots-staged..slots-1``. Freeing a slot moves the region's outermost row into the hole;
a staged row is promoted into the decode region when its prefill ends. Every slot has an owner (a
``Row``: ``.slot``, ``.length``) whose ``slot`` the cache keeps up to date when it moves.
"""

from __future__ import annotations

import torch


class SlotCache:
    def __init__(self, n_layers: int, slots: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        shape = (slots, n_kv, max_len, head_dim)
        # zeros, not empty: a decode step reads every row up to the longest row's length, and masked
        # positions still meet the values (0 * NaN from uninitialised memory would be NaN)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.slots = slots
        self.decoding = 0
        self.staged = 0
        self.owners: dict[int, object] = {}

    @property
    def used(self) -> int:
        return self.decoding + self.staged

    @property
    def free(self) -> int:
        return self.slots - self.used

    @classmethod
    def over(cls, k: list[torch.Tensor], v: list[torch.Tensor]) -> "SlotCache":
        """A cache on existing per-layer tensors ``[slots, H_kv, max_len, head_dim]`` (a pool's slab)."""
        self = cls.__new__(cls)
        self.k, self.v, self.slots = k, v, k[0].shape[0]
        self.decoding = self.staged = 0
        self.owners = {}
        return self

    def kv(self, i: int, owner) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i][owner.slot], self.v[i][owner.slot]

    def copy(self, src: int, dst: int, length: int, layers: range | None = None) -> None:
        for i in layers if layers is not None else range(len(self.k)):
            self.k[i][dst, :, :length] = self.k[i][src, :, :length]
            self.v[i][dst, :, :length] = self.v[i][src, :, :length]

    def _place(self, owner, slot: int) -> None:
        self.owners[slot] = owner
        owner.slot = slot

    def _move(self, src: int, dst: int) -> None:
        owner = self.owners.pop(src)
        self.copy(src, dst, owner.length)
        self._place(owner, dst)

    def stage(self, owner) -> int:
        """A slot at the top for a row being prefilled."""
        if self.free <= 0:
            raise RuntimeError("no free KV slot")
        self.staged += 1
        self._place(owner, self.slots - self.staged)
        return owner.slot

    def release(self, owner) -> None:
        """Free ``owner``'s slot; the region's outermost row moves into the hole."""
        slot = owner.slot
        del self.owners[slot]
        if slot < self.decoding:
            last = self.decoding - 1
            if slot != last:
                self._move(last, slot)
            self.decoding -= 1
        else:
            low = self.slots - self.staged
            if slot != low:
                self._move(low, slot)
            self.staged -= 1

    def release_all(self, owners) -> None:
        """Free several rows, each region's outermost first (so no row is moved only to be freed)."""
        for o in sorted(owners, key=lambda o: -o.slot if o.slot < self.decoding else o.slot):
            self.release(o)

    def promote(self, owner) -> None:
        """Move a staged row (``owner.length`` tokens) into the decode region."""
        low = self.slots - self.staged
        if owner.slot != low:  # bring it to the staged region's edge first (swap with that row)
            other = self.owners[low]
            a, b = owner.slot, low
            n = max(owner.length, other.length)
            for i in range(len(self.k)):
                for t in (self.k[i], self.v[i]):
                    tmp = t[a, :, :n].clone()
                    t[a, :, :n] = t[b, :, :n]
                    t[b, :, :n] = tmp
            self._place(other, a)
            self._place(owner, b)
        del self.owners[low]
        self.staged -= 1
        dst = self.decoding
        if dst != low:
            self.copy(low, dst, owner.length)
        self.decoding += 1
        self._place(owner, dst)


class DecodeView:
    """Decode step: row b (slot b) writes its one new key/value at position ``lengths[b]``."""

    def __init__(self, cache: SlotCache, lengths: torch.Tensor, span: int):
        self.cache, self.lengths, self.span = cache, lengths, span
        self.rows = torch.arange(lengths.shape[0], device=lengths.device)

    def update(self, i, k, v):
        B = k.shape[0]
        self.cache.k[i][self.rows, :, self.lengths] = k[:, :, 0].to(self.cache.k[i].dtype)  # (index_put: no cast)
        self.cache.v[i][self.rows, :, self.lengths] = v[:, :, 0].to(self.cache.v[i].dtype)
        return self.cache.k[i][:B, :, : self.span], self.cache.v[i][:B, :, : self.span]


class PrefillView:
    """A whole prompt of one row into one slot (positions 0..T-1)."""

    def __init__(self, cache: SlotCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, i, k, v):
        T = k.shape[2]
        self.cache.k[i][self.slot, :, :T] = k[0].to(self.cache.k[i].dtype)
        self.cache.v[i][self.slot, :, :T] = v[0].to(self.cache.v[i].dtype)
        return k, v


class SlotStore:
    """Per-layer key/value storage of one row: its slot's (read through the owner, which may move)."""

    def __init__(self, cache, owner):
        self.cache, self.owner = cache, owner

    def kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.kv(i, self.owner)


class ScratchStore:
    """Layers ``layers`` in private tensors of ``length`` positions, the others in ``inner``: the
    generalist's own keys/values of blocks whose slot entries will hold the composed model's."""

    def __init__(self, inner, layers: range, n_kv: int, length: int, head_dim: int, dtype, device):
        self.inner = inner
        shape = (n_kv, length, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}

    def kv(self, i: int):
        return (self.k[i], self.v[i]) if i in self.k else self.inner.kv(i)


PAD_WASTE = 0.2  # a prefill batch may compute up to this share more than its tokens in padding,
PAD_FLOOR = 32  # or this many positions (below it, another pass through the weights costs more)


def padded_groups(batch: list[tuple[object, int]], waste: float = PAD_WASTE,
                  floor: int = PAD_FLOOR) -> list[list[tuple[object, int]]]:
    """``(job, tokens)`` pairs split into batches for ``ChunkView``: a batch pads every prompt to
    its longest, so prompts of like lengths go together (shortest first), a new batch starting where
    the padding would exceed both ``waste`` of the tokens and ``floor`` positions. (A burst of 15
    prompts of 12-30 tokens: 450 padded positions in one batch, 292 in three.)"""
    groups: list[list[tuple[object, int]]] = []
    cur: list[tuple[object, int]] = []
    for job, n in sorted(batch, key=lambda b: b[1]):
        tokens = sum(m for _, m in cur) + n
        if cur and n * (len(cur) + 1) - tokens > max(waste * tokens, floor):
            groups.append(cur)
            cur = []
        cur.append((job, n))
    return groups + [cur] if cur else groups


class ChunkView:
    """A prefill chunk of several rows: row b's ``lens[b]`` new tokens go to positions
    ``starts[b]..starts[b]+lens[b]-1`` of its store; attention reads positions ``0..span-1``."""

    def __init__(self, stores: list, starts: list[int], lens: list[int]):
        self.stores, self.starts, self.lens = stores, starts, lens
        self.span = max(s + n for s, n in zip(starts, lens))

    def update(self, i, k, v):
        ks, vs = [], []
        for b, store in enumerate(self.stores):
            K, V = store.kv(i)
            s, n = self.starts[b], self.lens[b]
            K[:, s:s + n] = k[b, :, :n]
            V[:, s:s + n] = v[b, :, :n]
            ks.append(K)
            vs.append(V)
        if len(ks) == 1:
            return ks[0][None, :, : self.span], vs[0][None, :, : self.span]
        return _gather(ks, self.span, k), _gather(vs, self.span, v)

    def context(self, g, device):
        """Positions and mask for this chunk (padded queries see position 0 only)."""
        T = max(self.lens)
        starts = torch.tensor(self.starts, device=device)[:, None]
        lens = torch.tensor(self.lens, device=device)[:, None]
        t = torch.arange(T, device=device)[None, :]
        positions = (starts + t).clamp(max=g.mc.max_positions - 1)
        j = torch.arange(self.span, device=device)[None, None, :]
        real = (t < lens)[:, :, None]
        mask = ((j <= (starts + t)[:, :, None]) & real) | ((j == 0) & ~real)
        return g.positional_context(positions, mask[:, None], self)


def _gather(stores: list[torch.Tensor], span: int, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros((len(stores), like.shape[1], span, like.shape[3]), dtype=like.dtype, device=like.device)
    for b, t in enumerate(stores):
        n = min(span, t.shape[1])
        out[b, :, :n] = t[:, :n]
    return out
