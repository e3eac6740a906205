"""The engine's parts on their own: slot cache and views, the KV pool, scheduler, sampler, detokenizer."""

import math
import random
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from composer import decode_kernel
from composer.modes import CompositionParams
from server.engine import KVPool, Limits, Request, SamplingParams, Sequence, SlotCache
from server.engine.detokenizer import Detokenizer
from server.engine.kv_cache import ChunkView, SlotStore
from server.engine.kv_pool import NoRoom, SlabDecodeView
from server.engine.runner import ModelOutput, ModelRunner
from server.engine.sampler import Batch, logprob_entries, mix, sample
from server.engine.scheduler import Scheduler, split_budget
from server.engine.types import Row


# ---- slot cache ------------------------------------------------------------------------------------
def _fill(cache, row, value):
    for i in range(len(cache.k)):
        cache.k[i][row.slot, :, :row.length] = value
        cache.v[i][row.slot, :, :row.length] = -value


def _check(cache, rows, values):
    assert len(cache.owners) == cache.used == len(rows)
    for r, val in zip(rows, values):
        assert cache.owners[r.slot] is r
        for i in range(len(cache.k)):
            assert torch.all(cache.k[i][r.slot, :, :r.length] == val)
            assert torch.all(cache.v[i][r.slot, :, :r.length] == -val)
    dec = sorted(r.slot for r in rows if r.slot < cache.decoding)
    assert dec == list(range(cache.decoding))  # the decode region stays compact
    top = sorted(r.slot for r in rows if r.slot >= cache.decoding)
    assert top == list(range(cache.slots - cache.staged, cache.slots))


def test_slot_cache_keeps_every_rows_keys_through_stage_promote_release():
    rng = random.Random(0)
    cache = SlotCache(2, 6, 1, 8, 2, torch.float32, "cpu")
    rows, values, staged = [], [], []
    for step in range(400):
        op = rng.choice(["stage", "promote", "release", "release_all"])
        if op == "stage" and cache.free:
            r = Row(-1, None, rng.randint(1, 8))
            cache.stage(r)
            _fill(cache, r, float(step + 1))
            rows.append(r), values.append(float(step + 1)), staged.append(r)
        elif op == "promote" and staged:
            r = staged.pop(rng.randrange(len(staged)))
            cache.promote(r)
            assert r.slot < cache.decoding
        elif op == "release" and rows:
            k = rng.randrange(len(rows))
            r = rows.pop(k)
            values.pop(k)
            if r in staged:
                staged.remove(r)
            cache.release(r)
        elif op == "release_all" and rows:
            gone = rng.sample(range(len(rows)), rng.randint(1, len(rows)))
            cache.release_all([rows[k] for k in gone])
            for k in sorted(gone, reverse=True):
                if rows[k] in staged:
                    staged.remove(rows[k])
                rows.pop(k), values.pop(k)
        _check(cache, rows, values)
    with pytest.raises(RuntimeError):
        for _ in range(cache.free + 1):
            cache.stage(Row(-1, None, 1))


def test_chunk_view_writes_each_rows_tokens_and_masks_padding():
    cache = SlotCache(1, 2, 1, 10, 1, torch.float32, "cpu")
    a, b = Row(-1, None, 0), Row(-1, None, 0)
    cache.stage(a), cache.stage(b)
    view = ChunkView([SlotStore(cache, a), SlotStore(cache, b)], starts=[3, 0], lens=[2, 4])
    k = torch.arange(8, dtype=torch.float32).view(2, 1, 4, 1) + 1
    K, _ = view.update(0, k, k)
    assert cache.k[0][a.slot, 0, 3:5, 0].tolist() == [1, 2] and cache.k[0][a.slot, 0, 5, 0] == 0
    assert cache.k[0][b.slot, 0, :4, 0].tolist() == [5, 6, 7, 8]
    assert K.shape == (2, 1, 5, 1)

    class G:  # what ChunkView.context needs from the model
        class mc:
            max_positions = 100

        @staticmethod
        def positional_context(positions, mask, cache):
            return positions, mask

    pos, mask = view.context(G, "cpu")
    assert pos[0, :2].tolist() == [3, 4] and pos[1].tolist() == [0, 1, 2, 3]
    assert mask[0, 0, 1].tolist() == [True] * 5  # row a's 2nd token sees its past and itself
    assert mask[0, 0, 2].tolist() == [True, False, False, False, False]  # padding sees position 0 only
    assert mask[1, 0, 2].tolist() == [True, True, True, False, False]


# ---- KV pool ------------------------------------------------------------------------------------
def _pool(slabs=4, slab=64, max_len=64, layers=2):
    return KVPool(layers, 1, 2, max_len, slabs * slab, torch.float32, "cpu", slab_tokens=slab)


def _write(pool, row, value):
    for i in range(len(pool.k)):
        K, V = pool.kv(i, row)
        K[:, :row.length] = value
        V[:, :row.length] = -value


def _intact(pool, rows, values):
    assert pool.used == len(rows)
    for r, val in zip(rows, values):
        slab = pool.slabs[r.slab]
        assert slab.owners[r.slot] is r and r.cap == slab.cap >= r.length
        for i in range(len(pool.k)):
            K, V = pool.kv(i, r)
            assert torch.all(K[:, :r.length] == val) and torch.all(V[:, :r.length] == -val)
    for slab in pool.slabs:
        if slab is not None:  # each slab's decode region stays compact, its staged rows at the top
            slots = sorted(slab.owners)
            assert slots == list(range(slab.decoding)) + list(range(slab.slots - slab.staged, slab.slots))


def test_pool_sizes_slots_by_class_within_one_budget():
    pool = _pool()
    assert pool.classes == [16, 32, 64] and pool.tokens == 256
    assert pool.fits([16] * 16) and not pool.fits([16] * 17)  # 4 slabs of 4 slots of 16
    assert pool.fits([64, 64, 30, 30, 10, 10, 10, 10])
    assert pool.could_fit([64] * 4) and not pool.could_fit([64] * 5)
    with pytest.raises(ValueError):
        pool.class_for(65)
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        KVPool(1, 1, 2, 2048, 1024, torch.float32, "cpu")


def test_pool_keeps_every_rows_keys_through_stage_promote_grow_compact_release():
    rng = random.Random(0)
    pool = _pool()
    rows, values, staged = [], [], []
    for step in range(600):
        op = rng.choice(["stage", "stage", "promote", "grow", "release", "release_all"])
        try:
            if op == "stage":
                r = Row(length=rng.randint(1, 40))
                pool.stage(r, r.length + rng.randint(0, 8))
                _write(pool, r, float(step + 1))
                rows.append(r), values.append(float(step + 1)), staged.append(r)
            elif op == "promote" and staged:
                pool.promote(staged.pop(rng.randrange(len(staged))))
            elif op == "grow":
                dec = [r for r in rows if r not in staged]
                if dec:
                    r = rng.choice(dec)
                    new = min(64, r.length + rng.randint(1, 20))
                    pool.grow(r, new)  # (raises NoRoom before anything moves)
                    r.length = new
                    _write(pool, r, values[rows.index(r)])
            elif op == "release" and rows:
                k = rng.randrange(len(rows))
                r = rows.pop(k)
                values.pop(k)
                staged.remove(r) if r in staged else None
                pool.release(r)
            elif op == "release_all" and rows:
                gone = rng.sample(range(len(rows)), rng.randint(1, len(rows)))
                pool.release_all([rows[k] for k in gone])
                for k in sorted(gone, reverse=True):
                    staged.remove(rows[k]) if rows[k] in staged else None
                    rows.pop(k), values.pop(k)
        except NoRoom:
            assert op in ("stage", "grow")  # (the engine would preempt; here the row keeps what it had)
        _intact(pool, rows, values)
    assert pool.moves > 0


def test_pool_packs_a_class_to_free_a_slab():
    pool = _pool()
    small = [Row(length=10) for _ in range(8)]
    for k, r in enumerate(small):  # two full slabs of 16-position slots
        pool.stage(r, 16)
        pool.promote(r)
        _write(pool, r, float(k))
    for r in (small[0], small[1], small[4], small[5]):  # ... now half full each
        pool.release(r)
    left = [r for r in small if r.slab >= 0]
    big = [Row(length=60), Row(length=60)]
    for k, r in enumerate(big):
        pool.stage(r, 64)
        _write(pool, r, 100.0 + k)
    assert None not in pool.slabs
    assert pool.fits([32])  # compaction would empty a slab of 16s
    r = Row(length=20)
    pool.stage(r, 32)  # packs the 16s into one slab, takes the other
    _write(pool, r, 200.0)
    assert len({x.slab for x in left}) == 1 and r.cap == 32
    _intact(pool, left + big + [r], [float(small.index(x)) for x in left] + [100.0, 101.0, 200.0])
    with pytest.raises(NoRoom):
        pool.stage(Row(length=1), 64)


def _slab_rows(lengths, max_len, n_kv, hd, dtype=torch.float32):
    pool = KVPool(1, n_kv, hd, max_len, max_len * 6, dtype, "cpu", slab_tokens=max_len)
    rows = [Row(length=n) for n in lengths]
    for r in rows:
        pool.stage(r, r.length + 1)
        pool.promote(r)
        K, V = pool.kv(0, r)
        K[:, :r.length] = torch.randn(n_kv, r.length, hd)
        V[:, :r.length] = torch.randn(n_kv, r.length, hd)
    return pool, pool.decode_order(rows)


@pytest.mark.parametrize("hd", [4, 64])  # 64: the compiled CPU kernel (composer.decode_kernel); 4: PyTorch's ops
@pytest.mark.parametrize("lengths,segments,max_len", [((5, 12, 30, 3, 40, 17), 3, 64), ((5, 12, 3, 7, 9, 2), 1, 64),
                                                      ((5, 20, 30, 3, 40, 17), 5, 48)])
def test_slab_decode_view_equals_one_padded_attention(lengths, segments, max_len, hd):
    """(A longest sequence of 48: slabs of 48 positions, whose 32-slot class leaves 16 unused.)"""
    torch.manual_seed(0)
    pool, order = _slab_rows(lengths, max_len, 2, hd)
    assert decode_kernel.available("cpu", torch.float32, hd, 2) == (hd == 64)
    assert len({r.slab for r in order}) > 1  # the rows sit in several slabs ...
    view = SlabDecodeView(pool, order, torch.tensor([r.length for r in order]))
    assert len(view.segments) == segments  # ... read as one view per class, adjacent full slabs together
    q, k, v = torch.randn(6, 4, 1, hd), torch.randn(6, 2, 1, hd), torch.randn(6, 2, 1, hd)
    got = view.attend(0, q, k, v, 0.5)
    for b, r in enumerate(order):
        K, V = pool.kv(0, r)
        assert torch.equal(K[:, r.length], k[b, :, 0]) and torch.equal(V[:, r.length], v[b, :, 0])
        want = torch.softmax((q[b].view(2, 2, hd) @ K[:, :r.length + 1].transpose(-1, -2)) * 0.5, -1) \
            @ V[:, :r.length + 1]
        assert torch.allclose(got[b], want.reshape(4, 1, hd), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_kernel_matches_the_pytorch_path_in_half_precision(dtype, monkeypatch):
    """The kernel (9 query heads over 3 key/value heads, the demo's) against the PyTorch operators
    on the same half-precision cache: the same keys written, outputs within one rounding."""
    lengths = (5, 12, 30, 3, 40, 17, 63)
    outs, caches = [], []
    for on in (True, False):
        monkeypatch.setattr(decode_kernel, "enabled", on)
        torch.manual_seed(0)
        pool, order = _slab_rows(lengths, 64, 3, 64, dtype)
        q, k, v = (torch.randn(len(lengths), h, 1, 64).to(dtype) for h in (9, 3, 3))
        assert decode_kernel.available("cpu", dtype, 64, 3) == on
        outs.append(SlabDecodeView(pool, order, torch.tensor([r.length for r in order])).attend(0, q, k, v, 0.125))
        caches.append((pool.k[0].clone(), pool.v[0].clone()))
    assert outs[0].dtype == dtype
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert torch.allclose(outs[0].float(), outs[1].float(), atol=1e-2, rtol=1e-2)


# ---- scheduler -----------------------------------------------------------------------------------
class _Catalog:
    n, first = 4, 2
    settings = SimpleNamespace(signature="generalist")


def _req(ids=2, n=1, max_tokens=2):
    return Request(list(range(1, ids + 1)), SamplingParams(max_tokens=max_tokens), CompositionParams(), n=n)


def _sched(limits=None, pool=None, rows=lambda r: r.n):
    return Scheduler(limits or Limits(max_running=64), pool or _pool(), rows, lambda: _Catalog)


def test_scheduler_admits_by_memory_first_come_first_served():
    s = _sched()
    reqs = [_req(40), _req(60, n=4), _req(10)]  # 1 + 4 rows of 64 positions > 4 slabs of 64
    for r in reqs:
        s.add(r)
    plan = s.schedule()
    assert [j.request for j in plan.admitted] == [reqs[0]]  # the 4-row request blocks the one behind it
    assert [j.request for j, _ in plan.prefill] == [reqs[0]]
    s.prefilling.clear()
    s.pool.release_all(plan.admitted[0].rows)
    reqs[2].cancelled.set()
    plan = s.schedule()
    assert [j.request for j in plan.admitted] == [reqs[1]] and plan.dropped == [reqs[2]]
    assert len(plan.admitted[0].rows) == 4 and all(r.cap == 64 for r in plan.admitted[0].rows)
    capped = _sched(Limits(max_running=3))
    capped.add(_req(4, n=2)), capped.add(_req(4, n=2))
    assert len(capped.schedule().admitted) == 1  # 2 + 2 rows > max_running 3


def _running(s, prompt, order):
    seq = Sequence(_req(prompt), 0, [Row(length=prompt)], None, set(), None, tokens=[7], order=order,
                   catalog=_Catalog)
    s.pool.stage(seq.rows[0], prompt + 1)
    s.pool.promote(seq.rows[0])
    s.running.append(seq)
    return seq


def test_scheduler_grows_rows_and_preempts_the_newest_when_memory_runs_out():
    s = _sched(pool=_pool(slabs=2))
    seqs = [_running(s, 20, k) for k in (1, 2, 3)]  # 32-slots: two in slab 0, one in slab 1
    for seq in seqs:  # some steps later each needs a 64-slot, a whole slab: only two fit
        seq.tokens += [7] * 12
        seq.rows[0].length = 32
    plan = s.schedule()
    assert plan.preempted == [seqs[2]] and s.running == seqs[:2] and all(q.rows[0].cap == 64 for q in seqs[:2])
    assert s.waiting[0] is seqs[2] and seqs[2].rows[0].slab == -1 and s.preemptions == 1
    assert plan.rows == s.pool.decode_order([q.rows[0] for q in seqs[:2]]) and plan.tokens == [7, 7]
    plan = s.schedule()  # the preempted sequence waits for room, at the head of the queue
    assert not plan.admitted and s.waiting[0] is seqs[2]
    s.finish(seqs[0])
    plan = s.schedule()
    job = plan.admitted[0]
    assert job.resume is seqs[2] and job.ids_list == seqs[2].request.prompt_ids + [7] * 12  # all but the last
    assert job.rows[0].cap == 64 and len(job.ids_list) == 32


def test_scheduler_budget_follows_measurements():
    s = _sched(Limits(prefill_chunk_min=16, prefill_chunk_max=256))
    assert s.budget(decoding=False) == 256
    assert s.budget(decoding=True) == 16  # nothing measured yet: the smallest chunk
    s.update_from_output(ModelOutput(prefill_cost=500, prefill_seconds=1.0, decode_seconds=0.1))
    assert s.budget(decoding=True) == 50  # a prefill step about as long as a decode step
    s.update_from_output(ModelOutput(prefill_cost=100000, prefill_seconds=1.0))
    assert s.budget(decoding=True) == 256
    assert split_budget([30, 50, 10], 60) == [30, 30, 0]


def test_a_prefill_share_is_counted_in_tokens_through_g():
    """A resumed sequence's prompt runs only G's trunk (half the layers here): a share of the budget
    buys twice its size in tokens, and its last token (a share of 0.5) still runs (it used to be
    rounded down to nothing, and the engine spun on that job forever)."""
    runner = ModelRunner.__new__(ModelRunner)
    calls = []
    runner.generalist_chunk = lambda batch: calls.append([(j.T - j.done, n) for j, n in batch])
    job = SimpleNamespace(phase="generalist", T=61, done=20, g_cost=0.5, c=_Catalog)
    runner._prefill([(job, 10.0)], ModelOutput())
    job.done = 60
    runner._prefill([(job, 0.5)], ModelOutput())
    runner._prefill([(job, 0.0)], ModelOutput())
    assert calls == [[(41, 20)], [(1, 1)]]
    job.done, job.g_cost = 50, 0.0  # every layer composed: the trunk is the embeddings, costed at 0
    runner._prefill([(job, 0.0)], ModelOutput())
    assert calls[-1] == [(11, 11)]


def test_a_jobs_remaining_cost_counts_the_phases_it_has_not_reached():
    """So a job whose whole prefill fits the budget gets a share for all of it (one step)."""
    s = _sched()
    job = SimpleNamespace(phase="generalist", T=40, done=10, g_cost=1.0, c=_Catalog, mode=None, resume=None,
                          rows=[Row(), Row()], request=SimpleNamespace(n=1))
    assert s.remaining_cost(job) == pytest.approx(30 + 40 * 0.05 + 2 * 40 * 0.5)  # mode not known yet
    job.mode = SimpleNamespace(uses_signatures=False, generalist_only=True)  # G's row: no tail, no signatures
    assert s.remaining_cost(job) == pytest.approx(30 + 40 * 0.5)
    job.rows, job.request.n = [Row() for _ in range(4)], 2  # two choices of two components
    assert s.remaining_cost(job) == pytest.approx(30 + 40 * 0.5)
    # a composed tail token costs the composed layers' share of G's (2 of 4 here) until the runner
    # has timed one, then what it measured (the rows' compositions cost more than G's own layers)
    runner = ModelRunner.__new__(ModelRunner)
    runner.g_seconds_per_token, runner.tail_seconds_per_token = 0.001, None
    s.tail_fraction = runner.tail_fraction
    assert s.remaining_cost(job) == pytest.approx(30 + 40 * 0.5)
    runner.tail_seconds_per_token = 0.0008
    assert s.remaining_cost(job) == pytest.approx(30 + 40 * 0.8)


def test_a_burst_of_prompts_is_prefilled_at_once_while_few_rows_decode():
    s = _sched(Limits(max_running=64, prefill_chunk_min=8, prefill_chunk_max=256))
    s.update_from_output(ModelOutput(prefill_cost=100, prefill_seconds=1.0, decode_seconds=0.1))  # budget 10
    _running(s, 20, 1)
    s.add(_req(40))
    plan = s.schedule()  # one row waits for its first token, one decodes: the decoding row's pace
    assert [share for _, share in plan.prefill] == [10]
    plan.prefill[0][0].done = 10
    s.add(_req(40)), s.add(_req(40))
    plan = s.schedule()  # three rows wait for their first token, one decodes: all of them at once,
    assert [share for _, share in plan.prefill] == [math.inf] * 3  # each whole (inf: finish it this step)
    later = 40 * 0.05 + 40 * 0.5  # every phase counted: signatures (0.05 a token), a tail (half of G)
    # a tighter budget: first come, first served, each prompt through all its phases, so the first
    # ones give their first token this step; the last one's share is a part (its pass through G)
    assert s.shares(120)[:2] == [math.inf] * 2  # (their whole rest: 30 + later, 40 + later)
    assert s.shares(120)[2] == pytest.approx(120 - 70 - 2 * later)


def test_rows_of_the_same_burst_do_not_pace_its_last_prompts():
    s = _sched(Limits(max_running=64, prefill_chunk_min=8, prefill_chunk_max=256))
    s.update_from_output(ModelOutput(prefill_cost=100, prefill_seconds=1.0, decode_seconds=0.1))  # paced: 10
    old = _running(s, 20, 1)  # decoding before the prompt below arrived: it paces it
    s.add(_req(40))
    assert [share for _, share in s.schedule().prefill] == [10]
    s.running.remove(old)
    s.prefilling[0].request.arrival = time.perf_counter()
    time.sleep(0.001)
    new = [_running(s, 20, k) for k in (2, 3)]  # a burst's first prompts, done and decoding since
    assert all(seq.since > s.prefilling[0].request.arrival for seq in new)
    assert [share for _, share in s.schedule().prefill] == [math.inf]  # the whole budget: not paced


# ---- sampler ------------------------------------------------------------------------------------
class _Seq:
    def __init__(self, params, tokens=(), eos=(), seed=None):
        self.request = Request([1], params, CompositionParams())
        self.tokens, self.eos = list(tokens), set(eos)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)


LOGP = F.log_softmax(torch.tensor([0.0, 3.0, 1.0, 2.9]), -1)


def _one(params, tokens=(), eos=(), seed=None, logp=LOGP):
    return sample(logp[None], [_Seq(params, tokens, eos, seed)])[0]


def test_sampler_greedy_eos_masking_top_p_top_k_and_seeds():
    greedy = SamplingParams(max_tokens=4, temperature=0)
    assert _one(greedy, [0] * 5, {1}) == 1
    masked = SamplingParams(max_tokens=4, temperature=0, min_tokens=2)
    assert _one(masked, [0], {1}) == 3  # EOS masked below min_tokens
    assert _one(masked, [0, 0], {1}) == 1
    nucleus = SamplingParams(max_tokens=4, temperature=1.0, top_p=0.5)
    assert {_one(nucleus, seed=s) for s in range(40)} <= {1, 3}
    assert {_one(SamplingParams(max_tokens=4, temperature=1.0, top_k=1), seed=s) for s in range(20)} == {1}
    hot = SamplingParams(max_tokens=4, temperature=1.0)
    assert len({_one(hot, seed=3) for _ in range(3)}) == 1
    assert len({_one(hot, seed=s) for s in range(40)}) > 2
    # one batch: every row under its own parameters, as alone
    seqs = [_Seq(greedy), _Seq(nucleus, seed=5), _Seq(masked, [0], {1}), _Seq(hot, seed=9)]
    alone = [_one(s.request.params, s.tokens, s.eos, seed) for s, seed in zip(seqs, (None, 5, None, 9))]
    assert sample(LOGP.expand(4, 4), seqs) == alone
    chosen, entries = logprob_entries(LOGP.expand(3, 4), [3, 1, 0], [2, None, 0])
    assert chosen == pytest.approx([float(LOGP[3]), float(LOGP[1]), float(LOGP[0])])
    assert [t for t, _ in entries[0]["top"]] == [1, 3] and entries[1] is None and entries[2]["top"] == []


def test_penalties_and_logit_bias_as_openai_defines_them():
    """logits[j] += bias[j] - c[j] * frequency - (c[j] > 0) * presence, over the generated tokens."""
    p = SamplingParams(max_tokens=4, temperature=0, presence_penalty=0.5, frequency_penalty=0.25,
                       logit_bias={0: 1.5})
    want = LOGP + torch.tensor([1.5, 0, 0, 0]) - torch.tensor([0, 2 * 0.25 + 0.5, 0, 1 * 0.25 + 0.5])
    from server.engine.sampler import _adjust
    assert torch.allclose(_adjust(LOGP[None], [_Seq(p, [1, 3, 1])])[0], want)
    assert _one(SamplingParams(max_tokens=4, temperature=0), [1, 3, 1]) == 1
    assert _one(p, [1, 3, 1]) == 3 == int(want.argmax())  # 1, twice, now below 3
    assert _one(SamplingParams(max_tokens=4, temperature=0, logit_bias={0: 100.0})) == 0
    # with EOS masked (ignore_eos, min_tokens) the adjustments still apply, and logp is left as it was
    before = LOGP.clone()
    assert _one(SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logit_bias={0: 100.0}), eos={1}) == 0
    assert _one(SamplingParams(max_tokens=4, temperature=0, min_tokens=3, presence_penalty=2.0), [3], {0}) == 1
    assert torch.equal(LOGP, before)
    # a negative penalty favours repetition
    assert _one(SamplingParams(max_tokens=4, temperature=0, presence_penalty=-2.0), [3]) == 3


def test_rows_mix_into_each_sequences_log_probabilities():
    g, s1, s2, other = torch.randn(4, 11).unbind(0)
    lg, l1, l2, lo = (F.log_softmax(x, -1) for x in (g, s1, s2, other))
    # sequence 0: one row (row 3); sequence 1: base row 0 mixed with rows 1 and 2
    got = mix(torch.stack([g, s1, s2, other]), Batch([3, 0], [[], [(1, 0.3), (2, 0.5)]]))
    assert torch.allclose(got[0], lo)
    assert torch.allclose(got[1], F.log_softmax(lg + 0.3 * (l1 - lg) + 0.5 * (l2 - lg), -1), atol=1e-6)
    assert torch.equal(mix(torch.stack([g, s1]), Batch([0, 1], [[], []])), F.log_softmax(torch.stack([g, s1]), -1))


# ---- detokenizer --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(built):
    from index_store.models import load_tokenizer

    return load_tokenizer(built("llama", domains=("medical", "legal")).parent / "models" / "generalist")


class CountingTok:
    def __init__(self, tok):
        self.tok, self.seen = tok, 0

    def decode(self, ids, **kw):
        self.seen = max(self.seen, len(ids))
        return self.tok.decode(ids, **kw)


def test_incremental_text_equals_a_whole_decode_and_costs_a_window(tok):
    text = "The patient's fever — 39.5 °C — fell; naïve 漢字 test ✓ done. " * 6
    ids = tok(text)["input_ids"]
    # also split multi-byte characters across byte-level tokens at random
    rng = random.Random(1)
    ids += [rng.randrange(len(tok)) for _ in range(60)]
    ct = CountingTok(tok)
    d = Detokenizer(ct)
    out = "".join(d.add(t) for t in ids) + d.add(None, final=True)
    assert out == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 150 and ct.seen <= 16  # each step decodes a short window, never the whole sequence


def test_stop_strings_cut_and_hold_back(tok):
    ids = tok("alpha beta gamma delta")["input_ids"]
    d = Detokenizer(tok, stop=["gamma"])
    parts = []
    for t in ids:
        parts.append(d.add(t))
        if d.stopped:
            break
    assert "".join(parts) == "alpha beta "
    assert d.stopped and all("g" not in p for p in parts)
    d = Detokenizer(tok, stop=["a de"])  # a prefix of the stop string is held back, then released
    parts = [d.add(t) for t in tok("alpha beta")["input_ids"]]
    assert "".join(parts) == "alpha bet"
    assert d.add(None, final=True) == "a"


# ---- the heap -------------------------------------------------------------------------------------
def test_settle_freezes_what_is_alive_and_frees_what_an_earlier_settle_froze():
    import gc
    import weakref

    from server.engine import heap

    class Node:
        pass

    a = Node()
    a.me = a  # a reference cycle: only the cyclic collector frees it
    ref = weakref.ref(a)
    try:
        heap.settle("test")
        assert gc.get_freeze_count() > 0 and not any(o is a for o in gc.get_objects())
        del a  # garbage now, but frozen: full collections no longer walk it
        gc.collect()
        assert ref() is not None
        heap.settle("test again")  # unfreezes first: collected
        assert ref() is None
    finally:
        gc.unfreeze()
