"""AWS Nitro Enclaves attestation documents: parser and builder.

The document is a COSE_Sign1 (tagged or untagged) whose payload is a CBOR map with the fields
of the AWS specification (aws-nitro-enclaves-nsm-api ``docs/attestation_process.md``). Every
field is checked for type and size here so that verifiers only ever see well-formed documents.
Limits follow the CDDL of that document (``user_data = bytes .size (0..1024)``, certificates
``1..1024``); ``null`` is accepted for the three optional fields because NSM emits it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from r3e_tee.errors import EvidenceFormatError
from r3e_tee.evidence.cbor import CborReader
from r3e_tee.evidence.cose import ALG_ES384, CoseSign1, parse_cose_sign1, sign1
from r3e_tee.evidence.encoding import issue_certificate

__all__ = [
    "DEBUG_CLAIM_PCRS",
    "NitroDocument",
    "NitroPki",
    "build_nitro_document",
    "build_nitro_pki",
    "parse_nitro_document",
]

MAX_PAYLOAD = 16384
MAX_CERT = 1024
MAX_USER_DATA = 1024
PCR_SIZES = (32, 48, 64)
MAX_PCRS = 32
MAX_TIMESTAMP_MS = 253402300799999  # 9999-12-31T23:59:59.999Z, the last instant a datetime holds
# PCRs reported in claims even when zero: the image, kernel, application and signing-cert
# measurements (all zero is how a debug-mode enclave shows itself). Others only when extended.
DEBUG_CLAIM_PCRS = (0, 1, 2, 8)

_REQUIRED = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
_OPTIONAL = ("public_key", "user_data", "nonce")


@dataclass(frozen=True)
class NitroDocument:
    """A syntactically valid Nitro attestation document (nothing is verified yet)."""

    cose: CoseSign1
    module_id: str
    digest: str
    timestamp: int  # milliseconds since the UNIX epoch
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    raw: bytes = field(repr=False)

    @property
    def debug(self) -> bool:
        """Debug-mode enclaves have PCR0 all zero; a missing PCR0 counts as debug (fail closed)."""
        pcr0 = self.pcrs.get(0)
        return pcr0 is None or not any(pcr0)

    @property
    def issued_at(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp / 1000, tz=UTC)

    def claims(self) -> dict[str, Any]:
        """Claims in the shared vectors' shape (hex lower-case; absent optional fields omitted)."""
        pcrs = {str(i): v.hex() for i, v in sorted(self.pcrs.items()) if i in DEBUG_CLAIM_PCRS or any(v)}
        out: dict[str, Any] = {
            "module_id": self.module_id,
            "digest": self.digest,
            "timestamp": self.timestamp,
            "pcrs": pcrs,
        }
        for name in ("user_data", "nonce", "public_key"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.hex()
        out["debug"] = self.debug
        return out


def parse_nitro_document(data: bytes) -> NitroDocument:
    """Parse and syntactically validate a Nitro attestation document (COSE_Sign1 bytes)."""
    data = bytes(data)
    cose = parse_cose_sign1(data, field="nitro.cose_sign1")
    if cose.alg != ALG_ES384:
        raise EvidenceFormatError(
            f"protected header alg must be -35 (ES384), got {cose.protected_header.get(1)!r}",
            field="nitro.cose_sign1.protected.alg",
            offset=0,
        )
    if len(cose.signature) != 96:
        raise EvidenceFormatError(
            f"ES384 signature must be 96 bytes, got {len(cose.signature)}",
            field="nitro.cose_sign1.signature",
            offset=len(data) - len(cose.signature),
        )
    if not 1 <= len(cose.payload) <= MAX_PAYLOAD:
        raise EvidenceFormatError(
            f"payload must be 1..{MAX_PAYLOAD} bytes, got {len(cose.payload)}",
            field="nitro.payload",
            offset=cose.payload_offset,
        )
    base = cose.payload_offset
    reader = CborReader(cose.payload, field="nitro.payload", base_offset=base)
    doc = reader.read_value()
    if not reader.at_end():
        raise reader.error("trailing bytes after the attestation document map")
    if not isinstance(doc, dict):
        raise EvidenceFormatError("payload must be a CBOR map", field="nitro.payload", offset=base)

    def fail(name: str, message: str) -> EvidenceFormatError:
        path = f"nitro.payload.{name}"
        return EvidenceFormatError(message, field=path, offset=reader.offsets.get(path, base))

    for key in doc:
        if key not in _REQUIRED and key not in _OPTIONAL:
            raise fail(str(key), f"unknown field {key!r} (allowed: {', '.join(_REQUIRED + _OPTIONAL)})")
    for key in _REQUIRED:
        if key not in doc:
            raise fail(key, "mandatory field is missing")
        if doc[key] is None:
            raise fail(key, "mandatory field is null")

    module_id = doc["module_id"]
    if not isinstance(module_id, str) or not module_id:
        raise fail("module_id", "must be a non-empty text string")
    digest = doc["digest"]
    if not isinstance(digest, str) or digest != "SHA384":
        raise fail("digest", f"must be the text 'SHA384', got {digest!r}")
    timestamp = doc["timestamp"]
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or not 0 < timestamp < 1 << 64:
        raise fail("timestamp", "must be an unsigned integer > 0 (milliseconds since the epoch)")
    if timestamp > MAX_TIMESTAMP_MS:
        raise fail("timestamp", f"{timestamp} ms is after the year 9999")

    raw_pcrs = doc["pcrs"]
    if not isinstance(raw_pcrs, dict) or not 1 <= len(raw_pcrs) <= MAX_PCRS:
        raise fail("pcrs", f"must be a map of 1..{MAX_PCRS} entries")
    pcrs: dict[int, bytes] = {}
    for idx, value in raw_pcrs.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < MAX_PCRS:
            raise fail("pcrs", f"PCR index {idx!r} must be an integer in 0..31")
        if not isinstance(value, bytes) or len(value) not in PCR_SIZES:
            raise fail(f"pcrs.{idx}", "PCR value must be a byte string of 32, 48 or 64 bytes")
        pcrs[idx] = value

    certificate = doc["certificate"]
    if not isinstance(certificate, bytes) or not 1 <= len(certificate) <= MAX_CERT:
        raise fail("certificate", f"must be a DER byte string of 1..{MAX_CERT} bytes")
    cabundle = doc["cabundle"]
    if not isinstance(cabundle, list) or not cabundle:
        raise fail("cabundle", "must be a non-empty array")
    for i, cert in enumerate(cabundle):
        if not isinstance(cert, bytes) or not 1 <= len(cert) <= MAX_CERT:
            raise fail(f"cabundle[{i}]", f"must be a DER byte string of 1..{MAX_CERT} bytes")

    optional: dict[str, bytes | None] = {}
    for key in _OPTIONAL:
        value = doc.get(key)
        if value is not None and not isinstance(value, bytes):
            raise fail(key, "must be a byte string or null")
        if value is not None and len(value) > MAX_USER_DATA:
            raise fail(key, f"must be at most {MAX_USER_DATA} bytes, got {len(value)}")
        if key == "public_key" and value is not None and not value:
            raise fail(key, "must not be empty when present (1..1024 bytes)")
        optional[key] = value

    return NitroDocument(
        cose=cose,
        module_id=module_id,
        digest=digest,
        timestamp=timestamp,
        pcrs=MappingProxyType(pcrs),
        certificate=certificate,
        cabundle=tuple(cabundle),
        public_key=optional["public_key"],
        user_data=optional["user_data"],
        nonce=optional["nonce"],
        raw=data,
    )


def build_nitro_document(
    *,
    signing_key: ec.EllipticCurvePrivateKey,
    certificate: bytes,
    cabundle: Sequence[bytes],
    pcrs: Mapping[int, bytes],
    timestamp: int | datetime,
    module_id: str = "i-0123456789abcdef0-enc0123456789abcdef",
    digest: str = "SHA384",
    public_key: bytes | None = None,
    user_data: bytes | None = None,
    nonce: bytes | None = None,
    tagged: bool = False,
    include_nulls: bool = True,
) -> bytes:
    """Build a COSE_Sign1 ES384 attestation document in the NSM's field order.

    ``cabundle`` is root first, as NSM emits it; the caller's ``certificate`` must carry the
    public key of ``signing_key``. With ``include_nulls`` absent optional fields are encoded as
    ``null`` (what NSM does); otherwise they are left out.
    """
    if isinstance(timestamp, datetime):
        timestamp = int(timestamp.timestamp() * 1000)
    payload: dict[str, Any] = {
        "module_id": module_id,
        "digest": digest,
        "timestamp": timestamp,
        "pcrs": dict(pcrs),
        "certificate": certificate,
        "cabundle": list(cabundle),
    }
    for key, value in (("public_key", public_key), ("user_data", user_data), ("nonce", nonce)):
        if value is not None or include_nulls:
            payload[key] = value
    return sign1(cbor2.dumps(payload), signing_key, alg=ALG_ES384, tagged=tagged)


@dataclass(frozen=True)
class NitroPki:
    """A Nitro-shaped hierarchy: root -> regional CA -> leaf (the NSM's per-document key).

    ``cabundle`` is root first, as NSM emits it; ``root`` is the anchor a verifier pins.
    """

    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey = field(repr=False)
    intermediates: tuple[x509.Certificate, ...]
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def cabundle(self) -> list[bytes]:
        return [c.public_bytes(Encoding.DER) for c in (self.root, *self.intermediates)]

    @property
    def certificate(self) -> bytes:
        return self.leaf.public_bytes(Encoding.DER)

    def document(self, **fields: Any) -> bytes:
        """``build_nitro_document`` signed by this PKI's leaf (other fields passed through)."""
        return build_nitro_document(
            signing_key=self.leaf_key, certificate=self.certificate, cabundle=self.cabundle, **fields
        )


def build_nitro_pki(
    *,
    not_before: datetime,
    not_after: datetime,
    leaf_not_before: datetime | None = None,
    leaf_not_after: datetime | None = None,
    root_name: str = "R3E simulated nitro-enclaves",
) -> NitroPki:
    """P-384/SHA-384 certificates with the CA constraints AWS uses (leaf: digitalSignature)."""
    root_key = ec.generate_private_key(ec.SECP384R1())
    mid_key = ec.generate_private_key(ec.SECP384R1())
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    root = issue_certificate(
        root_name,
        root_key.public_key(),
        issuer=None,
        issuer_key=root_key,
        not_before=not_before,
        not_after=not_after,
        ca=True,
    )
    mid = issue_certificate(
        f"{root_name} regional",
        mid_key.public_key(),
        issuer=root,
        issuer_key=root_key,
        not_before=not_before,
        not_after=not_after,
        ca=True,
        path_length=0,
    )
    leaf = issue_certificate(
        "i-0123456789abcdef0-enc0123456789abcdef",
        leaf_key.public_key(),
        issuer=mid,
        issuer_key=mid_key,
        not_before=leaf_not_before or not_before,
        not_after=leaf_not_after or not_after,
        ca=False,
    )
    return NitroPki(root=root, root_key=root_key, intermediates=(mid,), leaf=leaf, leaf_key=leaf_key)
