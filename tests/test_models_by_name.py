"""Specialists and modes by model name (issue "The OpenAI surface that applications are built on",
item 3): ``GET /v1/models`` lists the constellation, each mode and each specialist; a request naming
a specialist runs it alone, one naming ``<served>/<mode>`` runs that mode; a conflicting
``composition`` is a 400, an unknown name a 404; the catalog's add and remove show up in the list.
Through a real server on a loopback port and the official ``openai`` client."""

import httpx
import openai
import pytest
import torch

import fixtures
from bench.loopback import LoopbackServer
from composer.modes import MODES
from index_store.loader import load_constellation
from server.app import create_app
from server.engine import Limits
from test_live_catalog import ADMIN, make_constellation

PROMPT = "The court held that the licensee"


@pytest.fixture(scope="module")
def live(built, tmp_path_factory):
    conf = make_constellation(built, tmp_path_factory.mktemp("names"))  # medical, legal, code; models_root set
    app = create_app(load_constellation(conf), Limits(max_running=8, max_prompt_tokens=64, max_new_tokens=16,
                                                      max_seq_len=128), admin_key="admin-secret")
    with LoopbackServer(app) as url:
        yield url, conf


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(live):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(live[1].parent / "models" / "generalist"))


def greedy(client, model: str, composition: dict | None = None, prompt=PROMPT, **kw):
    extra = {"ignore_eos": True} | ({"composition": composition} if composition is not None else {})
    return client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, extra_body=extra, **kw)


def hf_greedy(folder, ids: list[int], n: int) -> tuple[str, list[float]]:
    """The specialist's own checkpoint, run by transformers: greedy text after the prompt and each
    chosen token's log-probability."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval()
    x, lps = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(m(x).logits[0, -1].float(), -1)
            nxt = int(logp.argmax())
            lps.append(float(logp[nxt]))
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return AutoTokenizer.from_pretrained(str(folder)).decode(x[0, len(ids):].tolist()), lps


def test_models_lists_the_constellation_its_modes_and_its_specialists(client, live):
    ids = [c.id for c in client.models.list().data]
    assert ids == ["constellation", *(f"constellation/{m}" for m in MODES), "medical", "legal", "code"]
    by_id = {c["id"]: c for c in httpx.get(live[0] + "/v1/models").json()["data"]}
    assert by_id["constellation"]["parent"] is None and by_id["constellation"]["mode"] is None
    assert by_id["constellation/paper"] | {"created": 0} == {
        "id": "constellation/paper", "object": "model", "created": 0, "owned_by": "constellation",
        "parent": "constellation", "max_model_len": 128, "catalog_version": 0, "mode": "paper", "specialist": None}
    assert {k: by_id["legal"][k] for k in ("parent", "mode", "specialist")} == {
        "parent": "constellation/generalist", "mode": "routed", "specialist": "legal"}
    assert httpx.get(live[0] + "/v1/models/legal").json() == by_id["legal"]
    assert client.models.retrieve("legal").id == "legal"
    assert client.models.retrieve("constellation/logit").model_extra["mode"] == "logit"
    for missing in ("gpt-4", "constellation/nope", "science"):
        with pytest.raises(openai.NotFoundError) as e:
            client.models.retrieve(missing)
        assert e.value.body["code"] == "model_not_found"


def test_a_specialist_by_name_runs_it_alone(client, live, tokenizer):
    ids = tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    models = live[1].parent / "models"
    outputs = {}
    for name in ("legal", "medical"):
        r = greedy(client, name, prompt=ids, logprobs=0)
        assert r.model == name
        comp = r.model_extra["composition"]
        assert (comp["mode"], comp["selected"], comp["entropy_bits"]) == ("routed", [name], 0.0)
        outputs[name] = r.choices[0].logprobs.token_logprobs
        text, lps = hf_greedy(models / name, ids, 6)
        assert r.choices[0].text == text and outputs[name] == pytest.approx(lps, abs=1e-4), name
    # the name chose the specialist, not the top-1 by alpha
    assert outputs["legal"] != pytest.approx(outputs["medical"], abs=1e-3)
    # the same as composition.specialist with the served name, and streamed chat echoes the name too
    same = greedy(client, "constellation", {"mode": "routed", "specialist": "legal"}, prompt=ids, logprobs=0)
    assert same.choices[0].logprobs.token_logprobs == outputs["legal"]
    chunks = list(client.chat.completions.create(model="legal", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=3, stream=True))
    assert {c.model for c in chunks} == {"legal"} and chunks[0].model_extra["composition"]["selected"] == ["legal"]


def test_a_mode_by_name_runs_that_mode(client, live):
    seen = {}
    for mode in ("paper", "generalist", "logit"):
        r = greedy(client, f"constellation/{mode}", logprobs=0)
        assert r.model == f"constellation/{mode}" and r.model_extra["composition"]["mode"] == mode
        seen[mode] = r.choices[0].logprobs.token_logprobs
        same = greedy(client, "constellation", {"mode": mode}, logprobs=0)
        assert same.model == "constellation" and same.choices[0].logprobs.token_logprobs == pytest.approx(seen[mode])
    assert seen["paper"] != pytest.approx(seen["generalist"], abs=1e-4)  # the names ran different models
    # the mode's own parameters still come through composition
    r = greedy(client, "constellation/paper", {"top_k": 1})
    assert r.model_extra["composition"]["selected"] == [max(r.model_extra["composition"]["alpha"].items(),
                                                            key=lambda kv: kv[1])[0]]
    # /explain takes the name too
    doc = httpx.post(live[0] + "/explain", json={"prompt": PROMPT, "model": "code"}).json()
    assert (doc["mode"], doc["selected"]) == ("routed", ["code"])
    doc = httpx.post(live[0] + "/explain", json={"prompt": PROMPT, "model": "constellation/uniform"}).json()
    assert doc["mode"] == "uniform"


CONFLICTS = [  # (model, composition, the parameter the error names)
    ("legal", {"mode": "paper"}, "composition.mode"),
    ("constellation/paper", {"mode": "logit"}, "composition.mode"),
    ("legal", {"specialist": "medical"}, "composition.specialist"),
    ("legal", {"top_k": 2}, "composition.top_k"),  # routed takes no top_k
    ("constellation", {"mode": "routed", "specialist": "nobody"}, "composition.specialist"),
    ("constellation/paper", {"specialist": "legal"}, "composition.specialist"),
]


@pytest.mark.parametrize("model,comp,param", CONFLICTS)
def test_a_name_and_a_conflicting_composition_are_a_400(client, live, model, comp, param):
    with pytest.raises(openai.BadRequestError) as e:
        greedy(client, model, comp)
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    r = httpx.post(live[0] + "/v1/chat/completions", json={"model": model, "max_tokens": 2, "stream": True,
                   "messages": [{"role": "user", "content": "hi"}], "composition": comp})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_agreeing_names_and_unknown_names(client, live):
    assert greedy(client, "legal", {"mode": "routed"}).model_extra["composition"]["selected"] == ["legal"]
    with pytest.raises(openai.NotFoundError) as e:
        greedy(client, "constellation/nope")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/explain", {"prompt": "hi"})):
        r = httpx.post(live[0] + path, json={"model": "gpt-4", **body})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_the_catalogs_add_and_remove_show_up(client, live):
    url, conf = live
    science = {"name": "science", "path": "science", "probes": fixtures.probe_texts(0)["science"]}
    r = httpx.post(url + "/v1/specialists", headers=ADMIN, timeout=120, json=science)
    assert r.status_code == 200, r.text
    cards = client.models.list().data
    assert [c.id for c in cards][-4:] == ["medical", "legal", "code", "science"]
    assert {c.model_extra["catalog_version"] for c in cards} == {1}
    r = greedy(client, "science")
    assert r.model == "science" and r.model_extra["composition"]["selected"] == ["science"]
    assert httpx.delete(url + "/v1/specialists/science", headers=ADMIN, timeout=120).status_code == 200
    cards = client.models.list().data
    assert "science" not in [c.id for c in cards] and {c.model_extra["catalog_version"] for c in cards} == {2}
    with pytest.raises(openai.NotFoundError):
        greedy(client, "science")
