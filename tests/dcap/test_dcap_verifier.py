"""DCAP verifier on builder-made evidence: one test per rejection class, each next to an accepted
variant, plus TCB-status convergence. Times are fixed (conftest.NOW)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from dcap_vectors import NOW

from r3e_tee.attestation.dcap import DcapVerifier, VerificationCache, converge_status, verify_dcap
from r3e_tee.errors import CollateralError, EvidenceFormatError, InvalidRequestError, VerificationError
from r3e_tee.evidence.dcap_builder import (
    DcapPlatform,
    build_collateral,
    build_sgx_quote,
    build_tdx_quote,
    build_test_platform,
    default_qe_identity,
    default_tcb_info,
    sign_p256_raw,
)
from r3e_tee.evidence.dcap_collateral import QuoteCollateral, TcbLevel, split_signed_response
from r3e_tee.evidence.sgx_quote import assemble_quote, parse_quote

Platform = tuple[DcapPlatform, QuoteCollateral]
DAY = timedelta(days=1)


def ok(platform: DcapPlatform, quote: bytes, coll: QuoteCollateral, at=NOW):  # type: ignore[no-untyped-def]
    return verify_dcap(quote, coll, at=at, trust_root=platform.root_cert_pem)


def rejects(
    reason: str, platform: DcapPlatform, quote: bytes, coll: QuoteCollateral, at=NOW, root=None
) -> VerificationError:  # type: ignore[no-untyped-def]
    with pytest.raises(VerificationError) as info:
        verify_dcap(quote, coll, at=at, trust_root=root or platform.root_cert_pem)
    assert info.value.reason.value == reason, str(info.value)
    return info.value


# --- acceptance and statuses -------------------------------------------------------------------


def test_quote_versions_accepted(sgx_platform: Platform, tdx_platform: Platform) -> None:
    p, c = sgx_platform
    for v in (3, 4, 5):
        res = ok(p, build_sgx_quote(p, version=v, report_data=b"\x11" * 64), c)
        assert res.kind.value == "sgx-dcap" and res.tcb_status == "UpToDate" and not res.debug
        assert res.claims["report_data"] == "11" * 64 and res.claims["fmspc"] == "00906ED50000"
    t, tc = tdx_platform
    for v, td15 in ((4, False), (5, False), (5, True)):
        res = ok(t, build_tdx_quote(t, version=v, td15=td15, mr_td=b"\x22" * 48), tc)
        assert res.kind.value == "tdx-dcap" and res.tcb_status == "UpToDate"
        assert res.claims["mr_td"] == "22" * 48 and ("mr_servicetd" in res.claims) == td15
        assert res.details["tdx_module_tcb_status"] == "UpToDate"
    assert res.valid_until == NOW + 30 * DAY


@pytest.mark.parametrize(
    ("status", "advisories"),
    [
        ("UpToDate", ()),
        ("SWHardeningNeeded", ("INTEL-SA-00615",)),
        ("ConfigurationNeeded", ("INTEL-SA-00289",)),
        ("ConfigurationAndSWHardeningNeeded", ("INTEL-SA-00289", "INTEL-SA-00615")),
        ("OutOfDate", ("INTEL-SA-00837",)),
        ("OutOfDateConfigurationNeeded", ("INTEL-SA-00837", "INTEL-SA-00289")),
    ],
)
def test_each_tcb_status_is_accepted_and_reported(status: str, advisories: tuple[str, ...]) -> None:
    p, c = build_test_platform(now=NOW, tcb_status=status, advisory_ids=advisories)
    res = ok(p, build_sgx_quote(p), c)
    assert res.tcb_status == status and set(res.advisories) == set(advisories)
    # the same platform under a Revoked TCB level is rejected
    p2, c2 = build_test_platform(now=NOW, tcb_status="Revoked")
    rejects("revoked", p2, build_sgx_quote(p2), c2)


def test_tcb_info_v2_accepted() -> None:
    p, c = build_test_platform(now=NOW, tcb_info_version=2, tcb_status="SWHardeningNeeded")
    assert '"sgxtcbcomp01svn"' in c.tcb_info and '"id"' not in c.tcb_info
    assert ok(p, build_sgx_quote(p), c).tcb_status == "SWHardeningNeeded"


def test_qe_and_tdx_module_status_converge() -> None:
    assert converge_status("ConfigurationNeeded", "OutOfDate") == "OutOfDateConfigurationNeeded"
    assert converge_status("SWHardeningNeeded", "OutOfDate") == "OutOfDate"
    assert converge_status("UpToDate", "ConfigurationNeeded") == "UpToDate"
    assert converge_status("OutOfDate", "Revoked") == "Revoked"
    p, c = build_test_platform(
        now=NOW,
        tcb_status="ConfigurationNeeded",
        advisory_ids=("INTEL-SA-00289",),
        qe_tcb_status="OutOfDate",
        qe_advisory_ids=("INTEL-SA-00477",),
    )
    res = ok(p, build_sgx_quote(p), c)
    assert res.tcb_status == "OutOfDateConfigurationNeeded"
    assert set(res.advisories) == {"INTEL-SA-00289", "INTEL-SA-00477"}
    assert (
        res.details["platform_tcb_status"] == "ConfigurationNeeded"
        and res.details["qe_tcb_status"] == "OutOfDate"
    )
    t, tc = build_test_platform(tee="tdx", now=NOW, tdx_module_status="OutOfDate")
    res = ok(t, build_tdx_quote(t), tc)
    assert res.tcb_status == "OutOfDate" and res.details["tdx_module_tcb_status"] == "OutOfDate"
    q, qc = build_test_platform(now=NOW, qe_tcb_status="Revoked")
    rejects("revoked", q, build_sgx_quote(q), qc)


def test_debug_is_a_claim_not_a_rejection(sgx_platform: Platform, tdx_platform: Platform) -> None:
    p, c = sgx_platform
    res = ok(p, build_sgx_quote(p, attributes=bytes.fromhex("07000000000000000700000000000000")), c)
    assert res.debug and res.claims["debug"] is True
    t, tc = tdx_platform
    res = ok(t, build_tdx_quote(t, td_attributes=bytes.fromhex("0100001000000000")), tc)
    assert res.debug and res.claims["td_attributes"] == "0100001000000000"


# --- time --------------------------------------------------------------------------------------


def test_expired_and_not_yet_valid_collateral(sgx_platform: Platform) -> None:
    p, c = sgx_platform
    quote = build_sgx_quote(p)
    ok(p, quote, c, at=NOW + 29 * DAY)
    rejects("expired-collateral", p, quote, c, at=NOW + 31 * DAY)
    rejects("not-yet-valid", p, quote, c, at=NOW - 2 * DAY)
    # only the QE identity stale: still caught
    ident = default_qe_identity(p, issued=NOW - 40 * DAY, next_update=NOW - DAY)
    rejects("expired-collateral", p, quote, build_collateral(p, qe_identity=ident))


def test_expired_and_not_yet_valid_certificates() -> None:
    p, c = build_test_platform(now=NOW, cert_not_after=NOW + 10 * DAY)
    quote = build_sgx_quote(p)
    ok(p, quote, c, at=NOW + 9 * DAY)
    rejects("expired", p, quote, c, at=NOW + 11 * DAY)
    p2, c2 = build_test_platform(now=NOW, cert_not_before=NOW + DAY, collateral_issued=NOW - DAY)
    rejects("not-yet-valid", p2, build_sgx_quote(p2), c2)
    ok(p2, build_sgx_quote(p2), c2, at=NOW + 2 * DAY)


def test_warm_verifier_still_checks_time(sgx_platform: Platform) -> None:
    p, c = sgx_platform
    quote = build_sgx_quote(p)
    v = DcapVerifier(p.root_cert_pem)
    for _ in range(3):
        assert v.verify(quote, c, at=NOW).tcb_status == "UpToDate"
        with pytest.raises(VerificationError, match="expired-collateral"):
            v.verify(quote, c, at=NOW + 60 * DAY)


# --- chains, CRLs, revocation ------------------------------------------------------------------


def test_wrong_root(sgx_platform: Platform) -> None:
    p, c = sgx_platform
    other, _ = build_test_platform(now=NOW)
    quote = build_sgx_quote(p)
    ok(p, quote, c)
    rejects("bad-chain", p, quote, c, root=other.root_cert_pem)


def _reissue(
    cert: x509.Certificate,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    digital_signature: bool,
    cert_sign: bool,
    crl_sign: bool,
) -> x509.Certificate:
    """``cert`` with the same name, key, validity and other extensions, but the given
    basicConstraints and keyUsage, signed by ``signer``."""
    b = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=cert_sign,
                crl_sign=crl_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    for ext in cert.extensions:
        if not isinstance(ext.value, x509.BasicConstraints | x509.KeyUsage):
            b = b.add_extension(ext.value, critical=ext.critical)
    return b.sign(signer, hashes.SHA256())


def test_each_certificate_may_do_what_it_is_used_for(sgx_platform: Platform) -> None:
    """RFC 5280 4.2.1.3/4.2.1.9: TCB Info, QE Identity and QE reports are signed by end-entity
    keys with digitalSignature; CA keys only sign certificates (keyCertSign) and CRLs (cRLSign)."""
    p, c = sgx_platform
    quote = build_sgx_quote(p)
    ok(p, quote, c)

    def signed_by(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> QuoteCollateral:
        chain = p.pem(cert, p.root_cert)
        return replace(
            c,
            tcb_info_issuer_chain=chain,
            tcb_info_signature=sign_p256_raw(key, c.tcb_info.encode()),
            qe_identity_issuer_chain=chain,
            qe_identity_signature=sign_p256_raw(key, c.qe_identity.encode()),
        )

    # the PCK CA key (a CA: keyCertSign, cRLSign) signing TCB Info and QE Identity
    err = rejects("bad-chain", p, quote, signed_by(p.pck_ca_cert, p.pck_ca_key))
    assert "CA certificate" in str(err)
    # a TCB signing certificate that is a CA, or lacks digitalSignature
    for ca, ds in ((True, True), (False, False)):
        tcb = _reissue(
            p.tcb_signing_cert, p.root_key, ca=ca, digital_signature=ds, cert_sign=ca, crl_sign=False
        )
        rejects("bad-chain", p, quote, signed_by(tcb, p.tcb_signing_key))
    tcb_ok = _reissue(
        p.tcb_signing_cert, p.root_key, ca=False, digital_signature=True, cert_sign=False, crl_sign=False
    )
    ok(p, quote, signed_by(tcb_ok, p.tcb_signing_key))
    # a PCK certificate without digitalSignature signing the QE report
    pck = _reissue(
        p.pck_cert, p.pck_ca_key, ca=False, digital_signature=False, cert_sign=False, crl_sign=False
    )
    p2 = replace(p, pck_cert=pck)
    err = rejects("bad-chain", p2, build_sgx_quote(p2), c)
    assert "digital signatures" in str(err)
    # a PCK CA without keyCertSign issuing the PCK certificate; and without cRLSign issuing the CRL
    for cert_sign, crl_sign, words in ((False, True, "may not sign certificates"), (True, False, "CRLs")):
        ca = _reissue(
            p.pck_ca_cert,
            p.root_key,
            ca=True,
            digital_signature=False,
            cert_sign=cert_sign,
            crl_sign=crl_sign,
        )
        p3 = replace(p, pck_ca_cert=ca)
        coll = replace(c, pck_crl_issuer_chain=p.pem(ca, p.root_cert))
        err = rejects("bad-chain", p3, build_sgx_quote(p3), coll)
        assert words in str(err)


def test_revoked_pck_and_pck_ca() -> None:
    p, c = build_test_platform(now=NOW, revoke_pck=True)
    rejects("revoked", p, build_sgx_quote(p), c)
    ok(p, build_sgx_quote(p), build_collateral(replace(p, spec=replace(p.spec, revoke_pck=False))))
    p2, c2 = build_test_platform(now=NOW, revoke_pck_ca=True)
    err = rejects("revoked", p2, build_sgx_quote(p2), c2)
    assert "PCK CA" in str(err)


def test_pck_crl_from_the_wrong_ca(sgx_platform: Platform) -> None:
    p, c = sgx_platform
    other, _ = build_test_platform(now=NOW, ca="platform", root_key=p.root_key)  # same root, other CA
    coll = build_collateral(p, pck_crl_issuer=(other.pck_ca_cert, other.pck_ca_key))
    ok(p, build_sgx_quote(p), c)
    err = rejects("bad-chain", p, build_sgx_quote(p), coll)
    assert err.check == "pck-crl.issuer"


def test_tampered_collateral_signatures(sgx_platform: Platform) -> None:
    p, c = sgx_platform
    quote = build_sgx_quote(p)
    rejects(
        "bad-signature",
        p,
        quote,
        replace(
            c, tcb_info=c.tcb_info.replace('"tcbEvaluationDataNumber":17', '"tcbEvaluationDataNumber":18')
        ),
    )
    rejects(
        "bad-signature",
        p,
        quote,
        replace(c, qe_identity=c.qe_identity.replace('"isvprodid":1', '"isvprodid":2')),
    )
    sig = bytearray(c.root_ca_crl)
    sig[-5] ^= 1
    rejects("bad-signature", p, quote, replace(c, root_ca_crl=bytes(sig)))


def test_signed_collateral_with_duplicate_member_names(sgx_platform: Platform) -> None:
    """RFC 8259 section 4: duplicate names make a JSON object mean what each parser decides;
    signed TCB Info / QE Identity (and the bundle around them) with any are refused as unusable."""
    p, c = sgx_platform
    quote = build_sgx_quote(p)
    assert ok(p, quote, c).claims["fmspc"] == "00906ED50000"

    def resigned(tcb_info: str | None = None, qe_identity: str | None = None) -> QuoteCollateral:
        tcb, qe = tcb_info or c.tcb_info, qe_identity or c.qe_identity
        return replace(
            c,
            tcb_info=tcb,
            tcb_info_signature=sign_p256_raw(p.tcb_signing_key, tcb.encode()),
            qe_identity=qe,
            qe_identity_signature=sign_p256_raw(p.tcb_signing_key, qe.encode()),
        )

    # a first "fmspc" of another platform that a first-wins parser would match
    dup_tcb = c.tcb_info.replace('"fmspc":"00906ED50000"', '"fmspc":"00A067110000","fmspc":"00906ED50000"')
    dup_qe = c.qe_identity.replace('"isvprodid":1', '"isvprodid":7,"isvprodid":1')
    for coll in (resigned(tcb_info=dup_tcb), resigned(qe_identity=dup_qe)):
        with pytest.raises(CollateralError, match="duplicate member name"):
            ok(p, quote, coll)
    bundle = json.dumps(c.to_json())
    with pytest.raises(CollateralError, match="duplicate member name 'tcb_info'"):
        ok(p, quote, bundle.replace('"tcb_info":', '"tcb_info":"{}","tcb_info":', 1))
    assert ok(p, quote, bundle).tcb_status == "UpToDate"
    # a raw PCS response naming its signed member twice
    response = c.tcb_info_response()
    assert split_signed_response(response, "tcbInfo")[0] == c.tcb_info
    with pytest.raises(EvidenceFormatError, match="duplicate member name 'tcbInfo'"):
        split_signed_response('{"tcbInfo":{},' + response[1:], "tcbInfo")


def test_tcb_info_of_an_undefined_tcb_type(sgx_platform: Platform, tdx_platform: Platform) -> None:
    """Intel PCS TCB Info: tcbType picks the level comparison logic and only type 0 is defined;
    a signed TCB Info of another type cannot be matched by type-0 rules, so it is unusable."""
    for p, c, quote in (
        (*sgx_platform, build_sgx_quote(sgx_platform[0])),
        (*tdx_platform, build_tdx_quote(tdx_platform[0])),
    ):
        assert ok(p, quote, c).tcb_status == "UpToDate"
        text = c.tcb_info.replace('"tcbType":0', '"tcbType":1')
        assert text != c.tcb_info
        coll = replace(c, tcb_info=text, tcb_info_signature=sign_p256_raw(p.tcb_signing_key, text.encode()))
        with pytest.raises(CollateralError, match="unsupported tcbType 1"):
            ok(p, quote, coll)


def test_tdx_tcb_info_must_describe_the_tdx_module(tdx_platform: Platform) -> None:
    """Intel PCS TDX TCB Info v3 always carries tdxModule (MRSIGNER_SEAM, attributes); without
    it a TD on a version-0 module would pass with any SEAM signer (dcap-qvl refuses it too)."""
    t, tc = tdx_platform
    spec = replace(t.spec, tee_tcb_svn=bytes([5, 0, 2] + [0] * 13))  # module major version 0
    p0 = replace(t, spec=spec)
    c0 = build_collateral(p0)
    quote = build_tdx_quote(p0)
    assert ok(p0, quote, c0).tcb_status == "UpToDate"
    doc = json.loads(c0.tcb_info)
    for value in (None, "drop"):
        if value == "drop":
            doc.pop("tdxModule")
        else:
            doc["tdxModule"] = value
        text = json.dumps(doc, separators=(",", ":"))
        coll = replace(c0, tcb_info=text, tcb_info_signature=sign_p256_raw(t.tcb_signing_key, text.encode()))
        with pytest.raises(CollateralError, match="tdxModule"):
            ok(p0, quote, coll)


# --- QE, quote signature -----------------------------------------------------------------------


def test_bad_qe_identity() -> None:
    p, c = build_test_platform(now=NOW)
    quote = build_sgx_quote(p)
    ok(p, quote, c)
    p1, c1 = build_test_platform(now=NOW, identity_mrsigner=b"\x01" * 32)
    assert rejects("bad-qe-report", p1, build_sgx_quote(p1), c1).check == "qe-identity.mrsigner"
    p2, c2 = build_test_platform(now=NOW, identity_isvprodid=7)
    assert rejects("bad-qe-report", p2, build_sgx_quote(p2), c2).check == "qe-identity.isvprodid"
    ident = default_qe_identity(p, issued=NOW - DAY, next_update=NOW + DAY)
    bad_attr = replace(ident, attributes=bytes.fromhex("13000000000000000000000000000000"))
    assert (
        rejects("bad-qe-report", p, quote, build_collateral(p, qe_identity=bad_attr)).check
        == "qe-identity.attributes"
    )
    # a bit outside the mask does not matter
    masked = replace(ident, attributes=bytes.fromhex("11000000000000000000000000000001"))
    ok(p, quote, build_collateral(p, qe_identity=masked))
    bad_misc = replace(ident, miscselect=1)
    assert (
        rejects("bad-qe-report", p, quote, build_collateral(p, qe_identity=bad_misc)).check
        == "qe-identity.miscselect"
    )
    tdx_ident = replace(ident, id="TD_QE")
    assert (
        rejects("bad-qe-report", p, quote, build_collateral(p, qe_identity=tdx_ident)).check
        == "qe-identity.id"
    )


def test_qe_report_binding_and_signatures(sgx_platform: Platform) -> None:
    p, c = sgx_platform
    good = parse_quote(build_sgx_quote(p))
    signed = good.signed_region
    sd = good.signature_data

    def rebuild(**kw: bytes) -> bytes:
        parts = {
            "signature": sd.signature,
            "attestation_key": sd.attestation_key,
            "qe_report": sd.qe_report.raw,
            "qe_report_signature": sd.qe_report_signature,
            "qe_auth_data": sd.qe_auth_data,
        } | kw
        return assemble_quote(signed, version=3, pck_chain_pem=p.pck_chain_pem, **parts)

    ok(p, rebuild(), c)
    assert rejects("bad-qe-report", p, rebuild(qe_auth_data=bytes(32)), c).check == "qe-report.report-data"
    assert (
        rejects(
            "bad-qe-report", p, rebuild(qe_report_signature=sign_p256_raw(p.pck_ca_key, sd.qe_report.raw)), c
        ).check
        == "qe-report.signature"
    )
    assert (
        rejects("bad-signature", p, rebuild(signature=sign_p256_raw(p.pck_key, signed)), c).check
        == "quote.signature"
    )


# --- TCB matching ------------------------------------------------------------------------------


def test_wrong_fmspc_and_pce_id(sgx_platform: Platform) -> None:
    p, c = sgx_platform
    quote = build_sgx_quote(p)
    info = default_tcb_info(p, issued=NOW - DAY, next_update=NOW + DAY)
    assert (
        rejects(
            "collateral-mismatch", p, quote, build_collateral(p, tcb_info=replace(info, fmspc=bytes(6)))
        ).check
        == "tcb-info.fmspc"
    )
    assert (
        rejects(
            "collateral-mismatch", p, quote, build_collateral(p, tcb_info=replace(info, pce_id=b"\x00\x01"))
        ).check
        == "tcb-info.pce-id"
    )
    # FMSPC compares case-insensitively: lower-case hex in the TCB Info is the same platform
    coll = build_collateral(p, tcb_info=info)
    lower = coll.tcb_info.replace('"fmspc":"00906ED50000"', '"fmspc":"00906ed50000"')
    assert lower != coll.tcb_info
    ok(
        p,
        quote,
        replace(coll, tcb_info=lower, tcb_info_signature=sign_p256_raw(p.tcb_signing_key, lower.encode())),
    )


def test_tcb_info_of_another_tee(sgx_platform: Platform, tdx_platform: Platform) -> None:
    p, c = sgx_platform
    t, _ = tdx_platform
    tdx_info = replace(default_tcb_info(t, issued=NOW - DAY, next_update=NOW + DAY), fmspc=p.spec.fmspc)
    assert (
        rejects("collateral-mismatch", p, build_sgx_quote(p), build_collateral(p, tcb_info=tdx_info)).check
        == "tcb-info.id"
    )


def test_tcb_level_not_found_sgx(sgx_platform: Platform) -> None:
    p, _ = sgx_platform
    quote = build_sgx_quote(p)
    comps = list(p.spec.tcb_components)
    comps[7] += 1  # one component above the platform
    higher = TcbLevel(tuple(comps), p.spec.pce_svn, "UpToDate")
    pce_higher = TcbLevel(p.spec.tcb_components, p.spec.pce_svn + 1, "UpToDate")
    lower = TcbLevel(p.spec.tcb_components, p.spec.pce_svn - 1, "OutOfDate", advisory_ids=("INTEL-SA-00001",))
    info = default_tcb_info(p, issued=NOW - DAY, next_update=NOW + DAY)
    rejects(
        "tcb-level-not-found",
        p,
        quote,
        build_collateral(p, tcb_info=replace(info, tcb_levels=(higher, pce_higher))),
    )
    # levels are matched highest first whatever their order in the JSON
    res = ok(p, quote, build_collateral(p, tcb_info=replace(info, tcb_levels=(lower, higher, pce_higher))))
    assert res.tcb_status == "OutOfDate" and res.advisories == ("INTEL-SA-00001",)


def test_tcb_level_not_found_tdx(tdx_platform: Platform) -> None:
    t, tc = tdx_platform
    quote = build_tdx_quote(t)
    ok(t, quote, tc)
    info = default_tcb_info(t, issued=NOW - DAY, next_update=NOW + DAY)
    lvl = info.tcb_levels[0]
    assert lvl.tdx_components is not None
    need = list(lvl.tdx_components)
    need[2] += 1  # TEE_TCB_SVN[2] (e.g. microcode) below the level
    rejects(
        "tcb-level-not-found",
        t,
        quote,
        build_collateral(t, tcb_info=replace(info, tcb_levels=(replace(lvl, tdx_components=tuple(need)),))),
    )
    # bytes 0 and 1 belong to the TDX module identity when byte 1 (module version) is set
    need = list(lvl.tdx_components)
    need[0] += 9
    ok(
        t,
        quote,
        build_collateral(t, tcb_info=replace(info, tcb_levels=(replace(lvl, tdx_components=tuple(need)),))),
    )
    # ... whose own levels and signer are checked
    mod = info.tdx_module_identities[0]
    no_mod = replace(info, tdx_module_identities=(replace(mod, id="TDX_03"),))
    assert (
        rejects("tcb-level-not-found", t, quote, build_collateral(t, tcb_info=no_mod)).check
        == "tdx-module.identity"
    )
    signer = replace(info, tdx_module_identities=(replace(mod, mrsigner=b"\x01" * 48),))
    assert (
        rejects("tcb-level-not-found", t, quote, build_collateral(t, tcb_info=signer)).check
        == "tdx-module.mrsigner"
    )
    too_new = replace(mod, tcb_levels=tuple(replace(x, isvsvn=x.isvsvn + 50) for x in mod.tcb_levels))
    assert (
        rejects(
            "tcb-level-not-found",
            t,
            quote,
            build_collateral(t, tcb_info=replace(info, tdx_module_identities=(too_new,))),
        ).check
        == "tdx-module.tcb-level"
    )


def test_qe_isvsvn_below_every_level() -> None:
    p, c = build_test_platform(now=NOW, qe_isvsvn=3)
    ok(p, build_sgx_quote(p), c)
    ident = default_qe_identity(p, issued=NOW - DAY, next_update=NOW + DAY)
    raised = replace(ident, tcb_levels=tuple(replace(lv, isvsvn=lv.isvsvn + 5) for lv in ident.tcb_levels))
    rejects("tcb-level-not-found", p, build_sgx_quote(p), build_collateral(p, qe_identity=raised))


# --- inputs, caches, interop -------------------------------------------------------------------


def test_inputs(sgx_platform: Platform) -> None:
    p, c = sgx_platform
    quote = build_sgx_quote(p)
    assert (
        verify_dcap(quote, json.dumps(c.to_json()), at=NOW, trust_root=p.root_cert_der).tcb_status
        == "UpToDate"
    )
    assert (
        verify_dcap(parse_quote(quote), c.to_json(), at=NOW, trust_root=p.root_cert).tcb_status == "UpToDate"
    )
    with pytest.raises(InvalidRequestError):
        verify_dcap(quote, c, at=NOW.replace(tzinfo=None), trust_root=p.root_cert_pem)
    with pytest.raises(CollateralError):
        verify_dcap(quote, {"tcb_info": "x"}, at=NOW, trust_root=p.root_cert_pem)
    with pytest.raises(CollateralError):
        verify_dcap(
            quote, replace(c, root_ca_crl=b"\x30\x03\x02\x01\x00"), at=NOW, trust_root=p.root_cert_pem
        )
    with pytest.raises(EvidenceFormatError):
        verify_dcap(quote[:100], c, at=NOW, trust_root=p.root_cert_pem)
    bad_vendor = bytearray(quote)
    bad_vendor[12] ^= 1
    with pytest.raises(EvidenceFormatError, match="vendor"):
        verify_dcap(bytes(bad_vendor), c, at=NOW, trust_root=p.root_cert_pem)


def test_failures_are_not_cached(sgx_platform: Platform) -> None:
    p, c = sgx_platform
    quote = build_sgx_quote(p)
    cache = VerificationCache()
    v = DcapVerifier(p.root_cert_pem, cache=cache)
    bad = replace(c, tcb_info_signature=bytes(64))
    for _ in range(2):
        with pytest.raises(VerificationError, match="bad-signature"):
            v.verify(quote, bad, at=NOW)
        assert v.verify(quote, c, at=NOW).tcb_status == "UpToDate"
    n = len(cache)
    v.verify(build_sgx_quote(p, report_data=b"\x01" * 64), c, at=NOW)  # a new quote of a known platform
    assert len(cache) == n  # nothing new to cache: only the quote signature was checked


def test_dcap_qvl_accepts_builder_evidence() -> None:
    """An independent verifier (dcap-qvl) agrees with ours on builder-made quotes."""
    for tee, status, adv in (("sgx", "SWHardeningNeeded", ("INTEL-SA-00615",)), ("tdx", "UpToDate", ())):
        p, c = build_test_platform(tee=tee, now=NOW, tcb_status=status, advisory_ids=adv)
        quotes = (
            [build_sgx_quote(p)]
            if tee == "sgx"
            else [build_tdx_quote(p, version=4), build_tdx_quote(p, version=5)]
        )
        for quote in quotes:
            theirs = dcap_qvl.verify_with_root_ca(
                quote,
                dcap_qvl.QuoteCollateralV3.from_json(json.dumps(c.to_json())),
                p.root_cert_der,
                int(NOW.timestamp()),
            )
            ours = ok(p, quote, c)
            assert theirs.status == ours.tcb_status == status
            assert list(theirs.advisory_ids) == list(ours.advisories)


def test_issuer_names_compare_by_bytes_then_by_decoded_value() -> None:
    """Chaining compares the DER of issuer and subject, and decodes names only when the bytes
    differ (an issuer may re-encode its name): same value in another string type matches, a
    different value or a name that does not decode matches nothing."""
    from cryptography import x509
    from cryptography.x509.name import _ASN1Type
    from cryptography.x509.oid import NameOID

    from r3e_tee.attestation.dcap import _name_text, _same_name

    utf8 = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX PCK Platform CA")])
    printable = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX PCK Platform CA", _ASN1Type.PrintableString)]
    )
    other = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX PCK Processor CA")])
    assert utf8.public_bytes() != printable.public_bytes()

    def never() -> x509.Name:
        raise AssertionError("decoded although the bytes are equal")

    def broken() -> x509.Name:
        raise ValueError("invalid UTF8String")

    der = utf8.public_bytes()
    assert _same_name(der, never, der, never)
    assert _same_name(der, lambda: utf8, printable.public_bytes(), lambda: printable)
    assert not _same_name(der, lambda: utf8, other.public_bytes(), lambda: other)
    assert not _same_name(der, broken, printable.public_bytes(), broken)
    assert not _same_name(der, lambda: utf8, printable.public_bytes(), broken)
    assert _name_text(lambda: utf8) == "CN=Intel SGX PCK Platform CA"
    assert "does not decode" in _name_text(broken)
