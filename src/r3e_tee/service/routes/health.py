"""Liveness, readiness, metrics and version: what Kubernetes and Prometheus poll."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from r3e_tee import __version__
from r3e_tee.errors import StoreError
from r3e_tee.service.app import ServiceContext
from r3e_tee.service.deps import get_ctx
from r3e_tee.store.migrations import LATEST_VERSION

router = APIRouter()
Ctx = Annotated[ServiceContext, Depends(get_ctx)]


@router.get("/healthz", tags=["health"], summary="Liveness: the process serves HTTP")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="Readiness: store reachable, migrations applied")
def readyz(ctx: Ctx) -> JSONResponse:
    checks: dict[str, Any] = {}
    ready = True
    try:
        ctx.store.ping()
        checks["store"] = "ok"
        version = ctx.store.schema_version()
        checks["schema_version"] = version
        if version < LATEST_VERSION:
            ready = False
            checks["migrations"] = f"schema at {version}, this release needs {LATEST_VERSION}"
        elif version > LATEST_VERSION:
            # a newer replica migrated during a rolling update; migrations only add, so this one
            # keeps serving (taking every old replica out of service at once would be an outage)
            checks["migrations"] = f"ok (schema at {version}, migrated by a newer release)"
        else:
            checks["migrations"] = "ok"
    except StoreError as exc:
        ready = False
        checks["store"] = exc.message
    for name, probe in ctx.components.get("readiness", {}).items():
        ok, detail = probe()
        checks[name] = detail
        ready = ready and ok
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/metrics", tags=["health"], summary="Prometheus metrics")
def metrics(ctx: Ctx) -> Response:
    for refresh in ctx.components.get("metrics_refresh", []):
        refresh()
    return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/version", tags=["meta"], summary="Service version and enabled providers")
def version(ctx: Ctx) -> dict[str, Any]:
    return {
        "version": __version__,
        "providers": list(ctx.config.enabled_providers),
        "dev": ctx.dev,
        "schema_version": LATEST_VERSION,
    }
