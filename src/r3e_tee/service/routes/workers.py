"""Worker registration, heartbeats and the enclave state reports of remote workers."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from r3e_tee.attestation.pinned_roots_nitro_ias import TrustAnchor
from r3e_tee.attestation.result import EvidenceKind
from r3e_tee.errors import EvidenceFormatError, InvalidRequestError
from r3e_tee.service.app import ServiceContext
from r3e_tee.service.auth import Principal, Scope
from r3e_tee.service.deps import get_ctx, require
from r3e_tee.service.enclaves import StoreSink
from r3e_tee.service.workers import WorkerDirectory

router = APIRouter(prefix="/v1/workers", tags=["workers"])
Ctx = Annotated[ServiceContext, Depends(get_ctx)]
Worker = Annotated[Principal, Depends(require(Scope.ENCLAVE))]
Reader = Annotated[Principal, Depends(require(Scope.READ))]


def directory(ctx: ServiceContext) -> WorkerDirectory:
    d: WorkerDirectory = ctx.components["workers"]
    return d


_COUNT = 2**62  # bounds what the store's 64-bit integers hold
ProviderName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]


class ProviderCapacity(BaseModel):
    """One provider's capacity as a worker reports it (the service places enclaves by it)."""

    model_config = ConfigDict(extra="ignore")  # a newer worker may report more

    total_bytes: int = Field(0, ge=0, le=_COUNT)
    used_bytes: int = Field(0, ge=0, le=_COUNT)
    free_bytes: int = Field(0, ge=0, le=_COUNT)
    running: int = Field(0, ge=0, le=_COUNT)
    max_enclaves: int = Field(0, ge=0, le=_COUNT)


Capacity = Annotated[dict[ProviderName, ProviderCapacity], Field(max_length=16)]


class Registration(BaseModel):
    id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")
    url: str = Field(
        max_length=2048,
        pattern=r"^https?://[^\s/?#]+(/[^\s]*)?$",
        description="where the service reaches the worker's API (http or https)",
    )
    providers: list[ProviderName] = Field(max_length=16)
    capacity: Capacity
    simulation_roots: dict[EvidenceKind, str] | None = Field(
        None, description="PEM roots of the worker's simulation provider, by evidence kind"
    )


class Heartbeat(BaseModel):
    capacity: Capacity


def _capacity(capacity: dict[str, ProviderCapacity]) -> dict[str, Any]:
    return {name: c.model_dump() for name, c in capacity.items()}


def _roots(roots: dict[EvidenceKind, str] | None) -> dict[str, str] | None:
    """The roots as PEM by kind, each parsed now: a bad one is a 400 naming it, not a failure
    of every attestation of the worker's enclaves."""
    if roots is None:
        return None
    for kind, pem in roots.items():
        try:
            TrustAnchor.load(pem.encode(), simulated=True, name="worker simulated root")
        except EvidenceFormatError as exc:
            raise InvalidRequestError(
                f"simulation_roots.{kind.value}: {exc.message}",
                hint="send the PEM certificate of the worker's simulation root for that kind",
            ) from None
    return {kind.value: pem for kind, pem in roots.items()}


class StateReport(BaseModel):
    state: Literal["creating", "attesting", "ready", "draining", "terminated", "failed"] | None = None
    reason: str | None = None
    measurement: str | None = None
    attestation_id: str | None = None
    pid: int | None = None
    public_keys: dict[str, str] | None = None
    ready_at: float | None = None
    terminated_at: float | None = None
    worker_id: str | None = None


def _check_caller(ctx: ServiceContext, worker_id: str, principal: Principal) -> None:
    """A worker speaks only for the id its token registered (an admin for any)."""
    if not principal.allows(Scope.ADMIN):
        directory(ctx).check_caller(worker_id, principal.token_hash)


@router.post("", summary="Register a worker; returns the secret the service calls it with")
def register(body: Registration, ctx: Ctx, principal: Worker) -> dict[str, str]:
    """The id becomes the calling token's: another worker's token cannot take it over (an
    admin's registration frees it for the next worker token)."""
    secret = directory(ctx).register(
        body.id,
        body.url,
        list(body.providers),
        _capacity(body.capacity),
        _roots(body.simulation_roots),
        owner=None if principal.allows(Scope.ADMIN) else principal.token_hash,
        owner_live=ctx.tokens.is_live,
    )
    return {"worker_id": body.id, "secret": secret}


@router.get("", summary="Registered workers with their capacity")
def list_workers(ctx: Ctx, _: Reader) -> list[dict[str, Any]]:
    return directory(ctx).list_workers()


@router.post("/{worker_id}/heartbeat", status_code=204, summary="Capacity and liveness")
def heartbeat(worker_id: str, body: Heartbeat, ctx: Ctx, principal: Worker) -> None:
    _check_caller(ctx, worker_id, principal)
    directory(ctx).heartbeat(worker_id, _capacity(body.capacity))


@router.get("/{worker_id}/enclaves", summary="Enclaves the store assigns to a worker (reconciliation)")
async def owned(worker_id: str, ctx: Ctx, principal: Worker) -> list[dict[str, Any]]:
    _check_caller(ctx, worker_id, principal)
    return await StoreSink(ctx.store).owned(worker_id)


@router.post("/{worker_id}/enclaves/{enclave_id}", status_code=204, summary="A worker reports enclave state")
def report(worker_id: str, enclave_id: str, body: StateReport, ctx: Ctx, principal: Worker) -> None:
    _check_caller(ctx, worker_id, principal)
    directory(ctx).check_owner(worker_id, enclave_id)
    fields = body.model_dump(exclude_unset=True)
    fields.pop("worker_id", None)
    directory(ctx).check_attested(enclave_id, fields)
    StoreSink(ctx.store).update_sync(enclave_id, **fields)
    if fields.get("state") in ("terminated", "failed"):
        ctx.components["attestation"].revoke_enclave(enclave_id)
