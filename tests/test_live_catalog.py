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
    from index_store.indexing import build_index
    build_index(conf, quiet=True)
    return conf


@pytest.fixture
def live(built, tmp_path):
    conf = make_constellation(built, tmp_path)
    # room for a 17th row: the request sent after a swap decodes beside the 16 streams (which, started
    # together, are prefilled together and finish together: with 16 rows it would wait them out); the
    # KV memory is 16 rows' worth, so as they grow it is preempted and recomputed (on the new catalog)
    app = create_app(load_constellation(conf), Limits(max_running=17, max_waiting=64, max_prompt_tokens=64,
                                                      max_new_tokens=100, max_seq_len=128), admin_key="admin-secret")
    with LoopbackServer(app) as url:
        yield url, conf, app


def alone(client, prompt: str) -> str:
    return client.completions.create(model="constellation", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def run_streams_during(client, engine, change, then) -> tuple[list[str], list[str | None], object, object]:
    """16 greedy streams decoding when ``change()`` (an admin call) swaps the catalog in, and
    ``then()`` (a request on the new catalog) sent right after the swap, while they still run.
    (The streams start once the change is built, just before the swap: on this small model the
    engine would finish them before the build does.)"""
    texts, errors, late = [""] * 16, [None] * 16, []

    def stream(i):
        try:
            for chunk in client.completions.create(model="constellation", prompt=PROMPTS[i], max_tokens=TOKENS,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True}):
                if chunk.choices:
                    texts[i] += chunk.choices[0].text
        except Exception as e:  # noqa: BLE001
            errors[i] = repr(e)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    late_thread = threading.Thread(target=lambda: late.append(then()))
    real_swap = engine.swap

    def swap_with_streams_running(c, timeout=None):
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(engine.running) < 16:
            assert time.monotonic() < deadline, "the streams did not start"
            time.sleep(0.001)
        done = real_swap(c, timeout)
        late_thread.start()
        return done

    engine.swap = swap_with_streams_running
    try:
        answer = change()
    finally:
        engine.swap = real_swap
    for t in threads + [late_thread]:
        t.join(120)
    return texts, errors, answer, late[0] if late else None


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
    engine = app.state.engine
    fingerprints = {client.completions.create(model="constellation", prompt="x", max_tokens=1).system_fingerprint}
    for version, (op, change) in enumerate(steps, start=1):
        union_steps = engine.union_steps
        got, errors, r, late = run_streams_during(client, engine, change, lambda: alone(client, PROMPTS[5]))
        assert r.status_code == 200, (op, r.text)
        assert errors == [None] * 16, (op, errors)
        assert got == expected, op  # each as it ran alone on the catalog it started with
        # the late request decoded beside the old catalog's streams (one batch, through a union) ...
        assert engine.union_steps > union_steps, op
        # ... and gave what it gives alone on the new catalog
        assert late == alone(client, PROMPTS[5]), op
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
        fingerprints.add(after.system_fingerprint)  # it names the catalog served
        assert len(fingerprints) == version + 1, op
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
        # a relative path is under models_root (not the server's working directory): the path passes
        ({"name": "x", "path": "science", "probes": texts[:2]}, 400, "probes"),
        ({"name": "x", "path": "../../elsewhere", "probes": texts}, 403, "path"),
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
    # with the key but no [catalog].models_root: every path is refused, naming the key and the file
    conf.write_text(conf.read_text().replace('[catalog]\nmodels_root = "models"\n', ""))
    app = create_app(load_constellation(conf), Limits(max_running=4, max_seq_len=128, max_prompt_tokens=64),
                     admin_key="admin-secret")
    science, texts = conf.parent / "models" / "science", fixtures.probe_texts(0)["science"]
    with LoopbackServer(app) as url:
        for body, param in [({"name": "x", "path": str(science), "probes": texts}, "path"),
                            ({"name": "x", "path": str(science), "probes_path": str(conf.parent / "probes.json")},
                             "probes_path")]:
            r = httpx.post(url + "/v1/specialists", headers=ADMIN, json=body)
            err = r.json()["error"]
            assert r.status_code == 403 and err["param"] == param, r.text
            assert "sets no [catalog].models_root" in err["message"] and str(conf) in err["message"], err
            assert "None" not in err["message"]


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


def test_adapters_on_other_layers_join_while_every_mode_streams(built, tmp_path):
    """PEFT adapters, layers = "auto", in-pass per-block signatures: the added adapter changes
    blocks the running catalog never composed (the union starts lower), and streams in the
    constellation, logit, task-arithmetic and weights modes keep exactly their output."""
    from peft_fixtures import make_peft_adapter

    src = built("llama", domains=("medical", "legal")).parent
    root = tmp_path / "p"
    (root / "models").mkdir(parents=True)
    shutil.copytree(src / "models" / "generalist", root / "models" / "generalist")
    shutil.copy(src / "probes.json", root / "probes.json")
    g = root / "models" / "generalist"
    for k, (name, layers) in enumerate((("medical", [4, 5]), ("legal", [3, 5]), ("code", [1, 2]))):
        make_peft_adapter(g, root / "models" / name, seed=10 + k, target_modules=["q_proj", "v_proj", "down_proj"],
                          r=4, layers_to_transform=layers)
    conf = root / "constellation.toml"
    conf.write_text('[generalist]\npath = "models/generalist"\n\n[specialists]\nmedical = "models/medical"\n'
                    'legal = "models/legal"\n\n[index]\npath = "index"\nprobes = "probes.json"\n\n[composition]\n'
                    'top_k = 2\nlayers = "auto"\nsignature = "generalist"\n\n[runtime]\ndevice = "cpu"\n'
                    'dtype = "float32"\ncompile = "off"\n\n[catalog]\nmodels_root = "models"\n')
    from index_store.indexing import build_index
    build_index(conf, quiet=True)
    app = create_app(load_constellation(conf), Limits(max_running=16, max_prompt_tokens=64, max_new_tokens=100,
                                                      max_seq_len=128), admin_key="admin-secret")
    modes = [{"mode": "constellation"}, {"mode": "logit"}, {"mode": "task_arithmetic"},
             {"mode": "weights", "weights": {"medical": 0.7, "legal": 0.3}}]
    with LoopbackServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def run(i):
            return client.completions.create(model="constellation", prompt=PROMPTS[i], max_tokens=TOKENS,
                                             temperature=0, extra_body={"ignore_eos": True,
                                                                        "composition": modes[i % 4]}).choices[0].text

        before = [run(i) for i in range(8)]
        texts = [""] * 8
        started = [threading.Event() for _ in range(8)]

        def stream(i):
            for chunk in client.completions.create(model="constellation", prompt=PROMPTS[i], max_tokens=TOKENS,
                                                   temperature=0, stream=True,
                                                   extra_body={"ignore_eos": True, "composition": modes[i % 4]}):
                if chunk.choices:
                    texts[i] += chunk.choices[0].text
                started[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        engine = app.state.engine
        first_before, real_swap = engine.c.first, engine.swap

        late = [None] * 4

        def run_late():  # every mode, on the new catalog, beside the old catalog's streams
            for i in range(4):
                late[i] = run(i)

        late_thread = threading.Thread(target=run_late)

        def swap_once_streaming(c, timeout=None):  # the streams start just before the swap and the
            for t in threads:                      # late requests right after it: they overlap
                t.start()
            deadline = time.monotonic() + 60
            while len(engine.running) < 8:  # all decoding (the engine is faster than the clients)
                assert time.monotonic() < deadline
                time.sleep(0.001)
            done = real_swap(c, timeout)
            late_thread.start()
            return done

        engine.swap = swap_once_streaming
        r = httpx.post(url + "/v1/specialists", headers=ADMIN, timeout=120, json={
            "name": "code", "path": str(root / "models" / "code"), "probes": fixtures.probe_texts(0)["code"]})
        assert r.status_code == 200, r.text
        for t in threads + [late_thread]:
            t.join(120)
        assert engine.union_steps > 0 and engine.c.first < first_before
        assert texts == before
        assert late == [run(i) for i in range(4)]
