"""HTTP serving: an OpenAI-compatible API and a chat page over one model, batching concurrent requests.

    scratchgpt serve --checkpoint runs/sft      # then open http://127.0.0.1:8000/

This module is the app and its lifecycle; the work is done elsewhere:
  openai_api  the protocol: request and response models (pydantic, strict), errors, streaming
  batching    the decode batch and the scheduler thread that owns the model
  connection  the per-connection guard around uvicorn's protocol: head-read timeout, half-closed clients
  here        `create_app` (FastAPI: routes, the guard middleware, security headers), `make_server`
              (uvicorn with that guard, its timeouts and a draining shutdown) and `serve`.
              FastAPI and uvicorn are imported lazily (the `serve` extra).
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (`request:
# Request`, `body: CompletionRequest`) at runtime, and the handlers live inside create_app.

import asyncio
import hmac
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scratchgpt.config import API_KEY_ENV, DEFAULT_HOST, DEFAULT_PORT, ChatTemplateName, ServeLimits
from scratchgpt.data.chat import (
    TOKENIZER_TEMPLATE,
    check_chat_template,
    default_chat_template,
    stop_strings,
)
from scratchgpt.device import resolve_device
from scratchgpt.inference.batching import Job, Refused, Scheduler, job_rows
from scratchgpt.inference.connection import GuardedConnection, Peer, track_responses
from scratchgpt.inference.generate import choose_decode_path
from scratchgpt.inference.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    Reply,
    RequestParser,
    answer,
    api_error,
    chat_unavailable_reason,
    json_bytes,
    stream,
)
from scratchgpt.model.gpt import GPT

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

# The chat page's script and style (static/), with their media types; the page loads them from /static/.
_PAGE_ASSETS = {"chat.css": "text/css", "chat.js": "text/javascript"}
# The page and its files hold no data; health checks rarely carry keys.
_OPEN_PATHS = frozenset({"/", "/health", *(f"/static/{name}" for name in _PAGE_ASSETS)})
# Sent with every response. An API answer is JSON that loads and embeds nothing, and no response may be
# framed by another site's page (clickjacking) or sniffed into another type; the page has its own CSP.
_SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
# The chat page runs only its own script and style from this server (no inline code, so an injected
# <script> cannot run) and talks only to this server.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# host[:port], the host a name or a bracketed IPv6 address; anything else (user info, paths) fails.
_HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::[0-9]{1,5})?")


def _host_name(host: bytes) -> str | None:
    """The host of a Host header ("[::1]:8000" -> "[::1]"), or None when it is not host[:port]."""
    match = _HOST_HEADER.fullmatch(host.decode("latin-1").strip().lower())
    return match.group(1) if match else None


class _Guard:
    """ASGI middleware run before routing: Host check, API key, request body size, JSON content type.

    Not Starlette's TrustedHostMiddleware: it reads the host as what comes before the first ":", so
    "[::1]:8000" fails and "localhost:8000@evil.example" passes, and it answers in plain text.
    """

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, allowed_hosts: Collection[str] | None,
                 read_timeout_s: float = 10.0):
        self.app = app
        self.api_key = api_key.encode() if api_key is not None else None
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            # HEAD is GET without the body, for every GET route (the server, not the app, drops the body).
            scope = {**scope, "method": "GET"}
        headers = dict(scope["headers"])
        error = self._check_headers(scope["method"], scope["path"], headers)
        if error is not None:
            await _send_error(send, error)
            return
        # Read the whole (bounded) body here, so an oversized one is refused even without Content-Length.
        body = bytearray()
        deadline = time.monotonic() + self.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:  # a stalled body holds a connection for nothing (3.10: not the builtin)
                await _send_error(send, APIError(408, f"the request body did not arrive within "
                                                 f"{self.read_timeout_s:g} s", code="request_timeout",
                                                 headers={"Connection": "close"}))
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await _send_error(send, _too_large(self.max_body_bytes))
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: wait for the client to disconnect

        await self.app(scope, replay, send)

    def _check_headers(self, method: str, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        # A page on another site can reach a loopback server through DNS rebinding; its Host gives it away.
        if self.allowed_hosts is not None and _host_name(headers.get(b"host", b"")) not in self.allowed_hosts:
            return APIError(400, "invalid Host header", code="invalid_host")
        if self.api_key is not None and path not in _OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                what = "Incorrect API key provided" if given else "You didn't provide an API key"
                return APIError(401, f"{what}. Send it as the header 'Authorization: Bearer <key>'.",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return _too_large(self.max_body_bytes)
        # Browsers send form and text bodies cross-site without asking; JSON needs a CORS preflight,
        # which this server never grants. So insisting on JSON keeps other sites' pages out.
        # A missing Content-Type counts as not JSON: that is what a cross-site "simple request" looks like.
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if method == "POST" and ctype != b"application/json":
            got = repr(ctype.decode("latin-1")) if ctype else "none"
            return APIError(415, f"Content-Type must be application/json, got {got}", code="unsupported_media_type")
        return None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                    code="request_too_large")


async def _send_error(send: Callable, error: APIError) -> None:
    payload = json_bytes(error.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _with_security_headers(send: Callable) -> Callable:
    """`send` that adds `_SECURITY_HEADERS` to a response's start, except those the response sets itself."""

    async def send_with_headers(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            present = {name.lower() for name, _ in headers}
            headers += [(name, value) for name, value in _SECURITY_HEADERS if name not in present]
            message = {**message, "headers": headers}
        await send(message)

    return send_with_headers





def create_app(
    model: GPT,
    tokenizer: Any,
    *,
    model_name: str,
    chat_template: ChatTemplateName | None = None,
    api_key: str | None = None,
    limits: ServeLimits | None = None,
    allowed_hosts: Collection[str] | None = None,
) -> "FastAPI":
    """The FastAPI app serving `model`: OpenAI-style /v1 endpoints, /health and the chat page at /.

    `chat_template` None: the tokenizer's own chat template when it has one, else Alpaca.
    `api_key` (if set) is required as a Bearer token on every endpoint except /health and the page (/ and
    its /static/ files).
    `allowed_hosts` (if set) restricts the Host header, e.g. to loopback names.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException

    chat_template = chat_template or default_chat_template(None, tokenizer)
    check_chat_template(chat_template, tokenizer)
    limits = limits or ServeLimits()
    model.eval()
    choose_decode_path(model)  # the faster CPU matrix-vector path for this machine (see model.fast_linear.Linear)
    device = next(model.parameters()).device
    chat_disabled = chat_unavailable_reason(tokenizer, chat_template)
    if chat_disabled:  # e.g. a character-level alphabet: say it once here, not in every request's error
        logger.warning("/v1/chat/completions is disabled: %s", chat_disabled)
    chat_stop = () if chat_disabled else stop_strings(chat_template, tokenizer=tokenizer)
    parser = RequestParser(tokenizer, model_name, model.config.n_positions, chat_template, limits,
                           chat_disabled=chat_disabled, chat_stop=chat_stop)
    scheduler = Scheduler(model, tokenizer, limits=limits)
    static = resources.files("scratchgpt.inference").joinpath("static")
    page = static.joinpath("chat.html").read_text(encoding="utf-8")
    assets = {name: static.joinpath(name).read_bytes() for name in _PAGE_ASSETS}
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)

    class SafeJSONResponse(JSONResponse):
        def render(self, content: Any) -> bytes:
            return json_bytes(content)

    class App(FastAPI):
        async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
            # Around the whole app, Starlette's outermost error middleware included: its 500s get them too.
            await super().__call__(scope, receive, _with_security_headers(send) if scope["type"] == "http" else send)

    app = App(title="scratchgpt", lifespan=lifespan, default_response_class=SafeJSONResponse,
              docs_url=None, redoc_url=None, openapi_url=None)  # the docs pages would load a CDN
    app.state.scheduler, app.state.limits = scheduler, limits
    app.state.model_name, app.state.chat_template, app.state.chat_disabled = model_name, chat_template, chat_disabled
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes, allowed_hosts=allowed_hosts,
                       read_timeout_s=limits.read_timeout_s)

    def error_response(error: APIError) -> JSONResponse:
        return SafeJSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(api_error(exc.errors()))  # the request models' refusals, as OpenAI's errors

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code, headers=exc.headers))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal server error; see the server's log", kind="server_error"))

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "scratchgpt",
                "max_model_len": model.config.n_positions}

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/static/{name}", include_in_schema=False)
    async def page_asset(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, "Not Found")
        # no-cache: a browser checks again, so an upgraded server never runs an old script with a new page.
        return Response(assets[name], media_type=_PAGE_ASSETS[name], headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "chat": chat_disabled is None, **scheduler.stats()}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return model_card()

    async def generate(request: Request, resolve: Callable[[Any], GenerationRequest], body: Any) -> Any:
        req = await asyncio.to_thread(resolve, body)  # tokenizing a long prompt should not stall the loop
        job = Job(asyncio.get_running_loop())
        job.rows = job_rows(job, req.prompts, req.samplings, n=req.n, seed=req.seed, device=device)
        try:
            scheduler.submit(job)
        except Refused as e:
            retry = {"Retry-After": "1"} if e.code == "server_overloaded" else None
            raise APIError(503, str(e), kind="server_error", code=e.code, headers=retry) from None
        reply = Reply(req, model_name)

        def release() -> None:
            scheduler.release(job)

        if req.stream:
            # The generator releases the job when it ends or is cancelled by a disconnect; the
            # background task covers a client that left before the stream even started.
            return StreamingResponse(stream(reply, job, release), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(release))
        answered = asyncio.ensure_future(answer(reply, job))
        hangup = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({answered, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if not answered.done():  # the client left: nobody will read an answer
                return Response(status_code=499)
            return SafeJSONResponse(answered.result())
        finally:
            answered.cancel()
            hangup.cancel()
            release()

    # FastAPI validates each body against its model; a refusal is a RequestValidationError (above).
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await generate(request, parser.completion, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await generate(request, parser.chat, body)

    return app


async def _disconnected(receive: Callable[[], Any]) -> None:
    """Return when the client hangs up (the body has already been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_device(device: str) -> torch.device:
    """`device` ('auto' included) as a torch.device this machine has, or a one-line ValueError."""
    dev = resolve_device(device)  # the one rule for names, 'auto' and a missing CUDA
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}: MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r}: serving runs on cpu, cuda or mps")
    return dev


def resolve_api_key(api_key: str | None) -> str | None:
    """The key from `api_key`, else $SCRATCHGPT_API_KEY, else None (no key). An empty key is an error,
    whichever way it came: silently serving without authentication is never what that meant."""
    source = "--api-key"
    if api_key is None:
        api_key, source = os.environ.get(API_KEY_ENV), f"${API_KEY_ENV}"
    if api_key is not None and not api_key.strip():
        raise ValueError(f"{source} is empty; give a key, or unset it to serve without one (loopback only)")
    return api_key.strip() if api_key is not None else None


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a one-line ValueError (port in use, unknown host, ...)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port {port!r} must be an integer in [0, 65535]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host!r} is not an address of this machine ({e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart without waiting
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock



def make_server(app: "FastAPI", *, log_level: str = "info") -> "uvicorn.Server":
    """A uvicorn.Server for `app` (from `create_app`) with its timeouts and a draining shutdown:
    on Ctrl+C or SIGTERM running requests get `shutdown_grace_s` to finish, then an error event."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol  # what uvicorn's own setting http="h11" names

    limits: ServeLimits = app.state.limits
    scheduler: Scheduler = app.state.scheduler
    peers: dict[Peer, GuardedConnection] = {}

    class Protocol(GuardedConnection):
        def __init__(self, **uvicorn_args: Any):
            super().__init__(H11Protocol(**uvicorn_args), read_timeout_s=limits.read_timeout_s, peers=peers)

    async def drain_on_exit() -> None:
        # uvicorn sets should_exit on Ctrl+C / SIGTERM and then waits for connections to close; draining
        # here ends every running request within the grace period, each with a proper last event.
        while not server.should_exit:
            await asyncio.sleep(0.1)
        scheduler.drain(limits.shutdown_grace_s)

    tracked = track_responses(app, peers)

    async def asgi(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "lifespan":
            await tracked(scope, receive, send)
            return
        watcher = asyncio.ensure_future(drain_on_exit())  # for as long as the app lives
        try:
            await tracked(scope, receive, send)
        finally:
            watcher.cancel()

    config = uvicorn.Config(
        asgi, log_level=log_level, http=Protocol, timeout_keep_alive=5,
        # The scope's client must stay the socket's address (X-Forwarded-For would replace it): it is
        # how track_responses finds a request's connection.
        proxy_headers=False,
        # Longer than the drain, so every stream ends by itself with [DONE] before uvicorn would cancel it.
        timeout_graceful_shutdown=int(limits.shutdown_grace_s) + 5,
    )
    server = uvicorn.Server(config)
    return server


def serve(
    checkpoint: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    model_name: str | None = None,
    chat_template: ChatTemplateName | None = None,
    device: str = "auto",
    limits: ServeLimits | None = None,
    log_level: str = "info",
    quantize: str | None = None,
    inference_dtype: str | None = None,
) -> None:
    """Load `checkpoint` and serve it with uvicorn until interrupted.

    The chat template: `chat_template`, else the checkpoint's config.json ("chat_template", written by
    fine-tuning), else the tokenizer's own (a Hugging Face folder's chat_template), else Alpaca; the API
    key from `api_key`, else $SCRATCHGPT_API_KEY, else none. Serving beyond loopback needs a key.
    Every mistake in the arguments is a one-line ValueError raised before anything is announced.
    """
    from scratchgpt.checkpoint import load_any, saved_chat_template

    api_key = resolve_api_key(api_key)
    loopback = _is_loopback(host)
    if not loopback and api_key is None:
        raise ValueError(f"--host {host} makes the server reachable from other machines: it needs an API key "
                         f"(--api-key KEY or ${API_KEY_ENV})")
    dev = check_device(device)
    sock = bind_socket(host, port)  # before loading: a port in use fails in a second, not after a load
    try:
        model, tokenizer = load_any(checkpoint, device=dev, quantize=quantize, inference_dtype=inference_dtype,
                                    for_inference=True)
        chat_template = chat_template or saved_chat_template(checkpoint, tokenizer=tokenizer)
        name = model_name or Path(checkpoint).resolve().name or str(checkpoint)
        app = create_app(model, tokenizer, model_name=name, chat_template=chat_template, api_key=api_key,
                         limits=limits, allowed_hosts=_LOOPBACK_HOSTS if loopback else None)
        shown = f"[{host.strip('[]')}]" if ":" in host else host
        bound_port = sock.getsockname()[1]
        chat = ("chat disabled" if app.state.chat_disabled else "the model's own chat template"
                if chat_template == TOKENIZER_TEMPLATE else f"{chat_template} chat template")
        threads = f", {torch.get_num_threads()} CPU thread(s)" if dev.type == "cpu" else ""
        print(f"serving {name!r} ({chat}{threads}) on http://{shown}:{bound_port}/  (Ctrl+C to stop)", flush=True)
        make_server(app, log_level=log_level).run(sockets=[sock])
    finally:
        sock.close()
