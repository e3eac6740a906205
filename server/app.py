"""The FastAPI app: auth and limits, error bodies, and the routes, which delegate to the serving classes.

``serving_completion`` / ``serving_chat`` answer the OpenAI routes, ``serving_explain`` /explain,
/index and /v1/models (``serving`` holds what they share); the response models are in ``protocol``.
Here: the app's lifespan (the engine thread), the Guard middleware, the exception handlers, the
playground's static files, /metrics and the probes.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from composer.modes import MODES
from .engine import Engine, Limits
from .metrics import Metrics
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       ExplainRequest, ModelList)
from .serving import APIError, error_response
from .serving_chat import OpenAIServingChat
from .serving_completion import OpenAIServingCompletion
from .serving_explain import ServingExplain

__all__ = ["APIError", "Guard", "create_app"]

OPEN_PATHS = {"/health", "/ready", "/"}  # the probes, and the playground page's own files:
OPEN_PREFIX = "/ui/"  # every call the page makes needs the key
STATIC = Path(__file__).parent / "static"
UI_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


class Guard:
    """Pure ASGI middleware: API key on every route but the probes; request body size cap."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.key is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIX):
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), self.key.encode()):
                resp = error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                      "authentication_error", code="invalid_api_key")
                return await resp(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            resp = error_response(413, f"request body over {self.max_body} bytes", "invalid_request_error")
            return await resp(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise APIError(413, f"request body over {self.max_body} bytes")
            return msg

        return await self.app(scope, limited, send)


def add_exception_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                        for e in errs[:5])
        return error_response(400, msg, "invalid_request_error", ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")


def add_api_routes(app: FastAPI, serving_completion: OpenAIServingCompletion, serving_chat: OpenAIServingChat,
                   serving_explain: ServingExplain) -> None:
    # response_class=JSONResponse: serialised with json.dumps (as a dict would be), not pydantic's JSON
    @app.post("/v1/completions", response_model=CompletionResponse, response_class=JSONResponse)
    async def completions(body: CompletionRequest, http: HTTPRequest):
        return await serving_completion.create_completion(body, http)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, response_class=JSONResponse)
    async def chat(body: ChatCompletionRequest, http: HTTPRequest):
        return await serving_chat.create_chat_completion(body, http)

    @app.get("/v1/models", response_model=ModelList, response_class=JSONResponse)
    async def models():
        return serving_explain.models()

    @app.post("/explain")
    async def explain(body: ExplainRequest):
        return await serving_explain.explain(body)

    @app.get("/index")
    async def index_diagnostics():
        """The index diagnostics (as `constellation index inspect --json`), for the playground's second tab."""
        return serving_explain.index()


def add_ops_routes(app: FastAPI, engine: Engine, metrics: Metrics, domains: list[str], model_name: str) -> None:
    """The playground's files, /metrics and the probes."""

    @app.get("/", include_in_schema=False)
    async def playground():
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8")

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_file(name: str):
        if name not in UI_FILES:
            raise APIError(404, f"no such file: /ui/{name}", "not_found_error")
        return Response((STATIC / name).read_bytes(), media_type=UI_FILES[name])

    @app.get("/metrics")
    async def prom():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    async def health():
        if not engine.alive():
            return error_response(503, "engine loop is not running", "service_unavailable")
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if engine.draining:
            return error_response(503, "draining", "service_unavailable", code="draining")
        if not engine.alive():
            return error_response(503, "engine loop is not running", "service_unavailable")
        return {"status": "ready", "model": model_name, "domains": domains, "modes": list(MODES),
                "index_verified": True, "running": engine.num_running, "waiting": engine.num_waiting}


def create_app(loaded, limits: Limits = Limits(), api_key: str | None = None, model_name: str = "constellation",
               engine: Engine | None = None, engine_thread: bool = True) -> FastAPI:
    """The app. Its lifespan starts the engine on a background thread, unless ``engine_thread`` is
    False: then the caller runs ``engine.run()`` itself (``constellation serve``, on the main thread)."""
    c, tok = loaded.constellation, loaded.tokenizer
    metrics = Metrics()
    engine = engine or Engine(c, tok, limits, metrics)
    if engine.metrics is None:
        engine.metrics = metrics

    @asynccontextmanager
    async def lifespan(app):
        if engine_thread:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="Constellation", version="0.1.0", lifespan=lifespan,
                  description="Per-query composition of domain specialists behind an OpenAI-compatible API.")
    app.state.engine = engine
    app.state.limits = limits
    add_exception_handlers(app)
    args = (engine, c, tok, limits, model_name)
    add_api_routes(app, OpenAIServingCompletion(*args), OpenAIServingChat(*args),
                   ServingExplain(*args, manifest=loaded.manifest))
    add_ops_routes(app, engine, engine.metrics, c.domains, model_name)
    app.add_middleware(Guard, api_key=api_key, max_body=limits.max_body_bytes)
    return app
