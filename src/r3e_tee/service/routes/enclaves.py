"""Enclave API: create (with a size on a provider), list, get, destroy."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from r3e_tee.service.app import ServiceContext
from r3e_tee.service.auth import Principal, Scope
from r3e_tee.service.deps import get_ctx, require
from r3e_tee.service.enclaves import EnclaveRegistry

router = APIRouter(prefix="/v1/enclaves", tags=["enclaves"])
Ctx = Annotated[ServiceContext, Depends(get_ctx)]
Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]
Reader = Annotated[Principal, Depends(require(Scope.READ))]


def registry(ctx: ServiceContext) -> EnclaveRegistry:
    reg: EnclaveRegistry = ctx.components["enclaves"]
    return reg


class CreateEnclave(BaseModel):
    provider: str = Field(description="sgx, nitro or simulation")
    size: str | int = Field(description="enclave memory: 128M, 512Mi, 2G or bytes")
    debug: bool = Field(False, description="UNSAFE: a debug enclave's memory is readable by the host")
    evidence_format: str | None = Field(None, description="sgx-dcap or nitro (simulation: either)")


@router.post("", status_code=201, summary="Create an enclave (returns at once; poll or ?wait=)")
async def create(
    body: CreateEnclave,
    ctx: Ctx,
    _: Admin,
    wait: Annotated[float, Query(ge=0, le=300, description="seconds to wait for ready or failed")] = 0,
) -> dict[str, Any]:
    reg = registry(ctx)
    enclave = await reg.create(
        provider=body.provider, size=body.size, debug=body.debug, evidence_format=body.evidence_format
    )
    if wait:
        enclave = await reg.wait(enclave["id"], wait)
    return enclave


@router.get("", summary="List enclaves")
def list_enclaves(
    ctx: Ctx,
    _: Reader,
    state: Annotated[str | None, Query(description="only this state")] = None,
    all: Annotated[bool, Query(description="include terminated enclaves")] = False,
) -> list[dict[str, Any]]:
    return registry(ctx).list(state=state, include_terminated=all)


@router.get("/{enclave_id}", summary="One enclave")
def get_enclave(enclave_id: str, ctx: Ctx, _: Reader) -> dict[str, Any]:
    return registry(ctx).get(enclave_id)


@router.delete("/{enclave_id}", summary="Destroy an enclave (its keys are zeroized, its tokens revoked)")
async def destroy(enclave_id: str, ctx: Ctx, _: Admin) -> dict[str, Any]:
    return await registry(ctx).destroy(enclave_id)


@router.post("/{enclave_id}/attest", summary="Re-attest a ready enclave now; returns the signed result")
async def attest(enclave_id: str, ctx: Ctx, _: Admin) -> dict[str, Any]:
    """The token is a signed statement about the enclave, not a capability: secrets are sealed
    to the enclave's attested key, which never leaves it."""
    return await registry(ctx).attest(enclave_id)
