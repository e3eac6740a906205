"""``constellation serve``: load a constellation and run the HTTP server with a graceful drain."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time

import uvicorn

from .engine import Engine, Limits, heap
from .summary import engine_summary


class DrainingServer(uvicorn.Server):
    """SIGTERM: stop accepting (503), finish in-flight requests, then exit 0. A second signal or
    SIGINT exits at once, as uvicorn does."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout: float):
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGTERM and not self.engine.draining:
            logging.getLogger("constellation").info("SIGTERM: draining (new requests get 503)")
            self.engine.drain()
            threading.Thread(target=self._exit_when_idle, daemon=True).start()
            return
        super().handle_exit(sig, frame)

    def _exit_when_idle(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while not self.engine.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True


def bind(host: str, port: int) -> list[socket.socket]:
    """Bind HOST:PORT now, as uvicorn would (every address HOST resolves to, SO_REUSEADDR, IPv6
    sockets v6-only), so a busy port or a bad host is an error before minutes of model loading;
    uvicorn listens on these sockets later, so nobody can take the port in between. OSError
    (``socket.gaierror`` for a host that does not resolve) if any address cannot be bound."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            if sys.platform != "win32":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def examples(host: str, port: int, model: str, api_key: str | None, admin: bool = False,
             python: str = sys.executable) -> str:
    """The start-up banner: examples to paste into a plain shell. The key itself is never printed (the
    banner ends up in logs): the examples read it from $CONSTELLATION_API_KEY. The Python example runs
    ``python``, the server's own interpreter (a venv's, where the OpenAI client is installed with the dev
    extra), by its full path: ``python`` on a shell's PATH may not have ``openai``."""
    import importlib.util
    import shlex

    missing = python == sys.executable and importlib.util.find_spec("openai") is None
    python = shlex.quote(python)
    client = f"  # the OpenAI client first: {python} -m pip install openai\n" if missing else ""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    base = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"
    auth = ' -H "Authorization: Bearer $CONSTELLATION_API_KEY"' if api_key else ""
    key = 'os.environ["CONSTELLATION_API_KEY"]' if api_key else '"unused"'
    note = ("required; the examples read it from $CONSTELLATION_API_KEY (export it first)" if api_key
            else "none; every client is accepted")
    admin_note = ("\nadmin API: on at /v1/specialists (its own key; docs/catalog.md)" if admin else "")
    return f"""
Constellation is serving '{model}' at {base}
API key: {note}{admin_note}

  curl {base}/v1/chat/completions{auth} -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What causes bilateral lung infiltrates?"}}], "max_tokens": 48}}'

  curl {base}/explain{auth} -H "Content-Type: application/json" \\
    -d '{{"prompt": "The licensee shall indemnify the licensor"}}'

{client}  {python} -c 'import os; from openai import OpenAI; c = OpenAI(base_url="{base}/v1", api_key={key}); print(c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Write a Python function that reverses a list."}}], max_tokens=64, extra_body={{"composition": {{"mode": "constellation"}}}}).choices[0].message.content)'
"""


def serve(config_path, host: str, port: int, api_key: str | None, limits: Limits, model_name: str,
          log_level: str = "info", sockets: list[socket.socket] | None = None, admin_key: str | None = None,
          catalog_poll_s: float | None = None) -> int:
    """Serve until SIGTERM (drain) or SIGINT, on ``sockets`` if given (from ``bind``, which the CLI
    calls before loading), else on HOST:PORT. The engine loop runs on this (the main) thread, which
    loaded the models, and uvicorn on a second one that never computes with torch: one OpenMP team
    in the process, whose workers spin between the step's parallel regions (a second team made
    decode steps about twice as slow; docs/benchmarks.md, "Which thread decodes")."""
    from index_store.loader import load_constellation
    from .app import create_app
    from .summary import load_summary

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded = load_constellation(config_path)
    if loaded.config.runtime.packed_weights:
        loaded.constellation.g.pack()
    print(load_summary(loaded), file=sys.stderr, flush=True)
    print(engine_summary(loaded, limits), file=sys.stderr, flush=True)
    app = create_app(loaded, limits, api_key, model_name, engine_thread=False, admin_key=admin_key,
                     catalog_poll_s=catalog_poll_s)
    engine: Engine = app.state.engine
    engine.settle_heap = True  # the loaded models out of the garbage collector's walks (server/engine/heap.py)
    heap.settle("loaded")
    g, rt = loaded.constellation.g, loaded.config.runtime
    if rt.compiles(g.device, g.dtype):
        engine.capture(rt.compile_buckets, settle=True, above=limits.max_running if rt.compiles_above(g.device) else None)
        graphs = engine.runner.graphs
        rows = f", and one for {graphs.rows_label(graphs.above)} rows" if graphs.above else ""
        print(f"decode step: capturing one graph per {graphs.buckets} rows{rows} in the background (requests "
              "decode eagerly meanwhile; the log says when each is ready; --no-compile turns this off)",
              file=sys.stderr, flush=True)
    else:
        print(f"decode step: eager ([runtime].compile = {rt.compile} for {str(g.dtype).replace('torch.', '')} "
              f"{rt.weights} weights on "
              f"{g.device.type})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
    server = DrainingServer(config, engine, limits.drain_timeout_s)
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}

    def web():
        try:
            server.run(sockets=sockets)  # not the main thread: uvicorn leaves the signals to the handlers above
        finally:
            engine.stop()  # lifespan stops it too; this covers a server that never started

    def announce():
        while not server.started and not server.should_exit and web_thread.is_alive():
            time.sleep(0.05)
        if server.started:
            bound = sockets[0].getsockname()[1] if sockets else port
            print(examples(host, bound, model_name, api_key, admin_key is not None), file=sys.stderr, flush=True)

    web_thread = threading.Thread(target=web, name="uvicorn")
    web_thread.start()
    threading.Thread(target=announce, daemon=True).start()
    try:
        engine.run()
    finally:
        server.should_exit = True
        web_thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1
