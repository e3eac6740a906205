"""The web thread never computes with torch.

Torch ops run from a second thread start a second OpenMP team in the process; from then on libgomp
counts more busy threads than cores and its workers sleep between parallel regions instead of
spinning, and every engine step gets slower (docs/benchmarks.md, "Which thread decodes"). So
everything the engine hands the serving code is plain Python. This test records every torch
function called on the event loop's thread while requests of every kind go through a real server.
"""

from contextlib import asynccontextmanager

import httpx
import pytest
from torch.overrides import TorchFunctionMode

from bench.loopback import LoopbackServer
from server.app import create_app
from server.engine import Limits


class Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__qualname__", repr(func)))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def spied(built):
    from index_store.loader import load_constellation

    loaded = load_constellation(built("llama", domains=("medical", "legal", "code")))
    app = create_app(loaded, Limits(max_running=4, max_prompt_tokens=64, max_new_tokens=16, max_seq_len=128))
    recorder, lifespan = Recorder(), app.router.lifespan_context

    @asynccontextmanager
    async def recording(a):  # the lifespan runs on the event loop's thread: the mode is thread-local
        with recorder:
            async with lifespan(a) as state:
                yield state

    app.router.lifespan_context = recording
    with LoopbackServer(app) as url:
        yield url, recorder


@pytest.mark.parametrize("comp", [{"mode": "generalist"}, {"mode": "constellation"}, {"mode": "logit"},
                                  {"mode": "weights", "weights": {"legal": 0.5, "code": 0.5}}])
@pytest.mark.parametrize("stream", [False, True])
def test_no_torch_on_the_web_thread(spied, comp, stream):
    url, recorder = spied
    before = len(recorder.calls)
    body = {"model": "constellation", "prompt": "The patient fever biopsy", "max_tokens": 4, "logprobs": 2,
            "stream": stream, "composition": comp, "stream_options": {"include_usage": True} if stream else None}
    r = httpx.post(url + "/v1/completions", json={k: v for k, v in body.items() if v is not None}, timeout=60)
    assert r.status_code == 200 and '"composition"' in r.text  # the composition summary was reported
    chat = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": "constellation", "messages": [{"role": "user", "content": "contract clause"}], "max_tokens": 3,
        "logprobs": True, "top_logprobs": 2, "stream": stream, "composition": comp})
    assert chat.status_code == 200
    explain = httpx.post(url + "/explain", json={"prompt": "The licensee shall", "composition": comp}, timeout=60)
    assert explain.status_code == 200 and explain.json()["alpha"]
    assert recorder.calls[before:] == []


def test_no_torch_on_the_web_thread_for_embeddings_and_names(spied):
    """/v1/embeddings (the vectors come back from the engine thread as bytes), /tokenize, a model name."""
    url, recorder = spied
    before = len(recorder.calls)
    for fmt in ("float", "base64"):
        r = httpx.post(url + "/v1/embeddings", json={"input": ["The patient", "The court"], "encoding_format": fmt})
        assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert httpx.post(url + "/tokenize", json={"prompt": "The court"}).json()["count"] > 0
    assert httpx.post(url + "/v1/completions", json={"model": "legal", "prompt": "The court", "max_tokens": 2}).json()[
        "composition"]["selected"] == ["legal"]
    assert recorder.calls[before:] == []


def test_the_recorder_sees_torch_calls():
    """The check above can fail: the same mode records a call made on its thread."""
    import torch

    with Recorder() as rec:
        torch.ones(3).mean()
    assert rec.calls


def test_threads_bench_smoke(built, capsys):
    """``python -m bench.threads`` on a fixture model: every scenario runs in its own process and
    prints a finite step time and its ratio to the main thread's."""
    from bench import threads
    from index_store.config import load_config

    model = load_config(built("llama", domains=("medical", "legal"))).generalist.path
    assert threads.main(["--model", str(model), "--steps", "2", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    rows = {line[:36].strip(): line[36:].split() for line in out.splitlines()[2:]}
    assert set(rows) == set(threads.SCENARIOS)
    assert rows["main"][1] == "1.00" and all(float(r[0]) > 0 for r in rows.values())
