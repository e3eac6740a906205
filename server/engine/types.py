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
