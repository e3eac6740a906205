"""Decode attention over a KV cache that admits by memory: the candidates, measured side by side.

    .venv/bin/python -m bench.attention [--threads N] [--repeats R] [--json OUT]

One layer of the demo generalist's shapes (9 query heads, 3 key/value heads, head_dim 64, fp32):
one query per row against each row's keys/values, for several batches of row lengths (equal short
rows, equal longer rows, one long row among short ones, 64 rows of 512). Each candidate is checked
against a plain per-row softmax (max |Δ|) and timed (median ms per layer call):

- ``slot (padded)``: today's slot cache, one ``[rows, H_kv, max_len, hd]`` tensor per layer read as
  ``[:rows, :, :span]``: no copy, but every row attends up to the longest row's length (masked), and
  memory is ``rows x max_len`` whatever the rows hold;
- ``slabs``: ``server.engine.kv_pool`` — slots of a few capacities (16, 32, ... positions), one
  strided view per slab, the slabs' results concatenated: no copy, padding < one class per row;
  attended by the compiled CPU kernel (``composer.decode_kernel``: one call per layer, no padding
  read at all), as the engine does;
- ``slabs (ops)``: the same slabs through PyTorch's operators (``CONSTELLATION_DECODE_KERNEL=0``,
  and what runs on CUDA);
- ``paged (pairs)``: vLLM's layout (blocks of 16 positions in a shared pool, a block table per row)
  in plain PyTorch: each step gathers the rows' blocks (``index_select``), scores every (row, block)
  pair in one batched matmul and takes the softmax over each row's pairs — no padding past a block,
  but a copy of every key and value read;
- ``paged (padded)``: the same blocks gathered into ``[rows, max_blocks]`` and one masked softmax;
- ``flex_attention``: PyTorch's ``flex_attention`` with a per-row length mask over the padded
  gather (eager: it runs its reference implementation; ``torch.compile`` is issue "One captured graph").
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from composer import decode_kernel
from composer.attention import one_query_attention
from server.engine.kv_pool import KVPool, SlabDecodeView
from server.engine.types import Row

H, HKV, HD, BS = 9, 3, 64, 16
CASES = {"16 x 100": [100] * 16, "16 x 300": [300] * 16, "15 x 100 + 1 x 2000": [100] * 15 + [2000],
         "1 x 500": [500], "64 x 512": [511] * 64}


def paged_pairs(q, pool_k, pool_v, pair_block, pair_row, bias, scale):
    """Scores per (row, block) pair, softmax over each row's pairs (the row's max gathered back)."""
    B = q.shape[0]
    qg = q.reshape(B, HKV, H // HKV, HD)
    flat = lambda p: p.view(p.shape[0], -1).index_select(0, pair_block).view(-1, HKV, BS, HD)  # noqa: E731
    kp, vp = flat(pool_k), flat(pool_v)
    s = torch.matmul(qg.index_select(0, pair_row), kp.transpose(-1, -2)) * scale + bias
    m = s.amax(-1)
    row_max = m.new_full((B,) + m.shape[1:], float("-inf")).index_reduce_(0, pair_row, m, "amax")
    e = torch.exp(s - row_max.index_select(0, pair_row)[..., None])
    total = m.new_zeros(row_max.shape).index_add_(0, pair_row, e.sum(-1))
    out = qg.new_zeros(qg.shape).index_add_(0, pair_row, torch.matmul(e, vp))
    return (out / total[..., None]).reshape(B, H, 1, HD)


def _case(lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths) + 1
    keys = [torch.randn(HKV, n + 1, HD, generator=g) for n in lengths]  # (position n: the new key)
    vals = [torch.randn(HKV, n + 1, HD, generator=g) for n in lengths]
    q = torch.randn(B, H, 1, HD, generator=g)
    want = torch.stack([torch.softmax(q[b].view(HKV, H // HKV, HD) @ keys[b].transpose(-1, -2) / 8, -1) @ vals[b]
                        for b in range(B)]).reshape(B, H, 1, HD)
    return B, L, keys, vals, q, want


def candidates(lengths: list[int]):
    """name -> (callable, reference output)."""
    B, L, keys, vals, q, want = _case(lengths)
    max_len = 2048 if max(lengths) < 2048 else max(lengths) + 1
    out = {}
    # slot (padded)
    K, V = torch.zeros(B, HKV, L, HD), torch.zeros(B, HKV, L, HD)
    for b, n in enumerate(lengths):
        K[b, :, :n + 1], V[b, :, :n + 1] = keys[b], vals[b]
    mask = (torch.arange(L)[None, :] <= torch.tensor(lengths)[:, None])[:, None, None, :]
    ar, at = torch.arange(B), torch.tensor(lengths)
    kn0, vn0 = torch.stack([k[:, -1] for k in keys]), torch.stack([v[:, -1] for v in vals])

    def slot():  # (writes the new keys/values too, as every candidate does)
        K[ar, :, at], V[ar, :, at] = kn0, vn0
        return one_query_attention(q, K, V, mask, 1 / 8)

    out["slot (padded)"] = slot
    # slabs
    pool = KVPool(1, HKV, HD, max_len, 16 * max_len, torch.float32, "cpu")
    rows = [Row(length=n) for n in lengths]
    for r, k, v in zip(rows, keys, vals):
        pool.stage(r, r.length + 1)
        pool.promote(r)
        Kr, Vr = pool.kv(0, r)
        Kr[:, :r.length], Vr[:, :r.length] = k[:, :-1], v[:, :-1]
    order = pool.decode_order(rows)
    perm = [rows.index(r) for r in order]
    lens = torch.tensor([r.length for r in order])
    view = SlabDecodeView(pool, order, lens)
    kn = torch.stack([keys[b][:, -1:] for b in perm])
    vn = torch.stack([vals[b][:, -1:] for b in perm])
    inv, qp = torch.tensor(perm).argsort(), q[perm]
    out["slabs"] = lambda: view.attend(0, qp, kn, vn, 1 / 8)[inv]  # (the compiled CPU kernel where it runs)

    def slabs_ops():
        was, decode_kernel.enabled = decode_kernel.enabled, False
        try:
            return view.attend(0, qp, kn, vn, 1 / 8)[inv]
        finally:
            decode_kernel.enabled = was

    out["slabs (ops)"] = slabs_ops
    # paged
    nb = sum(n // BS + 1 for n in lengths) + 1
    pk, pv = torch.zeros(nb, HKV, BS, HD), torch.zeros(nb, HKV, BS, HD)
    ids = list(range(1, nb))
    random.Random(0).shuffle(ids)
    tables, blocks, prow, valid, k0 = [], [], [], [], 0
    for b, n in enumerate(lengths):
        used = n // BS + 1
        t = ids[k0:k0 + used]
        k0 += used
        tables.append(t)
        for j, blk in enumerate(t):
            c = min(BS, n + 1 - j * BS)
            pk[blk, :, :c], pv[blk, :, :c] = keys[b][:, j * BS:j * BS + c], vals[b][:, j * BS:j * BS + c]
            blocks.append(blk), prow.append(b), valid.append(c)
    pb, pr = torch.tensor(blocks), torch.tensor(prow)
    bias = torch.zeros(len(blocks), BS).masked_fill_(torch.arange(BS)[None] >= torch.tensor(valid)[:, None],
                                                      float("-inf"))[:, None, None, :]
    out["paged (pairs)"] = lambda: paged_pairs(q, pk, pv, pb, pr, bias, 1 / 8)
    maxb = max(len(t) for t in tables)
    tab = torch.tensor([t + [0] * (maxb - len(t)) for t in tables]).flatten()
    pmask = (torch.arange(maxb * BS)[None, :] <= torch.tensor(lengths)[:, None])[:, None, None, :]

    def gathered():
        g = lambda p: p.view(nb, -1).index_select(0, tab).view(B, maxb, HKV, BS, HD).transpose(1, 2)  # noqa: E731
        return g(pk).reshape(B, HKV, maxb * BS, HD), g(pv).reshape(B, HKV, maxb * BS, HD)

    def padded():
        kk, vv = gathered()
        return one_query_attention(q, kk, vv, pmask, 1 / 8)

    out["paged (padded)"] = padded
    try:
        from torch.nn.attention.flex_attention import flex_attention

        lt = torch.tensor(lengths)

        def flex():
            kk, vv = gathered()
            return flex_attention(q, kk, vv, score_mod=lambda s, b, h, qi, kv: torch.where(kv <= lt[b], s, -float("inf")),
                                  scale=1 / 8, enable_gqa=True)

        out["flex_attention"] = flex
    except ImportError:
        pass
    return out, want


def measure(repeats: int, cases: dict[str, list[int]] | None = None) -> dict:
    results = {}
    for case, lengths in (cases or CASES).items():
        cands, want = candidates(lengths)
        row = {}
        for name, fn in cands.items():
            try:
                err = float((fn() - want).abs().max())
                for _ in range(2):
                    fn()
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                row[name] = {"ms": statistics.median(times) * 1e3, "max_err": err}
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run here is reported
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
        results[case] = row
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per candidate (default 30)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = measure(a.repeats)
    names = list(next(iter(res.values())))
    print(f"one layer's decode attention, ms (median of {a.repeats}); {torch.get_num_threads()} threads")
    print(f"{'rows x length':22}" + "".join(f"{n:>18}" for n in names))
    for case, row in res.items():
        print(f"{case:22}" + "".join(f"{row[n]['ms']:18.3f}" if "ms" in row[n] else f"{'error':>18}" for n in names))
    worst = max(r[n]["max_err"] for r in res.values() for n in names if "max_err" in r[n])
    print(f"largest |Δ| against a per-row softmax: {worst:.2e}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
