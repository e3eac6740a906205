"""Low-rank sources: a specialist tensor held as ``W_G + B @ A`` (a LoRA adapter), DESIGN §4.1.

Factors are kept in torch's ``[out, in]`` convention whatever the checkpoint's storage layout
(GPT-2's Conv1D stores ``[in, out]``): ``A`` is ``[r, in]``, ``B`` is ``[out, r]`` with the adapter's
scaling (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA) already folded into ``B``. So the
delta applied to an input ``x [..., in]`` is always ``(x @ A.T) @ B.T``.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def delta(self, layout: str = "linear") -> torch.Tensor:
        """The dense update in the storage layout of the weight it updates (``linear``: [out, in])."""
        d = self.B.float() @ self.A.float()
        return (d.T if layout == "conv1d" else d).to(self.B.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``B (A x)`` for ``x [..., in]``."""
        return (x @ self.A.T) @ self.B.T

    def to(self, device=None, dtype=None) -> "LowRank":
        return LowRank(self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype))


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
    for lr, w in terms:
        w = w.to(lr.A.dtype)
        if how == "in":
            As.append(lr.A * w[None, :])
            Bs.append(lr.B)
        elif how == "out":
            As.append(lr.A)
            Bs.append(lr.B * w[:, None])
        else:
            As.append(lr.A)
            Bs.append(lr.B * w.mean())
    return LowRank(torch.cat(As, 0), torch.cat(Bs, 1))


def mixed_delta(x: torch.Tensor, st: Stack, weights: torch.Tensor, active: torch.Tensor, how: str
                ) -> torch.Tensor | None:
    """``sum_s f(w_bs) ⊙ B_s A_s`` applied to each row ``b`` of ``x [B, T, in]`` with its own weights.

    ``weights`` ``[B, S, d]`` are the rows' source weights, ``active`` a bool ``[S]`` of the sources any
    row uses. One shrink and one expand over the active adapters: when fewer than half of the
    stacked adapters are active their factors are gathered by index, otherwise the whole stack runs
    (inactive ones have weight 0 in every row).
    """
    use = active[st.sources]
    n_use = int(use.sum())
    if n_use == 0:
        return None
    A, Bt, src = st.A, st.Bt, st.sources
    if 2 * n_use < src.shape[0]:
        sel = torch.nonzero(use).flatten()
        A, Bt, src = A.index_select(0, sel), Bt.index_select(0, sel), src.index_select(0, sel)
    U, r, n_in = A.shape
    n_out = Bt.shape[2]
    Bsz, T, _ = x.shape
    wu = weights.index_select(1, src).to(x.dtype)  # [B, U, d]
    x2 = x.reshape(Bsz * T, n_in)
    if how == "in":
        xw = (x.unsqueeze(1) * wu[:, :, None, :]).transpose(0, 1).reshape(U, Bsz * T, n_in)
        z = torch.bmm(xw, A.transpose(1, 2))  # [U, BT, r]
        y = z.transpose(0, 1).reshape(Bsz * T, U * r) @ Bt.reshape(U * r, n_out)
    elif how == "out":
        z = (x2 @ A.reshape(U * r, n_in).T).view(Bsz * T, U, r).transpose(0, 1)  # [U, BT, r]
        y = torch.bmm(z, Bt).view(U, Bsz, T, n_out)
        y = (y * wu.transpose(0, 1)[:, :, None, :]).sum(0).reshape(Bsz * T, n_out)
    else:  # one scalar per row and adapter
        z = (x2 @ A.reshape(U * r, n_in).T).view(Bsz, T, U, r) * wu.mean(-1)[:, None, :, None]
        y = z.reshape(Bsz * T, U * r) @ Bt.reshape(U * r, n_out)
    return y.view(Bsz, T, n_out)
