"""Loading a whole constellation from its config: its models (``index_store.models``), its index,
checked against what built it, and the settings the composition runs with. Building the index is
``index_store.indexing``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from composer.constellation import Constellation, GeneralistPass, Settings
from composer.modes import Calibrated
from composer.weightings import WEIGHTINGS, Bands
from .config import ConstellationConfig, check_top_k, load_config
from .models import load_models, model_identity, pick_device, pick_dtype, release_freed_memory, tokenize
from .probes import load_mixed, load_probes, mixed_hash, probes_hash
from .store import IndexStoreError, read_index


# ---- loaded constellation -----------------------------------------------------------------------
@dataclass
class Loaded:
    config: ConstellationConfig
    constellation: Constellation
    tokenizer: object
    manifest: dict | None
    generalist_identity: str
    report: dict = field(default_factory=dict)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize prompts whole (no truncation: the server refuses over-long prompts instead)."""
        return tokenize(self.tokenizer, texts, 1 << 30, self.constellation.g.device)

    def analyze(self, texts: list[str]) -> GeneralistPass:
        ids, am = self.encode(texts)
        return self.constellation.generalist_pass(ids, am)


def load_constellation(config: str | Path | ConstellationConfig, generalist: "Loaded | None" = None) -> Loaded:
    """Load and verify a constellation. ``generalist``: a loaded constellation whose generalist
    (weights, tokenizer, identity) is reused, so a catalog change loads only the specialists."""
    cfg = config if isinstance(config, ConstellationConfig) else load_config(config)
    check_top_k(cfg)
    if generalist is not None:
        g0 = generalist.constellation.g
        cfg = cfg.with_weights(g0.weights_format, g0.weights_group)  # the weights the server runs
        device, dtype = g0.device, g0.dtype
        reuse, identity = (g0, generalist.tokenizer), generalist.generalist_identity
    else:
        device = pick_device(cfg.runtime.device)
        dtype = pick_dtype(cfg.runtime.dtype, device)
        reuse, identity = None, None
    check_index_exists(cfg)  # before the minutes of loading
    g, tok, specialists, diffs, adapters, t_load = load_models(cfg, device, dtype, reuse)
    identity = identity or model_identity(cfg.generalist.path)
    manifest, tensors = read_index(cfg.index_path)
    verify_against(manifest, cfg, identity, g.mc.d)
    settings = settings_of(cfg, calibrated_of(manifest, cfg.index_path))
    if isinstance(settings.layers, int) and settings.layers > g.mc.n_layers:
        raise ValueError(f"{cfg.source}: [composition].layers = {settings.layers} exceeds the generalist's "
                         f"{g.mc.n_layers} decoder layers")
    c = Constellation(g, specialists, tensors["basis"], settings, diffs or None)
    if adapters:
        release_freed_memory()  # the factors as read, before they were stacked
    report = {
        "load_seconds": round(t_load, 3),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "weights": cfg.weights,
        "resident_bytes": c.resident_bytes(),
        "specialist_kinds": {d: ("adapter" if d in adapters else "full") for d in c.domains},
        "adapter_ranks": {d: a.config.get("r") for d, a in adapters.items()},
        "composed_layers": c.layers,
        "differing_layers": {d: diff.layers for d, diff in c.differences.items()},
        "differing_globals": {d: diff.globals for d, diff in c.differences.items()},
        "trunk_exact": c.trunk_exact,
    }
    return Loaded(cfg, c, tok, manifest, identity, report)


def settings_of(cfg: ConstellationConfig, calibrated: Calibrated | None = None) -> Settings:
    return Settings(
        top_k=cfg.composition.top_k, layers=cfg.composition.layers, policy=cfg.composition.policy,
        signature=cfg.composition.signature, task_lambda=cfg.composition.task_arithmetic_lambda,
        default_mode=cfg.composition.mode, calibrated=calibrated or Calibrated(),
    )


def calibrated_of(manifest: dict, where) -> Calibrated:
    """The index's calibration as the composition uses it (the paper's rule if there is none)."""
    cal = manifest.get("calibration") or {}
    if "weighting" not in cal:
        return Calibrated()
    names = [cal["weighting"], *cal.get("sharpness", {}), *cal.get("bands", {})]
    if any(w not in WEIGHTINGS for w in names):
        raise IndexStoreError(f"{where}: the index was calibrated with weighting(s) this version does not know "
                              f"({', '.join(dict.fromkeys(names))}); rebuild it with `constellation index build`")
    return Calibrated(cal["weighting"], {k: float(v) for k, v in cal.get("sharpness", {}).items()},
                      {k: float(v) for k, v in cal.get("strength", {}).items()},
                      {k: Bands.of(v) for k, v in cal.get("bands", {}).items()})


def build_command(cfg: ConstellationConfig) -> str:
    """The ``index build`` command that makes ``cfg``'s index for its weights."""
    w = cfg.runtime.weights
    return (f"`constellation index build {cfg.source or '<config>'}"
            + ("" if w == "bf16" else f" --weights {w}") + (f" --int4-group {cfg.runtime.int4_group}" if w == "int4"
                                                             else "") + "`")


def check_index_exists(cfg: ConstellationConfig) -> None:
    """Before the minutes of loading: a quantized generalist's index is there (it lives apart,
    ``ConstellationConfig.index_path``), or say how to build it."""
    path, w = cfg.index_path, cfg.runtime.weights
    if w == "bf16" or (path / "manifest.json").is_file():  # (bf16: read_index's own words, after the models)
        return
    raise IndexStoreError(f"{path}: no index for the generalist's {w} weights (fingerprints move with the "
                          f"weights, so each format has its own index, beside {cfg.index.path}); build it with "
                          f"{build_command(cfg)}")


def weights_name(w: dict | None) -> str:
    w = w or {"format": "bf16"}
    return w["format"] + (f" (groups of {w['group']})" if w.get("group") else "")


def verify_against(manifest: dict, cfg: ConstellationConfig, identity: str, d: int) -> None:
    """Refuse an index built for other models, domains, probes or settings; say what differs."""
    where = cfg.index_path
    domains = list(cfg.specialists)
    if manifest.get("domains") != domains:
        raise IndexStoreError(f"{where}: index was built for domains {manifest.get('domains')} (in that order) "
                              f"but the config has {domains}; rebuild with `constellation index build`")
    if manifest.get("generalist_identity") != identity:
        raise IndexStoreError(
            f"{where}: index was built from a different generalist (identity "
            f"{str(manifest.get('generalist_identity'))[:12]}…, config's generalist is {identity[:12]}…); "
            "rebuild with `constellation index build`")
    built_on = manifest.get("weights") or {"format": "bf16"}  # (indexes from before quantized weights)
    if built_on != cfg.weights:
        raise IndexStoreError(f"{where}: index was fingerprinted with the generalist's {weights_name(built_on)} "
                              f"weights, but it is served as {weights_name(cfg.weights)}; rebuild it with "
                              f"{build_command(cfg)}")
    if manifest.get("d") != d:
        raise IndexStoreError(f"{where}: index hidden size {manifest.get('d')} != generalist's {d}")
    if cfg.index.probes.is_file():
        now = probes_hash(load_probes(cfg.index.probes))
        if manifest.get("probes_sha256") != now:
            raise IndexStoreError(f"{where}: index was built from different probes than {cfg.index.probes} "
                                  "(probe-set hash differs); rebuild with `constellation index build`")
        if manifest.get("mixed_probes_sha256") != mixed_hash(load_mixed(cfg.index.probes)):
            raise IndexStoreError(f"{where}: index was calibrated on other mixed probes than {cfg.index.probes}'s "
                                  "`mixed` section; rebuild with `constellation index build`")
    built = manifest.get("settings", {})
    for key in ("basis", "noise_fraction", "seed", "max_tokens", "calibrate"):
        want = getattr(cfg.index, key)
        if key not in built:
            raise IndexStoreError(f"{where}: index was built by an older version, before [index].{key} existed; "
                                  "rebuild it with `constellation index build`")
        if built.get(key) != want:
            raise IndexStoreError(f"{where}: index was built with [index].{key} = {json.dumps(built.get(key))} "
                                  f"but the config says {json.dumps(want)}; rebuild with `constellation index build`")


