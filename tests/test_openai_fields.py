"""Every request field of OpenAI's completions and chat completions: the table in docs/server.md
says "supported" or "refused (400)", and this file proves each row through a real server on a
loopback port and the official ``openai`` client (issue "An honest, complete API surface")."""

import json
import logging
import math
import re
import typing
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from bench.loopback import LoopbackServer
from server.app import create_app
from server.engine import Limits

DOCS = Path(__file__).resolve().parents[1] / "docs" / "server.md"
ROW = re.compile(r"^\| `(\w+)` \| (completions|chat|both) \| (supported|refused \(400\)) \|")
MSG = [{"role": "user", "content": "The patient was given"}]
GENERALIST = {"composition": {"mode": "generalist"}}


def table() -> dict[str, tuple[set[str], str]]:
    rows = {}
    for line in DOCS.read_text().splitlines():
        m = ROW.match(line)
        if m:
            routes = {"completions", "chat"} if m[2] == "both" else {m[2]}
            rows[m[1]] = (routes, m[3])
    return rows


def client_fields(route: str) -> set[str]:
    mod = completion_params if route == "completions" else chat_params
    return set(typing.get_type_hints(mod.CompletionCreateParamsBase)) | {"stream"}


@pytest.fixture(scope="module")
def loaded(built):
    from index_store.loader import load_constellation

    return load_constellation(built("llama", domains=("medical", "legal", "code")))


@pytest.fixture(scope="module")
def url(loaded):
    app = create_app(loaded, Limits(max_running=8, max_prompt_tokens=96, max_new_tokens=24, max_seq_len=160))
    with LoopbackServer(app) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def create(client, route: str, **kw):
    if route == "completions":
        return client.completions.create(model="constellation", prompt=kw.pop("prompt", "The patient was given"),
                                         **kw)
    return client.chat.completions.create(model="constellation", messages=kw.pop("messages", MSG), **kw)


# ---- the table is complete -----------------------------------------------------------------------
def test_the_table_lists_every_field_of_both_routes():
    rows = table()
    assert len(rows) >= 40
    for route in ("completions", "chat"):
        listed = {f for f, (routes, _) in rows.items() if route in routes}
        missing = client_fields(route) - listed
        # a field a newer client knows and the table does not: it must be refused (next test)
        assert not missing or all(f not in {"prompt", "messages", "model"} for f in missing)
        assert listed <= client_fields(route) | {"stream"}, listed - client_fields(route)


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_fields_outside_the_table_are_refused(client, route):
    unknown = sorted(client_fields(route) - {f for f, (r, _) in table().items() if route in r}) + ["frobnicate"]
    for field in unknown:
        with pytest.raises(openai.BadRequestError) as e:
            create(client, route, max_tokens=2, extra_body={field: {"x": 1}})
        assert e.value.body["param"] == field and "unrecognized request argument" in e.value.body["message"]


def test_an_unknown_field_in_a_message_is_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        create(client, "chat", max_tokens=2, messages=[{"role": "user", "content": "hi", "frob": "ann"}])
    assert e.value.body["param"] == "messages.0.frob"
    with pytest.raises(openai.BadRequestError) as e:  # a tool call needs an id and a function
        create(client, "chat", max_tokens=2, messages=[{"role": "assistant", "tool_calls": [{"type": "function"}]}])
    assert e.value.body["param"].startswith("messages.0.tool_calls")


# ---- refused rows --------------------------------------------------------------------------------
ASKS = {  # a value that asks for what the server does not do
    "suffix": "and so on", "functions": [{"name": "f", "parameters": {}}], "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"}, "store": True,
    "metadata": {"k": "v"}, "service_tier": "priority", "reasoning_effort": "high", "verbosity": "low",
    "web_search_options": {"search_context_size": "low"}, "moderation": {"x": 1}, "prompt_cache_key": "k1",
    "prompt_cache_options": {"x": 1}, "prompt_cache_retention": "24h",
}
NOOP = {  # values that ask for nothing: accepted
    "suffix": [None, ""], "functions": [[]], "function_call": ["none"],
    "modalities": [["text"]], "store": [False], "metadata": [{}],
    "service_tier": ["auto", "default"],
}


def refused_rows():
    return [(f, route) for f, (routes, status) in table().items() if status == "refused (400)" for route in routes]


def test_every_refused_row_has_a_value_to_try():
    assert {f for f, _ in refused_rows()} == set(ASKS)


@pytest.mark.parametrize("field,route", refused_rows())
def test_refused_rows_are_400_naming_the_field(client, field, route):
    with pytest.raises(openai.BadRequestError) as e:
        create(client, route, max_tokens=2, extra_body={field: ASKS[field]})
    assert e.value.body["param"] == field and e.value.body["type"] == "invalid_request_error"
    for ok in NOOP.get(field, []):
        r = create(client, route, max_tokens=2, extra_body={field: ok})
        assert r.choices[0].finish_reason in ("stop", "length")


# ---- supported rows: each has a behaviour test below ----------------------------------------------------------
def test_every_supported_row_has_a_behaviour_test():
    supported = {f for f, (_, status) in table().items() if status == "supported"}
    tested = {name.removeprefix("test_supported_").split("__")[0] for name in globals()
              if name.startswith("test_supported_")}
    assert supported <= tested, supported - tested


def test_supported_model(client, url):
    assert client.models.retrieve("constellation").id == "constellation"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"


def test_supported_prompt(client, loaded):
    ids = loaded.tokenizer("The patient was given", add_special_tokens=True)["input_ids"]
    a = create(client, "completions", prompt="The patient was given", max_tokens=5, temperature=0)
    b = create(client, "completions", prompt=ids, max_tokens=5, temperature=0)
    c = create(client, "completions", prompt=["The patient was given"], max_tokens=5, temperature=0)
    assert a.choices[0].text == b.choices[0].text == c.choices[0].text
    assert a.usage.prompt_tokens == len(ids)


def test_supported_messages(client):
    r = create(client, "chat", max_tokens=3, messages=[{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens > 3
    with pytest.raises(openai.BadRequestError) as e:
        create(client, "chat", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert e.value.body["param"] == "messages"


def test_supported_max_tokens(client):
    for route in ("completions", "chat"):
        r = create(client, route, max_tokens=7, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError) as e:
            create(client, route, max_tokens=25)
        assert e.value.body["param"] == "max_tokens"
    assert create(client, "completions", extra_body={"ignore_eos": True}).usage.completion_tokens == 16


def test_supported_max_completion_tokens(client):
    r = client.chat.completions.create(model="constellation", messages=MSG, max_completion_tokens=5,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_supported_temperature(client):
    a = [create(client, "completions", max_tokens=6, temperature=0, seed=s).choices[0].text for s in (1, 2)]
    assert a[0] == a[1]
    with pytest.raises(openai.BadRequestError) as e:
        create(client, "completions", max_tokens=2, temperature=2.5)
    assert e.value.body["param"] == "temperature"


def test_supported_top_p(client):
    greedy = create(client, "completions", max_tokens=6, temperature=0).choices[0].text
    for s in (1, 2, 3):  # only the most likely token is left in the nucleus
        assert create(client, "completions", max_tokens=6, temperature=1, top_p=1e-6, seed=s).choices[0].text == greedy


def test_the_top_k_extension(client):
    greedy = create(client, "completions", max_tokens=6, temperature=0).choices[0].text
    for s in (1, 2, 3):  # only the most likely token is left
        assert create(client, "completions", max_tokens=6, temperature=1.5, seed=s,
                      extra_body={"top_k": 1}).choices[0].text == greedy
    texts = {create(client, "completions", max_tokens=6, temperature=1.5, seed=s,
                    extra_body={"top_k": -1}).choices[0].text for s in (1, 2, 3, 4)}
    assert len(texts) > 1  # -1 (as 0) keeps every token
    with pytest.raises(openai.BadRequestError) as e:
        create(client, "completions", max_tokens=2, extra_body={"top_k": -2})
    assert e.value.body["param"] == "top_k"


def test_supported_n(client):
    for route in ("completions", "chat"):
        r = create(client, route, max_tokens=4, n=3, seed=5, extra_body={"ignore_eos": True})
        assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 12


def test_supported_seed(client):
    for route in ("completions", "chat"):
        a, b = (create(client, route, max_tokens=8, temperature=1, seed=42) for _ in range(2))
        texts = [(x.choices[0].text if route == "completions" else x.choices[0].message.content) for x in (a, b)]
        assert texts[0] == texts[1]


def test_supported_stop(client):
    full = create(client, "completions", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    stop = full.strip()[2:5] or full[:2]
    r = create(client, "completions", max_tokens=12, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert stop not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    assert full.startswith(r.choices[0].text)


def test_supported_stream(client):
    for route in ("completions", "chat"):
        chunks = list(create(client, route, max_tokens=4, stream=True, extra_body={"ignore_eos": True}))
        assert chunks[-1].choices[0].finish_reason == "length" and len({c.id for c in chunks}) == 1
        assert all(c.system_fingerprint == chunks[0].system_fingerprint for c in chunks)


def test_supported_stream_options(client):
    chunks = list(create(client, "chat", max_tokens=4, stream=True, stream_options={"include_usage": True},
                         extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_supported_logprobs(client):
    r = create(client, "completions", max_tokens=5, logprobs=0, temperature=1, seed=3)
    lp = r.choices[0].logprobs
    # logprobs=0: the chosen token alone (it was [null, ...]); OpenAI: "up to logprobs + 1 elements"
    assert all(list(top) == [tok] for top, tok in zip(lp.top_logprobs, lp.tokens))
    r = create(client, "completions", max_tokens=5, logprobs=2, temperature=1, seed=3)
    lp = r.choices[0].logprobs
    for top, tok, v in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs):
        # (two ids may decode alike, so the chosen one is found by its value)
        assert 2 <= len(top) <= 3 and any(x == pytest.approx(v) for x in top.values()) and v <= 0
    c = create(client, "chat", max_tokens=4, logprobs=True)
    assert len(c.choices[0].logprobs.content) == c.usage.completion_tokens


def test_supported_top_logprobs(client):
    c = create(client, "chat", max_tokens=4, logprobs=True, top_logprobs=3)
    assert all(len(t.top_logprobs) == 3 for t in c.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError) as e:
        create(client, "chat", max_tokens=2, top_logprobs=3)
    assert e.value.body["param"] == "top_logprobs"


def test_supported_echo(client):
    prompt = "The patient was given"
    r = create(client, "completions", prompt=prompt, max_tokens=4, echo=True, temperature=0)
    plain = create(client, "completions", prompt=prompt, max_tokens=4, temperature=0)
    assert r.choices[0].text == prompt + plain.choices[0].text
    streamed = "".join(c.choices[0].text for c in create(client, "completions", prompt=prompt, max_tokens=4,
                                                         echo=True, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_supported_echo__logprobs_equal_the_generations(client):
    """The prompt's logprobs under echo are the composed model's: scoring a prompt followed by a
    generated continuation (max_tokens=0) gives the continuation the logprobs its generation reported
    (generalist mode, so the composition does not depend on the prompt's length)."""
    prompt = "The patient was given"
    gen = create(client, "completions", prompt=prompt, max_tokens=6, temperature=0, logprobs=1,
                 extra_body={**GENERALIST, "ignore_eos": True})
    ids_text = prompt + gen.choices[0].text
    scored = create(client, "completions", prompt=ids_text, max_tokens=0, echo=True, logprobs=1, extra_body=GENERALIST)
    lp = scored.choices[0].logprobs
    assert scored.usage.completion_tokens == 0 and scored.choices[0].text == ids_text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[-6:] == gen.choices[0].logprobs.tokens
    assert lp.token_logprobs[-6:] == pytest.approx(gen.choices[0].logprobs.token_logprobs, abs=2e-3)
    with pytest.raises(openai.BadRequestError) as e:
        create(client, "completions", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    # every mode scores the prompt (logit mode mixes the specialists' log-probabilities)
    for mode in ("constellation", "logit", "task_arithmetic"):
        s = create(client, "completions", prompt=prompt, max_tokens=0, echo=True, logprobs=2,
                   extra_body={"composition": {"mode": mode}})
        assert all(v <= 0 for v in s.choices[0].logprobs.token_logprobs[1:]) and s.composition["mode"] == mode


def test_supported_best_of(client):
    """best_of=3 generates the three sequences n=3 generates with the same seed (seed + index) and
    returns the one with the highest log-probability per token."""
    kw = dict(prompt="The court", max_tokens=6, temperature=1.0, seed=11)
    three = create(client, "completions", n=3, logprobs=0, **kw)
    mean = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in three.choices]
    best = create(client, "completions", best_of=3, **kw)
    assert [c.text for c in best.choices] == [three.choices[mean.index(max(mean))].text]
    assert best.usage.completion_tokens == three.usage.completion_tokens
    two = create(client, "completions", best_of=3, n=2, **kw)
    order = sorted(range(3), key=lambda i: -mean[i])[:2]
    assert [c.text for c in two.choices] == [three.choices[i].text for i in order]
    for bad in (dict(best_of=1, n=2), dict(best_of=3, stream=True)):
        with pytest.raises(openai.BadRequestError) as e:
            create(client, "completions", max_tokens=2, **bad)
        assert e.value.body["param"] == "best_of"


def reference_greedy(loaded, ids: list[int], n: int, presence=0.0, frequency=0.0, bias=None) -> list[int]:
    """Greedy decoding under OpenAI's adjustments, computed here from the library's generalist
    logits over the whole sequence at each step (no engine, no KV cache)."""
    import torch
    import torch.nn.functional as F

    from composer.modes import CompositionParams

    c, out = loaded.constellation, []
    with torch.inference_mode():
        for _ in range(n):
            seq = torch.tensor([ids + out])
            gp = c.generalist_pass(seq)
            logp = F.log_softmax(c.composed_logits(gp, [c.plan(gp, 0, CompositionParams(mode="generalist"))])[0, -1]
                                 .float(), -1)
            for t, b in (bias or {}).items():
                logp[t] += b
            for t in set(out):
                logp[t] -= frequency * out.count(t) + presence
            logp[list(c.g.mc.eos_token_ids)] = float("-inf")  # ignore_eos
            out.append(int(logp.argmax()))
    return out


@pytest.mark.parametrize("presence,frequency", [(1.5, 0.0), (0.0, 1.0), (0.5, 0.75), (-1.0, 0.0)])
def test_supported_presence_penalty__and_frequency_penalty(client, loaded, presence, frequency):
    """Greedy under penalties is the greedy choice after subtracting ``count * frequency +
    (count > 0) * presence`` from each generated token's log-probability (OpenAI's formula, over
    the tokens generated so far), token for token against a reference decoder."""
    ids = loaded.tokenizer("the the the the", add_special_tokens=True)["input_ids"]
    kw = dict(prompt=ids, max_tokens=10, temperature=0, extra_body={**GENERALIST, "ignore_eos": True})
    r = create(client, "completions", presence_penalty=presence, frequency_penalty=frequency, **kw)
    want = reference_greedy(loaded, ids, 10, presence, frequency)
    assert r.choices[0].text == loaded.tokenizer.decode(want, skip_special_tokens=True)
    plain = create(client, "completions", **kw)
    assert plain.choices[0].text == loaded.tokenizer.decode(reference_greedy(loaded, ids, 10), skip_special_tokens=True)
    assert (r.choices[0].text != plain.choices[0].text) == (want != reference_greedy(loaded, ids, 10))
    with pytest.raises(openai.BadRequestError) as e:
        create(client, "chat", max_tokens=2, presence_penalty=2.5)
    assert e.value.body["param"] == "presence_penalty"


def test_supported_frequency_penalty(client, loaded):
    tok = loaded.tokenizer
    ids = tok(tok.apply_chat_template(MSG, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    r = create(client, "chat", max_tokens=8, temperature=0, frequency_penalty=2.0,
               extra_body={**GENERALIST, "ignore_eos": True})
    assert r.choices[0].message.content == tok.decode(reference_greedy(loaded, ids, 8, frequency=2.0), skip_special_tokens=True)
    with pytest.raises(openai.BadRequestError) as e:
        create(client, "completions", max_tokens=2, frequency_penalty=-3)
    assert e.value.body["param"] == "frequency_penalty"


def test_supported_logit_bias(client, loaded):
    tok = loaded.tokenizer
    forced = tok("legal", add_special_tokens=False)["input_ids"][0]
    r = create(client, "completions", max_tokens=5, temperature=1, seed=1, logit_bias={str(forced): 100},
               extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode([forced]) * 5
    greedy = create(client, "chat", max_tokens=1, temperature=0, logprobs=True).choices[0].logprobs.content[0]
    first = tok(greedy.token, add_special_tokens=False)["input_ids"][0]
    banned = create(client, "chat", max_tokens=1, temperature=0, logprobs=True, logit_bias={str(first): -100})
    assert banned.choices[0].logprobs.content[0].token != greedy.token
    for bad in ({"99999999": 1}, {"abc": 1}, {"5": 101}):
        with pytest.raises(openai.BadRequestError) as e:
            create(client, "completions", max_tokens=2, logit_bias=bad)
        assert e.value.body["param"].startswith("logit_bias")


def test_supported_user__and_safety_identifier(client, caplog):
    with caplog.at_level(logging.INFO, logger="constellation.server"):
        create(client, "completions", max_tokens=2, user="user-123")
        create(client, "chat", max_tokens=2, safety_identifier="sid-9")
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "user-123" in logged and "sid-9" in logged


def test_supported_safety_identifier(client):
    assert create(client, "chat", max_tokens=2, safety_identifier="abc").choices[0].finish_reason


def test_supported_parallel_tool_calls(client):
    for v in (True, False):
        r = create(client, "chat", max_tokens=2, parallel_tool_calls=v)
        assert r.choices[0].message.tool_calls is None


# ---- usage, fields and errors ------------------------------------------------------------------------------------
def test_an_eos_is_a_completion_token(client, loaded):
    """A choice whose first token is EOS reports 1 completion token and its logprob (it reported 0)."""
    eos = str(loaded.tokenizer.eos_token_id)
    r = create(client, "completions", max_tokens=5, logprobs=1, logit_bias={eos: 100})
    c = r.choices[0]
    assert (c.text, c.finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
    assert len(c.logprobs.tokens) == 1 and math.isfinite(c.logprobs.token_logprobs[0])
    chunks = list(create(client, "chat", max_tokens=5, logit_bias={eos: 100}, stream=True,
                         stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 1
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ""


def test_system_fingerprint_is_stable_and_names_the_index(client):
    a = create(client, "completions", max_tokens=1)
    b = create(client, "chat", max_tokens=1)
    assert a.system_fingerprint == b.system_fingerprint and re.fullmatch(r"fp_[0-9a-f]{12}", a.system_fingerprint)


def test_a_body_that_is_not_json_names_no_parameter(url):
    r = httpx.post(url + "/v1/completions", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] is None and "not valid JSON" in err["message"]


def test_no_cdn_page_and_the_schema_documents_400(url):
    assert httpx.get(url + "/docs").status_code == 404 and httpx.get(url + "/redoc").status_code == 404
    schema = httpx.get(url + "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/explain"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses and "400" in responses
    for page in ("/", "/ui/app.js", "/ui/style.css"):
        assert not re.search(r"https?://(?!127\.0\.0\.1|localhost)", httpx.get(url + page).text), page


# ---- structured outputs and tools (more in tests/test_structured.py and tests/test_tools.py) ------------
TOOL = [{"type": "function", "function": {"name": "dose", "parameters": {
    "type": "object", "properties": {"mg": {"enum": [5, 10]}}, "required": ["mg"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def long_client(built):
    """A fixture model with room for a tools prompt (the tiny tokenizer spells it out byte by byte)."""
    from index_store.loader import load_constellation

    app = create_app(load_constellation(built("llama", max_positions=2048)),
                     Limits(max_running=8, max_prompt_tokens=1900, max_new_tokens=64, max_seq_len=2048))
    with LoopbackServer(app) as u:
        yield openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0)


def test_supported_response_format(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    for route in ("chat", "completions"):
        r = create(client, route, max_tokens=20, extra_body={"response_format": {
            "type": "json_schema", "json_schema": {"name": "r", "schema": schema}}})
        text = r.choices[0].message.content if route == "chat" else r.choices[0].text
        assert json.loads(text) in ({"ok": True}, {"ok": False})


def test_supported_tools(long_client):
    r = create(long_client, "chat", max_tokens=64, tools=TOOL, tool_choice="required", parallel_tool_calls=False)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "dose" and json.loads(call.function.arguments)["mg"] in (5, 10)


def test_supported_tool_choice(long_client):
    named = {"type": "function", "function": {"name": "dose"}}
    r = create(long_client, "chat", max_tokens=64, tools=TOOL, tool_choice=named, parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls"
    r = create(long_client, "chat", max_tokens=3, tools=TOOL, tool_choice="none")
    assert r.choices[0].message.tool_calls is None


def test_supported_parallel_tool_calls__with_tools(long_client):
    r = create(long_client, "chat", max_tokens=64, tools=TOOL, tool_choice="required", parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1 and r.choices[0].finish_reason == "tool_calls"
