"""Low-rank adapters on the last L decoder blocks: training-time wrapper, storage, merging.

The committed demo artifacts are these adapters (A, B per matrix, plus the trained norm vectors);
``demo build`` merges them into dense weights, ``W_s = W_G + (alpha / r) * B @ A``, so the
specialists the server loads are plain dense checkpoints.
"""

from __future__ import annotations

import math
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


def save_adapter(path: Path, tensors: dict[str, torch.Tensor], rank: int, alpha: float) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "constellation-lora", "rank": str(rank), "alpha": str(alpha)})
    tmp.replace(path)


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], int, float]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "constellation-lora":
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
