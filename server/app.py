"""The FastAPI app: auth and limits, error bodies, and the routes, which delegate to the serving classes.

``serving_completion`` / ``serving_chat`` answer the OpenAI routes, ``serving_explain`` /explain,
/index and /v1/models, ``serving_embedding`` /v1/embeddings, /tokenize and /detokenize (``serving``
holds what they share); the response models are in ``protocol``.
Here: the app's lifespan (the engine thread), the Guard middleware, the exception handlers, the
playground's static files, /metrics and the probes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
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
                       ErrorResponse, ExplainRequest, ModelCard, ModelList)
from .protocol_embedding import (DetokenizeRequest, DetokenizeResponse, EmbeddingRequest, EmbeddingResponse,
                                 TokenizeRequest, TokenizeResponse)
from .admin import PREFIX as ADMIN_PREFIX, add_admin_routes
from .live_catalog import LiveCatalog
from .serving import APIError, error_response
from .serving_chat import OpenAIServingChat
from .serving_completion import OpenAIServingCompletion
from .serving_embedding import ServingEmbedding
from .serving_explain import ServingExplain

__all__ = ["APIError", "Guard", "create_app"]

try:
    VERSION = importlib.metadata.version("constellation")
except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
    VERSION = "0.0.0+source"

OPEN_PATHS = {"/health", "/ready", "/", "/favicon.ico"}  # the probes, and the playground page's own files:
OPEN_PREFIX = "/ui/"  # every call the page makes needs the key
STATIC = Path(__file__).parent / "static"
UI_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def _bearer(scope) -> str:
    auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    return auth[7:] if auth[:7].lower() == "bearer " else ""


class Guard:
    """Pure ASGI middleware: the admin key on the admin API (404 without one configured), the API
    key on every other route but the probes; request body size cap."""

    def __init__(self, app, api_key: str | None, max_body: int, admin_key: str | None = None):
        self.app, self.key, self.max_body, self.admin_key = app, api_key, max_body, admin_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            if self.admin_key is None:
                resp = error_response(404, "the admin API is off (start the server with --admin-key)",
                                      "not_found_error")
                return await resp(scope, receive, send)
            if not hmac.compare_digest(_bearer(scope).encode(), self.admin_key.encode()):
                resp = error_response(401, "missing or invalid admin key (send 'Authorization: Bearer <admin key>')",
                                      "authentication_error", code="invalid_admin_key")
                return await resp(scope, receive, send)
        elif self.key is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIX):
            if not hmac.compare_digest(_bearer(scope).encode(), self.key.encode()):
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


def _param(err: dict) -> str | None:
    """The error's location in the body as OpenAI names parameters: ``composition.weights``,
    ``messages.0.content``."""
    return ".".join(str(x) for x in err.get("loc", ()) if x != "body") or None


def _describe(err: dict) -> str:
    where = _param(err) or "body"
    if err.get("type") == "extra_forbidden":
        return f"unrecognized request argument: {where} (docs/server.md lists the supported fields)"
    if err.get("type") == "missing":
        return f"{where}: required"
    msg = str(err.get("msg", "invalid"))
    return f"{where}: {msg.removeprefix('Value error, ')}"


def add_exception_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = exc.errors() or [{"loc": (), "msg": "invalid request", "type": ""}]
        if errs[0].get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {errs[0].get('msg')}",
                                  "invalid_request_error")
        return error_response(400, "; ".join(_describe(e) for e in errs[:5]), "invalid_request_error",
                              _param(errs[0]))

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

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, response_class=JSONResponse)
    async def model(model_id: str):
        return serving_explain.model(model_id)

    @app.post("/explain")
    async def explain(body: ExplainRequest):
        return await serving_explain.explain(body)

    @app.get("/index")
    async def index_diagnostics():
        """The index diagnostics (as `constellation index inspect --json`), for the playground's second tab."""
        return serving_explain.index()


def add_embedding_routes(app: FastAPI, serving: ServingEmbedding) -> None:
    """``/v1/embeddings`` (the prompt's fingerprint) and vLLM's ``/tokenize``, ``/detokenize``."""

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, response_class=JSONResponse)
    async def embeddings(body: EmbeddingRequest):
        return await serving.create_embedding(body)

    @app.post("/tokenize", response_model=TokenizeResponse, response_class=JSONResponse)
    async def tokenize(body: TokenizeRequest):
        return serving.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, response_class=JSONResponse)
    async def detokenize(body: DetokenizeRequest):
        return serving.detokenize(body)


def add_ops_routes(app: FastAPI, engine: Engine, metrics: Metrics, catalog: LiveCatalog, model_name: str) -> None:
    """The playground's files, /metrics and the probes."""

    @app.get("/", include_in_schema=False)
    async def playground():
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response((STATIC / "favicon.svg").read_bytes(), media_type="image/svg+xml")

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
        return {"status": "ready", "model": model_name, "domains": list(engine.c.domains),
                "catalog_version": catalog.version, "modes": list(MODES),
                "index_verified": True, "running": engine.num_running, "waiting": engine.num_waiting,
                "decode_graphs": engine.graph_status()}


def errors_in_schema(app: FastAPI) -> None:
    """The OpenAPI schema as the server answers: a refused body is 400 with OpenAI's error body
    (FastAPI documents its own 422, which this server never sends)."""

    def openapi():
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                {k: v for k, v in ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
                 .pop("$defs", {}).items()})
            schema["components"]["schemas"]["ErrorResponse"] = ErrorResponse.model_json_schema(
                ref_template="#/components/schemas/{model}")
            schema["components"]["schemas"]["ErrorResponse"].pop("$defs", None)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    if op.get("responses", {}).pop("422", None) is not None:
                        op["responses"]["400"] = {
                            "description": "Invalid request (OpenAI's error body, naming the parameter)",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for name in ("HTTPValidationError", "ValidationError"):
                schema["components"]["schemas"].pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def system_fingerprint(manifest: dict, dtype: str) -> str:
    """OpenAI's ``system_fingerprint``: changes when what answers changes (the index and the weights
    it was verified against, their dtype, the server version)."""
    key = f"{manifest.get('manifest_sha256', '')}|{dtype}|{VERSION}"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def create_app(loaded, limits: Limits = Limits(), api_key: str | None = None, model_name: str = "constellation",
               engine: Engine | None = None, engine_thread: bool = True, admin_key: str | None = None,
               catalog_poll_s: float | None = None) -> FastAPI:
    """The app. Its lifespan starts the engine on a background thread, unless ``engine_thread`` is
    False: then the caller runs ``engine.run()`` itself (``constellation serve``, on the main thread).
    ``admin_key`` turns the admin API on; ``catalog_poll_s`` watches the config file for catalog
    versions committed by other processes (replicas)."""
    c, tok = loaded.constellation, loaded.tokenizer
    metrics = Metrics(model_name)
    engine = engine or Engine(c, tok, limits, metrics)
    limits = limits.for_model(c.g)  # the defaults from the model, as the engine's
    if engine.metrics is None:
        engine.metrics = metrics

    catalog = LiveCatalog(loaded, engine, engine.metrics)

    @asynccontextmanager
    async def lifespan(app):
        if engine_thread:
            engine.start()
        if catalog_poll_s:
            catalog.watch(catalog_poll_s)
        yield
        catalog.stop()
        engine.stop()

    # no /docs or /redoc: FastAPI's pages load their scripts from a public CDN (the schema stays at
    # /openapi.json, behind the API key)
    app = FastAPI(title="Constellation", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Per-query composition of domain specialists behind an OpenAI-compatible API.")
    app.state.engine = engine
    app.state.limits = limits
    app.state.catalog = catalog
    add_exception_handlers(app)
    errors_in_schema(app)
    args = (engine, tok, limits, model_name)
    dtype = str(c.g.dtype)

    def fingerprint() -> str:  # the catalog served now: it changes with the catalog
        return system_fingerprint(catalog.manifest, dtype)

    add_api_routes(app, OpenAIServingCompletion(*args, fingerprint=fingerprint),
                   OpenAIServingChat(*args, fingerprint=fingerprint),
                   ServingExplain(*args, catalog=catalog))
    add_embedding_routes(app, ServingEmbedding(*args))
    add_admin_routes(app, catalog)
    add_ops_routes(app, engine, engine.metrics, catalog, model_name)
    app.add_middleware(Guard, api_key=api_key, max_body=limits.max_body_bytes, admin_key=admin_key)
    return app
