"""Catalog swaps: a new set of specialists served from one step to the next (docs/catalog.md).

``Engine.swap`` hands over the new catalog; the loop installs it between two steps once no prompt
is being prefilled (admission pauses only that long). Sequences already decoding keep the catalog
they were planned on to their last token: while sequences of several catalogs decode, each step
runs them in one batch through a ``composer.union.Union`` of those catalogs, their row weights
re-expressed in its sources (exact). When an old catalog's last sequence ends, its runner goes.
"""

from __future__ import annotations

import threading

from composer.constellation import Constellation
from composer.union import Union
from .runner import ModelRunner
from .types import Row, Sequence


class CatalogSwitch:
    """The part of ``Engine`` that swaps catalogs (it owns ``c``, ``runner``, ``prefilling``...)."""

    def swap(self, constellation: Constellation, timeout: float | None = None) -> bool:
        """Serve ``constellation`` (a new catalog on the same generalist) from now on, swapped in
        between two steps once the prompts being prefilled are in (admission pauses that long).
        Sequences already decoding finish on the catalog they started with, to the last token: while
        they run, decode steps batch them with the new catalog's through a union of both
        (``composer.union``). Blocks until swapped (False on timeout: it still happens)."""
        if constellation.g is not self.g:
            raise ValueError("a catalog swap keeps the generalist; this constellation has another one")
        done = threading.Event()
        with self.scheduler.lock:
            self.pending = (constellation, done)
            self.scheduler.lock.notify()
        return done.wait(timeout)

    def _swap_if_quiet(self) -> bool:
        """Install the pending catalog once no prompt is being prefilled on the current one (the
        decoding sequences keep theirs); True while one waits."""
        if self.pending is None:
            return False
        if self.prefilling:
            self._waited += 1
            return True
        c, done = self.pending
        self.swap_waits.append(self._waited)
        self._waited = 0
        if any(s.catalog is self.c for s in self.running):  # its sequences still decoding keep it
            self.runners[id(self.c)] = self.runner
        self.c, self.pending = c, None
        self.runner = ModelRunner(c, self.cache, self.plan_for)
        done.set()
        return False

    def _decoder(self, seqs: list[Sequence], rows: list[Row]):
        """The runner for a decode step over ``rows`` and the rows' weights in its constellation:
        the current catalog's runner (or an old one's, alone), or a union of the catalogs in use."""
        in_use = list({id(s.catalog): s.catalog for s in seqs}.values())
        live = {id(c) for c in in_use}
        for key in [k for k in self.runners if k not in live]:  # an old catalog's last sequence is done
            del self.runners[key]
        if len(in_use) == 1:
            c = in_use[0]
            return (self.runner if c is self.c else self.runners[id(c)]), None
        key = tuple(sorted(live))
        if self._union is None or self._union[0] != key:
            union = Union(sorted(in_use, key=lambda c: c is self.c))  # the current catalog last
            self._union = (key, union, ModelRunner(union.c, self.cache, self.plan_for), {})
        _, union, runner, mapped = self._union
        owner = {id(r): s for s in seqs for r in s.rows}
        index = {id(c): k for k, c in enumerate(union.catalogs)}
        weights = []
        for r in rows:
            got = mapped.get(id(r.weights))
            if got is None or got[0] is not r.weights:
                got = mapped[id(r.weights)] = (r.weights, union.weights(r.weights, index[id(owner[id(r)].catalog)]))
            weights.append(got[1])
        return runner, weights

