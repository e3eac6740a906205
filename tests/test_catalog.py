"""The catalog (issue "Live specialists"), offline: add, replace and remove a specialist as one
atomic, versioned snapshot; refusals change nothing; a crash at any step leaves the old or the new
catalog, never a mix."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fixtures
from index_store.catalog import STEPS, CatalogError, Change, apply, listing
from index_store.config import load_config
from index_store.loader import load_constellation
from index_store.probes import load_probes
from index_store.store import read_index, read_manifest
from peft_fixtures import make_peft_adapter

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("medical", "legal", "code", "science")


@pytest.fixture
def fresh(built, tmp_path):
    """A private copy of a built 4-domain llama fixture constellation."""
    src = built("llama", domains=DOMAINS).parent
    shutil.copytree(src, tmp_path / "c")
    return tmp_path / "c" / "constellation.toml"


def state(conf: Path) -> tuple:
    """Everything a change may touch: the config's bytes and the catalog folder's listing."""
    cat = conf.parent / ".catalog"
    return conf.read_bytes(), sorted(p.name for p in cat.iterdir() if p.name != "lock") if cat.exists() else []


def probes_of(conf: Path, name: str) -> list[str]:
    return load_probes(load_config(conf).index.probes)[name]


def test_remove_then_add_back_reproduces_the_index_bit_for_bit(fresh):
    fresh.chmod(0o640)
    before_cfg = load_config(fresh)
    m0, t0 = read_index(before_cfg.index.path)
    science = probes_of(fresh, "science")
    r = apply(fresh, Change("remove", "science"))
    assert r.version == 1 and list(r.config.specialists) == ["medical", "legal", "code"] and r.fingerprinted == []
    loaded = load_constellation(fresh)  # loads and verifies (domains, probes hash, settings)
    assert loaded.constellation.domains == ["medical", "legal", "code"] and loaded.manifest["catalog_version"] == 1
    r = apply(fresh, Change("add", "science", fresh.parent / "models" / "science", science))
    assert r.version == 2 and r.fingerprinted == ["science"]  # only the new domain's probes
    m2, t2 = read_index(load_config(fresh).index.path)
    assert m2["probe_domains"] == m0["probe_domains"] and m2["probes_sha256"] == m0["probes_sha256"]
    for k in ("basis", "centroids", "raw_centroids"):
        assert torch.equal(t2[k], t0[k]), k
    assert load_constellation(fresh).constellation.domains == list(DOMAINS)
    # the folder is written as given, relative to the config; the file keeps its mode, the snapshot
    # folders take the constellation folder's (servers may run as another user)
    assert 'science = "models/science"' in fresh.read_text()
    assert fresh.stat().st_mode & 0o777 == 0o640
    snap = load_config(fresh).index.path.parent
    assert snap.stat().st_mode & 0o777 == fresh.parent.stat().st_mode & 0o777
    # comments go, but every setting stays
    after = load_config(fresh)
    assert after.composition == before_cfg.composition and after.runtime == before_cfg.runtime
    assert after.index.model_dump(exclude={"path", "probes"}) == before_cfg.index.model_dump(exclude={"path", "probes"})


def test_an_adapter_joins_and_is_replaced_and_listed(fresh, tmp_path):
    adapter = make_peft_adapter(fresh.parent / "models" / "generalist", fresh.parent / "models" / "finance",
                                seed=3, target_modules=["q_proj", "v_proj"], r=4)
    texts = [f"The bond yield and the equity {w} rose." for w in ("index", "market", "fund", "price", "rate")]
    r = apply(fresh, Change("add", "finance", adapter, texts))
    assert list(r.config.specialists)[-1] == "finance" and r.manifest["probe_counts"]["finance"] == 5
    loaded = load_constellation(fresh)
    assert loaded.report["specialist_kinds"]["finance"] == "adapter"
    basis = read_index(r.config.index.path)[1]["basis"]
    assert basis.shape[0] == 5 and torch.allclose(basis @ basis.T, torch.eye(5, dtype=basis.dtype), atol=1e-9)
    rows = {x["name"]: x for x in listing(r.config, r.manifest)}
    assert rows["finance"]["kind"] == "adapter" and rows["finance"]["rank"] == 4 and rows["finance"]["probes"] == 5
    # replace the probes only: the folder stays, only finance is fingerprinted again
    r2 = apply(fresh, Change("replace", "finance", None, texts[:4] + ["The stock split."]))
    assert r2.fingerprinted == ["finance"] and r2.config.specialists["finance"] == adapter.resolve()
    assert r2.version == 2


def test_gram_schmidt_appends_an_axis_and_keeps_the_others(built, tmp_path):
    src = built("llama", domains=("medical", "legal"), basis="gram_schmidt", top_k=2).parent
    shutil.copytree(src, tmp_path / "g")
    conf = tmp_path / "g" / "constellation.toml"
    E0 = read_index(load_config(conf).index.path)[1]["basis"]
    texts = fixtures.probe_texts(0)["code"]
    apply(conf, Change("add", "code", conf.parent / "models" / "legal", texts))
    E1 = read_index(load_config(conf).index.path)[1]["basis"]
    assert E1.shape[0] == 3 and torch.equal(E1[:2], E0)


def test_refused_changes_leave_everything_as_it_was(fresh, built, tmp_path):
    texts = probes_of(fresh, "science")
    other = built("gpt2", domains=("medical", "legal")).parent
    foreign = make_peft_adapter(other / "models" / "generalist", tmp_path / "gpt2-adapter", seed=1,
                                target_modules=["c_attn"], r=2)
    outside = tmp_path / "elsewhere"
    shutil.copytree(fresh.parent / "models" / "science", outside)
    cases = [  # (change, root_only, status, words in the message)
        (Change("add", "science", fresh.parent / "models" / "science", texts), False, 409, "exists"),
        (Change("remove", "finance"), False, 404, "no specialist"),
        (Change("replace", "finance", fresh.parent / "models" / "science", texts), False, 404, "no specialist"),
        (Change("add", "bad name", fresh.parent / "models" / "science", texts), False, 400, "letters"),
        (Change("add", "x", fresh.parent / "models" / "nowhere", texts), False, 400, "not found"),
        (Change("add", "x", fresh.parent / "models" / "science", texts[:2]), False, 400, "at least"),
        (Change("add", "x", fresh.parent / "models" / "science", None), False, 400, "probes"),
        (Change("add", "x", fresh.parent / "models" / "science", ["ok", "", "a", "b"]), False, 400, "non-empty"),
        (Change("add", "x", foreign, texts), False, 422, "does not fit"),
        (Change("add", "x", fresh.parent / "models" / "science", texts), False, 422, "no basis"),  # = science's
        (Change("replace", "science", None, None), False, 400, "nothing to replace"),
        (Change("add", "x", outside, texts), True, 403, "models_root"),
    ]
    before = state(fresh)
    for change, root_only, status, words in cases:
        with pytest.raises(CatalogError) as e:
            apply(fresh, change, root_only=root_only)
        assert e.value.status == status and words in str(e.value), (change, str(e.value))
        assert state(fresh) == before, change
    assert load_constellation(fresh).constellation.domains == list(DOMAINS)


def test_removing_down_to_one_and_top_k(built, tmp_path):
    src = built("llama", domains=("medical", "legal"), top_k=2).parent
    shutil.copytree(src, tmp_path / "t")
    conf = tmp_path / "t" / "constellation.toml"
    with pytest.raises(CatalogError, match="top_k = 2 would exceed"):
        apply(conf, Change("remove", "legal"))
    text = conf.read_text().replace("top_k = 2", "top_k = 1")
    conf.write_text(text)
    apply(conf, Change("remove", "legal"))
    with pytest.raises(CatalogError, match="last specialist"):
        apply(conf, Change("remove", "medical"))


def test_concurrent_changes_are_serialised(fresh):
    errors = []

    def add(name):
        texts = fixtures.probe_texts(seed=7 if name == "extra1" else 8)["science"]
        try:
            apply(fresh, Change("add", name, fresh.parent / "models" / "science", texts))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=add, args=(n,)) for n in ("extra1", "extra2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    cfg = load_config(fresh)
    assert cfg.catalog.version == 2 and set(cfg.specialists) == set(DOMAINS) | {"extra1", "extra2"}
    assert read_manifest(cfg.index.path)["domains"] == list(cfg.specialists)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_any_step_leaves_the_old_or_the_new_catalog(fresh, step):
    """The change is killed (os._exit) at each step; the constellation then loads and verifies as
    the old or the new catalog, and the next change succeeds."""
    probes = fresh.parent / "finance.txt"
    probes.write_text("\n".join(f"The bond yield and the equity {w} rose." for w in ("a", "b", "c", "d")))
    p = run_cli("specialist", "add", str(fresh), "finance", str(fresh.parent / "models" / "science"),
                "--probes", str(probes), "--quiet", env={"CONSTELLATION_FAILPOINT": step})
    assert p.returncode == 86, p.stderr
    committed = STEPS.index(step) >= STEPS.index("config-renamed")
    want = list(DOMAINS) + (["finance"] if committed else [])
    assert load_constellation(fresh).constellation.domains == want
    assert load_config(fresh).catalog.version == (1 if committed else 0)
    # the next change goes through and cleans up what the crash left
    p = run_cli("specialist", "remove", str(fresh), "code")
    assert p.returncode == 0, p.stderr
    assert "the paper's rule of thumb" in p.stdout and "[composition].mode, constellation (the default)" in p.stdout
    assert load_constellation(fresh).constellation.domains == [d for d in want if d != "code"]
    assert not list((fresh.parent / ".catalog").glob(".v*.tmp-*"))


def test_the_cli_lists_and_refuses_in_one_line(fresh):
    p = run_cli("specialist", "list", str(fresh), "--json")
    doc = json.loads(p.stdout)
    assert doc["version"] == 0 and [s["name"] for s in doc["specialists"]] == list(DOMAINS)
    p = run_cli("specialist", "add", str(fresh), "medical", str(fresh.parent / "models" / "legal"),
                "--probes", str(fresh.parent / "probes.json"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "exists" in p.stderr
    p = run_cli("specialist", "add", str(fresh), "finance", str(fresh.parent / "models" / "legal"),
                "--probes", str(fresh.parent / "probes.json"))
    assert p.returncode == 2 and "no domains.finance" in p.stderr
    p = run_cli("specialist", "replace", str(fresh), "legal", "--probes", str(fresh.parent / "probes.json"))
    assert p.returncode == 0 and "catalog version 1" in p.stdout and "fingerprinted: nothing" in p.stdout
    # the CLI's words: NAME, FOLDER, --probes FILE
    few = fresh.parent / "few.txt"
    few.write_text("one\ntwo\n")
    p = run_cli("specialist", "add", str(fresh), "fin ance", str(fresh.parent / "models" / "legal"), "--probes", str(few))
    assert p.returncode == 2 and p.stderr.startswith("constellation: NAME 'fin ance'")
    p = run_cli("specialist", "add", str(fresh), "finance", str(fresh.parent / "models" / "legal"), "--probes", str(few))
    assert p.returncode == 2 and f"--probes {few}: 2 given" in p.stderr
    enough = fresh.parent / "enough.txt"
    enough.write_text("one\ntwo\nthree\nfour\n")
    p = run_cli("specialist", "add", str(fresh), "finance", "/nope", "--probes", str(enough))
    assert p.returncode == 2 and "FOLDER: /nope: folder not found" in p.stderr, p.stderr
    # a reader that goes away early is not an error
    p = subprocess.run(f"{sys.executable} -m server.cli specialist list {fresh} --json | head -c 5", shell=True,
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.stderr == "" and len(p.stdout) == 5
