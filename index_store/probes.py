"""Probe files: the texts per domain that place each specialist's centroid (``[index].probes``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class ProbeError(ValueError):
    """The probe file is missing or malformed."""


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


