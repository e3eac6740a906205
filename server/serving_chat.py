"""``POST /v1/chat/completions``: messages through the tokenizer's chat template."""

from __future__ import annotations

from fastapi import Request as HTTPRequest

from .engine import Event
from .protocol import (AssistantMessage, ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse,
                       ChatCompletionStreamChoice, ChatCompletionStreamResponse, ChatLogProbs, ChatTokenLogprob,
                       DeltaMessage, TopLogprob)
from . import tool_calls
from .serving import APIError, Collected, OpenAIServing
from .structured import LimitError, response_spec
from .tool_calls import ToolPlan, ToolStream


class OpenAIServingChat(OpenAIServing):
    id_prefix = "chatcmpl"

    async def create_chat_completion(self, body: ChatCompletionRequest, http: HTTPRequest):
        comp = self.check_composition(body.composition, self.check_model(body.model))
        try:
            tools = tool_calls.plan(body, self.tok)
            if tools is not None and body.response_format is not None and body.response_format.type != "text":
                raise LimitError("response_format cannot be combined with tools that may be called "
                                 "(use tool_choice 'none', or one of the two)", "response_format")
            spec = tools.spec if tools is not None else response_spec(body.response_format)
        except LimitError as e:
            raise APIError(400, str(e), param=e.param) from None
        ids, fmask = self.chat_prompt(body.messages, tools)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        lp = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling(body, ids, None, lp, "messages")
        params.grammar = await self.grammar(spec, "tools" if tools is not None else "response_format")
        return await self.generate(http, body, ids, params, comp, fmask, shape=tools)

    async def prefix(self, req, body, ids, p: int = 0):
        """The request's tool plan (None without tools): the choices are shaped by it."""
        return req.shape

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

    def final_choice(self, index: int, out: Collected, body: ChatCompletionRequest,
                     prefix: ToolPlan | None = None) -> ChatCompletionChoice:
        content, calls = prefix.parse(out.text) if prefix is not None else (out.text, [])
        return ChatCompletionChoice(index=index, message=AssistantMessage(content=content, tool_calls=calls or None),
                                    finish_reason="tool_calls" if calls else out.finish,
                                    logprobs=self.logprobs(out.logprobs) if body.logprobs else None)

    def stream_choice(self, e: Event, state: dict, body: ChatCompletionRequest) -> ChatCompletionStreamChoice | None:
        """``state``: the choices that have sent their first chunk (which carries ``role``), the tool
        plan (``"prefix"``) and under it each choice's ``ToolStream``."""
        text, calls, finish = e.text, None, e.finish_reason
        plan: ToolPlan | None = state.get("prefix")
        if plan is not None:
            ts = state.setdefault(("tools", e.index), ToolStream(plan))
            text = ts.feed(e.text)
            if finish:
                tail, calls = ts.finish()
                text += tail
                finish = "tool_calls" if calls else finish
        if not text and not finish and not e.logprobs and e.index in state:
            return None
        delta: dict = {}  # only the keys set here appear in the chunk
        if e.index not in state:
            delta["role"] = "assistant"
            state[e.index] = True
        if text or not (finish or calls):
            delta["content"] = text
        if calls:
            delta["tool_calls"] = calls
        return ChatCompletionStreamChoice(index=e.index, delta=DeltaMessage(**delta), finish_reason=finish,
                                          logprobs=self.logprobs(e.logprobs) if body.logprobs else None)

    def response(self, rid, created, choices, use, composition) -> ChatCompletionResponse:
        return ChatCompletionResponse(id=rid, object="chat.completion", created=created, model=self.shown_model,
                                      system_fingerprint=self.fingerprint, choices=choices, usage=use, composition=composition)

    def chunk(self, rid, created, choices, **extra) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(id=rid, object="chat.completion.chunk", created=created,
                                            model=self.shown_model, system_fingerprint=self.fingerprint,
                                            choices=choices, **extra)
