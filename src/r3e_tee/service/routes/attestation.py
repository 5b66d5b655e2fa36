"""Attestation endpoints: nonce, verify, stored reports, JWKS."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from r3e_tee.attestation.service import AttestationService
from r3e_tee.errors import InvalidRequestError
from r3e_tee.service.app import ServiceContext
from r3e_tee.service.auth import Principal, Scope
from r3e_tee.service.deps import get_ctx, require

router = APIRouter(tags=["attestation"])
Ctx = Annotated[ServiceContext, Depends(get_ctx)]


def attestation(ctx: ServiceContext) -> AttestationService:
    svc: AttestationService = ctx.components["attestation"]
    return svc


class NonceResponse(BaseModel):
    nonce: str = Field(description="hex; single use")
    expires_at: float


class PublicKeys(BaseModel):
    x25519: str = Field(description="base64 raw X25519 public key (32 bytes)")
    p256: str = Field(description="base64 uncompressed P-256 point (65 bytes)")


class VerifyRequest(BaseModel):
    evidence: str = Field(description="base64 evidence (DCAP quote or Nitro document)")
    nonce: str
    public_keys: PublicKeys
    provider: str = Field(description="the provider that launched the enclave")
    enclave_id: str | None = None
    collateral: dict[str, Any] | None = Field(
        None, description="DCAP collateral (dcap-qvl QuoteCollateralV3 JSON); verified like any other"
    )


class VerifyResponse(BaseModel):
    attestation_id: str
    token: str
    expires_at: int
    measurement: str | None
    result: dict[str, Any]


def _b64(value: str, name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{name} is not valid base64") from None


@router.post("/v1/attestation/nonce", summary="A fresh single-use nonce for evidence")
def nonce(ctx: Ctx, _: Annotated[Principal, Depends(require(Scope.ENCLAVE))]) -> NonceResponse:
    value, expires = attestation(ctx).new_nonce()
    return NonceResponse(nonce=value, expires_at=expires)


@router.post(
    "/v1/attestation/verify", summary="Verify evidence bound to a nonce and keys; returns a signed result"
)
async def verify(
    body: VerifyRequest, ctx: Ctx, principal: Annotated[Principal, Depends(require(Scope.ENCLAVE))]
) -> VerifyResponse:
    """A worker's token attests only the enclaves of the worker it registered (checked before
    the nonce is spent): the token names the enclave, and its simulated roots are chosen by it."""
    if body.enclave_id is not None and not principal.allows(Scope.ADMIN):
        await anyio.to_thread.run_sync(
            ctx.components["workers"].check_enclave_caller, body.enclave_id, principal.token_hash
        )
    evidence = _b64(body.evidence, "evidence")
    keys = {"x25519": _b64(body.public_keys.x25519, "x25519"), "p256": _b64(body.public_keys.p256, "p256")}
    collateral = None
    if body.collateral is not None:
        from r3e_tee.evidence.dcap_collateral import QuoteCollateral

        collateral = QuoteCollateral.from_json(body.collateral)
    outcome = await anyio.to_thread.run_sync(
        lambda: attestation(ctx).verify(
            evidence=evidence,
            nonce=body.nonce,
            public_keys=keys,
            provider=body.provider,
            enclave_id=body.enclave_id,
            collateral=collateral,
        )
    )
    return VerifyResponse(
        attestation_id=outcome.id,
        token=outcome.token.token,
        expires_at=outcome.token.expires_at,
        measurement=outcome.measurement,
        result=outcome.result.to_json(),
    )


@router.get("/v1/attestations/{attestation_id}", summary="A stored attestation report")
def get_attestation(
    attestation_id: str, ctx: Ctx, _: Annotated[Principal, Depends(require(Scope.READ))]
) -> dict[str, Any]:
    return attestation(ctx).get(attestation_id)


@router.get(
    "/v1/attestation/simulation-roots",
    summary="This installation's simulated roots (PEM by evidence kind); what they sign is never hardware",
)
def simulation_roots(ctx: Ctx) -> dict[str, str]:
    from cryptography.hazmat.primitives.serialization import Encoding

    manager = ctx.components.get("manager")
    sim = manager.providers.get("simulation") if manager is not None else None
    if sim is None:
        return {}
    return {
        kind.value: cert.public_bytes(Encoding.PEM).decode()
        for kind, cert in sim.verification_roots()["trust_roots"].items()
    }


@router.get("/.well-known/jwks.json", summary="Public keys that sign attestation tokens")
def jwks(ctx: Ctx) -> dict[str, Any]:
    return attestation(ctx).issuer.jwks()
