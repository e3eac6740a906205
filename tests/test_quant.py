"""A quantized generalist (``[runtime].weights = int8 | int4``, ``composer.quant``) under exact
adapter composition: its matrices multiply as their dequantized form, every composition equals the
same composition over the dequantized generalist in fp32 (and a one-hot one equals PEFT's own
``PeftModel`` on that base), the index records the weights it was fingerprinted with and refuses
others, a full specialist is refused with a way out, and the quantized model is served over HTTP,
its decode step captured token for token as the eager one."""

from __future__ import annotations

import json
import queue
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from composer.modes import CompositionParams
from index_store.config import load_config
import composer.quant as cq
from composer.quant import QuantizedWeight, QuantizeError, quantize
from composer.weights import WeightsError
from index_store.store import IndexStoreError
from peft_fixtures import make_peft_adapter
from test_lowrank_server import _config as lowrank_config, fixture_adapters
from test_server import Server

PROMPTS = ["The patient fever biopsy", "The contract clause licensee", "The def return import class",
           "The protein enzyme photon"]
COMPOSITIONS = [{"mode": "generalist"}, {"mode": "constellation"}, {"mode": "routed"},
                {"mode": "weights", "weights": {"medical": 0.6, "code": 0.4}},
                {"mode": "weights", "weights": {"legal": 1.0}}]
# The quantized products take bf16 activations (composer.quant), so they differ from the fp32
# product with the same dequantized matrix by bf16 rounding of the activations (and of the product):
# measured max |d log p| over the fixtures' vocabulary at most 0.003 (int4 and int8, every path);
# stated bound:
TOL_LOGP = 0.02


# ---- the matrices ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_matrix_multiplies_as_its_dequantized_form(fmt):
    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.05
    q = quantize(w, fmt, 32)
    assert isinstance(q, QuantizedWeight) and q.shape == w.shape and q.dtype == torch.float32
    d = q.dequantize()
    # the quantization error itself: int8 per channel ~1%, int4 in groups of 32 ~8% of the matrix
    rel = float((d - w).norm() / w.norm())
    assert rel < (0.02 if fmt == "int8" else 0.12)
    x = torch.randn(3, 5, 64)
    y = q.linear(x)
    want = torch.nn.functional.linear(x.bfloat16().float(), d)
    assert y.shape == (3, 5, 96) and y.dtype == torch.float32
    assert float((y - want).norm() / want.norm()) < 5e-3  # bf16 rounding of the product
    bias = torch.randn(96)
    assert torch.allclose(q.linear(x, bias), y + bias)
    # a fused group's member is a row block of the whole
    part = q.rows(32, 48)
    assert part.shape == (48, 64) and part.nbytes == 0
    want_part = torch.nn.functional.linear(x.bfloat16().float(), w[32:80])  # the original rows, not the whole's
    assert float((part.linear(x) - want_part).norm() / want_part.norm()) < (0.02 if fmt == "int8" else 0.12)
    assert float((part.dequantize() - w[32:80]).norm() / w[32:80].norm()) < (0.02 if fmt == "int8" else 0.12)
    assert part.with_tensors(q.data.clone(), q.scales.clone()).shape == (48, 64)
    # held in ~1/4 (int8) or ~1/6 (int4 + bf16 scales and zeros) of fp32's bytes
    assert q.nbytes < w.numel() * 4 * (0.27 if fmt == "int8" else 0.17)


def test_int8_products_at_every_row_count_match_the_dequantized_matrix():
    """int8 runs three ways by rows (the packed kernel, activations split into two int8 terms on the
    integer GEMM, dequantize + GEMM): each is the dequantized matrix's product within bf16 rounding,
    also for a row with one large value (where one int8 term per row would be off by ~4 %) and an
    all-zero row."""
    torch.manual_seed(2)
    q = quantize(torch.randn(80, 96) * 0.05, "int8", dtype=torch.bfloat16)
    d = q.dequantize(torch.float64)
    for rows in (1, cq.SPLIT_ROWS - 1, cq.SPLIT_ROWS, 40, cq.DEQUANT_ROWS):
        x = (torch.randn(rows, 96) * 3).bfloat16()
        x[0, 5] = 80.0
        if rows > 1:
            x[-1] = 0
        y = q.linear(x)
        want = x.double() @ d.t()
        assert y.dtype == torch.bfloat16 and y.shape == (rows, 80)
        err = (y.double() - want).abs().amax(1) / want.abs().amax(1).clamp_min(1e-12)
        assert float(err.max()) < 8e-3, (rows, err)  # bf16 rounding of the result (2^-8 relative)
        if rows > 1:
            assert torch.equal(y[-1], torch.zeros(80, dtype=torch.bfloat16))
    # the split itself, against the packed kernel on the same bf16 activations
    x = (torch.randn(16, 96) * 3).bfloat16()
    x[3, 7] = -120.0
    split = cq._split_int8_mm(x, q.data, q.scales).double()
    packed = torch.ops.aten._weight_int8pack_mm(x, q.data, q.scales).double()
    assert float(((split - packed).abs().amax(1) / packed.abs().amax(1)).max()) < 8e-3


def test_int8_products_traced_for_any_row_count():
    """In a graph traced for a range of row counts (the captured step above the buckets), int8 takes
    the two-term integer GEMM where the whole range is ``SPLIT_ROWS`` or more and the packed kernel
    where the range straddles it (no guard splits the range): one graph per range, the eager
    product's values within bf16 rounding at every count."""
    from torch._inductor.compile_fx import compile_fx

    torch.manual_seed(3)
    q = quantize(torch.randn(80, 96) * 0.05, "int8", dtype=torch.bfloat16)
    d = q.dequantize(torch.float64)
    for lo, hi, splits in ((cq.SPLIT_ROWS + 1, 40, True), (2, 40, False)):
        graphs = []  # per graph compiled: the operators in it

        def backend(gm, inputs):
            graphs.append({str(n.target) for n in gm.graph.nodes})
            return compile_fx(gm, inputs)

        torch._dynamo.reset()
        fn = torch.compile(lambda x: q.linear(x), backend=backend, dynamic=False, fullgraph=True)
        for rows in (hi, lo, (lo + hi) // 2):
            x = (torch.randn(rows, 96) * 3).bfloat16()
            torch._dynamo.mark_dynamic(x, 0, min=lo, max=hi)
            want = x.double() @ d.t()
            y = fn(x)
            err = (y.double() - want).abs().amax(1) / want.abs().amax(1).clamp_min(1e-12)
            assert float(err.max()) < 8e-3, (lo, rows, err)
        assert len(graphs) == 1, (lo, hi)
        assert any("_int_mm" in t for t in graphs[0]) == splits, (lo, hi, graphs[0])
        assert any("_weight_int8pack_mm" in t for t in graphs[0]) != splits, (lo, hi, graphs[0])


def test_int8_embedding_rows_and_bad_groups():
    torch.manual_seed(1)
    w = torch.randn(50, 32)
    q = quantize(w, "int8")
    ids = torch.tensor([[3, 7, 3], [49, 0, 1]])
    assert torch.equal(q.embedding(ids), q.dequantize()[ids])
    with pytest.raises(QuantizeError, match="does not divide a matrix's 48 inputs.*group sizes that do: none"):
        quantize(torch.randn(16, 48), "int4", 32)
    with pytest.raises(QuantizeError, match="choose from 32, 64, 128"):
        quantize(torch.randn(16, 64), "int4", 16)
    with pytest.raises(QuantizeError, match="multiple of 16 output rows, not 8"):
        quantize(torch.randn(8, 64), "int4", 32)
    with pytest.raises(QuantizeError, match="whole int8"):
        quantize(torch.randn(16, 64), "int4", 32).embedding(ids)


# ---- a quantized constellation ------------------------------------------------------------------
def _config(root: Path, gdir: Path, specialists: dict[str, Path], probes: Path, weights: str,
            extra: str = "") -> Path:
    return lowrank_config(root, gdir, specialists, probes, f'weights = "{weights}"\n{extra}',
                          f"constellation-{weights}.toml")


@pytest.fixture(scope="module")
def quant_root(built, tmp_path_factory):
    base = built("llama", domains=("medical", "legal", "code", "science"), everywhere=("science",))
    gdir = base.parent / "models" / "generalist"
    root = tmp_path_factory.mktemp("quant_constellation")
    ads = fixture_adapters(gdir, root)
    return root, gdir, ads, base.parent / "probes.json", base.parent / "models" / "science"


@pytest.fixture(scope="module", params=["int8", "int4"])
def quant(request, quant_root):
    """(config, loaded) of the adapters over the generalist in ``int8`` / ``int4``."""
    from index_store.indexing import build_index
    from index_store.loader import load_constellation

    root, gdir, ads, probes, _ = quant_root
    conf = _config(root, gdir, ads, probes, request.param)
    build_index(conf, quiet=True)
    return conf, load_constellation(conf)


def _dequantized_reference(loaded):
    """The same constellation with its generalist's matrices dequantized to fp32 tensors."""
    from composer.constellation import Constellation
    from composer.model import Transformer

    c = loaded.constellation
    g = c.g
    ref_g = Transformer(g.mc, g.arch, {n: (t.dequantize() if isinstance(t, QuantizedWeight) else t)
                                       for n, t in g.params.items()})
    specs = {}
    for dom, s in zip(c.domains, c.specialists):  # G's tensors, the adapter's own whole tensors, its factors
        own = {n: t for n, t in s.params.items() if t is not g.params[n]}
        specs[dom] = Transformer(g.mc, g.arch, {**ref_g.params, **own}, s.lowrank)
    return Constellation(ref_g, specs, c.basis, c.settings)


def _logp(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.float(), -1)


def test_quantized_generalist_composes_as_its_dequantized_form(quant):
    conf, loaded = quant
    c = loaded.constellation
    fmt = loaded.config.runtime.weights
    assert c.g.weights_format == fmt and loaded.report["weights"]["format"] == fmt
    mats = [t for n, t in c.g.params.items() if n.endswith("proj.weight")]
    assert mats and all(isinstance(t, QuantizedWeight) and t.fmt == fmt for t in mats)
    assert isinstance(c.g.params[c.g.arch.embed], QuantizedWeight)  # the embedding / head: int8
    ref = _dequantized_reference(loaded)
    ids, am = loaded.encode(PROMPTS)
    gp, rgp = c.generalist_pass(ids, am), ref.generalist_pass(ids, am)
    real = am.bool()
    assert float((_logp(c.g.logits(gp.final)) - _logp(ref.g.logits(rgp.final)))[real].abs().max()) < TOL_LOGP
    for comp in COMPOSITIONS:
        params = CompositionParams.model_validate(comp)
        plans = [c.plan(gp, b, params) for b in range(len(PROMPTS))]
        want = _logp(ref.composed_logits(rgp, [ref.plan(rgp, b, params) for b in range(len(PROMPTS))], "materialize"))
        for path in ("batch", "mix", "materialize"):
            got = _logp(c.composed_logits(gp, plans, path))
            err = float((got - want)[real].abs().max())
            assert err < TOL_LOGP, (comp, path, err)


def test_resident_weights_shrink(quant):
    _, loaded = quant
    fmt = loaded.config.runtime.weights
    g = loaded.constellation.g
    full = sum(t.numel() * 2 for t in {id(t): t for t in g.params.values()}.values())  # as bf16
    held = loaded.report["resident_bytes"]["generalist"]
    # the fixture's matrices are tiny, so scales weigh more than on a real model (docs/precision.md)
    assert held < full * (0.62 if fmt == "int8" else 0.5)


def test_one_hot_composition_equals_peft_on_the_dequantized_base(quant, tmp_path):
    """``PeftModel`` over the dequantized generalist (saved as a model folder) and Constellation's
    one-hot composition over the quantized one agree within the bf16-activation tolerance."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    conf, loaded = quant
    c, cfg = loaded.constellation, loaded.config
    g = c.g
    folder = tmp_path / "dequantized"
    shutil.copytree(cfg.generalist.path, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    sd = {n: (t.dequantize() if isinstance(t, QuantizedWeight) else t).contiguous().clone() for n, t in g.params.items()}
    if g.mc.tie_embeddings:
        sd.pop(g.arch.lm_head, None)
    save_file(sd, str(folder / "model.safetensors"))
    ids, am = loaded.encode(PROMPTS)
    gp = c.generalist_pass(ids, am)
    for dom in ("medical", "legal", "code"):
        base = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, str(cfg.specialists[dom])).eval()
        with torch.inference_mode():
            want = _logp(peft(input_ids=ids, attention_mask=am).logits)
        plan = c.plan(gp, 0, CompositionParams(mode="weights", weights={dom: 1.0}))
        got = _logp(c.composed_logits(gp, [plan] * len(PROMPTS), "batch"))
        assert float((got - want)[am.bool()].abs().max()) < TOL_LOGP, dom


def test_the_index_records_and_checks_the_weights(quant, quant_root):
    from index_store.loader import load_constellation

    conf, loaded = quant
    fmt = loaded.config.runtime.weights
    root, gdir, ads, probes, _ = quant_root
    path = loaded.config.index_path
    assert path.name == f"index-{fmt}" and loaded.manifest["weights"]["format"] == fmt
    # the bf16 index is elsewhere and not built yet: the message says how to build it
    if fmt == "int8":
        (root / "fresh").mkdir()
        other = _config(root / "fresh", gdir, ads, probes, "int8")
        with pytest.raises(IndexStoreError, match=r"no index for the generalist's int8 weights.*"
                                                  r"constellation index build .* --weights int8"):
            load_constellation(other)
    # an index fingerprinted with other weights, at this format's path: refused, saying which
    if fmt == "int4":
        (root / "moved").mkdir()
        moved = _config(root / "moved", gdir, ads, probes, "int8")
        shutil.copytree(path, moved.parent / "index-int8")
        with pytest.raises(IndexStoreError, match=r"fingerprinted with the generalist's int4 \(groups of 32\) "
                                                  r"weights, but it is served as int8; rebuild it with "
                                                  r"`constellation index build .* --weights int8`"):
            load_constellation(moved)
        # a group size that does not divide the model's matrices: said before anything is served
        (root / "g64").mkdir()
        g64 = _config(root / "g64", gdir, ads, probes, "int4", "int4_group = 64")
        shutil.copytree(path, g64.parent / "index-int4")
        with pytest.raises(WeightsError, match=r"cannot serve it as \[runtime\].weights = int4 in groups of 64 \(\[runtime\].int4_group, "
                                               r"--int4-group\): int4 group size 64 "
                                               r"does not divide .* group sizes that do: \[32\]"):
            load_constellation(g64)


def test_full_specialist_is_refused_over_quantized_weights(quant_root):
    from index_store.models import load_models

    root, gdir, ads, probes, science = quant_root
    (root / "full").mkdir(exist_ok=True)
    conf = _config(root / "full", gdir, {**ads, "science": science}, probes, "int8")
    with pytest.raises(WeightsError, match=r"'science' .* is a full model.*served in int8.*"
                                           r"constellation specialist extract"):
        load_models(load_config(conf), torch.device("cpu"), torch.float32)


def test_saved_matrices_and_catalog_full_models_are_refused(quant, quant_root, tmp_path):
    """An adapter saving a whole linear matrix (modules_to_save) says why it cannot compose over
    quantized weights; a catalog change adding a full model to a quantized constellation is refused
    before anything is written."""
    from index_store.catalog import CatalogError, Change, apply
    from index_store.models import load_models
    from index_store.peft import AdapterError

    conf, loaded = quant
    root, gdir, ads, probes, science = quant_root
    fmt = loaded.config.runtime.weights
    saved = make_peft_adapter(gdir, tmp_path / "saves_q", seed=4, r=4, lora_alpha=8, target_modules=["v_proj"],
                              modules_to_save=["model.layers.2.self_attn.q_proj"])
    (tmp_path / "c").mkdir()
    with pytest.raises((AdapterError, WeightsError), match=rf"whole matrix .*q_proj.* {fmt} quantized"):
        load_models(load_config(_config(tmp_path / "c", gdir, {"medical": saved}, probes, fmt)), torch.device("cpu"),
                    torch.float32)
    before = Path(conf).read_text()
    texts = json.loads(Path(probes).read_text())["domains"]["science"]
    with pytest.raises(CatalogError, match=rf"full model .* served in {fmt}") as e:
        apply(conf, Change("add", "physics", science, texts))
    assert e.value.status == 422 and Path(conf).read_text() == before


# ---- served -----------------------------------------------------------------------------------------
def _greedy(engine, tok, prompt: str, comp: dict, n: int = 6) -> list[int]:
    return _greedy_together(engine, tok, [(prompt, comp)], n)[0]


def _greedy_together(engine, tok, jobs: list[tuple[str, dict]], n: int = 6) -> list[list[int]]:
    """Greedy tokens of ``jobs`` (prompt, composition) submitted at once (decoding together)."""
    from server.engine import Request, SamplingParams

    qs = []
    for prompt, comp in jobs:
        q: queue.Queue = queue.Queue()
        engine.submit(Request(tok(prompt)["input_ids"], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                              CompositionParams.model_validate(comp), emit=q.put))
        qs.append(q)
    out = []
    for q in qs:
        toks = []
        while True:
            e = q.get(timeout=300)
            assert e.error is None, e.error
            toks += e.token_ids
            if e.finish_reason:
                break
        out.append(toks)
    return out


def test_quantized_model_served_and_captured(quant):
    """Over HTTP with the openai client; then the decode step captured (inductor lowers the packed
    int8/int4 products) gives the eager step's tokens, across compositions without recompiling; so
    does the graph for any row count above the bucket (``above``), at 2 to 4 rows together (int8: from 8
    rows the two-term integer GEMM, which that graph takes only where its whole range is 8 or more:
    here the packed kernel; ``test_int8_products_traced_for_any_row_count`` traces the split)."""
    from torch._dynamo.utils import counters

    conf, loaded = quant
    srv = Server(loaded)
    try:
        client = srv.client()
        eager = {}
        for comp in COMPOSITIONS[:3]:
            r = client.completions.create(model="constellation", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True, "composition": comp})
            assert r.usage.completion_tokens == 6
            eager[json.dumps(comp)] = _greedy(srv.engine, loaded.tokenizer, PROMPTS[1], comp)
        eager[json.dumps(COMPOSITIONS[3])] = _greedy(srv.engine, loaded.tokenizer, PROMPTS[1], COMPOSITIONS[3])
        together = [(PROMPTS[i % 4], COMPOSITIONS[i % 5]) for i in range(6)]
        eager_together = _greedy_together(srv.engine, loaded.tokenizer, together)
        srv.engine.capture([1], background=False, above=4)
        assert srv.engine.graph_status()["error"] is None and srv.engine.graph_status()["ready"].keys() == {"1", "2-4"}
        assert _greedy_together(srv.engine, loaded.tokenizer, together) == eager_together
        assert srv.engine.runner.graphs.dynamic_steps > 0
        before = counters["stats"]["unique_graphs"]
        steps = srv.engine.runner.captured_steps
        for comp in COMPOSITIONS[:3]:
            assert _greedy(srv.engine, loaded.tokenizer, PROMPTS[1], comp) == eager[json.dumps(comp)], comp
        assert srv.engine.runner.captured_steps > steps and srv.engine.runner.graphs.unguarded_steps > 0
        srv.engine.runner.graphs.check_guards = True  # (counted with dynamo's guards evaluated)
        comp = COMPOSITIONS[3]  # (a composition the graph has not run yet)
        assert _greedy(srv.engine, loaded.tokenizer, PROMPTS[1], comp) == eager[json.dumps(comp)]
        assert counters["stats"]["unique_graphs"] == before
    finally:
        srv.stop()


def test_weights_options_and_config():
    """``--weights`` / ``--int4-group`` on serve, index build and eval; the config key and its bounds."""
    from pydantic import ValidationError

    from index_store.config import RuntimeConfig
    from server.cli_parser import parser

    p = parser()
    a = p.parse_args(["serve", "--weights", "int4", "--int4-group", "64"])
    assert (a.weights, a.int4_group) == ("int4", 64)
    assert p.parse_args(["index", "build", "c.toml", "--weights", "int8"]).weights == "int8"
    assert p.parse_args(["eval", "--probes", "p.json", "--out", "o", "--weights", "int4"]).weights == "int4"
    assert p.parse_args(["serve"]).weights is None  # the config's
    for bad in (["--weights", "int3"], ["--int4-group", "16"]):
        with pytest.raises(SystemExit):
            p.parse_args(["serve", *bad])
    assert RuntimeConfig().weights == "bf16" and RuntimeConfig().int4_group == 32
    with pytest.raises(ValidationError, match="weights"):
        RuntimeConfig(weights="fp8")


def test_bench_quant_quality_smoke(quant, quant_root, tmp_path):
    """``python -m bench.quant_quality``: the generalist's loss, retrieval and alpha movement per format."""
    from bench.quant_quality import main
    from index_store.indexing import build_index

    conf, loaded = quant
    if loaded.config.runtime.weights != "int8":
        pytest.skip("one format is enough for the smoke")
    build_index(load_config(conf).with_weights("bf16"), quiet=True)
    out = tmp_path / "q.json"
    assert main(["--config", str(conf), "--probes", str(quant_root[3]), "--formats", "int8", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["weights"] for r in rows] == ["bf16", "int8"]
    assert rows[1]["resident_mib"] < rows[0]["resident_mib"] and abs(rows[1]["nll_vs_bf16"]) < 0.1
    assert 0 <= rows[1]["alpha_diff_mean"] <= rows[1]["alpha_diff_max"] < 0.1
