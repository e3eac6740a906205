"""``POST /v1/completions``: text (or token id) prompts, one or several per request (prompt ``p``'s
choice ``i`` is choice ``p * n + i``), OpenAI's legacy completion shape, with ``echo`` (the prompt,
and with ``logprobs`` its tokens' log-probabilities, before the completion), ``best_of`` and
``max_tokens=0`` with ``echo`` (score a prompt without generating)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from composer.modes import CompositionParams
from .engine import Event
from .protocol import (CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse,
                       CompletionStreamResponse, new_id, now)
from .structured import LimitError, response_spec
from .serving import DONE, SSE_HEADERS, APIError, Collected, OpenAIServing, draining_error, sse, usage

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions (chat defaults to the room left)


@dataclass
class Echo:
    """What every choice starts with under ``echo``: the prompt's text and (asked) its logprobs."""

    text: str
    entries: list[dict]


def each(prompts: list, check: Callable):
    """``check`` of every prompt; with several, an error says which (``prompt 2: ...``)."""
    out = []
    for p, x in enumerate(prompts):
        try:
            out.append(check(x))
        except APIError as e:
            if len(prompts) > 1:
                e.message = f"prompt {p}: {e.message}"
            raise
    return out


class OpenAIServingCompletion(OpenAIServing):
    id_prefix = "cmpl"

    async def create_completion(self, body: CompletionRequest, http: HTTPRequest):
        comp = self.check_composition(body.composition, self.check_model(body.model))
        raw = self.check_prompts(body)
        prompts = each(raw, self.text_prompt)
        if body.best_of is not None and body.best_of < body.n:
            raise APIError(400, f"best_of ({body.best_of}) must be at least n ({body.n})", param="best_of")
        if body.best_of is not None and body.best_of > body.n and body.stream:
            raise APIError(400, "best_of > n cannot be streamed (the best are known only at the end)",
                           param="best_of")
        if body.max_tokens == 0:
            if not body.echo:
                raise APIError(400, "max_tokens=0 needs echo=true (it scores the prompt)", param="max_tokens")
            return await self.score_only(body, prompts, comp)
        params = each(prompts, lambda ids: self.sampling(body, ids, DEFAULT_MAX_TOKENS, body.logprobs, "prompt"))
        try:
            spec = response_spec(body.response_format)
        except LimitError as e:
            raise APIError(400, str(e), param=e.param) from None
        grammar = await self.grammar(spec, "response_format")
        for one in params:  # one grammar; each prompt's sequences get their own matchers
            one.grammar = grammar
        return await self.generate_all(http, body, prompts, params, comp, n_generate=body.best_of)

    def check_prompts(self, body: CompletionRequest) -> list[str | list[int]]:
        """The request's prompts, within the server's bounds on prompts and on prompts x n."""
        raw, lim = body.prompts(), self.limits
        if len(raw) > lim.max_prompts:
            raise APIError(400, f"{len(raw)} prompts; this server takes at most {lim.max_prompts} per request",
                           param="prompt")
        per = max(body.n, body.best_of or 0)
        if len(raw) * per > lim.max_choices:
            name = "best_of" if per > body.n else "n"
            raise APIError(400, f"{len(raw)} prompts x {name}={per} is {len(raw) * per} sequences; this server "
                           f"generates at most {lim.max_choices} per request", param=name)
        return raw

    # ---- echo --------------------------------------------------------------------------------
    def prompt_text(self, body: CompletionRequest, ids: list[int], p: int) -> str:
        """Prompt ``p`` as echoed: the string sent, or its token ids decoded."""
        raw = body.prompts()[p]
        return raw if isinstance(raw, str) else self.tok.decode(ids)

    def check_echo(self, ids: list[int]) -> None:
        most, hint = self.prompt_limit()
        if not ids or len(ids) > most:
            raise APIError(400, f"prompt has {len(ids)} tokens; it must have 1..{most} ({hint})", param="prompt",
                           code="context_length_exceeded" if ids else None)

    async def echo(self, body: CompletionRequest, ids: list[int], p: int, comp: CompositionParams,
                   top: int | None = None):
        """Prompt ``p``'s text and, with ``logprobs``, its tokens' entries and its composition (on the
        engine thread); ``top=0`` scores it for the composition alone when no logprobs are asked."""
        self.check_echo(ids)
        text = self.prompt_text(body, ids, p)
        top = body.logprobs if body.logprobs is not None else top
        if top is None:
            return Echo(text, []), None
        if self.engine.draining:
            raise draining_error()
        entries, summary = await asyncio.get_running_loop().run_in_executor(
            None, self.engine.score_prompt, ids, comp, None, top)
        return Echo(text, entries if body.logprobs is not None else []), summary

    async def prefix(self, req, body: CompletionRequest, ids: list[int], p: int = 0) -> Echo | None:
        return (await self.echo(body, ids, p, req.composition))[0] if body.echo else None

    async def score_only(self, body: CompletionRequest, prompts: list[list[int]], comp: CompositionParams):
        """``echo`` with ``max_tokens=0``: each prompt (and its logprobs) as its choices, nothing
        generated; the composition is reported whether or not logprobs were asked."""
        each(prompts, self.check_echo)
        scored = await asyncio.gather(*(self.echo(body, ids, p, comp, top=0) for p, ids in enumerate(prompts)))
        choices = [[self.final_choice(p * body.n + i, Collected(finish="length"), body, echo) for i in range(body.n)]
                   for p, (echo, _) in enumerate(scored)]
        summaries = [s for _, s in scored]
        rid, created, use = new_id(self.id_prefix), now(), usage(sum(map(len, prompts)), 0)
        if not body.stream:
            return self.response(rid, created, [c for cs in choices for c in cs], use, self.compositions(summaries))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():  # a chunk per prompt: its choices and its composition
            extra = {"usage": None} if include_usage else {}
            for cs, summary in zip(choices, summaries):
                yield sse(self.chunk(rid, created, cs, composition=self.summary_of(summary), **extra))
            if include_usage:
                yield sse(self.chunk(rid, created, [], usage=use))
            yield DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    # ---- shaping -----------------------------------------------------------------------------
    def logprobs(self, entries: list[dict], offset0: int) -> CompletionLogProbs:
        """The engine's per-token entries as OpenAI's completion logprobs; offsets start at ``offset0``.
        Each token's ``top_logprobs`` holds the ``logprobs`` most likely tokens and the chosen one
        (so up to ``logprobs + 1`` entries, as OpenAI documents); None for an echoed first token."""
        tokens, lps, tops, offsets = [], [], [], []
        pos = offset0
        for en in entries:
            t = self.token_text(en["token_id"])
            tokens.append(t)
            lps.append(en["logprob"])
            top: dict[str, float] | None = None
            if en["top"] is not None:
                top = {}
                pairs = list(en["top"])
                if en["token_id"] not in {i for i, _ in pairs}:
                    pairs.append((en["token_id"], en["logprob"]))
                for i, v in pairs:  # two ids may decode alike (partial UTF-8): keep both, by raw token
                    text = self.token_text(i)
                    top[text if text not in top else self.tok.convert_ids_to_tokens(i)] = v
            tops.append(top)
            offsets.append(pos)
            pos += len(t)
        return CompletionLogProbs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)

    def final_choice(self, index: int, out: Collected, body: CompletionRequest, prefix: Echo | None = None
                     ) -> CompletionChoice:
        head = prefix.text if prefix else ""
        lp = None
        if body.logprobs is not None:
            lp = self.logprobs((prefix.entries if prefix else []) + out.logprobs, 0)
        return CompletionChoice(index=index, text=head + out.text, finish_reason=out.finish, logprobs=lp)

    def stream_choice(self, e: Event, state: dict, body: CompletionRequest) -> CompletionChoice | None:
        """``state``: each choice's text length so far (its logprobs' ``text_offset`` go on from
        there), and under ``echo`` the prompt, sent before a choice's first token."""
        entries, text = e.logprobs, e.text
        echo: Echo | None = state.get("prefix")
        if echo is not None and e.index not in state:
            entries, text = echo.entries + entries, echo.text + text
        if not text and not e.finish_reason and not entries:
            return None
        lp = self.logprobs(entries, state.get(e.index, 0)) if body.logprobs is not None else None
        state[e.index] = state.get(e.index, 0) + len(text)
        return CompletionChoice(index=e.index, text=text, finish_reason=e.finish_reason, logprobs=lp)

    def response(self, rid, created, choices, use, composition) -> CompletionResponse:
        return CompletionResponse(id=rid, object="text_completion", created=created, model=self.shown_model,
                                  system_fingerprint=self.fingerprint, choices=choices, usage=use,
                                  composition=composition)

    def chunk(self, rid, created, choices, **extra) -> CompletionStreamResponse:
        return CompletionStreamResponse(id=rid, object="text_completion", created=created, model=self.shown_model,
                                        system_fingerprint=self.fingerprint, choices=choices, **extra)

