"""Loading model folders (HF layout) from safetensors only, and comparing specialists to G."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .arch import ArchitectureError, resolve
from .model import Transformer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# config.json keys that may differ between a generalist and its fine-tuned specialists.
_IGNORED_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "id2label",
    "label2id",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
}


class WeightsError(ValueError):
    """A model folder cannot be loaded (missing, not safetensors, corrupt, mismatched)."""


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise WeightsError(f"{folder}: model folder does not exist")
    if not path.is_file():
        raise WeightsError(f"{path}: missing (a model folder needs config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def safetensor_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise WeightsError(
                f"{folder}: only pickle-format weights found ({', '.join(pickles)}); Constellation "
                "loads safetensors only (pickle files can run code). Convert them with "
                "`model.save_pretrained(folder, safe_serialization=True)` on a trusted machine."
            )
        raise WeightsError(f"{folder}: no *.safetensors weight files")
    return files


def load_state_dict(
    folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in safetensor_files(folder):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    t = sf.get_tensor(name)
                    out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        except WeightsError:
            raise
        except Exception as e:  # safetensors raises several types for truncated/corrupt files
            raise WeightsError(f"{f}: cannot read safetensors file ({e})") from None
    return out


def normalize_names(params: dict[str, torch.Tensor], arch) -> dict[str, torch.Tensor]:
    """Some GPT-2 checkpoints store names without the ``transformer.`` prefix; add it."""
    if arch.family == "gpt2" and arch.embed not in params and "wte.weight" in params:
        return {("transformer." + k if not k.startswith("lm_head") else k): v for k, v in params.items()}
    return params


def load_model(
    folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """Load a HF model folder into the functional ``Transformer``; refuse what we cannot run."""
    folder = Path(folder)
    cfg = read_config(folder)
    arch, mc = resolve(cfg, str(folder / "config.json"))
    params = normalize_names(load_state_dict(folder, device, dtype), arch)
    missing = [n for n in [arch.embed, *arch.final_norm, *arch.extra_globals] if n not in params]
    for i in range(mc.n_layers):
        for suffix, role in arch.roles.items():
            name = arch.layer_name(i, suffix)
            if role.role in ("read", "write") and name not in params:
                missing.append(name)
    if not mc.tie_embeddings and arch.lm_head not in params:
        missing.append(arch.lm_head)
    if missing:
        raise WeightsError(f"{folder}: weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    for name in params:
        split = arch.split_layer_name(name, mc.n_layers)
        if split is not None and split[1] not in arch.roles and not split[1].startswith("attn.bias") \
                and not split[1].startswith("attn.masked_bias"):
            raise ArchitectureError(
                f"{folder}: tensor '{name}' has no role in {arch.name}'s role map; this layer "
                "structure is not supported"
            )
    return Transformer(mc, arch, params)


def comparable_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in _IGNORED_CONFIG_KEYS}


def check_same_config(g_folder: Path, s_folder: Path, domain: str) -> None:
    g, s = comparable_config(read_config(g_folder)), comparable_config(read_config(s_folder))
    diffs = sorted(k for k in set(g) | set(s) if g.get(k) != s.get(k))
    if diffs:
        shown = ", ".join(f"{k}: {g.get(k)!r} vs {s.get(k)!r}" for k in diffs[:4])
        raise WeightsError(
            f"specialist '{domain}' ({s_folder}) does not match the generalist's config.json: {shown}"
        )


@dataclass
class Difference:
    """Which tensors of a specialist differ from the generalist."""

    tensors: list[str]
    layers: list[int]  # decoder layers with at least one differing tensor
    globals: list[str]  # differing tensors outside decoder layers (embeddings, final norm, head)
    bytes: int


def specialist_difference(g: Transformer, s: Transformer, domain: str) -> Difference:
    """What a specialist changes: its dense tensors that differ from G's, and its low-rank updates."""
    diff = diff_params(g, s.params, domain)
    layers, nbytes = set(diff.layers), diff.bytes
    names, glob = list(diff.tensors), list(diff.globals)
    for name, lr in s.lowrank.items():
        names.append(name)
        nbytes += lr.nbytes
        _place(g, name, layers, glob)
    return Difference(names, sorted(layers), glob, nbytes)


def _place(g: Transformer, name: str, layers: set[int], glob: list[str]) -> None:
    """Record a changed tensor: its decoder layer, or (outside the layers) its name."""
    split = g.arch.split_layer_name(name, g.mc.n_layers)
    if split is None:
        glob.append(name)
    else:
        layers.add(split[0])


def diff_params(g: Transformer, s_params: dict[str, torch.Tensor], domain: str) -> Difference:
    if set(s_params) != set(g.params):
        extra = sorted(set(s_params) ^ set(g.params))[:3]
        raise WeightsError(f"specialist '{domain}' has different tensor names than the generalist: {extra}")
    names, layers, glob, nbytes = [], set(), [], 0
    for name, t in s_params.items():
        gt = g.params[name]
        if t is gt:  # shared with the generalist (an adapter specialist's untouched tensors)
            continue
        if t.shape != gt.shape:
            raise WeightsError(
                f"specialist '{domain}': tensor {name} has shape {tuple(t.shape)}, "
                f"generalist {tuple(gt.shape)}"
            )
        if not torch.equal(t, gt):
            names.append(name)
            nbytes += t.numel() * t.element_size()
            _place(g, name, layers, glob)
    return Difference(names, sorted(layers), glob, nbytes)
