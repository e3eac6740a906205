"""``constellation specialist extract``: a full fine-tune -> a PEFT LoRA adapter, checked with real PEFT.

Every run is the real command in a subprocess, on tiny fixture models written as HF folders.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fixtures

EXE = [sys.executable, "-m", "server.cli", "specialist", "extract"]
ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # tiny models: threads only contend
LOSSES = re.compile(r"held-out loss \((\d+) texts, (\d+) tokens\): generalist (\S+), full fine-tune (\S+), "
                    r"generalist \+ adapter (\S+)")
TEXTS = ["The patient fever cough dose clinic.", "The contract clause court.", "The protein enzyme photon cell genome."]


def run(*args, check=True):
    p = subprocess.run([*EXE, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def table(stdout: str) -> dict[str, dict]:
    """The per-module rows of the printed table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[1] in ("lora", "lora+bias", "dense"):
            rank = None if parts[3] == "-" else tuple(int(v) for v in parts[3].split("/"))
            rows[parts[0]] = {"kind": parts[1], "rank": rank, "energy": None if parts[4] == "-" else float(parts[4]),
                              "err": float(parts[5])}
    return rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared machine: one thread is faster than many contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def const(tmp_path_factory):
    """``const(arch)`` -> a folder with models/{generalist, medical (last 2 layers), code (everywhere)}."""
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            fixtures.build_constellation(root, arch=arch, domains=("medical", "code"), everywhere=("code",))
            cache[arch] = root
        return cache[arch]

    return get


def spectrum(base: Path, full: Path, module: str, conv1d: bool) -> torch.Tensor:
    w = module + ".weight"
    d = load_file(str(full / "model.safetensors"))[w].double() - load_file(str(base / "model.safetensors"))[w].double()
    return torch.linalg.svdvals(d.T if conv1d else d)


def check_with_peft(base: Path, full: Path, out: Path) -> None:
    """Real PEFT loads the folder cleanly, with scaling 1 everywhere, holds exactly the tensors written
    (what PEFT would itself save), and reproduces the full fine-tune's logits, also after merging."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    real = enc["attention_mask"].bool()
    f = AutoModelForCausalLM.from_pretrained(str(full)).eval()
    g = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(g, str(out)).eval()
    bad = [str(w.message) for w in caught if w.category.__name__ == "PeftWarning"
           or re.search(r"missing|unexpected|not initiali[sz]ed|ignored", str(w.message), re.I)]
    assert not bad, bad
    cfg = json.loads((out / "adapter_config.json").read_text())
    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == set(cfg["target_modules"])
    for name, layer in layers.items():
        assert layer.scaling["default"] == 1.0 and layer.r["default"] == cfg["rank_pattern"][name]
    written = load_file(str(out / "adapter_model.safetensors"))
    saved = get_peft_model_state_dict(pm)
    assert set(saved) == set(written)
    assert all(torch.equal(saved[k], written[k]) for k in written)
    with torch.no_grad():
        want = f(**enc).logits
        assert (pm(**enc).logits - want)[real].abs().max() <= 1e-4
        assert (pm.merge_and_unload()(**enc).logits - want)[real].abs().max() <= 1e-4


def test_help_explains_every_option_with_its_default():
    out = run("--help").stdout
    for opt in ("FULL_FOLDER", "--base", "--out", "--rank", "--energy", "--heldout", "--max-tokens", "--force",
                "--quiet", "default 256", "modules_to_save", "lora_alpha = r"):
        assert opt in out, opt
    assert "specialist" in subprocess.run([*EXE[:3], "--help"], capture_output=True, text=True, env=ENV,
                                          cwd=ROOT).stdout


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # qwen2: test_energy_one_recovers_the_rank_of_a_merged_lora
def test_full_rank_adapter_reproduces_the_fine_tune_in_peft(const, arch, tmp_path):
    root = const(arch)
    base, full, out = root / "models" / "generalist", root / "models" / "medical", tmp_path / "adapter"
    if arch == "gpt2":  # a rank above every min(out, in) is capped; held-out texts from a .txt file
        heldout = tmp_path / "heldout.txt"
        heldout.write_text("\n".join(t for ts in json.loads((root / "probes.json").read_text())["domains"].values()
                                     for t in ts) + "\n\n")
        how = ("--rank", "100000")
    else:
        heldout, how = root / "probes.json", ("--energy", "1.0")
    p = run(full, "--base", base, "--out", out, *how, "--heldout", heldout)
    assert "extracting" in p.stderr  # the progress bar
    rows = table(p.stdout)
    lora = {m: r for m, r in rows.items() if r["kind"] != "dense"}
    assert lora and all(r["rank"][0] == r["rank"][1] and r["err"] < 1e-6 for r in lora.values())

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(base)
    assert cfg["target_modules"] == list(lora) and cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert cfg["r"] == cfg["lora_alpha"] == max(cfg["rank_pattern"].values())
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")
    # the fixture perturbs every tensor of layers 4 and 5: the norms are saved whole
    norms = ("ln_1", "ln_2") if arch == "gpt2" else ("input_layernorm", "post_attention_layernorm")
    prefix = "transformer.h." if arch == "gpt2" else "model.layers."
    assert sorted(cfg["modules_to_save"]) == sorted(f"{prefix}{i}.{n}" for i in (4, 5) for n in norms)
    assert cfg["bias"] == ("none" if arch == "llama" else "lora_only")
    assert all(m.startswith((prefix + "4.", prefix + "5.")) for m in cfg["target_modules"])
    assert "constellation specialist extract" in (out / "README.md").read_text()

    m = LOSSES.search(p.stdout)
    assert m, p.stdout
    lg, lf, la = map(float, m.groups()[2:])
    assert all(math.isfinite(v) for v in (lg, lf, la)) and int(m.group(2)) > 0
    assert la == pytest.approx(lf, abs=1e-4)
    check_with_peft(base, full, out)


def test_low_rank_error_is_the_discarded_energy_and_grows_as_rank_shrinks(const, tmp_path):
    root = const("llama")
    base, full, out = root / "models" / "generalist", root / "models" / "medical", tmp_path / "adapter"
    (out).mkdir()
    (out / "keep.txt").write_text("old")
    errs = {}
    for r in (8, 2):
        p = run(full, "--base", base, "--out", out, "--rank", r, "--force", "--quiet")
        rows = {m: v for m, v in table(p.stdout).items() if v["kind"] != "dense"}
        tensors = load_file(str(out / "adapter_model.safetensors"))
        for mod, row in rows.items():
            s = spectrum(base, full, mod, conv1d=False)
            e = s ** 2
            assert row["rank"] == (min(r, len(s)), len(s))
            assert row["err"] == pytest.approx(math.sqrt(float(e[r:].sum() / e.sum())), rel=1e-3)  # Eckart-Young
            assert row["energy"] == pytest.approx(float(e[:r].sum() / e.sum()), abs=2e-6)
            assert tensors[f"base_model.model.{mod}.lora_A.weight"].shape[0] == r
            assert tensors[f"base_model.model.{mod}.lora_B.weight"].shape[1] == r
        errs[r] = rows
        sizes = re.search(r"adapter .* \((\d+) bytes\) vs full delta .* \((\d+) bytes\)", p.stdout)
        assert sizes and int(sizes.group(1)) < int(sizes.group(2))
    assert not (out / "keep.txt").exists()  # --force replaced the folder
    assert all(errs[2][m]["err"] > errs[8][m]["err"] > 0 for m in errs[8])


def test_energy_picks_the_smallest_rank_reaching_it(const, tmp_path):
    root = const("gpt2")
    base, full = root / "models" / "generalist", root / "models" / "medical"
    p = run(full, "--base", base, "--out", tmp_path / "a", "--energy", "0.9", "--quiet")
    rows = {m: v for m, v in table(p.stdout).items() if v["kind"] != "dense"}
    assert len(rows) == 8
    for mod, row in rows.items():
        cum = torch.cumsum(spectrum(base, full, mod, conv1d=True) ** 2, 0)
        r = row["rank"][0]
        assert cum[r - 1] >= 0.9 * cum[-1] and (r == 1 or cum[r - 2] < 0.9 * cum[-1])
        assert row["energy"] >= 0.9


def test_energy_one_recovers_the_rank_of_a_merged_lora(const, tmp_path):
    """A qwen2 fine-tune made of rank-3 updates (one with a changed bias), a changed norm and a changed
    bias whose weight is unchanged: ranks 3, the bias of the factored layer saved whole (bias=lora_only),
    the norm and the bias-only linear saved whole as modules_to_save; real PEFT reproduces it."""
    root = const("qwen2")
    base = root / "models" / "generalist"
    full = tmp_path / "full"
    shutil.copytree(base, full)
    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    lora = ("model.layers.1.self_attn.o_proj", "model.layers.2.self_attn.v_proj", "model.layers.3.mlp.up_proj")
    for m in lora:
        out_dim, in_dim = sd[m + ".weight"].shape
        sd[m + ".weight"] = sd[m + ".weight"] + 0.05 * torch.randn(out_dim, 3, generator=g) @ torch.randn(3, in_dim, generator=g)
    sd["model.layers.2.self_attn.v_proj.bias"] = sd["model.layers.2.self_attn.v_proj.bias"] - 0.1
    sd["model.layers.1.self_attn.q_proj.bias"] = sd["model.layers.1.self_attn.q_proj.bias"] + 0.2
    sd["model.layers.3.post_attention_layernorm.weight"] = sd["model.layers.3.post_attention_layernorm.weight"] * 1.1
    save_file(sd, str(full / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "adapter"
    p = run(full, "--base", base, "--out", out, "--energy", "1.0", "--heldout", root / "probes.json", "--quiet")
    rows = table(p.stdout)
    assert {m: (r["kind"], r["rank"][0]) for m, r in rows.items() if r["kind"] != "dense"} == {
        lora[0]: ("lora", 3), lora[1]: ("lora+bias", 3), lora[2]: ("lora", 3)}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["bias"] == "lora_only"
    assert cfg["modules_to_save"] == ["model.layers.1.self_attn.q_proj", "model.layers.3.post_attention_layernorm"]
    lg, lf, la = map(float, LOSSES.search(p.stdout).groups()[2:])
    assert la == pytest.approx(lf, abs=1e-4) and lg != pytest.approx(lf, abs=1e-4)
    check_with_peft(base, full, out)


def test_refusals_are_one_line_naming_the_file(const, tmp_path, capsys):
    from server.cli import main as cli_main

    llama, gpt2, qwen2 = const("llama") / "models", const("gpt2") / "models", const("qwen2") / "models"
    base = llama / "generalist"
    other_cfg = tmp_path / "other_cfg"
    shutil.copytree(llama / "medical", other_cfg)
    cfg = json.loads((other_cfg / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other_cfg / "config.json").write_text(json.dumps(cfg))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(base / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    cases = {  # name: (FULL, --base, --out, extra args, the file named, what the line says)
        "architecture": (gpt2 / "medical", base, out, (), gpt2 / "medical" / "config.json", "architecture"),
        "config": (other_cfg, base, out, (), other_cfg / "config.json", "rms_norm_eps"),
        "missing": (tmp_path / "nope", base, out, (), tmp_path / "nope", "does not exist"),
        "pickle": (pickled, base, out, (), pickled, "pickle"),
        "embeddings": (qwen2 / "code", qwen2 / "generalist", out, (), qwen2 / "code", "model.embed_tokens.weight"),
        "exists": (llama / "medical", base, existing, (), existing, "--force"),
        "out is an input": (llama / "medical", base, base, ("--force",), base, "must not be"),
        "energy": (llama / "medical", base, out, (), None, "--energy must be in (0, 1]"),
    }
    # Two run as the real command (concurrently); the rest, cheap argument and folder checks, run through
    # the same entry point in this process (a subprocess each would only re-import torch).
    subproc = ("embeddings", "exists")
    argv = {name: [str(full), "--base", str(b), "--out", str(o),
                   *(("--energy", "1.5") if name == "energy" else ("--rank", "4")), "--quiet", *extra]
            for name, (full, b, o, extra, _, _) in cases.items()}
    procs = {name: subprocess.Popen([*EXE, *argv[name]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=ENV, cwd=ROOT) for name in subproc}
    results = {}
    for name in cases:
        if name not in subproc:
            capsys.readouterr()
            code = cli_main(["specialist", "extract", *argv[name]])
            results[name] = (code, capsys.readouterr().err)
    for name, proc in procs.items():
        err = proc.communicate(timeout=300)[1]
        results[name] = (proc.returncode, err)
    for name, (code, err) in results.items():
        named, says = cases[name][4], cases[name][5]
        assert code == 2, (name, err)
        assert err.startswith("constellation: ") and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert says in err and (named is None or str(named) in err), (name, err)
    assert not out.exists() and (existing / "keep.txt").read_text() == "mine"
    assert (base / "model.safetensors").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if ".extract-" in p.name]
    assert not leftovers
