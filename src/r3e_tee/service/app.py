"""FastAPI app factory of the TEE service (the HTTP control plane).

The factory takes a ready :class:`ServiceContext` so tests, the all-in-one process and the
replicas behind Kubernetes build the same app; nothing here reads the environment.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from r3e_tee import __version__
from r3e_tee.config import TeeConfig
from r3e_tee.errors import R3ETeeError
from r3e_tee.logging import request_id_var
from r3e_tee.service.auth import TokenAuthority
from r3e_tee.store import Store

log = logging.getLogger("r3e_tee.service")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


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


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "r3e_tee_http_requests",
            "HTTP requests by route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "r3e_tee_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )


class RequestContextMiddleware:
    """Request id, one structured log line and metrics per request (pure ASGI: cheap)."""

    def __init__(self, app: ASGIApp, metrics: _Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        rid = incoming if incoming and _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(elapsed)
            if template not in ("/healthz", "/readyz", "/metrics"):
                log.info(
                    "request",
                    extra={
                        "method": method,
                        "path": scope.get("path"),
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )
            request_id_var.reset(token)


def create_app(ctx: ServiceContext) -> FastAPI:
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

    app = FastAPI(
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
        body = exc.to_dict()
        body["request_id"] = request_id_var.get()
        headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
        return JSONResponse(body, status_code=exc.http_status, headers=headers)

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

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # the type only: messages of unexpected errors may carry data we must not echo
        log.error("unhandled error", extra={"exc_type": type(exc).__name__})
        return JSONResponse(
            {
                "error": "internal",
                "message": "internal error; the request id locates it in the service log",
                "request_id": request_id_var.get(),
            },
            status_code=500,
        )

    from r3e_tee.service.routes import health, tokens

    app.include_router(health.router)
    app.include_router(tokens.router)
    for register in ctx.components.get("routers", []):
        register(app)

    app.add_middleware(RequestContextMiddleware, metrics=_Metrics(ctx.registry))
    return app
