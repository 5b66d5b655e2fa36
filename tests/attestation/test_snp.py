"""SEV-SNP reports: builder-made acceptance and rejections, collateral forms, byte sweeps."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r3e_tee.attestation.snp import SnpCollateral, SnpVerifier, verify_snp
from r3e_tee.attestation.verify import verify_evidence
from r3e_tee.errors import CollateralError, EvidenceFormatError, Reason, VerificationError
from r3e_tee.evidence.encoding import build_scale_versioned, issue_certificate
from r3e_tee.evidence.snp import (
    OID_BL_SPL,
    OID_FMC_SPL,
    OID_HWID,
    OID_SNP_SPL,
    OID_TEE_SPL,
    OID_UCODE_SPL,
    REPORT_SIZE,
    SIGNED_SIZE,
    SnpPki,
    TcbVersion,
    build_snp_pki,
    build_snp_report,
    parse_snp_report,
)

MEASUREMENT = bytes(range(48))
HOST_DATA = bytes(range(100, 132))
REPORT_DATA = bytes(range(64))


def der(cert: Any) -> bytes:
    return bytes(cert.public_bytes(Encoding.DER))


def coll(pki: SnpPki) -> dict[str, bytes]:
    return {"vcek": der(pki.vcek), "ask": der(pki.ask), "ark": der(pki.ark)}


def report(pki: SnpPki, **kw: Any) -> bytes:
    fields: dict[str, Any] = dict(measurement=MEASUREMENT, host_data=HOST_DATA, report_data=REPORT_DATA)
    fields.update(kw)
    fields.setdefault("signing_key", pki.vcek_key)
    return build_snp_report(**fields)


def test_builder_report_verifies(snp_pki: SnpPki, t0: datetime) -> None:
    result = verify_snp(report(snp_pki), coll(snp_pki), at=t0, trust_root=snp_pki.ark)
    assert result.claims == {
        "version": 3,
        "measurement": MEASUREMENT.hex(),
        "report_data": REPORT_DATA.hex(),
        "policy": "0x30000",
        "debug": False,
        "vmpl": 0,
        "host_data": HOST_DATA.hex(),
        "signing_key": "VCEK",
        "reported_tcb": {"bl": 3, "tee": 0, "snp": 8, "ucode": 115, "raw": "0x7308000000000003"},
        "chip_id": "c1" * 64,
    }
    assert result.details["product"] == "milan"


def test_turin_tcb_layout_and_vlek(t0: datetime) -> None:
    tcb = TcbVersion.build(fmc=1, bl=2, tee=3, snp=4, ucode=5)
    pki = build_snp_pki(
        not_before=t0 - timedelta(days=1),
        not_after=t0 + timedelta(days=1),
        tcb=tcb,
        product="Turin",
        key_kind="VLEK",
    )
    rep = build_snp_report(
        signing_key=pki.vcek_key, reported_tcb=tcb, key_kind="VLEK", cpuid=(0x1A, 0x02, 0x01)
    )
    result = verify_snp(rep, coll(pki), at=t0, trust_root=pki.ark)
    assert result.claims["signing_key"] == "VLEK"
    assert result.claims["reported_tcb"] == {
        "fmc": 1,
        "bl": 2,
        "tee": 3,
        "snp": 4,
        "ucode": 5,
        "raw": f"0x{tcb.raw:016x}",
    }
    # a VLEK report presented with a VCEK is a collateral mismatch
    other = build_snp_pki(not_before=t0 - timedelta(days=1), not_after=t0 + timedelta(days=1), tcb=tcb)
    with pytest.raises(VerificationError) as info:
        verify_snp(rep, coll(other), at=t0, trust_root=other.ark)
    assert info.value.reason == Reason.COLLATERAL_MISMATCH


def test_collateral_forms(snp_pki: SnpPki, t0: datetime, tmp_path: Path) -> None:
    rep = report(snp_pki)
    bundle = b"".join(c.public_bytes(Encoding.PEM) for c in (snp_pki.ark, snp_pki.vcek, snp_pki.ask))
    assert verify_snp(rep, bundle, at=t0, trust_root=snp_pki.ark).claims["vmpl"] == 0
    for name, cert in (("vcek.der", snp_pki.vcek), ("ask.pem", snp_pki.ask)):
        data = der(cert) if name.endswith("der") else cert.public_bytes(Encoding.PEM)
        (tmp_path / name).write_bytes(data)
    (tmp_path / "c.json").write_text(json.dumps({"vcek": "vcek.der", "ask": "ask.pem"}))
    verify_snp(rep, tmp_path / "c.json", at=t0, trust_root=snp_pki.ark)
    # through the dispatcher: hex text and a SCALE VersionedAttestation wrapper
    assert (
        verify_evidence(rep.hex().encode(), collateral=bundle, at=t0, trust_root=snp_pki.ark).details[
            "encoding"
        ]
        == "hex+binary"
    )
    scaled = build_scale_versioned("sev-snp", rep) + b"trailing"
    assert (
        verify_evidence(scaled, collateral=bundle, at=t0, trust_root=snp_pki.ark).details["encoding"]
        == "scale"
    )
    with pytest.raises(CollateralError):
        verify_snp(rep, None, at=t0)
    with pytest.raises(CollateralError):
        SnpCollateral.load({"vcek": der(snp_pki.vcek), "akk": b""})


def test_rejections(snp_pki: SnpPki, t0: datetime) -> None:
    good = report(snp_pki)
    c = coll(snp_pki)
    # bad signature: signed by another key
    with pytest.raises(VerificationError) as info:
        verify_snp(
            report(snp_pki, signing_key=ec.generate_private_key(ec.SECP384R1())),
            c,
            at=t0,
            trust_root=snp_pki.ark,
        )
    assert info.value.reason == Reason.BAD_SIGNATURE
    # wrong root: the real AMD Milan ARK, or an ARK not matching the collateral's
    with pytest.raises(VerificationError) as info:
        verify_snp(good, {"vcek": c["vcek"], "ask": c["ask"]}, at=t0)
    assert info.value.reason == Reason.BAD_CHAIN
    other = build_snp_pki(not_before=t0 - timedelta(days=1), not_after=t0 + timedelta(days=1))
    with pytest.raises(VerificationError) as info:
        verify_snp(good, c, at=t0, trust_root=other.ark)
    assert info.value.reason == Reason.BAD_CHAIN
    # validity windows
    na = snp_pki.vcek.not_valid_after_utc
    verify_snp(good, c, at=na, trust_root=snp_pki.ark)
    with pytest.raises(VerificationError) as info:
        verify_snp(good, c, at=na + timedelta(seconds=1), trust_root=snp_pki.ark)
    assert info.value.reason == Reason.EXPIRED
    with pytest.raises(VerificationError) as info:
        verify_snp(
            good, c, at=snp_pki.vcek.not_valid_before_utc - timedelta(seconds=1), trust_root=snp_pki.ark
        )
    assert info.value.reason == Reason.NOT_YET_VALID
    # the VCEK of another chip / another TCB
    with pytest.raises(VerificationError) as info:
        verify_snp(report(snp_pki, chip_id=b"\x00" * 64), c, at=t0, trust_root=snp_pki.ark)
    assert (info.value.reason, info.value.check) == (Reason.COLLATERAL_MISMATCH, "snp.vcek-chip-id")
    newer = TcbVersion.build(bl=3, tee=0, snp=9, ucode=115)
    with pytest.raises(VerificationError) as info:
        verify_snp(report(snp_pki, reported_tcb=newer), c, at=t0, trust_root=snp_pki.ark)
    assert (info.value.reason, info.value.check) == (Reason.COLLATERAL_MISMATCH, "snp.vcek-tcb")


def test_policy_on_snp(snp_pki: SnpPki, t0: datetime) -> None:
    c = coll(snp_pki)
    good = report(snp_pki)
    verify_evidence(
        good,
        collateral=c,
        at=t0,
        trust_root=snp_pki.ark,
        policy={
            "measurement": MEASUREMENT.hex(),
            "host_data": [HOST_DATA.hex()],
            "report_data": REPORT_DATA.hex(),
        },
    )
    for policy, reason in (
        ({"measurement": "00" * 48}, Reason.MEASUREMENT_MISMATCH),
        ({"host_data": "00" * 32}, Reason.MEASUREMENT_MISMATCH),
        ({"report_data_prefix": "ff"}, Reason.REPORT_DATA_MISMATCH),
        ({"max_age": 10}, Reason.KIND_NOT_ALLOWED),
        ({"expected_pcrs": {0: "00" * 48}}, Reason.KIND_NOT_ALLOWED),
    ):
        with pytest.raises(VerificationError) as info:
            verify_evidence(good, collateral=c, at=t0, trust_root=snp_pki.ark, policy=policy)
        assert info.value.reason == reason, policy
    debug = report(snp_pki, policy=0x30000 | (1 << 19))
    with pytest.raises(VerificationError) as info:
        verify_evidence(debug, collateral=c, at=t0, trust_root=snp_pki.ark)
    assert info.value.reason == Reason.DEBUG_ENCLAVE
    assert verify_evidence(
        debug, collateral=c, at=t0, trust_root=snp_pki.ark, policy={"allow_debug": True}
    ).debug


@pytest.mark.parametrize(
    ("offset", "value", "field"),
    [
        (0x00, 1, "snp.version"),
        (0x00, 9, "snp.version"),
        (0x0A, 0x00, "snp.policy"),
        (0x30, 4, "snp.vmpl"),
        (0x34, 2, "snp.signature_algo"),
        (0x48, 0x0C, "snp.signing_key"),
        (0x2A0 + 60, 1, "snp.signature.r"),
        (0x400, 1, "snp.signature.reserved"),
    ],
)
def test_format_checks(snp_pki: SnpPki, offset: int, value: int, field: str) -> None:
    raw = bytearray(report(snp_pki))
    raw[offset] = value
    with pytest.raises(EvidenceFormatError) as info:
        parse_snp_report(bytes(raw))
    assert info.value.field == field


def test_truncation_and_size(snp_pki: SnpPki) -> None:
    raw = report(snp_pki)
    for n in range(0, REPORT_SIZE, 7):
        with pytest.raises(EvidenceFormatError):
            parse_snp_report(raw[:n])
    with pytest.raises(EvidenceFormatError):
        parse_snp_report(raw + b"\x00")


def _sweep(verifier: SnpVerifier, raw: bytes, c: Any, at: datetime, root: Any) -> dict[str, int]:
    """Every byte of the signed region and of R and S (the rest must be zero: checked above)."""
    outcomes: dict[str, int] = {}
    for i in range(SIGNED_SIZE + 2 * 72):
        bad = bytearray(raw)
        bad[i] ^= 1 << (i % 8)
        try:
            verifier.verify(bytes(bad), c, at=at, trust_root=root)
        except VerificationError as exc:
            key = exc.reason.value
        except EvidenceFormatError:
            key = "malformed"
        else:
            pytest.fail(f"a change at byte {i:#x} was accepted")
        outcomes[key] = outcomes.get(key, 0) + 1
    return outcomes


def test_sweep_builder_report(snp_pki: SnpPki, t0: datetime) -> None:
    outcomes = _sweep(SnpVerifier(), report(snp_pki), SnpCollateral.load(coll(snp_pki)), t0, snp_pki.ark)
    assert outcomes["bad-signature"] > 700 and outcomes["malformed"]


def test_sweep_real_reports(snp_case: dict[str, Any] | None, vectors_dir: Path, vec: Any) -> None:
    assert snp_case is not None
    raw = vec.binary(snp_case, vectors_dir)
    c = SnpCollateral.load(vec.collateral(snp_case, vectors_dir))
    root = vectors_dir / snp_case["trust_root"]
    verifier = SnpVerifier()
    verifier.verify(raw, c, at=vec.at(snp_case), trust_root=root)
    outcomes = _sweep(verifier, raw, c, vec.at(snp_case), root)
    assert sum(outcomes.values()) == SIGNED_SIZE + 144


@given(st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_reports_never_crash(snp_pki: SnpPki, t0: datetime, data: st.DataObject) -> None:
    c = _FUZZ.setdefault("c", SnpCollateral.load(coll(snp_pki)))
    raw = bytearray(_FUZZ.setdefault("r", report(snp_pki)))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        verify_snp(bytes(raw), c, at=t0, trust_root=snp_pki.ark)
    except (VerificationError, EvidenceFormatError):
        pass


_FUZZ: dict[str, Any] = {}


def _vcek_without(pki: SnpPki, t0: datetime, tcb: TcbVersion, drop: Any) -> bytes:
    """A VCEK like ``pki.vcek`` (same key, issuer, chip) whose TCB extensions omit ``drop``."""
    spl = {OID_BL_SPL: tcb.bl, OID_TEE_SPL: tcb.tee, OID_SNP_SPL: tcb.snp, OID_UCODE_SPL: tcb.ucode}
    if tcb.fmc is not None:
        spl[OID_FMC_SPL] = tcb.fmc
    exts: list[tuple[x509.ExtensionType, bool]] = [
        (x509.UnrecognizedExtension(oid, bytes([0x02, 0x01, value])), False)
        for oid, value in spl.items()
        if oid != drop
    ]
    exts.append((x509.UnrecognizedExtension(OID_HWID, b"\xc1" * 64), False))
    cert = issue_certificate(
        pki.vcek.subject,
        pki.vcek_key.public_key(),
        issuer=pki.ask,
        issuer_key=pki.ask_key,
        not_before=t0 - timedelta(days=1),
        not_after=t0 + timedelta(days=1),
        ca=False,
        extensions=exts,
        rsa_pss=True,
    )
    return der(cert)


def test_vcek_must_state_the_reported_tcb(t0: datetime) -> None:
    """AMD VCEK spec (KDS interface, VCEK extensions): blSPL, teeSPL, snpSPL and ucodeSPL (and
    fmcSPL on Turin) state the TCB the key was derived for; a certificate that does not state
    one of them cannot vouch for REPORTED_TCB, so it is a mismatch, not a pass."""
    for tcb, cpuid in (
        (TcbVersion.build(bl=3, tee=0, snp=8, ucode=115), (0x19, 0x01, 0x01)),
        (TcbVersion.build(bl=3, tee=0, snp=8, ucode=115, fmc=1), (0x1A, 0x02, 0x00)),
    ):
        pki = build_snp_pki(not_before=t0 - timedelta(days=1), not_after=t0 + timedelta(days=1), tcb=tcb)
        rep = report(pki, reported_tcb=tcb, cpuid=cpuid)
        c = coll(pki)
        assert verify_snp(rep, c, at=t0, trust_root=pki.ark).claims["reported_tcb"]["snp"] == 8
        drops = [OID_BL_SPL, OID_TEE_SPL, OID_SNP_SPL, OID_UCODE_SPL] + ([OID_FMC_SPL] if tcb.fmc else [])
        for drop in drops:
            c["vcek"] = _vcek_without(pki, t0, tcb, drop)
            with pytest.raises(VerificationError) as info:
                verify_snp(rep, c, at=t0, trust_root=pki.ark)
            assert (info.value.reason, info.value.check) == (Reason.COLLATERAL_MISMATCH, "snp.vcek-tcb")
            assert drop.dotted_string in str(info.value)
