"""The embedded worker's path to the attestation service: a call in the same process."""

from __future__ import annotations

from collections.abc import Mapping

import anyio

from r3e_tee.attestation.service import AttestationService
from r3e_tee.worker.manager import AttestationBackend, AttestationGrant


class LocalAttestation(AttestationBackend):
    def __init__(self, service: AttestationService) -> None:
        self.service = service

    async def nonce(self) -> str:
        value, _ = await anyio.to_thread.run_sync(self.service.new_nonce)
        return value

    async def verify(
        self, *, evidence: bytes, nonce: str, public_keys: Mapping[str, bytes], provider: str, enclave_id: str
    ) -> AttestationGrant:
        outcome = await anyio.to_thread.run_sync(
            lambda: self.service.verify(
                evidence=evidence,
                nonce=nonce,
                public_keys=public_keys,
                provider=provider,
                enclave_id=enclave_id,
            )
        )
        return AttestationGrant(
            attestation_id=outcome.id,
            token=outcome.token.token,
            expires_at=float(outcome.token.expires_at),
            measurement=outcome.measurement,
        )
