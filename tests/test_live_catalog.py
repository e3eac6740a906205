"""Live specialists (issue "Live specialists"): the admin API adds, replaces and removes a
specialist while 16 streams run; no stream fails, each stream's output equals the same request run
alone on the catalog it started with, and new requests compose over the new set. Two server
processes on one folder: a change through one reaches the other."""

import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

import fixtures
from bench.loopback import LoopbackServer
from bench.served import ServedConstellation
from index_store.loader import load_constellation
from server.app import create_app
from server.engine import Limits

ADMIN = {"Authorization": "Bearer admin-secret"}
PROMPTS = [f"The {w} of the {v}" for w in ("patient", "court", "function", "protein") for v in
           ("trial", "contract", "loop", "cell")]  # 16
TOKENS = 100  # long enough that the streams still run when the change is ready to swap in


def make_constellation(built, tmp_path: Path) -> Path:
    src = built("llama", domains=("medical", "legal", "code", "science")).parent
    shutil.copytree(src, tmp_path / "c")
    conf = tmp_path / "c" / "constellation.toml"
    text = conf.read_text().replace('science = "models/science"\n', "")
    conf.write_text(text + '\n[catalog]\nmodels_root = "models"\n')
    # the index of the three (the fixture's was built for four)
    from index_store.loader import build_index
    build_index(conf, quiet=True)
    return conf


@pytest.fixture
def live(built, tmp_path):
    conf = make_constellation(built, tmp_path)
    app = create_app(load_constellation(conf), Limits(max_running=16, max_waiting=64, max_prompt_tokens=64,
                                                      max_new_tokens=100, max_seq_len=128), admin_key="admin-secret")
    with LoopbackServer(app) as url:
        yield url, conf, app


def alone(client, prompt: str) -> str:
    return client.completions.create(model="constellation", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def run_streams_during(client, url: str, change) -> tuple[list[str], list[str | None], dict]:
    """16 greedy streams; once each has its first chunk, ``change()`` runs (an admin call)."""
    texts, errors = [""] * 16, [None] * 16
    started = [threading.Event() for _ in range(16)]

    def stream(i):
        try:
            for chunk in client.completions.create(model="constellation", prompt=PROMPTS[i], max_tokens=TOKENS,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True}):
                if chunk.choices:
                    texts[i] += chunk.choices[0].text
                started[i].set()
        except Exception as e:  # noqa: BLE001
            errors[i] = repr(e)
            started[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(60)
    answer = change()
    for t in threads:
        t.join(120)
    return texts, errors, answer


def test_add_replace_remove_with_16_streams_running(live):
    url, conf, app = live
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    root = conf.parent / "models"
    texts = fixtures.probe_texts(0)["science"]
    before = [alone(client, p) for p in PROMPTS]
    steps = [
        ("add", lambda: httpx.post(url + "/v1/specialists", headers=ADMIN, timeout=120,
                                   json={"name": "science", "path": str(root / "science"), "probes": texts})),
        ("replace", lambda: httpx.post(url + "/v1/specialists", headers=ADMIN, timeout=120, json={
            "name": "science", "path": str(root / "legal"), "probes": fixtures.probe_texts(3)["science"],
            "replace": True})),
        ("remove", lambda: httpx.delete(url + "/v1/specialists/science", headers=ADMIN, timeout=120)),
    ]
    expected = before
    for version, (op, change) in enumerate(steps, start=1):
        got, errors, r = run_streams_during(client, url, change)
        assert r.status_code == 200, (op, r.text)
        assert errors == [None] * 16, (op, errors)
        assert got == expected, op  # each as it ran alone on the catalog it started with
        # the swap waited for streams that were running on the old catalog
        assert len(app.state.engine.swap_waits) == version and app.state.engine.swap_waits[-1] > 0, op
        doc = r.json()
        assert doc["catalog_version"] == version
        names = [s["name"] for s in doc["specialists"]]
        assert ("science" in names) == (op != "remove"), (op, names)
        # new requests compose over the new set
        after = client.completions.create(model="constellation", prompt=PROMPTS[0], max_tokens=1)
        assert ("science" in after.model_extra["composition"]["alpha"]) == (op != "remove")
        assert httpx.get(url + "/ready").json()["catalog_version"] == version
        assert httpx.get(url + "/index").json()["catalog_version"] == version
        assert client.models.retrieve("constellation").model_extra["catalog_version"] == version
        assert httpx.post(url + "/explain", json={"prompt": PROMPTS[0]}).json()["catalog_version"] == version
        assert f'constellation_catalog_version{{model_name="constellation"}} {float(version)}' in \
            httpx.get(url + "/metrics").text
        expected = [alone(client, p) for p in PROMPTS]
    # back to the first three: the same outputs as at the start
    assert expected == before


def test_the_admin_api_refuses_and_changes_nothing(live, tmp_path):
    url, conf, app = live
    root = conf.parent / "models"
    texts = fixtures.probe_texts(0)["science"]
    outside = tmp_path / "outside"
    shutil.copytree(root / "science", outside)
    before = httpx.get(url + "/v1/specialists", headers=ADMIN).json()
    config_bytes = conf.read_bytes()
    cases = [
        ({"name": "medical", "path": str(root / "science"), "probes": texts}, 409, "name"),
        ({"name": "x", "path": str(root / "science"), "probes": texts[:2]}, 400, "probes"),
        ({"name": "x", "path": str(outside), "probes": texts}, 403, "path"),
        ({"name": "x", "path": str(root / "nowhere"), "probes": texts}, 400, "path"),
        ({"name": "x y", "path": str(root / "science"), "probes": texts}, 400, "name"),
        ({"name": "x", "path": str(root / "science"), "probes_path": "/etc/passwd"}, 403, "probes_path"),
        ({"name": "x", "path": str(root / "science"), "probes": texts, "frobnicate": 1}, 400, "frobnicate"),
    ]
    for body, status, param in cases:
        r = httpx.post(url + "/v1/specialists", headers=ADMIN, json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
    r = httpx.delete(url + "/v1/specialists/nobody", headers=ADMIN)
    assert r.status_code == 404 and "no specialist" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/specialists", headers=ADMIN).json() == before
    assert conf.read_bytes() == config_bytes
    # the admin key, and only it, opens the admin API
    assert httpx.get(url + "/v1/specialists").status_code == 401
    assert httpx.get(url + "/v1/specialists", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_the_admin_api_is_off_without_an_admin_key(built, tmp_path):
    conf = make_constellation(built, tmp_path)
    app = create_app(load_constellation(conf), Limits(max_running=4, max_seq_len=128, max_prompt_tokens=64),
                     api_key="user-key")
    with LoopbackServer(app) as url:
        r = httpx.get(url + "/v1/specialists", headers={"Authorization": "Bearer user-key"})
        assert r.status_code == 404 and "admin API is off" in r.json()["error"]["message"]


def test_a_change_through_one_replica_reaches_the_other(built, tmp_path):
    """Two `constellation serve` processes on one folder (the shared volume): an add through A's
    admin API is served by B within its poll interval plus the load."""
    conf = make_constellation(built, tmp_path)
    texts = fixtures.probe_texts(0)["science"]
    flags = dict(admin_key="admin-secret", catalog_poll="0.5", max_seq_len=128, max_prompt_tokens=64)
    with ServedConstellation(conf, tmp_path / "a.log", **flags) as a, \
            ServedConstellation(conf, tmp_path / "b.log", **flags) as b:
        r = httpx.post(a + "/v1/specialists", headers=ADMIN, timeout=120,
                       json={"name": "science", "path": str(conf.parent / "models" / "science"), "probes": texts})
        assert r.status_code == 200, r.text
        t0 = time.monotonic()
        while httpx.get(b + "/ready").json()["catalog_version"] != 1:
            assert time.monotonic() - t0 < 30, "replica B did not pick up version 1"
            time.sleep(0.1)
        lag = time.monotonic() - t0
        client = openai.OpenAI(base_url=b + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="constellation", prompt=PROMPTS[0], max_tokens=1)
        assert "science" in r.model_extra["composition"]["alpha"]
        print(f"replica lag: {lag:.2f} s")
