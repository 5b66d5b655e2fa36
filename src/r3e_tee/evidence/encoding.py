"""Evidence encodings and containers: detect them, peel them, and build them.

Evidence reaches the verifier in many wrappers: raw binary, hex or base64 text, PEM, a dstack
SCALE ``VersionedAttestation``, an X.509 certificate carrying a Nitro document hex-encoded in a
SAN dNSName (evervault cages), or an RA-TLS certificate carrying an IAS report. Detection is by
structure, never by file name, and every layer peeled is recorded so a result can say how the
evidence arrived. Pure functions over bytes; no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from r3e_tee.errors import EvidenceFormatError

__all__ = [
    "CERT_PARSE_ERRORS",
    "KINDS",
    "RA_TLS_REPORT_OID",
    "DecodedEvidence",
    "build_scale_versioned",
    "build_x509_san_hex_cert",
    "decode_evidence",
    "der_truncation_offset",
    "detect_binary_kind",
    "issue_certificate",
    "load_der_certificate",
]

# evidence kinds (same strings as r3e_tee.attestation.result.EvidenceKind values)
NITRO, SGX_IAS, SEV_SNP, SGX_DCAP, TDX_DCAP = "nitro", "sgx-ias", "sev-snp", "sgx-dcap", "tdx-dcap"
KINDS = (SGX_DCAP, TDX_DCAP, NITRO, SGX_IAS, SEV_SNP)
# Netscape comment extension, used by RA-TLS certificates to carry the IAS report
RA_TLS_REPORT_OID = x509.ObjectIdentifier("2.16.840.1.113730.1.13")
SNP_REPORT_SIZE = 0x4A0
_SCALE_VARIANTS = {0x02: NITRO, 0x03: SEV_SNP}
_MAX_LAYERS = 4
_TEXT_BYTES = frozenset(range(0x20, 0x7F)) | frozenset(b"\t\r\n\x0b\x0c")
_HEX_RE = re.compile(rb"^[0-9a-fA-F]+$")
_B64_RE = re.compile(rb"^[A-Za-z0-9+/_-]+={0,2}$")


@dataclass(frozen=True)
class DecodedEvidence:
    """Evidence in its native binary form, its detected kind and the layers that were peeled."""

    kind: str
    data: bytes
    encoding: tuple[str, ...]

    @property
    def encoding_label(self) -> str:
        return "+".join(self.encoding) if self.encoding else "binary"


def _is_text(data: bytes) -> bool:
    return bool(data) and all(b in _TEXT_BYTES for b in data)


def _strip_text(data: bytes) -> bytes:
    return b"".join(data.split())


def _decode_hex(text: bytes) -> bytes | None:
    compact = _strip_text(text)
    if compact[:2] in (b"0x", b"0X"):
        compact = compact[2:]
    if not compact or len(compact) % 2 or not _HEX_RE.match(compact):
        return None
    return bytes.fromhex(compact.decode())


def _decode_base64(text: bytes) -> bytes | None:
    compact = _strip_text(text)
    if not compact or not _B64_RE.match(compact):
        return None
    compact = compact.rstrip(b"=")
    if len(compact) % 4 == 1:
        return None
    padded = compact + b"=" * (-len(compact) % 4)
    try:
        if b"-" in padded or b"_" in padded:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None


def _decode_pem(text: bytes) -> bytes:
    m = re.search(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", text, re.S)
    if not m:
        raise EvidenceFormatError(
            "PEM block has no matching END line", field="pem", offset=text.find(b"-----")
        )
    body = _decode_base64(m.group(2))
    if body is None:
        raise EvidenceFormatError("PEM body is not base64", field="pem", offset=m.start(2))
    return body


def _scale_compact(data: bytes, at: int) -> tuple[int, int]:
    """SCALE compact integer at ``at`` -> (value, bytes used)."""
    if at >= len(data):
        raise EvidenceFormatError("missing SCALE compact length", field="scale.length", offset=at)
    mode = data[at] & 0b11
    if mode == 0:
        return data[at] >> 2, 1
    size = {1: 2, 2: 4}.get(mode)
    if size is None:
        n = (data[at] >> 2) + 4
        if at + 1 + n > len(data):
            raise EvidenceFormatError("truncated SCALE big-integer length", field="scale.length", offset=at)
        return int.from_bytes(data[at + 1 : at + 1 + n], "little"), 1 + n
    if at + size > len(data):
        raise EvidenceFormatError("truncated SCALE compact length", field="scale.length", offset=at)
    return int.from_bytes(data[at : at + size], "little") >> 2, size


# everything cryptography raises for certificates that do not parse (some lazily, on access)
CERT_PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    UnsupportedAlgorithm,
)


def load_der_certificate(data: bytes, *, field: str = "x509", offset: int | None = None) -> x509.Certificate:
    """Parse a DER (or PEM) certificate completely, so no lazy parse error surfaces later.

    Names, extensions and the public key are decoded here; any failure is an
    ``EvidenceFormatError`` naming ``field``.
    """
    with warnings.catch_warnings():
        # AMD VCEKs carry serial 0, which cryptography warns about but still parses
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
            _ = (cert.subject, cert.issuer, cert.extensions, cert.public_key())
            _ = (cert.not_valid_before_utc, cert.not_valid_after_utc)
        except CERT_PARSE_ERRORS as exc:
            raise EvidenceFormatError(
                f"not a parseable X.509 certificate ({exc})",
                field=field,
                offset=der_truncation_offset(data) if offset is None else offset,
            ) from None
    return cert


def _load_der_cert(data: bytes) -> x509.Certificate:
    return load_der_certificate(data, field="x509")


def der_truncation_offset(data: bytes) -> int | None:
    """Offset of the outer length field when it claims more bytes than exist (truncation)."""
    if len(data) < 2:
        return len(data)
    first = data[1]
    if first < 0x80:
        length, head = first, 2
    else:
        n = first & 0x7F
        if len(data) < 2 + n:
            return 1
        length, head = int.from_bytes(data[2 : 2 + n], "big"), 2 + n
    return 1 if head + length > len(data) else None


def _san_hex_document(cert: x509.Certificate) -> bytes | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    names = san.get_values_for_type(x509.DNSName)
    if not names:
        return None
    label = max(names, key=len).split(".", 1)[0]
    if len(label) < 64 or len(label) % 2 or not _HEX_RE.match(label.encode()):
        return None
    return bytes.fromhex(label)


def detect_binary_kind(data: bytes) -> str | None:
    """Kind of raw binary evidence by its structure, or ``None`` when nothing matches."""
    if not data:
        return None
    if data[0] == 0xD2 or data[0] == 0x84:  # COSE_Sign1 tag 18 / 4-array
        return NITRO
    if len(data) >= 48:
        version = int.from_bytes(data[0:2], "little")
        key_type = int.from_bytes(data[2:4], "little")
        tee_type = int.from_bytes(data[4:8], "little")
        if version in (3, 4, 5) and key_type in (2, 3) and tee_type in (0, 0x81):
            return TDX_DCAP if tee_type == 0x81 else SGX_DCAP
    if len(data) >= SNP_REPORT_SIZE:
        version = int.from_bytes(data[0:4], "little")
        sig_algo = int.from_bytes(data[0x34:0x38], "little")
        if 2 <= version <= 15 and sig_algo == 1:
            return SEV_SNP
    return None


def decode_evidence(data: bytes, *, kind: str | None = None) -> DecodedEvidence:
    """Peel text and container layers and detect the evidence kind.

    ``kind`` (one of ``KINDS``) forces the kind: layers are still peeled, a container of another
    kind is an error, and bytes that match no known structure are handed over as that kind so
    its parser reports the precise problem.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown evidence kind {kind!r}")
    layers: list[str] = []
    data = bytes(data)
    for _ in range(_MAX_LAYERS):
        if not data:
            raise EvidenceFormatError("empty evidence", field="evidence", offset=0)
        if _is_text(data):
            stripped = data.strip()
            if stripped.startswith(b"-----BEGIN"):
                layers.append("pem")
                data = _decode_pem(stripped)
                continue
            if stripped[:1] == b"{":
                return _result(SGX_IAS, stripped, [*layers, "json"], kind)
            decoded = _decode_hex(stripped)
            if decoded is not None:
                layers.append("hex")
                data = decoded
                continue
            decoded = _decode_base64(stripped)
            if decoded is not None:
                layers.append("base64")
                data = decoded
                continue
            raise EvidenceFormatError(
                "text evidence is neither PEM, JSON, hex nor base64", field="evidence.text", offset=0
            )
        # binary
        if len(data) >= 3 and data[0] == 0x00 and data[1] in _SCALE_VARIANTS:
            length, used = _scale_compact(data, 2)
            start = 2 + used
            if start + length > len(data):
                raise EvidenceFormatError(
                    f"SCALE length {length} exceeds the {len(data) - start} bytes present",
                    field="scale.evidence",
                    offset=2,
                )
            return _result(_SCALE_VARIANTS[data[1]], data[start : start + length], [*layers, "scale"], kind)
        if data[0] == 0x30:
            cert = _load_der_cert(data)
            try:
                cert.extensions.get_extension_for_oid(RA_TLS_REPORT_OID)
            except x509.ExtensionNotFound:
                pass
            else:
                return _result(SGX_IAS, data, [*layers, "ra-tls-cert"], kind)
            doc = _san_hex_document(cert)
            if doc is None:
                raise EvidenceFormatError(
                    "certificate carries neither an RA-TLS IAS report nor a hex Nitro document in its SAN",
                    field="x509",
                    offset=0,
                )
            layers.append("x509-san-hex")
            data = doc
            continue
        detected = detect_binary_kind(data)
        if detected is not None:
            return _result(detected, data, [*layers, "binary"], kind)
        if kind is not None:
            return DecodedEvidence(kind, data, (*layers, "binary"))
        raise EvidenceFormatError(
            "unrecognised evidence: not a DCAP quote, Nitro COSE document, SEV-SNP report, "
            "IAS report or certificate container",
            field="evidence",
            offset=0,
            hint="pass --kind to get the parser's precise error",
        )
    raise EvidenceFormatError(f"more than {_MAX_LAYERS} nested encodings", field="evidence", offset=0)


def _result(found: str, data: bytes, layers: list[str], forced: str | None) -> DecodedEvidence:
    dcap = {SGX_DCAP, TDX_DCAP}
    if forced is not None and forced != found and not (forced in dcap and found in dcap):
        raise EvidenceFormatError(
            f"evidence is {found} ({'+'.join(layers)}), not {forced}", field="evidence.kind", offset=0
        )
    return DecodedEvidence(forced or found, data, tuple(layers))


# --- builders -----------------------------------------------------------------------------------


def issue_certificate(
    subject: str | x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    *,
    issuer: x509.Certificate | x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    not_before: datetime,
    not_after: datetime,
    ca: bool,
    path_length: int | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    serial: int | None = None,
    hash_alg: hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None = None,
    rsa_pss: bool = False,
    content_commitment: bool = False,
    subject_key_id: bool = False,
) -> x509.Certificate:
    """Issue a certificate for builders and test PKIs (self-signed when ``issuer`` is None).

    ``issuer`` is the issuing certificate or just its name; Intel's PCK and TCB certificates set
    ``content_commitment`` (non-repudiation) on leaves and carry a subject key identifier."""
    name = (
        subject
        if isinstance(subject, x509.Name)
        else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer if isinstance(issuer, x509.Name) else issuer.subject)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=content_commitment and not ca,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if subject_key_id:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    alg = hash_alg or hashes.SHA384()
    if rsa_pss:
        pss = padding.PSS(mgf=padding.MGF1(alg), salt_length=alg.digest_size)
        return builder.sign(issuer_key, alg, rsa_padding=pss)
    return builder.sign(issuer_key, alg)


def build_x509_san_hex_cert(
    document: bytes,
    *,
    key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    hostname: str = "enclave.example.com",
) -> bytes:
    """An evervault-style cage certificate: the Nitro document hex-encoded in a SAN label."""
    san = x509.SubjectAlternativeName([x509.DNSName(hostname), x509.DNSName(f"{document.hex()}.{hostname}")])
    cert = issue_certificate(
        hostname,
        key.public_key(),
        issuer=None,
        issuer_key=key,
        not_before=not_before,
        not_after=not_after,
        ca=False,
        extensions=[(san, False)],
    )
    return cert.public_bytes(Encoding.DER)


def build_scale_versioned(kind: str, evidence: bytes) -> bytes:
    """dstack ``VersionedAttestation`` V0 wrapping of a Nitro document or an SNP report."""
    variant = {v: k for k, v in _SCALE_VARIANTS.items()}[kind]
    n = len(evidence)
    if n < 1 << 6:
        length = bytes([n << 2])
    elif n < 1 << 14:
        length = ((n << 2) | 1).to_bytes(2, "little")
    elif n < 1 << 30:
        length = ((n << 2) | 2).to_bytes(4, "little")
    else:
        raise ValueError("evidence too large for this SCALE encoder")
    return bytes([0x00, variant]) + length + evidence
