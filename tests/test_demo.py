"""The embedded demo constellation: committed adapters, `demo build`, and what it must do."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composer.modes import CompositionParams
from demo import corpus
from demo.build import MAX_ARTIFACT_BYTES, verify_artifacts
from demo.generalist import DemoError

ROOT = Path(__file__).resolve().parents[1]
PROBES = ROOT / "demo" / "probes"

CHECK_PROMPTS = {
    "medical": "The patient presented with acute dyspnea and bilateral infiltrates",
    "legal": "The licensee shall indemnify the licensor against all claims arising from redistribution of the software",
    "code": "def read_config(path):\n    with open(path) as f:\n        return json.load(f)",
    "science": "Catalysis of the transfer of a phosphate group from ATP to a serine residue of a protein substrate",
}


def _cli(*args, env=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "server.cli", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=ROOT, timeout=900)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    p = _cli("demo", "build", "--cache", cache)
    assert p.returncode == 0, p.stderr[-2000:]
    return cache, p


@pytest.fixture(scope="session")
def demo(demo_cache):
    from index_store.loader import load_constellation

    cache, p = demo_cache
    return load_constellation(Path(p.stdout.strip().splitlines()[-1]))


def test_committed_artifacts_verify_and_fit_the_cap(tmp_path):
    manifest = verify_artifacts()
    assert set(manifest["specialists"]) == {"medical", "legal", "code", "science"}
    total = sum((ROOT / "demo" / "artifacts" / i["file"]).stat().st_size for i in manifest["specialists"].values())
    assert total <= MAX_ARTIFACT_BYTES
    copy = tmp_path / "artifacts"
    shutil.copytree(ROOT / "demo" / "artifacts", copy)
    f = copy / manifest["specialists"]["legal"]["file"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(DemoError, match="sha256 mismatch"):
        verify_artifacts(copy)


def test_build_prints_the_config_path_last_and_reruns_only_verify(demo_cache):
    cache, first = demo_cache
    conf = Path(first.stdout.strip().splitlines()[-1])
    assert conf.is_absolute() and conf.is_file() and conf.parent == cache / "demo"
    assert "building the index" in first.stderr
    again = _cli("demo", "build", "--cache", cache)
    assert again.returncode == 0
    assert again.stdout.strip().splitlines()[-1] == str(conf)
    assert "verified, nothing to do" in again.stderr


def test_demo_is_an_ordinary_constellation(demo):
    from transformers import AutoModelForCausalLM

    c = demo.constellation
    assert c.domains == ["medical", "legal", "code", "science"]
    assert c.g.mc.n_layers == 30 and c.d == 576 and c.settings.layers == 4
    assert all(c.trunk_exact.values())  # specialists differ only in layers 26-29
    assert all(d.layers == [26, 27, 28, 29] for d in c.differences.values())
    sizes = c.resident_bytes()
    assert all(sizes[d] < sizes["generalist"] / 5 for d in c.domains)
    # each specialist folder is a plain HF checkpoint transformers can load
    folder = demo.config.specialists["code"]
    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids, am = demo.encode(["def add(a, b):\n    return a + b"])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert (ref - c.specialists[2].forward(ids)).abs().max().item() <= 1e-3


@pytest.mark.parametrize("domain", sorted(CHECK_PROMPTS))
def test_explain_puts_the_prompts_domain_first(demo_cache, domain):
    cache, first = demo_cache
    conf = first.stdout.strip().splitlines()[-1]
    p = _cli("explain", "--config", conf, "--json", CHECK_PROMPTS[domain])
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["selected"][0] == domain, doc["alpha"]


def test_each_specialist_beats_the_generalist_on_its_domain(demo):
    from eval.run import measure

    probes = json.loads((PROBES / "eval.json").read_text())["domains"]
    c = demo.constellation
    for dom in c.domains:
        res = measure(demo, c, [(t, [dom]) for t in probes[dom][:8]], {
            "generalist": CompositionParams(mode="generalist"),
            "specialist": CompositionParams(mode="weights", weights={dom: 1.0}),
        }, dom, quiet=True)
        g = sum(r.losses["generalist"] for r in res) / len(res)
        s = sum(r.losses["specialist"] for r in res) / len(res)
        assert s < g, (dom, g, s)


def test_explain_without_config_uses_the_demo(demo_cache):
    cache, first = demo_cache
    p = _cli("explain", "--json", CHECK_PROMPTS["legal"], env={"CONSTELLATION_CACHE": str(cache)})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["domains"] == ["medical", "legal", "code", "science"]


def test_probe_sets_are_the_projects_own_and_disjoint():
    index = json.loads((PROBES / "index.json").read_text())["domains"]
    evals = json.loads((PROBES / "eval.json").read_text())["domains"]
    cross = json.loads((PROBES / "cross.json").read_text())["probes"]
    for dom in ("medical", "legal", "code", "science", "general"):
        assert len(index[dom]) + len(evals[dom]) >= 40
    assert len(cross) >= 30 and all(len(p["domains"]) >= 2 for p in cross)
    norm = corpus.normalize
    a = {norm(t) for ts in index.values() for t in ts}
    b = {norm(t) for ts in evals.values() for t in ts}
    assert not a & b
    assert not {norm(p["text"]) for p in cross} & (a | b)
    # the paper's held-out probes are never part of the project
    shared = ROOT.parent / "shared" / "probes"
    if shared.is_dir():
        for f in shared.glob("*.json"):
            text = f.read_text()
            theirs = set()
            data = json.loads(text)
            for v in (data.get("domains") or {}).values():
                theirs |= {norm(t) for t in v}
            theirs |= {norm(p["text"]) for p in data.get("probes", []) if isinstance(p, dict) and "text" in p}
            assert not theirs & (a | b)


def test_prepare_dedups_removes_probe_leaks_and_splits_stably():
    probe = "An abnormal narrowing of the airways that makes breathing difficult during exercise in children"
    docs = ["Alpha beta gamma delta.", "alpha  beta gamma delta.", "Some text. " + probe.upper() + " more.",
            *[f"Document number {i} about unrelated matters of some length." for i in range(200)]]
    s1 = corpus.prepare(docs, [probe])
    assert s1.duplicates_removed == 1 and s1.leaks_removed == 1
    assert not any(corpus.normalize(probe) in corpus.normalize(d) for d in s1.train + s1.heldout)
    s2 = corpus.prepare(list(reversed(docs)), [probe])
    assert set(s1.heldout) == set(s2.heldout) and 0 < len(s1.heldout) < 40


def test_training_smoke_is_seeded_and_resumable(demo, tmp_path, monkeypatch):
    """A tiny `demo train` run: an adapter comes out, and an interrupted run resumes exactly."""
    from demo import train
    from demo.lora import read_adapter

    monkeypatch.setattr(train, "all_probe_texts", lambda: ["a probe sentence that must never be trained on"])
    g, tok = demo.constellation.g, demo.tokenizer
    docs = [f"Term {i}: the process by which cells divide and grow, number {i}." for i in range(60)]
    tc = train.TrainConfig(steps=4, batch=2, seq_len=32, rank=2, alpha=4.0, heldout_chunks=2, checkpoint_every=1)
    gen_ids = train.token_chunks(tok, docs[:10], 2, 32, 0)
    gen_trunk = train.trunk_states(g, gen_ids, 26, 2, "general")
    info = train.train_domain(g, tok, "science", docs, gen_ids, gen_trunk, tc, tmp_path / "w1", tmp_path / "a1")
    assert info["train_tokens"] == 4 * 2 * 32
    straight, rank, alpha = read_adapter(tmp_path / "a1" / "science.safetensors")
    assert rank == 2 and any(float(v.abs().sum()) > 0 for k, v in straight.items() if k.endswith("lora_B"))

    calls = {"n": 0}
    real = train.tail_loss

    def crash_after_two(*a, **k):
        calls["n"] += 1
        if calls["n"] > 4:  # 2 held-out evals, then 2 training steps
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "tail_loss", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        train.train_domain(g, tok, "science", docs, gen_ids, gen_trunk, tc, tmp_path / "w2", tmp_path / "a2")
    assert (tmp_path / "w2" / "science.ckpt.safetensors").is_file()
    monkeypatch.setattr(train, "tail_loss", real)
    train.train_domain(g, tok, "science", docs, gen_ids, gen_trunk, tc, tmp_path / "w2", tmp_path / "a2")
    resumed, _, _ = read_adapter(tmp_path / "a2" / "science.safetensors")
    for k in straight:
        assert torch.allclose(straight[k], resumed[k], atol=1e-6), k


def test_server_on_the_demo(demo):
    """One real run of the HTTP server on the demo: chat through the official client, and /explain."""
    import httpx

    from test_server import Server

    s = Server(demo, api_key=None)
    try:
        client = s.client(key="unused")
        r = client.chat.completions.create(model="constellation", max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": CHECK_PROMPTS["medical"]}])
        assert r.choices[0].message.content.strip() and r.usage.completion_tokens <= 12
        assert r.model_extra["composition"]["selected"][0] == "medical"
        doc = httpx.post(s.url + "/explain", json={"prompt": CHECK_PROMPTS["code"]}).json()
        assert doc["selected"][0] == "code"
    finally:
        s.stop()
