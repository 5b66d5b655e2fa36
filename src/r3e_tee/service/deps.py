"""Request dependencies: the service context and scope checks."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

from r3e_tee.service.app import ServiceContext
from r3e_tee.service.auth import Principal, Scope, TokenAuthority


def get_ctx(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


def require(scope: Scope) -> Callable[[Request], Principal]:
    """Dependency: 401 without a valid token, 403 when its scope does not allow ``scope``."""

    def dep(request: Request) -> Principal:
        ctx = get_ctx(request)
        principal = ctx.tokens.authenticate(request.headers.get("authorization"))
        TokenAuthority.require(principal, scope)
        return principal

    return dep
