"""The API refuses what it cannot honour with a 400 naming the parameter, through a real server and
the official ``openai`` client (issue "An honest, complete API surface")."""

import json

import httpx
import openai
import pytest

from bench.loopback import LoopbackServer
from server.app import create_app
from server.engine import Limits


@pytest.fixture(scope="module")
def url(built):
    from index_store.loader import load_constellation

    loaded = load_constellation(built("llama", domains=("medical", "legal", "code")))
    app = create_app(loaded, Limits(max_running=4, max_prompt_tokens=64, max_new_tokens=16, max_seq_len=128))
    with LoopbackServer(app) as u:
        yield u


BAD = [  # (composition, the parameter the error names)
    ({"mode": "weights"}, "composition.weights"),
    ({"mode": "weights", "weights": {}}, "composition.weights"),
    ({"mode": "weights", "weights": {"medical": -0.5, "legal": 1.0}}, "composition.weights"),
    ({"mode": "weights", "weights": {"medical": 0.0, "legal": 0.0}}, "composition.weights"),
    ({"mode": "weights", "weights": {"medical": 1e308, "legal": 1e308}}, "composition.weights"),
    ({"mode": "logit", "lambda": 2.0}, "composition.lambda"),
    ({"mode": "task_arithmetic", "lambda": -3.0}, "composition.lambda"),
    ({"mode": "task_arithmetic", "lambda": 1.5}, "composition.lambda"),
]


@pytest.mark.parametrize("comp,param", BAD)
def test_bad_compositions_are_400_naming_the_parameter(url, comp, param):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="constellation", prompt="The patient", max_tokens=2,
                                  extra_body={"composition": comp})
    err = e.value.body
    assert err["param"] == param and err["type"] == "invalid_request_error" and param.split(".")[1] in err["message"]
    chat = httpx.post(url + "/v1/chat/completions", json={"model": "constellation", "max_tokens": 2, "stream": True,
                      "messages": [{"role": "user", "content": "hi"}], "composition": comp})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == param
    explain = httpx.post(url + "/explain", json={"prompt": "The licensee shall", "composition": comp})
    assert explain.status_code == 400 and explain.json()["error"]["param"] == param


def test_nan_weight_is_400(url):
    body = '{"model": "constellation", "prompt": "x", "max_tokens": 2, "composition": {"mode": "weights", ' \
           '"weights": {"medical": NaN}}}'
    r = httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "composition.weights"


def _refusal(client, prompt_len: int, max_tokens: int) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="constellation", prompt=[5] * prompt_len, max_tokens=max_tokens)
    return e.value.body


def test_limit_errors_name_the_option_that_raises_them(url, built):
    """A 400 for a prompt's length, max_tokens or the context names the `constellation serve` option
    that raises the limit, or says the model's own context is the bound; by default the limits are
    the model's own (its 128 positions here), as vLLM's."""
    from index_store.loader import load_constellation

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)  # prompts <= 64, max_tokens <= 16
    err = _refusal(client, 65, 2)
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    assert "at most 64 (`constellation serve --max-prompt-tokens` raises it)" in err["message"], err
    err = _refusal(client, 4, 17)
    assert err["param"] == "max_tokens" and "(`constellation serve --max-new-tokens` raises it)" in err["message"]
    loaded = load_constellation(built("llama", domains=("medical", "legal", "code")))
    assert loaded.constellation.g.mc.max_positions == 128
    for limits, hint in [(Limits(max_running=4), "the model's own context is 128 positions"),
                         (Limits(max_running=4, max_seq_len=100),
                          "`constellation serve --max-seq-len` raises it, up to the model's 128")]:
        app = create_app(loaded, limits)
        seq = app.state.limits.max_seq_len
        assert seq == (limits.max_seq_len or 128) and app.state.limits.max_prompt_tokens == seq - 2
        assert app.state.limits.kv_cache_tokens == 16 * seq  # a small model: 16 sequences fit in the 4 GiB bound
        with LoopbackServer(app) as u:
            c = openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0)
            r = c.completions.create(model="constellation", prompt=[5] * (seq - 2), max_tokens=1)
            assert r.usage.prompt_tokens == seq - 2 and r.usage.completion_tokens == 1
            err = _refusal(c, seq - 1, 1)
            assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
            assert f"at most {seq - 2} ({hint})" in err["message"], err
            err = _refusal(c, 10, seq - 10)
            assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
            assert f"exceeds the {seq}-token context ({hint})" in err["message"], err


def test_the_bounds_admit_what_they_should(url):
    """The edges of each range are served (the checks above are not refusing everything)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    for comp in ({"mode": "weights", "weights": {"medical": 0.0, "legal": 1e6}}, {"mode": "logit", "lambda": 1.0},
                 {"mode": "task_arithmetic", "lambda": 0.0}, {"mode": "logit", "lambda": 0.0}):
        r = client.completions.create(model="constellation", prompt="The patient", max_tokens=2,
                                      extra_body={"composition": comp})
        assert r.choices[0].finish_reason in ("stop", "length"), json.dumps(comp)
