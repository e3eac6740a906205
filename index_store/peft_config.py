"""The ``adapter_config.json`` of a PEFT LoRA folder: read it, refuse what Constellation does not
implement, and normalise the fields it uses (r, lora_alpha, use_rslora, rank/alpha patterns,
target/exclude modules, layers, bias, modules_to_save, fan_in_fan_out)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from composer.weights import WeightsError

CONFIG_FILE = "adapter_config.json"


class AdapterError(WeightsError):
    """A PEFT adapter folder cannot be used as a low-rank source over the generalist."""

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

    _refuse_options(cfg, bad)
    out: dict[str, Any] = {}
    _check_ranks(cfg, bad, out)
    _check_module_selection(cfg, bad, out)
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


def _refuse_options(cfg: dict, bad) -> None:
    """Non-LoRA types, computation-changing variants, base-modifying inits, unknown options."""
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


def _check_ranks(cfg: dict, bad, out: dict) -> None:
    """r, lora_alpha, use_rslora, rank_pattern, alpha_pattern -> ``out``."""
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


def _check_module_selection(cfg: dict, bad, out: dict) -> None:
    """target_modules, exclude_modules, layers_to_transform, layers_pattern -> ``out``."""
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
