"""The low-rank run path: adapter specialists composed exactly, batched, over every layer they touch.

Each test builds adapter specialists (``W_G + B A``, seeded random factors) on a fixture generalist
and the same specialists merged into dense weights, and checks that every mode gives the same
logits through both (the dense path is the reference, DESIGN §4.1).
"""

from __future__ import annotations

import pytest
import torch

from composer.constellation import Constellation, Settings
from composer.kernels import materialize
from composer.lowrank import LowRank
from composer.model import Transformer
from composer.modes import CompositionParams
from composer.weights import load_model

ARCHS = ("llama", "qwen2", "gpt2")
PROMPTS = [
    "The patient fever biopsy dose tumor renal.",
    "The contract clause licensee warranty court.",
    "The def return import class lambda.",
    "The protein enzyme photon.",
    "The weather family garden music.",
]
TOL = 1e-5


def _linears(g: Transformer) -> list[str]:
    return [s for s, r in g.arch.roles.items() if r.role in ("read", "write")]


def make_adapter(g: Transformer, seed: int, rank: int, layers, names=None, norms: bool = False, scale: float = 0.5):
    """``(lowrank, dense)`` for a synthetic adapter: factors on ``names`` (default: every linear) of
    ``layers``; with ``norms``, replaced norm vectors (PEFT's modules_to_save)."""
    gen = torch.Generator().manual_seed(seed)
    lowrank, dense = {}, {}
    for i in layers:
        for s in names or _linears(g):
            w = g.params[g.arch.layer_name(i, s)]
            out_f, in_f = (w.shape[1], w.shape[0]) if g.arch.roles[s].layout == "conv1d" else w.shape
            A = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
            B = torch.randn(out_f, rank, generator=gen) * scale * float(w.std()) / rank ** 0.5
            lowrank[g.arch.layer_name(i, s)] = LowRank(A, B)
        if norms:
            for s, r in g.arch.roles.items():
                name = g.arch.layer_name(i, s)
                if r.role == "dvec" and "norm" in s or s.startswith("ln_"):
                    dense[name] = g.params[name] * (1 + 0.1 * torch.randn(g.params[name].shape, generator=gen))
    return lowrank, dense


def adapter_model(g: Transformer, lowrank, dense) -> Transformer:
    params = dict(g.params)
    params.update(dense)
    return Transformer(g.mc, g.arch, params, lowrank)


def merged_model(g: Transformer, lowrank, dense) -> Transformer:
    params = dict(g.params)
    params.update(dense)
    for name, lr in lowrank.items():
        split = g.arch.split_layer_name(name, g.mc.n_layers)
        params[name] = g.params[name] + lr.delta(g.arch.roles[split[1]].layout)
    return Transformer(g.mc, g.arch, params)


def _adapters(g: Transformer):
    n = g.mc.n_layers
    every = range(n)
    qv = [s for s in _linears(g) if any(k in s for k in ("q_proj", "v_proj", "c_attn"))]
    return {
        "medical": make_adapter(g, 1, 4, every),
        "legal": make_adapter(g, 2, 8, every, norms=True),
        "code": make_adapter(g, 3, 4, [1, 3, n - 1], names=qv),
        "science": make_adapter(g, 4, 2, range(n // 2, n), norms=True),
    }


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, built):
    """(adapter constellation, the same specialists merged dense, encoded prompts) per architecture."""
    from index_store.models import load_tokenizer, tokenize

    conf = built(request.param, domains=("medical", "legal", "code"))
    gdir = conf.parent / "models" / "generalist"
    g = load_model(gdir)
    tok = load_tokenizer(gdir)
    ads = _adapters(g)
    basis = torch.linalg.qr(torch.randn(g.mc.d, len(ads), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.float64))[0].T
    settings = Settings(top_k=3, layers="auto", signature="generalist")
    lr = Constellation(g, {d: adapter_model(g, *a) for d, a in ads.items()}, basis, settings)
    dense = Constellation(g, {d: merged_model(g, *a) for d, a in ads.items()}, basis, settings)
    ids, am = tokenize(tok, PROMPTS, 64, "cpu")
    return lr, dense, ids, am, ads


def _err(a, b, am) -> float:
    return float(((a - b).abs() * am[..., None]).max())


PARAM_MODES = [
    CompositionParams(mode="constellation"),
    CompositionParams(mode="routed"),
    CompositionParams(mode="uniform"),
    CompositionParams(mode="weights", weights={"legal": 0.7, "science": 0.3}),
    CompositionParams(mode="task_arithmetic", **{"lambda": 0.4}),
]


def test_auto_composes_every_layer_an_adapter_touches(pair):
    lr, dense, *_ = pair
    assert lr.layers == list(range(lr.n)) == dense.layers
    assert lr.first == 0 and set(lr.varied) == set(range(lr.n))
    assert lr.differences["code"].layers == [1, 3, lr.n - 1]


def test_every_mode_equals_the_dense_path_in_one_mixed_batch(pair):
    lr, dense, ids, am, _ = pair
    gl, gd = lr.generalist_pass(ids, am), dense.generalist_pass(ids, am)
    plans_l = [lr.plan(gl, b, PARAM_MODES[b]) for b in range(len(PROMPTS))]
    plans_d = [dense.plan(gd, b, PARAM_MODES[b]) for b in range(len(PROMPTS))]
    for pl, pd in zip(plans_l, plans_d):  # the same composition on both sides
        assert pl.selected == pd.selected
        assert float((pl.source_weights - pd.source_weights).abs().max()) <= 1e-5
    ref = dense.composed_logits(gd, plans_d, "materialize")
    for path in ("mix", "materialize", "batch"):
        got = lr.composed_logits(gl, plans_l, path)
        assert _err(got, ref, am) <= TOL, (path, _err(got, ref, am))
    # the composition really changes the output (the check above can fail)
    base = lr.composed_logits(gl, [lr.plan(gl, b, CompositionParams(mode="generalist"))
                                   for b in range(len(PROMPTS))], "mix")
    assert _err(base, ref, am) > 100 * TOL


def test_logit_mode_equals_the_dense_path(pair):
    lr, dense, ids, am, _ = pair
    gl, gd = lr.generalist_pass(ids, am), dense.generalist_pass(ids, am)
    p = CompositionParams(mode="logit")
    got = lr.composed_logits(gl, [lr.plan(gl, b, p) for b in range(len(PROMPTS))])
    ref = dense.composed_logits(gd, [dense.plan(gd, b, p) for b in range(len(PROMPTS))])
    assert _err(got, ref, am) <= TOL


def test_one_hot_reproduces_the_adapter_specialist(pair):
    lr, _, ids, am, ads = pair
    gp = lr.generalist_pass(ids, am)
    for k, dom in enumerate(lr.domains):
        plan = lr.plan(gp, 0, CompositionParams(mode="weights", weights={dom: 1.0}))
        s = lr.specialists[k]
        want = s.forward(ids, am)
        for path in ("mix", "materialize", "batch"):
            got = lr.composed_logits(gp, [plan] * len(PROMPTS), path)
            assert _err(got, want, am) <= TOL, (dom, path)
        # the dense reference tensors equal the merged specialist's
        merged = merged_model(lr.g, *ads[dom])
        for i in lr.varied:
            comp = materialize(lr.sources[i], plan.source_weights[i - lr.first] if plan.source_weights.dim() == 3
                               else plan.source_weights, lr.policy, lr.g.arch, lr.d, lr.lowrank[i])
            for name, t in comp.items():
                assert torch.allclose(t, merged.layer(i).t[name], atol=1e-6), (dom, i, name)


def test_adapters_are_held_once(pair):
    lr, *_ = pair
    rb = lr.resident_bytes()
    g_bytes = sum(t.numel() * t.element_size() for t in lr.g.params.values())
    assert rb["generalist"] == g_bytes
    adapters = sum(lr.differences[d].bytes for d in lr.domains)
    assert all(rb[d] == lr.differences[d].bytes for d in lr.domains)
    # the stacks pad unequal ranks per weight (here 2, 4 and 8 share weights); the specialists'
    # factors are views into the stacks, so nothing else is held
    stacks = sum(x.A.untyped_storage().nbytes() + x.Bt.untyped_storage().nbytes()
                 for st in lr.stacks.values() for x in st.values())
    factors = sum(f.nbytes for s in lr.specialists for f in s.lowrank.values())
    assert rb["adapter_padding"] == stacks - factors > 0
    assert adapters < sum(rb.values()) - rb["generalist"] <= 2.5 * adapters
    spec = lr.specialists[0]
    name, f = next(iter(spec.lowrank.items()))
    split = lr.g.arch.split_layer_name(name, lr.n)
    st = lr.stacks[split[0]][split[1]]
    assert f.A.untyped_storage().data_ptr() == st.A.untyped_storage().data_ptr()


def test_generalist_signature_is_exact_where_only_the_last_writer_differs(built):
    """With adapters only on the MLP's residual writer of one block, the in-pass signature of that
    block equals the specialist's own block run on the generalist's input, and differs between them."""
    from index_store.models import load_tokenizer, tokenize

    conf = built("llama", domains=("medical", "legal", "code"))
    gdir = conf.parent / "models" / "generalist"
    g = load_model(gdir)
    ids, am = tokenize(load_tokenizer(gdir), PROMPTS, 64, "cpu")
    writers = ["mlp.down_proj.weight"]
    layer = g.mc.n_layers - 2
    ads = {d: make_adapter(g, 10 + k, 4, [layer], names=writers, scale=2.0) for k, d in enumerate(("a", "b"))}
    basis = torch.eye(2, g.mc.d, dtype=torch.float64)
    c = Constellation(g, {d: adapter_model(g, *a) for d, a in ads.items()}, basis,
                      Settings(top_k=2, layers="auto", signature="generalist"))
    assert c.layers == [layer]
    gp = c.generalist_pass(ids, am)
    ctx = g.context(am)
    with torch.inference_mode():
        x = g.run_blocks(g.embed(ids, ctx), ctx, 0, layer)
        for k, s in enumerate(c.specialists):
            h = s.block(layer, x, ctx, s.layer(layer))
            m = am.float()[..., None]
            want = (h.abs() * m).sum(1) / m.sum(1)
            got = c.signature(gp, k)[:, 0]
            assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(c.signature(gp, 0), c.signature(gp, 1))


def test_signatures_asked_together_equal_each_asked_alone(pair):
    """The in-pass signatures of several specialists are computed in one pass over the record (one
    product with their stacked ``A``, one batched product with their ``B``): each equals the one
    computed alone, with adapters of different ranks, on different weights (``code`` has none on
    the residual writers), and with dense specialists (the merged constellation)."""
    lr, dense, ids, am, _ = pair
    for c in (lr, dense):
        gp = c.generalist_pass(ids, am)
        for ks in ([0, 1, 2], [0, 2], [2, 0, 1]):
            together = gp.record.specialists(ks)
            assert list(together) == ks
            for k in ks:
                alone = gp.record.specialists([k])[k]
                assert together[k].shape == alone.shape == (ids.shape[0], len(c.layers), c.d)
                assert torch.allclose(together[k], alone, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("how", ["in", "out", "mean"])
def test_half_precision_stacks_multiply_in_fp32_on_a_cpu(how):
    """A widened bf16 stack keeps fp32 copies for the batched products (bf16 ``bmm`` of such small
    batches is ~4x slower on a CPU): each row's delta is its adapters' fp32 products rounded once, and
    an fp32 stack has no copies."""
    from composer.lowrank import Segments, Stack, segment_weights, segmented_delta

    torch.manual_seed(0)
    lrs = [LowRank(torch.randn(r, 24) / 5, torch.randn(24, r) / 5) for r in (4, 8, 8)]  # (d = in = out)
    half = Stack.build([(1 + k, LowRank(lr.A.bfloat16(), lr.B.bfloat16())) for k, lr in enumerate(lrs)])
    full = Stack.build([(1 + k, LowRank(lr.A.bfloat16().float(), lr.B.bfloat16().float())) for k, lr in enumerate(lrs)])
    assert half.wide is None and half.widenable and not full.widenable
    half.widen()
    full.widen()  # (fp32: nothing to copy)
    every = torch.arange(3)
    assert full.wide is None and full.products(every) == (full.A, full.Bt) and full.extra_bytes == 0
    A, Bt = half.products(every)
    assert A.dtype == Bt.dtype == torch.float32 and torch.equal(A, full.A) and torch.equal(Bt, full.Bt)
    assert half.extra_bytes == 2 * (half.A.numel() * 2 + half.Bt.numel() * 2)
    weights = torch.rand(4, 4, 24)  # [B, S, d]: sources 1..3 the adapters
    x = torch.randn(4, 2, 24).bfloat16()
    for use in ([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]], [[0, 1, 1], [0, 0, 1], [0, 1, 0], [0, 0, 1]]):
        seg = Segments.build(torch.tensor(use, dtype=torch.bool))  # (the second: entry 0 unused)
        got = segmented_delta(x, half, seg, segment_weights(weights, half, seg, how), how)
        want = segmented_delta(x.float(), full, seg, segment_weights(weights, full, seg, how), how)
        assert got.dtype == torch.bfloat16 and got.abs().sum() > 0
        assert torch.equal(got, want.bfloat16())  # the same fp32 arithmetic, rounded once


@pytest.mark.parametrize("share", [0.0, 100.0])
def test_bf16_stacks_widen_only_within_their_memory_share(pair, share, monkeypatch):
    """A bf16 constellation keeps fp32 copies of its stacks only when they take at most
    ``WIDE_SHARE`` of G's bytes (``resident_bytes`` says how much); either way it composes the same
    model within bf16's tolerance."""
    import composer.constellation as cm

    lr, _, ids, am, ads = pair
    monkeypatch.setattr(cm, "WIDE_SHARE", share)
    half = lambda t: t.bfloat16() if t.is_floating_point() else t  # noqa: E731
    g = Transformer(lr.g.mc, lr.g.arch, {k: half(v) for k, v in lr.g.params.items()})
    specs = {d: adapter_model(g, {n: LowRank(half(f.A), half(f.B)) for n, f in low.items()},
                              {n: half(t) for n, t in dense.items()}) for d, (low, dense) in ads.items()}
    c = Constellation(g, specs, lr.basis.to(torch.float64), lr.settings)
    stacks = [st for by_name in c.stacks.values() for st in by_name.values()]
    rb = c.resident_bytes()
    if share:
        assert all(st.wide is not None for st in stacks)
        assert rb["adapter_fp32_copies"] == sum(2 * (st.A.numel() + st.Bt.numel()) * 2 for st in stacks)
    else:
        assert all(st.wide is None for st in stacks) and "adapter_fp32_copies" not in rb
    gp = c.generalist_pass(ids, am)
    plans = [c.plan(gp, b, CompositionParams(mode="constellation")) for b in range(len(PROMPTS))]
    got = c.composed_logits(gp, plans, "batch")
    gl = lr.generalist_pass(ids, am)
    want = lr.composed_logits(gl, [lr.plan(gl, b, CompositionParams(mode="constellation"))
                                   for b in range(len(PROMPTS))], "batch")
    scale = float((want * am[..., None]).abs().max())
    assert _err(got.float(), want, am) <= 0.05 * scale


def test_rows_adapters_fold_into_the_batched_products(pair):
    """A captured step's few-row buckets take each row's adapters folded (``composer.folded``), and so
    does an eager batch of one row: per adapted weight, both equal the batched products' (fp32) for
    every row, a padding
    row's folded factors are zero, and rows composing more sources than ``k`` do not fold."""
    from composer.batch import BatchComposition, RowWeights
    from composer.folded import FoldLayout, folded_product

    lr, _, ids, am, _ = pair
    gp = lr.generalist_pass(ids, am)
    modes = [PARAM_MODES[0], PARAM_MODES[3], PARAM_MODES[1]]
    rows = [RowWeights.of(lr.plan(gp, b, m).source_weights) for b, m in enumerate(modes)]
    assert max(r.k for r in rows) <= 3 and sum(r.k for r in rows) >= 4
    batch = BatchComposition(lr.kernel, rows)
    layout = FoldLayout.of(lr.kernel, 3)
    inputs = layout.build(batch, len(rows) + 1)  # (one padding row)
    alone = [BatchComposition(lr.kernel, [r]) for r in rows]  # (one row: its adapters folded, two products)
    torch.manual_seed(0)
    checked = 0
    for i, terms in layout.per_block(inputs).items():
        for name, (A, Bm) in terms.items():
            term = lr.kernel.blocks[i][name]
            x = torch.randn(len(rows), 1, A.shape[-1])
            y = torch.randn(len(rows), 1, Bm.shape[1])
            want = batch.params[i]._lowrank(y.clone(), x, term, name)
            got = folded_product(y, x, A[:len(rows)], Bm[:len(rows)])
            assert torch.allclose(got, want, atol=1e-5), (i, name)
            for b, one in enumerate(alone):
                mine = one.params[i]._lowrank(y[b:b + 1].clone(), x[b:b + 1], term, name)
                assert torch.allclose(mine, want[b:b + 1], atol=1e-5), (i, name, b)
            assert not torch.equal(got, y) and not A[-1].any() and not Bm[-1].any()
            checked += 1
    assert checked == len(layout.slots) > 0
    many = RowWeights.of(lr.plan(gp, 0, PARAM_MODES[2]).source_weights)  # (uniform: all four)
    assert many.k == 4 and not layout.foldable(many.k)
    with pytest.raises(ValueError):
        layout.build(BatchComposition(lr.kernel, [many]), 1)


def test_rows_multiply_by_the_whole_stack_as_the_batched_products(pair):
    """A captured step's stacked buckets (``composer.stacked``) multiply every row by every adapter
    of a weight's stack at the row's weight for it (0 where it composes none): per adapted weight,
    equal to the batched products (fp32) for rows of any number of sources, G's rows included, and
    a padding row's weights are zero."""
    from composer.batch import BatchComposition, RowWeights
    from composer.stacked import StackLayout, stacked_product

    lr, _, ids, am, _ = pair
    gp = lr.generalist_pass(ids, am)
    modes = [PARAM_MODES[0], PARAM_MODES[3], PARAM_MODES[1], PARAM_MODES[2]]
    rows = [RowWeights.of(lr.plan(gp, b % len(PROMPTS), m).source_weights) for b, m in enumerate(modes)]
    rows.append(RowWeights.of(lr.plan(gp, 0, CompositionParams(mode="generalist")).source_weights))
    assert max(r.k for r in rows) == 4 and min(r.k for r in rows) == 0
    batch = BatchComposition(lr.kernel, rows)
    layout = StackLayout.of(lr.kernel)
    inputs = layout.build(batch, len(rows) + 1)  # (one padding row)
    assert all(not W[-1].any() and not W[len(rows) - 1].any() for W in inputs)  # (padding, G's row)
    torch.manual_seed(0)
    checked, sides = 0, set()
    for i, terms in layout.per_block(inputs, layout.factors()).items():
        for name, (A, Bm, W, side) in terms.items():
            term = lr.kernel.blocks[i][name]
            x = torch.randn(len(rows), 1, A.shape[-1])
            y = torch.randn(len(rows), 1, Bm.shape[0])
            want = batch.params[i]._lowrank(y.clone(), x, term, name)
            got = stacked_product(y, x, A, Bm, W[:len(rows)], side)
            assert torch.allclose(got, want, atol=1e-5), (i, name)
            assert torch.equal(got[-1], y[-1]) and not torch.equal(got, y)  # (G's row: unchanged)
            checked, sides = checked + 1, sides | {side}
    assert checked == len(layout.stacks) > 0 and sides == {"in", "out"}
    assert layout.nbytes == sum(t.numel() * t.element_size() for st in layout.stacks.values() for t in (st.A, st.Bt))


def test_rows_of_one_adapter_each_gather_their_products_back(pair):
    """When every row of a batch uses exactly one adapter of a weight's stack (each its own), the
    batched products go back to the rows by a gather instead of ``index_add_``: each row equals the
    row composed alone, and a captured step's padding rows after the batch's stay untouched."""
    from composer.batch import BatchComposition, RowWeights

    lr, _, ids, am, _ = pair
    gp = lr.generalist_pass(ids, am)
    # (a 3-cycle: rows [1, 2, 0] in the stacks' order; science's adapters skip the first half, where
    # two rows of three use adapters and the products go back by index_add_)
    one = [CompositionParams(mode="weights", weights={d: 1.0}) for d in ("science", "medical", "legal")]
    rows = [RowWeights.of(lr.plan(gp, b, m).source_weights) for b, m in enumerate(one)]
    batch = BatchComposition(lr.kernel, rows)
    alone = [BatchComposition(lr.kernel, [r]) for r in rows]
    torch.manual_seed(1)
    gathered = scattered = 0
    for i, params in batch.params.items():
        for name, term in lr.kernel.blocks[i].items():
            if term.stack is None or params.pairs[term.pairs] is None:
                continue
            gathered += params.pairs[term.pairs][3] is not None
            scattered += params.pairs[term.pairs][3] is None
            x = torch.randn(len(rows) + 1, 1, term.stack.A.shape[-1])  # (one padding row, as captured)
            y = torch.randn(len(rows) + 1, 1, term.stack.Bt.shape[-1])
            got = params._lowrank(y.clone(), x, term, name)
            assert torch.equal(got[-1], y[-1]) and not torch.equal(got[:-1], y[:-1])
            for b, single in enumerate(alone):
                mine = single.params[i]._lowrank(y[b:b + 1].clone(), x[b:b + 1], term, name)
                assert torch.allclose(got[b:b + 1], mine, atol=1e-5), (i, name, b)
    assert gathered > 0 and scattered > 0
