"""PEFT adapter folders as specialists, through the config, the loader, the CLI and the real server.

A fixture constellation mixes three PEFT LoRA adapters (every linear of every layer; q/v on two
layers with norms saved whole; a rank/alpha pattern) and one full fine-tune, with the new defaults
``layers = "auto"`` and ``signature = "generalist"``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composer.modes import CompositionParams
from peft_fixtures import make_peft_adapter
from test_server import KEY, Server

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The patient fever biopsy", "The contract clause licensee", "The def return import class",
           "The protein enzyme photon"]


def _config(root: Path, gdir: Path, specialists: dict[str, Path], probes: Path, extra: str = "",
            name: str = "constellation.toml") -> Path:
    """A config of ``specialists`` over ``gdir`` (float32, eager); ``extra``: more [runtime] lines."""
    spec = "\n".join(f'{d} = "{p}"' for d, p in specialists.items())
    conf = root / name
    conf.write_text(f"""[generalist]
path = "{gdir}"

[specialists]
{spec}

[index]
path = "index"
probes = "{probes}"

[runtime]
device = "cpu"
dtype = "float32"
compile = "off"
{extra}""")
    return conf


def fixture_adapters(gdir: Path, root: Path) -> dict[str, Path]:
    """Three PEFT adapters: every linear of every layer; q/v on two layers with a norm saved whole; a
    rank/alpha pattern."""
    return {
        "medical": make_peft_adapter(gdir, root / "medical", seed=1, r=4, lora_alpha=8,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]),
        "legal": make_peft_adapter(gdir, root / "legal", seed=2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                   layers_to_transform=[1, 4], modules_to_save=["model.layers.4.input_layernorm"]),
        "code": make_peft_adapter(gdir, root / "code", seed=3, r=4, lora_alpha=4, use_rslora=True,
                                  target_modules=["o_proj", "down_proj", "up_proj"], rank_pattern={"down_proj": 2},
                                  alpha_pattern={"down_proj": 8}),
    }


@pytest.fixture(scope="module")
def peft_conf(built, tmp_path_factory):
    from index_store.indexing import build_index

    base = built("llama", domains=("medical", "legal", "code", "science"), everywhere=("science",))
    gdir = base.parent / "models" / "generalist"
    root = tmp_path_factory.mktemp("peft_constellation")
    ads = {**fixture_adapters(gdir, root),
           "science": base.parent / "models" / "science"}  # a full fine-tune, differing everywhere
    conf = _config(root, gdir, ads, base.parent / "probes.json")
    build_index(conf, quiet=True)
    return conf


@pytest.fixture(scope="module")
def loaded(peft_conf):
    from index_store.loader import load_constellation

    return load_constellation(peft_conf)


def test_adapters_and_full_specialists_load_side_by_side(loaded):
    c, r = loaded.constellation, loaded.report
    assert r["specialist_kinds"] == {"medical": "adapter", "legal": "adapter", "code": "adapter", "science": "full"}
    assert c.layers == list(range(c.n))  # the full fine-tune and `medical` touch every layer
    assert c.differences["legal"].layers == [1, 4]
    assert "model.layers.4.input_layernorm.weight" in c.differences["legal"].tensors
    # an adapter is held as its factors (and its whole tensors), never as a copy of the generalist
    for dom in ("medical", "legal", "code"):
        assert r["resident_bytes"][dom] == c.differences[dom].bytes
    assert r["resident_bytes"]["medical"] < r["resident_bytes"]["generalist"] / 2


def test_one_hot_composition_equals_peft_itself(loaded, peft_conf):
    """``PeftModel.from_pretrained(G, folder)`` and Constellation's one-hot composition of that
    specialist give the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    c = loaded.constellation
    cfg = loaded.config
    ids, am = loaded.encode(PROMPTS)
    gp = c.generalist_pass(ids, am)
    for dom in ("medical", "legal", "code"):
        g = AutoModelForCausalLM.from_pretrained(str(cfg.generalist.path), local_files_only=True,
                                                 dtype=torch.float32)
        ref = PeftModel.from_pretrained(g, str(cfg.specialists[dom])).eval()
        with torch.inference_mode():
            want = ref(input_ids=ids, attention_mask=am).logits
        plan = c.plan(gp, 0, CompositionParams(mode="weights", weights={dom: 1.0}))
        for path in ("mix", "materialize", "batch"):
            got = c.composed_logits(gp, [plan] * len(PROMPTS), path)
            err = float(((got - want).abs() * am[..., None]).max())
            assert err <= 1e-4, (dom, path, err)


@pytest.fixture(scope="module")
def srv(loaded):
    s = Server(loaded)
    yield s
    s.stop()


def _greedy_library(loaded, prompt: str, comp: dict, n: int) -> str:
    c = loaded.constellation
    ids = loaded.tokenizer(prompt)["input_ids"]
    plan = c.plan(c.generalist_pass(torch.tensor([ids])), 0, CompositionParams.model_validate(comp))
    gen = []
    for _ in range(n):
        gp = c.generalist_pass(torch.tensor([ids + gen]))
        gen.append(int(torch.argmax(c.composed_logits(gp, [plan])[0, -1])))
    return loaded.tokenizer.decode(gen)


COMPS = [{"mode": "constellation"}, {"mode": "weights", "weights": {"legal": 0.5, "code": 0.5}},
         {"mode": "task_arithmetic", "lambda": 0.3}, {"mode": "logit"}]


def test_concurrent_adapter_compositions_match_the_library_alone(srv, loaded):
    from openai import AsyncOpenAI

    want = [_greedy_library(loaded, p, c, 8) for p, c in zip(PROMPTS, COMPS)]
    steps_before, mixed_before = srv.engine.steps, srv.engine.mixed_steps

    async def all_at_once():
        cl = AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        rs = await asyncio.gather(*[cl.completions.create(
            model="constellation", prompt=p, max_tokens=8, temperature=0,
            extra_body={"composition": c, "ignore_eos": True}) for p, c in zip(PROMPTS, COMPS)])
        await cl.close()
        return [r.choices[0].text for r in rs]

    assert asyncio.run(all_at_once()) == want
    assert srv.engine.mixed_steps > mixed_before  # rows with different compositions shared decode steps
    assert srv.engine.steps - steps_before < 4 * 7


def test_explain_lists_every_composed_layer(srv, loaded):
    import httpx

    r = httpx.post(srv.url + "/explain", json={"prompt": PROMPTS[0], "include_node_weights": True},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["composed_layers"] == list(range(loaded.constellation.n)) and doc["layers"] == "auto"
    assert doc["signature"] == "generalist"
    assert all(len(v) == loaded.constellation.d for v in doc["node_weights"].values())


def test_a_bad_adapter_in_the_config_is_refused_in_one_line(peft_conf, tmp_path):
    """`constellation explain` on a config naming a DoRA adapter exits 2 naming the file and the key."""
    import shutil

    bad = tmp_path / "dora"
    shutil.copytree(Path(peft_conf).parent / "medical", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    text = Path(peft_conf).read_text().replace(str(Path(peft_conf).parent / "medical"), str(bad))
    conf = tmp_path / "c.toml"
    conf.write_text(text.replace('path = "index"', f'path = "{Path(peft_conf).parent / "index"}"'))
    p = subprocess.run([sys.executable, "-m", "server.cli", "explain", "--config", str(conf), "hello"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
                       timeout=300)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "adapter_config.json" in lines[0] and "use_dora" in lines[0], p.stderr


def test_scale_benchmark_smoke(built, tmp_path):
    """`bench.lowrank_scale` end to end on a tiny generalist: it serves N adapters on every layer over
    HTTP and reports resident memory equal to G + N adapters."""
    gdir = built("llama", domains=("medical", "legal", "code")).parent / "models" / "generalist"
    out = tmp_path / "scale.json"
    p = subprocess.run([sys.executable, "-m", "bench.lowrank_scale", "--generalist", str(gdir), "--n", "2,5",
                        "--rank", "2", "--tokens", "3", "--streams", "3", "--repeats", "1", "--multi-repeats", "1",
                        "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resident / (G + N*A)" in p.stdout
    rows = json.loads(out.read_text())
    assert [r["n"] for r in rows] == [2, 5]
    for r in rows:
        assert r["resident_total"] == r["G_bytes"] + r["n"] * r["A_bytes"]
        assert r["U"] >= 2 and r["decodeS"]["c"] > 0 and r["sanity"]["finite"]
