"""Build a small random-weight example constellation (what `make run` shows until the demo lands)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import fixtures  # noqa: E402
from index_store.loader import build_index  # noqa: E402

if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/example")
    conf = root / "constellation.toml"
    if not conf.exists():
        conf = fixtures.build_constellation(root, arch="llama", domains=("medical", "legal", "code", "science"))
        build_index(conf)
    print(conf.resolve())
