"""Every row's adapter products against the whole catalog's stacks, inside a captured decode step.

Between the buckets that fold each row's adapters (``composer.folded``: a row reads its own ``top_k``
adapters) and the opaque operator (``composer.batch``: per adapter in use, its rows gathered, two
batched products, the rows put back, ~10 eager operations per adapted linear whatever the sizes),
a small catalog has a third way: every row multiplies by *every* adapter of the weight's stack, at
weight zero where it does not compose it. The stacks are the graph's constants, the rows' weights
per stack entry an input ``[B, U, d]``, and a linear's update two reductions over a contiguous
dimension that the compiler fuses with the rest of the step. The step then reads each adapter of the catalog once, whatever
the rows compose: worth it while the stacks are a small share of the generalist's bytes
(``server/engine/graphs.py``'s ``STACK_SHARE``), which a catalog of few specialists is.
"""

from __future__ import annotations

import torch


def stacked_product(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, W: torch.Tensor,
                    side: str) -> torch.Tensor:
    """``y + sum_u f(W[:, u]) ⊙ B_u A_u x`` for every row, in the stacks' dtype (fp32 copies on a
    CPU), rounded once to ``y``'s: ``x [B, T, in]``, ``A [U, r, in]``, ``Bm [out, U, r]``, ``W [B, U, d]``
    (``side`` ``in``: ``x`` scaled per channel before ``A``; ``out``: the update scaled after ``B``;
    ``mean``: the update scaled by the weights' mean). Both products are reductions over a contiguous
    last dimension, which the compiler fuses (no GEMM to tune for these small shapes)."""
    n_out, U, r = Bm.shape
    xf, W = x.to(A.dtype), W.to(A.dtype)
    if side == "in":
        xs = xf[:, :, None, :] * W[:, None]  # [B, T, U, in]
        h = (xs[:, :, :, None, :] * A).sum(-1)  # [B, T, U, r]
    else:
        h = (xf[:, :, None, None, :] * A).sum(-1)
        if side == "mean":
            h = h * W.mean(-1)[:, None, :, None]
    if side == "out":  # [B, T, out, U]: each adapter's update, then weighted per channel
        d = ((h[:, :, None] * Bm).sum(-1) * W.transpose(1, 2)[:, None]).sum(-1)
    else:
        d = (h.flatten(2)[:, :, None, :] * Bm.view(n_out, U * r)).sum(-1)
    return (y.to(d.dtype) + d).to(y.dtype)


class StackLayout:
    """The stacked products' inputs: per composed block and pair ordering (which source owns which
    stack entry) one weight tensor ``[B, U, d]``, shared by the block's weights of that ordering."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.keys: list[tuple[int, int]] = []  # (block, pair ordering), the inputs' order
        self.stacks: dict[tuple[int, str], object] = {}  # (block, tensor name) -> its Stack
        for i in sorted(kernel.blocks):
            for name, term in sorted(kernel.blocks[i].items()):
                if term.stack is None:
                    continue
                self.stacks[(i, name)] = term.stack
                if (i, term.pairs) not in self.keys:
                    self.keys.append((i, term.pairs))
        self.index = {key: n for n, key in enumerate(self.keys)}

    @staticmethod
    def of(kernel) -> "StackLayout | None":
        """The layout, or None when no composed block has adapters."""
        layout = StackLayout(kernel)
        return layout if layout.keys else None

    @property
    def nbytes(self) -> int:
        """Bytes the stacked products read a step: every adapter's factors in the products' dtype."""
        return sum(t.numel() * t.element_size() for st in self.stacks.values() for t in st.products(st.sources))

    def factors(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(block, name) -> ``(A [U, r, in], Bm [out, U, r])`` in the products' dtype, as
        ``stacked_product`` takes them (``Bm`` a copy laid out for its reduction)."""
        out = {}
        for key, st in self.stacks.items():
            A, Bt = st.products(st.sources)
            out[key] = (A, Bt.permute(2, 0, 1).contiguous())
        return out

    def zeros(self, B: int) -> list[torch.Tensor]:
        """The inputs for ``B`` rows composing nothing."""
        k, d = self.kernel, self.kernel.c.d
        dev = k.c.g.device
        return [torch.zeros(B, k.entry_maps[p][1], d, dtype=torch.float32, device=dev) for _, p in self.keys]

    def build(self, batch, B: int) -> list[torch.Tensor]:
        """The inputs for ``batch`` (a ``BatchComposition`` of at most ``B`` rows): per row and stack
        entry the weight of the row's source that owns it (0 where none does, and on padding rows)."""
        out = self.zeros(B)
        R, K = batch.src.shape
        if K == 0:
            return out
        for W, (i, p) in zip(out, self.keys):
            e = self.kernel.entry_maps[p][0][batch.src]  # [R, K]: stack entry per (row, source), -1 none
            wk = batch.block_weights(i)[:, 1:] * (e >= 0)[..., None]  # [R, K, d]
            W[:R].scatter_add_(1, e.clamp(min=0)[..., None].expand(R, K, W.shape[-1]), wk)
        return out

    def per_block(self, inputs: list[torch.Tensor], consts: dict) -> dict[int, dict[str, tuple]]:
        """Block -> tensor name -> ``(A, Bm, W, side)`` for ``stacked_product``; ``consts``:
        (block, name) -> the graph's ``(A, Bm)`` (``factors``)."""
        out: dict[int, dict[str, tuple]] = {}
        for (i, name), st in self.stacks.items():
            term = self.kernel.blocks[i][name]
            A, Bm = consts[(i, name)]
            out.setdefault(i, {})[name] = (A, Bm, inputs[self.index[(i, term.pairs)]], term.side)
        return out
