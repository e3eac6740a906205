"""The output side of ``constellation specialist extract``: the adapter folder (weights, config,
README), written atomically, and the held-out check: reading the texts, then the loss of the
generalist, the full fine-tune and the generalist + extracted adapter."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from composer.model import Transformer
from composer.weights import load_model
from .extract import ExtractError, Extraction, ModuleResult, check_out
from .models import tokenize
from .probes import load_probes


# ---- writing ------------------------------------------------------------------------------------
def adapter_config(base: Path, arch, results: list[ModuleResult], dense: dict, lora_bias: bool) -> dict:
    """PEFT's adapter_config.json: per-module ranks with alpha = r, the whole-saved modules and bias."""
    ranks = {m.module: m.rank for m in results if m.kind == "lora"}
    r_max = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "revision": None,
        "r": r_max,
        "lora_alpha": r_max,
        "rank_pattern": ranks,
        "alpha_pattern": dict(ranks),  # alpha = r per module: PEFT's scaling alpha / r is exactly 1
        "target_modules": list(ranks),
        "modules_to_save": list(dense) or None,
        "bias": "lora_only" if lora_bias else "none",
        "fan_in_fan_out": arch.family == "gpt2",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def readme(ex: Extraction, rank: int | None, energy: float | None) -> str:
    how = f"--rank {rank}" if rank is not None else f"--energy {energy}"
    lora = [m for m in ex.modules if m.kind == "lora"]
    dense = [m.module for m in ex.modules if m.kind == "dense"]
    ranks = sorted({m.rank for m in lora})
    rank_txt = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    return (
        "# LoRA adapter extracted from a full fine-tune\n\n"
        f"Made by `constellation specialist extract {ex.full} --base {ex.base} {how}`: for each of "
        f"{len(lora)} changed decoder-layer linear weights, a truncated SVD of W_full - W_base "
        f"(B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, lora_alpha = r so scaling is 1; {rank_txt}; overall "
        f"relative Frobenius error {ex.overall_rel_error:.3e})"
        + (f"; {len(dense)} modules saved whole (modules_to_save)" if dense else "")
        + ("; changed biases of targeted layers saved whole (bias = lora_only)" if ex.config["bias"] != "none" else "")
        + f". Base model: {ex.base} ({ex.architecture}). Load with "
        "`peft.PeftModel.from_pretrained(base_model, this_folder)`.\n"
    )


def write_adapter(ex: Extraction, rank: int | None, energy: float | None, force: bool) -> None:
    """Write the PEFT folder to a temporary sibling and rename it into place."""
    out = ex.out
    check_out(out, force, (ex.full, ex.base))
    tmp = out.parent / f".{out.name}.extract-{os.getpid()}.tmp"
    old = out.parent / f".{out.name}.extract-{os.getpid()}.old"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(ex.tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(ex.config, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(ex, rank, energy))
        if out.exists():
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise ExtractError(f"{out}: cannot write the adapter folder ({e.strerror or e})") from None


# ---- held-out loss ------------------------------------------------------------------------------
def read_heldout(path: Path) -> list[str]:
    """All texts of a probe file ``{"domains": {name: [texts]}}``, or the lines of a text file."""
    if not path.is_file():
        raise ExtractError(f"{path}: held-out file not found")
    if path.suffix.lower() == ".json":
        return [t for texts in load_probes(path).values() for t in texts]
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ExtractError(f"{path}: cannot read the held-out texts ({e})") from None
    texts = [ln for ln in lines if ln]
    if not texts:
        raise ExtractError(f"{path}: no held-out texts (expected one text per line)")
    return texts


@torch.inference_mode()
def mean_loss(model, tok, texts: list[str], max_tokens: int, batch_size: int = 8) -> tuple[float, int]:
    """Mean next-token cross-entropy over the real tokens of ``texts`` (and how many were scored)."""
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        ids, am = tokenize(tok, texts[i: i + batch_size], max_tokens, model.device)
        logits = model.forward(ids, am).float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        m = (am[:, 1:] * am[:, :-1]).flatten().bool()
        total += float(nll[m].double().sum())
        count += int(m.sum())
    return (total / count if count else float("nan")), count


def evaluate(ex: Extraction, tok, texts: list[str], max_tokens: int) -> dict:
    """Held-out loss of the generalist, the full fine-tune and the generalist + extracted adapter
    (merged densely: ``W_G + B A`` and the whole-saved tensors, run by ``composer.model.Transformer``)."""
    g = load_model(ex.base)
    max_tokens = min(max_tokens, g.mc.max_positions)
    lg, n = mean_loss(g, tok, texts, max_tokens)
    if n == 0:
        raise ExtractError("held-out texts have no next-token pairs (every text is a single token)")
    full = load_model(ex.full)
    lf, _ = mean_loss(full, tok, texts, max_tokens)
    del full
    params = dict(g.params)
    params.update({k: v.to(g.dtype) for k, v in ex.merged.items()})
    la, _ = mean_loss(Transformer(g.mc, g.arch, params), tok, texts, max_tokens)
    return {"texts": len(texts), "tokens": n, "generalist": lg, "full": lf, "adapter": la}
