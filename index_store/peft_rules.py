"""PEFT's own module-matching rules, reproduced from peft 0.21 over plain config dicts.

- ``get_pattern_key`` / ``pattern_value``: ``peft.utils.other.get_pattern_key`` as ``LoraModel`` uses
  it for ``rank_pattern`` / ``alpha_pattern``;
- ``check_target_module_exists`` (with ``_layer_index``):
  ``peft.tuners.tuners_utils.check_target_module_exists``;
- ``matches_modules_to_save``: ``peft.utils.other._set_trainable``.
"""

from __future__ import annotations

import re

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
