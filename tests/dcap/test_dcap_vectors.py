"""Every sgx-dcap / tdx-dcap case of the shared vectors through verify_dcap.

Debug-enclave policy is the dispatcher's job; the DCAP verifier reports ``debug`` as a claim, so
for cases with ``policy.allow_debug`` the expectation is the signature/collateral-level result.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dcap_vectors import Case, load_cases

from r3e_tee.attestation.dcap import DcapVerifier, VerificationCache, quote_claims, verify_dcap
from r3e_tee.attestation.roots import TrustRoot, intel_sgx_root
from r3e_tee.errors import EvidenceFormatError, VerificationError


def _case_ids(vectors: Path) -> list[str]:
    try:
        return [c.id for c in load_cases(vectors)]
    except OSError:
        return []


def _expected_reasons(case: Case) -> set[str]:
    return {case.raw["expect_reason"], *case.raw.get("expect_reason_alternatives", [])}


def _check(case: Case, verifier: DcapVerifier) -> None:
    raw = case.raw
    if raw["expect"] == "valid":
        res = verifier.verify(case.quote, case.collateral, at=case.at)
        assert res.tcb_status == raw["expect_tcb_status"]
        assert set(res.advisories) == set(raw["expect_advisories"])
        assert dict(res.claims) == raw["claims"]
        assert res.debug == raw["claims"]["debug"]
        assert res.kind.value == raw["kind"]
        assert res.valid_until is not None and res.valid_until >= case.at
        return
    with pytest.raises((VerificationError, EvidenceFormatError)) as info:
        verifier.verify(case.quote, case.collateral, at=case.at)
    err = info.value
    reason = err.reason.value if isinstance(err, VerificationError) else "malformed"
    assert reason in _expected_reasons(case), str(err)


def test_every_dcap_case(dcap_cases: list[Case]) -> None:
    """Fresh verifier per case (nothing cached), then a shared one twice (cached work reused)."""
    assert len(dcap_cases) >= 28
    shared = VerificationCache()
    for case in dcap_cases:
        _check(case, DcapVerifier(case.root))
    for _ in range(2):
        for case in dcap_cases:
            _check(case, DcapVerifier(case.root, cache=shared))


def test_claims_of_rejected_cases_are_what_the_parser_sees(dcap_cases: list[Case]) -> None:
    for case in dcap_cases:
        if case.raw["claims"] is not None:
            assert quote_claims(case.quote) == case.raw["claims"], case.id


def test_root_pinned_by_key_accepts_either_issuance(dcap_cases: list[Case], vectors_dir: Path) -> None:
    legacy = TrustRoot.from_der(
        (vectors_dir / "roots/intel_sgx_root_ca_legacy_notAfter2033.der").read_bytes()
    )
    assert legacy.spki == intel_sgx_root().spki and legacy.der != intel_sgx_root().der
    case = next(c for c in dcap_cases if c.id == "sgx-dcap/phala/sgx_quote")
    a = verify_dcap(case.quote, case.collateral, at=case.at, trust_root=legacy)
    b = verify_dcap(case.quote, case.collateral, at=case.at)  # the embedded Intel root
    assert a.tcb_status == b.tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_time_checks_run_on_every_call_of_a_warm_verifier(dcap_cases: list[Case]) -> None:
    valid = next(c for c in dcap_cases if c.id == "tdx-dcap/phala/tdx_quote")
    expired = next(c for c in dcap_cases if c.id == "tdx-dcap/phala/tdx_quote/expired-collateral")
    early = next(c for c in dcap_cases if c.id == "tdx-dcap/phala/tdx_quote/not-yet-valid")
    v = DcapVerifier(valid.root)
    for _ in range(2):
        assert v.verify(valid.quote, valid.collateral, at=valid.at).tcb_status == "UpToDate"
        with pytest.raises(VerificationError) as e1:
            v.verify(valid.quote, valid.collateral, at=expired.at)
        assert e1.value.reason.value == "expired-collateral"
        with pytest.raises(VerificationError) as e2:
            v.verify(valid.quote, valid.collateral, at=early.at)
        assert e2.value.reason.value == "not-yet-valid"


def test_result_json_is_stable(dcap_cases: list[Case]) -> None:
    case = next(c for c in dcap_cases if c.id == "sgx-dcap/automata/sgx_quote_v3")
    out = verify_dcap(case.quote, case.collateral, at=case.at).to_json()
    assert out["kind"] == "sgx-dcap" and out["verdict"] == "valid"
    assert out["tcb_status"] == "SWHardeningNeeded" and out["advisories"] == ["INTEL-SA-00615"]
    assert out["valid_until"] == "2025-09-14T04:36:46Z"  # QE Identity nextUpdate is the earliest
    assert out["details"]["pck_ca"] == "platform" and out["details"]["qe_tcb_status"] == "UpToDate"
