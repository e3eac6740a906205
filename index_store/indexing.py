"""Building an index: fingerprint the probes, make the basis and its diagnostics, calibrate the
weighting on held-out index probes, store it all atomically (``constellation index build``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from composer import basis as basis_mod
from composer.constellation import Constellation
from .calibrate import calibrate
from .config import ConstellationConfig, load_config
from .fingerprints import centroids, index_basis, probe_order
from .loader import settings_of
from .models import load_generalist, load_models, model_identity, pick_device, pick_dtype
from .probes import load_mixed, load_probes, mixed_hash, probes_hash
from .store import write_index


def index_from_centroids(cfg: ConstellationConfig, probes: dict[str, list[str]], order: list[str],
                         all_c: torch.Tensor, identity: str, architecture: str,
                         mixed: list[tuple[str, list[str]]] = ()) -> tuple[dict, dict]:
    """Basis, diagnostics and manifest from the raw centroids of ``order`` (the specialists first,
    then control domains): what ``build_index`` writes, and what a catalog change writes. ``mixed``:
    the probe file's mixed probes (their hash is recorded: calibration read them)."""
    n = len(cfg.specialists)
    raw = all_c[:n]
    nf, kind = cfg.index.noise_fraction, cfg.index.basis
    used, E = index_basis(raw, cfg)
    diag = basis_mod.diagnostics(used, E, list(cfg.specialists))
    diag["raw_cosine_without_noise"] = [[float(v) for v in r] for r in basis_mod.cosine_matrix(raw)]
    controls = [d for d in order if d not in cfg.specialists]
    if controls:
        cos = basis_mod.cosine_matrix(all_c)
        diag["controls"] = {
            c: {
                "cosine": {d: float(cos[order.index(c), j]) for j, d in enumerate(cfg.specialists)},
                "alpha": {d: float(a) for d, a in zip(cfg.specialists,
                                                      (all_c[order.index(c)] / all_c[order.index(c)].norm()) @ E.T)},
            }
            for c in controls
        }
    manifest = {
        "domains": list(cfg.specialists),
        "probe_domains": order,
        "probe_counts": {d: len(probes[d]) for d in order},
        "probes_sha256": probes_hash(probes),
        **({"mixed_probes": len(mixed), "mixed_probes_sha256": mixed_hash(list(mixed))} if mixed else {}),
        "generalist_identity": identity,
        "generalist_architecture": architecture,
        "weights": cfg.weights,
        "d": int(all_c.shape[1]),
        "settings": {"basis": kind, "noise_fraction": nf, "seed": cfg.index.seed, "max_tokens": cfg.index.max_tokens,
                     "calibrate": cfg.index.calibrate},
        "diagnostics": diag,
        "catalog_version": cfg.catalog.version,
    }
    return {"basis": E, "centroids": used, "raw_centroids": all_c}, manifest


def ensure_index(cfg: ConstellationConfig, log=None, quiet: bool = False) -> bool:
    """Build the index for ``cfg``'s weights (``cfg.index_path``) if it is not there; True if built."""
    if (cfg.index_path / "manifest.json").is_file():
        return False
    if log is not None:
        log(f"building the index for {cfg.runtime.weights} weights at {cfg.index_path} (once)")
    build_index(cfg, quiet=quiet)
    return True


def build_index(config: str | Path | ConstellationConfig, quiet: bool = False) -> dict:
    """Fingerprint the probes with G, build centroids, basis and diagnostics; with
    ``[index].calibrate`` (default) load the specialists and calibrate the weighting on held-out
    index probes (index_store.calibrate); store atomically. Returns the manifest written.
    """
    cfg = config if isinstance(config, ConstellationConfig) else load_config(config)
    t0 = time.perf_counter()
    device = pick_device(cfg.runtime.device)
    dtype = pick_dtype(cfg.runtime.dtype, device)
    probes = load_probes(cfg.index.probes)
    mixed = load_mixed(cfg.index.probes)
    order = probe_order(cfg, probes)
    if cfg.index.calibrate:
        g, tok, specialists, diffs, _, _ = load_models(cfg, device, dtype, quiet=quiet)
    else:
        g, tok = load_generalist(cfg, device, dtype, quiet)
    fps: dict[str, torch.Tensor] = {}
    all_c = centroids(g, tok, probes, order, cfg, quiet=quiet, keep=fps)
    tensors, manifest = index_from_centroids(cfg, probes, order, all_c, model_identity(cfg.generalist.path),
                                             g.mc.architecture, mixed)
    if cfg.index.calibrate:
        c = Constellation(g, specialists, tensors["basis"], settings_of(cfg), diffs or None)
        manifest["calibration"] = calibrate(c, tok, probes, fps, cfg, quiet=quiet, mixed=mixed)
    manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
    write_index(cfg.index_path, tensors, manifest)
    return manifest
