"""Where the layers above the foundation plug into the service.

Each layer (attestation, enclaves, keys, functions) adds its routers, readiness probes and
shutdown hooks to the context here, so the app factory stays ignorant of them.
"""

from __future__ import annotations

from r3e_tee.service.app import ServiceContext


def install_components(ctx: ServiceContext) -> None:
    ctx.components.setdefault("routers", [])
    ctx.components.setdefault("readiness", {})
    ctx.components.setdefault("metrics_refresh", [])
