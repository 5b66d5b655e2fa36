"""Verification of AMD SEV-SNP attestation reports.

Order of checks: parse -> ECDSA P-384 report signature by the VCEK/VLEK -> VCEK/VLEK <- ASK/ASVK
<- ARK with RSA-PSS, the ARK pinned by public key (the case's or caller's trust root, else
the embedded AMD ARK of the product) -> every certificate valid at the verification time ->
the VCEK belongs to this report (hwID == CHIP_ID unless masked, TCB extensions ==
REPORTED_TCB). Reference values (measurement, host_data, debug policy) belong to the policy.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from r3e_tee.attestation.pinned_roots_nitro_ias import (
    AMD_ARKS,
    AMD_ASK_PEM,
    AnchorLike,
    LruCache,
    TrustAnchor,
    ValidatedChain,
    as_utc,
    load_certificate,
    load_certificates,
    spki_der,
    validate_chain,
)
from r3e_tee.attestation.result import EvidenceKind, VerificationResult
from r3e_tee.errors import CollateralError, EvidenceFormatError, Reason, VerificationError
from r3e_tee.evidence.snp import (
    OID_BL_SPL,
    OID_FMC_SPL,
    OID_HWID,
    OID_SNP_SPL,
    OID_TEE_SPL,
    OID_UCODE_SPL,
    SnpReport,
    parse_snp_report,
)

__all__ = ["SnpCollateral", "SnpVerifier", "verify_snp"]

_ES384 = ec.ECDSA(hashes.SHA384())


@dataclass(frozen=True)
class SnpCollateral:
    """The certificates an SNP report is checked with: VCEK or VLEK, ASK or ASVK, ARK (DER).

    ``ask`` and ``ark`` may be omitted: the embedded AMD certificates of the product are used.
    """

    vcek: bytes
    ask: bytes | None = None
    ark: bytes | None = None

    @classmethod
    def load(
        cls, value: SnpCollateral | Mapping[str, object] | bytes | str | os.PathLike[str]
    ) -> SnpCollateral:
        """From a mapping ``{"vcek"|"vlek", "ask"|"asvk", "ark"}`` of bytes or paths, a JSON file of
        such a mapping (paths relative to it), or a PEM/DER bundle (roles told apart by
        structure: the EC key is the VCEK/VLEK, the self-signed cert the ARK)."""
        if isinstance(value, SnpCollateral):
            return value
        if isinstance(value, Mapping):
            return cls._from_mapping(value, Path.cwd())
        base = Path.cwd()
        if isinstance(value, bytes):
            raw = value
        elif isinstance(value, str) and value.lstrip().startswith(("-----", "{")):
            raw = value.encode()
        else:
            path = Path(value)
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise CollateralError(f"cannot read SNP collateral {path}: {exc.strerror}") from None
            base = path.parent
        if raw.lstrip().startswith(b"{"):
            try:
                doc = json.loads(raw)
            except ValueError as exc:
                raise CollateralError(f"SNP collateral JSON does not parse: {exc}") from None
            if not isinstance(doc, dict):
                raise CollateralError("SNP collateral JSON must be an object")
            return cls._from_mapping(doc, base)
        certs = load_certificates(raw, field="snp.collateral")
        vcek = [c for c in certs if isinstance(c.public_key(), ec.EllipticCurvePublicKey)]
        arks = [c for c in certs if c.issuer == c.subject and c not in vcek]
        asks = [c for c in certs if c not in vcek and c not in arks]
        if len(vcek) != 1 or len(asks) > 1 or len(arks) > 1:
            raise CollateralError(
                "SNP certificate bundle must hold one VCEK/VLEK and at most one ASK and one ARK"
            )

        def der(cs: list[x509.Certificate]) -> bytes | None:
            return cs[0].public_bytes(Encoding.DER) if cs else None

        vcek_der = der(vcek)
        assert vcek_der is not None
        return cls(vcek=vcek_der, ask=der(asks), ark=der(arks))

    @classmethod
    def _from_mapping(cls, doc: Mapping[str, object], base: Path) -> SnpCollateral:
        unknown = set(doc) - {"vcek", "vlek", "ask", "asvk", "ark"}
        if unknown:
            raise CollateralError(f"unknown SNP collateral keys: {', '.join(sorted(unknown))}")

        def get(*names: str) -> bytes | None:
            for name in names:
                v = doc.get(name)
                if v is None:
                    continue
                if isinstance(v, bytes):
                    raw = v
                elif isinstance(v, (str, os.PathLike)):
                    p = Path(v) if Path(v).is_absolute() else base / v
                    try:
                        raw = p.read_bytes()
                    except OSError as exc:
                        raise CollateralError(
                            f"cannot read SNP collateral {name} {p}: {exc.strerror}"
                        ) from None
                else:
                    raise CollateralError(f"SNP collateral {name} must be bytes or a path")
                return load_certificate(raw, field=f"snp.collateral.{name}").public_bytes(Encoding.DER)
            return None

        vcek = get("vcek", "vlek")
        if vcek is None:
            raise CollateralError("SNP collateral needs a 'vcek' (or 'vlek') certificate")
        return cls(vcek=vcek, ask=get("ask", "asvk"), ark=get("ark"))


_ChainKey = tuple[bytes, bytes, bytes | None, bytes | None]


class SnpVerifier:
    """Verifies SNP reports; caches parsed reports and verified VCEK chains by exact bytes."""

    def __init__(self, trust_root: AnchorLike | None = None, *, cache_size: int = 256) -> None:
        self.anchor = TrustAnchor.load(trust_root) if trust_root is not None else None
        self._reports: LruCache[bytes, SnpReport] = LruCache(cache_size)
        self._chains: LruCache[_ChainKey, ValidatedChain] = LruCache(cache_size)
        self._certs: LruCache[bytes, x509.Certificate] = LruCache(cache_size)

    def parse(self, data: bytes) -> SnpReport:
        data = bytes(data)
        return self._reports.get_or_set(data, lambda: parse_snp_report(data))

    def verify(
        self,
        report: bytes | SnpReport,
        collateral: SnpCollateral | Mapping[str, object] | bytes | str | os.PathLike[str] | None,
        *,
        at: datetime | None = None,
        trust_root: AnchorLike | None = None,
    ) -> VerificationResult:
        when = as_utc(at)
        rep = report if isinstance(report, SnpReport) else self.parse(report)
        if collateral is None:
            raise CollateralError(
                "SEV-SNP verification needs the VCEK (or VLEK) certificate",
                hint="pass --collateral with the VCEK (AMD KDS /vcek/v1/<product>/<chip_id>) or a bundle",
            )
        coll = SnpCollateral.load(collateral)
        if rep.signing_key == "NONE":
            raise VerificationError(
                Reason.BAD_SIGNATURE,
                "report is not signed (SIGNING_KEY = none)",
                check="snp.report-signature",
            )
        vcek = self._certs.get_or_set(
            coll.vcek, lambda: load_certificate(coll.vcek, field="snp.collateral.vcek")
        )
        cn = " ".join(str(a.value) for a in vcek.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME))
        if rep.signing_key not in cn:
            raise VerificationError(
                Reason.COLLATERAL_MISMATCH,
                "the report names a different signing key type than the certificate supplied",
                check="snp.signing-key",
                observed=cn,
                expected=rep.signing_key,
            )

        # 1. report signature (ECDSA P-384, R/S little-endian)
        key = vcek.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            raise VerificationError(
                Reason.BAD_SIGNATURE,
                f"{rep.signing_key} does not carry a P-384 key",
                check="snp.report-signature",
            )
        try:
            key.verify(encode_dss_signature(rep.signature_r, rep.signature_s), rep.signed_bytes, _ES384)
        except InvalidSignature:
            raise VerificationError(
                Reason.BAD_SIGNATURE,
                f"report signature does not verify with the {rep.signing_key} key",
                check="snp.report-signature",
            ) from None

        # 2. VCEK <- ASK <- ARK (pinned by key)
        anchor = self._anchor(trust_root, coll, vcek)
        ck: _ChainKey = (anchor.der, coll.vcek, coll.ask, coll.ark)
        chain = self._chains.get(ck)
        if chain is None:
            chain = self._chains.put(ck, self._validate(vcek, coll, anchor))

        # 3. validity windows (never cached)
        chain.check_time(when, check="snp.certificate-validity")

        # 4. the certificate is this chip's, at this TCB
        self._check_binding(rep, vcek)

        return VerificationResult(
            kind=EvidenceKind.SEV_SNP,
            verified_at=when,
            claims=rep.claims(),
            debug=rep.debug,
            simulated=anchor.simulated,
            valid_until=chain.not_after,
            evidence_sha256=hashlib.sha256(rep.raw).hexdigest(),
            details={
                "guest_svn": rep.guest_svn,
                "family_id": rep.family_id.hex(),
                "image_id": rep.image_id.hex(),
                "id_key_digest": rep.id_key_digest.hex(),
                "author_key_digest": rep.author_key_digest.hex(),
                "report_id": rep.report_id.hex(),
                "platform_info": f"0x{rep.platform_info:x}",
                "current_tcb": rep.current_tcb.claims(),
                "committed_tcb": rep.committed_tcb.claims(),
                "launch_tcb": rep.launch_tcb.claims(),
                "current_version": ".".join(map(str, rep.current_version)),
                "product": rep.product,
                "trust_root": anchor.label,
            },
        )

    def _anchor(
        self, trust_root: AnchorLike | None, coll: SnpCollateral, vcek: x509.Certificate
    ) -> TrustAnchor:
        if trust_root is not None:
            return TrustAnchor.load(trust_root)
        if self.anchor is not None:
            return self.anchor
        # no explicit root: the embedded ARK whose name issued the ASK (or the VCEK's issuer)
        ask = load_certificate(coll.ask, field="snp.collateral.ask") if coll.ask else None
        wanted = ask.issuer if ask is not None else None
        for anchor in AMD_ARKS.values():
            if wanted is not None and anchor.certificate.subject == wanted:
                return anchor
            if wanted is None:
                pinned_ask = _pinned_ask_for(vcek)
                if pinned_ask is not None and pinned_ask.issuer == anchor.certificate.subject:
                    return anchor
        raise VerificationError(
            Reason.BAD_CHAIN,
            "no embedded AMD ARK matches this certificate chain",
            check="snp.ark",
            observed=(wanted or vcek.issuer).rfc4514_string(),
            expected=", ".join(a.label for a in AMD_ARKS.values()),
        )

    @staticmethod
    def _validate(vcek: x509.Certificate, coll: SnpCollateral, anchor: TrustAnchor) -> ValidatedChain:
        if coll.ark is not None:
            ark = load_certificate(coll.ark, field="snp.collateral.ark")
            if spki_der(ark) != anchor.spki:
                raise VerificationError(
                    Reason.BAD_CHAIN,
                    "the collateral's ARK is not the pinned trust root",
                    check="snp.ark",
                    observed=ark.subject.rfc4514_string(),
                    expected=anchor.label,
                )
        ask = load_certificate(coll.ask, field="snp.collateral.ask") if coll.ask else _pinned_ask_for(vcek)
        if ask is None:
            raise CollateralError(
                f"no ASK/ASVK supplied and none embedded for issuer {vcek.issuer.rfc4514_string()}",
                hint="add the ASK (cert_chain from AMD KDS) to the collateral",
            )
        return validate_chain(
            vcek, [ask], anchor, check="snp.certificate-chain", leaf_needs_digital_signature=False
        )

    @staticmethod
    def _check_binding(rep: SnpReport, vcek: x509.Certificate) -> None:
        def ext_int(oid: x509.ObjectIdentifier) -> int | None:
            try:
                value = vcek.extensions.get_extension_for_oid(oid).value
            except x509.ExtensionNotFound:
                return None
            raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
            if len(raw) >= 3 and raw[0] == 0x02 and raw[1] == len(raw) - 2:
                return int.from_bytes(raw[2:], "big")
            raise EvidenceFormatError(
                "TCB extension is not a DER INTEGER", field=f"snp.collateral.vcek.{oid.dotted_string}"
            )

        tcb = rep.reported_tcb
        pairs = [("bl", OID_BL_SPL, tcb.bl), ("tee", OID_TEE_SPL, tcb.tee), ("snp", OID_SNP_SPL, tcb.snp),
                 ("ucode", OID_UCODE_SPL, tcb.ucode), ("fmc", OID_FMC_SPL, tcb.fmc)]  # fmt: skip
        for name, oid, observed in pairs:
            expected = ext_int(oid)
            if expected is None and observed is None:
                continue  # FMC: only Turin-layout reports and certificates carry it
            if expected is None or observed is None:
                # a TCB the certificate does not state (or states for another layout) is not
                # a match: the VCEK/VLEK extensions are the only evidence of its TCB
                raise VerificationError(
                    Reason.COLLATERAL_MISMATCH,
                    f"the {rep.signing_key} certificate "
                    + ("lacks" if expected is None else "has")
                    + f" the {name} SPL extension ({oid.dotted_string}) the report's TCB layout "
                    + ("needs" if expected is None else "does not have"),
                    check="snp.vcek-tcb",
                    observed=str(observed),
                    expected=str(expected),
                )
            if expected != observed:
                raise VerificationError(
                    Reason.COLLATERAL_MISMATCH,
                    f"REPORTED_TCB.{name} differs from the {rep.signing_key} certificate's TCB",
                    check="snp.vcek-tcb",
                    observed=str(observed),
                    expected=str(expected),
                )
        if rep.signing_key == "VCEK" and not rep.mask_chip_key:
            try:
                hwid = vcek.extensions.get_extension_for_oid(OID_HWID).value
            except x509.ExtensionNotFound:
                raise VerificationError(
                    Reason.COLLATERAL_MISMATCH, "VCEK has no hwID extension", check="snp.vcek-chip-id"
                ) from None
            raw = hwid.value if isinstance(hwid, x509.UnrecognizedExtension) else b""
            if len(raw) == 66 and raw[:2] == b"\x04\x40":
                raw = raw[2:]
            if raw != rep.chip_id:
                raise VerificationError(
                    Reason.COLLATERAL_MISMATCH,
                    "the VCEK belongs to another chip",
                    check="snp.vcek-chip-id",
                    observed=rep.chip_id.hex(),
                    expected=raw.hex(),
                )


def _pinned_ask_for(vcek: x509.Certificate) -> x509.Certificate | None:
    for pem in AMD_ASK_PEM.values():
        ask = x509.load_pem_x509_certificate(pem)
        if ask.subject == vcek.issuer:
            return ask
    return None


def verify_snp(
    report: bytes,
    collateral: SnpCollateral | Mapping[str, object] | bytes | str | os.PathLike[str] | None,
    *,
    at: datetime | None = None,
    trust_root: AnchorLike | None = None,
) -> VerificationResult:
    """One-shot verification; no caches kept."""
    return SnpVerifier(trust_root).verify(report, collateral, at=at)
