"""The FastAPI app: OpenAI-compatible routes, /explain, /metrics, probes, auth and limits."""

from __future__ import annotations

import asyncio
import hmac
import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from composer.modes import MODES, CompositionError, CompositionParams
from index_store.store import diagnostics_doc
from .engine import Draining, Engine, Event, Limits, QueueFull, Request, SamplingParams
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, ExplainRequest, new_id, now

OPEN_PATHS = {"/health", "/ready", "/"}  # the probes, and the playground page's own files:
OPEN_PREFIX = "/ui/"  # every call the page makes needs the key
STATIC = Path(__file__).parent / "static"
UI_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


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
                resp = _error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                       "authentication_error", code="invalid_api_key")
                return await resp(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            resp = _error_response(413, f"request body over {self.max_body} bytes", "invalid_request_error")
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


def create_app(loaded, limits: Limits = Limits(), api_key: str | None = None, model_name: str = "constellation",
               engine: Engine | None = None) -> FastAPI:
    c = loaded.constellation
    tok = loaded.tokenizer
    metrics = Metrics()
    engine = engine or Engine(c, tok, limits, metrics)
    if engine.metrics is None:
        engine.metrics = metrics
    metrics = engine.metrics
    created = now()
    index_doc = diagnostics_doc(loaded.manifest)
    max_positions = min(limits.max_seq_len, c.g.mc.max_positions)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="Constellation", version="0.1.0", lifespan=lifespan,
                  description="Per-query composition of domain specialists behind an OpenAI-compatible API.")
    app.state.engine = engine
    app.state.limits = limits

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                        for e in errs[:5])
        return _error_response(400, msg, "invalid_request_error", ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return _error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    # ---- helpers ---------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"model '{name}' does not exist (this server serves '{model_name}')",
                           "not_found_error", "model", "model_not_found")

    def check_composition(params: CompositionParams | None) -> CompositionParams:
        params = params or CompositionParams()
        try:
            c.validate(params)
        except CompositionError as e:
            raise APIError(400, str(e), param=e.param) from None
        return params

    def chat_prompt(messages) -> tuple[list[int], list[int] | None]:
        """Token ids of the templated chat, and a mask of the tokens inside the messages' contents.

        The index was built from plain text, so the fingerprint averages over the contents only,
        not over template markup or a default system prompt the template adds.
        """
        try:
            msgs = [{"role": m.role, "content": m.text()} for m in messages]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own checks (e.g. role order) raise
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        spans, pos = [], 0
        for m in msgs:
            if not m["content"]:
                continue
            at = text.find(m["content"], pos)
            if at == -1:
                continue
            spans.append((at, at + len(m["content"])))
            pos = at + len(m["content"])
        mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
        return enc["input_ids"], (mask if any(mask) else None)

    def text_prompt(prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = tok(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = list(prompt)
            if any(not isinstance(i, int) or i < 0 or i >= c.g.mc.vocab_size for i in ids):
                raise APIError(400, f"prompt token ids must be integers in [0, {c.g.mc.vocab_size})", param="prompt")
        return ids

    def sampling(body, ids: list[int], default_max: int | None, logprobs: int | None, param: str) -> SamplingParams:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"prompt has {len(ids)} tokens; this server accepts at most "
                           f"{limits.max_prompt_tokens}", param=param, code="context_length_exceeded")
        room = max_positions - len(ids) - 1
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None:
            max_tokens = min(default_max or room, limits.max_new_tokens, room)
        if max_tokens > limits.max_new_tokens:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_new_tokens}",
                           param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                           f"{max_positions}-token context", param="max_tokens", code="context_length_exceeded")
        if max_tokens < 1:
            raise APIError(400, "no room left to generate", param=param, code="context_length_exceeded")
        if body.min_tokens > max_tokens:
            raise APIError(400, "min_tokens must not exceed max_tokens", param="min_tokens")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              seed=body.seed, stop=body.stop or [], min_tokens=body.min_tokens,
                              ignore_eos=body.ignore_eos, logprobs=logprobs)

    def submit(ids, params, composition, n, fmask=None) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = Request(ids, params, composition, n, fingerprint_mask=fmask,
                      emit=lambda e: loop.call_soon_threadsafe(q.put_nowait, e))
        try:
            engine.submit(req)
        except QueueFull:
            raise APIError(429, "the server is at capacity; retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(400, str(e), param="n") from None
        except Draining:
            raise APIError(503, "the server is shutting down", "service_unavailable",
                           code="draining", headers={"Retry-After": "5"}) from None
        return req, q

    def summary(req: Request) -> dict | None:
        p = req.plan
        if p is None:
            return None
        return {"mode": p.mode, "selected": [c.domains[i] for i in p.selected],
                "alpha": {d: round(float(a), 6) for d, a in zip(c.domains, p.alpha)},
                "entropy_bits": round(p.mean_entropy_bits, 6)}

    async def collect(req: Request, q: asyncio.Queue, http: HTTPRequest) -> dict[int, dict]:
        out = {i: {"text": "", "ids": [], "logprobs": [], "finish": None, "error": None} for i in range(req.n)}
        done = 0
        try:
            while done < req.n:
                try:
                    e: Event = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        req.cancelled.set()
                        return out
                    continue
                o = out[e.index]
                o["text"] += e.text
                o["ids"] += e.token_ids
                o["logprobs"] += e.logprobs
                if e.finish_reason:
                    o["finish"], o["error"] = e.finish_reason, e.error
                    done += 1
        except asyncio.CancelledError:
            req.cancelled.set()
            raise
        return out

    async def events(req: Request, q: asyncio.Queue) -> AsyncIterator[Event | None]:
        """Engine events for a stream; None means 'send a keep-alive'. Cancels on disconnect."""
        done = 0
        try:
            while done < req.n:
                try:
                    e = await asyncio.wait_for(q.get(), timeout=limits.keepalive_s)
                except asyncio.TimeoutError:
                    yield None
                    continue
                if e.finish_reason:
                    done += 1
                yield e
        finally:
            if done < req.n:
                req.cancelled.set()

    def token_text(i: int) -> str:
        return tok.decode([i])

    def usage(prompt_len: int, n_completion: int) -> dict:
        return {"prompt_tokens": prompt_len, "completion_tokens": n_completion,
                "total_tokens": prompt_len + n_completion}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    def error_event(e: Event) -> str:
        return sse(error_body(e.error or "generation failed", "server_error"))

    # ---- completions ---------------------------------------------------------------------------
    def completion_logprobs(entries: list[dict], offset0: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        pos = offset0
        for en in entries:
            t = token_text(en["token_id"])
            tokens.append(t)
            lps.append(en["logprob"])
            top: dict[str, float] = {}
            for i, v in en["top"]:  # two ids may decode alike (partial UTF-8): keep both, by raw token
                top[token_text(i) if token_text(i) not in top else tok.convert_ids_to_tokens(i)] = v
            tops.append(top or None)
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def respond(http: HTTPRequest, body, ids: list[int], params: SamplingParams, comp: CompositionParams,
                      kind: str, final_choice, stream_choice, fmask: list[int] | None = None):
        """Submit, then answer as one JSON document or as a server-sent event stream."""
        req, q = submit(ids, params, comp, body.n, fmask)
        rid, created_at = new_id("cmpl" if kind == "text_completion" else "chatcmpl"), now()
        head = {"id": rid, "object": kind if not body.stream or kind == "text_completion" else kind + ".chunk",
                "created": created_at, "model": model_name}
        if not body.stream:
            out = await collect(req, q, http)
            err = next((o["error"] for o in out.values() if o["error"]), None)
            if err:
                raise APIError(500, err, "server_error")
            return {**head, "choices": [final_choice(i, o) for i, o in sorted(out.items())],
                    "usage": usage(len(ids), sum(len(o["ids"]) for o in out.values())), "composition": summary(req)}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream():
            n_tokens, first, state = 0, True, {}
            async for e in events(req, q):
                if e is None:
                    yield ": keep-alive\n\n"
                    continue
                if e.error:
                    yield error_event(e)
                    break
                n_tokens += len(e.token_ids)
                choice = stream_choice(e, state)
                if choice is None:
                    continue
                chunk = {**head, "choices": [choice]}
                if first:
                    chunk["composition"] = summary(req)
                    first = False
                if include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(len(ids), n_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_model(body.model)
        comp = check_composition(body.composition)
        ids = text_prompt(body.prompt)
        params = sampling(body, ids, 16, body.logprobs, "prompt")
        want_lp = body.logprobs is not None

        def final_choice(i, o):
            return {"index": i, "text": o["text"], "finish_reason": o["finish"],
                    "logprobs": completion_logprobs(o["logprobs"], 0) if want_lp else None}

        def stream_choice(e: Event, offsets: dict):
            if not e.text and not e.finish_reason and not e.logprobs:
                return None
            choice = {"index": e.index, "text": e.text, "finish_reason": e.finish_reason,
                      "logprobs": completion_logprobs(e.logprobs, offsets.get(e.index, 0)) if want_lp else None}
            offsets[e.index] = offsets.get(e.index, 0) + len(e.text)
            return choice

        return await respond(http, body, ids, params, comp, "text_completion", final_choice, stream_choice)

    def chat_logprobs(entries: list[dict]) -> dict:
        content = []
        for en in entries:
            t = token_text(en["token_id"])
            content.append({"token": t, "logprob": en["logprob"], "bytes": list(t.encode()),
                            "top_logprobs": [{"token": token_text(i), "logprob": v,
                                              "bytes": list(token_text(i).encode())} for i, v in en["top"]]})
        return {"content": content}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: HTTPRequest):
        check_model(body.model)
        comp = check_composition(body.composition)
        ids, fmask = chat_prompt(body.messages)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        lp = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling(body, ids, None, lp, "messages")

        def final_choice(i, o):
            return {"index": i, "message": {"role": "assistant", "content": o["text"]},
                    "finish_reason": o["finish"], "logprobs": chat_logprobs(o["logprobs"]) if body.logprobs else None}

        def stream_choice(e: Event, started: dict):
            if not e.text and not e.finish_reason and not e.logprobs and e.index in started:
                return None
            delta: dict[str, Any] = {}
            if e.index not in started:
                delta["role"] = "assistant"
                started[e.index] = True
            if e.text or not e.finish_reason:
                delta["content"] = e.text
            return {"index": e.index, "delta": delta, "finish_reason": e.finish_reason,
                    "logprobs": chat_logprobs(e.logprobs) if body.logprobs else None}

        return await respond(http, body, ids, params, comp, "chat.completion", final_choice, stream_choice, fmask)

    # ---- the rest ------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "constellation"}]}

    @app.post("/explain")
    async def explain(body: ExplainRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of 'prompt' or 'messages'", param="prompt")
        comp = check_composition(body.composition)
        ids, fmask = (text_prompt(body.prompt), None) if body.prompt is not None else chat_prompt(body.messages)
        if not ids or len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"prompt must have 1..{limits.max_prompt_tokens} tokens", param="prompt")
        if engine.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable", code="draining",
                           headers={"Retry-After": "5"})

        def work():
            import torch

            t = torch.tensor([ids], dtype=torch.long, device=c.g.device)
            fm = None if fmask is None else torch.tensor([fmask], device=c.g.device)
            gp = c.generalist_pass(t, torch.ones_like(t), fingerprint_mask=fm)
            plan = engine.plan_for(gp, comp)
            doc = c.explain(gp, plan, node_weights=body.include_node_weights)
            return doc

        doc = await asyncio.get_running_loop().run_in_executor(None, engine.call, work)
        doc["index"] = index_doc
        return doc

    @app.get("/index")
    async def index_diagnostics():
        """The index diagnostics (as `constellation index inspect --json`), for the playground's second tab."""
        return index_doc

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
        if not engine.thread.is_alive() and engine.thread.ident is not None:
            return _error_response(503, "engine thread is not running", "service_unavailable")
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if engine.draining:
            return _error_response(503, "draining", "service_unavailable", code="draining")
        if not engine.thread.is_alive():
            return _error_response(503, "engine not started", "service_unavailable")
        return {"status": "ready", "model": model_name, "domains": c.domains, "modes": list(MODES),
                "index_verified": True, "running": engine.num_running, "waiting": engine.num_waiting}

    app.add_middleware(Guard, api_key=api_key, max_body=limits.max_body_bytes)
    return app
