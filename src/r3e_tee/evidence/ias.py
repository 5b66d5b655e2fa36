"""Intel Attestation Service (IAS, EPID) attestation verification reports: parser and builders.

A report is the exact JSON body IAS returned, its ``X-IASReport-Signature`` (RSA-SHA256 over
those exact bytes) and the signing certificate chain. It travels as HTTP response parts, as a
JSON container ``{"report", "signature", "signing_cert"}`` (base64 strings or JSON byte
arrays), or inside an RA-TLS certificate whose extension 2.16.840.1.113730.1.13 holds either
``<report JSON>|<base64 signature>|<base64 DER cert>`` or that JSON container.

``isvEnclaveQuoteBody`` is the 432-byte EPID quote without its signature: a 48-byte quote header
(version, sign type, EPID group, QE/PCE SVN, XEID, basename) and the 384-byte SGX report body.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import struct
import urllib.parse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.utils import CryptographyDeprecationWarning

from r3e_tee.errors import EvidenceFormatError
from r3e_tee.evidence.encoding import (
    CERT_PARSE_ERRORS,
    RA_TLS_REPORT_OID,
    issue_certificate,
    load_der_certificate,
)

__all__ = [
    "ACCEPTABLE_QUOTE_STATUSES",
    "QUOTE_STATUSES",
    "IasPki",
    "IasQuoteBody",
    "IasReport",
    "build_ias_json",
    "build_ias_pki",
    "build_ias_report",
    "build_quote_body",
    "build_ra_tls_cert",
    "parse_ias_evidence",
    "parse_ias_report",
    "parse_quote_body",
    "parse_ra_tls_cert",
]

QUOTE_BODY_SIZE = 432
QUOTE_HEADER_SIZE = 48
# every isvEnclaveQuoteStatus of the IAS API (v3/v4/v5)
QUOTE_STATUSES = (
    "OK",
    "SIGNATURE_INVALID",
    "GROUP_REVOKED",
    "SIGNATURE_REVOKED",
    "KEY_REVOKED",
    "SIGRL_VERSION_MISMATCH",
    "GROUP_OUT_OF_DATE",
    "CONFIGURATION_NEEDED",
    "SW_HARDENING_NEEDED",
    "CONFIGURATION_AND_SW_HARDENING_NEEDED",
)
# statuses under which the quote itself verified (the platform may still need work)
ACCEPTABLE_QUOTE_STATUSES = (
    "OK",
    "GROUP_OUT_OF_DATE",
    "CONFIGURATION_NEEDED",
    "SW_HARDENING_NEEDED",
    "CONFIGURATION_AND_SW_HARDENING_NEEDED",
)
_TIMESTAMP_FORMATS = ("%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S")


@dataclass(frozen=True)
class IasQuoteBody:
    """The 432-byte ``isvEnclaveQuoteBody``: EPID quote header and SGX report body."""

    version: int
    sign_type: int
    epid_group_id: bytes
    qe_svn: int
    pce_svn: int
    xeid: int
    basename: bytes
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes
    raw: bytes = field(repr=False)

    @property
    def debug(self) -> bool:
        """ATTRIBUTES.FLAGS bit 1 (DEBUG)."""
        return bool(self.attributes[0] & 0x02)


def parse_quote_body(raw: bytes, *, field: str = "ias.isvEnclaveQuoteBody") -> IasQuoteBody:
    if len(raw) != QUOTE_BODY_SIZE:
        raise EvidenceFormatError(
            f"must be {QUOTE_BODY_SIZE} bytes (48-byte header + 384-byte report body), got {len(raw)}",
            field=field,
            offset=min(len(raw), QUOTE_BODY_SIZE),
        )
    version, sign_type = struct.unpack_from("<HH", raw, 0)
    qe_svn, pce_svn, xeid = struct.unpack_from("<HHI", raw, 8)
    r = QUOTE_HEADER_SIZE
    (misc_select,) = struct.unpack_from("<I", raw, r + 16)
    isv_prod_id, isv_svn = struct.unpack_from("<HH", raw, r + 256)
    return IasQuoteBody(
        version=version,
        sign_type=sign_type,
        epid_group_id=raw[4:8],
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        xeid=xeid,
        basename=raw[16:48],
        cpu_svn=raw[r : r + 16],
        misc_select=misc_select,
        attributes=raw[r + 48 : r + 64],
        mrenclave=raw[r + 64 : r + 96],
        mrsigner=raw[r + 128 : r + 160],
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        report_data=raw[r + 320 : r + 384],
        raw=bytes(raw),
    )


@dataclass(frozen=True)
class IasReport:
    """A parsed (not yet verified) IAS attestation verification report."""

    body: bytes = field(repr=False)  # exact signed JSON bytes
    signature: bytes = field(repr=False)
    signing_chain: tuple[bytes, ...] = field(repr=False)  # DER, signing cert first
    id: str
    timestamp: str
    version: int
    isv_enclave_quote_status: str
    quote: IasQuoteBody
    advisory_ids: tuple[str, ...] = ()
    advisory_url: str | None = None
    platform_info_blob: str | None = None
    nonce: str | None = None
    epid_pseudonym: str | None = None
    revocation_reason: int | None = None
    pse_manifest_status: str | None = None
    container: str = "json"
    # the RA-TLS certificate's public key (SPKI DER) when the report came in one
    ra_tls_public_key: bytes | None = field(default=None, repr=False)

    @property
    def issued_at(self) -> datetime:
        """IAS timestamps are UTC without a zone designator."""
        for fmt in _TIMESTAMP_FORMATS:
            try:
                return datetime.strptime(self.timestamp, fmt).replace(tzinfo=UTC)
            except ValueError:
                continue
        raise EvidenceFormatError("unparseable timestamp", field="ias.report.timestamp")  # pragma: no cover

    def claims(self) -> dict[str, Any]:
        q = self.quote
        out: dict[str, Any] = {
            "isvEnclaveQuoteStatus": self.isv_enclave_quote_status,
            "advisoryIDs": list(self.advisory_ids),
            "timestamp": self.timestamp,
            "mrenclave": q.mrenclave.hex(),
            "mrsigner": q.mrsigner.hex(),
            "isv_prod_id": q.isv_prod_id,
            "isv_svn": q.isv_svn,
            "debug": q.debug,
            "report_data": q.report_data.hex(),
        }
        if self.nonce is not None:
            out["nonce"] = self.nonce
        return out


def _b64(value: str | bytes, field: str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    compact = b"".join(raw.split())
    try:
        return base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceFormatError("is not valid base64", field=field, offset=0) from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _load_json(raw: bytes, field: str) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvidenceFormatError("is not UTF-8", field=field, offset=exc.start) from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise EvidenceFormatError(f"is not valid JSON ({exc.msg})", field=field, offset=exc.pos) from None
    except (ValueError, RecursionError) as exc:
        raise EvidenceFormatError(f"is not acceptable JSON ({exc})", field=field, offset=0) from None


def _signing_chain(certs: bytes | str | Sequence[bytes]) -> tuple[bytes, ...]:
    """DER certificates from a PEM chain (optionally URL-encoded, as IAS sends it) or DER list."""
    if isinstance(certs, (bytes, str)):
        text = certs.encode() if isinstance(certs, str) else certs
        if b"%2D" in text[:64] or b"%0A" in text:
            text = urllib.parse.unquote_to_bytes(text)
        if b"-----BEGIN" in text:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                try:
                    parsed = x509.load_pem_x509_certificates(text)
                except CERT_PARSE_ERRORS as exc:
                    raise EvidenceFormatError(
                        f"signing certificate chain is not valid PEM ({exc})", field="ias.signing_cert"
                    ) from None
            return tuple(c.public_bytes(Encoding.DER) for c in parsed)
        out: tuple[bytes, ...] = (text,)
    else:
        out = tuple(bytes(c) for c in certs)
    if not out or not all(out):
        raise EvidenceFormatError("signing certificate chain is empty", field="ias.signing_cert")
    return out


def parse_ias_report(
    body: bytes,
    signature: bytes | str,
    signing_certs: bytes | str | Sequence[bytes],
    *,
    container: str = "http",
) -> IasReport:
    """Parse the parts of an IAS response; ``signature`` raw or base64 (the header value)."""
    body = bytes(body)
    if isinstance(signature, str) or _looks_base64(signature):
        signature = _b64(signature, "ias.signature")
    if not signature:
        raise EvidenceFormatError("empty report signature", field="ias.signature", offset=0)
    chain = _signing_chain(signing_certs)
    doc = _load_json(body, "ias.report")
    if not isinstance(doc, dict):
        raise EvidenceFormatError("report must be a JSON object", field="ias.report", offset=0)

    def where(name: str) -> int:
        at = body.find(f'"{name}"'.encode())
        return at if at >= 0 else 0

    def get(name: str, kind: type | tuple[type, ...], required: bool) -> Any:
        if name not in doc:
            if required:
                raise EvidenceFormatError("mandatory field is missing", field=f"ias.report.{name}", offset=0)
            return None
        value = doc[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise EvidenceFormatError(
                f"has the wrong type ({type(value).__name__})", field=f"ias.report.{name}", offset=where(name)
            )
        return value

    report_id = get("id", str, True)
    timestamp = get("timestamp", str, True)
    if not any(_parses(timestamp, fmt) for fmt in _TIMESTAMP_FORMATS):
        raise EvidenceFormatError(
            "must be an ISO-8601 UTC time without zone (YYYY-MM-DDThh:mm:ss.ffffff)",
            field="ias.report.timestamp",
            offset=where("timestamp"),
        )
    version = get("version", int, True)
    if version not in (2, 3, 4, 5):
        raise EvidenceFormatError(
            f"unsupported report version {version}", field="ias.report.version", offset=where("version")
        )
    status = get("isvEnclaveQuoteStatus", str, True)
    if status not in QUOTE_STATUSES:
        raise EvidenceFormatError(
            f"unknown status {status!r}",
            field="ias.report.isvEnclaveQuoteStatus",
            offset=where("isvEnclaveQuoteStatus"),
        )
    quote_b64 = get("isvEnclaveQuoteBody", str, True)
    quote = parse_quote_body(_b64(quote_b64, "ias.report.isvEnclaveQuoteBody"))
    advisories = get("advisoryIDs", list, False) or []
    if not all(isinstance(a, str) for a in advisories):
        raise EvidenceFormatError(
            "must be a list of strings", field="ias.report.advisoryIDs", offset=where("advisoryIDs")
        )
    nonce = get("nonce", str, False)
    if nonce is not None and len(nonce) > 32:
        raise EvidenceFormatError(
            "must be at most 32 characters", field="ias.report.nonce", offset=where("nonce")
        )
    blob = get("platformInfoBlob", str, False)
    revocation = get("revocationReason", int, False)
    return IasReport(
        body=body,
        signature=signature,
        signing_chain=chain,
        id=report_id,
        timestamp=timestamp,
        version=version,
        isv_enclave_quote_status=status,
        quote=quote,
        advisory_ids=tuple(advisories),
        advisory_url=get("advisoryURL", str, False),
        platform_info_blob=blob,
        nonce=nonce,
        epid_pseudonym=get("epidPseudonym", str, False),
        revocation_reason=revocation,
        pse_manifest_status=get("pseManifestStatus", str, False),
        container=container,
    )


def _parses(value: str, fmt: str) -> bool:
    try:
        datetime.strptime(value, fmt)
    except ValueError:
        return False
    return True


def _looks_base64(value: bytes) -> bool:
    """IAS signatures are 256/384/512 raw bytes; base64 text of them is printable ASCII."""
    return bool(value) and all(0x20 < b < 0x7F or b in b"\r\n" for b in value)


def _bytes_field(value: Any, field: str) -> bytes:
    """A container field: base64 string or JSON array of byte values."""
    if isinstance(value, str):
        return _b64(value, field)
    if isinstance(value, list) and all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in value
    ):
        return bytes(value)
    raise EvidenceFormatError("must be a base64 string or an array of byte values", field=field, offset=0)


def _from_json_container(doc: Any, container: str) -> IasReport:
    if not isinstance(doc, dict):
        raise EvidenceFormatError("container must be a JSON object", field="ias.container", offset=0)
    for key in ("report", "signature", "signing_cert"):
        if key not in doc:
            raise EvidenceFormatError("mandatory field is missing", field=f"ias.container.{key}", offset=0)
    report = doc["report"]
    if isinstance(report, str) and report.lstrip().startswith("{"):
        body = report.encode("utf-8")
    else:
        body = _bytes_field(report, "ias.container.report")
    signature = _bytes_field(doc["signature"], "ias.container.signature")
    cert_field = doc["signing_cert"]
    if isinstance(cert_field, str) and "-----BEGIN" in cert_field:
        chain: bytes | Sequence[bytes] = cert_field.encode()
    elif isinstance(cert_field, list) and cert_field and all(isinstance(c, (str, list)) for c in cert_field):
        chain = [_bytes_field(c, f"ias.container.signing_cert[{i}]") for i, c in enumerate(cert_field)]
    else:
        chain = [_bytes_field(cert_field, "ias.container.signing_cert")]
    return parse_ias_report(body, signature, chain, container=container)


def parse_ra_tls_cert(der: bytes) -> IasReport:
    """Extract and parse the IAS report an RA-TLS certificate carries (cert is not verified)."""
    cert = load_der_certificate(bytes(der), field="ias.ra_tls_cert")
    try:
        ext = cert.extensions.get_extension_for_oid(RA_TLS_REPORT_OID).value
    except x509.ExtensionNotFound:
        raise EvidenceFormatError(
            "RA-TLS certificate has no 2.16.840.1.113730.1.13 report extension",
            field="ias.ra_tls_cert.extensions",
            offset=0,
        ) from None
    raw = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    raw = _unwrap_der_string(raw)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if raw.lstrip().startswith(b"{") and b"|" not in raw:
        report = _from_json_container(_load_json(raw, "ias.ra_tls_cert.report"), "ra-tls-cert")
    else:
        parts = raw.rsplit(b"|", 2)
        if len(parts) != 3:
            raise EvidenceFormatError(
                "extension must hold '<report>|<signature>|<certificate>' or a JSON container",
                field="ias.ra_tls_cert.report",
                offset=0,
            )
        body, sig, cert_b64 = parts
        report = parse_ias_report(
            body, _b64(sig, "ias.signature"), [_b64(cert_b64, "ias.signing_cert")], container="ra-tls-cert"
        )
    return _with(report, ra_tls_public_key=spki)


def _with(report: IasReport, **changes: Any) -> IasReport:
    return replace(report, **changes)


def _unwrap_der_string(raw: bytes) -> bytes:
    """Some producers DER-wrap the comment (IA5String/UTF8String/OCTET STRING); most do not."""
    if len(raw) >= 2 and raw[0] in (0x04, 0x0C, 0x16):
        first = raw[1]
        if first < 0x80:
            length, head = first, 2
        else:
            n = first & 0x7F
            length, head = int.from_bytes(raw[2 : 2 + n], "big"), 2 + n
        if head + length == len(raw):
            return raw[head:]
    return raw


def parse_ias_evidence(data: bytes) -> IasReport:
    """An RA-TLS certificate (DER) or a JSON container, whichever ``data`` is."""
    data = bytes(data)
    stripped = data.strip()
    if stripped.startswith(b"{"):
        return _from_json_container(_load_json(stripped, "ias.container"), "json")
    return parse_ra_tls_cert(data)


# --- builders -----------------------------------------------------------------------------------


def build_quote_body(
    *,
    mrenclave: bytes = b"\x11" * 32,
    mrsigner: bytes = b"\x22" * 32,
    isv_prod_id: int = 0,
    isv_svn: int = 0,
    report_data: bytes = b"\x00" * 64,
    debug: bool = False,
    epid_group_id: bytes = b"\x00\x0b\x00\x00",
) -> bytes:
    """A 432-byte ``isvEnclaveQuoteBody`` (version 2, linkable) with the given identity."""
    if len(mrenclave) != 32 or len(mrsigner) != 32 or len(report_data) != 64:
        raise ValueError("mrenclave/mrsigner must be 32 bytes and report_data 64 bytes")
    header = struct.pack("<HH4sHHI32s", 2, 1, epid_group_id, 11, 10, 0, b"\x00" * 32)
    flags = 0x05 | (0x02 if debug else 0)  # INIT | MODE64BIT (| DEBUG)
    attributes = struct.pack("<QQ", flags, 0x07)
    body = (
        b"\x0e\x0e\x02\x04\x01\x80"
        + b"\x00" * 10  # cpu_svn
        + struct.pack("<I", 0)  # misc_select
        + b"\x00" * 28
        + attributes
        + mrenclave
        + b"\x00" * 32
        + mrsigner
        + b"\x00" * 96
        + struct.pack("<HH", isv_prod_id, isv_svn)
        + b"\x00" * 60
        + report_data
    )
    return header + body


def build_ias_report(
    *,
    quote_body: bytes,
    signing_key: rsa.RSAPrivateKey,
    timestamp: datetime,
    status: str = "OK",
    advisory_ids: Sequence[str] = (),
    nonce: str | None = None,
    version: int = 4,
    platform_info_blob: str | None = None,
) -> tuple[bytes, bytes]:
    """(exact JSON body, raw RSA-SHA256 signature) in the field order IAS uses."""
    doc: dict[str, Any] = {
        "id": str(secrets.randbits(120)),
        "timestamp": timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f"),
        "version": version,
    }
    if advisory_ids:
        doc["advisoryURL"] = "https://security-center.intel.com"
        doc["advisoryIDs"] = list(advisory_ids)
    doc["isvEnclaveQuoteStatus"] = status
    if platform_info_blob is not None:
        doc["platformInfoBlob"] = platform_info_blob
    doc["isvEnclaveQuoteBody"] = base64.b64encode(quote_body).decode()
    if nonce is not None:
        doc["nonce"] = nonce
    body = json.dumps(doc, separators=(",", ":")).encode()
    return body, signing_key.sign(body, padding.PKCS1v15(), hashes.SHA256())


def build_ias_json(
    body: bytes, signature: bytes, signing_certs: Sequence[bytes], *, byte_arrays: bool = False
) -> bytes:
    """The JSON container form (base64 strings, or JSON byte arrays with ``byte_arrays``)."""

    def enc(b: bytes) -> Any:
        return list(b) if byte_arrays else base64.b64encode(b).decode()

    certs = [enc(c) for c in signing_certs]
    doc = {
        "report": enc(body),
        "signature": enc(signature),
        "signing_cert": certs[0] if len(certs) == 1 else certs,
    }
    return json.dumps(doc).encode()


def build_ra_tls_cert(
    body: bytes,
    signature: bytes,
    signing_cert: bytes,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    not_before: datetime | None = None,
    form: str = "pipe",
) -> bytes:
    """A self-signed P-256 RA-TLS certificate carrying the report (``form`` pipe or json)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    start = not_before or datetime.now(UTC)
    if form == "pipe":
        value = body + b"|" + base64.b64encode(signature) + b"|" + base64.b64encode(signing_cert)
    elif form == "json":
        value = build_ias_json(body, signature, [signing_cert])
    else:
        raise ValueError("form must be 'pipe' or 'json'")
    cert = issue_certificate(
        "R3E RA-TLS",
        key.public_key(),
        issuer=None,
        issuer_key=key,
        not_before=start,
        not_after=start + timedelta(days=90),
        ca=False,
        extensions=[(x509.UnrecognizedExtension(RA_TLS_REPORT_OID, value), False)],
        hash_alg=hashes.SHA256(),
    )
    return cert.public_bytes(Encoding.DER)


@dataclass(frozen=True)
class IasPki:
    """A Report Signing CA and its RSA report signing certificate (IAS-shaped, for tests)."""

    ca: x509.Certificate
    ca_key: rsa.RSAPrivateKey = field(repr=False)
    signing_cert: x509.Certificate
    signing_key: rsa.RSAPrivateKey = field(repr=False)

    @property
    def signing_der(self) -> bytes:
        return self.signing_cert.public_bytes(Encoding.DER)

    def report(self, quote_body: bytes, *, timestamp: datetime, **kw: Any) -> tuple[bytes, bytes]:
        return build_ias_report(
            quote_body=quote_body, signing_key=self.signing_key, timestamp=timestamp, **kw
        )


def build_ias_pki(
    *,
    not_before: datetime,
    not_after: datetime,
    signing_not_before: datetime | None = None,
    signing_not_after: datetime | None = None,
    rsa_bits: int = 2048,
) -> IasPki:
    """RSA CA and signing certificate (SHA-256), 2048-bit by default to keep tests fast."""
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    ca = issue_certificate(
        "R3E Test Attestation Report Signing CA",
        ca_key.public_key(),
        issuer=None,
        issuer_key=ca_key,
        not_before=not_before,
        not_after=not_after,
        ca=True,
        path_length=0,
        hash_alg=hashes.SHA256(),
    )
    cert = issue_certificate(
        "R3E Test Attestation Report Signing",
        key.public_key(),
        issuer=ca,
        issuer_key=ca_key,
        not_before=signing_not_before or not_before,
        not_after=signing_not_after or not_after,
        ca=False,
        hash_alg=hashes.SHA256(),
    )
    return IasPki(ca=ca, ca_key=ca_key, signing_cert=cert, signing_key=key)
