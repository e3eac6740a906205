"""A prompt's prefill as the scheduler and the runner see it: a ``PrefillJob`` (its rows, where its
phases stand) and the cost of a composed-tail token until the runner has measured one."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from composer.constellation import Constellation, GeneralistPass
from .types import Request, Row, Sequence, SignatureWork


@dataclass(eq=False)
class PrefillJob:
    request: Request
    rows: list[Row]  # staged slots: components x choices (row 0 receives the generalist pass)
    c: Constellation  # the catalog it runs on
    ids_list: list[int]  # prompt tokens (a resumed sequence: prompt + generated but the last)
    resume: Sequence | None = None
    mode: object = None  # composer.modes.Mode, set by ``ModelRunner.init``
    ids: torch.Tensor | None = None  # [T]
    fmask: torch.Tensor | None = None  # [T]: tokens the fingerprint averages over
    store: object = None  # where the generalist pass writes keys/values
    done: int = 0  # prompt tokens through the generalist pass
    trunk: list[torch.Tensor] = field(default_factory=list)  # [1, t, d] chunks entering the first composed block
    records: list[list] = field(default_factory=list)  # per chunk: in-pass signature record blocks
    fp_sum: torch.Tensor | None = None
    fp_n: float = 0.0
    last_hidden: torch.Tensor | None = None  # G's final-normed hidden state of the last prompt token
    seconds: float = 0.0  # time spent in the generalist pass
    gp: GeneralistPass | None = None  # once the whole prompt is through G
    sig: SignatureWork | None = None  # an in-pass signature being computed
    comps: list[tuple[float | None, torch.Tensor]] = field(default_factory=list)
    comp: int = 0  # component whose tail is running
    tail_done: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)  # last-token logits per component

    @property
    def T(self) -> int:
        return len(self.ids_list)

    @property
    def phase(self) -> str:
        if self.done < self.T:
            return "generalist"
        if self.sig is not None:
            return "signatures"
        return "tail" if self.comp < len(self.comps) else "done"

    @property
    def g_layers(self) -> int:
        """Layers the generalist pass runs: all (fingerprint, and G's own row), or only the trunk for a
        resumed sequence whose rows are all composed."""
        if self.resume is not None and not self.mode.generalist_only:
            return self.c.first
        return self.c.n

    @property
    def g_cost(self) -> float:
        """One prompt token through G in the budget's unit (a whole pass: 1)."""
        return self.g_layers / self.c.n if self.mode is not None else 1.0


def tail_fraction(c: Constellation) -> float:
    """The composed layers' share of G's layers: a composed-tail token's cost until measured."""
    return (c.n - c.first) / c.n
