"""What the engine's parts pass between them: limits, sampling parameters, requests, events, rows."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from composer.modes import CompositionParams, Plan


@dataclass(frozen=True)
class Limits:
    max_running: int = 16  # batch rows decoded together (a logit-mode sequence takes 1 + K)
    max_waiting: int = 64  # queued requests; beyond that: 429
    max_prompt_tokens: int = 1536
    max_new_tokens: int = 1024  # cap on max_tokens
    max_seq_len: int = 2048  # prompt + generated, per sequence (the KV cache's length)
    max_body_bytes: int = 1 << 20
    drain_timeout_s: float = 120.0
    keepalive_s: float = 10.0
    # prefill: tokens per prefill step. While sequences are decoding, a step's prefill is sized to
    # take about as long as a decode step (measured), between the two bounds; alone it takes the max.
    prefill_chunk_max: int = 512
    prefill_chunk_min: int = 32


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: chosen token + top-k alternatives
    # OpenAI's penalties over the tokens generated so far, and additive biases by token id
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def adjusts_scores(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


@dataclass
class Event:
    """What the engine reports about one choice (sequence) of a request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # one per token: token, logprob, top
    finish_reason: str | None = None
    error: str | None = None
    cumulative_logprob: float | None = None  # on the finishing event: the sum over the choice's tokens


class NeedSignature(Exception):
    """Raised into planning when the mode asks for specialist ``k``'s in-pass signature."""

    def __init__(self, k: int):
        super().__init__(k)
        self.k = k


class PendingSignatures:
    """A generalist pass's record while its signatures are computed chunk by chunk: the ones done
    are in the pass's ``_signatures``; asking for another one raises ``NeedSignature``."""

    def specialist(self, k: int):
        raise NeedSignature(k)


@dataclass
class SignatureWork:
    """Specialist ``k``'s signature sums so far: record chunks ``< chunk`` (prompt tokens ``< pos``)."""

    k: int
    chunk: int = 0
    pos: int = 0
    total: torch.Tensor | None = None
    count: torch.Tensor | None = None


@dataclass(frozen=True)
class PlanSummary:
    """What the web side reports of a plan, as plain Python: the serving code never touches a tensor
    (torch ops on a second thread start a second OpenMP team, which slows every engine step)."""

    mode: str
    selected: list[int]
    alpha: list[float]
    mean_entropy_bits: float
    domains: list[str]  # of the catalog the plan was made on (``selected`` indexes it)
    weighting: dict | None = None  # constellation/paper: {"weighting", "sharpness", "strength"} used

    @classmethod
    def of(cls, plan: Plan, domains: list[str]) -> "PlanSummary":
        w = {k: plan.extra[k] for k in ("weighting", "sharpness", "strength") if k in plan.extra} or None
        return cls(plan.mode, [int(i) for i in plan.selected], [float(a) for a in plan.alpha.tolist()],
                   plan.mean_entropy_bits, list(domains), w)


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    composition: CompositionParams
    n: int = 1
    fingerprint_mask: list[int] | None = None  # chat: the message-content tokens (None: all)
    emit: Callable[[Event], None] = lambda e: None  # thread-safe sink (set by the server)
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled by the engine
    plan: Plan | None = None
    summary: PlanSummary | None = None  # of ``plan``, set with it
    started: float | None = None


@dataclass
class Row:
    """One KV-cache slot and the source weights its composed blocks use."""

    slot: int
    weights: torch.Tensor | None  # [1 + N, d], or per composed block [Lc, 1 + N, d]; None until planned
    length: int  # tokens in the cache
    beta: float | None = None  # logit mode: component weight (None: the generalist term)


@dataclass
class Sequence:
    request: Request
    index: int
    rows: list[Row]
    logit_mode: bool
    generator: torch.Generator | None
    eos: set[int]
    detok: object  # detokenizer.Detokenizer
    tokens: list[int] = field(default_factory=list)
    last_token_at: float = 0.0
    finished: bool = False
    cumulative_logprob: float = 0.0  # of the tokens generated (the model's log-probabilities, as reported)
    catalog: object = None  # the Constellation its rows' weights were planned on (it decodes on it)
