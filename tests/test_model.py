"""The plain functional model code against transformers' own forward, and its cache/padding."""

import torch
from transformers import AutoModelForCausalLM

from composer.model import KVCache
from composer.weights import load_model


def test_matches_transformers(mixed_constellation):
    loaded = mixed_constellation
    folders = [loaded.config.generalist.path, *loaded.config.specialists.values()]
    for folder in folders:
        ours = load_model(folder)
        hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        ids = torch.randint(0, 290, (3, 11), generator=torch.Generator().manual_seed(0))
        am = torch.ones_like(ids)
        am[1, 7:] = 0
        am[2, 9:] = 0
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=am).logits
        got = ours.forward(ids, am)
        diff = ((ref - got).abs() * am[..., None]).max().item()
        assert diff <= 1e-4, (folder, diff)


def test_qwen2_fixture_has_qkv_biases(built):
    from index_store.loader import load_constellation

    c = load_constellation(built("qwen2", domains=("medical", "legal", "code"))).constellation
    names = set(c.g.layer(0).t)
    assert {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"} <= names


def test_incremental_decode_equals_full_forward(lastL_constellation):
    g = lastL_constellation.constellation.g
    ids = torch.randint(0, 290, (2, 10), generator=torch.Generator().manual_seed(1))
    full = g.forward(ids)
    cache = KVCache()
    am = torch.ones(2, 6, dtype=torch.long)
    with torch.inference_mode():
        ctx = g.context(am, cache)
        out = [g.logits(g.final_norm(g.run_blocks(g.embed(ids[:, :6], ctx), ctx, 0, g.mc.n_layers)))]
        past = am
        for t in range(6, 10):
            step = torch.ones(2, 1, dtype=torch.long)
            ctx = g.context(step, cache, past)
            out.append(g.logits(g.final_norm(g.run_blocks(g.embed(ids[:, t:t + 1], ctx), ctx, 0, g.mc.n_layers))))
            past = torch.cat([past, step], 1)
    inc = torch.cat(out, 1)
    assert (inc - full).abs().max().item() <= 1e-4


def test_left_and_right_padding_give_the_same_logits(lastL_constellation):
    g = lastL_constellation.constellation.g
    seq = torch.randint(0, 290, (7,), generator=torch.Generator().manual_seed(2))
    alone = g.forward(seq[None])[0]
    right = torch.zeros(1, 10, dtype=torch.long)
    right[0, :7] = seq
    am_r = torch.zeros_like(right)
    am_r[0, :7] = 1
    left = torch.zeros(1, 10, dtype=torch.long)
    left[0, 3:] = seq
    am_l = torch.zeros_like(left)
    am_l[0, 3:] = 1
    assert (g.forward(right, am_r)[0, :7] - alone).abs().max() <= 1e-4
    assert (g.forward(left, am_l)[0, 3:] - alone).abs().max() <= 1e-4
