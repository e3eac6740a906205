"""``POST /explain`` through a real server on a loopback port (issue "An honest, complete API surface",
its ``/explain`` items): every composed layer listed, no index diagnostics repeated, an entropy
that means something in every mode, and a 400 with the message for what the caller can fix."""

import math
import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.loopback import LoopbackServer
from composer.modes import CompositionError
from server.app import create_app
from server.engine import Limits

DOMAINS = ("medical", "legal", "code", "science")
# prompts longer than the fixture model's 128 positions fit --max-prompt-tokens here
LIMITS = Limits(max_running=4, max_prompt_tokens=512, max_new_tokens=8, max_seq_len=1024)
PROMPT = "The patient fever biopsy dose"


def _load(conf):
    from index_store.loader import load_constellation

    return load_constellation(conf)


def _variant(conf, layers: str):
    """The same constellation (models, index) with another ``[composition].layers`` setting."""
    text = conf.read_text()
    assert re.search(r"^layers = .*$", text, flags=re.M)
    out = conf.parent / f"constellation-layers-{layers.strip(chr(34))}.toml"
    out.write_text(re.sub(r"^layers = .*$", f"layers = {layers}", text, flags=re.M))
    return out


@pytest.fixture(scope="module")
def conf(built):
    # llama; medical/legal/code differ from G in the last 2 of 6 layers, science in every tensor
    return built("llama", domains=DOMAINS, everywhere=("science",))


@pytest.fixture(scope="module")
def loaded(conf):
    return _load(conf)


@pytest.fixture(scope="module")
def url(loaded):
    with LoopbackServer(create_app(loaded, LIMITS)) as u:
        yield u


def explain(url, **body):
    body.setdefault("prompt", PROMPT)
    return httpx.post(url + "/explain", json=body, timeout=60)


# ---- 1: composed_layers lists every layer; layers is the setting --------------------------------
@pytest.mark.parametrize("setting,want", [('"auto"', "auto"), ("4", 4)])
def test_composed_layers_lists_every_layer_and_layers_is_the_setting(conf, setting, want):
    loaded = _load(_variant(conf, setting))
    n = loaded.constellation.n
    expected = list(range(n)) if want == "auto" else list(range(n - want, n))  # science changes every layer
    assert len(expected) > 2  # a range's two ends would differ from the list
    with LoopbackServer(create_app(loaded, LIMITS)) as u:
        for comp in ({}, {"mode": "task_arithmetic"}, {"mode": "logit"}):
            doc = explain(u, composition=comp).json()
            assert doc["composed_layers"] == expected, comp
            assert all(type(i) is int for i in doc["composed_layers"])
            assert doc["layers"] == want and type(doc["layers"]) is type(want)


# ---- 2: the index diagnostics are GET /index's, not repeated in every answer ---------------------
def test_explain_does_not_repeat_the_index_diagnostics(url):
    index = httpx.get(url + "/index", timeout=60).json()
    assert "raw_cosine" in index and "recommendation" in index
    for comp in ({}, {"mode": "routed"}, {"mode": "logit"}):
        doc = explain(url, composition=comp).json()
        assert "index" not in doc
        assert not set(doc) & {"raw_cosine", "residual_ratios", "recommendation", "mean_collinearity"}
    chat = explain(url, prompt=None, messages=[{"role": "user", "content": PROMPT}]).json()
    assert "index" not in chat and chat["alpha"]


# ---- 3: entropy of the weights each mode gives its specialists ---------------------------------
def _bits(weights) -> float:
    total = sum(weights)
    return -sum(w / total * math.log2(w / total) for w in weights if w > 0) if total > 0 else 0.0


def _entropy_metric(url) -> tuple[float, float]:
    s = c = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=60).text):
        for x in fam.samples:
            if x.name == "constellation_node_entropy_bits_sum":
                s += x.value
            elif x.name == "constellation_node_entropy_bits_count":
                c += x.value
    return s, c


def _generated_entropy(url, comp) -> float:
    r = httpx.post(url + "/v1/completions", timeout=60, json={"model": "constellation", "prompt": PROMPT,
                                                                "max_tokens": 1, "composition": comp})
    assert r.status_code == 200, r.text
    return r.json()["composition"]["entropy_bits"]


def test_entropy_is_that_of_the_weights_task_arithmetic_and_logit_give(url, loaded):
    n = len(loaded.constellation.domains)
    # task arithmetic: every specialist's coefficient is lambda -> log2 N bits; lambda 0 -> none used
    ta = explain(url, composition={"mode": "task_arithmetic"}).json()
    assert ta["lambda"] > 0 and len(ta["selected"]) == n
    assert ta["entropy_bits"] == pytest.approx(math.log2(n), abs=1e-9)
    assert explain(url, composition={"mode": "task_arithmetic", "lambda": 0.0}).json()["entropy_bits"] == 0.0
    # logit: the betas (reported as mean_node_weight) normalised; they are lambda * normalised positive alpha
    lg = explain(url, composition={"mode": "logit"}).json()
    betas = [lg["mean_node_weight"].get(d, 0.0) for d in lg["selected"]]
    assert sum(b > 0 for b in betas) >= 2
    top = sorted(lg["alpha"].values(), reverse=True)[:len(lg["selected"])]
    assert lg["entropy_bits"] == pytest.approx(_bits(betas), abs=1e-9)
    assert lg["entropy_bits"] == pytest.approx(_bits([max(a, 0.0) for a in top]), abs=1e-9)
    assert 0.0 < lg["entropy_bits"] <= math.log2(len(betas)) + 1e-12
    half = explain(url, composition={"mode": "logit", "lambda": 0.5}).json()  # the scale does not change the mix
    assert half["entropy_bits"] == pytest.approx(lg["entropy_bits"], abs=1e-9)
    assert explain(url, composition={"mode": "logit", "lambda": 0.0}).json()["entropy_bits"] == 0.0
    # the constellation mode keeps its mean node entropy; the generalist and routed are 0, uniform log2 N
    assert explain(url).json()["entropy_bits"] > 0
    assert explain(url, composition={"mode": "generalist"}).json()["entropy_bits"] == 0.0
    assert explain(url, composition={"mode": "routed"}).json()["entropy_bits"] == 0.0
    assert explain(url, composition={"mode": "uniform"}).json()["entropy_bits"] == pytest.approx(math.log2(n))
    # the same value in the response's composition summary and in the Prometheus histogram
    for comp, doc in (({"mode": "task_arithmetic"}, ta), ({"mode": "logit"}, lg)):
        s0, c0 = _entropy_metric(url)
        got = _generated_entropy(url, comp)
        s1, c1 = _entropy_metric(url)
        assert got == pytest.approx(doc["entropy_bits"], abs=1e-6) and got > 0
        assert c1 - c0 >= 1 and s1 - s0 == pytest.approx((c1 - c0) * doc["entropy_bits"], abs=1e-6)


# ---- 4: what the caller can fix is a 400 with the message and the parameter, never a 500 -------
REFUSED = [  # (composition, the parameter named)
    ({"mode": ""}, "composition.mode"),
    ({"mode": "nope"}, "composition.mode"),
    ({"mode": "weights"}, "composition.weights"),
    ({"mode": "weights", "weights": {"nope": 1.0}}, "composition.weights"),
    ({"mode": "constellation", "top_k": 9}, "composition.top_k"),
    ({"mode": "logit", "top_k": 5}, "composition.top_k"),
    ({"mode": "routed", "top_k": 2}, "composition.top_k"),
    ({"mode": "task_arithmetic", "top_k": 9}, "composition.top_k"),
    ({"mode": "routed", "domains": ["nope"]}, "composition.domains"),
    ({"mode": "task_arithmetic", "domains": ["medical", "nope"]}, "composition.domains"),
    ({"mode": "task_arithmetic", "lambda": 2.0}, "composition.lambda"),
]


@pytest.mark.parametrize("comp,param", REFUSED)
def test_bad_compositions_are_400_with_message_and_param(url, comp, param):
    r = explain(url, composition=comp)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert "internal error" not in err["message"] and param.split(".")[1] in err["message"]


def test_a_composition_error_from_planning_keeps_its_message(url, loaded, monkeypatch):
    """Should a case get past validation, planning's CompositionError is still a 400 with its message."""
    def plan(*a, **k):
        raise CompositionError("composition.weights cannot be honoured here", "composition.weights")

    monkeypatch.setattr(loaded.constellation, "plan", plan)
    r = explain(url, composition={"mode": "weights", "weights": {"medical": 1.0}})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": "composition.weights cannot be honoured here",
                                 "type": "invalid_request_error", "param": "composition.weights", "code": None}


def test_a_prompt_beyond_the_models_positions_is_400(url, loaded, built):
    """--max-prompt-tokens above the model's positions: 400 context_length_exceeded, not a 500 (gpt2's
    learned positions end at 128) nor an answer on positions the model never had (llama)."""
    positions = loaded.constellation.g.mc.max_positions
    long = "The patient"
    while len(loaded.tokenizer(long)["input_ids"]) <= positions:
        long += " fever"
    assert len(loaded.tokenizer(long)["input_ids"]) < LIMITS.max_prompt_tokens  # only the positions refuse it
    gpt2 = _load(built("gpt2", domains=("medical", "legal", "code")))
    with LoopbackServer(create_app(gpt2, LIMITS)) as g_url:
        for u in (url, g_url):
            r = explain(u, prompt=long)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
            chat = explain(u, prompt=None, messages=[{"role": "user", "content": long}])
            assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
            assert explain(u, prompt="The patient").status_code == 200
    r = explain(url, prompt="")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
