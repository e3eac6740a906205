"""The engine with a real constellation, no HTTP: chunked and batched prefill are exact, and a long
prompt goes in by chunks between the decode steps of running streams."""

import queue

import pytest
import torch

from composer.modes import CompositionParams
from server.engine import Engine, Limits, Request, SamplingParams
from server.engine.kv_cache import padded_groups

COMPS = [{"mode": "constellation"}, {"mode": "logit"}, {"mode": "generalist"},
         {"mode": "weights", "weights": {"legal": 0.5, "code": 0.5}}]


@pytest.fixture(scope="module")
def loaded(built):
    from index_store.loader import load_constellation

    # (no specialist that changes the embeddings: the library's logit mode runs such a specialist
    # whole, the engine composes its changed blocks on G's trunk)
    return load_constellation(built("llama", domains=("medical", "legal", "code", "science")))


def _library(loaded, ids: list[int], comp: dict, n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities from the library, one full forward per token."""
    c = loaded.constellation
    plan = c.plan(c.generalist_pass(torch.tensor([ids])), 0, CompositionParams.model_validate(comp))
    out, lps = [], []
    for _ in range(n):
        gp = c.generalist_pass(torch.tensor([ids + out]))
        logp = torch.log_softmax(c.composed_logits(gp, [plan])[0, -1].float(), -1)
        out.append(int(torch.argmax(logp)))
        lps.append(float(logp[out[-1]]))
    return out, lps


class Run:
    def __init__(self, loaded, **limits):
        limits = {"max_running": 8, "max_seq_len": 256, **limits}
        self.engine = Engine(loaded.constellation, loaded.tokenizer, Limits(**limits))
        self.requests: list[Request] = []
        self.engine.start()

    def submit(self, ids, comp, n_tokens, n=1):
        q: queue.Queue = queue.Queue()
        req = Request(ids, SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True, logprobs=0),
                      CompositionParams.model_validate(comp), n=n, emit=q.put)
        self.engine.submit(req)
        self.requests.append(req)
        return q

    @staticmethod
    def collect(q, n=1, timeout=120):
        toks = {i: [] for i in range(n)}
        lps = {i: [] for i in range(n)}
        done = 0
        while done < n:
            e = q.get(timeout=timeout)
            assert e.error is None, e.error
            toks[e.index] += e.token_ids
            lps[e.index] += [x["logprob"] for x in e.logprobs]
            done += e.finish_reason is not None
        return toks, lps


def _ids(loaded, words: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    vocab = "patient fever contract clause def return protein enzyme the of and".split()
    text = " ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (words,), generator=g))
    return loaded.tokenizer(text)["input_ids"]


def test_chunked_prefill_equals_the_library_in_every_mode(loaded):
    run = Run(loaded, prefill_chunk_max=7, prefill_chunk_min=3)  # a ~80-token prompt in ≥ 11 chunks
    try:
        ids = _ids(loaded, 20, 0)
        assert 50 <= len(ids) <= 110
        for comp in COMPS:
            want, want_lp = _library(loaded, ids, comp, 5)
            before = run.engine.prefill_steps
            toks, lps = Run.collect(run.submit(ids, comp, 5, n=2), n=2)
            assert toks[0] == toks[1] == want, comp
            assert lps[0] == pytest.approx(want_lp, abs=1e-4)
            assert run.engine.prefill_steps - before >= len(ids) // 7
    finally:
        run.engine.stop()
    assert run.engine.cache.used == 0


def test_signatures_are_summed_a_chunk_per_step_and_stay_exact(built):
    """A long prompt's in-pass (``generalist``) signatures are not computed in one step: each
    requested specialists' are summed together over the prompt's chunk records, here one chunk per
    step, and the plan equals the library's (whole-prompt) one."""
    from index_store.loader import load_constellation

    loaded = load_constellation(built("llama", domains=("medical", "legal", "code", "science"),
                                      signature="generalist"))
    run = Run(loaded, prefill_chunk_max=7, prefill_chunk_min=3)
    try:
        ids = _ids(loaded, 20, 1)
        want, want_lp = _library(loaded, ids, {"mode": "constellation"}, 4)
        calls, inner = [], run.engine.runner.signature_chunks

        def one_chunk(job, tokens):
            calls.append((tuple(job.sig.ks), run.engine.prefill_steps))
            return inner(job, 1)  # at least one chunk, about 1 token: one chunk per call

        run.engine.runner.signature_chunks = one_chunk
        toks, lps = Run.collect(run.submit(ids, {"mode": "constellation"}, 4))
        assert toks[0] == want and lps[0] == pytest.approx(want_lp, abs=1e-4)
        chunks = -(-len(ids) // 7)
        asked = {ks for ks, _ in calls}  # the requested specialists' signatures, computed together
        assert len(asked) == 1 and len(set(next(iter(asked)))) == loaded.constellation.settings.top_k
        assert len(calls) == chunks  # every chunk once, for all of them
        assert len({step for _, step in calls}) == len(calls)  # each in its own engine step
    finally:
        run.engine.stop()


def test_a_short_prompt_goes_through_every_phase_in_one_step(built):
    """While a stream decodes, a short prompt whose whole prefill (through G, its in-pass
    signatures, its composed tail) fits the step's budget is done in one engine step, where each
    phase used to take a step of its own (a request's first token waited three decode steps); its
    tokens are the library's."""
    from index_store.loader import load_constellation

    loaded = load_constellation(built("llama", domains=("medical", "legal", "code", "science"),
                                      signature="generalist"))
    run = Run(loaded, prefill_chunk_max=256, prefill_chunk_min=128)
    try:
        running = run.submit(_ids(loaded, 2, 3), {"mode": "generalist"}, 40)
        assert running.get(timeout=60).token_ids
        ids = _ids(loaded, 4, 4)
        want, want_lp = _library(loaded, ids, {"mode": "constellation"}, 3)
        runner, phases = run.engine.runner, []
        for name in ("generalist_chunk", "signature_chunks", "tail_batch"):
            inner = getattr(runner, name)
            setattr(runner, name, lambda *a, name=name, inner=inner: (
                phases.append((name, run.engine.prefill_steps)), inner(*a))[1])
        steps = run.engine.steps
        toks, lps = Run.collect(run.submit(ids, {"mode": "constellation"}, 3))
        assert toks[0] == want and lps[0] == pytest.approx(want_lp, abs=1e-4)
        assert {name for name, _ in phases} == {"generalist_chunk", "signature_chunks", "tail_batch"}
        assert len({step for _, step in phases}) == 1  # all in one step
        assert run.engine.steps - steps >= 2  # (and the stream decoded meanwhile)
        Run.collect(running)
    finally:
        run.engine.stop()


def test_waiting_prompts_are_prefilled_together(loaded):
    run = Run(loaded)
    try:
        prompts = [_ids(loaded, 3 + 2 * i, 10 + i) for i in range(4)]
        want = [_library(loaded, p, c, 4)[0] for p, c in zip(prompts, COMPS)]
        calls = []
        inner = run.engine.runner.generalist_chunk
        run.engine.runner.generalist_chunk = lambda batch: (
            calls.append((run.engine.prefill_steps, sorted(n for _, n in batch))), inner(batch))
        tails, inner_tails = [], run.engine.runner.tail_batch
        run.engine.runner.tail_batch = lambda batch: (
            tails.append([(id(job.request), job.comp, n) for job, n in batch]), inner_tails(batch))
        run.engine.call(lambda: None)  # the loop is up
        with run.engine.lock:  # all four wait before the engine looks
            qs = [run.submit(p, c, 4) for p, c in zip(prompts, COMPS)]
        got = [Run.collect(q)[0][0] for q in qs]
        assert got == want
        assert len({step for step, _ in calls}) == 1  # all four went through G in the same step,
        lengths = sorted(len(p) for p in prompts)  # in batches of like lengths (padding bounded)
        want_groups = [[n for _, n in g] for g in padded_groups([(None, n) for n in lengths])]
        assert [b for _, b in calls] == want_groups and sum(map(len, want_groups)) == 4
        assert len(padded_groups([(None, n) for n in [3, 5, 7, 9]])) == 1  # short ones: one batch
        # their composed tails too: the three composed prompts' rows (the logit-mode one's, a row per
        # component, G's own row made by the pass), prompts of like lengths in one batch
        assert len({r for b in tails for r, _, _ in b}) == 3 and max(len(b) for b in tails) >= 2
        assert [[n for _, n in g] for g in padded_groups([(None, n) for n in [12, 13, 14, 30, 31, 90]])] == [
            [12, 13, 14], [30, 31], [90]]
    finally:
        run.engine.stop()


def test_a_long_prompt_goes_in_between_decode_steps(loaded):
    run = Run(loaded, prefill_chunk_max=16, prefill_chunk_min=4)
    try:
        short = run.submit(_ids(loaded, 2, 1), {"mode": "generalist"}, 80)
        first = short.get(timeout=60)
        assert first.token_ids
        long_ids = _ids(loaded, 25, 2)
        assert 70 <= len(long_ids) <= 110
        steps_before = run.engine.steps
        long_q = run.submit(long_ids, {"mode": "constellation"}, 2)
        long_first = long_q.get(timeout=120)
        steps_during = run.engine.steps - steps_before
        # the running stream kept decoding while the long prompt went in by chunks
        assert steps_during >= len(long_ids) // 16 - 1
        assert long_first.token_ids == _library(loaded, long_ids, {"mode": "constellation"}, 1)[0]
        Run.collect(long_q)
        Run.collect(short)
    finally:
        run.engine.stop()


def test_prefill_stall_bench_smoke(loaded):
    import asyncio

    from bench.loopback import LoopbackServer
    from bench.prefill_stall import _scenario
    from server.app import create_app

    long_ids = _ids(loaded, 25, 3)
    limits = Limits(max_running=4, max_seq_len=256, prefill_chunk_max=16, prefill_chunk_min=4)
    with LoopbackServer(create_app(loaded, limits)) as url:
        r = asyncio.run(_scenario(url, 2, long_ids, 40))
    assert 0 < r["median_gap"] <= r["worst_gap"] and r["long_ttft"] > 0


def test_preempted_sequences_are_recomputed_and_decode_on_exactly(loaded):
    """A KV cache of 4 slabs of 128 positions: three requests (one of them logit mode, 1 + K rows) grow
    past what fits, the newest are preempted, recomputed, and still give the library's tokens."""
    run = Run(loaded, max_seq_len=128, kv_cache_tokens=512)
    try:
        comps = [{"mode": "constellation"}, {"mode": "weights", "weights": {"legal": 0.5, "code": 0.5}},
                 {"mode": "logit"}]
        prompts = [_ids(loaded, 6, 20 + k) for k in range(3)]
        n = 96 - max(len(p) for p in prompts)
        want = [_library(loaded, p, c, n) for p, c in zip(prompts, comps)]
        qs = [run.submit(p, c, n) for p, c in zip(prompts, comps)]
        for q, (toks, lps) in zip(qs, want):
            got, got_lp = Run.collect(q)
            assert got[0] == toks and got_lp[0] == pytest.approx(lps, abs=1e-4)
        assert run.engine.scheduler.preemptions > 0
        assert run.engine.cache.used == 0
    finally:
        run.engine.stop()


def test_sixty_four_sequences_decode_together_in_the_default_kv_memory(loaded):
    """The default KV cache (16 x max_seq_len positions) holds 64 sequences of a quarter of max_seq_len."""
    run = Run(loaded, max_running=256, max_seq_len=128)
    try:
        widths, inner = [], run.engine.runner.decode
        run.engine.runner.decode = lambda rows, *a: (widths.append(len(rows)), inner(rows, *a))[1]
        with run.engine.lock:  # all arrive before the engine looks
            qs = [run.submit(_ids(loaded, 3, k)[:8], {"mode": "generalist"}, 32 - 8) for k in range(64)]
        for q in qs:
            toks, _ = Run.collect(q)
            assert len(toks[0]) == 24
        assert max(widths) == 64 and run.engine.scheduler.preemptions == 0
        assert run.engine.pool.tokens == 16 * 128
    finally:
        run.engine.stop()


def test_abort_frees_a_request_wherever_it_is(loaded):
    run = Run(loaded, max_running=1)
    try:
        decoding = run.submit(_ids(loaded, 4, 3), {"mode": "constellation"}, 200)
        assert decoding.get(timeout=60).token_ids  # decoding ...
        waiting = run.submit(_ids(loaded, 4, 4), {"mode": "generalist"}, 5)  # ... so this one waits (1 row)
        run.engine.call(lambda: None)
        assert run.engine.num_waiting == 1
        run.engine.abort(run.requests[1])
        run.engine.abort(run.requests[0])
        run.engine.call(lambda: None)
        assert run.engine.num_waiting == 0 and not run.engine.running and run.engine.cache.used == 0
        assert waiting.empty()  # nothing more is sent to a request that went away
    finally:
        run.engine.stop()


def test_capacity_bench_smoke(loaded):
    """bench.capacity's two scenarios through a real server on the fixture (fewer, shorter sequences)."""
    import asyncio

    from bench.capacity import short_under_load, together
    from bench.loopback import LoopbackServer
    from server.app import create_app

    with LoopbackServer(create_app(loaded, Limits(max_seq_len=128, kv_cache_tokens=24 * 128, max_waiting=64))) as url:
        short_prompts = [f"Question {i}: why?" for i in range(24)]
        tog = asyncio.run(together(url, loaded.tokenizer, 24, 96, short_prompts))
        short = asyncio.run(short_under_load(url, 4, 60, 4))
    assert tog["decoding_together"] == 24 and tog["largest_batch"] >= 24 and tog["preemptions"] == 0
    assert tog["tokens"] == sum(96 - len(loaded.tokenizer(p)["input_ids"]) for p in short_prompts)
    assert short["idle_s"] > 0 and short["loaded_s"] > 0
    for when in ("idle", "loaded"):  # where the time went: its first token, then a token at a time
        first, per = short["first_token_s"][when], short["per_token_ms"][when]
        assert 0 < first and 0 < per and first + 3 * per / 1000 == pytest.approx(
            short[f"{when}_s"], rel=0.01, abs=0.005)


def test_attention_bench_smoke():
    from bench.attention import measure

    res = measure(1, cases={"4 x 20": [20] * 4, "3 x 10 + 1 x 70": [10, 10, 10, 70]})
    for row in res.values():
        for name in ("slot (padded)", "slabs", "slabs (ops)", "paged (pairs)", "paged (padded)"):
            assert row[name]["max_err"] < 1e-5 and row[name]["ms"] > 0
