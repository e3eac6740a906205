"""Loading the models of a constellation: device and dtype, the generalist in the weights' format
it serves in (``[runtime].weights``: full precision, or int8/int4 quantized at load), its tokenizer,
and the specialists on top of it (PEFT adapters as factors, full models as the tensors that differ)."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from composer.constellation import share_with_generalist
from composer.model import Transformer
from composer.quant import QuantizeError, quantize_model
from composer.weights import (WeightsError, check_same_config, load_model, load_state_dict, normalize_names,
                              safetensor_files)
from .config import ConstellationConfig
from .peft import is_adapter_folder, load_adapter
from .store import sha256_file


# ---- runtime placement --------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"runtime.device = '{name}' but no CUDA device is available (use 'auto' or 'cpu')")
    return dev


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (elsewhere torch emulates them, slower than fp32)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' storage and compute dtype. ``auto``: bf16 on CUDA, and on a CPU with native bf16
    (measured fastest there at 1, 2, 4 and 16 rows, within tolerance of fp32: docs/precision.md,
    ``python -m bench.kernels``); fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---- identities ---------------------------------------------------------------------------------
def model_identity(folder: Path) -> str:
    """sha256 over config.json, every safetensors file and the tokenizer files of a model folder."""
    h = hashlib.sha256()
    cfg = json.loads((folder / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version")}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for f in safetensor_files(folder):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model"):
        if (folder / name).is_file():
            h.update(name.encode())
            h.update(sha256_file(folder / name).encode())
    return h.hexdigest()


# ---- tokenizer ----------------------------------------------------------------------------------
def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise WeightsError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_same_tokenizer(g_tok, s_tok, domain: str, folder: Path) -> None:
    if g_tok.get_vocab() != s_tok.get_vocab():
        raise WeightsError(f"specialist '{domain}' ({folder}) has a different tokenizer vocabulary than the "
                           "generalist; specialists must share the generalist's tokenizer")


def tokenize(tok, texts: list[str], max_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch of token ids and the real-token mask."""
    enc = [tok(t, add_special_tokens=True)["input_ids"][:max_tokens] or [tok.eos_token_id] for t in texts]
    T = max(len(e) for e in enc)
    ids = torch.full((len(enc), T), tok.pad_token_id, dtype=torch.long)
    am = torch.zeros((len(enc), T), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        am[i, : len(e)] = 1
    return ids.to(device), am.to(device)


def release_freed_memory() -> None:
    """Hand memory freed inside the process back to the system (glibc keeps it in its heap
    otherwise, so the resident set would count every adapter twice after loading)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def adapter_specialist(g: Transformer, adapter) -> Transformer:
    """A LoRA specialist: G's tensors (shared, never copied), its whole tensors, its factors."""
    params = dict(g.params)
    params.update(adapter.dense)
    s = Transformer(g.mc, g.arch, params, adapter.lowrank)
    s.weights_format, s.weights_group = g.weights_format, g.weights_group
    return s


def check_on_quantized(g: Transformer, domain: str, folder: Path, adapter=None) -> None:
    """Over a quantized generalist, a specialist is a PEFT adapter whose whole tensors are vectors
    (biases); a full model, or an adapter saving whole matrices (``modules_to_save``), is refused."""
    if g.weights_format == "bf16":
        return
    fmt = g.weights_format
    if adapter is None:
        raise WeightsError(f"specialist '{domain}' ({folder}) is a full model, and the generalist is served in "
                           f"{fmt}: a full specialist composes only over full-precision weights. Extract it "
                           f"as a LoRA adapter (`constellation specialist extract {folder} "
                           f"--base <generalist> --out <folder>`), or serve with --weights bf16")
    mats = sorted(n for n, t in adapter.dense.items() if t.dim() == 2)
    if mats:
        raise WeightsError(f"specialist '{domain}' ({folder}) saves whole matrices ({', '.join(mats[:3])}"
                           f"{', ...' if len(mats) > 3 else ''}: modules_to_save), which cannot compose over "
                           f"the {fmt} generalist's quantized ones; serve with --weights bf16")


def load_models(cfg: ConstellationConfig, device: torch.device, dtype: torch.dtype, generalist=None,
                quiet: bool = False):
    """Load G and the specialists (lean: shared tensors), checking config and tokenizer match.

    A specialist folder holding ``adapter_config.json`` is a PEFT LoRA adapter: it is checked
    against G and kept as factors; any other folder is a full model, kept as the tensors that differ.
    """
    t0 = time.perf_counter()
    if generalist is not None:  # (g, tokenizer) already loaded (a running server's catalog change)
        g, tok = generalist
    else:
        g, tok = load_generalist(cfg, device, dtype, quiet)
    specialists, diffs, adapters = {}, {}, {}
    for dom, folder in cfg.specialists.items():
        if is_adapter_folder(folder):
            adapters[dom] = load_adapter(folder, g, device, dtype)
            check_on_quantized(g, dom, folder, adapters[dom])
            specialists[dom] = adapter_specialist(g, adapters[dom])
            continue
        check_on_quantized(g, dom, folder)
        check_same_config(cfg.generalist.path, folder, dom)
        check_same_tokenizer(tok, load_tokenizer(folder), dom, folder)
        sparams = normalize_names(load_state_dict(folder, device, dtype), g.arch)
        lean, diff = share_with_generalist(g, sparams, dom)
        specialists[dom] = type(g)(g.mc, g.arch, lean)
        diffs[dom] = diff
    return g, tok, specialists, diffs, adapters, time.perf_counter() - t0


def load_generalist(cfg: ConstellationConfig, device: torch.device | None = None, dtype: torch.dtype | None = None,
                    quiet: bool = False):
    """The generalist as it serves (fused q/k/v and gate/up; quantized when ``[runtime].weights`` says
    so, with a progress bar) and its tokenizer."""
    device = device or pick_device(cfg.runtime.device)
    dtype = dtype or pick_dtype(cfg.runtime.dtype, device)
    g = load_model(cfg.generalist.path, device, dtype).fuse()  # specialists built on it share the fused layout
    fmt = cfg.runtime.weights
    if fmt != "bf16":
        desc = f"quantizing the generalist to {fmt}" + (f" (groups of {cfg.runtime.int4_group})" if fmt == "int4"
                                                         else "")
        try:
            with tqdm(total=g.mc.n_layers, desc=desc, unit="layer", file=sys.stderr, disable=quiet,
                      dynamic_ncols=True) as bar:
                quantize_model(g, fmt, cfg.runtime.int4_group, bar.update)
        except QuantizeError as e:
            raise WeightsError(f"{cfg.generalist.path}: cannot serve it as [runtime].weights = {fmt}"
                               + (f" in groups of {cfg.runtime.int4_group} ([runtime].int4_group, --int4-group)"
                                  if fmt == "int4" else "") + f": {e}") from None
        release_freed_memory()  # the full-precision matrices just dropped
    return g, load_tokenizer(cfg.generalist.path)
