"""``POST /v1/completions``: text (or token id) prompts, OpenAI's legacy completion shape."""

from __future__ import annotations

from fastapi import Request as HTTPRequest

from .engine import Event
from .protocol import (CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse,
                       CompletionStreamResponse)
from .serving import Collected, OpenAIServing

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions (chat defaults to the room left)


class OpenAIServingCompletion(OpenAIServing):
    id_prefix = "cmpl"

    async def create_completion(self, body: CompletionRequest, http: HTTPRequest):
        self.check_model(body.model)
        comp = self.check_composition(body.composition)
        ids = self.text_prompt(body.prompt)
        params = self.sampling(body, ids, DEFAULT_MAX_TOKENS, body.logprobs, "prompt")
        return await self.generate(http, body, ids, params, comp)

    def logprobs(self, entries: list[dict], offset0: int) -> CompletionLogProbs:
        """The engine's per-token entries as OpenAI's completion logprobs; offsets start at ``offset0``."""
        tokens, lps, tops, offsets = [], [], [], []
        pos = offset0
        for en in entries:
            t = self.token_text(en["token_id"])
            tokens.append(t)
            lps.append(en["logprob"])
            top: dict[str, float] = {}
            for i, v in en["top"]:  # two ids may decode alike (partial UTF-8): keep both, by raw token
                text = self.token_text(i)
                top[text if text not in top else self.tok.convert_ids_to_tokens(i)] = v
            tops.append(top or None)
            offsets.append(pos)
            pos += len(t)
        return CompletionLogProbs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)

    def final_choice(self, index: int, out: Collected, body: CompletionRequest) -> CompletionChoice:
        return CompletionChoice(index=index, text=out.text, finish_reason=out.finish,
                                logprobs=self.logprobs(out.logprobs, 0) if body.logprobs is not None else None)

    def stream_choice(self, e: Event, offsets: dict, body: CompletionRequest) -> CompletionChoice | None:
        """``offsets``: each choice's text length so far (its logprobs' ``text_offset`` go on from there)."""
        if not e.text and not e.finish_reason and not e.logprobs:
            return None
        lp = self.logprobs(e.logprobs, offsets.get(e.index, 0)) if body.logprobs is not None else None
        offsets[e.index] = offsets.get(e.index, 0) + len(e.text)
        return CompletionChoice(index=e.index, text=e.text, finish_reason=e.finish_reason, logprobs=lp)

    def response(self, rid, created, choices, use, composition) -> CompletionResponse:
        return CompletionResponse(id=rid, object="text_completion", created=created, model=self.model_name,
                                  choices=choices, usage=use, composition=composition)

    def chunk(self, rid, created, choices, **extra) -> CompletionStreamResponse:
        return CompletionStreamResponse(id=rid, object="text_completion", created=created, model=self.model_name,
                                        choices=choices, **extra)
