"""On-disk index: safetensors + a self-checking JSON manifest, written atomically, verified on load.

Layout of an index folder::

    manifest.json          format version, domains, hashes, settings, diagnostics, file sha256s
    index.safetensors      basis [N, d], centroids used [N, d], raw centroids of every probe domain

The manifest carries ``manifest_sha256`` over its own canonical JSON, so a flipped byte anywhere
(tensors via their sha256, the manifest via its checksum and canonical form) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "index.safetensors"


class IndexStoreError(ValueError):
    """An index that is missing, tampered with, or built for something else."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n"


def _body_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(canonical(body).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_index(path: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    """Write atomically: a temp folder beside the target, fsynced, then swapped in by rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, path.parent.stat().st_mode & 0o777)  # as its parent (mkdtemp makes 0700)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        manifest = dict(manifest)
        manifest["format_version"] = FORMAT_VERSION
        manifest["files"] = {TENSORS: sha256_file(tmp / TENSORS)}
        manifest["manifest_sha256"] = _body_hash(manifest)
        with open(tmp / MANIFEST, "w") as f:
            f.write(canonical(manifest))
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / TENSORS, "rb") as f:
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(path: Path) -> dict:
    """Parse and self-check ``manifest.json``; verify every listed file's sha256."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise IndexStoreError(f"{path}: index folder not found (build it with `constellation index build CONFIG`)")
    if not mpath.is_file():
        raise IndexStoreError(f"{mpath}: missing; this folder is not a constellation index")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexStoreError(f"{mpath}: corrupt (not valid JSON: {e})") from None
    if not isinstance(manifest, dict):
        raise IndexStoreError(f"{mpath}: corrupt (not a JSON object)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexStoreError(f"{mpath}: format version {version!r} is not supported (expected {FORMAT_VERSION}); "
                          "rebuild the index")
    if manifest.get("manifest_sha256") != _body_hash(manifest):
        raise IndexStoreError(f"{mpath}: checksum mismatch: the manifest was modified after it was written")
    if raw.decode("utf-8") != canonical(manifest):
        raise IndexStoreError(f"{mpath}: not in its canonical form: the file was modified after it was written")
    files = manifest.get("files") or {}
    if TENSORS not in files:
        raise IndexStoreError(f"{mpath}: lists no {TENSORS}")
    for name, digest in files.items():
        fp = path / name
        if not fp.is_file():
            raise IndexStoreError(f"{fp}: missing (listed in the manifest)")
        actual = sha256_file(fp)
        if actual != digest:
            raise IndexStoreError(f"{fp}: sha256 mismatch (manifest {digest[:12]}…, file {actual[:12]}…): "
                              "the file is corrupt or was modified")
    return manifest


def read_index(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    manifest = read_manifest(path)
    try:
        tensors = load_file(str(Path(path) / TENSORS))
    except Exception as e:
        raise IndexStoreError(f"{Path(path) / TENSORS}: unreadable ({e})") from None
    return manifest, tensors


def diagnostics_doc(manifest: dict) -> dict:
    """The diagnostics part of a manifest, as `index inspect --json`, `explain` and /explain show it."""
    diag = manifest["diagnostics"]
    return {
        "domains": diag["domains"],
        "raw_cosine": diag["raw_cosine"],
        "mean_collinearity": diag["mean_collinearity"],
        "post_gs_max_abs_cos": diag["post_gs_max_abs_cos"],
        "residual_ratios": diag["residual_ratios"],
        "recommendation": diag["recommendation"],
        "recommendation_text": diag["recommendation_text"],
        "controls": diag.get("controls", {}),
        "basis": manifest["settings"]["basis"],
        "settings": manifest["settings"],
        "probe_counts": manifest["probe_counts"],
        "generalist_architecture": manifest.get("generalist_architecture"),
        "weights": manifest.get("weights") or {"format": "bf16"},
        "d": manifest["d"],
        "format_version": manifest["format_version"],
        "calibration": manifest.get("calibration"),
    }


def recommendation_note(diag: dict, mode: str | None = None) -> str:
    """What the index's recommendation means: the paper's rule of thumb on the mean collinearity,
    advice that changes nothing, beside the mode requests compose with (``[composition].mode``, when
    known: ``index inspect`` reads an index without its config)."""
    rec, col = diag["recommendation"], diag["mean_collinearity"]
    in_force = (f"the config's [composition].mode, {mode}{' (the default)' if mode == 'constellation' else ''},"
                if mode else "the config's [composition].mode (default constellation)")
    return (f"{rec}, by the paper's rule of thumb on the mean collinearity ({col:.4f}; below 0.93 task arithmetic "
            "suffices, 0.93-0.97 constellation composition, above 0.97 add noise with [index].noise_fraction). "
            f"Advice only: requests compose with {in_force} unless they name a composition.mode.")


def residual_note(basis: str) -> str:
    """What the Gram-Schmidt residual ratios are, and whether this index's basis uses them."""
    what = ("Gram-Schmidt residual ratio |r_k|/|c_k|: how much of a domain's centroid is left once the domains "
            "before it (config order) are projected out; 1 = independent of them, near 0 = spanned by them. A "
            "collinearity diagnostic")
    if basis == "symmetric":
        return what + "; this index's basis is symmetric (Löwdin: all domains alike, order-free) and does not use them"
    return (what + "; this index's gram_schmidt basis is built from these residuals, so its first domain's axis "
            "also carries what all domains share")
