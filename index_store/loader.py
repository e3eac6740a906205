"""Loading a whole constellation from its config: models, tokenizer, index; building the index."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from composer import basis as basis_mod
from composer.constellation import Constellation, GeneralistPass, Settings, share_with_generalist
from composer.model import Transformer
from composer.modes import Calibrated
from composer.weightings import WEIGHTINGS
from composer.weights import (WeightsError, check_same_config, load_model, load_state_dict, normalize_names,
                              safetensor_files)
from .config import ConstellationConfig, check_top_k, load_config
from .store import IndexStoreError, read_index, sha256_file, write_index


class ProbeError(ValueError):
    """The probe file is missing or malformed."""


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


def load_probes(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise ProbeError(f"{path}: probe file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProbeError(f"{path}: not valid JSON ({e})") from None
    doms = data.get("domains") if isinstance(data, dict) else None
    if not isinstance(doms, dict) or not doms:
        raise ProbeError(f'{path}: expected {{"domains": {{"<domain>": ["text", ...], ...}}}}')
    for k, texts in doms.items():
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ProbeError(f"{path}: domains.{k} must be a non-empty list of non-empty strings")
    return doms


def probes_hash(probes: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(probes, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


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


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="probe", file=sys.stderr, disable=quiet, dynamic_ncols=True)


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
    return Transformer(g.mc, g.arch, params, adapter.lowrank)


def load_models(cfg: ConstellationConfig, device: torch.device, dtype: torch.dtype, generalist=None):
    """Load G and the specialists (lean: shared tensors), checking config and tokenizer match.

    A specialist folder holding ``adapter_config.json`` is a PEFT LoRA adapter: it is checked
    against G and kept as factors; any other folder is a full model, kept as the tensors that differ.
    """
    from .peft import is_adapter_folder, load_adapter

    t0 = time.perf_counter()
    if generalist is not None:  # (g, tokenizer) already loaded (a running server's catalog change)
        g, tok = generalist
    else:
        g = load_model(cfg.generalist.path, device, dtype).fuse()  # specialists built on it share the fused layout
        tok = load_tokenizer(cfg.generalist.path)
    specialists, diffs, adapters = {}, {}, {}
    for dom, folder in cfg.specialists.items():
        if is_adapter_folder(folder):
            adapters[dom] = load_adapter(folder, g, device, dtype)
            specialists[dom] = adapter_specialist(g, adapters[dom])
            continue
        check_same_config(cfg.generalist.path, folder, dom)
        check_same_tokenizer(tok, load_tokenizer(folder), dom, folder)
        sparams = normalize_names(load_state_dict(folder, device, dtype), g.arch)
        lean, diff = share_with_generalist(g, sparams, dom)
        specialists[dom] = type(g)(g.mc, g.arch, lean)
        diffs[dom] = diff
    return g, tok, specialists, diffs, adapters, time.perf_counter() - t0


def load_constellation(config: str | Path | ConstellationConfig, generalist: "Loaded | None" = None) -> Loaded:
    """Load and verify a constellation. ``generalist``: a loaded constellation whose generalist
    (weights, tokenizer, identity) is reused, so a catalog change loads only the specialists."""
    cfg = config if isinstance(config, ConstellationConfig) else load_config(config)
    check_top_k(cfg)
    if generalist is not None:
        g0 = generalist.constellation.g
        device, dtype = g0.device, g0.dtype
        reuse, identity = (g0, generalist.tokenizer), generalist.generalist_identity
    else:
        device = pick_device(cfg.runtime.device)
        dtype = pick_dtype(cfg.runtime.dtype, device)
        reuse, identity = None, None
    g, tok, specialists, diffs, adapters, t_load = load_models(cfg, device, dtype, reuse)
    identity = identity or model_identity(cfg.generalist.path)
    manifest, tensors = read_index(cfg.index.path)
    verify_against(manifest, cfg, identity, g.mc.d)
    settings = settings_of(cfg, calibrated_of(manifest, cfg.index.path))
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
    if cal["weighting"] not in WEIGHTINGS or any(w not in WEIGHTINGS for w in cal.get("sharpness", {})):
        raise IndexStoreError(f"{where}: the index was calibrated with weighting(s) this version does not know "
                              f"({cal['weighting']}, {list(cal.get('sharpness', {}))}); rebuild it with "
                              "`constellation index build`")
    return Calibrated(cal["weighting"], {k: float(v) for k, v in cal.get("sharpness", {}).items()},
                      {k: float(v) for k, v in cal.get("strength", {}).items()})


def verify_against(manifest: dict, cfg: ConstellationConfig, identity: str, d: int) -> None:
    """Refuse an index built for other models, domains, probes or settings; say what differs."""
    where = cfg.index.path
    domains = list(cfg.specialists)
    if manifest.get("domains") != domains:
        raise IndexStoreError(f"{where}: index was built for domains {manifest.get('domains')} (in that order) "
                              f"but the config has {domains}; rebuild with `constellation index build`")
    if manifest.get("generalist_identity") != identity:
        raise IndexStoreError(
            f"{where}: index was built from a different generalist (identity "
            f"{str(manifest.get('generalist_identity'))[:12]}…, config's generalist is {identity[:12]}…); "
            "rebuild with `constellation index build`")
    if manifest.get("d") != d:
        raise IndexStoreError(f"{where}: index hidden size {manifest.get('d')} != generalist's {d}")
    if cfg.index.probes.is_file():
        now = probes_hash(load_probes(cfg.index.probes))
        if manifest.get("probes_sha256") != now:
            raise IndexStoreError(f"{where}: index was built from different probes than {cfg.index.probes} "
                                  "(probe-set hash differs); rebuild with `constellation index build`")
    built = manifest.get("settings", {})
    for key in ("basis", "noise_fraction", "seed", "max_tokens", "calibrate"):
        want = getattr(cfg.index, key)
        if key not in built:
            raise IndexStoreError(f"{where}: index was built by an older version, before [index].{key} existed; "
                                  "rebuild it with `constellation index build`")
        if built.get(key) != want:
            raise IndexStoreError(f"{where}: index was built with [index].{key} = {json.dumps(built.get(key))} "
                                  f"but the config says {json.dumps(want)}; rebuild with `constellation index build`")


# ---- building -----------------------------------------------------------------------------------
@torch.inference_mode()
def fingerprints(g, tok, texts: list[str], max_tokens: int, batch_size: int, bar=None) -> torch.Tensor:
    """G's fingerprints of ``texts`` (batched, padding ignored), ``[len(texts), d]`` fp32 on CPU."""
    from composer.constellation import masked_mean

    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i: i + batch_size]
        ids, am = tokenize(tok, chunk, max_tokens, g.device)
        ctx = g.context(am)
        x = g.run_blocks(g.embed(ids, ctx), ctx, 0, g.mc.n_layers)
        out.append(masked_mean(g.final_norm(x), am).cpu())
        if bar is not None:
            bar.update(len(chunk))
    return torch.cat(out)


def centroids(g, tok, probes: dict[str, list[str]], order: list[str], cfg: ConstellationConfig,
              reuse: dict[str, torch.Tensor] | None = None, quiet: bool = False,
              keep: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Each domain's raw centroid ``[len(order), d]`` (fp64): the mean fingerprint of its probes.
    ``reuse``: centroids already known for domains whose probes did not change (a catalog change
    fingerprints only the new domain's probes). ``keep``: filled with each domain's fingerprints."""
    reuse = reuse or {}
    todo = [d for d in order if d not in reuse]
    out = dict(reuse)
    with _progress(sum(len(probes[d]) for d in todo), "fingerprinting probes", quiet or not todo) as bar:
        for dom in todo:
            fp = fingerprints(g, tok, probes[dom], cfg.index.max_tokens, cfg.index.batch_size, bar)
            out[dom] = fp.to(torch.float64).mean(0)
            if keep is not None:
                keep[dom] = fp
    return torch.stack([out[d] for d in order])


def index_basis(raw: torch.Tensor, cfg: ConstellationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The centroids used (with the configured noise) and their basis: for the index, and for each
    calibration fold (index_store.calibrate)."""
    used = basis_mod.add_noise(raw, cfg.index.noise_fraction, cfg.index.seed)
    return used, basis_mod.make_basis(used, cfg.index.basis)


def index_from_centroids(cfg: ConstellationConfig, probes: dict[str, list[str]], order: list[str],
                         all_c: torch.Tensor, identity: str, architecture: str) -> tuple[dict, dict]:
    """Basis, diagnostics and manifest from the raw centroids of ``order`` (the specialists first,
    then control domains): what ``build_index`` writes, and what a catalog change writes."""
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
        "generalist_identity": identity,
        "generalist_architecture": architecture,
        "d": int(all_c.shape[1]),
        "settings": {"basis": kind, "noise_fraction": nf, "seed": cfg.index.seed, "max_tokens": cfg.index.max_tokens,
                     "calibrate": cfg.index.calibrate},
        "diagnostics": diag,
        "catalog_version": cfg.catalog.version,
    }
    return {"basis": E, "centroids": used, "raw_centroids": all_c}, manifest


def probe_order(cfg: ConstellationConfig, probes: dict[str, list[str]]) -> list[str]:
    missing = [d for d in cfg.specialists if d not in probes]
    if missing:
        raise ProbeError(f"{cfg.index.probes}: no probes for specialist domain(s) {missing}")
    return list(cfg.specialists) + [d for d in probes if d not in cfg.specialists]


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
    order = probe_order(cfg, probes)
    if cfg.index.calibrate:
        g, tok, specialists, diffs, _, _ = load_models(cfg, device, dtype)
    else:
        g, tok = load_model(cfg.generalist.path, device, dtype), load_tokenizer(cfg.generalist.path)
    fps: dict[str, torch.Tensor] = {}
    all_c = centroids(g, tok, probes, order, cfg, quiet=quiet, keep=fps)
    tensors, manifest = index_from_centroids(cfg, probes, order, all_c, model_identity(cfg.generalist.path),
                                             g.mc.architecture)
    if cfg.index.calibrate:
        from .calibrate import calibrate

        c = Constellation(g, specialists, tensors["basis"], settings_of(cfg), diffs or None)
        manifest["calibration"] = calibrate(c, tok, probes, fps, cfg, quiet=quiet)
    manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
    write_index(cfg.index.path, tensors, manifest)
    return manifest
