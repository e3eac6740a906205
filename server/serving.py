"""What the OpenAI routes share: errors, prompts, sampling limits, the engine round trip, SSE.

``OpenAIServing`` turns a validated request into token ids and ``SamplingParams``, submits it to the
engine and answers as one JSON document or as a server-sent event stream. The subclasses
(``serving_completion``, ``serving_chat``) only shape choices and chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextvars import ContextVar
from typing import Any, AsyncIterator, Callable

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from composer.modes import MODES, CompositionError, CompositionParams
from .engine import Draining, Engine, Event, Limits, QueueFull, Request, SamplingParams
from . import tool_calls
from .engine.grammar import GrammarSpec
from .model_names import NameConflict, ServedName, apply_name, served_names
from .protocol import CompositionSummary, ErrorBody, ErrorResponse, UsageInfo, new_id, now
from .structured import LimitError, compile_spec
from .tool_calls import ToolPlan
from .serving_batch import Batch, Collected

log = logging.getLogger("constellation.server")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"
# the model name the request asked for, echoed as its response's ``model`` (set by ``check_model``;
# each request runs in its own asyncio task, whose context a streamed body's task copies)
REQUESTED_MODEL: ContextVar[str | None] = ContextVar("requested_model", default=None)


# ---- errors ------------------------------------------------------------------------------------
class APIError(Exception):
    """Answered as OpenAI's error body with this status (the app's exception handler)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code)).model_dump()


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def draining_error() -> APIError:
    return APIError(503, "the server is shutting down", "service_unavailable", code="draining",
                    headers={"Retry-After": "5"})


# ---- SSE ----------------------------------------------------------------------------------------
def sse(obj: BaseModel | dict) -> str:
    """One event. A model gives only the fields it was built with (a chunk's optional keys stay absent)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(exclude_unset=True)
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def error_event(e: Event) -> str:
    return sse(error_body(e.error or "generation failed", "server_error"))


def usage(prompt_len: int, n_completion: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_len, completion_tokens=n_completion,
                     total_tokens=prompt_len + n_completion)


def content_spans(text: str, contents: list[str]) -> list[tuple[int, int]]:
    """Character spans of each message's content in the templated text, found in order."""
    spans, pos = [], 0
    for content in contents:
        if not content:
            continue
        at = text.find(content, pos)
        if at == -1:
            continue
        spans.append((at, at + len(content)))
        pos = at + len(content)
    return spans


def span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int] | None:
    """1 for each token overlapping a span; None when no token does (the fingerprint then uses all)."""
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]
    return mask if any(mask) else None


def best_of(out: dict[int, Collected], n: int) -> list[Collected]:
    """The ``n`` choices with the highest log-probability per token (OpenAI's definition of best)."""
    ranked = sorted(out.values(), key=lambda o: -o.cumulative_logprob / max(len(o.ids), 1))
    return ranked[:n]


class OpenAIServing:
    """The shared half of the completion and chat routes (one instance per app)."""

    id_prefix = "cmpl"

    def __init__(self, engine: Engine, tok, limits: Limits, model_name: str,
                 fingerprint: Callable[[], str] = lambda: "fp_constellation"):
        self.engine, self.tok, self.limits, self.model_name = engine, tok, limits, model_name
        self._fingerprint = fingerprint  # the current catalog's: its index, the weights' dtype, the version
        self.max_positions = min(limits.max_seq_len, self.c.g.mc.max_positions)

    @property
    def fingerprint(self) -> str:
        """``system_fingerprint`` of the catalog being served now."""
        return self._fingerprint()

    @property
    def c(self):
        """The current catalog's constellation (the engine swaps it when the catalog changes)."""
        return self.engine.c

    # ---- request checks and prompts ----------------------------------------------------------
    def names(self) -> dict[str, ServedName]:
        """The model ids served now (``model_names``): the constellation, its modes, its specialists."""
        return served_names(self.model_name, MODES, list(self.c.domains))

    def check_model(self, name: str | None) -> ServedName:
        """What ``model`` names (omitted: the constellation); an unknown name is a 404."""
        known = self.names()
        if name is not None and name not in known:
            raise APIError(404, f"model '{name}' does not exist (GET /v1/models lists this server's: "
                           f"'{self.model_name}', '{self.model_name}/<mode>' or a specialist's name)",
                           "not_found_error", "model", "model_not_found")
        REQUESTED_MODEL.set(name)
        return known[name or self.model_name]

    @property
    def shown_model(self) -> str:
        """A response's ``model``: the name the request asked for (the served name if it sent none)."""
        return REQUESTED_MODEL.get() or self.model_name

    def check_composition(self, params: CompositionParams | None, name: ServedName | None = None) -> CompositionParams:
        """The composition to run: the request's, with what its model ``name`` fixes (a conflict is a 400)."""
        params = params or CompositionParams()
        try:
            params = params if name is None else apply_name(params, name)
        except NameConflict as e:
            raise APIError(400, str(e), param=e.param) from None
        try:
            self.c.validate(params)
        except CompositionError as e:
            raise APIError(400, str(e), param=e.param) from None
        return params

    def chat_prompt(self, messages, tools: ToolPlan | None = None) -> tuple[list[int], list[int] | None]:
        """Token ids of the templated chat, and a mask of the tokens inside the messages' contents.

        The index was built from plain text, so the fingerprint averages over the contents only,
        not over template markup, a default system prompt the template adds, or the tools' description.
        """
        fam = tool_calls.family(self.tok)
        try:
            contents = [m.text() for m in messages]
            msgs = tool_calls.template_messages(messages, tools, fam)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if not getattr(self.tok, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        extra = {"tools": [t.model_dump(exclude_none=True) for t in tools.all_tools]} \
            if tools is not None and fam == tool_calls.HERMES else {}
        try:
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **extra)
        except Exception as e:  # the template's own checks (e.g. role order) raise
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = content_spans(text, contents)
        return enc["input_ids"], span_mask(enc["offset_mapping"], spans)

    async def grammar(self, spec: GrammarSpec | None, param: str):
        """The reply's compiled grammar (cached by spec, compiled off the engine thread), or None."""
        try:
            return await compile_spec(self.engine.grammars, spec, param)
        except LimitError as e:
            raise APIError(400, str(e), param=e.param) from None

    def text_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tok(prompt, add_special_tokens=True)["input_ids"]
        ids, vocab = list(prompt), self.c.g.mc.vocab_size
        if any(not isinstance(i, int) or i < 0 or i >= vocab for i in ids):
            raise APIError(400, f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        return ids

    def context_hint(self) -> str:
        """What raises the context (prompt + max_tokens): ``--max-seq-len`` up to the model's own, or nothing."""
        model = self.c.g.mc.max_positions
        if self.limits.max_seq_len < model:
            return f"`constellation serve --max-seq-len` raises it, up to the model's {model}"
        return f"the model's own context is {model} positions"

    def prompt_limit(self) -> tuple[int, str]:
        """The longest prompt accepted, and what raises it: ``--max-prompt-tokens``, or the context less
        room for one generated token (a sequence ends a position short of the context)."""
        context = self.max_positions - 2
        if self.limits.max_prompt_tokens < context:
            return self.limits.max_prompt_tokens, "`constellation serve --max-prompt-tokens` raises it"
        return context, self.context_hint()

    def sampling(self, body, ids: list[int], default_max: int | None, logprobs: int | None,
                 param: str) -> SamplingParams:
        lim = self.limits
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        most, hint = self.prompt_limit()
        if len(ids) > most:
            raise APIError(400, f"prompt has {len(ids)} tokens; this server accepts at most {most} ({hint})",
                           param=param, code="context_length_exceeded")
        room = self.max_positions - len(ids) - 1
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None:
            max_tokens = min(default_max or room, lim.max_new_tokens, room)
        if max_tokens > lim.max_new_tokens:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {lim.max_new_tokens} "
                           "(`constellation serve --max-new-tokens` raises it)", param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                           f"{self.max_positions}-token context ({self.context_hint()})", param="max_tokens",
                           code="context_length_exceeded")
        if max_tokens < 1:
            raise APIError(400, "no room left to generate", param=param, code="context_length_exceeded")
        if body.min_tokens > max_tokens:
            raise APIError(400, "min_tokens must not exceed max_tokens", param="min_tokens")
        vocab = self.c.g.mc.vocab_size
        bad = [t for t in body.logit_bias or {} if t >= vocab]
        if bad:
            raise APIError(400, f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {vocab})",
                           param="logit_bias")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=max(0, body.top_k),
                              seed=body.seed, stop=body.stop or [], min_tokens=body.min_tokens,
                              ignore_eos=body.ignore_eos, logprobs=logprobs, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, logit_bias=dict(body.logit_bias or {}))

    def token_text(self, i: int) -> str:
        return self.tok.decode([i])

    # ---- the engine round trip ---------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: list[SamplingParams], composition, n, fmasks=None,
               n_param: str = "n", shape=None) -> Batch:
        try:
            return Batch.submit(self.engine, prompts, params, composition, n, fmasks, shape)
        except QueueFull:
            raise APIError(429, "the server is at capacity; retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(400, str(e), param=n_param) from None
        except Draining:
            raise draining_error() from None

    def summary(self, req: Request) -> CompositionSummary | None:
        return self.summary_of(req.summary)

    def compositions(self, summaries: list) -> CompositionSummary | list[CompositionSummary] | None:
        """The ``composition`` extension: one prompt's summary; with several prompts, one per prompt."""
        out = [self.summary_of(p) for p in summaries]
        return out[0] if len(out) == 1 else out

    def summary_of(self, p) -> CompositionSummary | None:
        """A ``PlanSummary`` (plain Python, made on the engine thread) as the response extension."""
        if p is None:
            return None
        return CompositionSummary(mode=p.mode, selected=[p.domains[i] for i in p.selected],
                                  alpha={d: round(a, 6) for d, a in zip(p.domains, p.alpha)},
                                  entropy_bits=round(p.mean_entropy_bits, 6), **(p.weighting or {}))

    # ---- answering -----------------------------------------------------------------------------
    async def generate(self, http: HTTPRequest, body, ids: list[int], params: SamplingParams,
                       comp: CompositionParams, fmask: list[int] | None = None, n_generate: int | None = None,
                       shape=None):
        """One prompt (chat): ``generate_all`` of one. ``shape``: what the subclass shapes the reply
        with (chat: the tool plan), kept on the engine request."""
        return await self.generate_all(http, body, [ids], [params], comp, [fmask], n_generate, shape)

    async def generate_all(self, http: HTTPRequest, body, prompts: list[list[int]], params: list[SamplingParams],
                           comp: CompositionParams, fmasks: list | None = None, n_generate: int | None = None,
                           shape=None):
        """Submit every prompt together, then answer as one response model or as a server-sent event
        stream; prompt ``p``'s choice ``i`` is choice ``p * n + i``. ``n_generate`` (best_of) sequences
        per prompt are generated and the best ``body.n`` returned (not streamed)."""
        if body.user or getattr(body, "safety_identifier", None):
            log.info("request for user=%r safety_identifier=%r", body.user, getattr(body, "safety_identifier", None))
        n_gen = n_generate or body.n
        batch = self.submit(prompts, params, comp, n_gen, fmasks, "best_of" if n_gen > body.n else "n", shape)
        rid, created = new_id(self.id_prefix), now()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self.stream(batch, body, rid, created, prompts, include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        outs = await batch.collect(http)
        err = next((o.error for out in outs for o in out.values() if o.error), None)
        if err:
            raise APIError(500, err, "server_error")
        prefixes = await asyncio.gather(*(self.prefix(r, body, ids, p)
                                          for p, (r, ids) in enumerate(zip(batch.reqs, prompts))))
        choices = []
        for p, (out, prefix) in enumerate(zip(outs, prefixes)):
            kept = best_of(out, body.n) if n_gen > body.n else [o for _, o in sorted(out.items())]
            choices += [self.final_choice(p * body.n + i, o, body, prefix) for i, o in enumerate(kept)]
        use = usage(sum(map(len, prompts)), sum(len(o.ids) for out in outs for o in out.values()))
        return self.response(rid, created, choices, use, self.compositions([r.summary for r in batch.reqs]))

    async def prefix(self, req: Request, body, ids: list[int], p: int = 0):
        """What prompt ``p``'s choices start with before their generated text (completions' ``echo``);
        None here."""
        return None

    async def stream(self, batch: Batch, body, rid: str, created: int, prompts: list[list[int]],
                     include_usage: bool) -> AsyncIterator[str]:
        """Chunks as events arrive; the first chunk of each prompt's choices carries its composition."""
        n_tokens, states, announced = 0, [{} for _ in prompts], set()
        async for item in batch.events(self.limits.keepalive_s):
            if item is None:
                yield KEEPALIVE
                continue
            p, e = item
            if e.error:
                yield error_event(e)
                break
            n_tokens += len(e.token_ids)
            if "prefix" not in states[p]:  # the plan is known once the prompt's first event arrives
                states[p]["prefix"] = await self.prefix(batch.reqs[p], body, prompts[p], p)
            choice = self.stream_choice(e, states[p], body)
            if choice is None:
                continue
            choice.index += p * batch.reqs[p].n
            extra: dict[str, Any] = {}
            if p not in announced:
                extra["composition"] = self.summary_of(batch.reqs[p].summary)
                announced.add(p)
            if include_usage:
                extra["usage"] = None
            yield sse(self.chunk(rid, created, [choice], **extra))
        if include_usage:
            yield sse(self.chunk(rid, created, [], usage=usage(sum(map(len, prompts)), n_tokens)))
        yield DONE

    # ---- what the subclasses shape -------------------------------------------------------------
    def final_choice(self, index: int, out: Collected, body, prefix) -> BaseModel:
        """Choice ``index`` of a non-streamed answer; ``prefix`` is what ``prefix()`` returned."""
        raise NotImplementedError

    def stream_choice(self, e: Event, state: dict, body) -> BaseModel | None:
        """The chunk's choice for this event, or None to send nothing; ``state`` lives per request."""
        raise NotImplementedError

    def response(self, rid: str, created: int, choices: list, use: UsageInfo,
                 composition: CompositionSummary | list[CompositionSummary] | None) -> BaseModel:
        raise NotImplementedError

    def chunk(self, rid: str, created: int, choices: list, **extra) -> BaseModel:
        """A stream chunk with ``extra`` (``composition``, ``usage``) set only when given."""
        raise NotImplementedError
