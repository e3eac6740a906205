"""The adaptive weighting (docs/weightings.md): a softmax whose temperature the prompt's second alpha
picks from calibrated bands, fitted at index build on cross-fitted index probes and mixed probes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from composer.modes import Calibrated, CompositionError, CompositionParams, ModeInput, get_mode, validate
from composer.weightings import WEIGHTINGS, Bands, WeightingError, second_alpha
from index_store.calibrate_fit import Scored, fit_bands, fit_grid, held_out
from index_store.probes import ProbeError, load_mixed

ROOT = Path(__file__).resolve().parents[1]
DOMS = ["medical", "legal", "code"]


def _plan(alpha, cal, params=CompositionParams()):
    sig = torch.rand(len(alpha), 6, generator=torch.Generator().manual_seed(0)) + 0.5
    mi = ModeInput(torch.tensor(alpha, dtype=torch.float64), DOMS, 6, 3, 0.5, lambda idx: sig[idx], params,
                   calibrated=cal)
    return get_mode("constellation").build(mi)


def test_bands_pick_a_temperature_per_band_of_the_profile():
    b = Bands((0.4, 0.5), (0.05, 0.2, 0.5))
    assert [b.temperature(x) for x in (0.0, 0.39, 0.4, 0.49, 0.5, 0.9)] == [0.05, 0.05, 0.2, 0.2, 0.5, 0.5]
    assert b.describe("second alpha") == "temperature 0.05 for second alpha < 0.4, 0.2 from 0.4, 0.5 from 0.5"
    assert Bands.of(b.doc()) == b
    for bad in (((0.5, 0.4), (0.1, 0.2, 0.3)), ((0.4,), (0.1,))):
        with pytest.raises(WeightingError):
            Bands(*bad)
    assert second_alpha(torch.tensor([0.2, 0.9, 0.5])) == pytest.approx(0.5)
    assert second_alpha(torch.tensor([0.9])) == 0.0  # K = 1: nothing to blend


def test_the_second_alpha_chooses_the_temperature_and_the_plan_says_so():
    cal = Calibrated("adaptive", {}, {"medical": 1.5}, {"adaptive": Bands((0.45,), (0.05, 0.5))})
    sharp, mixed = _plan([0.8, 0.3, 0.2], cal), _plan([0.8, 0.6, 0.2], cal)
    assert sharp.extra["weighting"] == "adaptive" and sharp.extra["sharpness"] == 0.05
    assert mixed.extra["sharpness"] == 0.5
    assert sharp.extra["profile"]["value"] == pytest.approx(0.3) and mixed.extra["profile"]["value"] == pytest.approx(0.6)
    assert mixed.extra["profile"]["band"] == "0.45 <= second alpha"
    # the same as softmax at the band's temperature, strengths included
    for plan, alpha, t in ((sharp, [0.8, 0.3, 0.2], 0.05), (mixed, [0.8, 0.6, 0.2], 0.5)):
        ref = _plan(alpha, cal, CompositionParams(weighting="softmax", sharpness=t))
        assert torch.equal(plan.source_weights, ref.source_weights)
    assert sharp.coefficients[0] > mixed.coefficients[0]  # one domain: nearly routed; two: blended
    # uncalibrated (an index built before it, or a request naming it): the registry's bands
    default = _plan([0.8, 0.6, 0.2], Calibrated("softmax", {"softmax": 0.15}), CompositionParams(weighting="adaptive"))
    assert default.extra["sharpness"] == WEIGHTINGS["adaptive"].bands.temperature(0.6)
    with pytest.raises(CompositionError) as e:  # its temperature is the prompt's, not the request's
        validate(CompositionParams(weighting="adaptive", sharpness=0.3), DOMS, "constellation", cal)
    assert e.value.param == "composition.sharpness"


def _alpha(x: float) -> torch.Tensor:
    """Selected alphas whose second-highest is ``x``."""
    return torch.tensor([0.9, x, 0.1], dtype=torch.float64)


def _rows(rule, n=200, temps=(0.05, 0.1, 0.3, 0.5), seed=0):
    """Items whose loss is lowest at ``rule(profile)`` (a V in log temperature), plus noise."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        x = float(torch.rand(1, generator=g)) * 0.5 + 0.2
        best = rule(x)
        losses = {("adaptive", str(t)): 3.0 + abs(torch.log(torch.tensor(t / best)).item()) * 0.05
                  + float(torch.randn(1, generator=g)) * 0.002 for t in temps}
        rows.append(Scored("single" if x < 0.45 else "mixed", i % 4, _alpha(x), losses))
    return rows


def test_fitting_recovers_a_planted_rule_and_keeps_temperatures_non_decreasing():
    temps = (0.05, 0.1, 0.3, 0.5)
    rows = _rows(lambda x: 0.05 if x < 0.4 else 0.3)
    b = fit_bands(rows, "adaptive", temps, second_alpha)
    assert b == Bands((0.4,), (0.05, 0.3))
    # a profile that does not matter: one band (more bands must pay for themselves)
    flat = fit_bands(_rows(lambda x: 0.1), "adaptive", temps, second_alpha)
    assert flat == Bands((), (0.1,))
    # a rule that sharpens as the profile grows is not representable: temperatures stay non-decreasing
    down = fit_bands(_rows(lambda x: 0.5 if x < 0.4 else 0.05), "adaptive", temps, second_alpha)
    assert list(down.temperatures) == sorted(down.temperatures)
    # held out: each fold scored with the bands fitted on the other three, no better than in sample
    inside = sum(r.losses[("adaptive", str(b.temperature(second_alpha(r.alpha))))] for r in rows) / len(rows)
    out = held_out(rows, lambda rs: fit_bands(rs, "adaptive", temps, second_alpha),
                   lambda r, p: r.losses[("adaptive", str(p.temperature(second_alpha(r.alpha))))])
    assert inside <= out < inside + 0.01
    soft = {**{("softmax", str(t)): 0.0 for t in temps}}
    assert fit_grid([Scored("single", 0, _alpha(0.3), {**soft, ("softmax", "0.1"): -1.0})], "softmax", temps) == 0.1


def test_mixed_probes_are_read_and_checked(tmp_path):
    p = tmp_path / "probes.json"
    doms = {"medical": ["a"], "legal": ["b"]}
    p.write_text(json.dumps({"domains": doms}))
    assert load_mixed(p) == []
    p.write_text(json.dumps({"domains": doms, "mixed": [{"text": "ab", "domains": ["medical", "legal"]}]}))
    assert load_mixed(p) == [("ab", ["medical", "legal"])]
    for bad, msg in (({"text": "", "domains": ["medical", "legal"]}, r"mixed\[0\]\.text"),
                     ({"text": "x", "domains": ["medical"]}, "at least two different domains"),
                     ({"text": "x", "domains": ["medical", "tax"]}, r"names \['tax'\]"),
                     ("x", r"mixed\[0\]\.text")):
        p.write_text(json.dumps({"domains": doms, "mixed": [bad]}))
        with pytest.raises(ProbeError, match=msg) as e:
            load_mixed(p)
        assert str(p) in str(e.value)


def test_index_build_fits_the_bands_on_mixed_probes_and_explain_shows_the_profile(built, tmp_path):
    from bench.loopback import LoopbackServer
    from index_store.indexing import build_index
    from index_store.loader import load_constellation
    from index_store.store import IndexStoreError
    from server.app import create_app

    src = built("llama", domains=("medical", "legal", "code")).parent
    shutil.copytree(src, tmp_path / "c")
    conf = tmp_path / "c" / "constellation.toml"
    probes = tmp_path / "c" / "probes.json"
    doc = json.loads(probes.read_text())
    d = doc["domains"]
    doc["mixed"] = [{"text": d[a][j % len(d[a])] + " " + d[b][(j + 1) % len(d[b])], "domains": [a, b]}
                    for j, (a, b) in enumerate([("medical", "legal"), ("legal", "code"), ("code", "medical")] * 2)]
    probes.write_text(json.dumps(doc))
    with pytest.raises(IndexStoreError, match="other mixed probes"):
        load_constellation(conf)  # calibrated without them
    manifest = build_index(conf, quiet=True)
    cal = manifest["calibration"]
    assert cal["items"]["mixed"] == 6 and manifest["mixed_probes"] == 6
    assert set(cal["profile"]) >= {"single", "mixed", "pair"}
    loaded = load_constellation(conf)
    assert loaded.constellation.settings.calibrated.bands["adaptive"] == Bands.of(cal["bands"]["adaptive"])
    from server.summary import load_summary

    line = load_summary(loaded)  # what serve prints: the weighting in force, and why
    assert f"weighting {cal['weighting']}" in line and "chosen at index build: the lowest held-out loss" in line
    assert all(f"{n} {v:.4f}" in line for n, v in cal["held_out_loss"].items())
    with LoopbackServer(create_app(loaded)) as url:
        got = httpx.post(url + "/explain", timeout=60, json={"prompt": d["medical"][0],
                                                            "composition": {"weighting": "adaptive"}}).json()
        prof = got["profile"]
        assert got["weighting"] == "adaptive" and prof["name"] == "second alpha"
        assert prof["value"] == pytest.approx(sorted(got["alpha"].values())[-2], abs=1e-6)
        assert got["sharpness"] == prof["temperature"] == Bands.of(cal["bands"]["adaptive"]).temperature(prof["value"])
        comp = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": "constellation", "prompt": d["medical"][0], "max_tokens": 1,
            "composition": {"weighting": "adaptive"}}).json()["composition"]
        assert comp["profile"]["temperature"] == comp["sharpness"]
    p = subprocess.run([sys.executable, "-m", "server.cli", "index", "inspect", str(tmp_path / "c" / "index")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "6 mixed probes" in p.stdout and "chosen by the lowest held-out loss" in p.stdout
    p = subprocess.run([sys.executable, "-m", "server.cli", "explain", "--config", str(conf), "--weighting",
                        "adaptive", d["medical"][0]], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"its second alpha {prof['value']:.3f}: temperature {prof['temperature']:g}" in p.stdout
    bad = subprocess.run([sys.executable, "-m", "server.cli", "explain", "--config", str(conf), "--weighting",
                          "adaptive", "--sharpness", "0.3", "x"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "takes no sharpness" in bad.stderr


def test_the_objective_weights_every_item_kind_equally():
    from index_store.calibrate_fit import balance, by_kind

    temps = (0.1, 0.3)
    # nine single-domain items a little better sharp, three mixed ones much better blended
    rows = [Scored("single", i % 4, _alpha(0.3), {("softmax", "0.1"): 3.0, ("softmax", "0.3"): 3.01}) for i in range(9)]
    rows += [Scored("mixed", i % 4, _alpha(0.5), {("softmax", "0.1"): 3.0, ("softmax", "0.3"): 2.98}) for i in range(3)]
    assert fit_grid(rows, "softmax", temps) == 0.1  # item by item, the nine single ones win
    balance(rows)
    assert sum(r.weight for r in rows) == pytest.approx(len(rows))
    assert fit_grid(rows, "softmax", temps) == 0.3  # kind by kind: -0.02 on mixed outweighs +0.01 on single
    got = by_kind(rows, lambda r: r.losses[("softmax", "0.3")])
    assert got["all"] == pytest.approx((got["single"] + got["mixed"]) / 2)
