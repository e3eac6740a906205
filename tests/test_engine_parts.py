"""The engine's parts on their own: slot cache and views, scheduler, sampler, detokenizer."""

import random
import threading

import pytest
import torch
import torch.nn.functional as F

from composer.modes import CompositionParams
from server.engine import Draining, Limits, QueueFull, Request, SamplingParams, SlotCache
from server.engine.detokenizer import Detokenizer
from server.engine.kv_cache import ChunkView, SlotStore
from server.engine.sampler import adjusted, logprob_entry, next_token_logprobs, sample
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


# ---- scheduler -----------------------------------------------------------------------------------
def _req(n=1):
    return Request([1, 2], SamplingParams(max_tokens=2), CompositionParams(), n=n)


def test_scheduler_queue_limits_and_fifo_admission():
    s = Scheduler(Limits(max_waiting=3), rows_needed=lambda r: r.n, capacity=4)
    with pytest.raises(ValueError, match="needs 5 batch rows"):
        s.submit(_req(5))
    reqs = [_req(1), _req(3), _req(1)]
    for r in reqs:
        s.submit(r)
    with pytest.raises(QueueFull):
        s.submit(_req())
    assert s.admit(3) == [reqs[0]]  # the 3-row request does not fit in 2: it blocks the one behind it
    reqs[1].cancelled.set()
    assert s.admit(1) == [reqs[2]]  # a cancelled request is dropped from the queue
    assert not s.waiting
    s.draining = True
    with pytest.raises(Draining):
        s.submit(_req())


def test_scheduler_budget_follows_measurements():
    s = Scheduler(Limits(prefill_chunk_min=16, prefill_chunk_max=256), rows_needed=lambda r: 1, capacity=4)
    assert s.budget(decoding=False) == 256
    assert s.budget(decoding=True) == 16  # nothing measured yet: the smallest chunk
    s.observe_decode(0.1)
    s.observe_prefill(500, 1.0)
    assert s.budget(decoding=True) == 50  # a prefill step about as long as a decode step
    s.observe_prefill(100000, 1.0)
    assert s.budget(decoding=True) == 256
    assert split_budget([30, 50, 10], 60) == [30, 30, 0]


def test_scheduler_wait_for_work_wakes_on_submit():
    s = Scheduler(Limits(), rows_needed=lambda r: 1, capacity=4)
    got = []
    t = threading.Thread(target=lambda: got.append(s.wait_for_work(lambda: False)))
    t.start()
    s.submit(_req())
    t.join(5)
    assert got == [True]


# ---- sampler ------------------------------------------------------------------------------------
def test_sampler_greedy_eos_masking_top_p_and_seeds():
    logp = F.log_softmax(torch.tensor([0.0, 3.0, 1.0, 2.9]), -1)
    greedy = SamplingParams(max_tokens=4, temperature=0)
    assert sample(logp, greedy, {1}, [0] * 5, None) == 1
    masked = SamplingParams(max_tokens=4, temperature=0, min_tokens=2)
    assert sample(logp, masked, {1}, [0], None) == 3  # EOS masked below min_tokens
    assert sample(logp, masked, {1}, [0, 0], None) == 1
    nucleus = SamplingParams(max_tokens=4, temperature=1.0, top_p=0.5)
    assert {sample(logp, nucleus, set(), [], torch.Generator().manual_seed(s)) for s in range(40)} <= {1, 3}
    hot = SamplingParams(max_tokens=4, temperature=1.0)
    draw = [sample(logp, hot, set(), [], torch.Generator().manual_seed(3)) for _ in range(3)]
    assert len(set(draw)) == 1
    e = logprob_entry(logp, 3, 2, float(logp[3]))
    assert e["logprob"] == pytest.approx(float(logp[3])) and [t for t, _ in e["top"]] == [1, 3]
    assert logprob_entry(logp, 3, None, 0.0) is None


def test_penalties_and_logit_bias_as_openai_defines_them():
    """logits[j] += bias[j] - c[j] * frequency - (c[j] > 0) * presence, over the generated tokens."""
    logp = F.log_softmax(torch.tensor([0.0, 3.0, 1.0, 2.9]), -1)
    p = SamplingParams(max_tokens=4, temperature=0, presence_penalty=0.5, frequency_penalty=0.25,
                       logit_bias={0: 1.5})
    want = logp + torch.tensor([1.5, 0, 0, 0]) - torch.tensor([0, 2 * 0.25 + 0.5, 0, 1 * 0.25 + 0.5])
    assert torch.allclose(adjusted(logp, p, [1, 3, 1]), want)
    assert sample(logp, SamplingParams(max_tokens=4, temperature=0), set(), [1, 3, 1], None) == 1
    assert sample(logp, p, set(), [1, 3, 1], None) == 3 == int(want.argmax())  # 1, twice, now below 3
    biased = SamplingParams(max_tokens=4, temperature=0, logit_bias={0: 100.0})
    assert sample(logp, biased, set(), [], None) == 0
    # with EOS masked (ignore_eos, min_tokens) the adjustments still apply, and logp is left as it was
    before = logp.clone()
    assert sample(logp, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logit_bias={0: 100.0}),
                  {1}, [], None) == 0
    assert sample(logp, SamplingParams(max_tokens=4, temperature=0, min_tokens=3, presence_penalty=2.0), {0},
                  [3], None) == 1
    assert torch.equal(logp, before)
    # a negative penalty favours repetition
    assert sample(logp, SamplingParams(max_tokens=4, temperature=0, presence_penalty=-2.0), set(), [3], None) == 3


def test_logit_mode_mixes_log_probabilities():
    g, s1, s2 = torch.randn(3, 11).unbind(0)
    got = next_token_logprobs([g, s1, s2], [None, 0.3, 0.5])
    lg, l1, l2 = (F.log_softmax(x, -1) for x in (g, s1, s2))
    assert torch.allclose(got, F.log_softmax(lg + 0.3 * (l1 - lg) + 0.5 * (l2 - lg), -1), atol=1e-6)
    assert torch.allclose(next_token_logprobs([g], [None]), lg)


# ---- detokenizer --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(built):
    from index_store.loader import load_tokenizer

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
