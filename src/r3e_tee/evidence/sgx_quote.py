"""Intel DCAP ECDSA quotes (SGX v3, SGX/TDX v4, TDX v5): pure parsers and encoders over bytes.

Layouts follow Intel's "SGX ECDSA Quote Library API" (quote v3) and "TDX DCAP Quoting Library
API" (quote v4/v5). The parser is strict about structure (every length field must fit exactly in
its container) but tolerates padding after the signature data, as real quote providers pad quotes
to fixed sizes. It checks formats only: no signature, no policy. Any failure raises
:class:`~r3e_tee.errors.EvidenceFormatError` with the field name and the byte offset in the quote.

The ``encode_*`` functions are the inverse, for builders that make format-exact test evidence.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from r3e_tee.errors import EvidenceFormatError

HEADER_LEN = 48
SGX_REPORT_LEN = 384
TD10_REPORT_LEN = 584
TD15_REPORT_LEN = 648

TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081

ATT_KEY_TYPE_ECDSA_P256 = 2

BODY_SGX = 1
BODY_TD10 = 2
BODY_TD15 = 3

CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class _Reader:
    """Bounds-checked cursor: every read names its field so errors say where parsing stopped."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise EvidenceFormatError(
                f"needs {n} bytes, only {max(0, self.end - self.pos)} left", field=field, offset=self.pos
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, field: str) -> int:
        return int(_U16.unpack(self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(_U32.unpack(self.take(4, field))[0])


# --- data model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte header. In v3 bytes 8..12 are QE SVN and PCE SVN; in v4/v5 they are reserved."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class EnclaveReport:
    """SGX REPORT body (384 bytes): the ISV enclave report of SGX quotes and the QE report."""

    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes
    raw: bytes

    @property
    def debug(self) -> bool:
        """ATTRIBUTES.FLAGS bit 1 (DEBUG)."""
        return bool(self.attributes[0] & 0x02)


@dataclass(frozen=True)
class TdReport:
    """TDX TD report body: TD 1.0 (584 bytes) or TD 1.5 (648 bytes, adds tee_tcb_svn2, mr_servicetd)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None
    mr_servicetd: bytes | None
    raw: bytes

    @property
    def debug(self) -> bool:
        """TD_ATTRIBUTES bit 0 (TUD.DEBUG)."""
        return bool(self.td_attributes[0] & 0x01)


@dataclass(frozen=True)
class CertificationData:
    """Certification data: ``cert_type`` and its payload, located at ``offset`` in the quote.

    Type 5 carries a PEM PCK chain; type 6 wraps a QE report certification data (``qe_report_cert``)
    whose own certification data is normally type 5.
    """

    cert_type: int
    data: bytes
    offset: int
    qe_report_cert: QeReportCertificationData | None = None

    @property
    def pck_chain(self) -> CertificationData | None:
        """The innermost type-5 certification data, if any."""
        if self.cert_type == CERT_TYPE_PCK_CHAIN:
            return self
        if self.qe_report_cert is not None:
            return self.qe_report_cert.certification.pck_chain
        return None


@dataclass(frozen=True)
class QeReportCertificationData:
    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    certification: CertificationData


@dataclass(frozen=True)
class EcdsaSignatureData:
    """ECDSA-256 quote signature data, normalised over the v3 and v4/v5 layouts."""

    signature: bytes  # r || s over the signed region
    attestation_key: bytes  # raw x || y
    qe_report: EnclaveReport
    qe_report_signature: bytes  # r || s by the PCK key over qe_report.raw
    qe_auth_data: bytes
    certification: CertificationData  # outermost certification data


@dataclass(frozen=True)
class Quote:
    header: QuoteHeader
    body_type: int  # BODY_SGX, BODY_TD10, BODY_TD15
    body: EnclaveReport | TdReport
    signed_region: bytes  # header || [v5 body type/size] || body: what the attestation key signs
    signature_data: EcdsaSignatureData
    signature_data_len: int
    trailing: int  # padding bytes after the signature data (ignored)

    @property
    def is_tdx(self) -> bool:
        return self.header.tee_type == TEE_TYPE_TDX

    @property
    def pck_chain_pem(self) -> bytes | None:
        cd = self.signature_data.certification.pck_chain
        return cd.data if cd is not None else None


# --- parsing -----------------------------------------------------------------------------------


_HEADER = struct.Struct("<HHIHH16s20s")
# cpu_svn, misc_select, reserved, attributes, mr_enclave, reserved, mr_signer, reserved, config_id,
# isv_prod_id, isv_svn, config_svn, reserved, isv_family_id, report_data
_SGX_REPORT = struct.Struct("<16sI28s16s32s32s32s32s64sHHH42s16s64s")
_TD10 = struct.Struct("<16s48s48s8s8s8s48s48s48s48s48s48s48s48s64s")


def parse_header(data: bytes, offset: int = 0) -> QuoteHeader:
    if offset + HEADER_LEN > len(data):
        raise EvidenceFormatError(
            f"header needs {HEADER_LEN} bytes, only {max(0, len(data) - offset)} left",
            field="header",
            offset=offset,
        )
    version, akt, tee, qe_svn, pce_svn, vendor, user_data = _HEADER.unpack_from(data, offset)
    return QuoteHeader(version, akt, tee, qe_svn, pce_svn, vendor, user_data)


def parse_enclave_report(data: bytes, offset: int = 0, *, field: str = "report") -> EnclaveReport:
    """Parse a 384-byte SGX REPORT body starting at ``offset``."""
    if offset + SGX_REPORT_LEN > len(data):
        raise EvidenceFormatError(
            f"SGX report needs {SGX_REPORT_LEN} bytes, only {max(0, len(data) - offset)} left",
            field=field,
            offset=offset,
        )
    raw = data[offset : offset + SGX_REPORT_LEN]
    f = _SGX_REPORT.unpack(raw)
    return EnclaveReport(
        cpu_svn=f[0],
        misc_select=f[1],
        attributes=f[3],
        mr_enclave=f[4],
        mr_signer=f[6],
        config_id=f[8],
        isv_prod_id=f[9],
        isv_svn=f[10],
        config_svn=f[11],
        isv_family_id=f[13],
        report_data=f[14],
        raw=raw,
    )


def parse_td_report(data: bytes, offset: int, size: int, *, field: str = "td_report") -> TdReport:
    """Parse a TD 1.0 (584 B) or TD 1.5 (648 B) report body starting at ``offset``."""
    if size not in (TD10_REPORT_LEN, TD15_REPORT_LEN):
        raise EvidenceFormatError(f"unsupported TD report size {size}", field=field, offset=offset)
    if offset + size > len(data):
        raise EvidenceFormatError(
            f"TD report needs {size} bytes, only {max(0, len(data) - offset)} left",
            field=field,
            offset=offset,
        )
    raw = data[offset : offset + size]
    f = _TD10.unpack_from(raw)
    return TdReport(
        tee_tcb_svn=f[0],
        mr_seam=f[1],
        mr_signer_seam=f[2],
        seam_attributes=f[3],
        td_attributes=f[4],
        xfam=f[5],
        mr_td=f[6],
        mr_config_id=f[7],
        mr_owner=f[8],
        mr_owner_config=f[9],
        rtmrs=(f[10], f[11], f[12], f[13]),
        report_data=f[14],
        tee_tcb_svn2=raw[584:600] if size == TD15_REPORT_LEN else None,
        mr_servicetd=raw[600:648] if size == TD15_REPORT_LEN else None,
        raw=raw,
    )


def _parse_cert_data(r: _Reader, field: str, depth: int = 0) -> CertificationData:
    cert_type = r.u16(f"{field}.type")
    size = r.u32(f"{field}.size")
    start = r.pos
    payload = r.take(size, f"{field}.data")
    qe_cert: QeReportCertificationData | None = None
    if cert_type == CERT_TYPE_QE_REPORT:
        if depth > 0:
            raise EvidenceFormatError("nested QE report certification data", field=field, offset=start - 6)
        inner = _Reader(r.data, start, start + size)
        qe_report = parse_enclave_report(r.data, inner.pos, field=f"{field}.qe_report")
        inner.pos += SGX_REPORT_LEN
        qe_sig = inner.take(64, f"{field}.qe_report_signature")
        auth_len = inner.u16(f"{field}.qe_auth_data.size")
        auth = inner.take(auth_len, f"{field}.qe_auth_data")
        nested = _parse_cert_data(inner, f"{field}.certification_data", depth + 1)
        if inner.pos != inner.end:
            raise EvidenceFormatError(
                f"{inner.end - inner.pos} unexplained bytes in QE report certification data",
                field=field,
                offset=inner.pos,
            )
        qe_cert = QeReportCertificationData(qe_report, qe_sig, auth, nested)
    elif not 1 <= cert_type <= 7:
        raise EvidenceFormatError(
            f"unknown certification data type {cert_type}", field=f"{field}.type", offset=start - 6
        )
    return CertificationData(cert_type, payload, start, qe_cert)


def parse_quote(data: bytes) -> Quote:
    """Parse an ECDSA-256 DCAP quote (v3, v4 or v5; SGX or TDX). Trailing padding is ignored."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EvidenceFormatError("quote must be bytes", field="quote", offset=0)
    data = bytes(data)
    r = _Reader(data)
    header = parse_header(data)
    r.pos = HEADER_LEN
    if header.version not in (3, 4, 5):
        raise EvidenceFormatError(
            f"unsupported quote version {header.version}", field="header.version", offset=0
        )
    if header.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise EvidenceFormatError(
            f"unsupported attestation key type {header.att_key_type} (only 2 = ECDSA-256-with-P-256)",
            field="header.att_key_type",
            offset=2,
        )
    if header.tee_type not in (TEE_TYPE_SGX, TEE_TYPE_TDX):
        raise EvidenceFormatError(
            f"unknown TEE type 0x{header.tee_type:x}", field="header.tee_type", offset=4
        )
    if header.version == 3 and header.tee_type != TEE_TYPE_SGX:
        raise EvidenceFormatError("quote v3 is SGX only", field="header.tee_type", offset=4)

    body: EnclaveReport | TdReport
    if header.version == 5:
        body_type = r.u16("body.type")
        body_size = r.u32("body.size")
        expected = {BODY_SGX: SGX_REPORT_LEN, BODY_TD10: TD10_REPORT_LEN, BODY_TD15: TD15_REPORT_LEN}.get(
            body_type
        )
        if expected is None:
            raise EvidenceFormatError(f"unknown body type {body_type}", field="body.type", offset=HEADER_LEN)
        if body_size != expected:
            raise EvidenceFormatError(
                f"body type {body_type} must be {expected} bytes, header says {body_size}",
                field="body.size",
                offset=HEADER_LEN + 2,
            )
        if (body_type == BODY_SGX) != (header.tee_type == TEE_TYPE_SGX):
            raise EvidenceFormatError(
                "body type does not match TEE type", field="body.type", offset=HEADER_LEN
            )
    else:
        body_type = BODY_SGX if header.tee_type == TEE_TYPE_SGX else BODY_TD10
        body_size = SGX_REPORT_LEN if body_type == BODY_SGX else TD10_REPORT_LEN
    if body_type == BODY_SGX:
        body = parse_enclave_report(data, r.pos, field="body")
    else:
        body = parse_td_report(data, r.pos, body_size, field="body")
    r.pos += body_size
    signed_region = data[: r.pos]

    sig_len = r.u32("signature_data.size")
    sig_start = r.pos
    if sig_start + sig_len > len(data):
        raise EvidenceFormatError(
            f"signature data of {sig_len} bytes runs past the end ({len(data) - sig_start} left)",
            field="signature_data.size",
            offset=sig_start - 4,
        )
    s = _Reader(data, sig_start, sig_start + sig_len)
    signature = s.take(64, "signature_data.signature")
    att_key = s.take(64, "signature_data.attestation_key")
    if header.version == 3:
        qe_report = parse_enclave_report(data, s.pos, field="signature_data.qe_report")
        s.pos += SGX_REPORT_LEN
        qe_sig = s.take(64, "signature_data.qe_report_signature")
        auth_len = s.u16("signature_data.qe_auth_data.size")
        auth = s.take(auth_len, "signature_data.qe_auth_data")
        cert = _parse_cert_data(s, "signature_data.certification_data", depth=1)
    else:
        cert = _parse_cert_data(s, "signature_data.certification_data")
        if cert.qe_report_cert is None:
            raise EvidenceFormatError(
                f"quote v{header.version} needs certification data type 6, found {cert.cert_type}",
                field="signature_data.certification_data.type",
                offset=cert.offset - 6,
            )
        qe_report = cert.qe_report_cert.qe_report
        qe_sig = cert.qe_report_cert.qe_report_signature
        auth = cert.qe_report_cert.qe_auth_data
    if s.pos != s.end:
        raise EvidenceFormatError(
            f"{s.end - s.pos} unexplained bytes at the end of the signature data",
            field="signature_data",
            offset=s.pos,
        )
    sig_data = EcdsaSignatureData(signature, att_key, qe_report, qe_sig, auth, cert)
    return Quote(
        header=header,
        body_type=body_type,
        body=body,
        signed_region=signed_region,
        signature_data=sig_data,
        signature_data_len=sig_len,
        trailing=len(data) - s.end,
    )


# --- encoding ----------------------------------------------------------------------------------


def encode_header(
    *,
    version: int,
    tee_type: int,
    att_key_type: int = ATT_KEY_TYPE_ECDSA_P256,
    qe_svn: int = 0,
    pce_svn: int = 0,
    qe_vendor_id: bytes = INTEL_QE_VENDOR_ID,
    user_data: bytes = bytes(20),
) -> bytes:
    if len(qe_vendor_id) != 16 or len(user_data) != 20:
        raise ValueError("qe_vendor_id is 16 bytes, user_data 20 bytes")
    return struct.pack("<HHIHH", version, att_key_type, tee_type, qe_svn, pce_svn) + qe_vendor_id + user_data


def _fixed(value: bytes, size: int, name: str) -> bytes:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    return value


def encode_enclave_report(
    *,
    cpu_svn: bytes = bytes(16),
    misc_select: int = 0,
    attributes: bytes = bytes(16),
    mr_enclave: bytes = bytes(32),
    mr_signer: bytes = bytes(32),
    config_id: bytes = bytes(64),
    isv_prod_id: int = 0,
    isv_svn: int = 0,
    config_svn: int = 0,
    isv_family_id: bytes = bytes(16),
    report_data: bytes = bytes(64),
) -> bytes:
    """Encode an SGX REPORT body (384 bytes); reserved fields are zero."""
    out = (
        _fixed(cpu_svn, 16, "cpu_svn")
        + _U32.pack(misc_select)
        + bytes(28)
        + _fixed(attributes, 16, "attributes")
        + _fixed(mr_enclave, 32, "mr_enclave")
        + bytes(32)
        + _fixed(mr_signer, 32, "mr_signer")
        + bytes(32)
        + _fixed(config_id, 64, "config_id")
        + _U16.pack(isv_prod_id)
        + _U16.pack(isv_svn)
        + _U16.pack(config_svn)
        + bytes(42)
        + _fixed(isv_family_id, 16, "isv_family_id")
        + _fixed(report_data, 64, "report_data")
    )
    return out


def encode_td_report(
    *,
    tee_tcb_svn: bytes = bytes(16),
    mr_seam: bytes = bytes(48),
    mr_signer_seam: bytes = bytes(48),
    seam_attributes: bytes = bytes(8),
    td_attributes: bytes = bytes(8),
    xfam: bytes = bytes(8),
    mr_td: bytes = bytes(48),
    mr_config_id: bytes = bytes(48),
    mr_owner: bytes = bytes(48),
    mr_owner_config: bytes = bytes(48),
    rtmrs: tuple[bytes, bytes, bytes, bytes] = (bytes(48),) * 4,
    report_data: bytes = bytes(64),
    tee_tcb_svn2: bytes | None = None,
    mr_servicetd: bytes | None = None,
) -> bytes:
    """Encode a TD 1.0 report body, or TD 1.5 when ``tee_tcb_svn2``/``mr_servicetd`` are given."""
    out = (
        _fixed(tee_tcb_svn, 16, "tee_tcb_svn")
        + _fixed(mr_seam, 48, "mr_seam")
        + _fixed(mr_signer_seam, 48, "mr_signer_seam")
        + _fixed(seam_attributes, 8, "seam_attributes")
        + _fixed(td_attributes, 8, "td_attributes")
        + _fixed(xfam, 8, "xfam")
        + _fixed(mr_td, 48, "mr_td")
        + _fixed(mr_config_id, 48, "mr_config_id")
        + _fixed(mr_owner, 48, "mr_owner")
        + _fixed(mr_owner_config, 48, "mr_owner_config")
        + b"".join(_fixed(x, 48, "rtmr") for x in rtmrs)
        + _fixed(report_data, 64, "report_data")
    )
    if tee_tcb_svn2 is not None or mr_servicetd is not None:
        out += _fixed(tee_tcb_svn2 or bytes(16), 16, "tee_tcb_svn2") + _fixed(
            mr_servicetd or bytes(48), 48, "mr_servicetd"
        )
    return out


def encode_cert_data(cert_type: int, data: bytes) -> bytes:
    return _U16.pack(cert_type) + _U32.pack(len(data)) + data


def encode_qe_report_cert_data(
    qe_report: bytes, qe_report_signature: bytes, qe_auth_data: bytes, inner: bytes
) -> bytes:
    """Type-6 payload: QE report, its signature, auth data, then the (type-5) certification data."""
    return (
        _fixed(qe_report, SGX_REPORT_LEN, "qe_report")
        + _fixed(qe_report_signature, 64, "qe_report_signature")
        + _U16.pack(len(qe_auth_data))
        + qe_auth_data
        + inner
    )


def signed_region(header: bytes, body: bytes, *, version: int, body_type: int | None = None) -> bytes:
    """The bytes the attestation key signs: header || [v5: body type, size] || body."""
    if version == 5:
        if body_type is None:
            body_type = {SGX_REPORT_LEN: BODY_SGX, TD10_REPORT_LEN: BODY_TD10, TD15_REPORT_LEN: BODY_TD15}[
                len(body)
            ]
        return header + _U16.pack(body_type) + _U32.pack(len(body)) + body
    return header + body


def assemble_quote(
    signed: bytes,
    *,
    version: int,
    signature: bytes,
    attestation_key: bytes,
    qe_report: bytes,
    qe_report_signature: bytes,
    qe_auth_data: bytes,
    pck_chain_pem: bytes,
    padding: int = 0,
) -> bytes:
    """Append the ECDSA signature data in the layout of ``version`` (v3 inline, v4/v5 type 6)."""
    pck = encode_cert_data(CERT_TYPE_PCK_CHAIN, pck_chain_pem)
    head = _fixed(signature, 64, "signature") + _fixed(attestation_key, 64, "attestation_key")
    if version == 3:
        sig_data = (
            head
            + _fixed(qe_report, SGX_REPORT_LEN, "qe_report")
            + _fixed(qe_report_signature, 64, "qe_report_signature")
            + _U16.pack(len(qe_auth_data))
            + qe_auth_data
            + pck
        )
    else:
        sig_data = head + encode_cert_data(
            CERT_TYPE_QE_REPORT, encode_qe_report_cert_data(qe_report, qe_report_signature, qe_auth_data, pck)
        )
    return signed + _U32.pack(len(sig_data)) + sig_data + bytes(padding)
