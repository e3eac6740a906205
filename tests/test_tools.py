"""Tool calls (``tools``, ``tool_choice``, ``parallel_tool_calls``, ``role: "tool"``) through a real
server: the generic JSON format on a template without tool support (as the demo's), and the hermes
format on a Qwen2-shaped fixture with Qwen2.5-Instruct's real chat template
(tests/data/qwen2.5-instruct.chat_template.jinja, as published with the model); the official
``openai`` client, LangChain and LiteLLM as clients."""

import json
import os
from pathlib import Path

import jsonschema
import openai
import pytest

from bench.loopback import LoopbackServer
from server.app import create_app
from server.engine import Limits
from server.tool_calls import GENERIC, HERMES, ToolPlan, ToolStream

QWEN_TEMPLATE = (Path(__file__).parent / "data" / "qwen2.5-instruct.chat_template.jinja").read_text()
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
             "additionalProperties": False}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
LIMITS = Limits(max_running=16, max_prompt_tokens=1900, max_new_tokens=96, max_seq_len=2048)


def serve(loaded):
    with LoopbackServer(create_app(loaded, LIMITS)) as u:
        yield u


@pytest.fixture(scope="module")
def generic_url(built):
    from index_store.loader import load_constellation

    yield from serve(load_constellation(built("llama", max_positions=2048)))


@pytest.fixture(scope="module")
def hermes_url(built):
    from index_store.loader import load_constellation

    loaded = load_constellation(built("qwen2", max_positions=2048))
    loaded.tokenizer.chat_template = QWEN_TEMPLATE
    yield from serve(loaded)


@pytest.fixture(scope="module", params=[GENERIC, HERMES])
def client(request, generic_url, hermes_url):
    url = generic_url if request.param == GENERIC else hermes_url
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def valid_calls(message, names=None):
    assert message.tool_calls, message
    for c in message.tool_calls:
        assert c.id.startswith("call_") and c.type == "function"
        assert names is None or c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    return message.tool_calls


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_gives_calls_that_follow_the_schemas(client, seed):
    r = client.chat.completions.create(model="constellation", messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=90, temperature=1.0, seed=seed, parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls"
    assert len(valid_calls(r.choices[0].message)) == 1


def test_a_named_function_is_the_one_called(client):
    r = client.chat.completions.create(model="constellation", messages=ASK, tools=TOOLS, max_tokens=90,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       parallel_tool_calls=False)
    assert [c.function.name for c in valid_calls(r.choices[0].message, {"get_time"})] == ["get_time"]


def test_auto_and_none(client):
    r = client.chat.completions.create(model="constellation", messages=ASK, tools=TOOLS, max_tokens=40, seed=3,
                                       temperature=1.0)
    m = r.choices[0].message
    assert (r.choices[0].finish_reason == "tool_calls") == bool(m.tool_calls)
    if m.tool_calls:
        valid_calls(m)
    r = client.chat.completions.create(model="constellation", messages=ASK, tools=TOOLS, tool_choice="none",
                                       max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_the_tools_are_in_the_prompt(client):
    bare = client.chat.completions.create(model="constellation", messages=ASK, max_tokens=1)
    told = client.chat.completions.create(model="constellation", messages=ASK, tools=TOOLS, max_tokens=1,
                                          tool_choice="required")
    assert told.usage.prompt_tokens > bare.usage.prompt_tokens + 20


def test_streamed_calls_arrive_as_deltas(client):
    s = client.chat.completions.create(model="constellation", messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=90, stream=True, parallel_tool_calls=False)
    calls, finish, content = {}, None, ""
    for ch in s:
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            calls.setdefault(tc.index, {"name": "", "arguments": ""})
            calls[tc.index]["name"] += tc.function.name or ""
            calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS[calls[0]["name"]])


def test_a_tool_result_goes_back_into_the_chat(client):
    r = client.chat.completions.create(model="constellation", messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=90, parallel_tool_calls=False)
    call = r.choices[0].message.tool_calls[0]
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = client.chat.completions.create(model="constellation", messages=follow, tools=TOOLS, tool_choice="auto",
                                        max_tokens=6)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens and r2.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kw,param,needle", [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": TOOLS * 2}, "tools", "same name"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(65)]}, "tools", "limit is 64"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", ""),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
      "tool_choice": "required"}, "tools", "not"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "tools"),
])
def test_bad_tools_are_400s_naming_the_field(client, kw, param, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="constellation", messages=ASK, max_tokens=5, **kw)
    assert e.value.body["param"].startswith(param) and needle in e.value.body["message"]


def test_parameters_with_defs_as_pydantic_writes_them(client):
    """An enum field makes pydantic write ``$defs`` and a ``$ref``: the nested call schema keeps them."""
    from enum import Enum
    from typing import Literal

    from pydantic import BaseModel

    class Unit(str, Enum):
        celsius = "celsius"
        fahrenheit = "fahrenheit"

    class Forecast(BaseModel):
        city: Literal["Paris", "Rome"]
        unit: Unit

    tool = openai.pydantic_function_tool(Forecast)
    assert "$defs" in tool["function"]["parameters"]
    for choice in ("required", "auto"):
        r = client.chat.completions.create(model="constellation", messages=ASK, tools=[tool], tool_choice=choice,
                                           max_tokens=96, parallel_tool_calls=False)
        calls = r.choices[0].message.tool_calls or []
        assert calls or choice == "auto"  # before: a 400, "Pointer '/$defs/Unit' does not exist"
        for c in calls:
            Forecast(**json.loads(c.function.arguments))


# ---- the parsers, on their own -------------------------------------------------------------------
def _plan(fam, choice="auto", parallel=True):
    from server.protocol_tools import Tool

    return ToolPlan(fam, choice, parallel, [Tool(**t) for t in TOOLS], [Tool(**t) for t in TOOLS])


def test_without_parallel_calls_only_the_first_counts():
    two = ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    assert len(_plan(HERMES).parse(two)[1]) == 2
    calls = _plan(HERMES, parallel=False).parse(two)[1]
    assert [json.loads(c.function.arguments)["zone"] for c in calls] == ["UTC"]


def test_hermes_auto_streams_text_then_holds_the_call():
    ts = ToolStream(_plan(HERMES))
    sent = "".join(ts.feed(p) for p in ["Let me check.", " <tool", "_call>\n{\"name\": \"get_time\", ",
                                        "\"arguments\": {\"zone\": \"UTC\"}}\n</tool_call>"])
    assert sent == "Let me check. "
    tail, calls = ts.finish()
    assert tail == "" and calls[0].function.name == "get_time" and json.loads(calls[0].function.arguments) == {
        "zone": "UTC"}
    ts = ToolStream(_plan(HERMES))
    assert ts.feed("a <tool") == "a " and ts.feed("bar> b") == "<toolbar> b" and ts.finish() == ("", [])


def test_generic_parse():
    p = _plan(GENERIC)
    assert p.parse('{"response": "hello"}') == ("hello", [])
    content, calls = p.parse('{"tool_calls": [{"name": "get_time", "arguments": {"zone": "CET"}}]}')
    assert content is None and calls[0].function.arguments == '{"zone": "CET"}'
    assert p.parse('{"tool_calls": [{"na') == ('{"tool_calls": [{"na', [])
    content, calls = p.parse('{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}, {"name": "get_')
    assert content is None and [c.function.name for c in calls] == ["get_time"]  # cut: the whole calls count


# ---- the clients applications are built on --------------------------------------------------------
def test_langchain_structured_output_and_bind_tools(generic_url):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field
    from typing import Literal

    class Forecast(BaseModel):
        """A city's forecast request."""

        city: Literal["Paris", "Rome"]
        days: int = Field(ge=1, le=7)

    llm = ChatOpenAI(base_url=generic_url + "/v1", api_key="unused", model="constellation", max_tokens=80,
                     max_retries=0, temperature=0)
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(Forecast, method=method).invoke("Weather in Paris for three days?")
        assert isinstance(out, Forecast), method
    bound = llm.bind_tools([Forecast], tool_choice="required")
    ai = bound.invoke([HumanMessage("Weather in Rome?")])
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "Forecast"
    Forecast(**ai.tool_calls[0]["args"])
    again = llm.bind_tools([Forecast]).invoke([HumanMessage("Weather in Rome?"), ai,
                                               ToolMessage("sunny", tool_call_id=ai.tool_calls[0]["id"])])
    assert again.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")


def test_litellm_tool_calls(generic_url, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list at import
    import litellm

    litellm.telemetry = False
    r = litellm.completion(model="openai/constellation", api_base=generic_url + "/v1", api_key="unused",
                           messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=90)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name in SCHEMAS
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS[calls[0].function.name])
