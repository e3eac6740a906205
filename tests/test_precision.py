"""Half precision on the CPU against the fp32 reference, and the fused q/k/v, gate/up layout.

What runs on a GPU node in bf16 runs here too: the generalist pass, every composition mode through
both run paths (materialize, mix) in mixed batches with dense and low-rank specialists, the logit
mode, the signatures and the KV-cached decode, each compared with the same computation in fp32 on the
same plans. Tolerances are the largest |Δ log-prob| against fp32 over every real token and
vocabulary entry, on the fixtures' 6-layer d=32 random models (logits below ~1 in magnitude), about
3x the worst case measured when they were set: bf16 0.0035, fp16 0.0004 (bf16 keeps 8 significant
bits, fp16 11). Every check is paired with one showing the composition moves the output by more
than 3x the tolerance. docs/precision.md has the demo's figures and the rule ``runtime.dtype =
"auto"`` follows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from composer.arch import GATE_UP, QKV
from composer.constellation import Constellation, Settings
from composer.lowrank import LowRank
from composer.linear import fused_base, matmul_kernels
from composer.model import KVCache, Transformer
from composer.modes import CompositionParams
from composer.weights import load_model
from index_store.config import load_config
from index_store.loader import load_constellation
from index_store.models import load_tokenizer, pick_dtype, tokenize
from test_lowrank import PROMPTS  # the same five prompts, one per fixture domain

BF16_LOGPROB_TOL = 0.01
FP16_LOGPROB_TOL = 0.0015
LOGPROB_TOL = {torch.bfloat16: BF16_LOGPROB_TOL, torch.float16: FP16_LOGPROB_TOL}
# signatures (mean |h| per node): max |Δ| relative to the row's largest entry (measured: bf16 0.005, fp16 0.001)
SIGNATURE_RTOL = {torch.bfloat16: 0.02, torch.float16: 0.003}
# |Δ alpha| (cosines with the basis): the fingerprint is a mean over tokens in fp32 of half activations
ALPHA_TOL = {torch.bfloat16: 0.01, torch.float16: 0.002}
# fused vs separate projections in fp32: the same dot products, only blocked differently by the BLAS
FUSED_TOL = 1e-5
HALF = [torch.bfloat16, torch.float16]

# one mixed batch: every row its own mode (and composition)
MODES = [
    CompositionParams(mode="constellation"),
    CompositionParams(mode="task_arithmetic"),
    CompositionParams(mode="uniform"),
    CompositionParams(mode="routed"),
    CompositionParams(mode="weights", weights={"legal": 0.7, "code": 0.3}),
]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _load(conf, dtype: torch.dtype):
    cfg = load_config(conf)
    runtime = cfg.runtime.model_copy(update={"dtype": _name(dtype)})
    return load_constellation(cfg.model_copy(update={"runtime": runtime}))


def _dlogp(got: torch.Tensor, ref: torch.Tensor, am: torch.Tensor) -> float:
    """Max |Δ log-prob| over real tokens (``got``/``ref`` logits or log-probs ``[B, T, V]``)."""
    d = F.log_softmax(got.float(), -1) - F.log_softmax(ref.float(), -1)
    return float((d.abs() * am[..., None]).max())


def _cast(g: Transformer, dtype: torch.dtype) -> Transformer:
    return Transformer(g.mc, g.arch, {k: v.to(dtype) for k, v in g.params.items()}).fuse()


# ---- the fused layout -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_layout_equals_separate_projections(built, arch):
    gdir = built(arch, domains=("medical", "legal", "code")).parent / "models" / "generalist"
    sep, fused = load_model(gdir), load_model(gdir).fuse()
    for i in range(fused.mc.n_layers):
        layer = fused.layer(i)
        assert set(layer.fused) == {QKV, GATE_UP} and not sep.layer(i).fused
        for modules in (QKV, GATE_UP):
            w, b = layer.fused[modules]
            assert all(layer.t[m + ".weight"]._base is w for m in modules)  # the HF names are views
            assert (b is not None) == (arch == "qwen2" and modules == QKV)  # Qwen2: q/k/v biases
            for m in modules:
                assert torch.equal(layer.t[m + ".weight"], sep.layer(i).t[m + ".weight"])
    # stored once: the views cover the fused storage exactly
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in fused.params.values()}
    assert sum(storages.values()) == sum(t.numel() * t.element_size() for t in sep.params.values())
    ids = torch.randint(0, 290, (3, 9), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    assert float(((fused.forward(ids, am) - sep.forward(ids, am)).abs() * am[..., None]).max()) <= FUSED_TOL
    # incremental decode through the cache, too
    with torch.inference_mode():
        outs = []
        for m in (sep, fused):
            cache = KVCache()
            ctx = m.context(am[:, :6], cache)
            m.run_blocks(m.embed(ids[:, :6], ctx), ctx, 0, m.mc.n_layers)
            ctx = m.context(am[:, 6:7], cache, am[:, :6])
            outs.append(m.logits(m.final_norm(m.run_blocks(m.embed(ids[:, 6:7], ctx), ctx, 0, m.mc.n_layers))))
    assert float((outs[0] - outs[1]).abs().max()) <= FUSED_TOL


def test_models_sharing_the_fused_tensors_reuse_them_with_their_own_updates(built):
    gdir = built("llama", domains=("medical", "legal", "code")).parent / "models" / "generalist"
    sep, g = load_model(gdir), load_model(gdir).fuse()
    gen = torch.Generator().manual_seed(3)
    name = g.arch.layer_name(2, "self_attn.k_proj.weight")
    lr = {name: LowRank(torch.randn(4, g.mc.d, generator=gen) * 0.2, torch.randn(g.params[name].shape[0], 4,
                                                                                   generator=gen) * 0.2)}
    adapter = Transformer(g.mc, g.arch, dict(g.params), lr)  # an adapter specialist: G's tensors + factors
    assert adapter.layer(2).fused[QKV][0] is g.layer(2).fused[QKV][0]  # no copy
    want = Transformer(sep.mc, sep.arch, dict(sep.params), lr)
    ids = torch.randint(0, 290, (2, 7), generator=gen)
    assert float((adapter.forward(ids) - want.forward(ids)).abs().max()) <= FUSED_TOL
    assert float((adapter.forward(ids) - g.forward(ids)).abs().max()) > 100 * FUSED_TOL  # the update applies
    # a specialist whose own q_proj differs keeps that layer's projections separate (no copy of G's k, v)
    params = dict(g.params)
    q = g.arch.layer_name(2, "self_attn.q_proj.weight")
    params[q] = g.params[q] * 1.1
    s = Transformer(g.mc, g.arch, params)
    assert QKV not in s.layer(2).fused and GATE_UP in s.layer(2).fused and QKV in s.layer(1).fused
    assert fused_base([params[g.arch.layer_name(2, m + ".weight")] for m in QKV]) is None


# ---- composition in half precision -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_dense_specialists_compose_in_half_precision(mixed_constellation, dtype):
    """Every mode in one mixed batch, both run paths and the logit mode, against fp32 on the same plans."""
    ref = mixed_constellation.constellation
    half = _load(mixed_constellation.config.source, dtype).constellation
    assert half.g.dtype == dtype and half.g.residual_dtype == torch.float32
    ids, am = mixed_constellation.encode(PROMPTS)
    gp32, gp = ref.generalist_pass(ids, am), half.generalist_pass(ids, am)
    assert gp.trunk.dtype == torch.float32 and gp.final.dtype == dtype
    assert float((gp.alpha - gp32.alpha).abs().max()) <= ALPHA_TOL[dtype]
    plans = [ref.plan(gp32, b, MODES[b]) for b in range(len(PROMPTS))]
    want = ref.composed_logits(gp32, plans, "materialize")
    tol = LOGPROB_TOL[dtype]
    for path in ("materialize", "mix", "batch"):
        got = half.composed_logits(gp, plans, path)
        assert got.dtype == torch.float32
        assert _dlogp(got, want, am) <= tol, (path, _dlogp(got, want, am))
    # the compositions move the output far more than the tolerance (so the check above can fail)
    base = ref.composed_logits(gp32, [ref.plan(gp32, b, CompositionParams(mode="generalist"))
                                      for b in range(len(PROMPTS))], "mix")
    assert _dlogp(base, want, am) > 3 * tol
    # the trunk signature (specialists' own blocks on the half trunk) and the logit mode
    for i in range(len(ref.domains)):
        s32, s = ref.signature(gp32, i), half.signature(gp, i)
        assert float(((s - s32).abs() / s32.abs().amax(-1, keepdim=True)).max()) <= SIGNATURE_RTOL[dtype]
    lplans = [ref.plan(gp32, b, CompositionParams(mode="logit")) for b in range(len(PROMPTS))]
    got = half.composed_logits(gp, lplans)
    assert _dlogp(got, ref.composed_logits(gp32, lplans), am) <= tol


def _adapter_factors(g: Transformer, scale: float) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Seeded fp32 adapter factors per domain, of unequal ranks and layer sets; ``scale``: ``||B A||``
    relative to ``||W||``, roughly."""
    gen = torch.Generator().manual_seed(7)
    linears = [s for s, r in g.arch.roles.items() if r.role in ("read", "write")]
    plan = {"medical": (4, range(g.mc.n_layers), linears), "legal": (8, range(g.mc.n_layers), linears),
            "code": (2, [1, g.mc.n_layers - 1], linears[:3]), "science": (4, range(3, g.mc.n_layers), linears)}
    factors = {}
    for dom, (rank, layers, names) in plan.items():
        factors[dom] = {}
        for i in layers:
            for s in names:
                w = g.params[g.arch.layer_name(i, s)]
                out_f, in_f = (w.shape[1], w.shape[0]) if g.arch.roles[s].layout == "conv1d" else w.shape
                factors[dom][g.arch.layer_name(i, s)] = (
                    torch.randn(rank, in_f, generator=gen) / in_f ** 0.5,
                    torch.randn(out_f, rank, generator=gen) * scale * float(w.std()) / rank ** 0.5)
    return factors


def _adapter_constellation(g: Transformer, factors, dtype: torch.dtype) -> Constellation:
    """Adapter specialists on ``g`` (its tensors shared), factors rounded to ``dtype``."""
    specs = {dom: Transformer(g.mc, g.arch, dict(g.params), {n: LowRank(A.to(dtype), B.to(dtype))
                                                            for n, (A, B) in f.items()})
             for dom, f in factors.items()}
    basis = torch.linalg.qr(torch.randn(g.mc.d, len(specs), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.float64))[0].T
    return Constellation(g, specs, basis, Settings(top_k=3, layers="auto", signature="generalist"))


def test_composed_blocks_run_the_fused_projections_exactly(built):
    """Adapters keep G's fused matrices in the composed blocks (one matmul for q/k/v, one for gate/up,
    the input factor applied once); the result equals the separate projections' in fp32."""
    gdir = built("qwen2", domains=("medical", "legal", "code")).parent / "models" / "generalist"
    sep, g = load_model(gdir), load_model(gdir).fuse()
    factors = _adapter_factors(g, 3.0)
    fused, ref = _adapter_constellation(g, factors, torch.float32), _adapter_constellation(sep, factors, torch.float32)
    ids, am = tokenize(load_tokenizer(gdir), PROMPTS, 64, "cpu")
    gp, gp_ref = fused.generalist_pass(ids, am), ref.generalist_pass(ids, am)
    plans = [fused.plan(gp, b, MODES[b]) for b in range(len(PROMPTS))]
    assert all(QKV in p.fused and GATE_UP in p.fused for p in fused.mixed(plans).values())
    assert all(QKV in p.fused for p in fused.materialized(plans[0]).values())
    for path in ("mix", "materialize", "batch"):
        got, want = fused.composed_logits(gp, plans, path), ref.composed_logits(gp_ref, plans, path)
        assert float(((got - want).abs() * am[..., None]).max()) <= FUSED_TOL, path


@pytest.mark.parametrize("dtype", HALF, ids=_name)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_low_rank_specialists_compose_in_half_precision(built, arch, dtype):
    """Adapters on every layer: the segmented kernel (mix), the folded adapter (materialize), the in-pass
    signatures and a one-hot composition against fp32."""
    conf = built(arch, domains=("medical", "legal", "code"))
    gdir = conf.parent / "models" / "generalist"
    g = load_model(gdir).fuse()
    # the fixture GPT-2's random blocks barely move its logits: larger updates make compositions visible
    factors = _adapter_factors(g, {"llama": 3.0, "gpt2": 20.0}[arch])
    ref = _adapter_constellation(g, factors, torch.float32)
    half = _adapter_constellation(_cast(g, dtype), factors, dtype)
    ids, am = tokenize(load_tokenizer(gdir), PROMPTS, 64, "cpu")
    gp32, gp = ref.generalist_pass(ids, am), half.generalist_pass(ids, am)
    modes = MODES[:4] + [CompositionParams(mode="weights", weights={"legal": 0.6, "science": 0.4})]
    plans = [ref.plan(gp32, b, modes[b]) for b in range(len(PROMPTS))]
    want = ref.composed_logits(gp32, plans, "materialize")
    tol = LOGPROB_TOL[dtype]
    for path in ("mix", "materialize", "batch"):
        assert _dlogp(half.composed_logits(gp, plans, path), want, am) <= tol, path
    base = ref.composed_logits(gp32, [ref.plan(gp32, b, CompositionParams(mode="generalist"))
                                      for b in range(len(PROMPTS))], "mix")
    assert _dlogp(base, want, am) > 3 * tol
    for k in range(len(ref.domains)):  # in-pass signatures [B, Lc, d]
        s32, s = ref.signature(gp32, k), half.signature(gp, k)
        assert float(((s - s32).abs() / s32.abs().amax(-1, keepdim=True)).max()) <= SIGNATURE_RTOL[dtype]
    # one adapter alone, composed in half, is that specialist run in half
    one = ref.plan(gp32, 0, CompositionParams(mode="weights", weights={"legal": 1.0}))
    k = half.domains.index("legal")
    got = half.composed_logits(gp, [one] * len(PROMPTS), "mix")
    assert _dlogp(got, half.specialists[k].forward(ids, am), am) <= tol
    assert _dlogp(got, ref.specialists[k].forward(ids, am), am) <= tol


# ---- decoding in half precision ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_cached_decode_in_half_precision(lastL_constellation, dtype):
    """Prefill then 1-row and 3-row decode steps through a half KV cache, against fp32's full forward;
    1-2 row bf16 steps run on ATen's kernels (oneDNN off inside, restored after)."""
    g32 = lastL_constellation.constellation.g
    g = _cast(g32, dtype)
    ids = torch.randint(0, 290, (3, 10), generator=torch.Generator().manual_seed(1))
    want = g32.forward(ids)
    tol = LOGPROB_TOL[dtype]
    for rows in (1, 3):
        cache = KVCache()
        with torch.inference_mode():
            am = torch.ones(rows, 6, dtype=torch.long)
            ctx = g.context(am, cache)
            out = [g.logits(g.final_norm(g.run_blocks(g.embed(ids[:rows, :6], ctx), ctx, 0, g.mc.n_layers)))]
            for t in range(6, 10):
                step = torch.ones(rows, 1, dtype=torch.long)
                ctx = g.context(step, cache, am)
                out.append(g.logits(g.final_norm(g.run_blocks(g.embed(ids[:rows, t:t + 1], ctx), ctx, 0,
                                                              g.mc.n_layers))))
                am = torch.cat([am, step], 1)
        assert cache.k[0].dtype == dtype
        assert _dlogp(torch.cat(out, 1), want[:rows], torch.ones(rows, 10)) <= tol
    assert torch.backends.mkldnn.enabled
    with matmul_kernels(1, torch.bfloat16, torch.device("cpu")):
        assert not torch.backends.mkldnn.enabled
    with matmul_kernels(3, torch.bfloat16, torch.device("cpu")):
        assert torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled


def test_auto_dtype_follows_the_measured_rule(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_dtype("auto", cuda) == torch.bfloat16
    assert pick_dtype("float32", cpu) == torch.float32 and pick_dtype("float16", cpu) == torch.float16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert pick_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert pick_dtype("auto", cpu) == torch.float32  # no native bf16: emulated bf16 matmuls are slower


def test_bench_kernels_quick_smoke(built, capsys):
    from bench.kernels import CANDIDATES, main

    gdir = built("llama", domains=("medical", "legal", "code")).parent / "models" / "generalist"
    threads = torch.get_num_threads()
    try:
        res = main(["--quick", "--threads", "1", "--model", str(gdir)])
    finally:
        torch.set_num_threads(threads)
    rows = {(r["candidate"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {(c.name, b) for c in CANDIDATES for b in (1, 2)}
    assert rows["fp32", 1]["max_dlogp"] == 0 and rows["fp32", 2]["top1"] == 1.0
    assert all(r["step_ms"] > 0 and r["max_dlogp"] < 0.1 for r in rows.values())
    assert set(res["chosen"]) == {1, 2}
    out = capsys.readouterr().out
    assert "| candidate | B | step ms |" in out and "fastest within tolerance" in out
