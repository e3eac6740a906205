"""A few rows' adapters folded per row, as inputs of fixed shape to a captured decode step.

The batched adapter products (``composer.batch``: per adapter in use, its rows gathered, two batched
products, the rows scattered back) are one opaque operator per adapted linear inside a captured
graph: their shapes depend on which adapters the rows use. At one row that bookkeeping, ~10 eager
operations per linear, costs more than the products themselves (210 operators per step with
adapters on the 7 linears of 30 layers: ~21 ms, against ~1 ms to read the factors).

For a bucket of few rows, each row's adapters are instead folded into one plain adapter per weight
(``lowrank.fold``: ``A_s diag(w_s)`` on the input side, ``diag(w_s) B_s`` on the output side), at
most ``k`` adapters of rank ``r`` each, zero-padded to rank ``k·r``: a tensor per weight role of
``[blocks, B, k·r, in]`` and ``[blocks, B, out, k·r]``, built once when the batch's rows change.
Inside the graph a linear's update is then two reductions over contiguous dimensions
(``folded_product``), fused by the compiler with the rest of the step. A row reads its own folded
factors, so B rows read B·k adapters where the batched products read each adapter in use once:
worth it for few rows only (``DecodeGraphs``' ``fold_rows``, by default chosen from ``row_bytes``).
"""

from __future__ import annotations

import torch


def folded_product(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor) -> torch.Tensor:
    """``y + (x A^T) Bm^T`` per row, in fp32, rounded once to ``y``'s dtype: ``x [B, T, in]``,
    ``A [B, R, in]``, ``Bm [B, out, R]`` (both reductions over a contiguous last dimension)."""
    h = (x.float()[:, :, None, :] * A.float()[:, None]).sum(-1)  # [B, T, R]
    d = (h[:, :, None, :] * Bm.float()[:, None]).sum(-1)  # [B, T, out]
    return (y.float() + d).to(y.dtype)


class FoldLayout:
    """Where a catalog's adapted weights sit among the folded inputs: per weight role (a block's
    tensor name) one pair of inputs, a slot per composed block that has adapters for it; ``k`` the
    adapters a row may fold (rows composing more sources run another graph)."""

    def __init__(self, kernel, k: int):
        self.kernel, self.k = kernel, int(k)
        per: dict[str, list[int]] = {}
        for i in sorted(kernel.blocks):
            for name, term in kernel.blocks[i].items():
                if term.stack is not None:
                    per.setdefault(name, []).append(i)
        self.names = sorted(per)
        self.slots: dict[tuple[int, str], tuple[int, int]] = {}  # (block, name) -> (input pair, slot)
        self.specs: list[tuple[int, int, int, int, torch.dtype, torch.device]] = []  # (slots, R, in, out, ...)
        for n, name in enumerate(self.names):
            stacks = [kernel.blocks[i][name].stack for i in per[name]]
            r = max(int(st.A.shape[1]) for st in stacks)
            A0, B0 = stacks[0].A, stacks[0].Bt
            self.specs.append((len(stacks), self.k * r, int(A0.shape[2]), int(B0.shape[2]), A0.dtype, A0.device))
            for j, i in enumerate(per[name]):
                self.slots[(i, name)] = (n, j)

    @staticmethod
    def of(kernel, k: int) -> "FoldLayout | None":
        """The layout, or None when no composed block has adapters, or when one weight role's stacks
        differ in shape or dtype between blocks (they could not share an input)."""
        layout = FoldLayout(kernel, k)
        for (i, name), (n, _) in layout.slots.items():
            st, (_, _, n_in, n_out, dt, _) = kernel.blocks[i][name].stack, layout.specs[n]
            if (int(st.A.shape[2]), int(st.Bt.shape[2]), st.A.dtype) != (n_in, n_out, dt):
                return None
        return layout if layout.names else None

    @property
    def row_bytes(self) -> int:
        """Bytes of one row's folded inputs: what each row of a folding bucket reads per step, its
        adapters or zeros."""
        return sum(S * R * (n_in + n_out) * torch.empty((), dtype=dt).element_size()
                   for S, R, n_in, n_out, dt, _ in self.specs)

    def zeros(self, B: int) -> list[torch.Tensor]:
        """The inputs for ``B`` rows, all zero (every row folding nothing)."""
        out = []
        for S, R, n_in, n_out, dt, dev in self.specs:
            out += [torch.zeros(S, B, R, n_in, dtype=dt, device=dev), torch.zeros(S, B, n_out, R, dtype=dt, device=dev)]
        return out

    def foldable(self, k: int) -> bool:
        """Whether rows composing at most ``k`` sources each fit."""
        return k <= self.k

    def build(self, batch, B: int) -> list[torch.Tensor]:
        """The inputs for ``batch`` (a ``BatchComposition`` of at most ``B`` rows, each composing at most
        ``k`` sources): per row and adapted weight, its adapters scaled by its weights in fp32 and
        rounded once to the factors' dtype, zero-padded (rows and rank)."""
        R, K = batch.src.shape
        if not self.foldable(K):
            raise ValueError(f"rows composing {K} sources do not fold into {self.k} adapters")
        out = self.zeros(B)
        if K == 0:  # (rows of G's own weights alone)
            return out
        kernel = self.kernel
        entries = {}  # pair ordering -> stack entry per (row, source), -1: none
        weights = {}  # (block, ordering) -> [R, K, d], 0 where a source has no adapter
        for (i, name), (n, j) in self.slots.items():
            term = kernel.blocks[i][name]
            st = term.stack
            if term.pairs not in entries:
                e = kernel.entry_maps[term.pairs][0][batch.src]  # [R, K]
                entries[term.pairs] = (e >= 0, list(e.clamp(min=0)))
            mask, rows = entries[term.pairs]
            if (i, term.pairs) not in weights:
                weights[i, term.pairs] = batch.block_weights(i)[:, 1:] * mask[..., None]
            w = weights[i, term.pairs]
            r, n_out = int(st.A.shape[1]), int(st.Bt.shape[2])
            for b, e in enumerate(rows):  # (written in place: no temporaries)
                A = out[2 * n][j, b, :K * r].view(K, r, -1)
                torch.index_select(st.A, 0, e, out=A)
                Bm = out[2 * n + 1][j, b, :, :K * r]
                Bm.copy_(st.Bt.index_select(0, e).view(K * r, n_out).t())
                if term.side == "in":
                    A.mul_(w[b][:, None, :])
                elif term.side == "out":
                    Bm.view(n_out, K, r).mul_(w[b].t()[:, :, None])
                else:
                    Bm.view(n_out, K, r).mul_(w[b].mean(-1)[None, :, None])
        return out

    def per_block(self, inputs: list[torch.Tensor]) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Block -> tensor name -> its rows' folded ``(A [B, R, in], Bm [B, out, R])``."""
        out: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (i, name), (n, j) in self.slots.items():
            out.setdefault(i, {})[name] = (inputs[2 * n][j], inputs[2 * n + 1][j])
        return out
