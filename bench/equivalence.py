"""Measure the exactness figures of the composition core on fixture constellations.

    .venv/bin/python -m bench.equivalence

Prints, per architecture and broadcast policy: max |logit| difference between the materialize and
mix paths (4 prompts, 4 different modes in one mixed batch), one-hot weights vs the specialist,
(its last L blocks on G's trunk, under G's final norm and head), and our model code vs transformers' forward.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from composer.constellation import Constellation
from composer.modes import CompositionParams
from composer.policies import POLICIES
from index_store.indexing import build_index
from index_store.loader import load_constellation
from tests import fixtures

PROMPTS = ["The patient fever biopsy dose tumor renal.", "The contract clause licensee warranty court.",
           "The def return import class lambda.", "The protein enzyme photon."]


def main() -> None:
    from transformers import AutoModelForCausalLM

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("llama", "qwen2", "gpt2"):
            conf = fixtures.build_constellation(Path(tmp) / arch, arch=arch,
                                                domains=("medical", "legal", "code", "science"),
                                                everywhere=("code", "science"))
            build_index(conf, quiet=True)
            loaded = load_constellation(conf)
            base = loaded.constellation
            ids, am = loaded.encode(PROMPTS)
            hf = AutoModelForCausalLM.from_pretrained(str(loaded.config.generalist.path)).eval()
            with torch.no_grad():
                hf_diff = ((hf(input_ids=ids, attention_mask=am).logits - base.g.forward(ids, am)).abs()
                           * am[..., None]).max().item()
            for policy in sorted(POLICIES):
                c = Constellation(base.g, dict(zip(base.domains, base.specialists)), base.basis,
                                  replace(base.settings, policy=policy), base.differences)
                gp = c.generalist_pass(ids, am)
                plans = [c.plan(gp, b, CompositionParams(mode=m)) for b, m in
                         enumerate(["constellation", "task_arithmetic", "uniform", "routed"])]
                mm = ((c.composed_logits(gp, plans, "materialize") - c.composed_logits(gp, plans, "mix")).abs()
                      * am[..., None]).max().item()
                onehot = 0.0
                for k, dom in enumerate(c.domains):
                    p = c.plan(gp, 0, CompositionParams(mode="weights", weights={dom: 1.0}))
                    got = c.composed_logits(gp, [p] * len(PROMPTS), "mix")
                    s = c.specialists[k]
                    with torch.inference_mode():
                        want = c.g.logits(c.g.final_norm(s.run_blocks(gp.trunk, gp.ctx.with_cache(None), c.first, c.n)))
                    onehot = max(onehot, ((got - want).abs() * am[..., None]).max().item())
                rows.append((arch, policy, mm, onehot, hf_diff))
    print(f"{'arch':6} {'policy':8} {'materialize vs mix':>19} {'one-hot vs specialist':>22} {'ours vs HF':>11}")
    for r in rows:
        print(f"{r[0]:6} {r[1]:8} {r[2]:19.2e} {r[3]:22.2e} {r[4]:11.2e}")


if __name__ == "__main__":
    main()
