"""``POST /v1/chat/completions``: messages through the tokenizer's chat template."""

from __future__ import annotations

from fastapi import Request as HTTPRequest

from .engine import Event
from .protocol import (AssistantMessage, ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse,
                       ChatCompletionStreamChoice, ChatCompletionStreamResponse, ChatLogProbs, ChatTokenLogprob,
                       DeltaMessage, TopLogprob)
from .serving import APIError, Collected, OpenAIServing


class OpenAIServingChat(OpenAIServing):
    id_prefix = "chatcmpl"

    async def create_chat_completion(self, body: ChatCompletionRequest, http: HTTPRequest):
        comp = self.check_composition(body.composition, self.check_model(body.model))
        ids, fmask = self.chat_prompt(body.messages)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        lp = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling(body, ids, None, lp, "messages")
        return await self.generate(http, body, ids, params, comp, fmask)

    def logprobs(self, entries: list[dict]) -> ChatLogProbs:
        """The engine's per-token entries as OpenAI's chat logprobs (token, logprob, UTF-8 bytes, top)."""
        content = []
        for en in entries:
            t = self.token_text(en["token_id"])
            top = [self._top(i, v) for i, v in en["top"]]
            content.append(ChatTokenLogprob(token=t, logprob=en["logprob"], bytes=list(t.encode()), top_logprobs=top))
        return ChatLogProbs(content=content)

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        t = self.token_text(token_id)
        return TopLogprob(token=t, logprob=logprob, bytes=list(t.encode()))

    def final_choice(self, index: int, out: Collected, body: ChatCompletionRequest, prefix=None) -> ChatCompletionChoice:
        return ChatCompletionChoice(index=index, message=AssistantMessage(role="assistant", content=out.text),
                                    finish_reason=out.finish,
                                    logprobs=self.logprobs(out.logprobs) if body.logprobs else None)

    def stream_choice(self, e: Event, started: dict, body: ChatCompletionRequest) -> ChatCompletionStreamChoice | None:
        """``started``: the choices that have sent their first chunk (which carries ``role``)."""
        if not e.text and not e.finish_reason and not e.logprobs and e.index in started:
            return None
        delta: dict[str, str] = {}  # only the keys set here appear in the chunk
        if e.index not in started:
            delta["role"] = "assistant"
            started[e.index] = True
        if e.text or not e.finish_reason:
            delta["content"] = e.text
        return ChatCompletionStreamChoice(index=e.index, delta=DeltaMessage(**delta), finish_reason=e.finish_reason,
                                          logprobs=self.logprobs(e.logprobs) if body.logprobs else None)

    def response(self, rid, created, choices, use, composition) -> ChatCompletionResponse:
        return ChatCompletionResponse(id=rid, object="chat.completion", created=created, model=self.shown_model,
                                      system_fingerprint=self.fingerprint, choices=choices, usage=use, composition=composition)

    def chunk(self, rid, created, choices, **extra) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(id=rid, object="chat.completion.chunk", created=created,
                                            model=self.shown_model, system_fingerprint=self.fingerprint,
                                            choices=choices, **extra)
