"""Index store round trip, tamper and mismatch refusal, atomic replacement, config errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import fixtures
from composer.arch import ArchitectureError
from composer.weights import WeightsError
from index_store.config import ConfigError, load_config
from index_store.indexing import build_index
from index_store.loader import load_constellation
from index_store.probes import ProbeError
from index_store.store import MANIFEST, TENSORS, IndexStoreError, read_index


@pytest.fixture()
def fresh(built, tmp_path):
    """A private copy of a built llama fixture constellation that a test may damage."""
    src = built("llama", domains=("medical", "legal", "code")).parent
    dst = tmp_path / "c"
    shutil.copytree(src, dst)
    return dst / "constellation.toml"


def test_round_trip(fresh):
    cfg = load_config(fresh)
    manifest, tensors = read_index(cfg.index.path)
    assert manifest["domains"] == ["medical", "legal", "code"]
    assert manifest["probe_domains"][-1] == "general"  # a control domain, diagnostics only
    assert set(manifest["diagnostics"]["controls"]) == {"general"}
    E = tensors["basis"]
    assert E.dtype == torch.float64 and E.shape == (3, 32)
    assert (E @ E.T - torch.eye(3, dtype=torch.float64)).abs().max() <= 1e-9
    loaded = load_constellation(fresh)
    assert torch.equal(loaded.constellation.basis, E)
    # rebuilding from the same inputs reproduces the same basis and hashes
    build_index(fresh, quiet=True)
    m2, t2 = read_index(cfg.index.path)
    assert torch.equal(t2["basis"], E)
    assert m2["files"] == manifest["files"] and m2["generalist_identity"] == manifest["generalist_identity"]


@pytest.mark.parametrize("name", [MANIFEST, TENSORS])
def test_flipped_byte_in_any_index_file_is_refused(fresh, name):
    path = load_config(fresh).index.path / name
    original = path.read_bytes()
    positions = sorted({0, 1, len(original) // 3, len(original) // 2, len(original) - 2, len(original) - 1})
    for pos in positions:
        data = bytearray(original)
        data[pos] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(IndexStoreError) as e:
            load_constellation(fresh)
        assert str(path.parent) in str(e.value)
    path.write_bytes(original)
    load_constellation(fresh)  # intact again


def test_missing_index_file_is_refused(fresh):
    idx = load_config(fresh).index.path
    (idx / TENSORS).unlink()
    with pytest.raises(IndexStoreError, match="missing"):
        load_constellation(fresh)
    shutil.rmtree(idx)
    with pytest.raises(IndexStoreError, match="index build"):
        load_constellation(fresh)


def test_index_for_another_generalist_is_refused(fresh):
    from safetensors.torch import load_file, save_file

    wfile = fresh.parent / "models" / "generalist" / "model.safetensors"
    sd = load_file(str(wfile))
    sd["model.norm.weight"] = sd["model.norm.weight"] * 1.01
    save_file(sd, str(wfile), metadata={"format": "pt"})
    with pytest.raises(IndexStoreError, match="different generalist"):
        load_constellation(fresh)


def test_changed_probes_or_settings_are_refused(fresh):
    probes = fresh.parent / "probes.json"
    data = json.loads(probes.read_text())
    data["domains"]["medical"].append("A new medical probe about renal biopsy.")
    probes.write_text(json.dumps(data))
    with pytest.raises(IndexStoreError, match="different probes"):
        load_constellation(fresh)
    build_index(fresh, quiet=True)
    load_constellation(fresh)
    fresh.write_text(fresh.read_text().replace('basis = "symmetric"', 'basis = "gram_schmidt"'))
    with pytest.raises(IndexStoreError, match=r"\[index\]\.basis"):
        load_constellation(fresh)
    text = fresh.read_text()
    fresh.write_text(text.replace('legal = "models/legal"\ncode = "models/code"', 'code = "models/code"\nlegal = "models/legal"'))
    with pytest.raises(IndexStoreError, match="domains"):
        load_constellation(fresh)


def test_failed_build_keeps_the_old_index(fresh, monkeypatch):
    import index_store.store as store

    idx = load_config(fresh).index.path
    before = {p.name: p.read_bytes() for p in idx.iterdir()}

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "save_file", boom)
    with pytest.raises(RuntimeError):
        build_index(fresh, quiet=True)
    assert {p.name: p.read_bytes() for p in idx.iterdir()} == before
    assert not [p for p in idx.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_gram_schmidt_index_records_residual_ratios(fresh):
    fresh.write_text(fresh.read_text().replace('basis = "symmetric"', 'basis = "gram_schmidt"'))
    m = build_index(fresh, quiet=True)
    ratios = m["diagnostics"]["residual_ratios"]
    assert ratios["medical"] == pytest.approx(1.0)
    assert 0 < ratios["code"] < 1
    _, t = read_index(load_config(fresh).index.path)
    C = t["centroids"]
    r2 = C[1] - (C[1] @ C[0]) / (C[0] @ C[0]) * C[0]
    assert ratios["legal"] == pytest.approx(float(r2.norm() / C[1].norm()), rel=1e-9)


# ---- config errors -------------------------------------------------------------------------------
def _write(tmp_path, text) -> Path:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return p


GOOD = """[generalist]
path = "g"
[specialists]
medical = "m"
[index]
path = "index"
probes = "probes.json"
"""


def test_config_relative_paths_resolve_against_the_file(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.generalist.path == (tmp_path / "g").resolve()
    assert cfg.index.probes == (tmp_path / "probes.json").resolve()
    assert cfg.composition.top_k == 3 and cfg.index.basis == "symmetric"
    assert cfg.composition.layers == "auto" and cfg.composition.signature == "generalist"  # the defaults


@pytest.mark.parametrize("value, ok", [('"auto"', True), ("4", True), ("0", False), ('"all"', False), ("2.5", False)])
def test_config_layers_is_auto_or_a_positive_count(tmp_path, value, ok):
    text = GOOD + f"\n[composition]\nlayers = {value}\n"
    if ok:
        assert load_config(_write(tmp_path, text)).composition.layers == json.loads(value)
    else:
        with pytest.raises(ConfigError, match=r"\[composition\]\.layers"):
            load_config(_write(tmp_path, text))


@pytest.mark.parametrize("text, expected", [
    (GOOD + "[composition]\ntop_k = 0\n", "[composition].top_k: Input should be greater than or equal to 1"),
    (GOOD + "[composition]\ntopk = 2\n", "[composition].topk: unknown key"),
    (GOOD + "[composition]\npolicy = \"rows\"\n", "[composition].policy: Value error, unknown policy 'rows'"),
    (GOOD.replace('basis', 'x') + '[runtime]\ndevice = "tpu"\n', "[runtime].device"),
    (GOOD.replace("[generalist]\npath = \"g\"\n", ""), "[generalist]: required key is missing"),
    (GOOD + "[index\n", "not valid TOML"),
    (GOOD.replace('probes = "probes.json"', 'probes = 3'), "[index].probes"),
])
def test_config_errors_name_the_file_and_key(tmp_path, text, expected):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value)
    assert expected in str(e.value)


def test_missing_config_and_folders(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    p = _write(tmp_path, GOOD)
    with pytest.raises(WeightsError, match="does not exist"):
        load_constellation(p)


def test_bad_probe_file(fresh):
    probes = fresh.parent / "probes.json"
    probes.write_text('{"domains": {"medical": []}}')
    with pytest.raises(ProbeError, match="non-empty list"):
        build_index(fresh, quiet=True)
    probes.write_text('{"domains": {"medical": ["x"]}}')
    with pytest.raises(ProbeError, match=r"no probes for specialist domain\(s\) \['legal', 'code'\]"):
        build_index(fresh, quiet=True)


# ---- model folder errors -------------------------------------------------------------------------
def test_unsupported_architecture_names_the_class(fresh):
    cfgp = fresh.parent / "models" / "generalist" / "config.json"
    cfg = json.loads(cfgp.read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    cfgp.write_text(json.dumps(cfg))
    with pytest.raises(ArchitectureError, match="unsupported architecture class 'FalconForCausalLM'"):
        load_constellation(fresh)


def test_pickle_weights_are_refused(fresh):
    mdir = fresh.parent / "models" / "legal"
    (mdir / "model.safetensors").rename(mdir / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="pickle"):
        load_constellation(fresh)


def test_truncated_safetensors_is_refused(fresh):
    w = fresh.parent / "models" / "medical" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cannot read safetensors"):
        load_constellation(fresh)


def test_specialist_config_mismatch_is_refused(fresh):
    cfgp = fresh.parent / "models" / "code" / "config.json"
    cfg = json.loads(cfgp.read_text())
    cfg["rms_norm_eps"] = 1e-5
    cfgp.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="specialist 'code'.*rms_norm_eps"):
        load_constellation(fresh)


def test_specialist_tokenizer_mismatch_is_refused(fresh, tmp_path):
    other = tmp_path / "tok"
    other.mkdir()
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(other))
    sdir = fresh.parent / "models" / "legal"
    for f in sdir.iterdir():
        if f.name.startswith("tokenizer"):
            f.unlink()
    for f in other.iterdir():
        shutil.copy(f, sdir / f.name)
    with pytest.raises(WeightsError, match="specialist 'legal'.*tokenizer"):
        load_constellation(fresh)
