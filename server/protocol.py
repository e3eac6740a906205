"""OpenAI-compatible request and response models (pydantic), kept apart from the serving logic.

The error body (``ErrorResponse``) and the response models are what the routes return; their JSON
is the OpenAI API's, plus the ``composition`` extension."""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from composer.modes import CompositionParams
from .protocol_tools import DeltaToolCall, ResponseFormat, Tool, ToolCall, ToolChoice


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class StreamOptions(BaseModel):
    include_usage: bool = False


# ---- fields this server does not implement --------------------------------------------------
# OpenAI request fields that ask for something the server does not do. Each is accepted only with a
# value that asks for nothing (what the server does anyway); any other value is refused with a 400
# naming the field. Fields outside the models are refused too (``extra="forbid"``). docs/server.md
# has the table of every field.
def _empty(v) -> bool:
    return v is None or v == [] or v == {} or v == ""


REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "suffix": (_empty, "suffix (insertion) is not supported"),
    "functions": (_empty, "functions (the deprecated form of function calling) are not supported: use tools"),
    "function_call": (lambda v: v in (None, "none"), "function_call (deprecated) is not supported: use tools and "
                      "tool_choice"),
    "audio": (_empty, "audio output is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only the 'text' modality is supported"),
    "prediction": (_empty, "predicted outputs are not supported"),
    "store": (lambda v: v in (None, False), "this server stores no completions (store must be false)"),
    "metadata": (_empty, "metadata tags stored completions; this server stores none"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "only service_tier 'auto' or 'default' is supported"),
    "reasoning_effort": (_empty, "reasoning_effort applies to reasoning models; this model does not reason"),
    "verbosity": (_empty, "verbosity is not supported"),
    "web_search_options": (_empty, "web search is not supported"),
    "moderation": (_empty, "moderation is not supported"),
    "prompt_cache_key": (_empty, "this server has no prompt cache (prompt_cache_key)"),
    "prompt_cache_options": (_empty, "this server has no prompt cache (prompt_cache_options)"),
    "prompt_cache_retention": (_empty, "this server has no prompt cache (prompt_cache_retention)"),
}
COMPLETION_REFUSED = ("suffix",)
CHAT_REFUSED = tuple(k for k in REFUSED if k != "suffix")


def _refuse(v, info):
    ok, why = REFUSED[info.field_name]
    if not ok(v):
        raise ValueError(why)
    return v


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id: accepted, logged, no effect on the output (as at OpenAI)
    # vLLM-style extensions
    top_k: int = Field(default=0, ge=-1, le=1_000_000)  # keep the k most likely tokens; 0 or -1: all
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    # structured outputs: the reply constrained to JSON, or to a JSON schema (server.structured)
    response_format: ResponseFormat | None = None
    # Constellation extension (through the client's extra_body)
    composition: CompositionParams | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        items = [v] if isinstance(v, str) else list(v)
        if len(items) > 8:
            raise ValueError("at most 8 stop sequences")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty")
        return items

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        """OpenAI's shape: token ids (as JSON object keys, so strings) to a bias in [-100, 100]."""
        if v is None:
            return {}
        if len(v) > 1024:
            raise ValueError("at most 1024 entries")
        out = {}
        for k, b in v.items():
            if not k.strip().isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers), got {k!r}")
            if not -100.0 <= b <= 100.0 or b != b:
                raise ValueError(f"bias for token {k} must be in [-100, 100], got {b}")
            out[int(k)] = float(b)
        return out


class CompletionRequest(_Sampling):
    # one prompt (a string, token ids) or several (strings, lists of token ids): OpenAI's and vLLM's forms
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo (score the prompt)
    best_of: int | None = Field(default=None, ge=1, le=16)
    suffix: str | None = None

    _refused = field_validator(*COMPLETION_REFUSED)(_refuse)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        """One clear message for any other shape (not one per member of the union)."""
        def ids(x):
            return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        several = isinstance(v, list) and (all(isinstance(x, str) for x in v) or all(ids(x) for x in v))
        if not (isinstance(v, str) or ids(v) or several):
            raise ValueError("prompt must be a string, a list of strings, a list of token ids (integers) or a "
                             "list of such lists")
        return v

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request, in order: a string or a list of token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls, sent back with the tools' results
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text":
                raise ValueError("only text content parts are supported")
            parts.append(str(p.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    safety_identifier: str | None = None  # like ``user``: accepted, logged
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None

    _refused = field_validator(*CHAT_REFUSED)(_refuse)


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    composition: CompositionParams | None = None
    include_node_weights: bool = False
    model: str | None = None


class SpecialistRequest(BaseModel):
    """``POST /v1/specialists`` (admin API): add a specialist, or replace one of the same name."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    path: str | None = Field(default=None, description="adapter or model folder under [catalog].models_root")
    probes: list[str] | None = Field(default=None, description="the domain's probe texts (at least 4)")
    probes_path: str | None = Field(default=None, description="a probe file under [catalog].models_root")
    replace: bool = False


# ---- responses ---------------------------------------------------------------------------------
# Field order is the JSON key order. A non-streamed response is serialised with every field; a
# streamed chunk with only the fields it was built with (``model_dump(exclude_unset=True)``), so a
# chunk omits ``composition`` after the first and ``usage`` unless ``include_usage`` was asked.


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompositionSummary(BaseModel):
    """Constellation extension on every response (streamed: on the first chunk)."""

    mode: str
    selected: list[str]
    alpha: dict[str, float]
    entropy_bits: float
    # constellation and paper modes: how alpha became weights (docs/weightings.md); absent in other modes
    weighting: str | None = None
    sharpness: float | None = None
    strength: dict[str, float] | None = None
    profile: dict | None = None  # an adaptive weighting: the prompt's profile value, band and temperature

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler):
        out = handler(self)
        absent = ("weighting", "sharpness", "strength", "profile") if self.weighting is None else \
            ("profile",) if self.profile is None else ()
        for k in absent:
            out.pop(k, None)
        return out


class CompletionLogProbs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogProbs | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    composition: CompositionSummary | list[CompositionSummary] | None  # a list: one per prompt, in order


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    composition: CompositionSummary | None = None  # the prompt's whose choices the chunk carries
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogProbs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler):
        out = handler(self)
        if self.tool_calls is None:
            out.pop("tool_calls", None)
        return out


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogProbs | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    composition: CompositionSummary | None


class DeltaMessage(BaseModel):
    """A streamed choice's delta: ``role`` on a choice's first chunk, ``content`` unless it only ends."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None
    logprobs: ChatLogProbs | None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionStreamChoice]
    composition: CompositionSummary | None = None
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One model id (``server.model_names``: the constellation, a mode, a specialist alone)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "constellation"
    parent: str | None = None  # vLLM's: a mode's is the constellation, a specialist's ``<served>/generalist``
    max_model_len: int | None = None  # vLLM's: prompt + completion tokens of one sequence
    catalog_version: int = 0  # Constellation extension: the specialists' catalog being served
    mode: str | None = None  # Constellation extension: the mode the name runs (None: the request's composition)
    specialist: str | None = None  # Constellation extension: the specialist the name runs alone


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
