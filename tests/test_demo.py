"""The embedded demo constellation: committed adapters (PEFT LoRA folders), `demo build`, and what it must do."""

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
    """The demo in fp32 (its config says dtype = "auto", which is bf16 on CPUs with native bf16):
    the exactness checks here compare with transformers and PEFT in fp32."""
    from index_store.config import load_config
    from index_store.loader import load_constellation

    cache, p = demo_cache
    cfg = load_config(Path(p.stdout.strip().splitlines()[-1]))
    return load_constellation(cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"dtype": "float32"})}))


ARTIFACTS = ROOT / "demo" / "artifacts"
PEFT_PROMPTS = ["The patient presented with acute dyspnea", "def add(a, b):\n    return a + b",
                "The licensee shall indemnify the licensor", "Catalysis of the transfer of a phosphate group"]


def test_committed_artifacts_verify_and_fit_the_cap(tmp_path):
    manifest = verify_artifacts()
    assert manifest["format_version"] == 2 and manifest["format"] == "peft-lora"
    assert set(manifest["specialists"]) == {"medical", "legal", "code", "science"}
    total = 0
    for dom, info in manifest["specialists"].items():
        folder = ARTIFACTS / info["folder"]
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 16, 32)
        assert cfg["layers_to_transform"] == [26, 27, 28, 29] and len(cfg["modules_to_save"]) == 8
        total += sum(p.stat().st_size for p in folder.iterdir())
    assert total <= MAX_ARTIFACT_BYTES and total < 12_000_000
    copy = tmp_path / "artifacts"
    shutil.copytree(ARTIFACTS, copy)
    f = copy / manifest["specialists"]["legal"]["folder"] / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(DemoError, match="sha256 mismatch"):
        verify_artifacts(copy)
    f.write_bytes((ARTIFACTS / "legal" / "adapter_model.safetensors").read_bytes())
    verify_artifacts(copy)
    (copy / "code" / "README.md").write_text("an extra file is not part of the verified adapter")
    with pytest.raises(DemoError, match="holds"):
        verify_artifacts(copy)


def _peft_vs_dense_merge(generalist: Path, adapter: Path, prompts=PEFT_PROMPTS):
    """PEFT's reading of an adapter folder vs our dense merge (``W_G + (alpha/r) B A``, trained norms).

    Returns (max |logit difference| over the prompts, max |PEFT - generalist| difference, the modules
    PEFT wrapped as modules_to_save, the modules it gave LoRA layers).
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from demo.lora import merge, read_peft

    def hf():
        return AutoModelForCausalLM.from_pretrained(str(generalist), local_files_only=True,
                                                    dtype=torch.float32).eval()

    pm = PeftModel.from_pretrained(hf(), str(adapter), local_files_only=True).eval()
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
               if isinstance(m, ModulesToSaveWrapper)}
    lora = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    tensors, rank, alpha, _ = read_peft(adapter)
    dense, g = hf(), hf()
    sd = dense.state_dict()
    dense.load_state_dict({**sd, **merge(sd, tensors, rank, alpha)})
    tok = AutoTokenizer.from_pretrained(str(generalist))
    diff = moved = 0.0
    with torch.no_grad():
        for text in prompts:
            ids = tok(text, return_tensors="pt").input_ids
            out = pm(input_ids=ids).logits
            diff = max(diff, (out - dense(input_ids=ids).logits).abs().max().item())
            moved = max(moved, (out - g(input_ids=ids).logits).abs().max().item())
    return diff, moved, wrapped, lora


def _expected_modules(layers):
    from demo.lora import MATRICES, NORMS

    wrapped = {f"model.layers.{i}.{n.removesuffix('.weight')}" for i in layers for n in NORMS}
    lora = {f"model.layers.{i}.{m.removesuffix('.weight')}" for i in layers for m in MATRICES}
    return wrapped, lora


@pytest.mark.parametrize("domain", ["medical", "legal", "code", "science"])
def test_peft_reads_the_adapter_folders_as_the_dense_merge(demo_cache, domain):
    """`PeftModel.from_pretrained(generalist, folder)` is the specialist we mean: logits equal (fp32) to
    the generalist with W_G + 2 B A on layers 26-29 and their trained norms, and PEFT touches exactly
    those 28 projections and 8 norms (the built folder is the committed one, byte for byte)."""
    cache, _ = demo_cache
    built = cache / "demo" / "models" / domain
    assert all((built / n).read_bytes() == (ARTIFACTS / domain / n).read_bytes()
               for n in ("adapter_config.json", "adapter_model.safetensors"))
    diff, moved, wrapped, lora = _peft_vs_dense_merge(cache / "demo" / "models" / "generalist", built)
    assert (wrapped, lora) == _expected_modules([26, 27, 28, 29])
    assert diff <= 1e-4 and moved > 0.1, (diff, moved)


def test_build_prints_the_config_path_last_and_reruns_only_verify(demo_cache):
    cache, first = demo_cache
    conf = Path(first.stdout.strip().splitlines()[-1])
    assert conf.is_absolute() and conf.is_file() and conf.parent == cache / "demo"
    assert "building the index" in first.stderr
    again = _cli("demo", "build", "--cache", cache)
    assert again.returncode == 0
    assert again.stdout.strip().splitlines()[-1] == str(conf)
    assert "verified, nothing to do" in again.stderr
    # an older demo's config (before [catalog].models_root) is written anew; the index is kept
    text = conf.read_text()
    assert 'models_root = "."' in text
    conf.write_text(text.split("\n[catalog]")[0] + "\n")
    older = _cli("demo", "build", "--cache", cache)
    assert older.returncode == 0 and "rebuilt config" in older.stderr, older.stderr
    assert "building the index" not in older.stderr and conf.read_text() == text


def test_the_catalog_docs_admin_example_runs_on_the_demo(demo_cache, tmp_path):
    """docs/catalog.md's admin example, pasted into a shell against a copy of the demo: the demo's
    [catalog].models_root takes its relative paths; science goes out and comes back, the same."""
    import httpx

    from bench.loopback import LoopbackServer
    from index_store.loader import load_constellation
    from server.app import create_app
    from server.engine import Limits

    cache, _ = demo_cache
    shutil.copytree(cache / "demo", tmp_path / "demo", copy_function=os.link)  # commits replace the config
    text = (ROOT / "docs" / "catalog.md").read_text()
    block = next(b for b in text.split("```bash\n")[1:] if "/v1/specialists/science" in b).split("```")[0]
    commands = block.replace("\\\n", " ").strip().splitlines()
    assert len(commands) == 2 and all(c.startswith("curl ") for c in commands), commands
    loaded = load_constellation(tmp_path / "demo" / "constellation.toml")
    with LoopbackServer(create_app(loaded, Limits(max_seq_len=256), admin_key="docs-admin")) as url:
        before = httpx.get(url + "/v1/specialists", headers={"Authorization": "Bearer docs-admin"}).json()
        shell = {"PATH": "/usr/local/bin:/usr/bin:/bin", "CONSTELLATION_ADMIN_KEY": "docs-admin"}
        answers = []
        for cmd in commands:
            p = subprocess.run(["bash", "-c", cmd.replace("http://127.0.0.1:8000", url)], env=shell,
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stderr
            answers.append(json.loads(p.stdout))
            assert "error" not in answers[-1], answers[-1]
    assert [a["catalog_version"] for a in answers] == [1, 2]
    assert [s["name"] for s in answers[0]["specialists"]] == ["medical", "legal", "code"]
    assert answers[1]["specialists"] == before["specialists"]
    # the same index, but that a domain added by a catalog change runs uncalibrated, at strength 1
    # (docs/weightings.md); science's calibrated strength was 1 too
    cal, was = answers[1]["index"].pop("calibration"), before["index"].pop("calibration")
    assert answers[1]["index"] == before["index"] and was["strength"].pop("science") == 1.0
    assert cal.pop("uncalibrated") == ["science"] and cal == was


def test_demo_is_an_ordinary_constellation(demo):
    from transformers import AutoModelForCausalLM

    c = demo.constellation
    assert c.domains == ["medical", "legal", "code", "science"]
    assert c.g.mc.n_layers == 30 and c.d == 576 and c.settings.layers == "auto"
    assert c.layers == [26, 27, 28, 29]  # "auto": the layers the adapters change
    assert all(c.trunk_exact.values())
    assert all(d.layers == [26, 27, 28, 29] for d in c.differences.values())
    assert demo.report["specialist_kinds"] == {d: "adapter" for d in c.domains}
    sizes = c.resident_bytes()
    assert all(sizes[d] < sizes["generalist"] / 100 for d in c.domains)  # held as rank-16 factors
    # each specialist folder is a PEFT LoRA adapter: peft's own reading of it gives the logits of
    # Constellation's one-hot composition of that specialist
    from peft import PeftModel

    ids, am = demo.encode(["def add(a, b):\n    return a + b", "The patient presented with acute dyspnea"])
    gp = c.generalist_pass(ids, am)
    for dom in c.domains:
        folder = demo.config.specialists[dom]
        assert (Path(folder) / "adapter_config.json").is_file()
        base = AutoModelForCausalLM.from_pretrained(str(demo.config.generalist.path), local_files_only=True,
                                                    dtype=torch.float32)
        hf = PeftModel.from_pretrained(base, str(folder), local_files_only=True).eval()
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=am).logits
        plan = c.plan(gp, 0, CompositionParams(mode="weights", weights={dom: 1.0}))
        got = c.composed_logits(gp, [plan, plan], "mix")
        assert ((ref - got).abs() * am[..., None]).max().item() <= 1e-4, dom


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
    mixed = json.loads((PROBES / "index.json").read_text())["mixed"]  # the index's own blended probes
    assert len(mixed) >= 30 and all(len(set(p["domains"])) >= 2 for p in mixed)
    a = {norm(t) for ts in index.values() for t in ts} | {norm(p["text"]) for p in mixed}
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
    from demo.lora import read_peft

    monkeypatch.setattr(train, "all_probe_texts", lambda: ["a probe sentence that must never be trained on"])
    g, tok = demo.constellation.g, demo.tokenizer
    docs = [f"Term {i}: the process by which cells divide and grow, number {i}." for i in range(60)]
    tc = train.TrainConfig(steps=4, batch=2, seq_len=32, rank=2, alpha=4.0, heldout_chunks=2, checkpoint_every=1)
    gen_ids = train.token_chunks(tok, docs[:10], 2, 32, 0)
    gen_trunk = train.trunk_states(g, gen_ids, 26, 2, "general")
    info = train.train_domain(g, tok, "science", docs, gen_ids, gen_trunk, tc, tmp_path / "w1", tmp_path / "a1")
    assert info["train_tokens"] == 4 * 2 * 32
    straight, rank, alpha, layers = read_peft(tmp_path / "a1" / "science")
    assert (rank, alpha, layers) == (2, 4.0, [26, 27, 28, 29])
    assert any(float(v.abs().sum()) > 0 for k, v in straight.items() if k.endswith("lora_B"))

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
    resumed, _, _, _ = read_peft(tmp_path / "a2" / "science")
    for k in straight:
        assert torch.allclose(straight[k], resumed[k], atol=1e-6), k


def test_training_any_layers_writes_a_peft_folder_peft_reads(demo, tmp_path, monkeypatch):
    """`demo train --layers 3,28`: the trunk is cached below block 3, blocks 3 and 28 (only) are
    adapted, and the folder PEFT loads is the adapter we trained (equal to the dense merge)."""
    from demo import train
    from demo.lora import read_peft

    monkeypatch.setattr(train, "all_probe_texts", lambda: ["a probe sentence that must never be trained on"])
    g, tok = demo.constellation.g, demo.tokenizer
    assert train.parse_layers("26-29", 30) == [26, 27, 28, 29] and train.parse_layers("all", 30) == list(range(30))
    assert train.parse_layers("0,5,10", 30) == [0, 5, 10]
    with pytest.raises(ValueError):
        train.parse_layers("28-31", 30)
    docs = [f"Term {i}: the process by which cells divide and grow, number {i}." for i in range(60)]
    tc = train.TrainConfig(steps=3, batch=2, seq_len=32, rank=2, alpha=4.0, lr=1e-2, heldout_chunks=2,
                           checkpoint_every=10, layers="3,28")
    gen_ids = train.token_chunks(tok, docs[:10], 2, 32, 0)
    gen_trunk = train.trunk_states(g, gen_ids, 3, 2, "general")
    info = train.train_domain(g, tok, "science", docs, gen_ids, gen_trunk, tc, tmp_path / "w", tmp_path / "a")
    assert info["layers"] == [3, 28] and info["heldout_loss"]["specialist"] != info["heldout_loss"]["generalist"]
    tensors, rank, alpha, layers = read_peft(tmp_path / "a" / "science")
    assert layers == [3, 28] and {int(k.split(".")[2]) for k in tensors} == {3, 28}
    diff, moved, wrapped, lora = _peft_vs_dense_merge(demo.config.generalist.path, tmp_path / "a" / "science")
    assert (wrapped, lora) == _expected_modules([3, 28])
    assert diff <= 1e-4 and moved > 0, (diff, moved)


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
