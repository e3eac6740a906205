"""The ``constellation`` command as a user runs it (a real subprocess)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from composer.modes import CompositionParams
from index_store.loader import load_constellation

EXE = [sys.executable, "-m", "server.cli"]
ROOT = Path(__file__).resolve().parents[1]


def run(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([*EXE, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture()
def conf(built, tmp_path):
    src = built("gpt2", domains=("medical", "legal", "code")).parent
    shutil.copytree(src, tmp_path / "c")
    return tmp_path / "c" / "constellation.toml"


def test_help_explains_the_commands():
    out = run("--help").stdout
    for word in ("index", "explain"):
        assert word in out
    assert "--node-weights" in run("explain", "--help").stdout


def test_index_build_and_inspect(conf):
    shutil.rmtree(conf.parent / "index")
    p = run("index", "build", conf)
    assert "index written" in p.stdout and "fingerprinting probes" in p.stderr
    doc = json.loads(run("index", "inspect", conf.parent / "index", "--json").stdout)
    for key in ("domains", "raw_cosine", "mean_collinearity", "post_gs_max_abs_cos", "residual_ratios",
                "recommendation"):
        assert key in doc
    assert doc["domains"] == ["medical", "legal", "code"]
    assert len(doc["raw_cosine"]) == 3 and doc["raw_cosine"][1][1] == pytest.approx(1.0)
    assert doc["post_gs_max_abs_cos"] <= 1e-9
    text = run("index", "inspect", conf.parent / "index").stdout
    assert "raw centroid cosine" in text and "recommendation" in text


def test_explain_json_equals_the_library(conf):
    prompt = "The contract clause licensee warranty court."
    doc = json.loads(run("explain", "--config", conf, "--json", "--node-weights", prompt).stdout)
    loaded = load_constellation(conf)
    c = loaded.constellation
    gp = loaded.analyze([prompt])
    plan = c.plan(gp, 0, CompositionParams())
    assert doc["alpha"] == pytest.approx({d: float(a) for d, a in zip(c.domains, gp.alpha[0])}, abs=1e-9)
    assert doc["selected"] == [c.domains[i] for i in plan.selected]
    assert doc["entropy_bits"] == pytest.approx(plan.mean_entropy_bits, abs=1e-9)
    for r, i in enumerate(plan.selected):
        assert doc["node_weights"][c.domains[i]] == pytest.approx(plan.node_weights[r].tolist(), abs=1e-7)
    for key in ("gini", "fallback", "layers", "policy", "signature", "mean_node_weight", "index"):
        assert key in doc
    text = run("explain", "--config", conf, prompt)
    assert "alpha" in text.stdout and "entropy" in text.stdout and "resident" in text.stderr


def test_explain_modes_from_the_command_line(conf):
    doc = json.loads(run("explain", "--config", conf, "--json", "--mode", "weights", "--weights",
                         '{"code": 1}', "x").stdout)
    assert doc["selected"] == ["code"] and doc["mean_node_weight"]["code"] == pytest.approx(1.0)
    p = run("explain", "--config", conf, "--mode", "generalist", "--top-k", "2", "x", check=False)
    assert p.returncode == 2 and "does not apply to mode 'generalist'" in p.stderr


def test_errors_are_one_clear_line(conf, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(conf.read_text().replace("top_k = 3", "top_k = -1"))
    p = run("explain", "--config", bad, "x", check=False)
    assert p.returncode == 2
    assert str(bad) in p.stderr and "[composition].top_k" in p.stderr and "Traceback" not in p.stderr
    p = run("index", "inspect", tmp_path, check=False)
    assert p.returncode == 2 and "manifest.json" in p.stderr and "Traceback" not in p.stderr
