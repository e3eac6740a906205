"""``POST /v1/completions``: text (or token id) prompts, OpenAI's legacy completion shape, with
``echo`` (the prompt, and with ``logprobs`` its tokens' log-probabilities, before the completion),
``best_of`` and ``max_tokens=0`` with ``echo`` (score a prompt without generating)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from composer.modes import CompositionParams
from .engine import Event
from .protocol import (CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse,
                       CompletionStreamResponse, new_id, now)
from .serving import DONE, SSE_HEADERS, APIError, Collected, OpenAIServing, draining_error, sse, usage

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions (chat defaults to the room left)


@dataclass
class Echo:
    """What every choice starts with under ``echo``: the prompt's text and (asked) its logprobs."""

    text: str
    entries: list[dict]


class OpenAIServingCompletion(OpenAIServing):
    id_prefix = "cmpl"

    async def create_completion(self, body: CompletionRequest, http: HTTPRequest):
        self.check_model(body.model)
        comp = self.check_composition(body.composition)
        ids = self.text_prompt(body.prompt)
        if body.best_of is not None and body.best_of < body.n:
            raise APIError(400, f"best_of ({body.best_of}) must be at least n ({body.n})", param="best_of")
        if body.best_of is not None and body.best_of > body.n and body.stream:
            raise APIError(400, "best_of > n cannot be streamed (the best are known only at the end)",
                           param="best_of")
        if body.max_tokens == 0:
            if not body.echo:
                raise APIError(400, "max_tokens=0 needs echo=true (it scores the prompt)", param="max_tokens")
            return await self.score_only(body, ids, comp)
        params = self.sampling(body, ids, DEFAULT_MAX_TOKENS, body.logprobs, "prompt")
        return await self.generate(http, body, ids, params, comp, n_generate=body.best_of)

    # ---- echo --------------------------------------------------------------------------------
    async def echo(self, body: CompletionRequest, ids: list[int], comp: CompositionParams):
        """The prompt's text and, with ``logprobs``, its tokens' entries (on the engine thread)."""
        most, hint = self.prompt_limit()
        if not ids or len(ids) > most:
            raise APIError(400, f"prompt has {len(ids)} tokens; it must have 1..{most} ({hint})", param="prompt",
                           code="context_length_exceeded" if ids else None)
        text = body.prompt if isinstance(body.prompt, str) else self.tok.decode(ids)
        if body.logprobs is None:
            return Echo(text, []), None
        if self.engine.draining:
            raise draining_error()
        entries, summary = await asyncio.get_running_loop().run_in_executor(
            None, self.engine.score_prompt, ids, comp, None, body.logprobs)
        return Echo(text, entries), summary

    async def prefix(self, req, body: CompletionRequest, ids: list[int]) -> Echo | None:
        return (await self.echo(body, ids, req.composition))[0] if body.echo else None

    async def score_only(self, body: CompletionRequest, ids: list[int], comp: CompositionParams):
        """``echo`` with ``max_tokens=0``: the prompt (and its logprobs) as each choice, nothing generated."""
        echo, summary = await self.echo(body, ids, comp)
        if summary is None:  # no logprobs asked: the composition is still reported
            _, summary = await asyncio.get_running_loop().run_in_executor(
                None, self.engine.score_prompt, ids, comp, None, 0)
        comp_summary = self.summary_of(summary)
        choices = [self.final_choice(i, Collected(finish="length"), body, echo) for i in range(body.n)]
        rid, created, use = new_id(self.id_prefix), now(), usage(len(ids), 0)
        if not body.stream:
            return self.response(rid, created, choices, use, comp_summary)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            extra = {"usage": None} if include_usage else {}
            yield sse(self.chunk(rid, created, choices, composition=comp_summary, **extra))
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
        return CompletionResponse(id=rid, object="text_completion", created=created, model=self.model_name,
                                  system_fingerprint=self.fingerprint, choices=choices, usage=use,
                                  composition=composition)

    def chunk(self, rid, created, choices, **extra) -> CompletionStreamResponse:
        return CompletionStreamResponse(id=rid, object="text_completion", created=created, model=self.model_name,
                                        system_fingerprint=self.fingerprint, choices=choices, **extra)

