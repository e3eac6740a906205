"""Reliability under bad input, overload and faults — bounded, loopback only."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from test_server import KEY, Server
from server.engine import Limits

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def loaded(built):
    from index_store.loader import load_constellation

    return load_constellation(built("llama", domains=("medical", "legal", "code")))


def test_schemathesis_finds_no_server_error_and_only_openai_errors(loaded, tmp_path):
    s = Server(loaded, Limits(max_running=4, max_waiting=8, max_prompt_tokens=64, max_new_tokens=16, max_seq_len=128))
    try:
        env = dict(os.environ, SCHEMATHESIS_HOOKS="st_hooks", PYTHONPATH=str(HERE))
        p = subprocess.run([str(Path(sys.executable).parent / "schemathesis"), "run", s.url + "/openapi.json",
                            "-H", f"Authorization: Bearer {KEY}", "-c", "not_a_server_error,openai_error_format",
                            "-n", "10", "--generation-deterministic", "--request-timeout", "30",
                            "--phases", "examples,coverage,fuzzing"],
                           capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)  # its cache stays out
        assert p.returncode == 0, p.stdout[-4000:]
        assert " passed" in p.stdout and "generated" in p.stdout
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def test_overload_at_four_times_the_queue_gives_only_200_and_429_and_no_crossed_streams(loaded):
    limits = Limits(max_running=2, max_waiting=3, max_prompt_tokens=64, max_new_tokens=16, max_seq_len=128)
    s = Server(loaded, limits)
    try:
        words = "patient contract def protein clause fever import enzyme court tumor lambda photon".split()
        prompts = [f"The {words[i % len(words)]} {words[(3 * i + 1) % len(words)]} {i}" for i in range(4 * 3)]

        async def one(cl, p, stream):
            body = {"model": "constellation", "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                    "stream": stream}
            r = await cl.post(s.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
            if r.status_code != 200 or not stream:
                return r.status_code, r.headers, (r.json() if r.status_code != 200 else r.json()["choices"][0]["text"])
            text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in r.text.split("\n\n")
                           if e.startswith("data: {") and json.loads(e[6:])["choices"])
            return 200, r.headers, text

        async def burst():
            async with httpx.AsyncClient(timeout=120) as cl:
                return await asyncio.gather(*[one(cl, p, i % 2 == 0) for i, p in enumerate(prompts)])

        results = asyncio.run(burst())
        codes = [c for c, _, _ in results]
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
        print(f"overload: {len(prompts)} concurrent requests at max_running 2 + max_waiting 3: "
              f"{codes.count(200)} x 200, {codes.count(429)} x 429")
        for code, headers, body in results:
            if code == 429:
                assert headers["Retry-After"] and body["error"]["type"] == "rate_limit_error"
        # each answer belongs to its own prompt: equal to that prompt run alone
        for (code, _, text), p in zip(results, prompts):
            if code == 200:
                alone = httpx.post(s.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                   json={"model": "constellation", "prompt": p, "max_tokens": 12, "temperature": 0,
                                         "ignore_eos": True}).json()["choices"][0]["text"]
                assert text == alone, p
        assert httpx.get(s.url + "/health").status_code == 200
        assert s.engine.num_running == 0 and s.engine.cache.used == 0
    finally:
        s.stop()


def _serve(conf: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "serve", "--config", str(conf), "--port", "0"],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("damage, expected", [
    ("tampered_index", "sha256 mismatch"),
    ("truncated_safetensors", "cannot read safetensors"),
    ("pickle_weights", "pickle"),
    ("missing_folder", "does not exist"),
])
def test_bad_deployments_are_refused_at_start(built, tmp_path, damage, expected):
    src = built("llama", domains=("medical", "legal", "code")).parent
    root = tmp_path / "c"
    shutil.copytree(src, root)
    conf = root / "constellation.toml"
    if damage == "tampered_index":
        f = root / "index" / "index.safetensors"
        data = bytearray(f.read_bytes())
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncated_safetensors":
        f = root / "models" / "legal" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "pickle_weights":
        (root / "models" / "code" / "model.safetensors").rename(root / "models" / "code" / "pytorch_model.bin")
    else:
        shutil.rmtree(root / "models" / "medical")
    p = _serve(conf)
    assert p.returncode == 2, p.stderr[-2000:]
    assert expected in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_api_key_is_compared_in_constant_time(loaded, monkeypatch):
    import server.app as app_mod

    calls = []
    real = app_mod.hmac.compare_digest
    monkeypatch.setattr(app_mod.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    s = Server(loaded)
    try:
        for key in ("wrong", KEY[:-1] + "x", KEY):
            httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert [a for a, _ in calls] == [b"wrong", (KEY[:-1] + "x").encode(), KEY.encode()]
        assert all(b == KEY.encode() for _, b in calls)
    finally:
        s.stop()
