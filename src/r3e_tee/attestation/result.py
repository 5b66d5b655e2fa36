"""Typed verification results shared by every verifier.

A result exists only for evidence that passed every check; rejections raise
:class:`r3e_tee.errors.VerificationError` so a caller cannot forget to look at a verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class EvidenceKind(StrEnum):
    SGX_DCAP = "sgx-dcap"
    TDX_DCAP = "tdx-dcap"
    NITRO = "nitro"
    SGX_IAS = "sgx-ias"
    SEV_SNP = "sev-snp"


@dataclass(frozen=True)
class VerificationResult:
    """What a verifier established about one piece of evidence at one time.

    ``claims`` uses the key names of the shared vectors' ``cases.json`` (hex lower-case for
    byte strings) so the JSON form is stable across kinds and versions.
    """

    kind: EvidenceKind
    verified_at: datetime
    claims: Mapping[str, Any]
    tcb_status: str | None = None
    advisories: tuple[str, ...] = ()
    debug: bool = False
    simulated: bool = False
    # earliest expiry of anything the verdict relied on (collateral nextUpdate, cert notAfter)
    valid_until: datetime | None = None
    evidence_sha256: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def report_data(self) -> bytes | None:
        """The 64 bytes (SGX/TDX/SNP) the enclave bound into its evidence, if the kind has them."""
        value = self.claims.get("report_data")
        return bytes.fromhex(value) if isinstance(value, str) else None

    def to_json(self) -> dict[str, Any]:
        """Stable JSON form (keys sorted by the encoder of the caller, values JSON-native)."""
        return {
            "kind": self.kind.value,
            "verified_at": self.verified_at.isoformat().replace("+00:00", "Z"),
            "verdict": "valid",
            "tcb_status": self.tcb_status,
            "advisories": sorted(self.advisories),
            "debug": self.debug,
            "simulated": self.simulated,
            "valid_until": (
                self.valid_until.isoformat().replace("+00:00", "Z") if self.valid_until else None
            ),
            "evidence_sha256": self.evidence_sha256,
            "claims": dict(self.claims),
            "details": dict(self.details),
        }
