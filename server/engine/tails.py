"""Prompt tails: the composed blocks over a prompt's kept trunk state, several prompts in one batch.

A prefill job's last phase runs, for each component (row) of its plan, the composed blocks
(``c.first .. c.n``) over the trunk state the generalist pass kept, into that row's slot. Every row has
its own composition, and ``composer.batch`` computes any mix of compositions in one call — as decode
steps do — so the tails of all the jobs a step serves run as one padded batch: the specialists'
weights are read once per step, not once per prompt (measured on the demo, 2 cores: a prompt's tail
alone took 14–26 ms whatever its length, most of it reading the composed layers' weights).
"""

from __future__ import annotations

import torch

from .kv_cache import ChunkView, SlotStore
from .kv_pool import KVPool


def tail_batch(pool: KVPool, items: list[tuple[object, int]]) -> None:
    """The next ``n`` prompt tokens of each job's current component through its composed blocks, in
    one padded batch (the jobs share one catalog). A component whose tail completes gets its
    last-token logits (unless the job resumes a sequence) and the job moves to its next component."""
    c, g = items[0][0].c, items[0][0].c.g
    rows, starts, lens = [], [], []
    for job, n in items:
        row = job.rows[job.comp]
        if job.tail_done == 0:
            if job.comp > 0:  # the layers before the composed ones are the generalist pass's, in row 0
                pool.copy(job.rows[0], row, job.T, range(c.first))
            row.length = job.T
        rows.append(row)
        starts.append(job.tail_done)
        lens.append(min(n, job.T - job.tail_done))
    first = items[0][0].trunk[0]
    x = first.new_zeros((len(items), max(lens), first.shape[-1]))
    for b, ((job, _), s, n) in enumerate(zip(items, starts, lens)):
        x[b, :n] = job.trunk[0][0, s:s + n]
    view = ChunkView([SlotStore(pool, row) for row in rows], starts, lens)
    y = g.run_blocks(x, view.context(g, g.device), c.first, c.n, c.batched([row.comp for row in rows]))
    logits = {}  # batch index: last-token logits of a component whose tail completes (not a resumed job's)
    if last := [b for b, ((job, _), s, n) in enumerate(zip(items, starts, lens))
                if s + n == job.T and job.resume is None]:
        idx = torch.tensor(last, device=y.device)
        pos = torch.tensor([lens[b] - 1 for b in last], device=y.device)
        logits = dict(zip(last, g.logits(g.final_norm(y[idx, pos][:, None]))[:, 0].float().cpu()))
    for b, ((job, _), s, n) in enumerate(zip(items, starts, lens)):
        job.tail_done = s + n
        if job.tail_done == job.T:
            if b in logits:
                job.logits.append(logits[b])
            job.comp += 1
            job.tail_done = 0
