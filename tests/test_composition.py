"""Composition kernels and modes on real (tiny) models: exactness of both run paths."""

from dataclasses import replace

import pytest
import torch

from composer.constellation import Constellation
from composer.kernels import materialize
from composer.modes import MODES, CompositionError, CompositionParams
from composer.policies import POLICIES

PROMPTS = [
    "The patient fever biopsy dose tumor renal.",
    "The contract clause licensee warranty court.",
    "The def return import class lambda.",
    "The protein enzyme photon.",
]


def _with(loaded, **settings) -> Constellation:
    c = loaded.constellation
    return Constellation(c.g, dict(zip(c.domains, c.specialists)), c.basis, replace(c.settings, **settings),
                         c.differences)


def _reference_logits(c: Constellation, ids, am, layers: dict[int, dict]) -> torch.Tensor:
    """Logits of G with the given blocks replaced by explicit tensors (no shared code path)."""
    from composer.model import DenseParams

    return c.g.forward(ids, am, {i: DenseParams(t, c.g.arch) for i, t in layers.items()})


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_materialize_and_mix_agree(mixed_constellation, policy):
    c = _with(mixed_constellation, policy=policy)
    ids, am = mixed_constellation.encode(PROMPTS)
    gp = c.generalist_pass(ids, am)
    plans = [c.plan(gp, b, CompositionParams(mode=m)) for b, m in
             enumerate(["constellation", "task_arithmetic", "uniform", "routed"])]
    mat = c.composed_logits(gp, plans, "materialize")
    mix = c.composed_logits(gp, plans, "mix")
    err = ((mat - mix).abs() * am[..., None]).max().item()
    assert err <= 1e-4, err
    # each row equals a full forward with explicitly materialised tensors
    for b, p in enumerate(plans):
        layers = {i: materialize(c.sources[i], p.source_weights, c.policy, c.g.arch, c.d) for i in c.sources}
        ref = _reference_logits(c, ids[b:b + 1], am[b:b + 1], layers)
        n = int(am[b].sum())
        assert (ref[0, :n] - mat[b, :n]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_one_hot_weights_reproduce_the_specialist(mixed_constellation, policy):
    c = _with(mixed_constellation, policy=policy)
    ids, am = mixed_constellation.encode(PROMPTS[:2])
    gp = c.generalist_pass(ids, am)
    for k, dom in enumerate(c.domains):
        plan = c.plan(gp, 0, CompositionParams(mode="weights", weights={dom: 1.0}))
        assert plan.selected == [k]
        for i in c.sources:  # the composed tensors are the specialist's, bit for bit
            composed = materialize(c.sources[i], plan.source_weights, c.policy, c.g.arch, c.d)
            for name, t in composed.items():
                assert torch.equal(t, c.specialists[k].layer(i).t[name]), (dom, i, name)
        # and running them gives the specialist's last L layers on G's trunk
        for path in ("materialize", "mix", "batch"):
            got = c.composed_logits(gp, [plan, plan], path)
            s = c.specialists[k]
            with torch.inference_mode():
                x = s.run_blocks(gp.trunk, gp.ctx.with_cache(None),
                                 c.first, c.n)
                want = c.g.logits(c.g.final_norm(x))
            assert ((got - want).abs() * am[..., None]).max().item() <= 1e-5


def test_specialists_equal_to_generalist_reproduce_it(mixed_constellation):
    c0 = mixed_constellation.constellation
    g = c0.g
    clones = {d: type(g)(g.mc, g.arch, dict(g.params)) for d in c0.domains}
    c = Constellation(g, clones, c0.basis, c0.settings)
    assert all(not diff.tensors for diff in c.differences.values())
    ids, am = mixed_constellation.encode(PROMPTS)
    gp = c.generalist_pass(ids, am)
    want = g.forward(ids, am)
    for mode in ("constellation", "uniform", "routed", "task_arithmetic"):
        plans = [c.plan(gp, b, CompositionParams(mode=mode)) for b in range(len(PROMPTS))]
        for path in ("materialize", "mix", "batch"):
            got = c.composed_logits(gp, plans, path)
            assert ((got - want).abs() * am[..., None]).max().item() <= 1e-4, (mode, path)


def test_trunk_signature_equals_full_when_specialists_differ_only_in_last_layers(lastL_constellation):
    trunk = _with(lastL_constellation, signature="trunk")
    full = _with(lastL_constellation, signature="full")
    assert all(trunk.trunk_exact.values())
    ids, am = lastL_constellation.encode(PROMPTS)
    gt, gf = trunk.generalist_pass(ids, am), full.generalist_pass(ids, am)
    for i in range(len(trunk.domains)):
        assert (trunk.signature(gt, i) - full.signature(gf, i)).abs().max().item() <= 1e-5
    pt, pf = trunk.plan(gt, 0), full.plan(gf, 0)
    assert (pt.node_weights - pf.node_weights).abs().max().item() <= 1e-5


def test_trunk_signature_differs_when_specialists_differ_everywhere(mixed_constellation):
    trunk = _with(mixed_constellation, signature="trunk")
    full = _with(mixed_constellation, signature="full")
    assert trunk.trunk_exact == {"medical": True, "legal": True, "code": False, "science": False}
    ids, am = mixed_constellation.encode(PROMPTS[:1])
    gt, gf = trunk.generalist_pass(ids, am), full.generalist_pass(ids, am)
    k = trunk.domains.index("code")
    assert (trunk.signature(gt, k) - full.signature(gf, k)).abs().max().item() > 1e-4


def test_task_arithmetic_matches_its_formula(lastL_constellation):
    c = lastL_constellation.constellation
    ids, am = lastL_constellation.encode(PROMPTS[:1])
    gp = c.generalist_pass(ids, am)
    plan = c.plan(gp, 0, CompositionParams(mode="task_arithmetic", **{"lambda": 0.3}))
    i = c.n - 1
    got = materialize(c.sources[i], plan.source_weights, c.policy, c.g.arch, c.d)
    for name, tg in c.g.layer(i).t.items():
        want = tg + 0.3 * sum(s.layer(i).t[name] - tg for s in c.specialists)
        assert (got[name] - want).abs().max().item() <= 1e-5, name


def test_paper_plan_follows_the_design(lastL_constellation):
    c = lastL_constellation.constellation
    ids, am = lastL_constellation.encode(PROMPTS[:1])
    gp = c.generalist_pass(ids, am)
    plan = c.plan(gp, 0, CompositionParams(mode="paper", top_k=2))
    a = gp.alpha[0]
    assert plan.selected == sorted(range(3), key=lambda i: -float(a[i]))[:2]
    sig = torch.stack([c.signature(gp, i)[0] for i in plan.selected]).double()
    raw = a[plan.selected].clamp_min(0)[:, None] * sig
    assert (plan.node_weights.double() - raw / raw.sum(0)).abs().max().item() <= 1e-6
    # source weights: zero for G and for the unselected specialist
    assert torch.all(plan.source_weights[0] == 0)
    unselected = ({0, 1, 2} - set(plan.selected)).pop()
    assert torch.all(plan.source_weights[1 + unselected] == 0)


def test_logit_mode_is_the_log_linear_mixture(lastL_constellation):
    c = lastL_constellation.constellation
    ids, am = lastL_constellation.encode(PROMPTS[:1])
    gp = c.generalist_pass(ids, am)
    plan = c.plan(gp, 0, CompositionParams(mode="logit"))
    pos = gp.alpha[0].clamp_min(0)
    assert sum(plan.betas.values()) == pytest.approx(1.0)
    got = c.composed_logits(gp, [plan])
    lg = torch.log_softmax(c.g.forward(ids, am).float(), -1)
    mix = lg.clone()
    for i, s in enumerate(c.specialists):
        mix += float(pos[i] / pos[plan.selected].sum()) * (torch.log_softmax(s.forward(ids, am).float(), -1) - lg)
    assert (got - torch.log_softmax(mix, -1)).abs().max().item() <= 1e-4


def test_mix_batch_rows_equal_each_row_alone(mixed_constellation):
    c = mixed_constellation.constellation
    ids, am = mixed_constellation.encode(PROMPTS)
    gp = c.generalist_pass(ids, am)
    modes = ["constellation", "generalist", "weights", "uniform"]
    params = [CompositionParams(mode=m, **({"weights": {"legal": 0.5, "code": 0.5}} if m == "weights" else {}))
              for m in modes]
    plans = [c.plan(gp, b, p) for b, p in enumerate(params)]
    batch = c.composed_logits(gp, plans, "mix")
    for b in range(len(PROMPTS)):
        alone_gp = c.generalist_pass(ids[b:b + 1, : int(am[b].sum())])
        alone = c.composed_logits(alone_gp, [c.plan(alone_gp, 0, params[b])], "mix")
        n = int(am[b].sum())
        assert (batch[b, :n] - alone[0]).abs().max().item() <= 1e-4


def test_lean_memory_shares_generalist_tensors(mixed_constellation):
    c = mixed_constellation.constellation
    k = c.domains.index("medical")
    for name, t in c.specialists[k].params.items():
        same = torch.equal(t, c.g.params[name])
        assert (t is c.g.params[name]) == same, name
    sizes = c.resident_bytes()
    assert sizes["medical"] < sizes["code"] <= sizes["generalist"]


def test_mode_registry_and_parameter_validation(lastL_constellation):
    c = lastL_constellation.constellation
    assert {"constellation", "generalist", "routed", "uniform", "task_arithmetic", "weights", "logit"} <= set(MODES)
    for m in MODES.values():
        assert m.source and m.description
    gp = c.generalist_pass(*lastL_constellation.encode(PROMPTS[:1]))
    with pytest.raises(CompositionError, match="unknown composition mode"):
        c.plan(gp, 0, CompositionParams(mode="nope"))
    with pytest.raises(CompositionError, match="does not apply"):
        c.plan(gp, 0, CompositionParams(mode="generalist", top_k=2))
    with pytest.raises(CompositionError, match="unknown domain"):
        c.plan(gp, 0, CompositionParams(mode="weights", weights={"astrology": 1.0}))
    with pytest.raises(CompositionError, match="needs composition.weights"):
        c.plan(gp, 0, CompositionParams(mode="weights"))
    with pytest.raises(CompositionError, match="exceeds"):
        c.plan(gp, 0, CompositionParams(top_k=9))


def test_fingerprint_ignores_padding(lastL_constellation):
    c = lastL_constellation.constellation
    ids, am = lastL_constellation.encode([PROMPTS[0]])
    alone = c.generalist_pass(ids, am).fingerprint[0]
    n = ids.shape[1]
    for pad, left in ((5, False), (9, True)):
        big = torch.zeros(1, n + pad, dtype=torch.long)
        m = torch.zeros_like(big)
        sl = slice(pad, None) if left else slice(0, n)
        big[0, sl] = ids[0]
        m[0, sl] = 1
        fp = c.generalist_pass(big, m).fingerprint[0]
        assert (fp - alone).abs().max().item() <= 1e-5
    # in a batch with a longer prompt, too
    ids2, am2 = lastL_constellation.encode([PROMPTS[0], PROMPTS[1] * 3])
    assert (c.generalist_pass(ids2, am2).fingerprint[0] - alone).abs().max().item() <= 1e-5
