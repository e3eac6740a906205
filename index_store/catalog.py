"""The catalog: which specialists a constellation composes, their probes and the index, as one
versioned snapshot that changes atomically.

A constellation is its config file (``constellation.toml``) and what it names. A change (add,
replace or remove a specialist) writes a new snapshot beside the config::

    .catalog/v000004/probes.json     every domain's probes after the change
    .catalog/v000004/index/          the index built from them (store.write_index)

complete and fsynced under a temporary name, then renamed into place; then the config file itself
is rewritten (temporary file, fsync, rename) to name the new snapshot and bump
``[catalog].version``. That rename is the commit point: a crash before it leaves the old config,
whose snapshot is untouched; after it, the new config, whose snapshot is complete. Old snapshots
are pruned after the commit (the newest ``[catalog].keep`` stay). Changes are serialised by an
exclusive lock on ``.catalog/lock`` (``flock``), across processes on the same volume.

Only the changed domain's probes are fingerprinted: the other centroids come from the current index
(its probes are verified by hash). The basis is rebuilt from all centroids (``symmetric``: every
axis moves; ``gram_schmidt``: the earlier axes stay, a new one is appended).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from composer.basis import BasisError
from composer.weights import WeightsError, check_same_config

from .config import ConfigError, ConstellationConfig, load_config
from .calibrate import carried
from .fingerprints import centroids, probe_order
from .indexing import index_from_centroids
from .models import check_on_quantized, check_same_tokenizer, load_generalist, load_tokenizer
from .peft import is_adapter_folder, load_adapter
from .probes import load_mixed, load_probes, probes_hash
from .store import _fsync_dir, read_index, write_index

CATALOG = ".catalog"
MIN_PROBES = 4
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class CatalogError(ValueError):
    """A change the catalog refuses; nothing was written. ``status`` is the HTTP status the admin
    API answers with (400 bad input, 404 unknown name, 409 conflict)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class Change:
    """``op`` is ``add``, ``replace`` or ``remove``; ``probes``: the domain's probe texts."""

    op: str
    name: str
    path: Path | None = None
    probes: list[str] | None = None


@dataclass
class Result:
    config: ConstellationConfig
    manifest: dict
    version: int
    fingerprinted: list[str] = field(default_factory=list)
    seconds: float = 0.0


def failpoint(step: str) -> None:
    """Crash here if ``CONSTELLATION_FAILPOINT`` names this step (the kill-at-each-step test)."""
    if os.environ.get("CONSTELLATION_FAILPOINT") == step:
        os._exit(86)


STEPS = ("snapshot-tmp-written", "snapshot-renamed", "config-tmp-written", "config-renamed", "pruned")


# ---- the config file, rewritten ------------------------------------------------------------------
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {type(v).__name__} values to TOML")


def to_toml(raw: dict) -> str:
    """A config (tables of scalars and arrays, as constellation.toml is) as TOML text."""
    lines = ["# Managed by `constellation specialist` (catalog snapshots in .catalog/); edits are kept",
             "# but comments are not."]
    for table, body in raw.items():
        if not isinstance(body, dict):
            raise ConfigError(f"[{table}] is not a table")
        lines += ["", f"[{table}]"]
        lines += [f"{json.dumps(k) if not re.fullmatch(r'[A-Za-z0-9_-]+', k) else k} = {_toml_value(v)}"
                  for k, v in body.items()]
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o644)  # mkstemp makes it 0600
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        failpoint("config-tmp-written")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# ---- checks ------------------------------------------------------------------------------------
def check_under_root(cfg: ConstellationConfig, path: Path, given, param: str) -> None:
    """Refuse (403) a path given to the admin API (``param``) outside ``[catalog].models_root`` once
    resolved, and every path when the config sets no models root (naming the key and the file)."""
    root = cfg.catalog.models_root
    if root is None:
        raise CatalogError(f"{param} {given}: this server takes no paths through the admin API: its config "
                           f"({cfg.source}) sets no [catalog].models_root, the folder specialists may be added "
                           "from (set it and restart the server; docs/catalog.md)", 403, param)
    if not path.is_relative_to(root.resolve()):
        raise CatalogError(f"{param} {given}: outside [catalog].models_root ({root})", 403, param)


def check_change(cfg: ConstellationConfig, change: Change, root_only: bool = False) -> None:
    """Refuse a change that cannot be honoured, before any work (nothing written)."""
    names = list(cfg.specialists)
    if change.op not in ("add", "replace", "remove"):
        raise CatalogError(f"unknown operation {change.op!r}")
    if not NAME.match(change.name or ""):
        raise CatalogError(f"name {change.name!r}: letters, digits, '-' or '_' (at most 64), starting with a "
                           "letter or digit", param="name")
    if change.op == "add" and change.name in names:
        raise CatalogError(f"a specialist named '{change.name}' exists; replace it instead (`constellation "
                           'specialist replace`, or "replace": true)', 409, "name")
    if change.op in ("replace", "remove") and change.name not in names:
        raise CatalogError(f"no specialist named '{change.name}' (have: {', '.join(names)})", 404, "name")
    if change.op == "remove":
        if len(names) == 1:
            raise CatalogError(f"'{change.name}' is the last specialist; a constellation needs one", 409, "name")
        if cfg.composition.top_k > len(names) - 1 and "top_k" in cfg.composition.model_fields_set:
            raise CatalogError(f"{cfg.source}: [composition].top_k = {cfg.composition.top_k} would exceed the "
                               f"{len(names) - 1} specialists left; lower it in the config first (servers read it "
                               "when they start)", 409)
        return
    if change.op == "replace" and change.path is None and change.probes is None:
        raise CatalogError("nothing to replace: give a new folder and/or new probes", param="path")
    if change.path is None and change.op == "replace":
        change.path = cfg.specialists[change.name]  # replace the probes only
    if change.path is None:
        raise CatalogError("path: required (a PEFT adapter folder or a full model folder)", param="path")
    path = Path(change.path).expanduser().resolve()
    if root_only:
        check_under_root(cfg, path, change.path, "path")
    if not path.is_dir():
        raise CatalogError(f"path {change.path}: folder not found", param="path")
    probes = change.probes
    if probes is None and change.op == "add":
        raise CatalogError(f"probes: required to place a new domain (at least {MIN_PROBES} texts)", param="probes")
    if probes is not None:
        if not isinstance(probes, list) or not all(isinstance(t, str) and t.strip() for t in probes):
            raise CatalogError("probes: a list of non-empty strings", param="probes")
        if len(probes) < MIN_PROBES:
            raise CatalogError(f"probes: {len(probes)} given, at least {MIN_PROBES} needed for a centroid",
                               param="probes")


def check_fits(cfg: ConstellationConfig, name: str, path: Path, g, tok) -> None:
    """The specialist loads against the generalist ``g`` (an adapter's targets and shapes, a full
    model's config and tokenizer), or CatalogError naming the problem."""
    try:
        if is_adapter_folder(path):
            check_on_quantized(g, name, path, load_adapter(path, g, g.device, g.dtype))
        else:
            check_on_quantized(g, name, path)
            check_same_config(cfg.generalist.path, path, name)
            check_same_tokenizer(tok, load_tokenizer(path), name, path)
    except (WeightsError, ValueError) as e:
        kind = "PEFT adapter" if is_adapter_folder(path) else "full model (no adapter_config.json: not an adapter)"
        raise CatalogError(f"path {path}: as a {kind}, it does not fit the generalist: {e}", 422, "path") from None


# ---- the change --------------------------------------------------------------------------------
@contextmanager
def locked(config_path: Path):
    """Hold the catalog's lock: one change at a time, across processes."""
    folder = config_path.parent / CATALOG
    folder.mkdir(exist_ok=True)
    with open(folder / "lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _relative(path: Path, base: Path) -> str:
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def apply(config_path: str | Path, change: Change, generalist=None, root_only: bool = False,
          quiet: bool = True, weights: tuple[str, int | None] | None = None) -> Result:
    """Apply ``change`` to the constellation at ``config_path`` and commit it (see the module doc).
    ``generalist``: ``(g, tokenizer)`` already loaded (the server's), else loaded here when needed.
    The change is made to the index of the weights the server runs (the generalist's format, else
    ``weights``, else the config's ``[runtime].weights``); the snapshot holds that format's index."""
    config_path = Path(config_path).expanduser().resolve()
    t0 = time.perf_counter()
    with locked(config_path):
        cfg = load_config(config_path)
        g, tok = generalist or (None, None)
        if g is not None:  # the index of the weights the server runs
            cfg = cfg.with_weights(g.weights_format, g.weights_group)
        elif weights is not None:
            cfg = cfg.with_weights(*weights)
        check_change(cfg, change, root_only)
        if not (cfg.index_path / "manifest.json").is_file():
            w = cfg.runtime.weights
            raise CatalogError(f"{cfg.index_path}: no index for the generalist's {w} weights, which this change "
                               f"is for; build it first with `constellation index build {config_path} --weights "
                               f"{w}`" + (f" --int4-group {cfg.runtime.int4_group}" if w == "int4" else ""),
                               409, "weights")
        probes = load_probes(cfg.index.probes)
        manifest, tensors = read_index(cfg.index_path)
        mixed = load_mixed(cfg.index.probes)
        version = cfg.catalog.version + 1
        snap_name = f"v{version:06d}"
        raw, new_probes = _changed(tomllib.loads(config_path.read_text()), probes, change, config_path.parent,
                                   snap_name, version)
        mixed = [m for m in mixed if set(m[1]) <= set(new_probes)]  # those whose domains are all still there
        new_cfg = ConstellationConfig.model_validate(raw).resolved(config_path.parent)
        new_cfg.source = config_path
        new_cfg = new_cfg.with_weights(cfg.runtime.weights, cfg.runtime.int4_group)
        # centroids: the current index's for domains whose probes did not change
        old_order = manifest["probe_domains"]
        reuse = {d: tensors["raw_centroids"][i] for i, d in enumerate(old_order)
                 if d in new_probes and probes.get(d) == new_probes[d]}
        order = probe_order(new_cfg, new_probes)
        needs_g = change.op != "remove" and (g is None)
        if needs_g:
            g, tok = load_generalist(new_cfg)
        if change.op != "remove":
            check_fits(new_cfg, change.name, Path(change.path).expanduser().resolve(), g, tok)
        todo = [d for d in order if d not in reuse]
        all_c = centroids(g, tok, new_probes, order, new_cfg, reuse, quiet)  # fingerprints ``todo`` only
        try:
            new_tensors, new_manifest = index_from_centroids(new_cfg, new_probes, order, all_c,
                                                             manifest["generalist_identity"],
                                                             manifest["generalist_architecture"], mixed)
        except BasisError as e:  # e.g. probes whose centroid another domain's already spans
            raise CatalogError(f"probes: the new set of centroids has no basis ({e}); give the domain probes "
                               "that set it apart", 422, "probes") from None
        if "calibration" in manifest:
            new_manifest["calibration"] = carried(manifest["calibration"], list(new_cfg.specialists),
                                                  None if change.op == "remove" else change.name)
        new_manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
        _write_snapshot(config_path.parent / CATALOG, snap_name, new_probes, new_tensors, new_manifest,
                        new_cfg.index_path.name, mixed)
        _write_atomically(config_path, to_toml(raw))  # the commit point
        failpoint("config-renamed")
        prune(config_path.parent / CATALOG, new_cfg.catalog.keep)
        failpoint("pruned")
    return Result(new_cfg, new_manifest, version, todo, time.perf_counter() - t0)


def _changed(raw: dict, probes: dict, change: Change, folder: Path, snap_name: str, version: int
             ) -> tuple[dict, dict]:
    """The config (as parsed TOML) and the probes after ``change``, naming snapshot ``snap_name``."""
    specialists, new_probes = dict(raw.get("specialists", {})), dict(probes)
    if change.op == "remove":
        specialists.pop(change.name)
        new_probes.pop(change.name, None)
    else:
        # as given (absolute, symlinks kept), relative to the config's folder when inside it
        specialists[change.name] = _relative(Path(change.path).expanduser().absolute(), folder)
        if change.probes is not None:
            new_probes[change.name] = list(change.probes)
    raw = {**raw, "specialists": specialists,
           "index": {**raw["index"], "path": f"{CATALOG}/{snap_name}/index",
                     "probes": f"{CATALOG}/{snap_name}/probes.json"},
           "catalog": {**raw.get("catalog", {}), "version": version}}
    return raw, new_probes


def _write_snapshot(folder: Path, name: str, probes: dict, tensors: dict, manifest: dict, index: str = "index",
                    mixed: list = ()) -> Path:
    """``folder/name`` complete (probes and the index, as ``index``, fsynced) or not there at all."""
    final = folder / name
    if final.exists():  # left by a change that crashed before its commit: never committed, so unused
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder))
    try:
        # as the constellation's folder (mkdtemp makes 0700: servers running as another user could not read it)
        os.chmod(tmp, folder.parent.stat().st_mode & 0o777)
        with open(tmp / "probes.json", "w") as f:
            os.fchmod(f.fileno(), 0o644)
            doc = {"domains": probes, **({"mixed": [{"text": t, "domains": d} for t, d in mixed]} if mixed else {})}
            f.write(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        write_index(tmp / index, tensors, manifest)
        _fsync_dir(tmp)
        failpoint("snapshot-tmp-written")
        os.rename(tmp, final)
        _fsync_dir(folder)
        failpoint("snapshot-renamed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune(folder: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` snapshots, and temporary folders of crashed changes."""
    snaps = sorted(p for p in folder.glob("v[0-9]*") if p.is_dir())
    for p in snaps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in folder.glob(".v*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def read_probe_texts(path: str | Path, name: str, what: str = "probes_path") -> list[str]:
    """A domain's probe texts: a JSON list, a probe file ``{"domains": {NAME: [...]}}``, or a .txt
    file with one text per line."""
    p = Path(path)
    if not p.is_file():
        raise CatalogError(f"{what} {path}: file not found")
    text = p.read_text()
    if p.suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CatalogError(f"{what} {path}: not valid JSON ({e}); use a .txt file for one text per line") from None
    if isinstance(data, dict):
        doms = data.get("domains") if isinstance(data.get("domains"), dict) else {}
        if name not in doms:
            raise CatalogError(f"{what} {path}: no domains.{name} in it (has: {', '.join(doms) or 'none'})")
        data = doms[name]
    if not isinstance(data, list):
        raise CatalogError(f"{what} {path}: expected a list of texts")
    return data


def listing(cfg: ConstellationConfig, manifest: dict) -> list[dict]:
    """The specialists as ``specialist list`` and ``GET /v1/specialists`` show them."""

    probes = load_probes(cfg.index.probes)
    out = []
    for name, path in cfg.specialists.items():
        adapter = is_adapter_folder(path)
        rank = None
        if adapter:
            try:
                rank = json.loads((path / "adapter_config.json").read_text()).get("r")
            except (OSError, json.JSONDecodeError):
                rank = None
        out.append({"name": name, "kind": "adapter" if adapter else "full", "path": str(path), "rank": rank,
                    "probes": len(probes.get(name, [])),
                    "probes_sha256": probes_hash({name: probes.get(name, [])})})
    return out
