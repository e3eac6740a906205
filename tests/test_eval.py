"""`constellation eval`: each pass, the statistics, and known-by-construction outcomes."""

import json
import subprocess
import sys
import os
from pathlib import Path

import pytest
import torch

from composer.constellation import Constellation
from eval import run as ev
from eval.run import Row

ROOT = Path(__file__).resolve().parents[1]
DOMS = ["medical", "legal", "code"]


def _row(domain, losses, alpha=(0.6, 0.3, 0.1), entropy=1.0):
    base = {"generalist": 3.0, "constellation": 2.0, "uniform": 2.5, "logit": 2.6,
            "spec:medical": 2.2, "spec:legal": 2.4, "spec:code": 2.9,
            "ta:0.3": 2.8, "ta:0.5": 2.7, "ta:1.0": 3.5}
    base.update(losses)
    return Row("t", [domain] if isinstance(domain, str) else domain, list(alpha), [1.0, 1.0, 1.0], base,
               {"selected": DOMS, "weights": {}, "entropy": entropy, "gini": 0.3, "fallback": 0.0})


def test_win_rates_are_strict_with_bootstrap_intervals():
    rows = [_row("medical", {"constellation": 2.0, "generalist": 2.0})] * 4 + [_row("medical", {})] * 4
    w = ev.rate_ci(ev.wins(rows, "constellation", "generalist"))
    assert w["rate"] == 0.5 and w["n"] == 8  # ties are not wins
    assert 0.0 <= w["ci95"][0] <= 0.5 <= w["ci95"][1] <= 1.0
    all_win = ev.rate_ci([1] * 10)
    assert all_win["rate"] == 1.0 and all_win["ci95"] == [1.0, 1.0]


def test_single_domain_pass_with_a_known_winner():
    rows = [_row(d, {}) for d in DOMS for _ in range(6)]
    sd = ev.single_domain(rows, DOMS)
    # constellation (2.0) beats generalist 3.0, uniform 2.5, every oracle (>= 2.2), TA at any lambda
    for k in ("generalist", "uniform", "oracle", "task_arithmetic"):
        assert sd["win_rate"][k]["rate"] == 1.0, k
    assert sd["task_arithmetic"]["lambda"] == 0.5  # lowest mean loss on the selection half
    assert sd["task_arithmetic"]["report_n"] == 9 and sd["task_arithmetic"]["select_n"] == 9
    assert sd["mean_loss"]["oracle"] == pytest.approx((2.2 + 2.4 + 2.9) / 3)
    assert sd["per_domain"]["code"]["loss"]["oracle"] == 2.9
    # make the oracle win on legal probes only
    rows = [_row(d, {"spec:legal": 1.0} if d == "legal" else {}) for d in DOMS for _ in range(6)]
    assert ev.single_domain(rows, DOMS)["per_domain"]["legal"]["win_vs_oracle"] == 0.0
    assert ev.single_domain(rows, DOMS)["per_domain"]["medical"]["win_vs_oracle"] == 1.0


def test_cross_domain_pass_best_single_is_the_per_probe_best_specialist():
    rows = [_row(["medical", "legal"], {"spec:code": 1.5}) for _ in range(4)]
    cd = ev.cross_domain(rows, DOMS)
    assert cd["win_rate"]["best_single"]["rate"] == 0.0  # code's 1.5 beats the constellation's 2.0
    assert cd["win_rate"]["logit"]["rate"] == 1.0 and cd["mean_loss"]["best_single"] == 1.5


def test_retrieval_and_correlation_passes():
    rows = [_row("medical", {}, alpha=(0.9, 0.1, 0.0)), _row("legal", {}, alpha=(0.5, 0.2, 0.6)),
            _row("code", {}, alpha=(0.1, 0.2, 0.7))]
    rt = ev.retrieval(rows, DOMS)
    assert rt["top1"] == pytest.approx(2 / 3) and rt["top3"] == 1.0
    assert rt["per_domain"]["legal"] == {"n": 1, "top1": 0.0, "top3": 1.0}
    assert ev.pearson([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
    co = ev.correlation(rows, DOMS)
    assert co["pairs"] == 9


def test_lambda_selection_never_sees_the_report_half():
    sel = [_row("medical", {"ta:0.3": 1.0})] * 3  # 0.3 is best on the selection half
    rep = [_row("medical", {"ta:0.3": 9.0, "ta:1.0": 0.5})] * 3  # ... and worst on the report half
    ta = ev.choose_lambda(sel, rep)
    assert ta["lambda"] == 0.3
    assert ta["win_rate"]["rate"] == 1.0  # constellation 2.0 < 9.0
    assert ta["win_rate_vs_per_probe_oracle_lambda"]["rate"] == 0.0  # oracle picks 1.0 -> 0.5


@pytest.fixture(scope="module")
def evaluated(built, tmp_path_factory):
    conf = built("llama", domains=("medical", "legal", "code"))
    out = tmp_path_factory.mktemp("eval")
    cross = out / "cross.json"
    cross.write_text(json.dumps({"probes": [
        {"text": "The patient contract clause warranty fever.", "domains": ["medical", "legal"]},
        {"text": "The def return biopsy tumor import.", "domains": ["medical", "code"]},
        {"text": "The licensee class lambda court.", "domains": ["legal", "code"]},
        {"text": "The statute parser compile dose.", "domains": ["legal", "code", "medical"]}]}))
    p = subprocess.run([sys.executable, "-m", "server.cli", "eval", "--config", str(conf), "--probes",
                        str(conf.parent / "probes.json"), "--cross", str(cross), "--out", str(out / "r"),
                        "--noise-sweep", "--ablations", "--quiet"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return conf, out / "r", p.stdout


def test_eval_command_writes_report_results_and_plots(evaluated):
    conf, out, stdout = evaluated
    r = json.loads((out / "results.json").read_text())
    for path in (("retrieval", "top1"), ("retrieval", "top3"), ("index", "mean_collinearity"),
                 ("index", "post_gs_max_abs_cos")):
        v = r[path[0]][path[1]]
        assert 0.0 <= v <= 1.0, path
    for k in ("generalist", "uniform", "oracle", "task_arithmetic"):
        assert 0.0 <= r["single_domain"]["win_rate"][k]["rate"] <= 1.0
    for k in ("generalist", "best_single", "task_arithmetic", "logit"):
        assert 0.0 <= r["cross_domain"]["win_rate"][k]["rate"] <= 1.0
    assert [p["s"] for p in r["noise_sweep"]["points"]] == list(ev.NOISE)
    names = set(r["ablations"])
    for n in ("policy=shape", "signature=full", "K=1", "L=8", "normalisation=joint", "basis=symmetric"):
        assert n in names
    assert sum(n.startswith("basis=gram_schmidt") for n in names) == 3
    assert r["ablations"]["L=8"]["skipped"] == "the model has 6 layers"
    for png in ("collinearity.png", "domain_weights.png", "win_rates.png", "noise_sweep.png"):
        assert (out / png).stat().st_size > 5000
    report = (out / "report.md").read_text()
    for heading in ("Pass 1", "Pass 2", "Pass 3", "Pass 4", "Pass 5", "Noise sweep", "Ablations"):
        assert heading in report
    # the fixture's evaluation probes are its index probes: the report must say so
    assert r["probes"]["in_sample"] and "In-sample" in report
    assert "retrieval top-1" in stdout and "single: vs generalist" in stdout
    # every calibrated weighting beside the default, and issue 25's targets for the adaptive one
    assert {"w:softmax", "w:adaptive"} <= set(r["cross_domain"]["win_rate"]) and "w:adaptive" in \
        r["single_domain"]["loss_difference"]
    targets = {t["target"]: t for t in r["adaptive"]["targets"]}
    assert len(targets) == 6 and all(isinstance(t["met"], bool) for t in targets.values())
    paper = targets["cross: mean loss no worse than the paper's rule (interval covers or is below 0)"]
    assert paper["met"] == (paper["difference"]["ci95"][0] <= 0)
    assert "## The adaptive weighting" in report


def test_eval_losses_are_the_composition_codes(evaluated):
    from composer.modes import CompositionParams
    from eval.core import token_nll
    from index_store.loader import load_constellation

    conf, out, _ = evaluated
    r = json.loads((out / "results.json").read_text())
    loaded = load_constellation(conf)
    c = loaded.constellation
    probe = r["per_probe"]["single"][3]
    texts = [t for ts in json.loads((conf.parent / "probes.json").read_text())["domains"].values() for t in ts]
    assert all("text" not in p for p in r["per_probe"]["single"])  # probe texts are never copied out
    ids, am = loaded.encode([texts[3]])
    gp = c.generalist_pass(ids, am)
    for name, params in (("constellation", CompositionParams()), ("generalist", CompositionParams(mode="generalist")),
                         ("ta:0.5", CompositionParams(mode="task_arithmetic", **{"lambda": 0.5}))):
        loss = float(token_nll(c.composed_logits(gp, [c.plan(gp, 0, params)]), ids, am)[0])
        assert probe["losses"][name] == pytest.approx(loss, abs=1e-5), name
    # win rate = recomputation from the per-probe losses
    spec = [p for p in r["per_probe"]["single"] if p["domains"][0] in c.domains]
    rate = sum(p["losses"]["constellation"] < p["losses"]["generalist"] for p in spec) / len(spec)
    assert r["single_domain"]["win_rate"]["generalist"]["rate"] == pytest.approx(rate)
    # ablation K=3 with the default settings equals the main run
    assert r["ablations"]["K=3"]["single_mean_loss"] == pytest.approx(r["single_domain"]["mean_loss"]["constellation"])
    # the weightings' rows: the default's equals the main run; each other weighting at its index-calibrated value
    rows = r["weightings"]["rows"]
    default = r["constellation"]["calibration"]["weighting"]
    assert rows[f"calibrated (the default: {default})"]["single_mean_loss"]["mean"] == pytest.approx(
        r["single_domain"]["mean_loss"]["constellation"])
    # each weighting index build calibrated has its row; the default's, measured under its name, is the same
    cal = r["constellation"]["calibration"]
    for w in {*cal["sharpness"], *cal["bands"]}:
        row = rows[f"weighting={w} (calibrated at index build)"]
        assert (row["single_mean_loss"]["mean"] == pytest.approx(r["single_domain"]["mean_loss"]["constellation"])) \
            or w != default
    assert rows["router, K=1 (mode routed)"]["single_mean_loss"]["mean"] == pytest.approx(
        r["single_domain"]["mean_loss"]["routed"])
    found = r["weightings"]["calibrated on the index probes"]["sharpness"]
    for w, s in found.items():
        if w != "paper" and w != r["constellation"]["calibration"]["weighting"]:
            assert any(k.startswith(f"weighting={w} ") and f" {s:g}," in k for k in rows), (w, s, list(rows))
    # targets: each a measured value against its threshold, the router's loss beside the constellation's
    t = {x["target"]: x for x in r["targets"]}
    assert t["single_domain: win vs oracle >= 55%"]["value"] == r["single_domain"]["win_rate"]["oracle"]["rate"]
    assert t["single_domain: mean loss below the K = 1 router's"]["met"] == (
        r["single_domain"]["mean_loss"]["constellation"] < r["single_domain"]["mean_loss"]["routed"])
    d = r["single_domain"]["loss_difference"]["generalist"]
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    report = (out / "report.md").read_text()
    assert "## Targets" in report and "## Weightings, taken apart" in report


def test_specialists_equal_to_the_generalist_never_win(built, tmp_path):
    """Known by construction: every variant is the generalist, so no strict win anywhere."""
    from index_store.loader import load_constellation

    loaded = load_constellation(built("llama", domains=("medical", "legal", "code")))
    c0 = loaded.constellation
    g = c0.g
    loaded.constellation = Constellation(g, {d: type(g)(g.mc, g.arch, dict(g.params)) for d in c0.domains},
                                         c0.basis, c0.settings)
    single = {"medical": ["The patient fever biopsy dose."], "legal": ["The contract clause licensee court."],
              "code": ["The def return import class."]}
    r = ev.run(loaded, single, [("The patient contract def.", ["medical", "legal"])] * 2, tmp_path, quiet=True)
    for v in r["single_domain"]["win_rate"].values():
        assert v["rate"] == 0.0
    for v in r["cross_domain"]["win_rate"].values():
        assert v["rate"] == 0.0
    losses = r["per_probe"]["single"][0]["losses"]
    assert max(losses.values()) - min(losses.values()) <= 1e-4


def test_bad_probe_files_are_clear_errors(tmp_path):
    bad = tmp_path / "cross.json"
    bad.write_text('{"probes": [{"txt": "x"}]}')
    with pytest.raises(ev.EvalError, match="cross.json"):
        ev.load_cross(bad)
