"""What the engine's parts pass between them: limits, sampling parameters, requests, events, rows."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from composer.modes import CompositionParams, Plan


# the default KV cache's most memory, so that a model with a long context does not take a machine's
# memory by default (the demo: 16 sequences of 8192 positions in bfloat16, 2.8 GiB; 11 in float32, 3.9 GiB)
KV_BUDGET_BYTES = 4 << 30


@dataclass(frozen=True)
class Limits:
    """The server's limits. ``None`` in the three sizes below means "from the model", as vLLM does;
    ``fit`` fills them in when the engine starts (``constellation serve``'s banner prints them)."""

    max_running: int = 256  # batch rows decoded together (a logit-mode sequence takes 1 + K), vLLM's max_num_seqs
    max_waiting: int = 64  # queued requests; beyond that: 429
    # longest prompt; None: the longest that leaves room to generate (max_seq_len - 2: a sequence ends
    # one position short of max_seq_len)
    max_prompt_tokens: int | None = None
    max_new_tokens: int = 1024  # cap on max_tokens
    # prompt + generated, per sequence; None: the model's own context (max_position_embeddings), no
    # more than kv_cache_tokens when that is given (a longer sequence could never be admitted)
    max_seq_len: int | None = None
    max_prompts: int = 64  # prompts in one /v1/completions request (each queued as one request)
    max_choices: int = 128  # prompts x max(n, best_of): the sequences one request generates
    # key/value positions held for all rows together (the KV cache's memory); requests are admitted
    # while theirs fit. None: room for 16 sequences of max_seq_len, or as many whole ones as
    # KV_BUDGET_BYTES holds, and never less than one sequence
    kv_cache_tokens: int | None = None

    @property
    def kv_tokens(self) -> int:
        return self.kv_cache_tokens if self.kv_cache_tokens is not None else 16 * self.max_seq_len
    max_body_bytes: int = 1 << 20
    drain_timeout_s: float = 120.0
    keepalive_s: float = 10.0
    # prefill: tokens per prefill step. While sequences are decoding, a step's prefill is sized to
    # take about as long as a decode step (measured), between the two bounds; alone it takes the max.
    prefill_chunk_max: int = 512
    prefill_chunk_min: int = 32

    def fit(self, context: int, position_bytes: int) -> "Limits":
        """These limits with the defaults filled in for a model of ``context`` positions whose KV cache
        takes ``position_bytes`` a position (all layers, keys and values); given values are kept, but
        for a prompt limit beyond what the sequence length leaves room for."""
        seq = self.max_seq_len or min(context, self.kv_cache_tokens or context)
        kv = self.kv_cache_tokens or seq * max(1, min(16, KV_BUDGET_BYTES // (seq * max(position_bytes, 1))))
        prompt = min(self.max_prompt_tokens or seq, seq - 2)
        return replace(self, max_seq_len=seq, kv_cache_tokens=kv, max_prompt_tokens=max(prompt, 1))

    def for_model(self, g) -> "Limits":
        """``fit`` for a loaded generalist ``g`` (its context, and its KV bytes a position in its dtype)."""
        mc = g.mc
        return self.fit(mc.max_positions, mc.n_layers * 2 * mc.n_kv_heads * mc.head_dim * g.dtype.itemsize)


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: chosen token + top-k alternatives
    # OpenAI's penalties over the tokens generated so far, and additive biases by token id
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: object = None  # grammar.Grammar: the output is constrained to it (response_format, tools)

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
    """Raised into planning when the mode asks for specialists ``ks``' in-pass signatures."""

    def __init__(self, ks: list[int]):
        super().__init__(ks)
        self.ks = list(ks)


class PendingSignatures:
    """A generalist pass's record while its signatures are computed chunk by chunk: the ones done
    are in the pass's ``_signatures``; asking for others raises ``NeedSignature``."""

    def specialists(self, ks: list[int]):
        raise NeedSignature(ks)


@dataclass
class SignatureWork:
    """Specialists ``ks``' signature sums so far (``[K, B, Lc, d]``): record chunks ``< chunk``
    (prompt tokens ``< pos``)."""

    ks: list[int]
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
    weighting: dict | None = None  # constellation/paper: {"weighting", "sharpness", "strength", "profile"} used

    @classmethod
    def of(cls, plan: Plan, domains: list[str]) -> "PlanSummary":
        w = {k: plan.extra[k] for k in ("weighting", "sharpness", "strength", "profile") if k in plan.extra} or None
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
    shape: object = None  # the serving side's own (chat: the tool plan); the engine never reads it
    # filled by the engine
    plan: Plan | None = None
    summary: PlanSummary | None = None  # of ``plan``, set with it
    started: float | None = None


@dataclass(eq=False)
class Row:
    """One batch row: its KV slot (``slab``, ``slot``: ``kv_cache.KVPool``) and its composition.

    ``weights``: the plan's source weights ``[1 + N, d]`` (or per block ``[Lb, 1 + N, d]``) of the
    catalog it was planned on; ``comp``: the same as the step's tensors (``composer.batch.RowWeights``);
    ``beta``: its weight in the sequence's log-probability mixture (None: the mixture's base row)."""

    slot: int = -1
    weights: torch.Tensor | None = None
    length: int = 0  # tokens in the cache
    beta: float | None = None
    slab: int = -1
    cap: int = 0  # positions its slot holds
    comp: object = None  # composer.batch.RowWeights, set with ``weights``


@dataclass(eq=False)
class Sequence:
    """One choice of a request while it decodes: its rows (row 0 the mixture's base; more rows only
    where the mode mixes several models' log-probabilities), sampling state and text."""

    request: Request
    index: int
    rows: list[Row]
    generator: torch.Generator | None
    eos: set[int]
    detok: object  # detokenizer.Detokenizer
    tokens: list[int] = field(default_factory=list)
    last_token_at: float = 0.0
    finished: bool = False
    cumulative_logprob: float = 0.0  # of the tokens generated (the model's log-probabilities, as reported)
    catalog: object = None  # the Constellation its rows' weights were planned on (it decodes on it)
    order: int = 0  # admission order (the newest is preempted first)
    preempted: int = 0  # times its KV was dropped and recomputed
    matcher: object = None  # its own copy of the request's grammar (llguidance.LLMatcher), or None
    since: float = field(default_factory=time.perf_counter)  # when it began decoding (its first token)

    @property
    def length(self) -> int:
        """Tokens in its KV cache (prompt + generated - 1 while decoding)."""
        return self.rows[0].length


# ---- the engine thread's one input queue ------------------------------------------------------------
@dataclass
class AddRequest:
    request: Request


@dataclass
class Abort:
    request: Request


@dataclass
class Call:
    """Run ``fn`` on the engine thread between steps; its result (or error) goes into ``box``."""

    fn: Callable[[], object]
    done: threading.Event = field(default_factory=threading.Event)
    box: dict = field(default_factory=dict)


@dataclass
class SwapCatalog:
    constellation: object
    done: threading.Event = field(default_factory=threading.Event)


EngineInput = AddRequest | Abort | Call | SwapCatalog
