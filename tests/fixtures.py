"""Tiny random-weight constellations built from configs, saved as real HF folders (safetensors).

Each fixture has a generalist and specialists derived from it: some differ from the generalist
only in the last L decoder layers, some differ everywhere. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LAYERS = 6
L = 2
D = 32

DOMAIN_WORDS = {
    "medical": "patient diagnosis fever cough lesion biopsy dose tumor renal cardiac symptom clinic",
    "legal": "contract clause licensee warranty liability court statute tort plaintiff breach",
    "code": "def return import class lambda yield tuple integer string loop parser compile",
    "science": "protein enzyme photon electron molecule membrane quantum catalyst genome cell",
    "general": "today weather family garden music travel dinner morning friend story city",
}


def probe_texts(seed: int = 0, per_domain: int = 6) -> dict[str, list[str]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for dom, words in DOMAIN_WORDS.items():
        w = words.split()
        texts = []
        for _ in range(per_domain):
            n = int(torch.randint(5, 14, (1,), generator=g))
            idx = torch.randint(0, len(w), (n,), generator=g).tolist()
            texts.append("The " + " ".join(w[i] for i in idx) + ".")
        out[dom] = texts
    return out


def make_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [t for ts in probe_texts(1, 20).values() for t in ts]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    fast.save_pretrained(str(folder))
    return tok.get_vocab_size()


def hf_config(arch: str, vocab: int, max_positions: int = 128):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=D, n_layer=LAYERS, n_head=4, n_positions=max_positions,
            architectures=["GPT2LMHeadModel"], eos_token_id=0, bos_token_id=0,
        )
    common = dict(
        vocab_size=vocab, hidden_size=D, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        eos_token_id=0, bos_token_id=0, rms_norm_eps=1e-6,
    )
    if arch == "llama":
        return LlamaConfig(**common, architectures=["LlamaForCausalLM"], tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**common, architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False)
    raise ValueError(arch)


def _perturb(sd: dict[str, torch.Tensor], names, g: torch.Generator, scale: float) -> dict:
    out = dict(sd)
    for n in names:
        t = sd[n]
        out[n] = (t + scale * torch.randn(t.shape, generator=g) * (t.std() if t.numel() > 1 else 1.0)).contiguous()
    return out


def build_constellation(
    root: Path,
    arch: str = "llama",
    domains: tuple[str, ...] = ("medical", "legal", "code"),
    everywhere: tuple[str, ...] = (),
    basis: str = "symmetric",
    policy: str = "residual",
    signature: str = "trunk",
    top_k: int = 3,
    seed: int = 0,
    max_positions: int = 128,
) -> Path:
    """Write a fixture constellation under ``root`` and return its config path.

    Specialists in ``everywhere`` differ from the generalist in every tensor; the others only in
    the last ``L`` decoder layers.
    """
    from transformers import AutoModelForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    gdir = root / "models" / "generalist"
    gdir.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(gdir) + 4
    torch.manual_seed(seed)
    cfg = hf_config(arch, vocab, max_positions)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    # Random init has tiny norms/biases = 1/0; jitter them so every tensor carries signal.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(gdir))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prefix = "transformer.h." if arch == "gpt2" else "model.layers."
    g = torch.Generator().manual_seed(seed + 1)
    for k, dom in enumerate(domains):
        sdir = root / "models" / dom
        sdir.mkdir(parents=True, exist_ok=True)
        if dom in everywhere:
            names = [n for n in sd if n != "lm_head.weight" or not cfg.tie_word_embeddings]
        else:
            names = [n for n in sd if n.startswith(prefix) and int(n[len(prefix):].split(".")[0]) >= LAYERS - L]
        spec = _perturb(sd, names, g, 0.3)
        if cfg.tie_word_embeddings:  # lm_head is the embedding: loading G's copy after it would undo it
            spec.pop("lm_head.weight", None)
        model.load_state_dict(spec, strict=False)
        model.save_pretrained(str(sdir))
        for f in gdir.iterdir():
            if f.name.startswith("tokenizer") or f.name.startswith("special_tokens") or f.name == "chat_template.jinja":
                (sdir / f.name).write_bytes(f.read_bytes())
        model.load_state_dict(sd)
    probes = probe_texts(seed)
    (root / "probes.json").write_text(json.dumps({"domains": {d: probes[d] for d in (*domains, "general")}}, indent=1))
    spec_lines = "\n".join(f'{d} = "models/{d}"' for d in domains)
    conf = root / "constellation.toml"
    conf.write_text(
        f"""[generalist]
path = "models/generalist"

[specialists]
{spec_lines}

[index]
path = "index"
probes = "probes.json"
basis = "{basis}"
noise_fraction = 0.0
seed = 0

[composition]
top_k = {top_k}
layers = {L}
policy = "{policy}"
signature = "{signature}"

[runtime]
device = "cpu"
dtype = "float32"
compile = "off"  # tests of other things decode eagerly (tests/test_captured.py captures)
"""
    )
    return conf
