"""Probe files: the texts per domain that place each specialist's centroid (``[index].probes``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class ProbeError(ValueError):
    """The probe file is missing or malformed."""


def load_probes(path: Path) -> dict[str, list[str]]:
    return _read(path)[1]


def _read(path: Path) -> tuple[dict, dict[str, list[str]]]:
    """The probe file as parsed, and its checked ``domains``."""
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
    return data, doms


def probes_hash(probes: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(probes, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def load_mixed(path: Path) -> list[tuple[str, list[str]]]:
    """The probe file's optional ``mixed`` section: ``[{"text": ..., "domains": [a, b, ...]}, ...]``, texts
    that blend two or more of its domains. Not used for centroids; calibration (index_store.calibrate)
    fits how the composition blends on them."""
    data, doms = _read(path)
    raw = data.get("mixed", [])
    where = f"{path}: mixed"
    if not isinstance(raw, list):
        raise ProbeError(f'{where} must be a list of {{"text": ..., "domains": [...]}}')
    out = []
    for j, p in enumerate(raw):
        text, names = (p.get("text"), p.get("domains")) if isinstance(p, dict) else (None, None)
        if not isinstance(text, str) or not text.strip():
            raise ProbeError(f"{where}[{j}].text must be a non-empty string")
        if not isinstance(names, list) or len(set(map(str, names))) < 2:
            raise ProbeError(f"{where}[{j}].domains must list at least two different domains")
        unknown = [d for d in names if d not in doms]
        if unknown:
            raise ProbeError(f"{where}[{j}].domains names {unknown}, which the file's domains do not have "
                             f"({', '.join(doms)})")
        out.append((text, list(names)))
    return out


def mixed_hash(mixed: list[tuple[str, list[str]]]) -> str | None:
    """The mixed probes' hash for the manifest (None when there are none)."""
    if not mixed:
        return None
    return hashlib.sha256(json.dumps([[t, d] for t, d in mixed], ensure_ascii=True).encode()).hexdigest()
