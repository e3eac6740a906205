"""Real PEFT LoRA adapter folders over the tiny fixture generalists (``fixtures.build_constellation``).

``make_peft_adapter`` wraps a generalist with ``peft.get_peft_model``, fills every trainable
adapter tensor with seeded random values and saves the folder with ``save_pretrained``
(safetensors). ``peft_merged_state_dict`` is the reference: PEFT's own ``PeftModel.from_pretrained``
on that folder, ``merge_and_unload()``. Nothing is downloaded.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch


def _hf_model(generalist_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(generalist_dir), local_files_only=True, dtype=torch.float32)
    return model.eval()


def _std(t: torch.Tensor) -> float:
    return float(t.float().std()) if t.numel() > 1 else 1.0


def make_peft_adapter(generalist_dir: Path, out_dir: Path, *, seed: int = 0, scale: float = 0.3,
                      **lora_kwargs) -> Path:
    """Write a PEFT LoRA folder for the HF generalist at ``generalist_dir`` and return ``out_dir``.

    ``lora_kwargs`` go to ``peft.LoraConfig`` (``target_modules`` is required; for GPT-2
    ``fan_in_fan_out`` defaults to True). Every LoRA layer gets ``A``, ``B`` such that
    ``scaling * B @ A`` has entries of std ``scale * std(W)``; ``modules_to_save`` copies and trained
    biases (``bias="all"`` / ``"lora_only"``) are perturbed by ``scale * std`` of themselves.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = _hf_model(Path(generalist_dir))
    if model.config.model_type == "gpt2":
        lora_kwargs.setdefault("fan_in_fan_out", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    done: set[int] = set()
    with torch.no_grad():
        for module in pm.modules():
            if not isinstance(module, LoraLayer):
                continue
            W = module.get_base_layer().weight
            for name in module.lora_A:
                A, B = module.lora_A[name].weight, module.lora_B[name].weight
                r, s = A.shape[0], module.scaling[name]
                # std(s * B @ A) = s * sqrt(r) * std(A) * std(B); split the size evenly between A and B
                each = math.sqrt(scale * _std(W) / (abs(s) * math.sqrt(r)))
                A.copy_(each * torch.randn(A.shape, generator=g))
                B.copy_(each * torch.randn(B.shape, generator=g))
                done.update((id(A), id(B)))
        for pname, p in pm.named_parameters():
            # modules_to_save copies and biases made trainable by bias="all"/"lora_only"; never the
            # original_module PEFT keeps next to a modules_to_save copy
            if not p.requires_grad or id(p) in done or ".original_module." in pname:
                continue
            p.add_(scale * _std(p) * torch.randn(p.shape, generator=g))
            done.add(id(p))
    out_dir = Path(out_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def peft_merged_state_dict(generalist_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT's own reading of the folder: ``PeftModel.from_pretrained(G, folder).merge_and_unload()``."""
    from peft import PeftModel

    model = _hf_model(Path(generalist_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
