"""Weightings, per-domain strengths and their calibration on held-out index probes (docs/weightings.md)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from composer import decompose
from composer.kernels import materialize
from composer.modes import Calibrated, CompositionError, CompositionParams, ModeInput, get_mode, validate
from composer.weightings import WEIGHTINGS, get_weighting

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The patient presented with fever and the clause limits liability.",
           "def parse(x): return x  # a small function"]
DOMS = ["medical", "legal", "code"]


def _mi(alpha, params, cal=Calibrated(), d=6, per_block=False):
    g = torch.Generator().manual_seed(0)
    sig = torch.rand(len(alpha), 2, d, generator=g) + 0.5 if per_block else torch.rand(len(alpha), d, generator=g) + 0.5
    sigs = (lambda idx: sig[idx].transpose(0, 1)) if per_block else (lambda idx: sig[idx])
    return ModeInput(torch.tensor(alpha, dtype=torch.float64), DOMS, d, 3, 0.5, sigs, params, calibrated=cal), sig


def test_every_weighting_is_a_registry_entry_with_its_source_and_range():
    assert {"paper", "power", "softmax", "alpha_only"} <= set(WEIGHTINGS)
    for w in WEIGHTINGS.values():
        assert w.source and w.description
        if w.sharpness:
            lo, hi = w.bounds
            assert w.grid and all(lo <= s <= hi for s in w.grid) and lo <= w.default <= hi
        else:
            assert w.bounds is None and not w.grid
    with pytest.raises(ValueError, match="unknown weighting 'nope'"):
        get_weighting("nope")


def test_coefficients_sharpen_with_the_parameter():
    a = torch.tensor([0.8, 0.3, 0.25], dtype=torch.float64)
    assert torch.equal(WEIGHTINGS["paper"].coefficients(a, None), a)
    p1 = WEIGHTINGS["power"].coefficients(a, 1.0)
    assert torch.allclose(p1 / p1.sum(), a / a.sum())  # power 1 is the paper's rule
    tops = [float(WEIGHTINGS["softmax"].coefficients(a, t)[0]) for t in (1.0, 0.3, 0.1, 0.03)]
    assert tops == sorted(tops) and tops[-1] > 0.999 and tops[0] < 0.5
    assert float(WEIGHTINGS["softmax"].coefficients(a, 0.1).sum()) == pytest.approx(1.0)
    # a margin, not a level: softmax weights ignore an offset common to all alphas
    assert torch.allclose(WEIGHTINGS["softmax"].coefficients(a, 0.1), WEIGHTINGS["softmax"].coefficients(a - 0.2, 0.1))
    pw = [float(WEIGHTINGS["power"].coefficients(a, p)[1]) for p in (1, 4, 16)]
    assert pw == sorted(pw, reverse=True)


def test_paper_mode_is_the_old_rule_and_constellation_without_calibration_equals_it():
    params = CompositionParams(mode="paper")
    mi, sig = _mi([0.7, 0.4, 0.1], params)
    plan = get_mode("paper").build(mi)
    raw = torch.tensor([0.7, 0.4, 0.1], dtype=torch.float64)[:, None] * sig.double()
    assert (plan.node_weights.double() - raw / raw.sum(0)).abs().max() < 1e-6
    assert torch.all(plan.source_weights[0] == 0)
    same = get_mode("constellation").build(_mi([0.7, 0.4, 0.1], CompositionParams())[0])
    assert torch.equal(same.source_weights, plan.source_weights) and same.extra["weighting"] == "paper"


@pytest.mark.parametrize("per_block", [False, True])
def test_strength_scales_each_specialist_and_the_generalist_takes_the_rest(per_block):
    cal = Calibrated("softmax", {"softmax": 0.2}, {"medical": 1.5, "legal": 0.5})
    mi, _ = _mi([0.7, 0.5, 0.1], CompositionParams(), cal, per_block=per_block)
    plan = get_mode("constellation").build(mi)
    w = plan.source_weights.double()
    nw = plan.node_weights.double()
    assert torch.allclose(w.sum(-2), torch.ones_like(w.sum(-2)), atol=1e-6)  # sources still sum to 1
    for row, i in enumerate(plan.selected):
        gamma = {0: 1.5, 1: 0.5}.get(i, 1.0)
        assert torch.allclose(w[..., 1 + i, :], gamma * nw[..., row, :], atol=1e-6)
    assert torch.allclose(w[..., 0, :], 1 - sum({0: 1.5, 1: 0.5}.get(i, 1.0) * nw[..., r, :]
                                                 for r, i in enumerate(plan.selected)), atol=1e-6)
    assert plan.extra == {"weighting": "softmax", "sharpness": 0.2,
                          "strength": {"medical": 1.5, "legal": 0.5, "code": 1.0}}
    # the node weights themselves still sum to 1: entropy is about the mix, not the strength
    assert torch.allclose(nw.sum(-2), torch.ones_like(nw.sum(-2)), atol=1e-6)
    # a request overrides the calibration, per field
    mi2, _ = _mi([0.7, 0.5, 0.1], CompositionParams(sharpness=1.0, strength={"medical": 1.0}), cal)
    p2 = get_mode("constellation").build(mi2)
    assert p2.extra["sharpness"] == 1.0 and p2.extra["strength"]["medical"] == 1.0 and p2.extra["strength"]["legal"] == 0.5
    assert float(p2.node_weights[..., 0, :].mean()) < float(nw[..., 0, :].mean())  # softer


def test_alpha_only_gives_every_node_the_same_weights():
    mi, _ = _mi([0.7, 0.5, 0.1], CompositionParams(weighting="alpha_only", sharpness=0.3))
    plan = get_mode("constellation").build(mi)
    want = WEIGHTINGS["alpha_only"].coefficients(mi.alpha[plan.selected], 0.3)
    for row in range(len(plan.selected)):
        assert torch.allclose(plan.node_weights[row].double(), (want[row] / want.sum()).expand(6), atol=1e-6)
    assert not plan.fallback.any()


@pytest.mark.parametrize("params, param", [
    ({"mode": "constellation", "weighting": "nope"}, "composition.weighting"),
    ({"mode": "constellation", "weighting": "paper", "sharpness": 2.0}, "composition.sharpness"),
    ({"mode": "constellation", "weighting": "softmax", "sharpness": 0.0}, "composition.sharpness"),
    ({"mode": "constellation", "weighting": "power", "sharpness": 100.0}, "composition.sharpness"),
    ({"mode": "constellation", "sharpness": float("nan"), "weighting": "softmax"}, "composition.sharpness"),
    ({"mode": "constellation", "strength": {"physics": 1.0}}, "composition.strength"),
    ({"mode": "constellation", "strength": {"legal": -1.0}}, "composition.strength"),
    ({"mode": "constellation", "strength": {"legal": 9.0}}, "composition.strength"),
    ({"mode": "routed", "sharpness": 0.1}, "composition.sharpness"),
    ({"mode": "paper", "weighting": "softmax"}, "composition.weighting"),
    ({"mode": "logit", "strength": {"legal": 1.0}}, "composition.strength"),
])
def test_bad_weighting_parameters_are_refused_naming_them(params, param):
    with pytest.raises(CompositionError) as e:
        validate(CompositionParams.model_validate(params), DOMS, "constellation", Calibrated("softmax"))
    assert e.value.param == param


def test_sharpness_is_checked_against_the_index_weighting():
    p = CompositionParams(sharpness=0.2)
    validate(p, DOMS, "constellation", Calibrated("softmax", {"softmax": 0.1}))
    with pytest.raises(CompositionError, match="takes no sharpness"):
        validate(p, DOMS, "constellation", Calibrated())  # uncalibrated index: the paper's rule


def test_composed_tensors_are_g_plus_strength_times_the_deltas(lastL_constellation):
    c = lastL_constellation.constellation
    ids, am = lastL_constellation.encode(PROMPTS[:1])
    gp = c.generalist_pass(ids, am)
    strength = {"medical": 1.7, "legal": 0.6, "code": 1.0}
    plan = c.plan(gp, 0, CompositionParams(weighting="alpha_only", sharpness=0.5, strength=strength))
    coef = {i: float(plan.node_weights[r].mean()) for r, i in enumerate(plan.selected)}
    i = c.n - 1
    got = materialize(c.sources[i], plan.source_weights, c.policy, c.g.arch, c.d)
    for name, tg in c.g.layer(i).t.items():
        want = tg + sum(strength[c.domains[k]] * w * (c.specialists[k].layer(i).t[name] - tg) for k, w in coef.items())
        assert (got[name] - want).abs().max().item() <= 1e-5, name


# ---- calibration -----------------------------------------------------------------------------------
def test_calibration_items_are_cross_fitted_and_pairs_stay_in_their_fold():
    from index_store.calibrate import calibration_items, n_folds

    probes = {d: [f"{d} {j}" for j in range(6)] for d in DOMS} | {"general": ["g0", "g1"]}
    folds = n_folds(probes, DOMS)
    assert folds == 4
    items = calibration_items(probes, DOMS, folds)
    singles = [it for it in items if it.kind == "single"]
    assert len(singles) == 18 and sum(it.kind == "control" for it in items) == 2
    for it in singles:
        assert it.fold == int(it.text.split()[1]) % folds
    pairs = [it for it in items if it.kind == "pair"]
    assert pairs and {tuple(sorted(p.domains)) for p in pairs} <= {("legal", "medical"), ("code", "medical"),
                                                                   ("code", "legal")}
    for p in pairs:  # both halves from the pair's own fold
        for half in p.text.split("\n\n"):
            assert int(half.split()[1]) % folds == p.fold
    assert n_folds({"medical": ["a"], "legal": ["b", "c"], "code": ["d", "e"]}, DOMS) == 1


def test_a_fold_basis_never_sees_its_fold():
    from index_store.calibrate import fold_basis
    from index_store.config import IndexConfig

    class Cfg:
        index = IndexConfig(path="i", probes="p")

    g = torch.Generator().manual_seed(1)
    fps = {d: torch.randn(8, 16, generator=g) for d in DOMS}
    base = fold_basis(fps, DOMS, 1, 4, Cfg)
    moved = {d: v.clone() for d, v in fps.items()}
    for d in DOMS:
        moved[d][1::4] += 100.0  # change only fold 1's probes
    assert torch.equal(fold_basis(moved, DOMS, 1, 4, Cfg), base)
    assert not torch.equal(fold_basis(moved, DOMS, 0, 4, Cfg), fold_basis(fps, DOMS, 0, 4, Cfg))


@pytest.fixture(scope="module")
def calibrated(built):
    from index_store.loader import load_constellation
    from index_store.store import read_manifest

    conf = built("llama", domains=("medical", "legal", "code"))
    return conf, read_manifest(conf.parent / "index"), load_constellation(conf)


def test_index_build_calibrates_and_the_loaded_constellation_uses_it(calibrated):
    from index_store.calibrate import STRENGTHS

    conf, manifest, loaded = calibrated
    cal = manifest["calibration"]
    assert cal["weighting"] in WEIGHTINGS and cal["folds"] == 4 and cal["items"]["pair"] >= 1
    # each choice is the argmin of what was measured
    for d, curve in cal["strength_curves"].items():
        assert set(curve) == {str(g) for g in STRENGTHS}
        assert curve[str(cal["strength"][d])] == min(curve.values())
    for name, curve in cal["sharpness_curves"].items():
        assert curve[str(cal["sharpness"][name])] == min(curve.values())
    # the default: the lowest held-out loss (each fold scored with what the other folds fitted)
    assert cal["held_out_loss"][cal["weighting"]] == min(cal["held_out_loss"].values())
    assert set(cal["held_out_loss"]) == {"paper", "softmax", "adaptive"} and cal["held_out_loss"]["paper"] == \
        cal["loss"]["paper"]["all"]  # nothing fitted: held out = in sample
    bands = cal["bands"]["adaptive"]
    assert bands["temperatures"] == sorted(bands["temperatures"]) and len(bands["temperatures"]) == len(bands["edges"]) + 1
    assert set(cal["reference_loss"]) == {"generalist", "routed", "paper"}
    c = loaded.constellation
    assert c.settings.calibrated.weighting == cal["weighting"]
    assert c.settings.calibrated.strength == cal["strength"]
    gp = loaded.analyze(PROMPTS[:1])
    plan = c.plan(gp, 0, CompositionParams())
    assert plan.extra["weighting"] == cal["weighting"]
    assert plan.extra["strength"] == {c.domains[i]: cal["strength"][c.domains[i]] for i in plan.selected}


def test_index_inspect_reports_the_calibration(calibrated):
    conf, manifest, _ = calibrated
    p = subprocess.run([sys.executable, "-m", "server.cli", "index", "inspect", str(conf.parent / "index")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    cal = manifest["calibration"]
    assert "calibration on held-out index probes (4 folds" in p.stdout
    assert f"default weighting {cal['weighting']}" in p.stdout
    # strengths in the index's domain order
    assert "strength: " + ", ".join(f"{d} {cal['strength'][d]:g}" for d in manifest["domains"]) in p.stdout
    doc = json.loads(subprocess.run([sys.executable, "-m", "server.cli", "index", "inspect", "--json",
                                     str(conf.parent / "index")], capture_output=True, text=True, cwd=ROOT,
                                    timeout=120).stdout)
    assert doc["calibration"]["strength"] == cal["strength"]


def test_calibrate_false_builds_the_paper_rule_and_a_changed_setting_needs_a_rebuild(built, tmp_path):
    from index_store.indexing import build_index
    from index_store.loader import load_constellation
    from index_store.store import IndexStoreError

    src = built("llama", domains=("medical", "legal", "code")).parent
    shutil.copytree(src, tmp_path / "c")
    conf = tmp_path / "c" / "constellation.toml"
    text = conf.read_text()
    conf.write_text(text.replace("[index]\n", "[index]\ncalibrate = false\n"))
    with pytest.raises(IndexStoreError, match=r"\[index\]\.calibrate = true but the config says false"):
        load_constellation(conf)  # built calibrated, configured not to be
    manifest = build_index(conf, quiet=True)
    assert "calibration" not in manifest
    loaded = load_constellation(conf)
    c = loaded.constellation
    gp = loaded.analyze(PROMPTS)
    for row in range(2):
        assert torch.equal(c.plan(gp, row).source_weights, c.plan(gp, row, CompositionParams(mode="paper")).source_weights)


def test_a_catalog_change_keeps_the_calibration_of_the_other_domains(built, tmp_path):
    from index_store import catalog
    from index_store.store import read_manifest

    src = built("llama", domains=("medical", "legal", "code")).parent
    shutil.copytree(src, tmp_path / "c")
    conf = tmp_path / "c" / "constellation.toml"
    before = read_manifest(tmp_path / "c" / "index")["calibration"]
    code_probes = json.loads((tmp_path / "c" / "probes.json").read_text())["domains"]["code"]
    conf.write_text(conf.read_text().replace("top_k = 3", "top_k = 2"))
    res = catalog.apply(conf, catalog.Change("remove", "code"))
    cal = res.manifest["calibration"]
    assert cal["strength"] == {d: g for d, g in before["strength"].items() if d != "code"}
    assert cal["weighting"] == before["weighting"] and cal["uncalibrated"] == []
    res = catalog.apply(conf, catalog.Change("add", "code", src / "models" / "code", code_probes))
    cal = res.manifest["calibration"]
    assert "code" not in cal["strength"] and cal["uncalibrated"] == ["code"]


# ---- served ------------------------------------------------------------------------------------------
def test_served_requests_override_the_calibration_and_bad_values_are_400(calibrated):
    from openai import OpenAI

    from bench.loopback import LoopbackServer
    from server.app import create_app

    conf, manifest, loaded = calibrated
    cal = manifest["calibration"]
    with LoopbackServer(create_app(loaded)) as url:
        doc = httpx.post(url + "/explain", json={"prompt": PROMPTS[0]}, timeout=60).json()
        assert doc["weighting"] == cal["weighting"] and doc["strength"]
        soft = httpx.post(url + "/explain", timeout=60, json={"prompt": PROMPTS[0], "composition": {
            "weighting": "softmax", "sharpness": 5.0, "strength": {"medical": 2.0}}}).json()
        assert soft["sharpness"] == 5.0 and soft["weighting"] == "softmax" and soft["strength"].get("medical", 2.0) == 2.0
        client = OpenAI(base_url=url + "/v1", api_key="x")
        r = client.completions.create(model="constellation", prompt=PROMPTS[0], max_tokens=2,
                                      extra_body={"composition": {"weighting": "power", "sharpness": 4.0}})
        comp = r.model_extra["composition"]  # the response says what it used
        assert comp["weighting"] == "power" and comp["sharpness"] == 4.0 and set(comp["strength"]) == set(comp["selected"])
        paper = client.completions.create(model="constellation", prompt=PROMPTS[0], max_tokens=1,
                                          extra_body={"composition": {"mode": "paper"}}).model_extra["composition"]
        assert paper["weighting"] == "paper" and paper["sharpness"] is None and paper["strength"] is None
        for bad in ({"sharpness": True, "weighting": "softmax"}, {"strength": {"legal": "1.5"}}):
            r400 = httpx.post(url + "/v1/completions", timeout=60, json={
                "model": "constellation", "prompt": "x", "max_tokens": 1, "composition": bad})
            assert r400.status_code == 400 and r400.json()["error"]["param"].startswith("composition."), bad
        bad = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": "constellation", "prompt": "x", "max_tokens": 1,
            "composition": {"weighting": "paper", "sharpness": 2.0}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "composition.sharpness"
