"""The simulated DCAP platform: a PCK chain, a quoting enclave and fresh collateral.

Built with the same builders tests use (evidence/dcap_builder.py) under keys generated once
per installation. Only keys and the creation time are persisted; certificates are re-made
from them (the verifier pins the root by public key). Collateral is re-signed with a fresh
30-day window whenever the current one is within a day of its nextUpdate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from r3e_tee.evidence.dcap_builder import (
    DcapPlatform,
    PlatformSpec,
    build_collateral,
    build_sgx_quote,
    build_test_platform,
)
from r3e_tee.evidence.dcap_collateral import QuoteCollateral

SIMULATED_MRSIGNER = hashlib.sha256(b"r3e-tee simulated enclave signer").digest()
_KEYS = ("root_key", "pck_ca_key", "pck_key", "tcb_signing_key", "attestation_key")
# INIT | MODE64BIT; DEBUG is bit 1 of the first byte
_ATTRIBUTES = bytes.fromhex("05000000000000000700000000000000")
_DEBUG_ATTRIBUTES = bytes.fromhex("07000000000000000700000000000000")


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _spec(created: datetime, keys: dict[str, ec.EllipticCurvePrivateKey]) -> PlatformSpec:
    return PlatformSpec(
        tee="sgx",
        now=created,
        organization="R3E TEE Simulation",
        root_common_name="R3E Simulated SGX Root CA",
        fmspc=bytes.fromhex("00E3E0000000"),
        cert_not_before=created - timedelta(days=1),
        cert_not_after=created + timedelta(days=3650),
        **keys,  # type: ignore[arg-type]
    )


@dataclass
class SimulatedDcapPlatform:
    created: datetime
    platform: DcapPlatform
    _collateral: QuoteCollateral | None = field(default=None, repr=False)
    _collateral_until: datetime | None = None

    @classmethod
    def create(cls, now: datetime) -> SimulatedDcapPlatform:
        keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in _KEYS}
        platform, _ = build_test_platform(_spec(now, keys))
        return cls(now, platform)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulatedDcapPlatform:
        created = datetime.fromisoformat(data["created"])
        keys = {}
        for name in _KEYS:
            key = serialization.load_pem_private_key(data["keys"][name].encode(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"simulated DCAP key {name} is not an EC key")
            keys[name] = key
        platform, _ = build_test_platform(_spec(created, keys))
        return cls(created, platform)

    def to_dict(self) -> dict[str, Any]:
        p = self.platform
        return {
            "created": self.created.isoformat(),
            "keys": {name: _pem(getattr(p, name)) for name in _KEYS},
        }

    @property
    def root_cert(self) -> x509.Certificate:
        return self.platform.root_cert

    def collateral(self) -> QuoteCollateral:
        now = datetime.now(UTC).replace(microsecond=0)
        if (
            self._collateral is None
            or self._collateral_until is None
            or now > self._collateral_until - timedelta(days=1)
        ):
            next_update = now + timedelta(days=30)
            self._collateral = build_collateral(
                self.platform, issued=now - timedelta(hours=1), next_update=next_update
            )
            self._collateral_until = next_update
        return self._collateral

    def quote(self, *, mrenclave: bytes, report_data: bytes, debug: bool) -> bytes:
        return build_sgx_quote(
            self.platform,
            report_data=report_data,
            mr_enclave=mrenclave,
            mr_signer=SIMULATED_MRSIGNER,
            attributes=_DEBUG_ATTRIBUTES if debug else _ATTRIBUTES,
            version=3,
        )
