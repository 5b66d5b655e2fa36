"""Intel DCAP quote verification (SGX quote v3, SGX/TDX v4, TDX v5) following Intel's QVL.

Order of checks (the first failure decides the reason):

1. parse the quote (``malformed``);
2. certificate chains to the pinned root, pinned by public key: PCK chain from the quote, TCB Info,
   QE Identity and PCK CRL issuer chains from the collateral (``bad-chain``);
3. CRLs: the Root CA CRL issued by the root, the PCK CRL issued by the PCK's own issuer CA
   (wrong issuer: ``bad-chain``; bad signature: ``bad-signature``);
4. TCB Info and QE Identity signatures by the TCB signing cert (``bad-signature``);
5. the QE report: signature by the PCK key, report data = SHA-256(attestation key || QE auth
   data) || 32 zero bytes, and the QE identity (id, MRSIGNER, ISVPRODID, masked MISCSELECT and
   ATTRIBUTES) (``bad-qe-report``);
6. the quote signature by the attestation key over header || body (``bad-signature``);
7. every validity window against ``at``: TCB Info and QE Identity issueDate/nextUpdate, CRL
   thisUpdate/nextUpdate, certificate notBefore/notAfter (``not-yet-valid``,
   ``expired-collateral``, ``expired``);
8. revocation of the PCK, its CA and the signing certs (``revoked``);
9. FMSPC / PCE-ID / TEE type of the TCB Info (``collateral-mismatch``);
10. TCB level, QE TCB level and TDX module identity, converged like Intel's QVL and dcap-qvl
    (no level for the platform, the QE's ISVSVN or the TDX module: ``tcb-level-not-found``; a
    converged ``Revoked`` status: ``revoked``).

Debug enclaves are reported as a claim, never rejected here: policy does that. Collateral that
does not parse raises :class:`CollateralError` (unusable input), never a verdict.

Speed: a :class:`DcapVerifier` keeps a :class:`VerificationCache` of facts that can never change
because they are keyed by the exact bytes they were computed from (a verified chain, CRL, signed
collateral document, QE report, parsed attestation key). Time-dependent checks are never cached:
the cached entries carry their validity windows and step 7 runs on every call. The quote
signature is verified on every call.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from r3e_tee.attestation.result import EvidenceKind, VerificationResult
from r3e_tee.attestation.roots import TrustRoot, intel_sgx_root
from r3e_tee.errors import (
    CollateralError,
    EvidenceFormatError,
    InvalidRequestError,
    Reason,
    VerificationError,
)
from r3e_tee.evidence.dcap_collateral import (
    EnclaveIdentity,
    IsvSvnLevel,
    QuoteCollateral,
    TcbInfo,
    TcbLevel,
    parse_enclave_identity,
    parse_tcb_info,
)
from r3e_tee.evidence.sgx_quote import (
    INTEL_QE_VENDOR_ID,
    EnclaveReport,
    Quote,
    TdReport,
    parse_quote,
)
from r3e_tee.evidence.x509_ext import (
    SGX_EXTENSION_OID,
    PckExtension,
    der_header,
    parse_pck_extension,
    pem_chain_to_der,
)

__all__ = ["DcapVerifier", "VerificationCache", "converge_status", "quote_claims", "verify_dcap"]

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_SGX_EXT_OID = x509.ObjectIdentifier(SGX_EXTENSION_OID)
_T = TypeVar("_T")

CollateralInput = QuoteCollateral | Mapping[str, Any] | str | bytes
TrustRootInput = TrustRoot | x509.Certificate | bytes | str | Path


# --- status convergence ------------------------------------------------------------------------


def converge_status(platform: str, component: str) -> str:
    """Intel QVL's convergeTcbStatus: only an OutOfDate or Revoked QE / TDX module changes it."""
    if component == "Revoked":
        return "Revoked"
    if component == "OutOfDate":
        if platform in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if platform in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return platform


# --- cache -------------------------------------------------------------------------------------


_MISSING = object()


class VerificationCache:
    """Bounded in-process map of immutable facts keyed by the exact bytes they derive from.

    Only successes are stored. Entries never depend on the verification time; the windows they
    carry are re-checked on every verification. Safe to share between threads.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._data: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get_or_compute(self, key: Hashable, compute: Callable[[], _T]) -> _T:
        value = self._data.get(key, _MISSING)
        if value is not _MISSING:
            return value  # type: ignore[no-any-return]
        value = compute()
        with self._lock:
            if len(self._data) >= self._max:
                for old in list(self._data)[: max(1, self._max // 8)]:
                    self._data.pop(old, None)
            self._data[key] = value
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


# --- verified pieces ---------------------------------------------------------------------------

_OID_ECDSA_SHA256 = bytes.fromhex("2a8648ce3d040302")


def _decoded_name(get: Callable[[], x509.Name]) -> x509.Name | None:
    try:
        return get()
    except ValueError:
        return None


def _same_name(
    der: bytes, get: Callable[[], x509.Name], other_der: bytes, other_get: Callable[[], x509.Name]
) -> bool:
    """Equal DER, or equal decoded names (RFC 5280 lets an issuer re-encode a name). Decoding
    builds Python objects, which costs more than the signature check, so it happens only when
    the bytes differ; a name that does not decode matches nothing."""
    if der == other_der:
        return True
    name, other = _decoded_name(get), _decoded_name(other_get)
    return name is not None and other is not None and name == other


def _name_text(get: Callable[[], x509.Name]) -> str:
    name = _decoded_name(get)
    return name.rfc4514_string() if name is not None else "(a name that does not decode)"


@dataclass(frozen=True, slots=True)
class _Window:
    what: str
    not_before: datetime
    not_after: datetime
    is_cert: bool


@dataclass(frozen=True, slots=True)
class _Cert:
    """A parsed certificate plus the raw DER pieces signature checks need (sliced, not re-encoded)."""

    der: bytes
    cert: x509.Certificate
    tbs: bytes
    sig_alg: bytes
    signature: bytes
    issuer: bytes
    subject: bytes
    spki: bytes
    key: Any
    not_before: datetime
    not_after: datetime
    serial: int
    is_ca: bool
    # keyUsage (digitalSignature, keyCertSign, cRLSign); None when the extension is absent
    key_usage: tuple[bool, bool, bool] | None
    sgx_extension: bytes | None

    def label(self) -> str:
        return _name_text(lambda: self.cert.subject)


@dataclass(frozen=True, slots=True)
class _Chain:
    """A chain verified up to the pinned key: certs below the root, leaf first."""

    certs: tuple[_Cert, ...]
    windows: tuple[_Window, ...]

    @property
    def leaf(self) -> _Cert:
        return self.certs[0]


@dataclass(frozen=True, slots=True)
class _Crl:
    der: bytes
    crl: x509.CertificateRevocationList
    tbs: bytes
    sig_alg: bytes
    signature: bytes
    issuer: bytes
    window: _Window

    def revokes(self, serial: int) -> bool:
        try:
            return self.crl.get_revoked_certificate_by_serial_number(serial) is not None
        except ValueError as exc:
            raise CollateralError(f"{self.window.what} entries do not parse: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Context:
    """Everything fixed by (collateral bytes, PCK chain bytes, root): verified once, reused."""

    pck: _Chain
    pck_ext: PckExtension
    pck_ca_kind: str
    tcb_info: TcbInfo
    tcb_levels: tuple[TcbLevel, ...]  # Intel's order: highest first
    qe_identity: EnclaveIdentity
    qe_levels: tuple[IsvSvnLevel, ...]
    windows: tuple[_Window, ...]
    valid_until: datetime
    revoked: tuple[str, str, str] | None  # (what, crl name, serial hex) of the first revoked cert
    details: dict[str, Any]  # result details fixed by the context (copied into each result)


def _ecdsa_ok(key: Any, signature: bytes, data: bytes) -> bool:
    """Verify a raw r||s P-256 signature; any non-P-256 key or malformed signature is a failure."""
    if len(signature) != 64 or not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    if not isinstance(key.curve, ec.SECP256R1):
        return False
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, data, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


def _der_sig_ok(key: Any, der_sig: bytes, data: bytes) -> bool:
    """Verify an X.509-style (DER) ECDSA-SHA256 signature with any EC key; other keys fail."""
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    try:
        key.verify(der_sig, data, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


def _signed_parts(der: bytes, what: str) -> tuple[bytes, bytes, bytes, int, int]:
    """Slice an X.509 certificate or CRL: (to-be-signed TLV, signature algorithm OID content,
    DER signature, start and end of the TBS value), so signatures are checked over exact bytes."""
    n = len(der)
    tag, s, e = der_header(der, 0, n, what)
    if tag != 0x30 or e != n:
        raise EvidenceFormatError("not a single DER SEQUENCE", field=what, offset=0)
    t_tbs, ts, te = der_header(der, s, e, what)
    t_alg, as_, ae = der_header(der, te, e, what)
    t_oid, os_, oe = der_header(der, as_, ae, what)
    t_sig, bs, be = der_header(der, ae, e, what)
    if (
        t_tbs != 0x30
        or t_alg != 0x30
        or t_oid != 0x06
        or t_sig != 0x03
        or be != e
        or bs == be
        or der[bs] != 0
    ):
        raise EvidenceFormatError("not a signed X.509 structure", field=what, offset=0)
    return der[s:te], der[os_:oe], der[bs + 1 : be], ts, te


def _tbs_fields(
    der: bytes, start: int, end: int, count: int, *, version_tag: int, what: str
) -> list[tuple[int, int]]:
    """TLV spans (offset, end) of the first ``count`` TBS fields after the optional version
    (tag ``version_tag``: [0] EXPLICIT in certificates, INTEGER in CRLs)."""
    spans: list[tuple[int, int]] = []
    pos = start
    while len(spans) < count:
        tag, _s, e = der_header(der, pos, end, what)
        if pos != start or tag != version_tag:
            spans.append((pos, e))
        pos = e
    return spans


def _load_cert(der: bytes, what: str) -> _Cert:
    """Parse everything needed up front: cryptography parses lazily, and a malformed field must
    surface here as a format error, not later as a stray ValueError."""
    tbs, alg, sig, ts, te = _signed_parts(der, what)
    # serial, signature, issuer, validity, subject, subjectPublicKeyInfo
    f = _tbs_fields(der, ts, te, 6, version_tag=0xA0, what=what)
    tag, vs, ve = der_header(der, f[0][0], f[0][1], what)
    if tag != 0x02 or ve == vs or der[vs] & 0x80 or der[vs:ve].strip(b"\0") == b"":
        raise EvidenceFormatError(
            "certificate serial number is not a positive INTEGER", field=what, offset=f[0][0]
        )
    try:
        cert = x509.load_der_x509_certificate(der)
        exts = cert.extensions
        try:
            is_ca = bool(exts.get_extension_for_class(x509.BasicConstraints).value.ca)
        except x509.ExtensionNotFound:
            is_ca = False
        try:
            ku = exts.get_extension_for_class(x509.KeyUsage).value
            key_usage: tuple[bool, bool, bool] | None = (ku.digital_signature, ku.key_cert_sign, ku.crl_sign)
        except x509.ExtensionNotFound:
            key_usage = None
        try:
            ext = exts.get_extension_for_oid(_SGX_EXT_OID).value
            sgx = ext.value if isinstance(ext, x509.UnrecognizedExtension) else None
        except x509.ExtensionNotFound:
            sgx = None
        return _Cert(
            der=der,
            cert=cert,
            tbs=tbs,
            sig_alg=alg,
            signature=sig,
            issuer=der[f[2][0] : f[2][1]],
            subject=der[f[4][0] : f[4][1]],
            spki=der[f[5][0] : f[5][1]],
            key=cert.public_key(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            serial=cert.serial_number,
            is_ca=is_ca,
            key_usage=key_usage,
            sgx_extension=sgx,
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise EvidenceFormatError(f"certificate does not parse: {exc}", field=what, offset=None) from None


def _load_crl(der: bytes, what: str) -> _Crl:
    try:
        tbs, alg, sig, ts, te = _signed_parts(der, what)
        f = _tbs_fields(der, ts, te, 2, version_tag=0x02, what=what)  # signature, issuer
        crl = x509.load_der_x509_crl(der)
        this_update = crl.last_update_utc
        next_update = crl.next_update_utc
    except (ValueError, EvidenceFormatError) as exc:
        raise CollateralError(f"{what} does not parse: {exc}") from None
    if next_update is None:
        raise CollateralError(f"{what} has no nextUpdate")
    window = _Window(what, this_update, next_update, False)
    return _Crl(der, crl, tbs, alg, sig, der[f[1][0] : f[1][1]], window)


def _level_order(level: TcbLevel) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    return (level.sgx_components, level.pce_svn, level.tdx_components or ())


# --- the verifier ------------------------------------------------------------------------------


class DcapVerifier:
    """Verifies SGX and TDX DCAP quotes against one pinned root, caching immutable work.

    Keep one instance per trust root for the life of the process: repeated quotes from a known
    platform then cost little more than their own signature check.
    """

    def __init__(
        self,
        trust_root: TrustRootInput | None = None,
        *,
        cache: VerificationCache | None = None,
        simulated: bool = False,
    ) -> None:
        self.trust_root = TrustRoot.load(trust_root) if trust_root is not None else intel_sgx_root()
        self.cache = cache if cache is not None else VerificationCache()
        self.simulated = simulated
        self._anchor = _Cert(
            der=self.trust_root.der,
            cert=self.trust_root.certificate,
            tbs=b"",
            sig_alg=b"",
            signature=b"",
            issuer=b"",
            subject=self.trust_root.subject_der,
            spki=self.trust_root.spki,
            key=self.trust_root.public_key,
            not_before=self.trust_root.not_before,
            not_after=self.trust_root.not_after,
            serial=self.trust_root.certificate.serial_number,
            is_ca=True,
            key_usage=None,
            sgx_extension=None,
        )
        self._anchor_window = _Window(
            "trust root certificate", self.trust_root.not_before, self.trust_root.not_after, True
        )

    # -- public ---------------------------------------------------------------------------------

    def verify(
        self, quote: bytes | Quote, collateral: CollateralInput, *, at: datetime
    ) -> VerificationResult:
        """Verify ``quote`` with ``collateral`` at time ``at``; raise on any rejection."""
        at = _utc(at)
        if isinstance(quote, Quote):
            q, raw = quote, None
        else:
            raw = bytes(quote)
            q = parse_quote(raw)
        if q.header.qe_vendor_id != INTEL_QE_VENDOR_ID:
            raise EvidenceFormatError(
                f"QE vendor {q.header.qe_vendor_id.hex()} is not Intel's",
                field="header.qe_vendor_id",
                offset=12,
            )
        coll = _load_collateral(collateral)
        sd = q.signature_data
        pck_pem = q.pck_chain_pem
        if pck_pem is None:
            if not coll.pck_certificate_chain:
                raise CollateralError(
                    f"quote carries certification data type {sd.certification.cert_type}, not a PCK chain;"
                    " the collateral must supply pck_certificate_chain"
                )
            pck_pem = coll.pck_certificate_chain.encode()

        # 2-4: chains, CRLs, signed collateral (fixed by the bytes: verified once per bundle + PCK)
        ctx_key = ("ctx", coll.digest, pck_pem, self.trust_root.spki)
        ctx: _Context = self.cache.get_or_compute(ctx_key, lambda: self._context(coll, pck_pem))

        # 5. QE report
        qe = sd.qe_report
        pck_leaf = ctx.pck.leaf
        self.cache.get_or_compute(
            ("qe-report", qe.raw, sd.qe_report_signature, pck_leaf.der),
            lambda: _check_qe_signature(qe.raw, sd.qe_report_signature, pck_leaf.key),
        )
        expected_rd = hashlib.sha256(sd.attestation_key + sd.qe_auth_data).digest() + bytes(32)
        if qe.report_data != expected_rd:
            raise VerificationError(
                Reason.BAD_QE_REPORT,
                "QE report data does not bind the attestation key and QE authentication data",
                check="qe-report.report-data",
                observed=qe.report_data[:32].hex(),
                expected=expected_rd[:32].hex(),
            )
        qe_level = _qe_identity(qe, ctx.qe_identity, ctx.qe_levels, q.is_tdx)

        # 6. quote signature: every time, its bytes differ per quote
        ak = self.cache.get_or_compute(
            ("att-key", sd.attestation_key), lambda: _attestation_key(sd.attestation_key)
        )
        if not _ecdsa_ok(ak, sd.signature, q.signed_region):
            raise VerificationError(
                Reason.BAD_SIGNATURE,
                "quote signature by the attestation key does not verify",
                check="quote.signature",
            )

        # 7. every validity window against `at`: never cached
        _check_windows(ctx.windows, at)

        # 8. revocation (a fact of the bytes, reported after the time checks)
        if ctx.revoked is not None:
            what, crl_name, serial = ctx.revoked
            raise VerificationError(
                Reason.REVOKED,
                f"the {what} is on the {crl_name}",
                check="revocation",
                observed=f"serial {serial}",
            )

        # 9-10. TCB level, QE and TDX module status
        body = q.body
        tdx_key = (
            body.tee_tcb_svn + body.mr_signer_seam + body.seam_attributes
            if isinstance(body, TdReport)
            else b""
        )
        status, advisories, tcb_details = self.cache.get_or_compute(
            ("tcb", ctx_key, q.is_tdx, tdx_key, qe.isv_svn), lambda: _tcb_status(q, ctx, qe_level)
        )
        if status == "Revoked":
            raise VerificationError(
                Reason.REVOKED,
                "the platform TCB (converged with QE and TDX module status) is revoked",
                check="tcb-status",
                observed=status,
            )

        claims, details = _claims(body, ctx.pck_ext.fmspc)
        details.update(tcb_details)
        details.update(ctx.details)
        details["quote_version"] = q.header.version
        details["tee"] = "tdx" if q.is_tdx else "sgx"
        details["qe_isvsvn"] = qe.isv_svn
        return VerificationResult(
            kind=EvidenceKind.TDX_DCAP if q.is_tdx else EvidenceKind.SGX_DCAP,
            verified_at=at,
            claims=claims,
            tcb_status=status,
            advisories=advisories,
            debug=body.debug,
            simulated=self.simulated,
            valid_until=ctx.valid_until,
            evidence_sha256=hashlib.sha256(raw if raw is not None else q.signed_region).hexdigest(),
            details=details,
        )

    # -- steps 2-4 ------------------------------------------------------------------------------

    def _context(self, coll: QuoteCollateral, pck_pem: bytes) -> _Context:
        # 2. chains to the pinned key
        pck = self._chain(pck_pem, "PCK", 1, in_quote=True)
        tcb_chain = self._chain(coll.tcb_info_issuer_chain.encode(), "TCB Info signing", 0)
        qe_chain = self._chain(coll.qe_identity_issuer_chain.encode(), "QE Identity signing", 0)
        crl_chain = self._chain(coll.pck_crl_issuer_chain.encode(), "PCK CRL issuer", 0, crl_signer=True)
        pck_ca = pck.certs[1]

        # 3. CRLs: Root CA CRL by the root, PCK CRL by the PCK's own issuer
        root_crl = self._crl(coll.root_ca_crl, "Root CA CRL")
        self._crl_issued_by(root_crl, self._anchor, "root-ca-crl", "the pinned root")
        pck_crl = self._crl(coll.pck_crl, "PCK CRL")
        if not _same_name(
            pck_crl.issuer, lambda: pck_crl.crl.issuer, pck_ca.subject, lambda: pck_ca.cert.subject
        ):
            raise VerificationError(
                Reason.BAD_CHAIN,
                "the PCK CRL is not issued by the CA that issued the PCK certificate",
                check="pck-crl.issuer",
                observed=_name_text(lambda: pck_crl.crl.issuer),
                expected=pck_ca.label(),
            )
        if crl_chain.leaf.spki != pck_ca.spki:
            raise VerificationError(
                Reason.BAD_CHAIN,
                "the PCK CRL issuer chain does not name the PCK's issuer CA",
                check="pck-crl-issuer-chain",
                observed=crl_chain.leaf.label(),
                expected=pck_ca.label(),
            )
        self._crl_issued_by(pck_crl, pck_ca, "pck-crl", "the PCK CA")

        # 4. signed collateral
        tcb_info = self._signed_doc(
            "tcb-info", coll.tcb_info, coll.tcb_info_signature, tcb_chain, parse_tcb_info
        )
        qe_id = self._signed_doc(
            "qe-identity", coll.qe_identity, coll.qe_identity_signature, qe_chain, parse_enclave_identity
        )

        windows = (
            _Window("TCB Info", tcb_info.issue_date, tcb_info.next_update, False),
            _Window("QE Identity", qe_id.issue_date, qe_id.next_update, False),
            root_crl.window,
            pck_crl.window,
            *pck.windows,
            *tcb_chain.windows,
            *qe_chain.windows,
            *crl_chain.windows,
            self._anchor_window,
        )
        revoked = None
        seen: set[tuple[int, int]] = set()
        for cert, crl, what in (
            (pck.leaf, pck_crl, "PCK certificate"),
            (pck_ca, root_crl, "PCK CA certificate"),
            (tcb_chain.leaf, root_crl, "TCB Info signing certificate"),
            (qe_chain.leaf, root_crl, "QE Identity signing certificate"),
            (self._anchor, root_crl, "root certificate"),
        ):
            serial = cert.serial
            if (id(crl), serial) in seen:
                continue
            seen.add((id(crl), serial))
            if crl.revokes(serial):
                revoked = (what, "PCK CRL" if crl is pck_crl else "Root CA CRL", f"{serial:x}")
                break
        pck_ext = self.cache.get_or_compute(("pck-ext", pck.leaf.der), lambda: _pck_extension(pck.leaf))
        return _Context(
            pck=pck,
            pck_ext=pck_ext,
            pck_ca_kind=_ca_kind(pck_ca),
            tcb_info=tcb_info,
            tcb_levels=tuple(sorted(tcb_info.tcb_levels, key=_level_order, reverse=True)),
            qe_identity=qe_id,
            qe_levels=tuple(sorted(qe_id.tcb_levels, key=lambda lv: lv.isvsvn, reverse=True)),
            windows=windows,
            valid_until=min(w.not_after for w in windows),
            revoked=revoked,
            details={
                "pck_ca": _ca_kind(pck_ca),
                "pce_svn": pck_ext.pce_svn,
                "cpu_svn": pck_ext.cpu_svn.hex(),
                "pce_id": pck_ext.pce_id.hex().upper(),
                "sgx_type": pck_ext.sgx_type,
                "tcb_evaluation_data_number": tcb_info.tcb_evaluation_data_number,
            },
        )

    def _chain(
        self, pem: bytes, what: str, intermediates: int, *, in_quote: bool = False, crl_signer: bool = False
    ) -> _Chain:
        return self.cache.get_or_compute(
            ("chain", pem, self.trust_root.spki, intermediates, crl_signer),
            lambda: self._build_chain(pem, what, intermediates, in_quote, crl_signer),
        )

    def _build_chain(
        self, pem: bytes, what: str, intermediates: int, in_quote: bool, crl_signer: bool
    ) -> _Chain:
        fld = "signature_data.certification_data" if in_quote else f"collateral.{what}"
        try:
            certs = [self._cert(d, fld) for d in pem_chain_to_der(pem, field=fld)]
        except (ValueError, EvidenceFormatError) as exc:
            msg = exc.message if isinstance(exc, EvidenceFormatError) else str(exc)
            if in_quote:
                raise EvidenceFormatError(f"{what} chain: {msg}", field=fld, offset=None) from None
            raise CollateralError(f"{what} chain in the collateral does not parse: {msg}") from None
        # the chain may end with any issuance of the pinned root: pin by key, drop the copies
        while certs and certs[-1].spki == self._anchor.spki:
            certs.pop()
        if len(certs) != intermediates + 1:
            raise VerificationError(
                Reason.BAD_CHAIN,
                f"{what} chain does not lead to the pinned root",
                check=f"{what} chain",
                observed=f"{len(certs)} certificate(s) below the pinned key",
                expected=f"{intermediates + 1} ending at {self._anchor.label()}",
            )
        windows = []
        for i, cert in enumerate(certs):
            issuer = certs[i + 1] if i + 1 < len(certs) else self._anchor
            if i + 1 < len(certs) and not issuer.is_ca:
                raise VerificationError(
                    Reason.BAD_CHAIN,
                    f"{what} chain: issuer {issuer.label()} is not a CA certificate",
                    check=f"{what} chain",
                )
            if i + 1 < len(certs) and issuer.key_usage is not None and not issuer.key_usage[1]:
                raise VerificationError(
                    Reason.BAD_CHAIN,
                    f"{what} chain: issuer {issuer.label()} may not sign certificates (keyUsage)",
                    check=f"{what} chain",
                )
            if not self._issued_by(cert, issuer):
                raise VerificationError(
                    Reason.BAD_CHAIN,
                    f"{what} chain: {cert.label()} is not issued by {issuer.label()}",
                    check=f"{what} chain",
                )
            windows.append(
                _Window(
                    f"{what} certificate", cert.cert.not_valid_before_utc, cert.cert.not_valid_after_utc, True
                )
            )
        _check_signer_role(certs[0], what, crl_signer)
        leaf_key = certs[0].key
        if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or not isinstance(
            leaf_key.curve, ec.SECP256R1
        ):
            raise VerificationError(
                Reason.BAD_CHAIN, f"{what} certificate key is not P-256", check=f"{what} chain"
            )
        return _Chain(tuple(certs), tuple(windows))

    def _cert(self, der: bytes, fld: str) -> _Cert:
        if der == self._anchor.der:
            return self._anchor
        return self.cache.get_or_compute(("cert", der), lambda: _load_cert(der, fld))

    def _issued_by(self, cert: _Cert, issuer: _Cert) -> bool:
        """Name chaining and signature; the signature result is cached per (cert, issuer key)."""
        if not _same_name(cert.issuer, lambda: cert.cert.issuer, issuer.subject, lambda: issuer.cert.subject):
            return False

        def check() -> bool:
            if cert.sig_alg == _OID_ECDSA_SHA256:
                ok = _der_sig_ok(issuer.key, cert.signature, cert.tbs)
            else:
                try:
                    cert.cert.verify_directly_issued_by(issuer.cert)
                    ok = True
                except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                    ok = False
            if not ok:
                raise _NotIssuedError
            return True

        try:
            self.cache.get_or_compute(("cert-sig", cert.der, issuer.spki), check)
        except _NotIssuedError:
            return False
        return True

    def _crl(self, der: bytes, what: str) -> _Crl:
        return self.cache.get_or_compute(("crl", der), lambda: _load_crl(der, what))

    def _crl_issued_by(self, crl: _Crl, issuer: _Cert, check: str, issuer_name: str) -> None:
        if not _same_name(crl.issuer, lambda: crl.crl.issuer, issuer.subject, lambda: issuer.cert.subject):
            raise VerificationError(
                Reason.BAD_CHAIN,
                f"the {check} is not issued by {issuer_name}",
                check=f"{check}.issuer",
                observed=_name_text(lambda: crl.crl.issuer),
                expected=issuer.label(),
            )

        def verify() -> bool:
            if crl.sig_alg == _OID_ECDSA_SHA256:
                ok = _der_sig_ok(issuer.key, crl.signature, crl.tbs)
            else:
                try:
                    ok = crl.crl.is_signature_valid(issuer.key)
                except (TypeError, ValueError, UnsupportedAlgorithm):
                    ok = False
            if not ok:
                raise VerificationError(Reason.BAD_SIGNATURE, "CRL signature does not verify", check=check)
            return True

        self.cache.get_or_compute(("crl-sig", crl.der, issuer.spki), verify)

    def _signed_doc(
        self, check: str, text: str, signature: bytes, chain: _Chain, parse: Callable[[str], _T]
    ) -> _T:
        def compute() -> _T:
            if not _ecdsa_ok(chain.leaf.key, signature, text.encode()):
                raise VerificationError(
                    Reason.BAD_SIGNATURE, f"{check} signature does not verify", check=f"{check}.signature"
                )
            try:
                return parse(text)
            except EvidenceFormatError as exc:
                raise CollateralError(f"signed {check} does not parse: {exc.message}") from None

        return self.cache.get_or_compute((check, text, signature, chain.leaf.der), compute)


def _check_signer_role(leaf: _Cert, what: str, crl_signer: bool) -> None:
    """The end of each chain must be allowed to do what it is used for (RFC 5280 4.2.1.3 and
    4.2.1.9): a CRL issuer is a CA with cRLSign; a signer of data (PCK: QE reports, TCB signing:
    TCB Info and QE Identity) is an end entity with digitalSignature, never a CA key."""
    if crl_signer:
        if not leaf.is_ca or (leaf.key_usage is not None and not leaf.key_usage[2]):
            raise VerificationError(
                Reason.BAD_CHAIN,
                f"{what} certificate {leaf.label()} may not sign CRLs (needs a CA with cRLSign)",
                check=f"{what} chain",
            )
        return
    if leaf.is_ca:
        raise VerificationError(
            Reason.BAD_CHAIN,
            f"{what} certificate {leaf.label()} is a CA certificate, not an end-entity signer",
            check=f"{what} chain",
        )
    if leaf.key_usage is not None and not leaf.key_usage[0]:
        raise VerificationError(
            Reason.BAD_CHAIN,
            f"{what} certificate {leaf.label()} may not make digital signatures (keyUsage)",
            check=f"{what} chain",
        )


class _NotIssuedError(Exception):
    """Internal: a certificate signature did not verify (never cached, never escapes)."""


# --- helpers -----------------------------------------------------------------------------------


def _hex(b: bytes) -> str:
    return b.hex()


def _utc(at: datetime) -> datetime:
    if not isinstance(at, datetime) or at.tzinfo is None:
        raise InvalidRequestError("verification time must be a timezone-aware datetime")
    return at.astimezone(UTC)


def _load_collateral(collateral: CollateralInput) -> QuoteCollateral:
    if isinstance(collateral, QuoteCollateral):
        return collateral
    try:
        return QuoteCollateral.from_json(collateral)
    except EvidenceFormatError as exc:
        raise CollateralError(f"unusable DCAP collateral: {exc.message}") from None


def _check_qe_signature(qe_raw: bytes, sig: bytes, pck_key: Any) -> bool:
    if not _ecdsa_ok(pck_key, sig, qe_raw):
        raise VerificationError(
            Reason.BAD_QE_REPORT,
            "QE report signature by the PCK key does not verify",
            check="qe-report.signature",
        )
    return True


def _qe_identity(
    qe: EnclaveReport, ident: EnclaveIdentity, levels: tuple[IsvSvnLevel, ...], is_tdx: bool
) -> IsvSvnLevel:
    want_id = "TD_QE" if is_tdx else "QE"

    def reject(check: str, observed: str, expected: str) -> VerificationError:
        return VerificationError(
            Reason.BAD_QE_REPORT,
            "the QE report does not match the QE identity",
            check=f"qe-identity.{check}",
            observed=observed,
            expected=expected,
        )

    if ident.id != want_id:
        raise reject("id", ident.id, want_id)
    if qe.mr_signer != ident.mrsigner:
        raise reject("mrsigner", qe.mr_signer.hex(), ident.mrsigner.hex())
    if qe.isv_prod_id != ident.isvprodid:
        raise reject("isvprodid", str(qe.isv_prod_id), str(ident.isvprodid))
    mask = ident.miscselect_mask
    if qe.misc_select & mask != ident.miscselect & mask:
        raise reject("miscselect", f"{qe.misc_select & mask:08x}", f"{ident.miscselect & mask:08x}")
    amask = int.from_bytes(ident.attributes_mask, "big")
    got = int.from_bytes(qe.attributes, "big") & amask
    want = int.from_bytes(ident.attributes, "big") & amask
    if got != want:
        raise reject("attributes", f"{got:032x}", f"{want:032x}")
    for level in levels:
        if qe.isv_svn >= level.isvsvn:
            return level
    raise VerificationError(
        Reason.TCB_LEVEL_NOT_FOUND,
        "the QE's ISVSVN is below every QE identity TCB level",
        check="qe-identity.tcb-level",
        observed=str(qe.isv_svn),
        expected=f">= {min(lv.isvsvn for lv in levels)}",
    )


def _attestation_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        raise VerificationError(
            Reason.BAD_SIGNATURE, "attestation key is not a P-256 point", check="quote.attestation-key"
        ) from None


def _pck_extension(cert: _Cert | x509.Certificate) -> PckExtension:
    """The SGX extension of a PCK certificate (an ``x509.Certificate`` is accepted too; prefer
    :func:`quote_claims` outside this module)."""
    raw = (
        cert.sgx_extension
        if isinstance(cert, _Cert)
        else _load_cert(cert.public_bytes(Encoding.DER), "pck").sgx_extension
    )
    if raw is None:
        raise EvidenceFormatError(
            "PCK certificate lacks the SGX extension", field="pck_certificate", offset=None
        )
    return parse_pck_extension(raw)


def _ca_kind(ca: _Cert) -> str:
    """Intel names its PCK CAs "Intel SGX PCK Platform CA" / "... Processor CA"."""
    return (
        "platform"
        if b"Platform CA" in ca.subject
        else ("processor" if b"Processor CA" in ca.subject else "other")
    )


def _check_windows(windows: tuple[_Window, ...], at: datetime) -> None:
    for w in windows:
        if at < w.not_before:
            raise VerificationError(
                Reason.NOT_YET_VALID,
                f"{w.what} is not valid yet",
                check="validity",
                observed=at.isoformat(),
                expected=f">= {w.not_before.isoformat()}",
            )
        if at > w.not_after:
            raise VerificationError(
                Reason.EXPIRED if w.is_cert else Reason.EXPIRED_COLLATERAL,
                f"{w.what} has expired",
                check="validity",
                observed=at.isoformat(),
                expected=f"<= {w.not_after.isoformat()}",
            )


def _tcb_status(
    q: Quote, ctx: _Context, qe_level: IsvSvnLevel
) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """Match the platform TCB level and converge it with the TDX module and QE status (Intel QVL)."""
    tdx = q.is_tdx
    ext = ctx.pck_ext
    info = ctx.tcb_info
    want_id = "TDX" if tdx else "SGX"
    if info.id != want_id:
        raise VerificationError(
            Reason.COLLATERAL_MISMATCH,
            "TCB Info is for another TEE type",
            check="tcb-info.id",
            observed=info.id,
            expected=want_id,
        )
    if info.fmspc != ext.fmspc:
        raise VerificationError(
            Reason.COLLATERAL_MISMATCH,
            "TCB Info is for another platform",
            check="tcb-info.fmspc",
            observed=info.fmspc.hex().upper(),
            expected=ext.fmspc.hex().upper(),
        )
    if info.pce_id != ext.pce_id:
        raise VerificationError(
            Reason.COLLATERAL_MISMATCH,
            "TCB Info is for another PCE",
            check="tcb-info.pce-id",
            observed=info.pce_id.hex().upper(),
            expected=ext.pce_id.hex().upper(),
        )
    comps = ext.tcb_components
    tee_svn = q.body.tee_tcb_svn if isinstance(q.body, TdReport) else b""
    start = 2 if tdx and tee_svn[1] > 0 else 0
    matched: TcbLevel | None = None
    # Intel orders levels highest first (QVL keeps them in a sorted set); the first match wins
    for level in ctx.tcb_levels:
        if ext.pce_svn < level.pce_svn or any(
            c < m for c, m in zip(comps, level.sgx_components, strict=True)
        ):
            continue
        if tdx:
            need = level.tdx_components or ()
            if len(need) != 16 or any(tee_svn[i] < need[i] for i in range(start, 16)):
                continue
        matched = level
        break
    if matched is None:
        raise VerificationError(
            Reason.TCB_LEVEL_NOT_FOUND,
            "no TCB level of the TCB Info matches the platform",
            check="tcb-level",
            observed=f"cpusvn {bytes(comps).hex()} pcesvn {ext.pce_svn}"
            + (f" tee_tcb_svn {tee_svn.hex()}" if tdx else ""),
            expected="a level whose every SVN is at or below the platform's",
        )
    status = matched.tcb_status
    advisories = list(matched.advisory_ids)
    details: dict[str, Any] = {"platform_tcb_status": status, "tcb_date": matched.tcb_date}
    if tdx and isinstance(q.body, TdReport):
        module = _tdx_module_level(q.body, info)
        if module is not None:
            details["tdx_module_tcb_status"] = module.tcb_status
            status = converge_status(status, module.tcb_status)
            advisories += [a for a in module.advisory_ids if a not in advisories]
    details["qe_tcb_status"] = qe_level.tcb_status
    status = converge_status(status, qe_level.tcb_status)
    advisories += [a for a in qe_level.advisory_ids if a not in advisories]
    return status, tuple(advisories), details


def _tdx_module_level(td: TdReport, info: TcbInfo) -> IsvSvnLevel | None:
    """Intel TdxModuleCheck: TEE_TCB_SVN[1] selects identity TDX_<nn>; [0] is its ISVSVN."""
    isvsvn, version = td.tee_tcb_svn[0], td.tee_tcb_svn[1]

    def mismatch(check: str, observed: str, expected: str) -> VerificationError:
        return VerificationError(
            Reason.TCB_LEVEL_NOT_FOUND,
            "the TDX module is not one the TCB Info describes",
            check=f"tdx-module.{check}",
            observed=observed,
            expected=expected,
        )

    def check_identity(mrsigner: bytes, attributes: bytes, mask: bytes) -> None:
        if td.mr_signer_seam != mrsigner:
            raise mismatch("mrsigner", td.mr_signer_seam.hex(), mrsigner.hex())
        got = bytes(a & m for a, m in zip(td.seam_attributes, mask, strict=True))
        want = bytes(a & m for a, m in zip(attributes, mask, strict=True))
        if got != want:
            raise mismatch("attributes", got.hex(), want.hex())

    if version == 0:
        if info.tdx_module is not None:
            m = info.tdx_module
            check_identity(m.mrsigner, m.attributes, m.attributes_mask)
        return None
    want = f"TDX_{version:02X}"
    ident = next((i for i in info.tdx_module_identities if i.id.upper() == want), None)
    if ident is None:
        if not info.tdx_module_identities and info.tdx_module is not None:
            m = info.tdx_module
            check_identity(m.mrsigner, m.attributes, m.attributes_mask)
            return None
        raise mismatch("identity", want, ", ".join(i.id for i in info.tdx_module_identities) or "none")
    check_identity(ident.mrsigner, ident.attributes, ident.attributes_mask)
    for level in sorted(ident.tcb_levels, key=lambda lv: lv.isvsvn, reverse=True):
        if isvsvn >= level.isvsvn:
            return level
    raise mismatch("tcb-level", str(isvsvn), f">= {min(lv.isvsvn for lv in ident.tcb_levels)}")


def _claims(body: EnclaveReport | TdReport, fmspc: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    if isinstance(body, EnclaveReport):
        claims: dict[str, Any] = {
            "mrenclave": _hex(body.mr_enclave),
            "mrsigner": _hex(body.mr_signer),
            "isv_prod_id": body.isv_prod_id,
            "isv_svn": body.isv_svn,
            "debug": body.debug,
            "report_data": _hex(body.report_data),
            "attributes": _hex(body.attributes),
            "fmspc": fmspc.hex().upper(),
        }
        details: dict[str, Any] = {
            "cpu_svn_report": _hex(body.cpu_svn),
            "misc_select": f"{body.misc_select:08x}",
            "config_id": _hex(body.config_id),
            "config_svn": body.config_svn,
            "isv_family_id": _hex(body.isv_family_id),
        }
        return claims, details
    claims = {
        "mr_td": _hex(body.mr_td),
        "rtmr0": _hex(body.rtmrs[0]),
        "rtmr1": _hex(body.rtmrs[1]),
        "rtmr2": _hex(body.rtmrs[2]),
        "rtmr3": _hex(body.rtmrs[3]),
        "report_data": _hex(body.report_data),
        "td_attributes": _hex(body.td_attributes),
        "debug": body.debug,
        "mr_seam": _hex(body.mr_seam),
        "tee_tcb_svn": _hex(body.tee_tcb_svn),
    }
    if body.mr_servicetd is not None:
        claims["mr_servicetd"] = _hex(body.mr_servicetd)
    claims["fmspc"] = fmspc.hex().upper()
    details = {
        "mr_signer_seam": _hex(body.mr_signer_seam),
        "seam_attributes": _hex(body.seam_attributes),
        "xfam": _hex(body.xfam),
        "mr_config_id": _hex(body.mr_config_id),
        "mr_owner": _hex(body.mr_owner),
        "mr_owner_config": _hex(body.mr_owner_config),
    }
    if body.tee_tcb_svn2 is not None:
        details["tee_tcb_svn2"] = _hex(body.tee_tcb_svn2)
    return claims, details


def quote_claims(quote: bytes | Quote) -> dict[str, Any]:
    """The claims a quote *states* (same keys as a verified result), WITHOUT verifying anything.

    For error reports and diagnostics only: never base a trust decision on these.
    """
    q = quote if isinstance(quote, Quote) else parse_quote(quote)
    pem = q.pck_chain_pem
    fmspc = b""
    if pem is not None:
        try:
            fmspc = _pck_extension(_load_cert(pem_chain_to_der(pem)[0], "pck_certificate")).fmspc
        except EvidenceFormatError:
            fmspc = b""
    claims, _ = _claims(q.body, fmspc)
    if not fmspc:
        claims.pop("fmspc", None)
    return claims


def verify_dcap(
    quote: bytes | Quote,
    collateral: CollateralInput,
    *,
    at: datetime,
    trust_root: TrustRootInput | None = None,
    cache: VerificationCache | None = None,
) -> VerificationResult:
    """Verify one SGX or TDX DCAP quote at time ``at`` against the pinned Intel root (or
    ``trust_root``). ``cache`` shares verified work between calls; without it nothing is reused.

    Raises :class:`EvidenceFormatError` (malformed quote), :class:`VerificationError` (rejected,
    with the reason class) or :class:`CollateralError` (unusable collateral).
    """
    return DcapVerifier(trust_root, cache=cache).verify(quote, collateral, at=at)
