"""Structured outputs (``response_format``): the reply is constrained token by token to JSON or a
JSON schema (llguidance, server.engine.grammar), per row, in every composition mode, through a real
server and the official ``openai`` client; its bounds and unsupported features are 400s naming them."""

import json
import threading

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from typing import Literal

from bench.loopback import LoopbackServer
from server.app import create_app
from server.engine import Limits

MSG = [{"role": "user", "content": "The patient was given"}]
# every leaf bounded, so a grammar-following reply must end well inside max_tokens
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
     "required": ["name", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"enum": ["tablet", "syrup", "injection"]},
                                      "dose": {"type": "integer", "minimum": 1, "maximum": 500}},
     "required": ["kind", "dose"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                                      "score": {"type": "integer", "minimum": -5, "maximum": 5}},
     "required": ["tags", "score"], "additionalProperties": False},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {"flag": {"type": "boolean"},
                                                                                  "code": {"enum": [1, 2, 3]}},
                                                "required": ["flag", "code"], "additionalProperties": False},
                                      "note": {"anyOf": [{"type": "null"}, {"enum": ["x", "y"]}]}},
     "required": ["inner", "note"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"when": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$"}},
     "required": ["when"], "additionalProperties": False},
]
MODES = [None, {"mode": "generalist"}, {"mode": "paper"}, {"mode": "routed"}, {"mode": "uniform"},
         {"mode": "logit"}, {"mode": "task_arithmetic"}]


@pytest.fixture(scope="module")
def loaded(built):
    from index_store.loader import load_constellation

    return load_constellation(built("llama", max_positions=2048))


@pytest.fixture(scope="module")
def url(loaded):
    app = create_app(loaded, Limits(max_running=32, max_prompt_tokens=1900, max_new_tokens=96, max_seq_len=2048))
    with LoopbackServer(app) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def fmt(schema, name="reply"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("k", range(len(SCHEMAS)))
def test_replies_validate_against_their_schema(client, k, temperature):
    r = client.chat.completions.create(model="constellation", messages=MSG, max_tokens=80, n=3, seed=k,
                                       temperature=temperature, response_format=fmt(SCHEMAS[k]))
    for ch in r.choices:
        assert ch.finish_reason == "stop", ch.message.content
        jsonschema.validate(json.loads(ch.message.content), SCHEMAS[k])


def test_json_object_and_completions(client):
    r = client.chat.completions.create(model="constellation", messages=MSG, max_tokens=60, seed=1,
                                       temperature=1.0, response_format={"type": "json_object"})
    c = r.choices[0]
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    else:  # cut by max_tokens: then it is an unfinished object
        assert c.finish_reason == "length" and c.message.content.startswith("{")
    r = client.completions.create(model="constellation", prompt="The court held", max_tokens=60,
                                  extra_body={"response_format": fmt(SCHEMAS[1])})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS[1])


def test_a_cut_reply_says_length(client):
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 40}}, "required": ["text"]}
    r = client.chat.completions.create(model="constellation", messages=MSG, max_tokens=12, response_format=fmt(schema))
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and text.startswith('{"text": "')
    with pytest.raises(ValueError):
        json.loads(text)


def test_streamed_reply_validates(client):
    s = client.chat.completions.create(model="constellation", messages=MSG, max_tokens=80, stream=True,
                                       temperature=0.7, seed=5, response_format=fmt(SCHEMAS[3]))
    text, finish = "", None
    for ch in s:
        text += ch.choices[0].delta.content or ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS[3])


def test_sixteen_streams_each_its_own_schema_and_composition(client):
    """Every row its own grammar, in one batch, across composition modes (logit mode included)."""
    out, errors = {}, []

    def one(i):
        try:
            schema = SCHEMAS[i % len(SCHEMAS)]
            s = client.chat.completions.create(
                model="constellation", messages=[{"role": "user", "content": f"Case {i}: the patient was given"}],
                max_tokens=80, stream=True, temperature=0.8, seed=i, response_format=fmt(schema),
                extra_body={"composition": MODES[i % len(MODES)]} if MODES[i % len(MODES)] else None)
            text = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
            jsonschema.validate(json.loads(text), schema)
            out[i] = text
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 16


def test_parse_with_a_pydantic_model(client):
    class Dose(BaseModel):
        drug: Literal["aspirin", "ibuprofen"]
        milligrams: int = Field(ge=1, le=1000)
        with_food: bool

    r = client.beta.chat.completions.parse(model="constellation", messages=MSG, max_tokens=80, response_format=Dose) \
        if hasattr(client, "beta") and hasattr(client.beta, "chat") else \
        client.chat.completions.parse(model="constellation", messages=MSG, max_tokens=80, response_format=Dose)
    assert isinstance(r.choices[0].message.parsed, Dose)


def test_grammars_are_compiled_once_per_schema(client, url):
    schema = {"type": "object", "properties": {"z": {"enum": ["only"]}}, "required": ["z"], "additionalProperties": False}
    r1 = client.chat.completions.create(model="constellation", messages=MSG, max_tokens=40, response_format=fmt(schema))
    before = _compiled(url)
    r2 = client.chat.completions.create(model="constellation", messages=MSG, max_tokens=40, response_format=fmt(schema))
    assert _compiled(url) == before
    assert json.loads(r1.choices[0].message.content) == json.loads(r2.choices[0].message.content) == {"z": "only"}


def _compiled(url):
    import httpx

    text = httpx.get(url + "/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith("constellation_grammars_compiled_total"))
    return float(line.split()[-1])


@pytest.mark.parametrize("schema,needle", [
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "dependentRequired": {"a": ["b"]}},
     "dependentRequired"),
    ({"$ref": "http://example.com/s.json"}, "example.com"),
])
def test_unsupported_schema_features_are_400s_naming_them(client, schema, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="constellation", messages=MSG, max_tokens=5, response_format=fmt(schema))
    assert e.value.body["param"] == "response_format" and needle in e.value.body["message"]


def _deep(n):
    s = {"type": "boolean"}
    for _ in range(n):
        s = {"type": "object", "properties": {"a": s}, "required": ["a"]}
    return s


@pytest.mark.parametrize("schema,needle", [
    (_deep(40), "deeper than"),
    ({"enum": list(range(5000))}, "enum has 5000 values"),
    ({"type": "object", "description": "x" * 70_000}, "bytes of JSON"),
])
def test_schema_bounds_are_400s_naming_the_limit(client, schema, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="constellation", messages=MSG, max_tokens=5, response_format=fmt(schema))
    assert e.value.body["param"] == "response_format" and needle in e.value.body["message"]


def test_malformed_response_formats_are_400s(client):
    for bad in ({"type": "json_schema"}, {"type": "xml"}, {"type": "json_object", "json_schema": {"name": "x"}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="constellation", messages=MSG, max_tokens=5, response_format=bad)
        assert e.value.body["param"].startswith("response_format")


def test_bench_structured_smoke(built):
    from bench import structured

    assert structured.main(["--smoke", "--config", str(built("llama", max_positions=2048))]) == 0


def test_bench_grammar_engines_smoke(built, capsys):
    from bench import grammar_engines

    assert grammar_engines.main(["--rows", "2", "--steps", "3", "--config", str(built("llama", max_positions=2048))]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["llguidance"]["compile_ms"] > 0 and out["rows"] == 2
