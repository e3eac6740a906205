"""PEFT LoRA adapter folders read as low-rank sources over a loaded generalist (DESIGN §4.1).

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. The tensor
keys are the adapted model's state-dict keys with the adapter name removed
(``peft.utils.save_and_load.get_peft_model_state_dict``):

- ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]`` for
  every LoRA layer, whatever the base layer's storage layout (GPT-2's Conv1D too);
- ``base_model.model.<module>.<param>`` for every ``modules_to_save`` module (the trained copy);
- with ``bias="all"`` every ``.bias`` of the model (``<module>.base_layer.bias`` for LoRA layers,
  and for ``modules_to_save`` modules also ``<module>.modules_to_save.bias`` = the trained copy and
  ``<module>.original_module.bias`` = the untouched base copy); with ``bias="lora_only"`` the
  ``<module>.base_layer.bias`` of LoRA layers.

The adapted weight is ``W + scaling * B @ A`` (``transpose``d for Conv1D) with
``scaling = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA), ``r`` and ``alpha`` per module from
``rank_pattern`` / ``alpha_pattern`` (``peft.tuners.lora.layer.LoraLayer.update_layer``,
``Linear.get_delta_weight``). Which modules carry LoRA follows
``peft.tuners.tuners_utils.check_target_module_exists``; the pattern rule is
``peft.utils.other.get_pattern_key``. Both are reproduced in ``peft_rules`` and cross-checked against the
tensors actually present, so an adapter whose config and weights disagree is refused.

Only safetensors are read (``safe_open``); ``base_model_name_or_path`` is informational only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from composer.lowrank import LowRank
from composer.weights import PICKLE_SUFFIXES

from .peft_rules import (check_target_module_exists, get_pattern_key,  # noqa: F401 (re-exported)
                         matches_modules_to_save, pattern_value)
from .peft_config import CONFIG_FILE, AdapterError, _check_config, _one_line, read_adapter_config  # noqa: F401
from .store import sha256_file

WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model

# LoRA-variant state that only matters during training (VeLoRA, MonteCLoRA): ignored.
_TRAINING_ONLY_PARTS = ("lora_velora_embed", "lora_monteclora_sampler")


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


@dataclass
class Adapter:
    folder: Path
    lowrank: dict[str, "LowRank"]  # generalist tensor name -> factors ([out, in], scale folded into B)
    dense: dict[str, torch.Tensor]  # generalist tensor name -> replacement (modules_to_save, biases)
    layers: list[int]  # decoder layers any lowrank / dense entry touches
    touches_globals: list[str]  # lowrank / dense names outside decoder layers
    config: dict  # summary of adapter_config.json plus ranks / scales per tensor
    sha256: str  # of adapter_model.safetensors
    nbytes: int  # resident bytes of factors + dense tensors


# ---- reading --------------------------------------------------------------------------------------
def _weights_file(folder: Path) -> Path:
    f = folder / WEIGHTS_FILE
    if f.is_file():
        return f
    pickles = sorted(p.name for p in folder.iterdir()
                     if p.name.startswith("adapter_model") and p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            f"{folder / pickles[0]}: (file): pickle-format adapter weights; Constellation loads safetensors only "
            "(pickle files can run code). Convert it on a trusted machine: PeftModel.from_pretrained(...)"
            f".save_pretrained(folder, safe_serialization=True) writes {WEIGHTS_FILE}"
        )
    raise AdapterError(f"{f}: (file): missing (a PEFT adapter folder needs {WEIGHTS_FILE})")


def _read_tensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            return {k: sf.get_tensor(k) for k in sf.keys()}
    except Exception as e:  # safetensors raises several types for truncated / corrupt files
        raise AdapterError(f"{f}: (file): cannot read safetensors file ({_one_line(e)})") from None


# ---- the generalist's modules, in the adapter's naming ---------------------------------------------
class _Names:
    """Maps between the adapter's module names and the generalist's tensor names.

    PEFT names modules as the transformers model it wrapped did: ``model.layers.N...`` for Llama
    and Qwen2, ``transformer.h.N...`` for ``GPT2LMHeadModel`` but ``h.N...`` for a bare ``GPT2Model``;
    the generalist always carries ``transformer.`` (``composer.weights.normalize_names``).
    """

    def __init__(self, generalist, modules: list[str]):
        self.g = generalist
        arch = generalist.arch
        self.modules = {n.rsplit(".", 1)[0] for n in generalist.params}
        self.bare = arch.family == "gpt2" and bool(modules) and all(
            not m.startswith(("transformer.", "lm_head")) for m in modules)

    def to_g(self, module: str) -> str:
        if self.bare and not module.startswith("lm_head"):
            return "transformer." + module
        return module

    def to_peft(self, g_module: str) -> str:
        return g_module.removeprefix("transformer.") if self.bare else g_module

    def kind(self, g_module: str) -> str:
        """linear | embedding | lm_head | other | missing (a module of the generalist by its name)."""
        arch, g = self.g.arch, self.g
        weight = g_module + ".weight"
        if weight == arch.lm_head:
            return "lm_head"
        if weight in (arch.embed, *arch.extra_globals):
            return "embedding"
        split = arch.split_layer_name(weight, g.mc.n_layers)
        if split is not None and split[1] in arch.roles and arch.roles[split[1]].role in ("read", "write") \
                and weight in g.params:
            return "linear"
        if g_module in self.modules:
            return "other"
        return "missing"

    def all_modules(self) -> list[str]:
        """Generalist modules holding parameters (plus the LM head module, present even when tied)."""
        return sorted(self.modules | {self.g.arch.lm_head.rsplit(".", 1)[0]})


def _what(kind: str) -> str:
    return {"embedding": "an embedding", "lm_head": "the LM head"}.get(kind, kind)


# ---- loading ----------------------------------------------------------------------------------------
def load_adapter(folder: str | Path, generalist, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Adapter:
    """Read a PEFT LoRA folder as factors over ``generalist`` (a loaded ``composer.model.Transformer``).

    Refuses, with one line naming the file and the key or field: non-LoRA PEFT types, DoRA and
    other LoRA variants that change the computation, LoRA on embeddings or the LM head, pickle-only
    weights, corrupt files, modules the generalist lacks, shape or rank mismatches, unpaired
    factors, and config/weights disagreements.
    """
    folder = Path(folder)
    cfg_path = folder / CONFIG_FILE
    raw_cfg = read_adapter_config(folder)
    cfg = _check_config(raw_cfg, cfg_path)
    wfile = _weights_file(folder)
    tensors = _read_tensors(wfile)
    g = generalist
    arch = g.arch

    def bad(key: str, problem: str):
        return AdapterError(f"{wfile}: {key}: {problem}")

    if not tensors:
        raise bad("(file)", "holds no tensors")

    factors, dense_raw = _sort_keys(tensors, bad)
    modules = list(factors) + [n.rsplit(".", 1)[0] for n in dense_raw]
    names = _Names(g, modules)
    targeted = _targeted_modules(cfg, names, cfg_path)
    lowrank, ranks, scales = _build_lowrank(factors, targeted, names, cfg, bad, device, dtype)
    dense, unchanged = _build_dense(dense_raw, factors, names, cfg, bad, device, dtype)

    # bookkeeping
    layers, glob = set(), []
    for n in [*lowrank, *dense]:
        split = arch.split_layer_name(n, g.mc.n_layers)
        if split is None:
            glob.append(n)
        else:
            layers.add(split[0])
    nbytes = sum(lr.nbytes for lr in lowrank.values()) + sum(t.numel() * t.element_size() for t in dense.values())
    summary = _summary(raw_cfg, cfg, ranks, scales, unchanged)
    return Adapter(
        folder=folder,
        lowrank=lowrank,
        dense=dense,
        layers=sorted(layers),
        touches_globals=sorted(glob),
        config=summary,
        sha256=sha256_file(wfile),
        nbytes=nbytes,
    )


def _sort_keys(tensors: dict[str, torch.Tensor], bad):
    """Sort the keys: LoRA factors (module -> {"A"/"B": (key, tensor)}), dense replacements
    (tensor name in adapter naming -> (key, tensor)); ignored training state is dropped."""
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # module -> {"A"/"B": (key, tensor)}
    dense_raw: dict[str, tuple[str, torch.Tensor]] = {}  # tensor name (adapter naming) -> (key, tensor)
    for key in sorted(tensors):
        t = tensors[key]
        name = key.removeprefix(KEY_PREFIX)
        parts = name.split(".")
        if "lora_magnitude_vector" in parts:
            raise bad(key, "DoRA magnitude vector; DoRA (weight-decomposed LoRA) is not supported")
        if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
            raise bad(key, "LoRA on an embedding layer is not supported")
        if "token_adapter" in parts or "trainable_tokens_delta" in parts:
            raise bad(key, "trainable token embeddings are not supported")
        if not t.is_floating_point():
            raise bad(key, f"dtype {t.dtype} is not a floating-point type")
        m = re.fullmatch(r"(.+)\.lora_([AB])\.(weight|bias)", name)
        if m:
            module, which, param = m.groups()
            if param == "bias":
                raise bad(key, "a trained bias on lora_A/lora_B (lora_bias) is not supported")
            factors.setdefault(module, {})[which] = (key, t)
            continue
        if any(p.startswith(_TRAINING_ONLY_PARTS) for p in parts):
            continue
        if any(p.startswith("lora_") for p in parts):
            raise bad(key, "LoRA-variant tensor Constellation does not implement")
        if "original_module" in parts:  # bias="all": PEFT also saves the untouched base copy
            continue
        parts = [p for p in parts if p not in ("base_layer", "modules_to_save")]
        dname = ".".join(parts)
        if dname in dense_raw and not torch.equal(dense_raw[dname][1], t):
            raise bad(key, f"conflicts with {dense_raw[dname][0]} (two different values for one tensor)")
        dense_raw.setdefault(dname, (key, t))
    return factors, dense_raw


def _targeted_modules(cfg: dict, names: _Names, cfg_path: Path) -> set[str]:
    """Which modules the config targets (PEFT's rule over the generalist's module names)."""
    g, arch = names.g, names.g.arch
    targets = cfg["target_modules"]
    match_cfg = dict(cfg)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        # peft.tuners.tuners_utils._maybe_include_all_linear_layers: every Linear/Conv1D but the LM head
        match_cfg["target_modules"] = [names.to_peft(m) for m in names.all_modules() if names.kind(m) == "linear"]
    targeted: set[str] = set()
    for gm in names.all_modules():
        pm = names.to_peft(gm)
        try:
            hit = check_target_module_exists(match_cfg, pm)
        except re.error as e:
            raise AdapterError(f"{cfg_path}: target_modules: regular expression fails ({_one_line(e)})") from None
        if not hit:
            continue
        kind = names.kind(gm)
        if kind in ("embedding", "lm_head"):
            raise AdapterError(f"{cfg_path}: target_modules: targets {pm}, {_what(kind)}; LoRA on embeddings or "
                               "the LM head is not supported")
        if kind == "linear":
            targeted.add(pm)
        # other kinds (norms) cannot carry LoRA in PEFT; a factor for one is refused below
    if not targeted:
        raise AdapterError(f"{cfg_path}: target_modules: {targets!r} matches no linear layer of the generalist "
                           f"({arch.name}, {g.mc.n_layers} layers)")
    return targeted


def _build_lowrank(factors, targeted: set[str], names: _Names, cfg: dict, bad, device, dtype):
    """LoRA factors -> LowRank (scale folded into B), with ranks and scales per generalist tensor."""
    lowrank: dict[str, LowRank] = {}
    ranks: dict[str, int] = {}
    scales: dict[str, float] = {}
    for pm in sorted(factors):
        gname, (A, B), rank, scale = _check_pair(pm, factors[pm], targeted, names, cfg, bad)
        lowrank[gname] = LowRank(
            A.to(device=device, dtype=dtype),
            (B.to(torch.float32) * scale).to(device=device, dtype=dtype),
        )
        ranks[gname], scales[gname] = rank, float(scale)
    missing = sorted(targeted - set(factors))
    if missing:
        raise bad(f"{KEY_PREFIX}{missing[0]}.lora_A.weight",
                  f"missing, but {CONFIG_FILE} targets module {missing[0]}"
                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return lowrank, ranks, scales


def _check_pair(pm: str, pair: dict, targeted: set[str], names: _Names, cfg: dict, bad):
    """Check one module's lora_A / lora_B against the generalist and the config."""
    g, arch = names.g, names.g.arch
    if "B" not in pair:
        raise bad(pair["A"][0], f"lora_A without its lora_B ({KEY_PREFIX}{pm}.lora_B.weight is missing)")
    if "A" not in pair:
        raise bad(pair["B"][0], f"lora_B without its lora_A ({KEY_PREFIX}{pm}.lora_A.weight is missing)")
    (ka, A), (kb, B) = pair["A"], pair["B"]
    gm = names.to_g(pm)
    kind = names.kind(gm)
    if kind in ("embedding", "lm_head"):
        raise bad(ka, f"LoRA on {_what(kind)} ({gm}) is not supported")
    if kind == "missing":
        raise bad(ka, f"module {gm} does not exist in the generalist ({arch.name}, {g.mc.n_layers} layers)")
    if kind != "linear":
        raise bad(ka, f"module {gm} is not a linear layer of the generalist")
    if pm not in targeted:
        raise bad(ka, f"module {pm} is not targeted by {CONFIG_FILE} (target_modules / exclude_modules / "
                  "layers_to_transform / modules_to_save); the config and the weights disagree")
    gname = gm + ".weight"
    W = g.params[gname]
    layout = arch.role(arch.split_layer_name(gname, g.mc.n_layers)[1]).layout
    n_out, n_in = (W.shape[0], W.shape[1]) if layout == "linear" else (W.shape[1], W.shape[0])
    if A.ndim != 2 or A.shape[1] != n_in:
        raise bad(ka, f"shape {tuple(A.shape)} does not fit {gname} {tuple(W.shape)} "
                  f"(expected [r, {n_in}])")
    if B.ndim != 2 or B.shape[0] != n_out:
        raise bad(kb, f"shape {tuple(B.shape)} does not fit {gname} {tuple(W.shape)} "
                  f"(expected [{n_out}, r])")
    if A.shape[0] != B.shape[1]:
        raise bad(kb, f"rank {B.shape[1]} differs from its lora_A's rank {A.shape[0]}")
    rank = int(A.shape[0])
    r_cfg = pattern_value(cfg["rank_pattern"], pm, cfg["r"])
    if rank != r_cfg:
        raise bad(ka, f"rank {rank}, but {CONFIG_FILE} implies r={r_cfg} for {pm} (r / rank_pattern)")
    alpha = pattern_value(cfg["alpha_pattern"], pm, cfg["lora_alpha"])
    scale = alpha / math.sqrt(rank) if cfg["use_rslora"] else alpha / rank
    return gname, (A, B), rank, scale


def _build_dense(dense_raw, factors, names: _Names, cfg: dict, bad, device, dtype):
    """Dense replacements: modules_to_save copies and trained biases (those equal to the
    generalist's are listed as unchanged and dropped)."""
    g, arch = names.g, names.g.arch
    dense: dict[str, torch.Tensor] = {}
    unchanged: list[str] = []
    mts = cfg["modules_to_save"]
    for dname in sorted(dense_raw):
        key, t = dense_raw[dname]
        pmod, _, param = dname.rpartition(".")
        gname = names.to_g(dname)
        if g.mc.tie_embeddings and gname in (arch.embed, arch.lm_head):
            raise bad(key, f"replaces {gname}, but the generalist ties its embeddings and LM head; "
                      "an adapter that unties them is not supported")
        if gname not in g.params:
            raise bad(key, f"tensor {gname} does not exist in the generalist ({arch.name}, {g.mc.n_layers} layers)")
        gt = g.params[gname]
        if tuple(t.shape) != tuple(gt.shape):
            raise bad(key, f"shape {tuple(t.shape)} does not match the generalist's {gname} {tuple(gt.shape)}")
        saved = matches_modules_to_save(mts, pmod)
        bias_ok = param == "bias" and (cfg["bias"] == "all" or (cfg["bias"] == "lora_only" and pmod in factors))
        if not (saved or bias_ok):
            raise bad(key, f"unexpected tensor: not a LoRA factor, {pmod} is not in modules_to_save "
                      f"({mts}) and bias is {cfg['bias']!r}")
        if not isinstance(gt, torch.Tensor):  # a quantized matrix (composer.quant)
            raise bad(key, f"saves the whole matrix {gname} (modules_to_save), which cannot compose over the "
                      f"generalist's {g.weights_format} quantized one; serve with --weights bf16")
        value = t.to(device=device, dtype=dtype)
        if torch.equal(value.to(gt.device), gt.to(dtype)):  # no effect at the precision we run
            unchanged.append(gname)
            continue
        dense[gname] = value
    return dense, unchanged


def _summary(raw_cfg: dict, cfg: dict, ranks: dict, scales: dict, unchanged: list[str]) -> dict:
    targets = cfg["target_modules"]
    return {
        "peft_version": raw_cfg.get("peft_version"),
        "base_model_name_or_path": raw_cfg.get("base_model_name_or_path"),
        "r": cfg["r"],
        "lora_alpha": cfg["lora_alpha"],
        "use_rslora": cfg["use_rslora"],
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "exclude_modules": cfg["exclude_modules"],
        "layers_to_transform": cfg["layers_to_transform"],
        "layers_pattern": cfg["layers_pattern"],
        "rank_pattern": cfg["rank_pattern"],
        "alpha_pattern": cfg["alpha_pattern"],
        "bias": cfg["bias"],
        "modules_to_save": cfg["modules_to_save"],
        "fan_in_fan_out": cfg["fan_in_fan_out"],  # informational: the layout comes from the generalist
        "ranks": ranks,
        "scales": scales,
        "dense_unchanged": unchanged,  # saved tensors equal to the generalist's (bias="all"): dropped
    }
