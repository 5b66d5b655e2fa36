"""FastAPI app factory of the TEE service (the HTTP control plane).

The factory takes a ready :class:`ServiceContext` so tests, the all-in-one process and the
replicas behind Kubernetes build the same app; nothing here reads the environment.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from r3e_tee import __version__
from r3e_tee.config import TeeConfig
from r3e_tee.errors import InvalidRequestError, PayloadTooLargeError, R3ETeeError
from r3e_tee.ids import new_id
from r3e_tee.logging import access_log, request_id_var
from r3e_tee.service.auth import TokenAuthority
from r3e_tee.service.metrics import LatencyMetrics
from r3e_tee.store import Store

log = logging.getLogger("r3e_tee.service")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

#: the body limit of a route that sets none: room for a 1 MiB secret in base64, DCAP collateral
MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass
class ServiceContext:
    """Everything a request handler may need; built once per process by the launcher."""

    config: TeeConfig
    store: Store
    tokens: TokenAuthority
    data_dir: Path
    dev: bool = False
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    started_at: float = field(default_factory=time.time)
    # components added by later layers (attestation, enclaves, keys, functions) register here
    components: dict[str, Any] = field(default_factory=dict)
    on_shutdown: list[Callable[[], None]] = field(default_factory=list)


_METHODS = frozenset(("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"))


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = LatencyMetrics(
            counter="r3e_tee_http_requests",
            counter_doc="HTTP requests by route template and status",
            histogram="r3e_tee_http_request_duration_seconds",
            histogram_doc="HTTP request latency by route template",
            labelnames=("method", "route", "status"),
            histogram_labels=2,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=registry,
        )
        self._labels: dict[tuple[str, str, int], tuple[str, str, str]] = {}

    def observe(self, method: str, template: str, status: int, elapsed: float) -> None:
        if method not in _METHODS:  # any token is a method to HTTP/1.1: one series for the rest
            method = "OTHER"
        labels = self._labels.get((method, template, status))
        if labels is None:
            if len(self._labels) > 10_000:
                self._labels.clear()
            labels = self._labels[(method, template, status)] = (method, template, str(status))
        self.requests.observe(labels, elapsed)


_UNLOGGED_ROUTES = frozenset(("/healthz", "/readyz", "/metrics"))


def request_id_for(scope: Scope) -> str:
    """The client's X-Request-ID when it is well formed, else a fresh one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            incoming: str = value.decode("latin-1")
            if _REQUEST_ID_RE.match(incoming):
                return incoming
            break
    return new_id()


def finish_request(metrics: _Metrics, scope: Scope, template: str, status: int, elapsed: float) -> None:
    """Metrics and the one access-log line of a request (both HTTP paths share this)."""
    method = scope.get("method", "")
    metrics.observe(method, template, status, elapsed)
    if template not in _UNLOGGED_ROUTES and log.isEnabledFor(logging.INFO):
        access_log(log, method, scope.get("path", ""), template, status, round(elapsed * 1000, 2))


class RequestContextMiddleware:
    """Request id, one structured log line and metrics per request (pure ASGI: cheap)."""

    def __init__(self, app: ASGIApp, metrics: _Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_for(scope)
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # the app's 500 handler runs outside this middleware: answer here, with the request
            # id (body and header), and leave the id set so the handler's log line carries it
            if not started:
                await send_json(send_wrapper, 500, json_body(internal_error_body()))
            self._finish(scope, status, start)
            raise
        self._finish(scope, status, start)
        request_id_var.reset(token)

    def _finish(self, scope: Scope, status: int, start: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        finish_request(self.metrics, scope, template, status, time.perf_counter() - start)


def json_body(content: Any) -> bytes:
    """The bytes Starlette's JSONResponse renders for ``content``."""
    return json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


def typed_error_response(exc: R3ETeeError) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """Status, JSON body and headers of a typed error (the FastAPI handler and fast routes)."""
    body = exc.to_dict()
    body["request_id"] = request_id_var.get()
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    return exc.http_status, body, headers


def internal_error_body() -> dict[str, Any]:
    # the type only: messages of unexpected errors may carry data we must not echo
    return {
        "error": "internal",
        "message": "internal error; the request id locates it in the service log",
        "request_id": request_id_var.get(),
    }


#: Starlette's own HTTP errors as (error, message, hint)
_FRAMEWORK_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: (
        "invalid_request",
        "the request body could not be parsed",
        "send JSON (UTF-8, nested at most a few hundred levels)",
    ),
    404: ("not_found", "no such route", "the API is described at /docs and /openapi.json"),
    405: ("method_not_allowed", "the route does not take this method", "the Allow header lists the methods"),
}


class ClientDisconnected(Exception):
    """The client went away before its request body arrived."""


class FastRequest:
    """What a fast route's handler sees: path parameters, headers, the body on demand."""

    __slots__ = ("scope", "params", "_receive", "_limit")

    def __init__(self, scope: Scope, receive: Receive, params: tuple[str, ...], limit: int) -> None:
        self.scope = scope
        self.params = params
        self._receive = receive
        self._limit = limit

    def header(self, name: bytes) -> str | None:
        """The first value of a header (lower-case name), as Starlette's ``headers.get``."""
        for key, value in self.scope["headers"]:
            if key == name:
                return str(value.decode("latin-1"))
        return None

    async def body(self) -> bytes:
        """The whole body; a chunked one longer than the route's limit stops being read (413)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self._limit:
                    raise too_large(self._limit)
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


#: a fast route handler answers (status, JSON body bytes)
FastHandler = Callable[[FastRequest], Awaitable[tuple[int, bytes]]]


@dataclass(frozen=True)
class FastRoute:
    """A hot route served before FastAPI routing, as a plain ASGI handler.

    The FastAPI route with the same method and template stays registered (OpenAPI, and the
    reference behaviour); the fast one must answer the same bytes. The app adds what the
    middleware and the exception handlers add on the FastAPI path: the request id (header and
    log context), typed error bodies, metrics and the access-log line.
    """

    method: str
    template: str
    handler: FastHandler
    max_body: int = MAX_BODY_BYTES
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", template_pattern(self.template))


def template_pattern(template: str) -> re.Pattern[str]:
    """A route template as a regex (Starlette's default "str" convertor: one non-empty segment)."""
    regex = re.sub(r"\\\{[A-Za-z_][A-Za-z0-9_]*\\\}", "([^/]+)", re.escape(template))
    return re.compile(f"^{regex}$")


def too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is larger than this route's limit of {limit} bytes",
        hint="send a smaller body (function code: at most 10 MiB; large inputs belong in storage "
        "the function reads, not in the invocation)",
    )


def check_declared_length(scope: Scope, limit: int) -> None:
    """413 for a Content-Length over ``limit``, before a byte of the body is read."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise InvalidRequestError("Content-Length is not a number") from None
            if declared > limit:
                raise too_large(limit)
            return


class BodyLimits:
    """Per-route body limits, looked up before routing (a template's regex, else the default)."""

    def __init__(self, default: int = MAX_BODY_BYTES) -> None:
        self.default = default
        self._routes: list[tuple[str, re.Pattern[str], int]] = []

    def set(self, method: str, template: str, limit: int) -> None:
        self._routes.append((method, template_pattern(template), limit))

    def for_request(self, method: str, path: str) -> int:
        for route_method, pattern, limit in self._routes:
            if route_method == method and pattern.match(path):
                return limit
        return self.default


class BodyLimitMiddleware:
    """Refuses a body over its route's limit with a typed 413 instead of buffering it: at once
    for a declared Content-Length, and as soon as a chunked body passes the limit (the app then
    sees the client leave, and its own answer is replaced by the 413)."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_request(scope["method"], route_path(scope))
        try:
            check_declared_length(scope, limit)
        except R3ETeeError as exc:
            await _send_typed_error(send, exc)
            return
        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 below answers instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except ClientDisconnect:
            if not refused:
                raise
        if refused and not started:
            await _send_typed_error(send, too_large(limit))


async def send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A whole JSON response from ASGI code (where no Starlette response is at hand)."""
    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


async def _send_typed_error(send: Send, exc: R3ETeeError) -> None:
    status, content, extra = typed_error_response(exc)
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]
    await send_json(send, status, json_body(content), headers)


def route_path(scope: Scope) -> str:
    """The path routing sees (``root_path`` removed), as Starlette's ``get_route_path``."""
    path: str = scope["path"]
    root_path = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path):
        return path
    if path == root_path:
        return ""
    return path[len(root_path) :] if path[len(root_path)] == "/" else path


class ServiceApp(FastAPI):
    """FastAPI with fast routes in front: a hot route skips the middleware stack, routing,
    dependency solving and the thread pool, and keeps everything they guarantee."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast_routes: list[FastRoute] = []
        self.fast_routes_enabled = True  # False serves every request through FastAPI (tests)
        self.http_metrics: _Metrics | None = None
        self.body_limits = BodyLimits()

    def add_fast_route(self, route: FastRoute) -> None:
        """Serve ``route`` fast; its FastAPI twin gets the same body limit."""
        self.fast_routes.append(route)
        self.body_limits.set(route.method, route.template, route.max_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.fast_routes and self.fast_routes_enabled:
            method = scope["method"]
            path = None
            for route in self.fast_routes:
                if route.method != method:
                    continue
                if path is None:
                    path = route_path(scope)
                match = route.pattern.match(path)
                if match is not None:
                    await self._serve_fast(route, match.groups(), scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    async def _serve_fast(
        self, route: FastRoute, params: tuple[str, ...], scope: Scope, receive: Receive, send: Send
    ) -> None:
        rid = request_id_for(scope)
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500
        try:
            headers: list[tuple[bytes, bytes]] = []
            try:
                check_declared_length(scope, route.max_body)
                status, body = await route.handler(FastRequest(scope, receive, params, route.max_body))
            except R3ETeeError as exc:
                status, content, extra = typed_error_response(exc)
                body = json_body(content)
                if extra:
                    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
            except ClientDisconnected:
                return
            except Exception as exc:  # noqa: BLE001 - answered as the 500 handler answers
                log.error("unhandled error", extra={"exc_type": type(exc).__name__})
                status, body = 500, json_body(internal_error_body())
            headers += [
                (b"content-length", str(len(body)).encode()),
                (b"content-type", b"application/json"),
                (b"x-request-id", rid.encode()),
            ]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            if self.http_metrics is not None:
                finish_request(self.http_metrics, scope, route.template, status, time.perf_counter() - start)
            request_id_var.reset(token)


def create_app(ctx: ServiceContext) -> ServiceApp:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for start in ctx.components.get("startup", []):
            await start()
        log.info("service started", extra={"version": __version__, "dev": ctx.dev})
        try:
            yield
        finally:
            log.info("service stopping: draining done, closing the store")
            for stop in reversed(ctx.components.get("shutdown", [])):
                try:
                    await stop()
                except R3ETeeError as exc:
                    log.warning("shutdown step failed", extra={"error": str(exc)})
            for hook in reversed(ctx.on_shutdown):
                try:
                    hook()
                except R3ETeeError as exc:
                    log.warning("shutdown hook failed", extra={"error": str(exc)})
            ctx.store.close()

    app = ServiceApp(
        title="R3E TEE Service",
        version=__version__,
        description=(
            "Launches enclaves, verifies their remote attestation, releases secrets only to "
            "attested enclaves and runs functions inside them with signed receipts."
        ),
        lifespan=lifespan,
    )
    app.state.ctx = ctx

    @app.exception_handler(R3ETeeError)
    async def _typed_error(_: Request, exc: R3ETeeError) -> JSONResponse:
        status, body, headers = typed_error_response(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")}
            for e in exc.errors()
        ]
        return JSONResponse(
            {
                "error": "invalid_request",
                "message": "the request body or parameters are not valid",
                "problems": problems,
                "request_id": request_id_var.get(),
            },
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _framework_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # routing and body parsing fail with these: give them the service's error shape
        code, message, hint = _FRAMEWORK_ERRORS.get(exc.status_code, ("http_error", str(exc.detail), None))
        if exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
        body: dict[str, Any] = {"error": code, "message": message}
        if hint:
            body["hint"] = hint
        body["request_id"] = request_id_var.get()
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", extra={"exc_type": type(exc).__name__})
        return JSONResponse(internal_error_body(), status_code=500)

    from r3e_tee.service.routes import health, tokens

    app.include_router(health.router)
    app.include_router(tokens.router)
    for register in ctx.components.get("routers", []):
        register(app)

    app.http_metrics = _Metrics(ctx.registry)
    # added first: inside the request context, so a 413 carries the request id and is counted
    app.add_middleware(BodyLimitMiddleware, limits=app.body_limits)
    app.add_middleware(RequestContextMiddleware, metrics=app.http_metrics)
    return app
