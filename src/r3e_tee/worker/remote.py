"""A standalone worker's links to its service: attestation, state reports, registration."""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from r3e_tee.errors import (
    EnclaveError,
    EvidenceFormatError,
    R3ETeeError,
    Reason,
    VerificationError,
)
from r3e_tee.worker.manager import AttestationBackend, AttestationGrant, StateSink


class ServiceLink:
    """HTTP to the control plane with the worker's token; errors name the URL and the reason."""

    def __init__(self, server: str, token: str, *, timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.server,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "r3e-tee-worker"},
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise EnclaveError(
                f"cannot reach the service at {self.server}{path}: {exc or type(exc).__name__}",
                hint="check --server / R3E_TEE_URL and the network between worker and service",
            ) from None
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {"message": resp.text[:200]}
            if isinstance(body, dict) and body.get("error") == "rejected":
                try:
                    reason = Reason(str(body.get("reason", "malformed")))
                except ValueError:  # a reason this worker's version does not know
                    raise R3ETeeError(
                        f"{self.server}{path}: rejected ({body.get('reason')}): {body.get('message')}",
                        hint="the service is newer than this worker: upgrade r3e-tee-worker",
                    ) from None
                raise VerificationError(
                    reason,
                    str(body.get("message", "")),
                    check=str(body.get("check", "service")),
                    observed=body.get("observed"),
                    expected=body.get("expected"),
                )
            if isinstance(body, dict) and body.get("error") == "malformed":
                raise EvidenceFormatError(str(body.get("message")), field=str(body.get("field", "evidence")))
            message = body.get("message") if isinstance(body, dict) else str(body)
            raise R3ETeeError(f"{self.server}{path}: HTTP {resp.status_code}: {message}")
        return resp.json() if resp.content else None

    async def aclose(self) -> None:
        await self._http.aclose()


class HttpAttestation(AttestationBackend):
    """``collateral(provider, evidence)`` lets a provider send the DCAP collateral it knows
    (the simulation provider's own); the service verifies it like any other."""

    def __init__(
        self, link: ServiceLink, collateral: Callable[[str, bytes], dict[str, Any] | None] | None = None
    ) -> None:
        self.link = link
        self.collateral = collateral

    async def nonce(self) -> str:
        reply = await self.link.call("POST", "/v1/attestation/nonce")
        return str(reply["nonce"])

    async def verify(
        self, *, evidence: bytes, nonce: str, public_keys: Mapping[str, bytes], provider: str, enclave_id: str
    ) -> AttestationGrant:
        reply = await self.link.call(
            "POST",
            "/v1/attestation/verify",
            json={
                "evidence": base64.b64encode(evidence).decode(),
                "nonce": nonce,
                "public_keys": {k: base64.b64encode(v).decode() for k, v in public_keys.items()},
                "provider": provider,
                "enclave_id": enclave_id,
                "collateral": self.collateral(provider, evidence) if self.collateral else None,
            },
        )
        return AttestationGrant(
            attestation_id=reply["attestation_id"],
            token=reply["token"],
            expires_at=float(reply["expires_at"]),
            measurement=reply.get("measurement"),
        )


class HttpSink(StateSink):
    def __init__(self, link: ServiceLink, worker_id: str) -> None:
        self.link = link
        self.worker_id = worker_id

    async def update(self, enclave_id: str, **fields: Any) -> None:
        await self.link.call("POST", f"/v1/workers/{self.worker_id}/enclaves/{enclave_id}", json=fields)

    async def owned(self, worker_id: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.link.call("GET", f"/v1/workers/{worker_id}/enclaves")
        return rows
