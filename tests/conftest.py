import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import fixtures  # noqa: E402

ARCHS = ("llama", "qwen2", "gpt2")
# medical/legal differ from G only in the last L layers; code and science everywhere
DOMAINS = ("medical", "legal", "code", "science")
EVERYWHERE = ("code", "science")


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory):
    return tmp_path_factory.mktemp("constellations")


def _built(root: Path, arch: str, **kw) -> Path:
    from index_store.indexing import build_index

    name = arch + "".join(f"-{k}={v}" for k, v in sorted(kw.items()))
    conf = root / name / "constellation.toml"
    if not conf.exists():
        conf = fixtures.build_constellation(root / name, arch=arch, **kw)
        build_index(conf, quiet=True)
    return conf


@pytest.fixture(scope="session")
def built(fixture_root):
    """``built(arch, **kw)`` -> config path of a fixture constellation with its index built."""
    return lambda arch, **kw: _built(fixture_root, arch, **kw)


@pytest.fixture(scope="session", params=ARCHS)
def mixed_constellation(request, built):
    """Per architecture: 4 specialists, two differing only in the last L layers, two everywhere."""
    from index_store.loader import load_constellation

    conf = built(request.param, domains=DOMAINS, everywhere=EVERYWHERE)
    return load_constellation(conf)


@pytest.fixture(scope="session", params=ARCHS)
def lastL_constellation(request, built):
    """Per architecture: 3 specialists that differ from G only in the last L layers."""
    from index_store.loader import load_constellation

    conf = built(request.param, domains=("medical", "legal", "code"))
    return load_constellation(conf)
