"""The serving classes without a server or a model: prompts, limits, logprobs, chunks and SSE."""

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest

from composer.modes import CompositionError, CompositionParams
from server.engine import Event, Limits, QueueFull
from server.engine.types import PlanSummary
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serving import APIError, content_spans, error_body, span_mask, sse, usage
from server.serving_batch import Outbox
from server.serving_chat import OpenAIServingChat
from server.serving_completion import OpenAIServingCompletion

LIMITS = Limits(max_prompt_tokens=50, max_new_tokens=20, max_seq_len=64, keepalive_s=0.05)


class CharTokenizer:
    """One token per character (id = code point); a chat template with a default system prompt."""

    chat_template = "toy"

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        out = {"input_ids": [ord(ch) for ch in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        if msgs[0]["role"] == "assistant":
            raise ValueError("conversation must start with a user or system message")
        return "<s>be brief\n" + "".join(f"<{m['role']}>{m['content']}\n" for m in msgs) + "<assistant>"

    def decode(self, ids):
        return "".join("\ufffd" if i >= 0x300 else chr(i) for i in ids)  # >= 0x300: 'partial UTF-8'

    def convert_ids_to_tokens(self, i):
        return f"<0x{i:X}>"


class FakeEngine:
    """Takes a request and answers at once with the given events (per request)."""

    def __init__(self, events=(), exc=None):
        self.events, self.exc, self.requests = list(events), exc, []
        self.c = _c()
        self.outboxes = []  # (never held: every event is handed over at once)

    def submit(self, req):
        if self.exc:
            raise self.exc
        self.requests.append(req)
        req.summary = PlanSummary(mode="constellation", selected=[1, 0], alpha=[0.25, 0.5, 0.125],
                                  mean_entropy_bits=1.0 / 3, domains=list(self.c.domains))
        for e in self.events:
            req.emit(e)


def _c():
    mc = SimpleNamespace(max_positions=128, vocab_size=0x400)

    def validate(params):
        if params.top_k is not None and params.top_k > 3:
            raise CompositionError("top_k beyond the specialists", "top_k")

    return SimpleNamespace(g=SimpleNamespace(mc=mc), domains=["medical", "legal", "code"], validate=validate)


def serving(cls, engine=None, limits=LIMITS):
    return cls(engine or FakeEngine(), CharTokenizer(), limits, "constellation")


def lp(token_id, logprob, top=()):
    return {"token_id": token_id, "logprob": logprob, "top": list(top)}


# ---- prompts ---------------------------------------------------------------------------------------
def test_chat_prompt_masks_only_the_message_contents():
    chat = serving(OpenAIServingChat)
    body = ChatCompletionRequest(messages=[{"role": "system", "content": "calm"}, {"role": "user", "content": "hi"}])
    ids, mask = chat.chat_prompt(body.messages)
    text = "".join(map(chr, ids))
    assert text == "<s>be brief\n<system>calm\n<user>hi\n<assistant>"
    assert "".join(ch for ch, m in zip(text, mask) if m) == "calmhi"  # not the markup nor the default prompt


def test_chat_prompt_content_parts_and_errors():
    chat = serving(OpenAIServingChat)
    body = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}])
    ids, mask = chat.chat_prompt(body.messages)
    assert "".join(chr(i) for i, m in zip(ids, mask) if m) == "ab"
    for msgs, says in [([{"role": "user", "content": [{"type": "image_url"}]}], "only text"),
                       ([{"role": "assistant", "content": "x"}], "cannot render")]:
        with pytest.raises(APIError) as e:
            chat.chat_prompt(ChatCompletionRequest(messages=msgs).messages)
        assert e.value.status == 400 and e.value.param == "messages" and says in e.value.message
    chat.tok.chat_template = None
    with pytest.raises(APIError, match="no chat template"):
        chat.chat_prompt(body.messages)


def test_spans_and_mask_helpers():
    text = "<s>ab</s><s>cab</s>"
    assert content_spans(text, ["ab", "", "ab", "zz"]) == [(3, 5), (13, 15)]  # in order; missing ones skipped
    assert span_mask([(0, 1), (1, 3), (3, 4)], [(2, 3)]) == [0, 1, 0]
    assert span_mask([(0, 1), (1, 2)], [(5, 6)]) is None  # nothing covered: the fingerprint uses every token


def test_text_prompt_ids_are_checked():
    s = serving(OpenAIServingCompletion)
    assert s.text_prompt("ab") == [97, 98] and s.text_prompt([1, 2]) == [1, 2]
    with pytest.raises(APIError, match=r"\[0, 1024\)"):
        s.text_prompt([1, 0x400])


# ---- sampling limits -------------------------------------------------------------------------------
def test_sampling_defaults_and_limits():
    s = serving(OpenAIServingCompletion)
    body = CompletionRequest(prompt="abc", stop="x")
    p = s.sampling(body, [1] * 3, 16, 2, "prompt")
    assert (p.max_tokens, p.stop, p.logprobs) == (16, ["x"], 2)
    assert s.sampling(body, [1] * 3, None, None, "prompt").max_tokens == 20  # the server's cap
    assert s.sampling(body, [1] * 50, None, None, "prompt").max_tokens == 13  # the room left in 64
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_tokens=9, max_completion_tokens=4)
    assert s.sampling(chat, [1], None, None, "messages").max_tokens == 4
    cases = [(CompletionRequest(prompt="a"), [], "the prompt is empty", None),
             (CompletionRequest(prompt="a"), [1] * 51, "at most 50", "context_length_exceeded"),
             (CompletionRequest(prompt="a", max_tokens=21), [1], "limit of 20", None),
             (CompletionRequest(prompt="a", max_tokens=20), [1] * 50, "64-token context", "context_length_exceeded"),
             (CompletionRequest(prompt="a", max_tokens=2, min_tokens=3), [1], "min_tokens", None)]
    for body, ids, says, code in cases:
        with pytest.raises(APIError) as e:
            s.sampling(body, ids, 16, None, "prompt")
        assert e.value.status == 400 and says in e.value.message and e.value.code == code


def test_model_and_composition_checks():
    s = serving(OpenAIServingCompletion)
    s.check_model(None)
    s.check_model("constellation")
    with pytest.raises(APIError) as e:
        s.check_model("gpt-4")
    assert (e.value.status, e.value.code, e.value.param) == (404, "model_not_found", "model")
    assert s.check_composition(None) == CompositionParams()
    with pytest.raises(APIError) as e:
        s.check_composition(CompositionParams(top_k=9))
    assert e.value.param == "top_k"


# ---- logprobs ----------------------------------------------------------------------------------------
def test_completion_logprobs_offsets_and_alike_top_tokens():
    s = serving(OpenAIServingCompletion)
    out = s.logprobs([lp(97, -0.5, [(97, -0.5), (0x301, -1.0), (0x302, -2.0)]), lp(98, -0.25)], offset0=7)
    assert out.model_dump() == {
        "tokens": ["a", "b"], "token_logprobs": [-0.5, -0.25],
        # two ids that decode alike: the second is keyed by its raw token; the chosen token is always
        # there (logprobs=0: only it), as OpenAI documents ("up to logprobs + 1 elements")
        "top_logprobs": [{"a": -0.5, "\ufffd": -1.0, "<0x302>": -2.0}, {"b": -0.25}], "text_offset": [7, 8]}


def test_chat_logprobs_carry_bytes():
    chat = serving(OpenAIServingChat)
    out = chat.logprobs([lp(0xE9, -0.5, [(0xE9, -0.5), (97, -1.5)])])
    assert out.model_dump() == {"content": [{"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9], "top_logprobs": [
        {"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9]}, {"token": "a", "logprob": -1.5, "bytes": [97]}]}]}


# ---- chunks and SSE ----------------------------------------------------------------------------------
def test_sse_is_compact_ascii_json_and_error_bodies_are_openais():
    assert sse({"a": "é", "b": [1, None]}) == 'data: {"a":"\\u00e9","b":[1,null]}\n\n'
    assert error_body("m", "server_error") == {"error": {"message": "m", "type": "server_error", "param": None,
                                                         "code": None}}
    assert usage(3, 4).model_dump() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_chunks_keep_only_the_keys_they_were_built_with():
    s = serving(OpenAIServingCompletion)
    body = CompletionRequest(prompt="a")
    choice = s.stream_choice(Event(0, text="hi"), {}, body)
    plain = json.loads(sse(s.chunk("cmpl-1", 5, [choice]))[6:])
    assert list(plain) == ["id", "object", "created", "model", "system_fingerprint", "choices"]
    assert plain["object"] == "text_completion" and plain["choices"][0]["logprobs"] is None
    with_usage = json.loads(sse(s.chunk("cmpl-1", 5, [choice], composition=None, usage=None))[6:])
    assert list(with_usage)[-2:] == ["composition", "usage"] and with_usage["usage"] is None
    assert s.stream_choice(Event(0), {}, body) is None  # nothing to say


def test_chat_deltas_role_first_then_content_and_finish_alone():
    chat = serving(OpenAIServingChat)
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}])
    started = {}
    dumps = [c.model_dump(exclude_unset=True)["delta"] if c else None for c in [
        chat.stream_choice(Event(0, text=""), started, body), chat.stream_choice(Event(0, text=""), started, body),
        chat.stream_choice(Event(0, text="a"), started, body),
        chat.stream_choice(Event(0, finish_reason="stop"), started, body),
        chat.stream_choice(Event(1, finish_reason="length"), started, body)]]
    assert dumps == [{"role": "assistant", "content": ""}, None, {"content": "a"}, {}, {"role": "assistant"}]


def _run(serving_obj, body, **kw):
    http = SimpleNamespace(is_disconnected=lambda: asyncio.sleep(0, result=False))

    async def go():
        r = await serving_obj.generate(http, body, [97, 98], serving_obj.sampling(body, [97, 98], 16, None, "p"),
                                       CompositionParams(), **kw)
        if not hasattr(r, "body_iterator"):
            return r
        return [part async for part in r.body_iterator]

    return asyncio.run(go())


EVENTS = [Event(0, text="he", token_ids=[1]), Event(1, text="x", token_ids=[2], finish_reason="length"),
          Event(0, text="y", token_ids=[3, 4], finish_reason="stop")]


def test_a_whole_completion_response():
    s = serving(OpenAIServingCompletion, FakeEngine(EVENTS))
    r = _run(s, CompletionRequest(prompt="ab", n=2)).model_dump()
    assert r["id"].startswith("cmpl-") and r["object"] == "text_completion"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in r["choices"]] == [(0, "hey", "stop"),
                                                                                  (1, "x", "length")]
    assert r["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert r["composition"] == {"mode": "constellation", "selected": ["legal", "medical"],
                                "alpha": {"medical": 0.25, "legal": 0.5, "code": 0.125}, "entropy_bits": 0.333333}
    assert list(r) == ["id", "object", "created", "model", "system_fingerprint", "choices", "usage", "composition"]


def test_a_streamed_chat_with_usage():
    chat = serving(OpenAIServingChat, FakeEngine(EVENTS))
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], n=2, stream=True,
                                 stream_options={"include_usage": True})
    parts = _run(chat, body)
    assert parts[-1] == "data: [DONE]\n\n" and all(p.endswith("\n\n") for p in parts)
    chunks = [json.loads(p[6:]) for p in parts[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "composition" in chunks[0] and not any("composition" in c for c in chunks[1:])
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [{"role": "assistant", "content": "he"},
                                                             {"role": "assistant", "content": "x"}, {"content": "y"}]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_a_failure_mid_stream_is_an_error_event_then_done():
    events = [Event(0, text="a", token_ids=[1]), Event(0, finish_reason="error", error="boom")]
    s = serving(OpenAIServingCompletion, FakeEngine(events))
    parts = _run(s, CompletionRequest(prompt="ab", stream=True))
    assert parts[-2:] == ['data: {"error":{"message":"boom","type":"server_error","param":null,"code":null}}\n\n',
                          "data: [DONE]\n\n"]
    with pytest.raises(APIError) as e:
        _run(serving(OpenAIServingCompletion, FakeEngine(events)), CompletionRequest(prompt="ab"))
    assert e.value.status == 500 and e.value.message == "boom"


def test_keepalives_while_waiting():
    class Slow(FakeEngine):
        def submit(self, req):
            super().submit(req)
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, req.emit, Event(0, text="a", token_ids=[1], finish_reason="stop"))

    parts = _run(serving(OpenAIServingCompletion, Slow()), CompletionRequest(prompt="ab", stream=True))
    assert parts[0] == ": keep-alive\n\n" and parts[-1] == "data: [DONE]\n\n"


def test_a_full_queue_is_429_with_retry_after():
    s = serving(OpenAIServingCompletion, FakeEngine(exc=QueueFull()))
    with pytest.raises(APIError) as e:
        _run(s, CompletionRequest(prompt="ab"))
    assert (e.value.status, e.value.code, e.value.headers) == (429, "queue_full", {"Retry-After": "1"})



def test_a_steps_events_reach_the_loop_in_one_wake_up():
    async def go():
        loop = asyncio.get_running_loop()
        engine = SimpleNamespace(outboxes=[])
        box = Outbox.of(engine, loop)
        assert Outbox.of(engine, loop) is box and engine.outboxes == [box]
        wakes = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakes.append(a), real(*a))[1]
        q: asyncio.Queue = asyncio.Queue()

        def step(items):  # the engine's thread: a step holds its events
            box.hold()
            for i in items:
                box.put(q, i)
            box.release()

        threading.Thread(target=step, args=(range(16),)).start()
        assert [await asyncio.wait_for(q.get(), 5) for _ in range(16)] == list(range(16))
        assert len(wakes) == 1
        threading.Thread(target=box.put, args=(q, "outside a step")).start()  # handed over at once
        assert await asyncio.wait_for(q.get(), 5) == "outside a step" and len(wakes) == 2
        threading.Thread(target=step, args=((),)).start()  # a step without events wakes nobody
        await asyncio.sleep(0.05)
        assert len(wakes) == 2 and q.empty()

    asyncio.run(go())
