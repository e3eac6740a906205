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
``peft.utils.other.get_pattern_key``. Both are reproduced below and cross-checked against the
tensors actually present, so an adapter whose config and weights disagree is refused.

Only safetensors are read (``safe_open``); ``base_model_name_or_path`` is informational only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from composer.lowrank import LowRank
from composer.weights import PICKLE_SUFFIXES, WeightsError

from .store import sha256_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model

# LoraConfig (PEFT 0.21) and PeftConfig fields that do not change the inference computation, or
# that we implement (r, lora_alpha, use_rslora, rank/alpha_pattern, target/exclude_modules,
# layers_to_transform/pattern, fan_in_fan_out, bias, modules_to_save).
_KNOWN_FIELDS = {
    # PeftConfig
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode",
    # LoraConfig: implemented
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "fan_in_fan_out", "bias", "modules_to_save",
    # LoraConfig: training-time only (initialisation, dropout, VeLoRA's backward, MonteCLoRA's
    # training-time sampling; the others only matter when the refused option that uses them is on)
    "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "velora_config", "monteclora_config", "qalora_group_size", "megatron_core", "runtime_config",
    "ensure_weight_tying",
    # early PEFT releases
    "merge_weights",
}

# Options that change the forward computation and are not implemented: refused when set.
_REFUSED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA) is not supported: its magnitude vector rescales every "
                "output row of W + BA, which is not a low-rank update",
    "use_qalora": "QALoRA (pooled lora_A input) is not supported",
    "lora_bias": "a trained bias on lora_B (lora_bias=true) is not supported",
    "layer_replication": "layer replication builds a different layer stack; not supported",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices) are not supported",
    "megatron_config": "Megatron parallel LoRA layers are not supported",
    "alora_invocation_tokens": "Activated LoRA (applied only after invocation tokens) is not supported",
    "kasa_config": "KaSA (learned singular values between A and B, truncated base) is not supported",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) is not supported",
    "arrow_config": "Arrow routing between LoRA experts is not supported",
    "enable_lora": "merged-linear LoRA (enable_lora, early PEFT) is not supported",
}

# init_lora_weights values whose adapters expect *modified* base weights (W - B0 A0, quantised W):
# such an adapter only reproduces its fine-tuned model on that modified base.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

# LoRA-variant state that only matters during training (VeLoRA, MonteCLoRA): ignored.
_TRAINING_ONLY_PARTS = ("lora_velora_embed", "lora_monteclora_sampler")


class AdapterError(WeightsError):
    """A PEFT adapter folder cannot be used as a low-rank source over the generalist."""


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


# ---- PEFT's matching rules, reproduced ----------------------------------------------------------
def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """``peft.utils.other.get_pattern_key``: the FIRST pattern (dict order) ``p`` such that
    ``re.match(rf"(.*\\.)?({p})$", key)``; else the key itself."""
    for p in pattern_keys:
        if re.match(rf"(.*\.)?({p})$", key_to_match):
            return p
    return key_to_match


def pattern_value(patterns: dict, key: str, default):
    """``lora_config.rank_pattern.get(get_pattern_key(rank_pattern.keys(), key), r)`` (LoraModel)."""
    return patterns.get(get_pattern_key(patterns.keys(), key), default)


def _layer_index(key: str, layers_pattern) -> int | None:
    if layers_pattern is None or len(layers_pattern) == 0:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def check_target_module_exists(cfg: dict, key: str) -> bool:
    """``peft.tuners.tuners_utils.check_target_module_exists`` over a config dict (excluded -> False).

    ``target_modules`` is a regex (``re.fullmatch``) when a string, else names matched exactly or as
    a ``.``-suffix; ``layers_to_transform`` only filters suffix matches. ``exclude_modules`` and
    ``modules_to_save`` win over targets.
    """
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    modules_to_save = cfg.get("modules_to_save")
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
        return False
    targets = cfg.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    indexes = cfg.get("layers_to_transform")
    using = indexes is not None and (len(indexes) != 0 if isinstance(indexes, list) else True)
    if using and found:
        idx = _layer_index(key, cfg.get("layers_pattern"))
        if idx is None:
            return False
        return idx == indexes if isinstance(indexes, int) else idx in indexes
    return found


def matches_modules_to_save(modules_to_save, module: str) -> bool:
    """``peft.utils.other._set_trainable``: ``key.endswith(name)`` (no dot boundary) over the
    wrapped model's module names."""
    return bool(modules_to_save) and any(module.endswith(m) for m in modules_to_save)


# ---- reading --------------------------------------------------------------------------------------
def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def read_adapter_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise AdapterError(f"{folder}: adapter folder does not exist")
    if not path.is_file():
        raise AdapterError(f"{path}: (file): missing (a PEFT adapter folder needs {CONFIG_FILE})")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: (file): not valid JSON ({_one_line(e)})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: (file): not a JSON object")
    return cfg


def _check_config(cfg: dict, path: Path) -> dict:
    """Refuse what we do not implement; return the normalised fields we use."""

    def bad(fieldname: str, problem: str):
        return AdapterError(f"{path}: {fieldname}: {problem}")

    ptype = cfg.get("peft_type")
    if ptype != "LORA":
        raise bad("peft_type", f"{ptype!r} is not supported (only LORA adapters)"
                  if ptype is not None else "missing (only LORA adapters are supported)")
    for name, why in _REFUSED_OPTIONS.items():
        if cfg.get(name):
            raise bad(name, why)
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise bad("init_lora_weights", f"{init!r} adapters expect modified base weights and do not apply to the "
                  "unmodified generalist; convert it to a plain LoRA first (PEFT save_pretrained with "
                  "path_initial_model_for_weight_conversion)")
    for name in sorted(set(cfg) - _KNOWN_FIELDS - set(_REFUSED_OPTIONS)):
        if cfg[name] not in (None, False, 0, "", [], {}):
            raise bad(name, "unknown LoRA option (newer PEFT?); Constellation cannot tell whether it changes "
                      "the computation, so it refuses the adapter")

    out: dict[str, Any] = {}
    r = cfg.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise bad("r", f"must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise bad("lora_alpha", f"must be a number, got {alpha!r}")
    out.update(r=r, lora_alpha=alpha, use_rslora=bool(cfg.get("use_rslora", False)))
    for name in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(name) or {}
        if not isinstance(pat, dict):
            raise bad(name, f"must be an object, got {type(pat).__name__}")
        for k, v in pat.items():
            try:
                re.compile(k)
            except re.error as e:
                raise bad(name, f"key {k!r} is not a valid regular expression ({_one_line(e)})") from None
            want = "positive integer" if name == "rank_pattern" else "number"
            ok = isinstance(v, int) and v > 0 if name == "rank_pattern" else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok:
                raise bad(name, f"value for {k!r} must be a {want}, got {v!r}")
        out[name] = dict(pat)
    targets = cfg.get("target_modules")
    if targets is None or (not isinstance(targets, str) and not targets):
        raise bad("target_modules", "missing or empty; cannot tell which modules the adapter adapts")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise bad("target_modules", f"not a valid regular expression ({_one_line(e)})") from None
    elif not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise bad("target_modules", "must be a string (regex) or a list of module names")
    out["target_modules"] = targets
    exclude = cfg.get("exclude_modules")
    if exclude is not None and not isinstance(exclude, (str, list)):
        raise bad("exclude_modules", "must be a string (regex) or a list of module names")
    out["exclude_modules"] = exclude
    ltt = cfg.get("layers_to_transform")
    if ltt is not None and not (isinstance(ltt, int) and not isinstance(ltt, bool)) and not (
            isinstance(ltt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ltt)):
        raise bad("layers_to_transform", f"must be an integer or a list of integers, got {ltt!r}")
    out["layers_to_transform"] = ltt
    lp = cfg.get("layers_pattern")
    if lp is not None and not isinstance(lp, (str, list)):
        raise bad("layers_pattern", f"must be a string or a list of strings, got {lp!r}")
    out["layers_pattern"] = lp
    bias = cfg.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise bad("bias", f"must be 'none', 'all' or 'lora_only', got {bias!r}")
    out["bias"] = bias
    mts = cfg.get("modules_to_save")
    if mts is not None and (not isinstance(mts, list) or not all(isinstance(m, str) for m in mts)):
        raise bad("modules_to_save", "must be a list of module names")
    out["modules_to_save"] = mts or None
    out["fan_in_fan_out"] = bool(cfg.get("fan_in_fan_out", False))
    return out


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

    # 1. sort the keys: LoRA factors, dense replacements, ignored training state
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

    modules = list(factors) + [n.rsplit(".", 1)[0] for n in dense_raw]
    names = _Names(g, modules)

    # 2. which modules the config targets (PEFT's rule over the generalist's module names)
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

    # 3. LoRA factors -> LowRank
    lowrank: dict[str, LowRank] = {}
    ranks: dict[str, int] = {}
    scales: dict[str, float] = {}
    for pm in sorted(factors):
        pair = factors[pm]
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

    # 4. dense replacements: modules_to_save copies and trained biases
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
        value = t.to(device=device, dtype=dtype)
        if torch.equal(value.to(gt.device), gt.to(dtype)):  # no effect at the precision we run
            unchanged.append(gname)
            continue
        dense[gname] = value

    # 5. bookkeeping
    layers, glob = set(), []
    for n in [*lowrank, *dense]:
        split = arch.split_layer_name(n, g.mc.n_layers)
        if split is None:
            glob.append(n)
        else:
            layers.add(split[0])
    nbytes = sum(lr.nbytes for lr in lowrank.values()) + sum(t.numel() * t.element_size() for t in dense.values())
    summary = {
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
        "modules_to_save": mts,
        "fan_in_fan_out": cfg["fan_in_fan_out"],  # informational: the layout comes from the generalist
        "ranks": ranks,
        "scales": scales,
        "dense_unchanged": unchanged,  # saved tensors equal to the generalist's (bias="all"): dropped
    }
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
