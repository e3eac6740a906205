"""``constellation serve`` as users run it, in its own process on a free loopback port.

Benchmarks that compare the server with peers measure this, not an app inside the benchmark's own
process: the server runs its engine loop on its main thread (``server/serve.py``), and a client in
the same process would share the interpreter and the cores' OpenMP team with it.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cmd(config: Path, port: int, flags: dict[str, object]) -> list[str]:
    """``python -m server.cli serve --config CONFIG --port PORT --flag value ...`` (None values dropped;
    True / False: ``--flag`` / ``--no-flag``)."""
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port),
           "--log-level", "warning"]
    for name, value in flags.items():
        flag = name.replace('_', '-')
        if isinstance(value, bool):
            cmd.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            cmd += [f"--{flag}", str(value)]
    return cmd


class ServerProcess:
    """``with ServerProcess(cmd, log_file, ready_path, name) as url:`` — an HTTP server process on
    ``port``, its output in ``log_file``; ``url`` once ``ready_path`` answers 200; on exit SIGTERM
    (a server that drains gets to finish), then kill after ``stop_timeout``."""

    def __init__(self, cmd: list[str], port: int, log_file: Path, ready_path: str, name: str,
                 start_timeout: float = 300.0, stop_timeout: float = 60.0, cwd: Path | None = None,
                 env: dict | None = None):
        self.cmd, self.port, self.url = cmd, port, f"http://127.0.0.1:{port}"
        self.env = env
        self.log_file, self.ready_path, self.name = Path(log_file), ready_path, name
        self.start_timeout, self.stop_timeout, self.cwd = start_timeout, stop_timeout, cwd
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_file.open("wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_file}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"{self.name} did not become ready; see {self.log_file}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class ServedConstellation(ServerProcess):
    """``with ServedConstellation(config, log_file, max_running=16) as url:`` — ``constellation serve``
    with these flags; ``url`` once /ready is ok; on exit SIGTERM (the server drains) and wait."""

    def __init__(self, config: Path, log_file: Path, start_timeout: float = 300.0, compile_timeout: float = 1800.0,
                 **flags):
        port = free_port()
        super().__init__(serve_cmd(config, port, flags), port, log_file, "/ready", "constellation serve",
                         start_timeout, cwd=Path(__file__).resolve().parents[1])
        self.compile_timeout = compile_timeout

    def __enter__(self) -> str:
        """Ready, and its captured decode steps built (a server that compiles them does so in the
        background, decoding eagerly meanwhile: a benchmark measures what it serves afterwards)."""
        url = super().__enter__()
        deadline = time.monotonic() + self.compile_timeout
        while True:
            graphs = httpx.get(url + "/ready", timeout=5).json().get("decode_graphs")
            if graphs is None or graphs["error"] or graphs["built"]:
                return url
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"{self.name} did not finish compiling its decode steps; see {self.log_file}")
            time.sleep(1.0)
