"""The HTTP server end to end: a real uvicorn on a loopback port, the official openai client."""

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch
from openai import OpenAI

from composer.modes import CompositionParams
from server.app import create_app
from server.engine import Limits

KEY = "test-key-123"
LIMITS = Limits(max_running=4, max_waiting=8, max_prompt_tokens=64, max_new_tokens=48, max_seq_len=128,
                max_body_bytes=20000, keepalive_s=0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, loaded, limits=LIMITS, api_key=KEY):
        import uvicorn

        self.app = create_app(loaded, limits, api_key)
        self.engine = self.app.state.engine
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, key=KEY) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def loaded(built):
    from index_store.loader import load_constellation

    return load_constellation(built("llama", domains=("medical", "legal", "code", "science"),
                                    everywhere=("science",)))


@pytest.fixture(scope="module")
def srv(loaded):
    s = Server(loaded)
    yield s
    s.stop()


def H(key=KEY):
    return {"Authorization": f"Bearer {key}"}


PROMPT = "The patient fever biopsy dose"


def test_completion_and_usage(srv):
    r = srv.client().completions.create(model="constellation", prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens == 6 and r.usage.total_tokens == \
        r.usage.prompt_tokens + 6
    comp = r.model_extra["composition"]
    assert comp["mode"] == "constellation" and len(comp["selected"]) == 3


def test_default_max_tokens_is_16_for_completions(srv):
    r = srv.client().completions.create(model="constellation", prompt=PROMPT, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_streaming_completion_with_usage(srv):
    stream = srv.client().completions.create(model="constellation", prompt=PROMPT, max_tokens=8, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    chunks = list(stream)
    ids = {c.id for c in chunks}
    created = {c.created for c in chunks}
    assert len(ids) == 1 and len(created) == 1
    content = [c for c in chunks if c.choices]
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert content[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].text for c in content)
    full = srv.client().completions.create(model="constellation", prompt=PROMPT, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert text == full.choices[0].text


def test_raw_sse_format(srv):
    body = {"model": "constellation", "prompt": PROMPT, "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=H()) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") or e.startswith(":") for e in events)
    assert events[-1] == "data: [DONE]"
    json.loads(events[0][6:])


def test_chat_streamed_and_not(srv):
    msgs = [{"role": "user", "content": "tell me about the contract clause"}]
    r = srv.client().chat.completions.create(model="constellation", messages=msgs, max_tokens=6, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    chunks = list(srv.client().chat.completions.create(model="constellation", messages=msgs, max_tokens=6,
                                                       temperature=0, stream=True,
                                                       extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def _greedy(srv, prompt, n, **kw):
    return srv.client().completions.create(model="constellation", prompt=prompt, max_tokens=n, temperature=0,
                                           extra_body={"ignore_eos": True, **kw.pop("extra", {})}, **kw)


def test_stop_strings_are_cut_and_never_included(srv):
    full = _greedy(srv, PROMPT, 20).choices[0].text
    assert len(full) > 6
    stop = full[3:5]
    r = _greedy(srv, PROMPT, 20, stop=stop)
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    r = _greedy(srv, PROMPT, 20, stop=["\u2603never", full[4:6]])
    assert r.choices[0].text == full[: full.index(full[4:6])]
    streamed = "".join(c.choices[0].text for c in srv.client().completions.create(
        model="constellation", prompt=PROMPT, max_tokens=20, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == full[: full.index(stop)]


def test_seed_determinism_and_n(srv):
    kw = dict(model="constellation", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    a = srv.client().completions.create(**kw).choices[0].text
    b = srv.client().completions.create(**kw).choices[0].text
    assert a == b
    r = srv.client().completions.create(n=3, **kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.choices[0].text == a
    assert r.usage.completion_tokens == 30


def test_logprobs_equal_the_librarys_materialized_model(srv, loaded):
    c = loaded.constellation
    r = srv.client().completions.create(model="constellation", prompt=PROMPT, max_tokens=5, temperature=0,
                                        logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(len(t) == 3 for t in lp.top_logprobs)
    prompt_ids = loaded.tokenizer(PROMPT)["input_ids"]
    ids, _ = loaded.encode([PROMPT])
    gp = c.generalist_pass(ids)
    plan = c.plan(gp, 0, CompositionParams())
    gen = []
    for k in range(5):  # teacher-force the server's tokens through the library's composed model
        seq = torch.tensor([prompt_ids + gen])
        gpk = c.generalist_pass(seq)
        logits = c.composed_logits(gpk, [plan], "materialize")[0, -1]
        logp = torch.log_softmax(logits.float(), -1)
        tok = int(torch.argmax(logp))
        assert abs(float(logp[tok]) - lp.token_logprobs[k]) <= 1e-4
        gen.append(tok)
    assert loaded.tokenizer.decode(gen) == r.choices[0].text


def test_chat_logprobs(srv):
    r = srv.client().chat.completions.create(model="constellation", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                             extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 for t in content)


@pytest.mark.parametrize("comp", [
    {"mode": "generalist"}, {"mode": "routed"}, {"mode": "uniform"}, {"mode": "task_arithmetic", "lambda": 0.3},
    {"mode": "weights", "weights": {"legal": 0.6, "code": 0.4}}, {"mode": "logit"}, {"mode": "constellation", "top_k": 2},
])
def test_composition_modes_through_extra_body(srv, loaded, comp):
    r = srv.client().completions.create(model="constellation", prompt=PROMPT, max_tokens=6, temperature=0,
                                        extra_body={"composition": comp, "ignore_eos": True})
    assert r.model_extra["composition"]["mode"] == comp["mode"]
    # greedy tokens equal the library's composed model, step by step
    c = loaded.constellation
    params = CompositionParams.model_validate(comp)
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    plan = c.plan(c.generalist_pass(torch.tensor([ids])), 0, params)
    gen = []
    for _ in range(6):
        gp = c.generalist_pass(torch.tensor([ids + gen]))
        gen.append(int(torch.argmax(c.composed_logits(gp, [plan])[0, -1])))
    assert loaded.tokenizer.decode(gen) == r.choices[0].text


def test_concurrent_different_compositions_match_each_alone(srv):
    prompts = ["The patient fever biopsy", "The contract clause licensee", "The def return import class",
               "The protein enzyme photon"]
    comps = [{"mode": "constellation"}, {"mode": "generalist"}, {"mode": "weights", "weights": {"code": 1.0}},
             {"mode": "uniform"}]
    alone = [_greedy(srv, p, 12, extra={"composition": c}).choices[0].text for p, c in zip(prompts, comps)]
    steps_before, mixed_before = srv.engine.steps, srv.engine.mixed_steps

    async def all_at_once():
        from openai import AsyncOpenAI

        cl = AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        rs = await asyncio.gather(*[cl.completions.create(
            model="constellation", prompt=p, max_tokens=12, temperature=0,
            extra_body={"composition": c, "ignore_eos": True}) for p, c in zip(prompts, comps)])
        return [r.choices[0].text for r in rs]

    together = asyncio.run(all_at_once())
    assert together == alone
    assert srv.engine.steps - steps_before < 4 * 11  # they really shared decode steps ...
    assert srv.engine.mixed_steps > mixed_before  # ... with different compositions in one batch


def test_explain_matches_the_library(srv, loaded):
    c = loaded.constellation
    doc = httpx.post(srv.url + "/explain", headers=H(), json={"prompt": PROMPT, "include_node_weights": True}).json()
    gp = c.generalist_pass(torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]]))
    plan = c.plan(gp, 0, CompositionParams())
    assert doc["selected"] == [c.domains[i] for i in plan.selected]
    for d, a in zip(c.domains, plan.alpha):
        assert doc["alpha"][d] == pytest.approx(float(a), abs=1e-12)
    for r, i in enumerate(plan.selected):
        assert doc["node_weights"][c.domains[i]] == pytest.approx(plan.node_weights[r].tolist(), abs=1e-7)
    for key in ("entropy_bits", "gini", "fallback", "layers", "policy", "signature", "timings_ms",
                "mean_node_weight"):
        assert key in doc
    # the same weights generation used
    r = srv.client().completions.create(model="constellation", prompt=PROMPT, max_tokens=1)
    assert r.model_extra["composition"]["alpha"] == pytest.approx({d: round(v, 6) for d, v in doc["alpha"].items()})
    chat = httpx.post(srv.url + "/explain", headers=H(), json={"messages": [{"role": "user", "content": "hi"}],
                                                               "composition": {"mode": "routed"}}).json()
    assert chat["mode"] == "routed" and len(chat["selected"]) == 1
    # a chat's fingerprint covers its messages' contents, the same in /explain and in generation
    msgs = [{"role": "system", "content": "The court statute"}, {"role": "user", "content": PROMPT}]
    ex = httpx.post(srv.url + "/explain", headers=H(), json={"messages": msgs}).json()
    gen = srv.client().chat.completions.create(model="constellation", messages=msgs, max_tokens=1)
    assert gen.model_extra["composition"]["alpha"] == pytest.approx({d: round(v, 6) for d, v in ex["alpha"].items()})
    assert ex["alpha"] != doc["alpha"]


def test_metrics_parse_and_move(srv):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        text = httpx.get(srv.url + "/metrics", headers=H()).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    before = scrape()
    _greedy(srv, PROMPT, 4)
    after = scrape()
    m = ("model_name", "constellation")  # on every series, as vLLM labels its own
    assert all(dict(k[1]).get("model_name") == "constellation" for k in after if k[0].startswith("constellation_"))
    gen = ("constellation_generation_tokens_total", (m,))
    assert after[gen] - before.get(gen, 0) == 4
    for name in ("constellation_num_requests_running", "constellation_num_requests_waiting",
                 "constellation_time_to_first_token_seconds_count", "constellation_e2e_request_latency_seconds_count",
                 "constellation_request_queue_time_seconds_count", "constellation_prompt_tokens_total",
                 "constellation_inter_token_latency_seconds_count", "constellation_node_entropy_bits_count",
                 "constellation_batch_size_count"):
        assert any(k[0] == name for k in after), name
    assert after[("constellation_request_success_total", (("finished_reason", "length"), m))] >= 1
    assert any(k[0] == "constellation_composition_seconds_count" and dict(k[1])["stage"] == "compose" for k in after)
    assert any(k[0] == "constellation_domain_alpha_count" and dict(k[1])["domain"] == "medical" for k in after)
    assert any(k[0] == "constellation_requests_total" and dict(k[1])["mode"] == "constellation" for k in after)


def test_models_and_errors(srv):
    m = srv.client().models.list()
    # the constellation first, then its modes and specialists (tests/test_models_by_name.py)
    assert m.data[0].id == "constellation" and m.data[0].owned_by and "constellation/paper" in [x.id for x in m.data]
    import openai

    with pytest.raises(openai.AuthenticationError) as e:
        srv.client(key="wrong").completions.create(model="constellation", prompt="x", max_tokens=1)
    assert e.value.body["type"] == "authentication_error" if isinstance(e.value.body, dict) else True
    for path in ("/metrics", "/explain", "/v1/models", "/docs", "/openapi.json", "/nope"):
        r = httpx.request("POST" if path == "/explain" else "GET", srv.url + path)
        assert r.status_code == 401, path
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(srv.url + "/health").status_code == 200
    assert httpx.get(srv.url + "/ready").status_code == 200
    with pytest.raises(openai.NotFoundError):
        srv.client().completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as e:
        srv.client().completions.create(model="constellation", prompt="x", max_tokens=10_000)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        srv.client().completions.create(model="constellation", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError) as e:
        srv.client().completions.create(model="constellation", prompt="x " * 200)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        srv.client().completions.create(model="constellation", prompt="x", extra_body={"composition": {"mode": "nope"}})
    assert "unknown composition mode" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        srv.client().completions.create(model="constellation", prompt="x",
                                        extra_body={"composition": {"mode": "generalist", "top_k": 2}})
    r = httpx.post(srv.url + "/v1/completions", headers=H(), content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(srv.url + "/v1/completions", headers=H(), json={"model": "constellation", "prompt": "x" * 30000})
    assert r.status_code == 413


def test_queue_full_gives_429_with_retry_after(loaded):
    s = Server(loaded, Limits(max_running=1, max_waiting=1, max_prompt_tokens=64, max_new_tokens=48,
                              max_seq_len=128))
    try:
        body = {"model": "constellation", "prompt": PROMPT, "max_tokens": 40, "ignore_eos": True}

        async def burst():
            async with httpx.AsyncClient(timeout=60) as cl:
                return await asyncio.gather(*[cl.post(s.url + "/v1/completions", json=body, headers=H())
                                              for _ in range(6)])

        rs = asyncio.run(burst())
        codes = sorted(r.status_code for r in rs)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        for r in rs:
            if r.status_code == 429:
                assert r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["usage"]["completion_tokens"] == 40
    finally:
        s.stop()


def test_disconnect_frees_the_slot(srv):
    body = {"model": "constellation", "prompt": PROMPT, "max_tokens": 48, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=H()) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # got the first token: hang up
    deadline = time.time() + 10
    while srv.engine.num_running and time.time() < deadline:
        time.sleep(0.05)
    assert srv.engine.num_running == 0 and srv.engine.cache.used == 0
    # counted as vLLM counts it: finished_reason="abort"
    text = httpx.get(srv.url + "/metrics", headers=H()).text
    assert re.search(r'constellation_request_success_total\{finished_reason="abort",model_name="constellation"\} [1-9]',
                     text), text[-2000:]


def test_draining_refuses_new_requests_with_503(loaded):
    s = Server(loaded)
    try:
        s.engine.drain()
        r = httpx.post(s.url + "/v1/completions", headers=H(), json={"model": "constellation", "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        assert httpx.get(s.url + "/ready").status_code == 503
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def test_serve_command_drains_on_sigterm(built, tmp_path):
    """`constellation serve` as a process: SIGTERM lets in-flight requests finish, refuses new ones
    with 503, and exits 0."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    conf = built("llama", domains=("medical", "legal", "code"), max_positions=4096)
    port = _free_port()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", str(conf), "--port", str(port),
                             "--max-seq-len", "4000", "--max-new-tokens", "3900", "--max-prompt-tokens", "64",
                             "--log-level", "warning"],
                            cwd=root, env=dict(os.environ, PYTHONPATH=str(root), CONSTELLATION_API_KEY=KEY),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline
            time.sleep(0.1)
        body = {"model": "constellation", "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        got = [{} for _ in range(3)]  # three requests in flight when SIGTERM arrives

        def inflight(box):
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=H(), timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        box.setdefault("first", time.time())
                        ch = json.loads(line[6:])
                        if ch["choices"] and ch["choices"][0]["finish_reason"]:
                            box["finish"] = ch["choices"][0]["finish_reason"]

        threads = [threading.Thread(target=inflight, args=(box,)) for box in got]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while not all("first" in box for box in got):
            assert all(t.is_alive() for t in threads) and time.time() < deadline, "in-flight requests did not start"
            time.sleep(0.01)
        t_term = time.time()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert all(box.get("finish") is None for box in got)  # still generating: the drain waits for them
        r = httpx.post(url + "/v1/completions", headers=H(), json={"model": "constellation", "prompt": "x"})
        assert r.status_code == 503
        for t in threads:
            t.join(timeout=120)
        assert [box.get("finish") for box in got] == ["length"] * 3
        assert proc.wait(timeout=60) == 0
        print(f"drain: 3 in-flight streams finished and the process exited 0 "
              f"{time.time() - t_term:.2f} s after SIGTERM")
        assert "curl" in proc.stderr.read()  # the start-up banner printed usable examples
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_command_exits_on_sigint_while_idle(built):
    """Ctrl+C on an idle server: the engine loop sleeps on the main thread and still wakes for the
    signal; the server shuts down and exits 0. A busy port makes it exit 2 (a usage error), before loading."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    conf, port = built("llama", domains=("medical", "legal"), top_k=2), _free_port()
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(conf), "--log-level", "warning"]
    proc = subprocess.Popen(cmd + ["--port", str(port)], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        time.sleep(1.0)  # idle: the loop is asleep waiting for work
        busy = subprocess.run(cmd + ["--port", str(port)], cwd=root, capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and "address already in use" in busy.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_mid_stream_failure_is_an_error_event(loaded):
    s = Server(loaded)
    try:
        def broken(*args):
            raise RuntimeError("injected decode failure")

        s.engine.runner.decode = broken
        body = {"model": "constellation", "prompt": PROMPT, "max_tokens": 8, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=H()) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        errors = [json.loads(e[6:]) for e in events if e.startswith("data: {\"error\"")]
        assert errors and "injected decode failure" in errors[0]["error"]["message"]
        assert errors[0]["error"]["type"] == "server_error"
        assert events[-1] == "data: [DONE]"
        assert s.engine.num_running == 0 and s.engine.cache.used == 0
        assert httpx.get(s.url + "/health").status_code == 200  # the engine keeps serving
    finally:
        s.stop()


def test_n_choices_that_finish_at_once_and_slot_reuse(srv):
    for _ in range(2):
        r = srv.client().completions.create(model="constellation", prompt=PROMPT, max_tokens=1, n=3, temperature=0)
        assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 3
        assert len({c.text for c in r.choices}) == 1
    assert srv.engine.cache.used == 0
    a = _greedy(srv, PROMPT, 10).choices[0].text
    r = srv.client().completions.create(model="constellation", prompt=PROMPT, max_tokens=10, n=2, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert [c.text for c in r.choices] == [a, a]
