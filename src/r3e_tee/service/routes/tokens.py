"""API tokens: issue (shown once), list (metadata only), revoke."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from r3e_tee.errors import NotFoundError
from r3e_tee.service.app import ServiceContext
from r3e_tee.service.auth import Principal, Scope
from r3e_tee.service.deps import get_ctx, require

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])
Ctx = Annotated[ServiceContext, Depends(get_ctx)]
Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]


class TokenRequest(BaseModel):
    scope: Scope
    label: str = Field(min_length=1, max_length=200)


class IssuedToken(BaseModel):
    token: str = Field(description="shown once; only its SHA-256 is stored")
    token_hash: str
    scope: Scope
    label: str


@router.post("", status_code=201, summary="Issue a token (admin)")
def issue(body: TokenRequest, ctx: Ctx, _: Admin) -> IssuedToken:
    from r3e_tee.service.auth import token_hash

    token = ctx.tokens.issue(body.scope, body.label)
    return IssuedToken(token=token, token_hash=token_hash(token), scope=body.scope, label=body.label)


@router.get("", summary="List issued tokens (hashes and labels only)")
def list_tokens(ctx: Ctx, _: Admin) -> list[dict[str, Any]]:
    return ctx.store.fetchall(
        "SELECT token_hash, scope, label, created_at FROM admin_tokens ORDER BY created_at"
    )


@router.delete("/{digest}", status_code=204, summary="Revoke a token by its SHA-256")
def revoke(digest: str, ctx: Ctx, _: Admin) -> None:
    if not ctx.tokens.revoke(digest.lower()):
        raise NotFoundError(f"no issued token with hash {digest}")
