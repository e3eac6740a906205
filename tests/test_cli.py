"""The ``constellation`` command as a user runs it (a real subprocess)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from composer.modes import CompositionParams
from index_store.loader import load_constellation

EXE = [sys.executable, "-m", "server.cli"]
ROOT = Path(__file__).resolve().parents[1]


def run(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([*EXE, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture()
def conf(built, tmp_path):
    src = built("gpt2", domains=("medical", "legal", "code")).parent
    shutil.copytree(src, tmp_path / "c")
    return tmp_path / "c" / "constellation.toml"


def test_help_explains_the_commands():
    out = run("--help").stdout
    for word in ("index", "explain"):
        assert word in out
    assert "--node-weights" in run("explain", "--help").stdout


def test_index_build_and_inspect(conf):
    shutil.rmtree(conf.parent / "index")
    p = run("index", "build", conf)
    assert "index written" in p.stdout and "fingerprinting probes" in p.stderr
    # the recommendation says what it is, beside the mode in force (the config sets none: the default)
    assert "the paper's rule of thumb" in p.stdout and "[composition].mode, constellation (the default)" in p.stdout
    doc = json.loads(run("index", "inspect", conf.parent / "index", "--json").stdout)
    for key in ("domains", "raw_cosine", "mean_collinearity", "post_gs_max_abs_cos", "residual_ratios",
                "recommendation"):
        assert key in doc
    assert doc["domains"] == ["medical", "legal", "code"]
    assert len(doc["raw_cosine"]) == 3 and doc["raw_cosine"][1][1] == pytest.approx(1.0)
    assert doc["post_gs_max_abs_cos"] <= 1e-9
    text = run("index", "inspect", conf.parent / "index").stdout
    assert "raw centroid cosine" in text and f"recommendation: {doc['recommendation']}, by the paper's" in text
    assert "Advice only" in text and doc["basis"] == "symmetric" and "does not use them" in text  # the residuals


def test_explain_json_equals_the_library(conf):
    prompt = "The contract clause licensee warranty court."
    doc = json.loads(run("explain", "--config", conf, "--json", "--node-weights", prompt).stdout)
    loaded = load_constellation(conf)
    c = loaded.constellation
    gp = loaded.analyze([prompt])
    plan = c.plan(gp, 0, CompositionParams())
    assert doc["alpha"] == pytest.approx({d: float(a) for d, a in zip(c.domains, gp.alpha[0])}, abs=1e-9)
    assert doc["selected"] == [c.domains[i] for i in plan.selected]
    assert doc["entropy_bits"] == pytest.approx(plan.mean_entropy_bits, abs=1e-9)
    for r, i in enumerate(plan.selected):
        assert doc["node_weights"][c.domains[i]] == pytest.approx(plan.node_weights[r].tolist(), abs=1e-7)
    for key in ("gini", "fallback", "layers", "policy", "signature", "mean_node_weight", "index"):
        assert key in doc
    text = run("explain", "--config", conf, prompt)
    assert "alpha" in text.stdout and "entropy" in text.stdout and "resident" in text.stderr


def test_explain_modes_from_the_command_line(conf):
    doc = json.loads(run("explain", "--config", conf, "--json", "--mode", "weights", "--weights",
                         '{"code": 1}', "x").stdout)
    assert doc["selected"] == ["code"] and doc["mean_node_weight"]["code"] == pytest.approx(1.0)
    p = run("explain", "--config", conf, "--mode", "generalist", "--top-k", "2", "x", check=False)
    assert p.returncode == 2 and "does not apply to mode 'generalist'" in p.stderr


def test_errors_are_one_clear_line(conf, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(conf.read_text().replace("top_k = 3", "top_k = -1"))
    p = run("explain", "--config", bad, "x", check=False)
    assert p.returncode == 2
    assert str(bad) in p.stderr and "[composition].top_k" in p.stderr and "Traceback" not in p.stderr
    p = run("index", "inspect", tmp_path, check=False)
    assert p.returncode == 2 and "manifest.json" in p.stderr and "Traceback" not in p.stderr


# ---- errors before any loading (issue 13) --------------------------------------------------------
# These run main() in-process on a config whose every folder and file exists but holds no model: a
# command that reports the expected one-line error with it did not get as far as loading the models
# (it would have failed on the empty generalist folder with another message).

UNLOADABLE = """[generalist]
path = "g"

[specialists]
medical = "medical"
legal = "legal"
code = "code"

[index]
path = "index"
probes = "probes.json"

[composition]
top_k = 3
"""


@pytest.fixture()
def unloadable(tmp_path):
    root = tmp_path / "u"
    for d in ("g", "medical", "legal", "code", "index"):
        (root / d).mkdir(parents=True)
    (root / "probes.json").write_text(json.dumps({"domains": {d: ["a text"] for d in ("medical", "legal", "code")}}))
    conf = root / "constellation.toml"
    conf.write_text(UNLOADABLE)
    return conf


def cli(capsys, *args) -> tuple[int, str, str]:
    """``constellation ARGS`` in-process: (exit status, stdout, stderr)."""
    from server.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse: --help, --version, usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("constellation: "), err
    assert "Traceback" not in err and "<class" not in err
    return lines[0]


@pytest.mark.parametrize("old, new, expected", [
    ("top_k = 3", "top_k = -1", "[composition].top_k: Input should be greater than or equal to 1"),
    ('medical = "medical"', "medical = 5", "[specialists].medical: must be a path (a string), got an integer"),
    ('medical = "medical"', 'medical = "nowhere"', "[specialists].medical: folder "),
    ("top_k = 3", "top_k = 9", "[composition].top_k: 9 exceeds the 3 specialist(s)"),
    ('probes = "probes.json"', 'probes = "missing.json"', "[index].probes: file "),
    ('path = "g"', 'path = "gone"', "[generalist].path: folder "),
    ("top_k = 3", 'top_k = 3\nlayers = "all"', "[composition].layers: "),
])
@pytest.mark.parametrize("command", [["explain", "x"], ["serve", "--port", "0"]])
def test_config_errors_are_one_line_naming_file_and_key(capsys, unloadable, old, new, expected, command):
    unloadable.write_text(UNLOADABLE.replace(old, new))
    code, _, err = cli(capsys, command[0], "--config", unloadable, *command[1:])
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"constellation: {unloadable}: ") and expected in line, line
    if "folder " in expected or "file " in expected:
        assert "does not exist" in line


def test_missing_probe_file_is_refused_by_index_build(capsys, unloadable):
    (unloadable.parent / "probes.json").unlink()
    code, _, err = cli(capsys, "index", "build", unloadable)
    line = one_error_line(err)
    assert code == 2 and str(unloadable) in line and "[index].probes" in line and "probes.json" in line


def test_top_k_beyond_the_specialists_is_refused_by_the_loader(unloadable):
    from index_store.config import ConfigError

    unloadable.write_text(UNLOADABLE.replace("top_k = 3", "top_k = 4"))
    with pytest.raises(ConfigError, match=r"\[composition\]\.top_k: 4 exceeds the 3 specialist"):
        load_constellation(unloadable)  # before the (empty) model folders are read


@pytest.mark.parametrize("args, expected", [
    (["--weights", "notjson"], "constellation: --weights: not valid JSON"),
    (["--mode", "bogus"], "constellation: --mode: unknown composition mode 'bogus' (choose from constellation,"),
    (["--mode", "weights"], "constellation: --weights: mode 'weights' needs composition.weights"),
    (["--mode", "weights", "--weights", "[1]"], "constellation: --weights: Input should be a valid dictionary"),
    (["--mode", "weights", "--weights", '{"nope": 1}'], "constellation: --weights: composition.weights names unknown"),
    (["--top-k", "4"], "constellation: --top-k: composition.top_k=4 exceeds the 3 specialists"),
    (["--top-k", "0"], "constellation: --top-k: must be an integer of at least 1"),
    (["--mode", "logit", "--lambda", "3"], "constellation: --lambda: composition.lambda=3.0 is outside [0, 1]"),
    (["--lambda", "nan"], "constellation: --lambda: must be a finite number"),
])
def test_explain_options_are_checked_before_loading(capsys, unloadable, args, expected):
    code, _, err = cli(capsys, "explain", "--config", unloadable, *args, "x")
    assert code == 2 and one_error_line(err).startswith(expected), err


def test_explain_refuses_an_empty_prompt_as_the_server_does(capsys, unloadable):
    code, _, err = cli(capsys, "explain", "--config", unloadable, "")
    assert code == 2 and one_error_line(err).startswith("constellation: PROMPT: the prompt is empty")


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "eighty"])
def test_serve_port_out_of_range_is_a_usage_error(capsys, unloadable, port):
    code, _, err = cli(capsys, "serve", "--config", unloadable, "--port", port)
    line = one_error_line(err)
    assert code == 2 and line.startswith("constellation: --port: must be a port number from 1 to 65535"), line


def test_serve_numeric_limits_are_usage_errors(capsys, unloadable):
    for args, option in [(["--max-running", "0"], "--max-running"), (["--threads", "-2"], "--threads"),
                         (["--drain-timeout", "inf"], "--drain-timeout"),
                         (["--max-prompt-tokens", "4096", "--max-seq-len", "2048"], "--max-prompt-tokens"),
                         (["--kv-cache-tokens", "1000", "--max-seq-len", "2048"], "--kv-cache-tokens")]:
        code, _, err = cli(capsys, "serve", "--config", unloadable, "--port", "0", *args)
        assert code == 2 and one_error_line(err).startswith(f"constellation: {option}: "), err


def test_busy_port_is_refused_before_the_models_load(capsys, unloadable):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = cli(capsys, "serve", "--config", unloadable, "--port", port)
    line = one_error_line(err)
    assert code == 2
    assert line == f"constellation: --port {port}: cannot listen on 127.0.0.1:{port}: address already in use"


# ---- help, version, banner ----------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["index"], ["index", "build"], ["index", "inspect"], ["explain"], ["serve"],
                                     ["eval"], ["demo"], ["demo", "build"], ["demo", "train"], ["demo", "report"],
                                     ["specialist"], ["specialist", "extract"]])
def test_help_prints_percent_signs_once(capsys, command):
    code, out, _ = cli(capsys, *command, "--help")
    assert code == 0 and out.startswith("usage: constellation")
    assert "%%" not in out and "%(" not in out
    if command == ["eval"]:
        assert "95% CIs" in " ".join(out.split())


def test_explain_help_lists_every_mode(capsys):
    from composer.modes import MODES

    _, out, _ = cli(capsys, "explain", "--help")
    help_text = " ".join(out.split())
    assert all(m in help_text for m in MODES), (list(MODES), help_text)


def test_version():
    from importlib.metadata import version

    assert run("--version").stdout.strip() == f"constellation {version('constellation')}"


def test_banner_never_prints_the_api_key():
    from server.serve import examples

    banner = examples("0.0.0.0", 8080, "constellation", "s3cret-key")
    assert "s3cret-key" not in banner and "API key: required" in banner
    assert banner.count("$CONSTELLATION_API_KEY") == 3 and 'os.environ["CONSTELLATION_API_KEY"]' in banner
    assert "http://127.0.0.1:8080/" in banner
    open_banner = examples("::", 8080, "constellation", None)
    assert "API key: none" in open_banner and "Authorization" not in open_banner
    assert "http://[::1]:8080/" in open_banner


def banner_examples(text: str) -> list[str]:
    """The banner's examples as pasted into a shell: indented blocks between blank lines, no comments."""
    blocks = text.split("\n\n")
    return [b.strip() for b in blocks if b.startswith("  ") and not b.lstrip().startswith("#")]


def test_serve_on_a_port_bound_before_loading(conf):
    """The real server on ``--port 0``: the port is bound before the models load and served; the
    banner names the port the system picked and never the key; Ctrl+C exits 0."""
    import signal
    import threading
    import time

    import httpx

    env = dict(os.environ, PYTHONPATH=str(ROOT), CONSTELLATION_API_KEY="s3cret-key")
    proc = subprocess.Popen([*EXE, "serve", "--config", str(conf), "--port", "0", "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 120
        while not any("-c 'import os" in line for line in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines)
            time.sleep(0.05)
        text = "".join(lines)
        assert "API key: required" in text, text
        url = text.split("Constellation is serving 'constellation' at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        assert httpx.get(url + "/ready", timeout=30).status_code == 200
        pasted = banner_examples(text)
        assert len(pasted) == 3 and pasted[2].startswith(f"{sys.executable} -c "), pasted
        shell = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/"),
                 "CONSTELLATION_API_KEY": "s3cret-key"}  # a plain shell: no venv, no PYTHONPATH
        chat, explain, client = (subprocess.run(["bash", "-c", cmd], env=shell, capture_output=True, text=True,
                                                timeout=120) for cmd in pasted)
        assert client.returncode == 0, client.stderr  # the banner's interpreter has the OpenAI client
        assert "choices" in json.loads(chat.stdout) and "selected" in json.loads(explain.stdout), (chat, explain)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        reader.join(timeout=10)
        assert "s3cret-key" not in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_make_help_and_the_benchmarks_use_the_cache_in_use(tmp_path):
    """`make help` names $CONSTELLATION_CACHE when it is set (else ~/.cache/constellation), and the
    peers' build cache it names is where bench.llamacpp and bench.vllm put it."""
    env = {k: v for k, v in os.environ.items() if k not in ("CONSTELLATION_CACHE", "XDG_CACHE_HOME")}
    plain = subprocess.run(["make", "-s", "help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and "~/.cache/constellation/peers" in plain.stdout, plain.stderr
    env["CONSTELLATION_CACHE"] = str(tmp_path / "cc")
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60).stdout
    assert f"{tmp_path / 'cc'}/peers" in out and f"not the demo's cache, {tmp_path / 'cc'})" in out, out
    assert "~/.cache" not in out
    code = "import bench.llamacpp, bench.vllm; print(bench.llamacpp.CACHE, bench.vllm.CACHE)"
    got = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=120)
    assert got.stdout.split() == [str(tmp_path / "cc" / "peers")] * 2, got.stderr
