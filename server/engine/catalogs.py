"""Catalog swaps: a new set of specialists served from one step to the next (docs/catalog.md).

``Engine.swap`` hands over the new catalog (a ``SwapCatalog`` input); the loop installs it between
two steps once no prompt is being prefilled (admission pauses only that long). Sequences already
decoding keep the catalog they were planned on to their last token: while sequences of several
catalogs decode, each step runs them in one batch through a ``composer.union.Union`` of those
catalogs, their row weights re-expressed in its sources (exact).
"""

from __future__ import annotations

from composer.batch import RowWeights
from composer.constellation import Constellation
from composer.union import Union
from . import heap
from .types import Row, Sequence, SwapCatalog


class CatalogSwitch:
    """The part of ``Engine`` that swaps catalogs (it owns ``c``, ``scheduler``, ``pending``...)."""

    def swap(self, constellation: Constellation, timeout: float | None = None) -> bool:
        """Serve ``constellation`` (a new catalog on the same generalist) from now on, swapped in
        between two steps once the prompts being prefilled are in (admission pauses that long).
        Sequences already decoding finish on the catalog they started with, to the last token: while
        they run, decode steps batch them with the new catalog's through a union of both
        (``composer.union``). Blocks until swapped (False on timeout: it still happens)."""
        if constellation.g is not self.g:
            raise ValueError("a catalog swap keeps the generalist; this constellation has another one")
        item = SwapCatalog(constellation)
        self._put(item)
        return item.done.wait(timeout)

    def _swap_if_quiet(self) -> bool:
        """Install the pending catalog once no prompt is being prefilled (the decoding sequences keep
        theirs); True while one waits."""
        if self.pending is None:
            return False
        if self.scheduler.prefilling:
            self._waited += 1
            return True
        item = self.pending
        self.swap_waits.append(self._waited)
        self._waited = 0
        self.c, self.pending = item.constellation, None
        item.done.set()
        if self.runner.graphs is not None:  # the new catalog's graphs, once (its steps run eagerly till then)
            self.runner.graphs.build(self.c)  # (which settles the heap once built, if asked)
        elif self.settle_heap:  # the catalog before last, frozen by the last settle, is collectable again
            heap.settle("catalog changed")
        return False

    def _decoder(self, seqs: list[Sequence], rows: list[Row]) -> tuple[Constellation, list[RowWeights]]:
        """The catalog a decode step over ``rows`` runs on and the rows' compositions in its sources:
        the rows' own catalog, or a union of the catalogs in use."""
        in_use = list({id(s.catalog): s.catalog for s in seqs}.values())
        if len(in_use) == 1:
            if self._union is not None:
                self._union = None  # one catalog again
            return in_use[0], [r.comp for r in rows]
        self.union_steps += 1
        key = tuple(sorted(id(c) for c in in_use))
        if self._union is None or self._union[0] != key:
            union = Union(sorted(in_use, key=lambda c: c is self.c))  # the current catalog last
            self._union = (key, union, {})
        _, union, mapped = self._union
        owner = {id(r): s for s in seqs for r in s.rows}
        index = {id(c): k for k, c in enumerate(union.catalogs)}
        weights = []
        for r in rows:
            got = mapped.get(id(r.weights))
            if got is None or got[0] is not r.weights:
                got = mapped[id(r.weights)] = (r.weights, RowWeights.of(
                    union.weights(r.weights, index[id(owner[id(r)].catalog)])))
            weights.append(got[1])
        return union.c, weights
