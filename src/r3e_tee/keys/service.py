"""Key management in the service: the installer and the HTTP API.

``install(ctx)`` opens the KEK (a missing or wrong KEK stops the service at start), checks it
against the store, re-wraps under a new KEK when ``keys.previous_kek`` is set, loads rotated
signing keys, connects the broker to the embedded worker (``EnclaveManager.deliver_secrets``)
and schedules rotation.

Routes (admin unless noted; no endpoint ever returns a secret's value):

* ``PUT /v1/secrets/{name}``: create or replace (value, release policy, optional key owner);
* ``GET /v1/secrets`` (read), ``GET /v1/secrets/{name}`` (read): metadata;
* ``DELETE /v1/secrets/{name}``: delete (tokens it was released to are revoked);
* ``POST /v1/secrets/release`` (enclave scope): sealed secrets for an attestation token;
* ``POST /v1/secrets/seal-key`` (enclave scope): a Nitro enclave's sealing key, sealed to it;
* ``POST /v1/secrets/deliver``: release and hand secrets to a running enclave of this service;
* ``GET /v1/keys`` (read): KEK, data key and signing key metadata, and the broker's public identity
  key (``broker_key``, what enclaves pin); ``POST /v1/keys/rotate``;
* ``GET /v1/audit``, ``GET /v1/audit/verify``: the audit log and its chain check.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Query, Response
from pydantic import BaseModel, Field, SecretStr

from r3e_tee.errors import InvalidRequestError, NotFoundError, R3ETeeError
from r3e_tee.keys.audit import AuditLog
from r3e_tee.keys.broker import KeyBroker
from r3e_tee.keys.kek import open_kek, open_previous_kek
from r3e_tee.keys.keystore import KeyStore
from r3e_tee.keys.policy import ReleasePolicy
from r3e_tee.keys.rotation import KeyRotation
from r3e_tee.service.app import ServiceContext
from r3e_tee.service.auth import Principal, Scope
from r3e_tee.service.deps import get_ctx, require
from r3e_tee.worker.manager import EnclaveManager, SecretSource

log = logging.getLogger("r3e_tee.keys")


@dataclass
class KeyManagement:
    """What this layer adds to ``ctx.components["keys"]``."""

    audit: AuditLog
    keystore: KeyStore
    broker: KeyBroker
    rotation: KeyRotation


class LocalSecretSource(SecretSource):
    """The embedded worker's path to the broker: a call in the same process (off the event loop)."""

    def __init__(self, broker: KeyBroker, worker_id: str) -> None:
        self.broker = broker
        self.actor = f"worker:{worker_id}"

    async def release(self, *, token: str, names: Sequence[str]) -> dict[str, Any]:
        release = await anyio.to_thread.run_sync(lambda: self.broker.release(token, names, actor=self.actor))
        return {
            "attestation_id": release.attestation_id,
            "broker_key": release.broker_key,
            "secrets": [s.to_wire() for s in release.secrets],
        }

    async def sealing_key(self, *, token: str) -> dict[str, Any]:
        key = await anyio.to_thread.run_sync(lambda: self.broker.sealing_key(token, actor=self.actor))
        return {
            "attestation_id": key.attestation_id,
            "owner": key.owner,
            "version": key.version,
            "sealed": key.sealed,
            "broker_key": key.broker_key,
        }


def _allow_generated_kek(ctx: ServiceContext) -> bool:
    """Like the token signing keys: a KEK is generated only in development or on an installation
    that runs the simulation provider alone (nothing there is hardware-protected anyway)."""
    return ctx.dev or set(ctx.config.enabled_providers) <= {"simulation"}


def install(ctx: ServiceContext) -> None:
    config = ctx.config
    source = open_kek(config.keys, ctx.data_dir, allow_generate=_allow_generated_kek(ctx))
    kek = source.kek
    previous = None
    try:
        previous = open_previous_kek(config.keys, ctx.data_dir)
        if source.generated:
            log.warning(
                "generated a key-encryption key in the data directory (development or simulation-only "
                "installation); production mounts one: keys.file.path or keys.kek_provider: pkcs11",
                extra={"kek_file": str(ctx.data_dir / "kek.key")},
            )
        audit = AuditLog(ctx.store)
        keystore = KeyStore(ctx.store, kek, audit, previous=previous)
        status = keystore.check_kek(actor="service")
        if status["rewrapped"]:
            log.warning(
                "re-wrapped every key under the new KEK; remove keys.previous_kek from the configuration",
                extra={"keys": status["rewrapped"], "kek_id": kek.kek_id},
            )
        attestation = ctx.components["attestation"]
        broker = KeyBroker(ctx.store, keystore, audit, attestation)
        rotation = KeyRotation(
            ctx.store,
            keystore,
            broker,
            audit,
            attestation.issuer,
            providers=list(config.enabled_providers),
            retain_versions=config.keys.retain_versions,
            rotation_period=config.keys.rotation_period,
        )
        broker.refresh_keys = rotation.sync_signing_keys
        rotation.initialize()
        broker_key = broker.public_key_b64u()  # made here on an installation's first start
    except BaseException:
        kek.close()
        if previous is not None:
            previous.close()
        raise
    keys = KeyManagement(audit, keystore, broker, rotation)
    ctx.components["keys"] = keys
    ctx.components["broker"] = broker
    # every enclave this service launches is measured with the broker's key: it opens only what
    # this broker sealed (keys/hpke.py), and a relying party sees which broker in the measurement
    ctx.components["enclaves"].broker_key = broker_key
    log.info(
        "key management ready",
        extra={
            "provider": kek.provider,
            "kek_id": kek.kek_id,
            "registered": status["registered"],
            "broker_key": broker_key,  # public: what enclaves pin (and Nitro images are built with)
        },
    )
    manager: EnclaveManager | None = ctx.components.get("manager")
    if manager is not None:
        manager.secret_source = LocalSecretSource(broker, manager.worker_id)
    ctx.components["routers"].append(_register)
    ctx.components["startup"].append(rotation.start)
    ctx.components["shutdown"].append(rotation.stop)
    ctx.on_shutdown.append(keystore.close)


# --- HTTP API ---------------------------------------------------------------------------------------

router = APIRouter(tags=["secrets and keys"])
Ctx = Annotated[ServiceContext, Depends(get_ctx)]
Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]
Reader = Annotated[Principal, Depends(require(Scope.READ))]
EnclaveScope = Annotated[Principal, Depends(require(Scope.ENCLAVE))]


def _register(app: FastAPI) -> None:
    app.include_router(router)


def _keys(ctx: ServiceContext) -> KeyManagement:
    keys: KeyManagement = ctx.components["keys"]
    return keys


def actor_of(principal: Principal) -> str:
    """Who did it, for the audit log: the token's label and a prefix of its hash."""
    return f"{principal.scope.value}:{principal.label} ({principal.token_hash[:12]})"


class PutSecret(BaseModel):
    value: SecretStr | None = Field(None, description="the value as UTF-8 text (or value_b64)")
    value_b64: SecretStr | None = Field(None, description="the value as base64 (binary values)")
    policy: dict[str, Any] = Field(
        description="release policy: measurements / mrsigner / expected_pcrs, providers, allow_debug, "
        "allow_simulation, and any attestation policy key"
    )
    owner: str | None = Field(
        None, description="data key owner, e.g. function:pricing (default secret:<name>)"
    )
    description: str | None = Field(None, max_length=1000)


def _value(body: PutSecret) -> bytes:
    if (body.value is None) == (body.value_b64 is None):
        raise InvalidRequestError("give exactly one of value and value_b64")
    if body.value is not None:
        return body.value.get_secret_value().encode()
    assert body.value_b64 is not None
    try:
        return base64.b64decode(body.value_b64.get_secret_value(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("value_b64 is not valid base64") from None


async def _forget(ctx: ServiceContext, enclave_ids: Sequence[str], name: str) -> None:
    """Enclaves of this service that hold a secret whose policy changed drop it (best effort)."""
    manager: EnclaveManager | None = ctx.components.get("manager")
    if manager is None:
        return
    for eid in enclave_ids:
        handle = manager.handles.get(eid)
        if handle is not None:
            with contextlib.suppress(R3ETeeError):
                await handle.channel.request("forget_secrets", names=[name], timeout=5)


@router.put("/v1/secrets/{name}", summary="Create or replace a secret (its value is never returned)")
async def put_secret(
    name: str, body: PutSecret, ctx: Ctx, principal: Admin, response: Response
) -> dict[str, Any]:
    broker = _keys(ctx).broker
    value = _value(body)
    policy = ReleasePolicy.from_dict(body.policy, source=f"release policy of secret {name!r}")
    change = await anyio.to_thread.run_sync(
        lambda: broker.put_secret(
            name, value, policy, actor=actor_of(principal), owner=body.owner, description=body.description
        )
    )
    if change.revoked_enclaves:
        await _forget(ctx, change.revoked_enclaves, name)
    response.status_code = 201 if change.created else 200
    return {
        **change.secret.to_dict(),
        "created": change.created,
        "policy_changed": change.policy_changed,
        "revoked_attestations": list(change.revoked_attestations),
    }


@router.get("/v1/secrets", summary="Secrets' metadata (never values)")
def list_secrets(ctx: Ctx, _: Reader) -> list[dict[str, Any]]:
    return [s.to_dict() for s in _keys(ctx).broker.list_secrets()]


@router.get("/v1/secrets/{name}", summary="One secret's metadata (never its value)")
def get_secret(name: str, ctx: Ctx, _: Reader) -> dict[str, Any]:
    return _keys(ctx).broker.get_secret(name).to_dict()


@router.delete("/v1/secrets/{name}", summary="Delete a secret; tokens it was released to are revoked")
async def delete_secret(name: str, ctx: Ctx, principal: Admin) -> dict[str, Any]:
    broker = _keys(ctx).broker
    change = await anyio.to_thread.run_sync(lambda: broker.delete_secret(name, actor=actor_of(principal)))
    await _forget(ctx, change.revoked_enclaves, name)
    return {"deleted": name, "revoked_attestations": list(change.revoked_attestations)}


class ReleaseRequest(BaseModel):
    token: str = Field(description="the enclave's attestation token (signed by this service)")
    names: list[str] = Field(min_length=1, max_length=64)


@router.post("/v1/secrets/release", summary="Secrets sealed (HPKE) to the enclave a token attests")
async def release(body: ReleaseRequest, ctx: Ctx, principal: EnclaveScope) -> dict[str, Any]:
    """The answer is ciphertext only the attested enclave can open; denials are 403 with a reason."""
    broker = _keys(ctx).broker
    out = await anyio.to_thread.run_sync(
        lambda: broker.release(body.token, body.names, actor=actor_of(principal))
    )
    from r3e_tee.keys.hpke import SUITE_NAME

    return {
        "attestation_id": out.attestation_id,
        "enclave_id": out.enclave_id,
        "expires_at": out.expires_at,
        "suite": SUITE_NAME,
        "broker_key": out.broker_key,
        "secrets": [
            {"name": s.name, "revision": s.revision, "sealed": base64.b64encode(s.sealed).decode()}
            for s in out.secrets
        ],
    }


class SealKeyRequest(BaseModel):
    token: str


@router.post("/v1/secrets/seal-key", summary="A Nitro enclave's sealing key (same PCRs), sealed to it")
async def seal_key(body: SealKeyRequest, ctx: Ctx, principal: EnclaveScope) -> dict[str, Any]:
    broker = _keys(ctx).broker
    key = await anyio.to_thread.run_sync(lambda: broker.sealing_key(body.token, actor=actor_of(principal)))
    return {
        "attestation_id": key.attestation_id,
        "owner": key.owner,
        "version": key.version,
        "sealed": base64.b64encode(key.sealed).decode(),
        "broker_key": key.broker_key,
    }


class DeliverRequest(BaseModel):
    enclave_id: str
    names: list[str] = Field(min_length=1, max_length=64)


@router.post("/v1/secrets/deliver", summary="Release secrets to a running enclave of this service")
async def deliver(body: DeliverRequest, ctx: Ctx, principal: Admin) -> dict[str, Any]:
    registry = ctx.components["enclaves"]
    worker = registry.worker_of(registry.get(body.enclave_id))
    if worker is None:
        raise NotFoundError(
            f"enclave {body.enclave_id} runs on no worker this service can reach",
            hint="list enclaves and workers: r3e-tee-cli list-enclaves, GET /v1/workers",
        )
    log.info(
        "delivering secrets",
        extra={
            "enclave_id": body.enclave_id,
            "secret_name": ",".join(body.names),
            "actor": actor_of(principal),
        },
    )
    reply = await worker.deliver_secrets(body.enclave_id, list(body.names))
    # "pinned": the enclave opened them as sealed by the broker key it was measured with
    return {
        "enclave_id": body.enclave_id,
        "received": reply.get("received", []),
        "broker": reply.get("broker"),
    }


# --- keys -----------------------------------------------------------------------------------------------


@router.get("/v1/keys", summary="KEK, data key and signing key metadata (no key material)")
def list_keys(
    ctx: Ctx, _: Reader, owner: Annotated[str | None, Query(description="only this owner")] = None
) -> dict[str, Any]:
    keys = _keys(ctx)
    return {
        "kek": keys.keystore.kek.describe(),
        "broker_key": keys.broker.public_key_b64u(),
        "rotation": {
            "period_s": keys.rotation.rotation_period,
            "retain_versions": keys.rotation.retain_versions,
            "last": keys.rotation.last_rotation(),
            "next": keys.rotation.next_rotation(),
        },
        "data_keys": [k.to_dict() for k in keys.keystore.list_keys(owner)],
        "signing_keys": keys.rotation.signing_keys(),
    }


class RotateRequest(BaseModel):
    data_keys: bool = True
    signing_keys: bool = True
    owners: list[str] | None = Field(None, description="only these data key owners (default: all)")


@router.post("/v1/keys/rotate", summary="Rotate data keys and token signing keys now")
async def rotate(ctx: Ctx, principal: Admin, body: RotateRequest | None = None) -> dict[str, Any]:
    req = body or RotateRequest()
    rotation = _keys(ctx).rotation
    return await anyio.to_thread.run_sync(
        lambda: rotation.rotate(
            actor=actor_of(principal),
            data_keys=req.data_keys,
            signing_keys=req.signing_keys,
            owners=req.owners,
        )
    )


# --- audit ------------------------------------------------------------------------------------------------


@router.get("/v1/audit", summary="Audit-log entries in order")
def audit_entries(
    ctx: Ctx,
    _: Admin,
    after: Annotated[int, Query(ge=0, le=2**63 - 1, description="entries after this sequence number")] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    action: Annotated[str | None, Query(description="only this action, e.g. secret.release")] = None,
    subject: Annotated[str | None, Query(description="only this subject, e.g. a secret name")] = None,
) -> dict[str, Any]:
    entries = _keys(ctx).audit.entries(after=after, limit=limit, action=action, subject=subject)
    return {
        "entries": [e.to_dict() for e in entries],
        "next_after": entries[-1].seq if entries else after,
    }


@router.get("/v1/audit/verify", summary="Verify the audit log's hash chain; names the first broken link")
def audit_verify(ctx: Ctx, _: Admin) -> dict[str, Any]:
    return _keys(ctx).audit.verify().to_dict()
