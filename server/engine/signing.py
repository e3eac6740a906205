"""In-pass signatures of the prompts a step signs, in one pass.

A prompt in constellation mode under the ``generalist`` signature needs, once its fingerprint has
chosen its specialists, each one's signature over the prompt: ``mean_t |h_G,l + Δ_kl|`` per composed
block, summed from the records the generalist pass kept, a few chunks per step
(``composer.signatures.specialist_abs_sum``). A burst's prompts reach that phase together; their
chunks of one catalog are laid end to end (``joined``) and summed in one pass for the union of the
specialists they ask for, each prompt's sums taken apart by the tokens' prompt index (measured on the
demo, 16 chat prompts: 102-143 ms of the engine's time as one pass a prompt, 36-62 ms this way).
"""

from __future__ import annotations

import torch

from composer.signatures import joined, specialist_abs_sum


def signature_batch(batch: list[tuple[object, int]]) -> list[int]:
    """Each job's next record chunks (at least one, about ``tokens`` prompt tokens) added to its
    ``SignatureWork`` sums, every job of one catalog in one pass; returns the tokens covered per job."""
    picks: list[tuple[int, int]] = []  # per job: (chunks, tokens) taken
    for job, tokens in batch:
        w, n, covered = job.sig, 0, 0
        while w.chunk + n < len(job.records) and (covered == 0 or covered < tokens):
            covered += int(job.records[w.chunk + n][0][0].shape[1])
            n += 1
        picks.append((n, covered))
    catalogs: dict[int, list[int]] = {}
    for b, (job, _) in enumerate(batch):
        catalogs.setdefault(id(job.c), []).append(b)
    for members in catalogs.values():
        _sum_catalog([batch[b][0] for b in members], [picks[b] for b in members])
    return [n for _, n in picks]


def _sum_catalog(jobs: list, picks: list[tuple[int, int]]) -> None:
    """``jobs`` (one catalog) each take ``picks``' chunks: one pass for the union of their specialists."""
    ks = sorted({k for job in jobs for k in job.sig.ks})
    records, masks, owner = [], [], []
    for b, (job, (chunks, _)) in enumerate(zip(jobs, picks)):
        pos = job.sig.pos
        for blocks in job.records[job.sig.chunk:job.sig.chunk + chunks]:
            n = int(blocks[0][0].shape[1])
            records.append(blocks)
            masks.append(job.fmask[None, pos:pos + n])
            owner.append(b)
            pos += n
    if not records:  # (none of them had a chunk left)
        return
    total, count = specialist_abs_sum(jobs[0].c, joined(records), torch.cat(masks, 1), ks,
                                      [int(m.shape[1]) for m in masks])
    owner_t = torch.tensor(owner)
    for b, (job, (chunks, tokens)) in enumerate(zip(jobs, picks)):
        w, mine = job.sig, torch.nonzero(owner_t == b).flatten()
        t = total[[ks.index(k) for k in w.ks]].index_select(1, mine).sum(1, keepdim=True)
        n = count.index_select(0, mine).sum(0, keepdim=True)
        w.total = t if w.total is None else w.total + t
        w.count = n if w.count is None else w.count + n
        w.chunk, w.pos = w.chunk + chunks, w.pos + tokens
