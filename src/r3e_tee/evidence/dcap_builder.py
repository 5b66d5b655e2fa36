"""Builders of format-exact DCAP evidence under caller-supplied keys: a whole test platform (root
CA, PCK CA, PCK certificate with the SGX extension, TCB signing cert, CRLs, TCB Info, QE Identity,
QE report) and SGX / TDX quotes v3, v4 and v5 signed by its attestation key.

Tests use it to make every rejection class on purpose; the simulation provider uses it to emit a
DCAP-shaped quote under a per-installation simulated root, so the real verifier code path runs:

    spec = PlatformSpec(tee="sgx", root_key=my_root_key, organization="R3E", name_prefix="R3E Simulated SGX")
    platform, collateral = build_test_platform(spec)
    quote = build_sgx_quote(platform, report_data=binding, mr_enclave=measurement)
    DcapVerifier(platform.root_cert_pem, simulated=True).verify(quote, collateral, at=now)

Collateral is valid from ``now - 1 day`` to ``now + 30 days``; refresh it with
``build_collateral(platform, issued=..., next_update=...)`` (same keys, new windows).

Everything here is deterministic given the keys and times in the spec, except certificate serial
numbers and ECDSA nonces.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from r3e_tee.evidence.dcap_collateral import (
    EnclaveIdentity,
    IsvSvnLevel,
    QuoteCollateral,
    TcbInfo,
    TcbLevel,
    TdxModule,
    TdxModuleIdentity,
    enclave_identity_json,
    tcb_info_json,
)
from r3e_tee.evidence.encoding import issue_certificate
from r3e_tee.evidence.sgx_quote import (
    BODY_TD10,
    BODY_TD15,
    INTEL_QE_VENDOR_ID,
    TEE_TYPE_SGX,
    TEE_TYPE_TDX,
    assemble_quote,
    encode_enclave_report,
    encode_header,
    encode_td_report,
    signed_region,
)
from r3e_tee.evidence.x509_ext import SGX_EXTENSION_OID, PckExtension, der_to_pem, encode_pck_extension

__all__ = [
    "INTEL_QE_MRSIGNER",
    "INTEL_TD_QE_MRSIGNER",
    "DcapPlatform",
    "PlatformSpec",
    "build_collateral",
    "build_crl",
    "build_sgx_quote",
    "build_tdx_quote",
    "build_test_platform",
    "sign_p256_raw",
]

INTEL_QE_MRSIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
INTEL_TD_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
QE_ATTRIBUTES_MASK = bytes.fromhex("fbffffffffffffff0000000000000000")

_SHA256 = hashes.SHA256()


def sign_p256_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 signature as raw r || s (the DCAP encoding)."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(_SHA256)))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]


@dataclass(frozen=True)
class PlatformSpec:
    """What the simulated platform and its collateral look like. Defaults: a valid, UpToDate
    platform whose collateral is valid from ``now - 1 day`` to ``now + 30 days``."""

    tee: Literal["sgx", "tdx"] = "sgx"
    now: datetime | None = None
    organization: str = "Intel Corporation"
    # certificate names: "<prefix> Root CA", "<prefix> PCK Processor CA", "<prefix> PCK Certificate",
    # "<prefix> TCB Signing" (a simulated root would use e.g. "R3E Simulated SGX")
    name_prefix: str = "Intel SGX"
    root_common_name: str | None = None  # default "<prefix> Root CA"
    ca: Literal["processor", "platform"] = "processor"
    fmspc: bytes = bytes.fromhex("00906ED50000")
    pce_id: bytes = b"\x00\x00"
    tcb_components: tuple[int, ...] = (11, 11, 2, 2, 255, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0)
    pce_svn: int = 13
    sgx_type: int = 0
    # TDX: TEE_TCB_SVN of the TD quotes (byte 0 module SVN, byte 1 module major version)
    tee_tcb_svn: bytes = bytes([5, 1, 2] + [0] * 13)
    # platform TCB Info: by default one level equal to the platform with this status
    tcb_status: str = "UpToDate"
    advisory_ids: tuple[str, ...] = ()
    tcb_levels: tuple[TcbLevel, ...] | None = None
    tcb_info_version: int = 3
    tdx_module_status: str = "UpToDate"
    tdx_module_mrsigner: bytes = bytes(48)
    # the QE of the platform, and what the QE Identity says
    qe_isvsvn: int = 8
    qe_mrsigner: bytes | None = None  # default: Intel's (TD) QE MRSIGNER
    qe_isvprodid: int | None = None  # default: 1 for SGX, 2 for TDX
    qe_tcb_status: str = "UpToDate"
    qe_advisory_ids: tuple[str, ...] = ()
    identity_mrsigner: bytes | None = None  # default: same as the QE's
    identity_isvprodid: int | None = None
    # validity windows (default relative to `now`)
    collateral_issued: datetime | None = None
    collateral_next_update: datetime | None = None
    cert_not_before: datetime | None = None
    cert_not_after: datetime | None = None
    # revocation
    revoke_pck: bool = False
    revoke_pck_ca: bool = False
    # caller-supplied keys (generated when absent)
    root_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    pck_ca_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    pck_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    tcb_signing_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    attestation_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)

    def at(self) -> datetime:
        return (self.now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class DcapPlatform:
    """The signing material of one simulated platform (keys, certificates, the signed QE report)."""

    spec: PlatformSpec
    root_key: ec.EllipticCurvePrivateKey = field(repr=False)
    root_cert: x509.Certificate
    pck_ca_key: ec.EllipticCurvePrivateKey = field(repr=False)
    pck_ca_cert: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey = field(repr=False)
    pck_cert: x509.Certificate
    tcb_signing_key: ec.EllipticCurvePrivateKey = field(repr=False)
    tcb_signing_cert: x509.Certificate
    attestation_key: ec.EllipticCurvePrivateKey = field(repr=False)
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes

    @property
    def root_cert_der(self) -> bytes:
        return self.root_cert.public_bytes(Encoding.DER)

    @property
    def root_cert_pem(self) -> str:
        return der_to_pem(self.root_cert_der)

    def pem(self, *certs: x509.Certificate) -> str:
        return "".join(der_to_pem(c.public_bytes(Encoding.DER)) for c in certs)

    @property
    def pck_chain_pem(self) -> bytes:
        """Certification data type 5 as Intel's QE writes it: leaf, CA, root, then a NUL."""
        return self.pem(self.pck_cert, self.pck_ca_cert, self.root_cert).encode() + b"\0"


# --- certificates and CRLs ---------------------------------------------------------------------


def _name(org: str, cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def _cert(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    ca: bool,
    path_length: int | None = None,
    extra: list[x509.ExtensionType] | None = None,
) -> x509.Certificate:
    """A certificate shaped like Intel's (P-256, SHA-256, key identifier, non-repudiation on leaves)."""
    return issue_certificate(
        subject,
        public_key,
        issuer=issuer,
        issuer_key=signer,
        not_before=not_before,
        not_after=not_after,
        ca=ca,
        path_length=path_length,
        extensions=[(ext, False) for ext in extra or []],
        hash_alg=_SHA256,
        content_commitment=True,
        subject_key_id=True,
    )


def build_crl(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    this_update: datetime,
    next_update: datetime,
    revoked_serials: tuple[int, ...] = (),
) -> bytes:
    """A DER CRL in Intel's profile (v2, ECDSA-SHA256, CRL number)."""
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(1), critical=False)
    )
    for serial in revoked_serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this_update).build()
        )
    return b.sign(issuer_key, _SHA256).public_bytes(Encoding.DER)


# --- the platform ------------------------------------------------------------------------------


def _key(given: ec.EllipticCurvePrivateKey | None) -> ec.EllipticCurvePrivateKey:
    return given if given is not None else ec.generate_private_key(ec.SECP256R1())


def build_test_platform(
    spec: PlatformSpec | None = None, **overrides: object
) -> tuple[DcapPlatform, QuoteCollateral]:
    """Make a platform (keys, certs, signed QE report) and collateral that verifies its quotes.

    ``overrides`` replace fields of ``spec`` (or of the default spec), e.g.
    ``build_test_platform(tee="tdx", tcb_status="OutOfDate")``.
    """
    spec = replace(spec or PlatformSpec(), **overrides)  # type: ignore[arg-type]
    now = spec.at()
    nb = spec.cert_not_before or now - timedelta(days=365)
    na = spec.cert_not_after or now + timedelta(days=5 * 365)
    org = spec.organization
    root_key = _key(spec.root_key)
    prefix = spec.name_prefix
    root_name = _name(org, spec.root_common_name or f"{prefix} Root CA")
    root = _cert(
        subject=root_name,
        issuer=root_name,
        public_key=root_key.public_key(),
        signer=root_key,
        not_before=nb,
        not_after=na + timedelta(days=365),
        ca=True,
        path_length=1,
    )
    ca_key = _key(spec.pck_ca_key)
    ca_cn = f"{prefix} PCK Platform CA" if spec.ca == "platform" else f"{prefix} PCK Processor CA"
    pck_ca = _cert(
        subject=_name(org, ca_cn),
        issuer=root_name,
        public_key=ca_key.public_key(),
        signer=root_key,
        not_before=nb,
        not_after=na,
        ca=True,
        path_length=0,
    )
    if len(spec.tcb_components) != 16:
        raise ValueError("tcb_components needs 16 SVNs")
    ext = PckExtension(
        ppid=hashlib.sha256(_raw_point(ca_key.public_key())).digest()[:16],
        tcb_components=spec.tcb_components,
        pce_svn=spec.pce_svn,
        cpu_svn=bytes(spec.tcb_components),
        pce_id=spec.pce_id,
        fmspc=spec.fmspc,
        sgx_type=spec.sgx_type,
    )
    pck_key = _key(spec.pck_key)
    pck = _cert(
        subject=_name(org, f"{prefix} PCK Certificate"),
        issuer=pck_ca.subject,
        public_key=pck_key.public_key(),
        signer=ca_key,
        not_before=nb,
        not_after=na,
        ca=False,
        extra=[
            x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXTENSION_OID), encode_pck_extension(ext))
        ],
    )
    tcb_key = _key(spec.tcb_signing_key)
    tcb_cert = _cert(
        subject=_name(org, f"{prefix} TCB Signing"),
        issuer=root_name,
        public_key=tcb_key.public_key(),
        signer=root_key,
        not_before=nb,
        not_after=na,
        ca=False,
    )
    ak = _key(spec.attestation_key)
    auth = bytes(range(32))
    tdx = spec.tee == "tdx"
    qe_report = encode_enclave_report(
        cpu_svn=bytes(spec.tcb_components),
        attributes=QE_ATTRIBUTES,
        mr_enclave=hashlib.sha256(b"simulated quoting enclave").digest(),
        mr_signer=spec.qe_mrsigner or (INTEL_TD_QE_MRSIGNER if tdx else INTEL_QE_MRSIGNER),
        isv_prod_id=spec.qe_isvprodid if spec.qe_isvprodid is not None else (2 if tdx else 1),
        isv_svn=spec.qe_isvsvn,
        report_data=hashlib.sha256(_raw_point(ak.public_key()) + auth).digest() + bytes(32),
    )
    platform = DcapPlatform(
        spec=spec,
        root_key=root_key,
        root_cert=root,
        pck_ca_key=ca_key,
        pck_ca_cert=pck_ca,
        pck_key=pck_key,
        pck_cert=pck,
        tcb_signing_key=tcb_key,
        tcb_signing_cert=tcb_cert,
        attestation_key=ak,
        qe_report=qe_report,
        qe_report_signature=sign_p256_raw(pck_key, qe_report),
        qe_auth_data=auth,
    )
    return platform, build_collateral(platform)


def default_tcb_info(platform: DcapPlatform, *, issued: datetime, next_update: datetime) -> TcbInfo:
    """The TCB Info the spec describes (one level at the platform's SVNs unless given)."""
    spec = platform.spec
    tdx = spec.tee == "tdx"
    levels = spec.tcb_levels or (
        TcbLevel(
            sgx_components=spec.tcb_components,
            pce_svn=spec.pce_svn,
            tcb_status=spec.tcb_status,
            tcb_date="2024-03-13T00:00:00Z",
            advisory_ids=spec.advisory_ids,
            tdx_components=tuple(spec.tee_tcb_svn) if tdx else None,
        ),
    )
    module_version = spec.tee_tcb_svn[1]
    identities: tuple[TdxModuleIdentity, ...] = ()
    if tdx and module_version:
        identities = (
            TdxModuleIdentity(
                id=f"TDX_{module_version:02X}",
                mrsigner=spec.tdx_module_mrsigner,
                attributes=bytes(8),
                attributes_mask=b"\xff" * 8,
                tcb_levels=(
                    IsvSvnLevel(spec.tee_tcb_svn[0], spec.tdx_module_status, "2024-03-13T00:00:00Z"),
                    IsvSvnLevel(0, "OutOfDate", "2018-01-04T00:00:00Z", ("INTEL-SA-00000",)),
                )
                if spec.tee_tcb_svn[0] > 0
                else (IsvSvnLevel(0, spec.tdx_module_status, "2024-03-13T00:00:00Z"),),
            ),
        )
    return TcbInfo(
        id="TDX" if tdx else "SGX",
        version=3 if tdx else spec.tcb_info_version,
        issue_date=issued,
        next_update=next_update,
        fmspc=spec.fmspc,
        pce_id=spec.pce_id,
        tcb_type=0,
        tcb_evaluation_data_number=17,
        tcb_levels=levels,
        tdx_module=TdxModule(spec.tdx_module_mrsigner, bytes(8), b"\xff" * 8) if tdx else None,
        tdx_module_identities=identities,
    )


def default_qe_identity(
    platform: DcapPlatform, *, issued: datetime, next_update: datetime
) -> EnclaveIdentity:
    """The QE Identity the spec describes."""
    spec = platform.spec
    tdx = spec.tee == "tdx"
    levels = [IsvSvnLevel(spec.qe_isvsvn, spec.qe_tcb_status, "2024-03-13T00:00:00Z", spec.qe_advisory_ids)]
    if spec.qe_isvsvn > 0:
        levels.append(IsvSvnLevel(0, "OutOfDate", "2018-08-15T00:00:00Z", ("INTEL-SA-00000",)))
    return EnclaveIdentity(
        id="TD_QE" if tdx else "QE",
        version=2,
        issue_date=issued,
        next_update=next_update,
        tcb_evaluation_data_number=17,
        miscselect=0,
        miscselect_mask=0xFFFFFFFF,
        attributes=QE_ATTRIBUTES,
        attributes_mask=QE_ATTRIBUTES_MASK,
        mrsigner=spec.identity_mrsigner
        or spec.qe_mrsigner
        or (INTEL_TD_QE_MRSIGNER if tdx else INTEL_QE_MRSIGNER),
        isvprodid=spec.identity_isvprodid
        if spec.identity_isvprodid is not None
        else (spec.qe_isvprodid if spec.qe_isvprodid is not None else (2 if tdx else 1)),
        tcb_levels=tuple(levels),
    )


def build_collateral(
    platform: DcapPlatform,
    *,
    tcb_info: TcbInfo | None = None,
    qe_identity: EnclaveIdentity | None = None,
    issued: datetime | None = None,
    next_update: datetime | None = None,
    pck_crl: bytes | None = None,
    pck_crl_issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    root_ca_crl: bytes | None = None,
) -> QuoteCollateral:
    """Collateral for ``platform``: TCB Info and QE Identity signed by its TCB signing key, Root CA
    CRL and PCK CRL (revoking what the spec says). Any part can be replaced to make a bad bundle;
    ``pck_crl_issuer`` issues the PCK CRL (and its chain) from another CA."""
    spec = platform.spec
    now = spec.at()
    issued = issued or spec.collateral_issued or now - timedelta(days=1)
    next_update = next_update or spec.collateral_next_update or now + timedelta(days=30)
    info = tcb_info or default_tcb_info(platform, issued=issued, next_update=next_update)
    ident = qe_identity or default_qe_identity(platform, issued=issued, next_update=next_update)
    tcb_text = tcb_info_json(info)
    qe_text = enclave_identity_json(ident)
    crl_cert, crl_key = pck_crl_issuer or (platform.pck_ca_cert, platform.pck_ca_key)
    if pck_crl is None:
        revoked = (platform.pck_cert.serial_number,) if spec.revoke_pck else ()
        pck_crl = build_crl(
            crl_cert, crl_key, this_update=issued, next_update=next_update, revoked_serials=revoked
        )
    if root_ca_crl is None:
        revoked = (platform.pck_ca_cert.serial_number,) if spec.revoke_pck_ca else ()
        root_ca_crl = build_crl(
            platform.root_cert,
            platform.root_key,
            this_update=issued,
            next_update=next_update + timedelta(days=335),
            revoked_serials=revoked,
        )
    signing_chain = platform.pem(platform.tcb_signing_cert, platform.root_cert)
    return QuoteCollateral(
        pck_crl_issuer_chain=platform.pem(crl_cert, platform.root_cert),
        root_ca_crl=root_ca_crl,
        pck_crl=pck_crl,
        tcb_info_issuer_chain=signing_chain,
        tcb_info=tcb_text,
        tcb_info_signature=sign_p256_raw(platform.tcb_signing_key, tcb_text.encode()),
        qe_identity_issuer_chain=signing_chain,
        qe_identity=qe_text,
        qe_identity_signature=sign_p256_raw(platform.tcb_signing_key, qe_text.encode()),
    )


# --- quotes ------------------------------------------------------------------------------------


def _finish(platform: DcapPlatform, signed: bytes, version: int, padding: int) -> bytes:
    return assemble_quote(
        signed,
        version=version,
        signature=sign_p256_raw(platform.attestation_key, signed),
        attestation_key=_raw_point(platform.attestation_key.public_key()),
        qe_report=platform.qe_report,
        qe_report_signature=platform.qe_report_signature,
        qe_auth_data=platform.qe_auth_data,
        pck_chain_pem=platform.pck_chain_pem,
        padding=padding,
    )


def build_sgx_quote(
    platform: DcapPlatform,
    *,
    report_data: bytes = bytes(64),
    mr_enclave: bytes = bytes(32),
    mr_signer: bytes = bytes(32),
    attributes: bytes = bytes.fromhex("05000000000000000700000000000000"),
    isv_prod_id: int = 0,
    isv_svn: int = 0,
    version: int = 3,
    padding: int = 0,
) -> bytes:
    """An SGX quote (v3, v4 or v5 with body type 1) of an enclave on ``platform``.

    ``attributes`` default: INIT | MODE64BIT, not DEBUG (set bit 1 of byte 0 for a debug enclave).
    """
    if version not in (3, 4, 5):
        raise ValueError("SGX quotes are v3, v4 or v5")
    spec = platform.spec
    header = encode_header(
        version=version,
        tee_type=TEE_TYPE_SGX,
        qe_svn=spec.qe_isvsvn if version == 3 else 0,
        pce_svn=spec.pce_svn if version == 3 else 0,
        qe_vendor_id=INTEL_QE_VENDOR_ID,
    )
    body = encode_enclave_report(
        cpu_svn=bytes(spec.tcb_components),
        attributes=attributes,
        mr_enclave=mr_enclave,
        mr_signer=mr_signer,
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        report_data=report_data,
    )
    return _finish(platform, signed_region(header, body, version=version), version, padding)


def build_tdx_quote(
    platform: DcapPlatform,
    *,
    report_data: bytes = bytes(64),
    mr_td: bytes = bytes(48),
    rtmrs: tuple[bytes, bytes, bytes, bytes] = (bytes(48),) * 4,
    td_attributes: bytes = bytes.fromhex("0000001000000000"),
    mr_seam: bytes = bytes(48),
    mr_config_id: bytes = bytes(48),
    mr_owner: bytes = bytes(48),
    mr_owner_config: bytes = bytes(48),
    xfam: bytes = bytes.fromhex("e742060000000000"),
    version: int = 4,
    td15: bool | None = None,
    mr_servicetd: bytes = bytes(48),
    padding: int = 0,
) -> bytes:
    """A TDX quote of a TD on ``platform``: v4 (TD 1.0 body) or v5 (TD 1.0 or, default, TD 1.5).

    ``td_attributes`` default: SEPT_VE_DISABLE, not DEBUG (bit 0 of byte 0 makes a debug TD).
    """
    if version not in (4, 5):
        raise ValueError("TDX quotes are v4 or v5")
    spec = platform.spec
    with_15 = (version == 5) if td15 is None else td15
    if with_15 and version != 5:
        raise ValueError("a TD 1.5 body needs quote v5")
    body = encode_td_report(
        tee_tcb_svn=spec.tee_tcb_svn,
        mr_seam=mr_seam,
        mr_signer_seam=spec.tdx_module_mrsigner,
        td_attributes=td_attributes,
        xfam=xfam,
        mr_td=mr_td,
        mr_config_id=mr_config_id,
        mr_owner=mr_owner,
        mr_owner_config=mr_owner_config,
        rtmrs=rtmrs,
        report_data=report_data,
        tee_tcb_svn2=spec.tee_tcb_svn if with_15 else None,
        mr_servicetd=mr_servicetd if with_15 else None,
    )
    header = encode_header(version=version, tee_type=TEE_TYPE_TDX, qe_vendor_id=INTEL_QE_VENDOR_ID)
    body_type = BODY_TD15 if with_15 else BODY_TD10
    return _finish(
        platform, signed_region(header, body, version=version, body_type=body_type), version, padding
    )
