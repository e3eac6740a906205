"""Low-rank sources: a specialist tensor held as ``W_G + B @ A`` (a LoRA adapter), DESIGN §4.1.

Factors are kept in torch's ``[out, in]`` convention whatever the checkpoint's storage layout
(GPT-2's Conv1D stores ``[in, out]``): ``A`` is ``[r, in]``, ``B`` is ``[out, r]`` with the adapter's
scaling (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA) already folded into ``B``. So the
delta applied to an input ``x [..., in]`` is always ``(x @ A.T) @ B.T``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LowRank:
    """``W_s - W_G = B @ A`` in ``[out, in]`` convention, scaling folded into ``B``."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]

    def __post_init__(self):
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"LowRank factors do not chain: A {tuple(self.A.shape)}, B {tuple(self.B.shape)}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def delta(self, layout: str = "linear", dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense update in the storage layout of the weight it updates (``linear``: [out, in]),
        computed in fp32 and returned in ``dtype`` (default: the factors')."""
        d = self.B.float() @ self.A.float()
        return (d.T if layout == "conv1d" else d).to(dtype or self.B.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``B (A x)`` for ``x [..., in]``."""
        return (x @ self.A.T) @ self.B.T


@dataclass(frozen=True)
class Stack:
    """The factors of every adapter that updates one weight of one block, stacked for batching.

    Adapter ``k`` (source ``sources[k]`` of the composition) owns ``A[k, :r_k]`` and ``Bt[k, :r_k]``;
    ranks below the widest are zero-padded, which adds nothing to any product. ``Bt`` is ``B``
    transposed, ``[Na, r, out]``, so ``Bt.reshape(Na * r, out)`` is one matrix for a single expand.
    """

    sources: torch.Tensor  # long [Na]: index of each stacked adapter among the composition's sources
    A: torch.Tensor  # [Na, r, in]
    Bt: torch.Tensor  # [Na, r, out]
    wide: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def widenable(self) -> bool:
        """Whether fp32 copies would speed the batched products: half-precision factors on a CPU,
        where PyTorch's bf16 ``bmm`` of these small batches costs ~4x its fp32 one (40-58 µs against
        9-10 at the demo's shapes, docs/benchmarks.md)."""
        return self.A.device.type == "cpu" and self.A.dtype in (torch.bfloat16, torch.float16)

    def widen(self) -> None:
        """Keep fp32 copies of the factors for the batched products (``products``), which then also
        keep the rank-r intermediate unrounded."""
        if self.wide is None and self.widenable:
            object.__setattr__(self, "wide", (self.A.float(), self.Bt.float()))

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole stack's ``A`` and ``Bt`` as the products take them: the fp32 copies where there are."""
        return self.wide if self.wide is not None else (self.A, self.Bt)

    def products(self, ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` and ``Bt`` of stack entries ``ks`` (ascending) as the batched products take them
        (``factors``); the whole stack, not gathered, when ``ks`` is every entry."""
        A, Bt = self.factors
        if ks.numel() == A.shape[0]:
            return A, Bt
        return A.index_select(0, ks), Bt.index_select(0, ks)

    @property
    def extra_bytes(self) -> int:
        """Bytes of the fp32 copies (0 without)."""
        return sum(t.numel() * t.element_size() for t in self.wide) if self.wide is not None else 0

    @staticmethod
    def build(entries: list[tuple[int, LowRank]]) -> "Stack":
        r = max(lr.rank for _, lr in entries)
        first = entries[0][1]
        A = first.A.new_zeros(len(entries), r, first.in_features)
        Bt = first.B.new_zeros(len(entries), r, first.out_features)
        for k, (_, lr) in enumerate(entries):
            A[k, : lr.rank] = lr.A
            Bt[k, : lr.rank] = lr.B.T
        src = torch.tensor([s for s, _ in entries], dtype=torch.long, device=first.A.device)
        return Stack(src, A, Bt)

    def view(self, k: int, rank: int) -> LowRank:
        """Adapter ``k``'s factors as views into the stack (no copy)."""
        return LowRank(self.A[k, :rank], self.Bt[k, :rank].T)


def fold(terms: list[tuple[LowRank, torch.Tensor]], how: str) -> LowRank | None:
    """One plain adapter of rank ``sum r_s`` for ``sum_s f(w_s) ⊙ (B_s A_s)`` (DESIGN §4.1).

    ``how`` is ``in`` (``A_s · diag(w_s)``), ``out`` (``diag(w_s) · B_s``) or ``mean`` (``mean(w_s) B_s``).
    """
    if not terms:
        return None
    As, Bs = [], []
    for lr, w in terms:  # scaled in fp32, rounded once to the factors' dtype
        dt = lr.A.dtype
        w = w.to(torch.promote_types(dt, torch.float32))
        if how == "in":
            As.append((lr.A * w[None, :]).to(dt))
            Bs.append(lr.B)
        elif how == "out":
            As.append(lr.A)
            Bs.append((lr.B * w[:, None]).to(dt))
        else:
            As.append(lr.A)
            Bs.append((lr.B * w.mean()).to(dt))
    return LowRank(torch.cat(As, 0), torch.cat(Bs, 1))


@dataclass(frozen=True)
class Segments:
    """Which batch rows use which stacked adapters of one weight: ``rows[u]`` are the rows using
    stack entry ``ks[u]``, padded with the out-of-range row ``B`` (a zero input whose output is dropped)."""

    ks: torch.Tensor  # long [U]: the stack entries some row uses
    rows: torch.Tensor  # long [U, m]
    batch: int

    @staticmethod
    def build(use: torch.Tensor) -> "Segments | None":
        """From ``use`` bool ``[B, Na]`` (row b composes stack entry k)."""
        B = use.shape[0]
        ks = torch.nonzero(use.any(0)).flatten()
        if ks.numel() == 0:
            return None
        sub = use[:, ks].T  # [U, B]
        counts = sub.sum(1)
        u_idx, b_idx = torch.nonzero(sub, as_tuple=True)  # sorted by entry, then row
        pos = torch.arange(u_idx.numel(), device=use.device) - (counts.cumsum(0) - counts)[u_idx]
        rows = torch.full((ks.numel(), int(counts.max())), B, dtype=torch.long, device=use.device)
        rows[u_idx, pos] = b_idx
        return Segments(ks, rows, B)


def segment_weights(weights: torch.Tensor, st: Stack, seg: Segments, how: str) -> torch.Tensor:
    """Each (adapter, row) pair's weight ``[U, m, 1, d]`` (``mean``: ``[U, m, 1, 1]``), zero on padding."""
    src = st.sources.index_select(0, seg.ks)  # [U]
    padded = torch.cat([weights, weights.new_zeros(1, *weights.shape[1:])])  # row B: zeros
    wp = padded[seg.rows, src[:, None]]  # [U, m, d]
    if how == "mean":
        wp = wp.mean(-1, keepdim=True)
    return wp[:, :, None, :]


def segmented_delta(x: torch.Tensor, st: Stack, seg: Segments, wp: torch.Tensor, how: str) -> torch.Tensor:
    """``sum_s f(w_bs) ⊙ B_s A_s x_b`` for every row ``b`` of ``x [B, T, in]``, each with its own adapters.

    Per adapter some row uses: gather those rows, one batched shrink and one batched expand over
    the used adapters (their factors gathered by index; the whole stack when all are used), then
    add each row's result back (SGMV-style, as vLLM's punica kernels; here with per-node weights).
    """
    B, T, n_in = x.shape
    U, m = seg.rows.shape
    A, Bt = st.products(seg.ks)
    n_out = Bt.shape[2]
    xg = torch.cat([x, x.new_zeros(1, T, n_in)])[seg.rows].to(A.dtype)  # [U, m, T, in]
    if how == "in":  # the weights multiply in fp32, rounded once to the products' dtype
        xg = (xg * wp).to(A.dtype)
    yp = torch.bmm(torch.bmm(xg.reshape(U, m * T, n_in), A.transpose(1, 2)), Bt).view(U, m, T, n_out)
    if how != "in":
        yp = (yp * wp).to(A.dtype)
    out = x.new_zeros(B + 1, T, n_out, dtype=A.dtype)  # (rows' adapters summed in the products' dtype)
    out.index_add_(0, seg.rows.flatten(), yp.reshape(U * m, T, n_out))
    return out[:B].to(x.dtype)
