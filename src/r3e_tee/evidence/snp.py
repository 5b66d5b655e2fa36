"""AMD SEV-SNP attestation reports (``ATTESTATION_REPORT``, 1184 bytes): parser and builders.

Layout per the AMD SEV-SNP ABI specification (report versions 2, 3 and 5). The signature is
ECDSA P-384 with SHA-384 over bytes ``0x000..0x29F``; R and S are stored little-endian in
72-byte fields at ``0x2A0`` and ``0x2E8``. TCB_VERSION layout depends on the product: Milan and
Genoa ``bl, tee, -, -, -, -, snp, ucode``; Turin (CPUID family 0x1A, report v3+)
``fmc, bl, tee, snp, -, -, -, ucode``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from r3e_tee.errors import EvidenceFormatError
from r3e_tee.evidence.encoding import issue_certificate

__all__ = [
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "SnpPki",
    "SnpReport",
    "TcbVersion",
    "build_snp_pki",
    "build_snp_report",
    "parse_snp_report",
]

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SIG_R, SIG_S, SIG_FIELD = 0x2A0, 0x2E8, 72
POLICY_DEBUG = 1 << 19
POLICY_RESERVED_ONE = 1 << 17
SIGNING_KEYS = {0: "VCEK", 1: "VLEK", 7: "NONE"}
TURIN_FAMILY = 0x1A
# VCEK/VLEK certificate extensions (AMD "VCEK certificate and KDS interface" spec)
OID_PRODUCT_NAME = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.2")
OID_BL_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.1")
OID_TEE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.2")
OID_SNP_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.3")
OID_UCODE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.8")
OID_FMC_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.9")
OID_HWID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")


@dataclass(frozen=True)
class TcbVersion:
    """A TCB_VERSION (u64) split into its security patch levels."""

    raw: int
    bl: int
    tee: int
    snp: int
    ucode: int
    fmc: int | None = None  # Turin only

    @classmethod
    def from_raw(cls, raw: int, *, turin: bool = False) -> TcbVersion:
        b = raw.to_bytes(8, "little")
        if turin:
            return cls(raw=raw, fmc=b[0], bl=b[1], tee=b[2], snp=b[3], ucode=b[7])
        return cls(raw=raw, bl=b[0], tee=b[1], snp=b[6], ucode=b[7])

    @classmethod
    def build(cls, *, bl: int, tee: int, snp: int, ucode: int, fmc: int | None = None) -> TcbVersion:
        if fmc is not None:
            raw = bytes([fmc, bl, tee, snp, 0, 0, 0, ucode])
        else:
            raw = bytes([bl, tee, 0, 0, 0, 0, snp, ucode])
        return cls.from_raw(int.from_bytes(raw, "little"), turin=fmc is not None)

    def claims(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        out.update({"bl": self.bl, "tee": self.tee, "snp": self.snp, "ucode": self.ucode})
        out["raw"] = f"0x{self.raw:016x}"
        return out


@dataclass(frozen=True)
class SnpReport:
    """A syntactically valid SEV-SNP attestation report (nothing is verified yet)."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: str  # VCEK, VLEK or NONE
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_version: tuple[int, int, int]  # major, minor, build
    committed_version: tuple[int, int, int]
    launch_tcb: TcbVersion
    signature_r: int
    signature_s: int
    raw: bytes = field(repr=False)

    @property
    def debug(self) -> bool:
        """POLICY.DEBUG (bit 19): the hypervisor may read and write guest memory."""
        return bool(self.policy & POLICY_DEBUG)

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def product(self) -> str | None:
        """Product line from CPUID (report v3+), else ``None`` (decide from the VCEK)."""
        if self.cpuid_fam_id is None:
            return None
        if self.cpuid_fam_id == TURIN_FAMILY:
            return "turin"
        if self.cpuid_fam_id == 0x19:
            return "genoa" if (self.cpuid_mod_id or 0) >= 0x10 else "milan"
        return None

    def claims(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "measurement": self.measurement.hex(),
            "report_data": self.report_data.hex(),
            "policy": f"0x{self.policy:x}",
            "debug": self.debug,
            "vmpl": self.vmpl,
            "host_data": self.host_data.hex(),
            "signing_key": self.signing_key,
            "reported_tcb": self.reported_tcb.claims(),
            "chip_id": self.chip_id.hex(),
        }


def _fail(message: str, name: str, offset: int) -> EvidenceFormatError:
    return EvidenceFormatError(message, field=f"snp.{name}", offset=offset)


def parse_snp_report(data: bytes) -> SnpReport:
    """Parse a 1184-byte report; structural rules of the ABI are enforced, nothing verified."""
    raw = bytes(data)
    if len(raw) != REPORT_SIZE:
        raise _fail(
            f"report must be {REPORT_SIZE} bytes, got {len(raw)}", "report", min(len(raw), REPORT_SIZE)
        )
    (version,) = struct.unpack_from("<I", raw, 0x00)
    if not 2 <= version <= 5:
        raise _fail(f"unsupported report version {version} (2..5)", "version", 0x00)
    guest_svn, policy = struct.unpack_from("<IQ", raw, 0x04)
    if not policy & POLICY_RESERVED_ONE:
        raise _fail(f"policy 0x{policy:x} has reserved bit 17 clear (must be one)", "policy", 0x08)
    vmpl, sig_algo, current_tcb, platform_info, key_bits = struct.unpack_from("<IIQQI", raw, 0x30)
    if vmpl > 3:
        raise _fail(f"vmpl {vmpl} is not 0..3", "vmpl", 0x30)
    if sig_algo != 1:
        raise _fail(
            f"signature algorithm {sig_algo} is not 1 (ECDSA P-384 with SHA-384)", "signature_algo", 0x34
        )
    key_sel = (key_bits >> 2) & 0x7
    if key_sel not in SIGNING_KEYS:
        raise _fail(f"reserved signing key selector {key_sel}", "signing_key", 0x48)
    if version >= 3:
        fam, mod, step = raw[0x188], raw[0x189], raw[0x18A]
        cpuid: tuple[int | None, int | None, int | None] = (fam, mod, step)
    else:
        cpuid = (None, None, None)
    turin = cpuid[0] == TURIN_FAMILY
    (reported_tcb,) = struct.unpack_from("<Q", raw, 0x180)
    (committed_tcb,) = struct.unpack_from("<Q", raw, 0x1E0)
    (launch_tcb,) = struct.unpack_from("<Q", raw, 0x1F0)
    r = raw[SIG_R : SIG_R + SIG_FIELD]
    s = raw[SIG_S : SIG_S + SIG_FIELD]
    # the unsigned tail: P-384 R and S use 48 of their 72 bytes, the rest of the 512-byte
    # signature field is reserved; non-zero bytes there mean the report was altered
    for name, start, end in (("signature.r", SIG_R + 48, SIG_R + SIG_FIELD),
                             ("signature.s", SIG_S + 48, SIG_S + SIG_FIELD),
                             ("signature.reserved", SIG_S + SIG_FIELD, REPORT_SIZE)):  # fmt: skip
        if any(raw[start:end]):
            nz = start + next(i for i, b in enumerate(raw[start:end]) if b)
            raise _fail("reserved bytes of the signature field must be zero", name, nz)
    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=raw[0x10:0x20],
        image_id=raw[0x20:0x30],
        vmpl=vmpl,
        signature_algo=sig_algo,
        current_tcb=TcbVersion.from_raw(current_tcb, turin=turin),
        platform_info=platform_info,
        author_key_en=bool(key_bits & 1),
        mask_chip_key=bool(key_bits & 2),
        signing_key=SIGNING_KEYS[key_sel],
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        report_id_ma=raw[0x160:0x180],
        reported_tcb=TcbVersion.from_raw(reported_tcb, turin=turin),
        cpuid_fam_id=cpuid[0],
        cpuid_mod_id=cpuid[1],
        cpuid_step=cpuid[2],
        chip_id=raw[0x1A0:0x1E0],
        committed_tcb=TcbVersion.from_raw(committed_tcb, turin=turin),
        current_version=(raw[0x1EA], raw[0x1E9], raw[0x1E8]),
        committed_version=(raw[0x1EE], raw[0x1ED], raw[0x1EC]),
        launch_tcb=TcbVersion.from_raw(launch_tcb, turin=turin),
        signature_r=int.from_bytes(r, "little"),
        signature_s=int.from_bytes(s, "little"),
        raw=raw,
    )


# --- builders -----------------------------------------------------------------------------------


def build_snp_report(
    *,
    signing_key: ec.EllipticCurvePrivateKey,
    measurement: bytes = b"\x5a" * 48,
    report_data: bytes = b"\x00" * 64,
    host_data: bytes = b"\x00" * 32,
    policy: int = 0x30000,
    vmpl: int = 0,
    version: int = 3,
    reported_tcb: TcbVersion | None = None,
    chip_id: bytes = b"\xc1" * 64,
    key_kind: str = "VCEK",
    guest_svn: int = 0,
    family_id: bytes = b"\x00" * 16,
    image_id: bytes = b"\x00" * 16,
    cpuid: tuple[int, int, int] = (0x19, 0x01, 0x01),
) -> bytes:
    """A signed report. Default CPUID is a Milan part; pass family 0x1A for Turin TCB layout."""
    if len(measurement) != 48 or len(report_data) != 64 or len(host_data) != 32 or len(chip_id) != 64:
        raise ValueError("measurement 48, report_data 64, host_data 32 and chip_id 64 bytes")
    tcb = reported_tcb or TcbVersion.build(bl=3, tee=0, snp=8, ucode=115)
    buf = bytearray(REPORT_SIZE)
    struct.pack_into("<IIQ", buf, 0x00, version, guest_svn, policy)
    buf[0x10:0x20] = family_id
    buf[0x20:0x30] = image_id
    key_sel = {v: k for k, v in SIGNING_KEYS.items()}[key_kind]
    struct.pack_into("<IIQQI", buf, 0x30, vmpl, 1, tcb.raw, 0x3, key_sel << 2)
    buf[0x50:0x90] = report_data
    buf[0x90:0xC0] = measurement
    buf[0xC0:0xE0] = host_data
    struct.pack_into("<Q", buf, 0x180, tcb.raw)
    if version >= 3:
        buf[0x188], buf[0x189], buf[0x18A] = cpuid
    buf[0x1A0:0x1E0] = chip_id
    struct.pack_into("<Q", buf, 0x1E0, tcb.raw)
    buf[0x1E8:0x1EB] = bytes([21, 55, 1])  # build, minor, major
    buf[0x1EC:0x1EF] = bytes([21, 55, 1])
    struct.pack_into("<Q", buf, 0x1F0, tcb.raw)
    der = signing_key.sign(bytes(buf[:SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    buf[SIG_R : SIG_R + SIG_FIELD] = r.to_bytes(SIG_FIELD, "little")
    buf[SIG_S : SIG_S + SIG_FIELD] = s.to_bytes(SIG_FIELD, "little")
    return bytes(buf)


@dataclass(frozen=True)
class SnpPki:
    """A test AMD hierarchy: ARK (root) -> ASK -> VCEK, RSA-PSS above the P-384 VCEK."""

    ark: x509.Certificate
    ark_key: rsa.RSAPrivateKey = field(repr=False)
    ask: x509.Certificate
    ask_key: rsa.RSAPrivateKey = field(repr=False)
    vcek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey = field(repr=False)


def _amd_name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "R3E Test Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def build_snp_pki(
    *,
    not_before: datetime,
    not_after: datetime,
    chip_id: bytes = b"\xc1" * 64,
    tcb: TcbVersion | None = None,
    product: str = "Milan",
    key_kind: str = "VCEK",
    rsa_bits: int = 2048,
) -> SnpPki:
    """ARK/ASK (RSA, RSA-PSS SHA-384 like AMD's; 2048-bit by default to keep tests fast) and a
    VCEK/VLEK carrying the AMD TCB and hwID extensions."""
    tcb = tcb or TcbVersion.build(bl=3, tee=0, snp=8, ucode=115)
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    ark = issue_certificate(
        _amd_name(f"ARK-{product}"),
        ark_key.public_key(),
        issuer=None,
        issuer_key=ark_key,
        not_before=not_before,
        not_after=not_after,
        ca=True,
        rsa_pss=True,
    )
    ask_cn = f"SEV-{product}" if key_kind == "VCEK" else f"SEV-VLEK-{product}"
    ask = issue_certificate(
        _amd_name(ask_cn),
        ask_key.public_key(),
        issuer=ark,
        issuer_key=ark_key,
        not_before=not_before,
        not_after=not_after,
        ca=True,
        path_length=0,
        rsa_pss=True,
    )
    exts: list[tuple[x509.ExtensionType, bool]] = [
        (
            x509.UnrecognizedExtension(OID_PRODUCT_NAME, b"\x16" + bytes([len(product)]) + product.encode()),
            False,
        ),
        (x509.UnrecognizedExtension(OID_BL_SPL, _der_int(tcb.bl)), False),
        (x509.UnrecognizedExtension(OID_TEE_SPL, _der_int(tcb.tee)), False),
        (x509.UnrecognizedExtension(OID_SNP_SPL, _der_int(tcb.snp)), False),
        (x509.UnrecognizedExtension(OID_UCODE_SPL, _der_int(tcb.ucode)), False),
    ]
    if tcb.fmc is not None:
        exts.append((x509.UnrecognizedExtension(OID_FMC_SPL, _der_int(tcb.fmc)), False))
    if key_kind == "VCEK":
        exts.append((x509.UnrecognizedExtension(OID_HWID, chip_id), False))
    vcek = issue_certificate(
        _amd_name(f"SEV-{key_kind}"),
        vcek_key.public_key(),
        issuer=ask,
        issuer_key=ask_key,
        not_before=not_before,
        not_after=not_after,
        ca=False,
        extensions=exts,
        rsa_pss=True,
    )
    return SnpPki(ark=ark, ark_key=ark_key, ask=ask, ask_key=ask_key, vcek=vcek, vcek_key=vcek_key)
