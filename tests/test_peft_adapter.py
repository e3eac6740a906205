"""PEFT LoRA adapter folders read as low-rank sources: exact against PEFT's own merge, PEFT's
matching rules reproduced, and one clear refusal per unsupported case.

Real peft, real safetensors, the tiny fixture generalists; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fixtures
from composer.weights import WeightsError, load_model
from index_store.peft import (AdapterError, check_target_module_exists, get_pattern_key, is_adapter_folder,
                              load_adapter)
from peft_fixtures import make_peft_adapter, peft_merged_state_dict

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
Q1 = "base_model.model.model.layers.1.self_attn.q_proj"
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(scope="module")
def generalists(tmp_path_factory):
    """arch -> (HF generalist folder, loaded Transformer), built lazily once per module."""
    root = tmp_path_factory.mktemp("peft_generalists")
    cache: dict[str, tuple[Path, object]] = {}

    def get(arch: str):
        if arch not in cache:
            fixtures.build_constellation(root / arch, arch=arch, domains=())
            gdir = root / arch / "models" / "generalist"
            cache[arch] = (gdir, load_model(gdir))
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def adapters_root(tmp_path_factory):
    return tmp_path_factory.mktemp("peft_adapters")


def _layout(G, name: str) -> str:
    return G.arch.role(G.arch.split_layer_name(name, G.mc.n_layers)[1]).layout


def assert_matches_peft(G, gdir: Path, folder: Path, ad) -> dict[str, torch.Tensor]:
    """G + lowrank deltas + dense replacements == PEFT's merge_and_unload, tensor by tensor; the
    adapter's entries are exactly the tensors the merge changed."""
    ref = peft_merged_state_dict(gdir, folder)
    changed = set()
    for name, merged in ref.items():
        if name not in G.params:
            assert name == G.arch.lm_head and G.mc.tie_embeddings, name
            assert torch.equal(merged, G.params[G.arch.embed])
            continue
        expected = G.params[name]
        if name in ad.lowrank:
            expected = expected + ad.lowrank[name].delta(_layout(G, name))
        if name in ad.dense:
            expected = ad.dense[name]
        assert expected.shape == merged.shape, name
        assert (expected - merged).abs().max().item() <= 1e-6, name
        if not torch.equal(merged, G.params[name]):
            changed.add(name)
    assert set(ref) - {G.arch.lm_head} == set(G.params) - {G.arch.lm_head}
    assert set(ad.lowrank) | set(ad.dense) == changed
    assert not set(ad.lowrank) & set(ad.dense)
    split = {n: G.arch.split_layer_name(n, G.mc.n_layers) for n in changed}
    assert ad.layers == sorted({s[0] for s in split.values() if s is not None})
    assert ad.touches_globals == sorted(n for n, s in split.items() if s is None)
    return ref


# ---- exactness against PEFT ------------------------------------------------------------------------
CASES = {
    # name: (arch, LoraConfig kwargs)
    "llama-all": ("llama", dict(target_modules=LLAMA_ALL, r=4, lora_alpha=8)),
    "llama-qv": ("llama", dict(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=5)),
    "llama-layers": ("llama", dict(target_modules=["q_proj", "o_proj", "down_proj"], r=3, lora_alpha=7,
                                   layers_to_transform=[1, 4])),
    # PEFT takes the FIRST matching pattern: layer 1's q_proj gets the general pattern's rank 2 and
    # alpha 16, not the more specific entry's. (The general key also sorts first: PEFT writes
    # adapter_config.json with sort_keys=True, see test_order_dependent_patterns_refused_like_peft.)
    "llama-patterns": ("llama", dict(target_modules=LLAMA_ALL, r=4, lora_alpha=8,
                                     rank_pattern={r"^model\.layers\.\d\.self_attn\.q_proj": 2,
                                                   "model.layers.1.self_attn.q_proj": 6,
                                                   r"^model\.layers\.[0-2]\.mlp\.down_proj": 5},
                                     alpha_pattern={r"^model\.layers\.\d\.self_attn\.q_proj": 16,
                                                    "model.layers.1.self_attn.q_proj": 3,
                                                    "layers.5.mlp.up_proj": 11})),
    "llama-rslora-norms": ("llama", dict(target_modules=["k_proj", "up_proj"], r=4, lora_alpha=3, use_rslora=True,
                                         modules_to_save=["norm"])),  # endswith: every norm, final one too
    "llama-all-linear-exclude": ("llama", dict(target_modules="all-linear", r=2, lora_alpha=4,
                                               exclude_modules=["gate_proj"])),
    # training-time LoRA variants: VeLoRA (compressed backward), MonteCLoRA (training-time sampling)
    "llama-velora": ("llama", dict(target_modules=["v_proj"], r=2, velora_config={"num_groups": 2})),
    "qwen2-monteclora": ("qwen2", dict(target_modules=["o_proj"], r=2, monteclora_config={"num_samples": 2})),
    "qwen2-all-bias": ("qwen2", dict(target_modules=LLAMA_ALL, r=4, lora_alpha=6, bias="all")),
    "qwen2-qv-lora_only": ("qwen2", dict(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=2,
                                         bias="lora_only", modules_to_save=["post_attention_layernorm"])),
    "qwen2-regex-head": ("qwen2", dict(target_modules=r".*\.layers\.[345]\.self_attn\.(k|v)_proj", r=3,
                                       lora_alpha=9, modules_to_save=["lm_head"])),
    "gpt2-all": ("gpt2", dict(target_modules=GPT2_ALL, r=4, lora_alpha=8)),
    "gpt2-attn-layers": ("gpt2", dict(target_modules=["c_attn"], r=2, lora_alpha=3, layers_to_transform=[0, 5],
                                      layers_pattern="h")),
    "gpt2-patterns-rslora": ("gpt2", dict(target_modules=GPT2_ALL, r=4, lora_alpha=8, use_rslora=True,
                                          rank_pattern={"mlp.c_proj": 2, r"h\.[0-2]\.attn\.c_attn": 6},
                                          alpha_pattern={"c_fc": 5})),
    "gpt2-bias-lnf": ("gpt2", dict(target_modules=["c_attn", "c_proj"], r=3, lora_alpha=6, bias="all",
                                   modules_to_save=["ln_f", "ln_1"], layers_to_transform=[2, 3])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_peft_merge(case, generalists, adapters_root):
    arch, kw = CASES[case]
    gdir, G = generalists(arch)
    folder = make_peft_adapter(gdir, adapters_root / case, seed=len(case), **kw)
    ad = load_adapter(folder, G)
    assert_matches_peft(G, gdir, folder, ad)
    assert ad.lowrank, case
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert ad.config["r"] == cfg["r"] and ad.config["lora_alpha"] == cfg["lora_alpha"]
    assert ad.config["use_rslora"] == cfg["use_rslora"]
    assert ad.config["base_model_name_or_path"] == str(gdir)
    assert set(ad.config["ranks"]) == set(ad.lowrank)
    assert all(ad.lowrank[n].rank == r for n, r in ad.config["ranks"].items())
    for lr in ad.lowrank.values():
        assert lr.A.dtype == torch.float32 and lr.B.dtype == torch.float32
    f = folder / "adapter_model.safetensors"
    assert ad.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert ad.nbytes == sum(lr.nbytes for lr in ad.lowrank.values()) + sum(
        t.numel() * t.element_size() for t in ad.dense.values())
    assert ad.folder == folder


def test_rank_and_alpha_patterns_first_match(generalists, adapters_root):
    """The per-module ranks and scales are PEFT's, including its first-match-wins pattern rule."""
    gdir, G = generalists("llama")
    folder = adapters_root / "llama-patterns"
    if not folder.exists():
        make_peft_adapter(gdir, folder, seed=len("llama-patterns"), **CASES["llama-patterns"][1])
    ad = load_adapter(folder, G)
    ranks, scales = ad.config["ranks"], ad.config["scales"]
    q1 = "model.layers.1.self_attn.q_proj.weight"
    assert ranks[q1] == 2 and scales[q1] == pytest.approx(16 / 2)  # the general pattern, listed first, wins
    assert ranks["model.layers.4.self_attn.q_proj.weight"] == 2
    assert ranks["model.layers.0.mlp.down_proj.weight"] == 5
    assert ranks["model.layers.3.mlp.down_proj.weight"] == 4  # regex is anchored to layers 0-2
    assert scales["model.layers.5.mlp.up_proj.weight"] == pytest.approx(11 / 4)
    assert scales["model.layers.4.mlp.up_proj.weight"] == pytest.approx(8 / 4)


def test_all_linear_shorthand(generalists, adapters_root, tmp_path):
    """PEFT saves "all-linear" expanded; a config that still says "all-linear" means the same set
    (every Linear/Conv1D but the LM head, peft.tuners.tuners_utils._maybe_include_all_linear_layers)."""
    gdir, G = generalists("llama")
    folder = adapters_root / "llama-all-linear-exclude"
    if not folder.exists():
        make_peft_adapter(gdir, folder, seed=1, **CASES["llama-all-linear-exclude"][1])
    saved = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(saved, list) and "gate_proj" in saved  # expanded (and shortened) by PEFT
    expected = load_adapter(folder, G)
    assert len(expected.lowrank) == 6 * G.mc.n_layers
    v = variant(folder, tmp_path / "shorthand", config=lambda c: c.__setitem__("target_modules", "all-linear"))
    ad = load_adapter(v, G)
    assert ad.lowrank.keys() == expected.lowrank.keys()


def test_order_dependent_patterns_refused_like_peft(generalists, adapters_root):
    """PEFT writes adapter_config.json with ``sort_keys=True`` (peft/config.py), so overlapping
    rank_pattern keys whose first match depends on insertion order come back in another order: the
    saved ranks no longer follow from the saved config. PEFT's own from_pretrained then fails on a
    size mismatch; we refuse with the key."""
    gdir, G = generalists("llama")
    folder = make_peft_adapter(gdir, adapters_root / "order", target_modules=["q_proj"], r=4,
                               rank_pattern={"q_proj": 2, "model.layers.1.self_attn.q_proj": 6})
    saved = json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]
    assert list(saved) == ["model.layers.1.self_attn.q_proj", "q_proj"]
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_merged_state_dict(gdir, folder)
    refused(folder, G, "adapter_model.safetensors", f"{Q1}.lora_A.weight", "rank 2, but .*r=6")


def test_layers_and_globals(generalists, adapters_root):
    gdir, G = generalists("gpt2")
    ad = load_adapter(make_peft_adapter(gdir, adapters_root / "g-layers", target_modules=["c_fc"],
                                       layers_to_transform=[4, 5]), G)
    assert ad.layers == [4, 5] and ad.touches_globals == []
    assert sorted(ad.lowrank) == ["transformer.h.4.mlp.c_fc.weight", "transformer.h.5.mlp.c_fc.weight"]
    lr = ad.lowrank["transformer.h.4.mlp.c_fc.weight"]
    W = G.params["transformer.h.4.mlp.c_fc.weight"]  # Conv1D: stored [in, out]
    assert (lr.out_features, lr.in_features) == (W.shape[1], W.shape[0])
    assert lr.delta("conv1d").shape == W.shape


def test_gpt2_model_without_lm_head_names(generalists, adapters_root):
    """An adapter trained on a bare GPT2Model names modules ``h.N...``; the generalist carries
    ``transformer.``."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel

    gdir, G = generalists("gpt2")
    folder = adapters_root / "gpt2-bare"
    model = AutoModel.from_pretrained(str(gdir), local_files_only=True, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(target_modules=["c_attn", "c_proj"], r=2, lora_alpha=4,
                                              fan_in_fan_out=True, init_lora_weights=False))
        pm.save_pretrained(str(folder))
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.h.0.attn.c_attn.lora_A.weight" in f.keys()
    ad = load_adapter(folder, G)
    model = AutoModel.from_pretrained(str(gdir), local_files_only=True, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload().state_dict()
    assert len(ad.lowrank) == 18
    for k, v in merged.items():
        name = "transformer." + k
        expected = G.params[name]
        if name in ad.lowrank:
            expected = expected + ad.lowrank[name].delta("conv1d")
        assert (expected - v).abs().max().item() <= 1e-6, k


def test_dtype_and_unchanged_biases(generalists, adapters_root):
    """bias="all" saves every bias; those equal to G's are dropped, so layers stays honest."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    gdir, G = generalists("qwen2")
    folder = adapters_root / "qwen2-untrained-bias"
    model = AutoModelForCausalLM.from_pretrained(str(gdir), local_files_only=True, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[5], bias="all",
                                              init_lora_weights=False))
        pm.save_pretrained(str(folder))
    ad = load_adapter(folder, G, dtype=torch.bfloat16)
    assert ad.dense == {} and ad.layers == [5]
    assert len(ad.config["dense_unchanged"]) == 3 * G.mc.n_layers  # q/k/v biases of every layer
    lr = ad.lowrank["model.layers.5.self_attn.q_proj.weight"]
    assert lr.A.dtype == lr.B.dtype == torch.bfloat16
    assert ad.nbytes == lr.nbytes == 2 * (lr.A.numel() + lr.B.numel())


# ---- PEFT's matching rules ----------------------------------------------------------------------
def test_get_pattern_key_is_peft_rule():
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    keys = ["model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj", "transformer.h.2.attn.c_attn",
            "transformer.h.2.attn.c_proj", "transformer.h.2.mlp.c_proj", "h.0.attn.c_attn"]
    patterns = [
        {"q_proj": 2, "model.layers.1.self_attn.q_proj": 6},
        {"model.layers.1.self_attn.q_proj": 6, "q_proj": 2},
        {"layers.1.self_attn.q_proj": 3},  # suffix at a dot boundary: not layers.11
        {"1.self_attn.q_proj": 3},  # "model.layers.11..." ends with it but not at a dot boundary
        {r"^model\.layers\.1\..*": 4, "c_proj": 5},
        {"attn.c_proj": 1, r"h\.\d\.attn\.c_.*": 7},
        {"proj": 9},  # not a whole segment
        {"c_.+": 9},
        {},
    ]
    for pat in patterns:
        for key in keys:
            assert get_pattern_key(pat.keys(), key) == peft_get_pattern_key(pat.keys(), key), (pat, key)
    assert get_pattern_key(["q_proj", "model.layers.1.self_attn.q_proj"], keys[0]) == "q_proj"
    assert get_pattern_key(["1.self_attn.q_proj"], keys[1]) == keys[1]  # no match: the key itself


def test_target_matching_is_peft_rule(generalists):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists as peft_check

    configs = [
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[1, 3]),
        dict(target_modules=["c_proj"], layers_to_transform=2, layers_pattern="h"),
        dict(target_modules=["self_attn.o_proj", "mlp"], layers_to_transform=[0], layers_pattern=["layers"]),
        dict(target_modules=["model.layers.2.mlp.up_proj", "down_proj"], layers_to_transform=[4]),
        dict(target_modules=r".*\.(q|k)_proj"),
        dict(target_modules=r"transformer\.h\.[0-3]\.attn\..*"),
        dict(target_modules=["proj", "_proj", "c_fc"]),
        dict(target_modules=LLAMA_ALL + GPT2_ALL, exclude_modules=["k_proj", "mlp.c_proj"]),
        dict(target_modules=LLAMA_ALL + GPT2_ALL, exclude_modules=r".*\.[24]\..*"),
        dict(target_modules=LLAMA_ALL + GPT2_ALL, modules_to_save=["o_proj", "attn.c_attn"]),
        dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[], layers_pattern="h"),
    ]
    for arch in ("llama", "gpt2"):
        _, G = generalists(arch)
        module_names = sorted({n.rsplit(".", 1)[0] for n in G.params})
        for kw in configs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                conf = LoraConfig(**kw)
            saved = json.loads(json.dumps(conf.to_dict(), default=sorted))  # what adapter_config.json holds
            for key in module_names:
                assert bool(check_target_module_exists(saved, key)) == bool(peft_check(conf, key)), (kw, key)


# ---- refusals ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_llama(generalists, adapters_root):
    gdir, G = generalists("llama")
    folder = make_peft_adapter(gdir, adapters_root / "refusal-base", target_modules=["q_proj", "v_proj"], r=4,
                               lora_alpha=8)
    return folder, G


def variant(src: Path, dst: Path, tensors=None, config=None) -> Path:
    """Copy an adapter folder, editing its tensors and/or config."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        f = dst / "adapter_model.safetensors"
        with safe_open(str(f), "pt") as sf:
            td = {k: sf.get_tensor(k) for k in sf.keys()}
        tensors(td)
        save_file(td, str(f), metadata={"format": "pt"})
    return dst


def refused(folder: Path, G, file: str, key: str, match: str) -> str:
    with pytest.raises(AdapterError) as exc:
        load_adapter(folder, G)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(str(folder / file) + ": "), msg
    assert f": {key}: " in msg, msg
    assert re.search(match, msg), msg
    assert isinstance(exc.value, WeightsError)
    return msg




def test_is_adapter_folder(base_llama, generalists, tmp_path):
    folder, _ = base_llama
    gdir, _ = generalists("llama")
    assert is_adapter_folder(folder)
    assert not is_adapter_folder(gdir) and not is_adapter_folder(tmp_path / "nope")


def test_refuses_dora(generalists, adapters_root, base_llama, tmp_path):
    gdir, G = generalists("llama")
    folder = make_peft_adapter(gdir, adapters_root / "dora", target_modules=["q_proj"], r=2, use_dora=True)
    refused(folder, G, "adapter_config.json", "use_dora", "DoRA")
    # a magnitude vector in the weights even though the config does not say DoRA
    src, _ = base_llama
    key = f"{Q0}.lora_magnitude_vector"
    v = variant(src, tmp_path / "mag", tensors=lambda td: td.__setitem__(key, torch.ones(32)))
    refused(v, G, "adapter_model.safetensors", key, "DoRA")


def test_refuses_embedding_and_head_lora(generalists, adapters_root, base_llama, tmp_path):
    gdir, G = generalists("qwen2")
    folder = make_peft_adapter(gdir, adapters_root / "emb", target_modules=["embed_tokens", "q_proj"], r=2)
    refused(folder, G, "adapter_model.safetensors", "base_model.model.model.embed_tokens.lora_embedding_A",
            "LoRA on an embedding")
    folder = make_peft_adapter(gdir, adapters_root / "head", target_modules=["lm_head", "v_proj"], r=2)
    refused(folder, G, "adapter_config.json", "target_modules", "lm_head.*LM head")
    # the config alone: it targets the embeddings (and PEFT would have made a LoRA there)
    src, Gl = base_llama
    v = variant(src, tmp_path / "c",
                config=lambda c: c.__setitem__("target_modules", ["q_proj", "v_proj", "embed_tokens"]))
    refused(v, Gl, "adapter_config.json", "target_modules", "model.embed_tokens, an embedding")
    # the weights alone: lora_embedding_A / a LoRA on lm_head the config does not mention
    key = "base_model.model.model.embed_tokens.lora_embedding_A"
    v = variant(src, tmp_path / "e", tensors=lambda td: td.__setitem__(key, torch.zeros(4, 300)))
    refused(v, Gl, "adapter_model.safetensors", key, "embedding")

    def head(td):
        td["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 32)
        td["base_model.model.lm_head.lora_B.weight"] = torch.zeros(Gl.mc.vocab_size, 4)
    v = variant(src, tmp_path / "h", tensors=head)
    refused(v, Gl, "adapter_model.safetensors", "base_model.model.lm_head.lora_A.weight", "LM head")


def test_refuses_pickle_only(base_llama, tmp_path):
    src, G = base_llama
    dst = tmp_path / "pickled"
    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    with safe_open(str(f), "pt") as sf:
        torch.save({k: sf.get_tensor(k) for k in sf.keys()}, dst / "adapter_model.bin")
    f.unlink()
    msg = refused(dst, G, "adapter_model.bin", "(file)", "pickle")
    assert "safetensors" in msg and "trusted machine" in msg


def test_refuses_other_peft_types(base_llama, tmp_path):
    src, G = base_llama
    for ptype in ("ADALORA", "IA3", None):
        v = variant(src, tmp_path / str(ptype), config=lambda c: c.__setitem__("peft_type", ptype))
        refused(v, G, "adapter_config.json", "peft_type", "only LORA")


def test_refuses_broken_folders(base_llama, tmp_path):
    src, G = base_llama
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "absent", G)
    v = variant(src, tmp_path / "noconf")
    (v / "adapter_config.json").unlink()
    with pytest.raises(AdapterError) as exc:
        load_adapter(v, G)
    assert str(exc.value).startswith(f"{v / 'adapter_config.json'}: (file): missing")
    v = variant(src, tmp_path / "badjson")
    (v / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(AdapterError) as exc:
        load_adapter(v, G)
    assert str(exc.value).startswith(f"{v / 'adapter_config.json'}: (file): not valid JSON")
    assert "\n" not in str(exc.value)
    v = variant(src, tmp_path / "noweights")
    (v / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError) as exc:
        load_adapter(v, G)
    assert str(exc.value).startswith(f"{v / 'adapter_model.safetensors'}: (file): missing")
    v = variant(src, tmp_path / "truncated")
    f = v / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    refused(v, G, "adapter_model.safetensors", "(file)", "cannot read safetensors")
    f.write_bytes(b"\x00" * 64)
    refused(v, G, "adapter_model.safetensors", "(file)", "cannot read safetensors")


def test_refuses_modules_the_generalist_lacks(base_llama, tmp_path):
    src, G = base_llama

    def more_layers(td):  # an adapter for a deeper model: layer 7 of a 6-layer generalist
        for k in [k for k in td if ".layers.5." in k]:
            td[k.replace(".layers.5.", ".layers.7.")] = td[k].clone()
    v = variant(src, tmp_path / "deeper", tensors=more_layers)
    refused(v, G, "adapter_model.safetensors", "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight",
            "does not exist in the generalist")
    # an adapter for another architecture: its target modules match nothing here
    v = variant(src, tmp_path / "falcon", config=lambda c: c.__setitem__("target_modules", ["query_key_value"]))
    refused(v, G, "adapter_config.json", "target_modules", "matches no linear layer")


def test_refuses_shape_mismatch(base_llama, tmp_path):
    src, G = base_llama
    key = f"{Q0}.lora_A.weight"
    v = variant(src, tmp_path / "wide", tensors=lambda td: td.__setitem__(key, torch.zeros(4, 48)))
    refused(v, G, "adapter_model.safetensors", key, r"shape \(4, 48\) does not fit .*q_proj.weight")
    kb = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"
    v = variant(src, tmp_path / "tall", tensors=lambda td: td.__setitem__(kb, torch.zeros(32, 4)))
    refused(v, G, "adapter_model.safetensors", kb, r"shape \(32, 4\) does not fit .*v_proj.weight \(16, 32\)")


def test_refuses_rank_mismatch(base_llama, tmp_path):
    src, G = base_llama

    def rank3(td):
        td[f"{Q0}.lora_A.weight"] = td[f"{Q0}.lora_A.weight"][:3].clone()
        td[f"{Q0}.lora_B.weight"] = td[f"{Q0}.lora_B.weight"][:, :3].clone()
    v = variant(src, tmp_path / "r3", tensors=rank3)
    refused(v, G, "adapter_model.safetensors", f"{Q0}.lora_A.weight", "rank 3, but .*r=4")
    # a rank_pattern that would explain it is accepted
    v = variant(src, tmp_path / "r3ok", tensors=rank3,
                config=lambda c: c.__setitem__("rank_pattern", {"model.layers.0.self_attn.q_proj": 3}))
    assert load_adapter(v, G).lowrank["model.layers.0.self_attn.q_proj.weight"].rank == 3
    v = variant(src, tmp_path / "split", tensors=lambda td: td.__setitem__(
        f"{Q0}.lora_B.weight", td[f"{Q0}.lora_B.weight"][:, :3].clone()))
    refused(v, G, "adapter_model.safetensors", f"{Q0}.lora_B.weight", "rank 3 differs")


def test_refuses_unpaired_factors(base_llama, tmp_path):
    src, G = base_llama
    v = variant(src, tmp_path / "noB", tensors=lambda td: td.pop(f"{Q0}.lora_B.weight"))
    refused(v, G, "adapter_model.safetensors", f"{Q0}.lora_A.weight", "lora_A without its lora_B")
    v = variant(src, tmp_path / "noA", tensors=lambda td: td.pop(f"{Q0}.lora_A.weight"))
    refused(v, G, "adapter_model.safetensors", f"{Q0}.lora_B.weight", "lora_B without its lora_A")


def test_refuses_config_weights_disagreement(base_llama, tmp_path):
    src, G = base_llama

    def add_k(td):
        td["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
        td["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"] = torch.zeros(16, 4)
    v = variant(src, tmp_path / "untargeted", tensors=add_k)
    refused(v, G, "adapter_model.safetensors", "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight",
            "not targeted by adapter_config.json")
    v = variant(src, tmp_path / "absent",
                tensors=lambda td: [td.pop(k) for k in list(td) if ".layers.3.self_attn.v" in k])
    refused(v, G, "adapter_model.safetensors", "base_model.model.model.layers.3.self_attn.v_proj.lora_A.weight",
            "missing, but adapter_config.json targets")
    v = variant(src, tmp_path / "stray", tensors=lambda td: td.__setitem__(
        "base_model.model.model.layers.0.input_layernorm.weight", torch.ones(32)))
    refused(v, G, "adapter_model.safetensors", "base_model.model.model.layers.0.input_layernorm.weight",
            "unexpected tensor.*modules_to_save")


def test_refuses_untying_the_embeddings(base_llama, tmp_path):
    src, G = base_llama  # the llama fixture ties embeddings and LM head
    key = "base_model.model.model.embed_tokens.weight"
    v = variant(src, tmp_path / "emb", config=lambda c: c.__setitem__("modules_to_save", ["embed_tokens"]),
                tensors=lambda td: td.__setitem__(key, torch.zeros(G.mc.vocab_size, 32)))
    refused(v, G, "adapter_model.safetensors", key, "ties its embeddings")


@pytest.mark.parametrize("field,value,match", [
    ("use_qalora", True, "QALoRA"),
    ("lora_bias", True, "lora_B"),
    ("layer_replication", [[0, 4], [2, 6]], "layer replication"),
    ("target_parameters", ["mlp.experts.gate_up_proj"], "target_parameters"),
    ("trainable_token_indices", [1, 2, 3], "trainable token"),
    ("megatron_config", {"tensor_model_parallel_size": 2}, "Megatron"),
    ("alora_invocation_tokens", [5, 6], "Activated LoRA"),
    ("kasa_config", {"beta": 0.1}, "KaSA"),
    ("use_bdlora", {"nblocks": 2}, "block-diagonal"),
    ("arrow_config", {"top_k": 2}, "Arrow"),
    ("init_lora_weights", "pissa_niter_4", "modified base weights"),
    ("init_lora_weights", "olora", "modified base weights"),
    ("some_future_option", {"on": True}, "unknown LoRA option"),
    ("bias", "everything", "must be 'none'"),
    ("r", 0, "positive integer"),
])
def test_refuses_unsupported_options(base_llama, tmp_path, field, value, match):
    src, G = base_llama
    v = variant(src, tmp_path / "v", config=lambda c: c.__setitem__(field, value))
    refused(v, G, "adapter_config.json", field, match)


def test_refuses_lora_bias_tensor(base_llama, tmp_path):
    src, G = base_llama
    key = f"{Q0}.lora_B.bias"
    v = variant(src, tmp_path / "lb", tensors=lambda td: td.__setitem__(key, torch.zeros(32)))
    refused(v, G, "adapter_model.safetensors", key, "lora_bias")


def test_training_only_fields_are_ignored(base_llama, tmp_path):
    src, G = base_llama

    def training(c):
        c.update(lora_dropout=0.1, init_lora_weights="gaussian", inference_mode=False, merge_weights=True,
                 velora_config={"num_groups": 2}, eva_config=None)
    ad = load_adapter(variant(src, tmp_path / "t", config=training), G)
    assert len(ad.lowrank) == 12
