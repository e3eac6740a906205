"""One constellation over the sources of several catalogs, for decode steps while a catalog change
is in flight: rows planned on the old catalog and rows planned on the new one run in one batch.

``Union(catalogs)`` holds every catalog's specialists side by side (sources ``[G, catalog 0's...,
catalog 1's..., ...]``; a specialist in two catalogs is held twice, while the change lasts) over
the union of their composed blocks. ``Union.weights(w, k)`` re-expresses a row's source weights
planned on catalog ``k`` in the union's sources: its specialists' columns at their offset, zeros
for the others, and G alone in blocks the union composes and catalog ``k`` did not (catalog ``k``
ran G there). Exact: in a block catalog ``k`` does not vary, its specialists equal G, and every
mode's weights sum to 1.
"""

from __future__ import annotations

import torch

from .constellation import Constellation


class Union:
    def __init__(self, catalogs: list[Constellation]):
        g = catalogs[0].g
        if any(c.g is not g for c in catalogs):
            raise ValueError("a union of catalogs needs one generalist")
        self.catalogs = catalogs
        specialists, differences, self.offsets = {}, {}, []
        for k, c in enumerate(catalogs):
            self.offsets.append(len(specialists))
            for name, s in zip(c.domains, c.specialists):
                specialists[f"{name}#{k}"] = s
                differences[f"{name}#{k}"] = c.differences[name]
        settings = catalogs[-1].settings
        if any(c.settings.layers != settings.layers for c in catalogs):
            settings = type(settings)(**{**vars(settings), "layers": "auto"})
        self.c = Constellation(g, specialists, torch.zeros(len(specialists), g.mc.d), settings, differences,
                               share_factors=False)
        if any(not set(c.varied) <= set(self.c.varied) for c in catalogs):
            raise ValueError("the union does not compose every block its catalogs do")

    def weights(self, w: torch.Tensor, k: int) -> torch.Tensor:
        """Catalog ``k``'s row weights ``[1 + N_k, d]`` or ``[n - first_k, 1 + N_k, d]`` in the
        union's sources, per union block: ``[n - first, 1 + N, d]``."""
        c, u = self.catalogs[k], self.c
        blocks, S = u.n - u.first, 1 + len(u.domains)
        out = torch.zeros(blocks, S, w.shape[-1], dtype=w.dtype)
        lo, hi = 1 + self.offsets[k], 1 + self.offsets[k] + len(c.domains)
        for b in range(u.first, u.n):
            if b < c.first:
                out[b - u.first, 0] = 1.0  # catalog k ran G in this block
                continue
            src = w if w.dim() == 2 else w[b - c.first]
            out[b - u.first, 0] = src[0]
            out[b - u.first, lo:hi] = src[1:]
        return out
