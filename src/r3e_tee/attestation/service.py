"""The attestation service: nonce -> evidence -> verdict -> signed attestation result.

Which trust anchors and collateral apply is decided by the provider the *host* launched the
enclave on, never by the evidence: evidence from the simulation provider is checked against
the installation's simulated roots (and then marked simulated), hardware evidence against the
pinned vendor roots. Every verdict, accepted or rejected, is stored with its evidence.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from r3e_tee.attestation.binding import matches, nitro_public_key_field, report_data_for
from r3e_tee.attestation.nonces import NonceStore
from r3e_tee.attestation.policy import Policy
from r3e_tee.attestation.result import EvidenceKind, VerificationResult
from r3e_tee.attestation.tokens import IssuedToken, TokenIssuer
from r3e_tee.attestation.verify import Verifier
from r3e_tee.errors import (
    EvidenceFormatError,
    InvalidRequestError,
    NotFoundError,
    R3ETeeError,
    Reason,
    VerificationError,
)
from r3e_tee.store import Store

log = logging.getLogger("r3e_tee.attestation")


@dataclass(frozen=True)
class AttestationOutcome:
    id: str
    token: IssuedToken
    result: VerificationResult
    measurement: str | None


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _is_dcap(evidence: bytes) -> bool:
    """Quote versions 3-5 start with a little-endian u16 version (raw evidence from a provider)."""
    return len(evidence) > 2 and evidence[1] == 0 and evidence[0] in (3, 4, 5)


def measurement_of(result: VerificationResult) -> str | None:
    """The one value that names the code: MRENCLAVE, MR_TD, PCR0 or the SNP measurement."""
    return measurement_from_claims(result.claims)


def measurement_from_claims(c: Mapping[str, Any]) -> str | None:
    """:func:`measurement_of` over a result's claims (as stored with the attestation)."""
    for key in ("mrenclave", "mr_td", "measurement"):
        if isinstance(c.get(key), str):
            return str(c[key])
    pcrs = c.get("pcrs")
    if isinstance(pcrs, Mapping):
        value = pcrs.get("0", pcrs.get(0))
        return str(value) if value is not None else None
    return None


#: what an enclave of each hardware provider can present. One verifier holds the pinned Intel
#: and AWS roots for both, so without this the evidence alone would decide which kind of enclave
#: a provider's enclave is: genuine Nitro evidence would pass as an SGX enclave's.
PROVIDER_EVIDENCE: Mapping[str, frozenset[EvidenceKind]] = {
    "sgx": frozenset({EvidenceKind.SGX_DCAP, EvidenceKind.SGX_IAS}),
    "nitro": frozenset({EvidenceKind.NITRO}),
}


def check_provider_kind(provider: str, kind: EvidenceKind) -> None:
    """Refuse evidence of a kind the named provider's enclaves cannot produce."""
    allowed = PROVIDER_EVIDENCE.get(provider)
    if allowed is not None and kind not in allowed:
        raise VerificationError(
            Reason.KIND_NOT_ALLOWED,
            f"an enclave of provider {provider!r} cannot present {kind.value} evidence",
            check="provider.evidence-kind",
            observed=kind.value,
            expected=", ".join(sorted(k.value for k in allowed)),
        )


class AttestationService:
    def __init__(
        self,
        store: Store,
        issuer: TokenIssuer,
        nonces: NonceStore,
        *,
        policy: Policy,
        verifiers: Mapping[str, Verifier],
        simulation_verifier: Callable[[str | None], Verifier | None] | None = None,
    ) -> None:
        """``verifiers``: per provider, a verifier holding that provider's trust anchors (the
        pinned vendor roots, or the installation's simulated roots) and collateral source."""
        self.store = store
        self.issuer = issuer
        self.nonces = nonces
        self.policy = policy
        self.verifiers: dict[str, Verifier] = dict(verifiers)
        # remote workers' simulated roots, looked up by the enclave's worker
        self.simulation_verifier = simulation_verifier

    def new_nonce(self) -> tuple[str, float]:
        return self.nonces.issue()

    def verify(
        self,
        *,
        evidence: bytes,
        nonce: str,
        public_keys: Mapping[str, bytes],
        provider: str,
        enclave_id: str | None = None,
        policy: Policy | None = None,
        collateral: Any = None,
    ) -> AttestationOutcome:
        """Consume the nonce, verify the evidence and its binding, store, sign. Raises on rejection."""
        att_id = uuid.uuid4().hex
        x25519_pub = public_keys.get("x25519", b"")
        p256_pub = public_keys.get("p256", b"")
        try:
            nonce_bytes = bytes.fromhex(nonce)
        except ValueError:
            raise InvalidRequestError("nonce must be hex, as POST /v1/attestation/nonce returns it") from None
        try:
            expected_rd = report_data_for(nonce_bytes, x25519_pub, p256_pub)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        verifier = self.verifiers.get(provider)
        if verifier is None and provider == "simulation" and self.simulation_verifier is not None:
            verifier = self.simulation_verifier(enclave_id)
        if verifier is None:
            raise InvalidRequestError(
                f"no verifier for provider {provider!r}",
                hint=f"known providers: {', '.join(sorted(self.verifiers))}",
            )
        try:
            self.nonces.consume(nonce)
            if collateral is None and verifier.collateral_provider is not None and _is_dcap(evidence):
                # resolved here so the stored report says exactly which collateral was used
                collateral = verifier.collateral_provider(EvidenceKind.SGX_DCAP, evidence)
            # collateral from the caller is safe to use: it is verified against the same roots
            result = verifier.verify(evidence, collateral=collateral, policy=policy or self.policy)
            check_provider_kind(provider, result.kind)
            self._check_binding(result, expected_rd, nonce_bytes, x25519_pub, p256_pub)
        except (VerificationError, EvidenceFormatError) as exc:
            self._record(
                att_id, enclave_id, provider, None, evidence, nonce, public_keys, exc, collateral=collateral
            )
            raise
        measurement = measurement_of(result)
        claims = {
            "provider": provider,
            "evidence_kind": result.kind.value,
            "measurement": measurement,
            "tcb_status": result.tcb_status,
            "advisories": sorted(result.advisories),
            "debug": result.debug,
            "simulated": result.simulated,
            "report_data": expected_rd.hex(),
            "nonce": nonce,
            "cnf": {"x25519": b64u(x25519_pub), "p256": b64u(p256_pub)},
            "tee": dict(result.claims),
        }
        token = self.issuer.issue(provider, claims, subject=enclave_id or att_id, jti=att_id)
        self._record(
            att_id,
            enclave_id,
            provider,
            result,
            evidence,
            nonce,
            public_keys,
            None,
            token,
            collateral=collateral,
        )
        log.info(
            "attestation accepted",
            extra={
                "attestation_id": att_id,
                "enclave_id": enclave_id,
                "provider": provider,
                "kind": result.kind.value,
                "simulated": result.simulated,
            },
        )
        return AttestationOutcome(att_id, token, result, measurement)

    @staticmethod
    def _check_binding(
        result: VerificationResult, expected_rd: bytes, nonce: bytes, x25519_pub: bytes, p256_pub: bytes
    ) -> None:
        if result.kind == EvidenceKind.NITRO:
            c = result.claims
            checks = (
                ("nonce", nonce, c.get("nonce")),
                ("public_key", nitro_public_key_field(x25519_pub, p256_pub), c.get("public_key")),
                ("user_data", expected_rd, c.get("user_data")),
            )
            for name, want, got in checks:
                observed = bytes.fromhex(got) if isinstance(got, str) else None
                if not matches(want, observed):
                    raise VerificationError(
                        Reason.REPORT_DATA_MISMATCH,
                        f"the document's {name} does not bind this nonce and keys (replayed or unbound)",
                        check=f"binding.{name}",
                        observed=got if isinstance(got, str) else None,
                        expected=want.hex(),
                    )
            return
        if not matches(expected_rd, result.report_data):
            raise VerificationError(
                Reason.REPORT_DATA_MISMATCH,
                "report_data is not SHA-512(nonce || x25519 || p256): replayed or not bound to these keys",
                check="binding.report_data",
                observed=result.report_data.hex() if result.report_data else None,
                expected=expected_rd.hex(),
            )

    def _record(
        self,
        att_id: str,
        enclave_id: str | None,
        provider: str,
        result: VerificationResult | None,
        evidence: bytes,
        nonce: str,
        public_keys: Mapping[str, bytes],
        error: R3ETeeError | None,
        token: IssuedToken | None = None,
        *,
        collateral: Any = None,
    ) -> None:
        reason = None
        if isinstance(error, VerificationError):
            reason = error.reason.value
        elif isinstance(error, EvidenceFormatError):
            reason = Reason.MALFORMED.value
        self.store.execute(
            "INSERT INTO attestations (id, enclave_id, provider, kind, verdict, reason, detail, claims, "
            "evidence, evidence_sha256, collateral, nonce, public_keys, token_kid, token_expires_at, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                att_id,
                enclave_id,
                provider,
                result.kind.value if result else None,
                "valid" if result else "invalid",
                reason,
                json.dumps(error.to_dict()) if error else None,
                json.dumps(result.to_json()) if result else None,
                evidence,
                hashlib.sha256(evidence).hexdigest(),
                json.dumps(self._collateral_record(result, collateral)),
                nonce,
                json.dumps({k: b64u(v) for k, v in public_keys.items()}),
                token.kid if token else None,
                float(token.expires_at) if token else None,
                time.time(),
            ),
        )
        if error is not None:
            log.warning(
                "attestation rejected",
                extra={
                    "attestation_id": att_id,
                    "enclave_id": enclave_id,
                    "provider": provider,
                    "reason": reason,
                },
            )

    @staticmethod
    def _collateral_record(result: VerificationResult | None, collateral: Any) -> dict[str, Any]:
        """The collateral used (dcap-qvl JSON) and how long the verdict relied on it."""
        to_json = getattr(collateral, "to_json", None)
        return {
            "bundle": to_json() if callable(to_json) else None,
            "valid_until": result.valid_until.isoformat() if result and result.valid_until else None,
            "details": {k: v for k, v in result.details.items() if k != "policy"} if result else {},
        }

    def get(self, att_id: str) -> dict[str, Any]:
        row = self.store.fetchone("SELECT * FROM attestations WHERE id = ?", (att_id,))
        if row is None:
            raise NotFoundError(f"no attestation {att_id}")
        out = dict(row)
        out["evidence"] = base64.b64encode(bytes(row["evidence"])).decode()
        for key in ("claims", "detail", "collateral", "public_keys"):
            out[key] = json.loads(row[key]) if row[key] else None
        return out

    def revoke_enclave(self, enclave_id: str) -> int:
        """Revoke every attestation (and so every token) of an enclave."""
        return self.store.execute(
            "UPDATE attestations SET revoked_at = ? WHERE enclave_id = ? AND revoked_at IS NULL",
            (time.time(), enclave_id),
        )

    def is_revoked(self, att_id: str) -> bool:
        row = self.store.fetchone("SELECT revoked_at FROM attestations WHERE id = ?", (att_id,))
        return row is None or row["revoked_at"] is not None
