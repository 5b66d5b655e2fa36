"""The reference-value policy: strict schema, composition, and each check with its observed and
expected values (on synthetic results, so every kind's checks are covered without evidence)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from r3e_tee.attestation.policy import (
    DEFAULT_TCB_STATUSES,
    AllOf,
    AnyOf,
    Policy,
    canonical_tcb_status,
    load_policy,
)
from r3e_tee.attestation.result import EvidenceKind, VerificationResult
from r3e_tee.errors import PolicyError, Reason, VerificationError

AT = datetime(2025, 1, 1, tzinfo=UTC)


def sgx(**claims: Any) -> VerificationResult:
    base = {
        "mrenclave": "aa" * 32,
        "mrsigner": "bb" * 32,
        "isv_prod_id": 1,
        "isv_svn": 5,
        "report_data": "cc" * 64,
    }
    base.update(claims)
    return VerificationResult(
        kind=EvidenceKind.SGX_DCAP,
        verified_at=AT,
        claims=base,
        tcb_status=claims.pop("tcb", "UpToDate") if "tcb" in claims else "SWHardeningNeeded",
        advisories=("INTEL-SA-00615",),
    )


def tdx() -> VerificationResult:
    claims = {
        "mr_td": "11" * 48,
        "rtmr0": "00" * 48,
        "rtmr1": "01" * 48,
        "rtmr2": "02" * 48,
        "rtmr3": "03" * 48,
    }
    return VerificationResult(
        kind=EvidenceKind.TDX_DCAP, verified_at=AT, claims=claims, tcb_status="UpToDate"
    )


def rejects(
    policy: Policy | Any, result: VerificationResult, reason: Reason, check: str
) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        policy.check(result, at=AT)
    assert info.value.reason == reason, info.value
    assert info.value.check == check
    return info.value


def test_default_policy_is_strict_but_usable() -> None:
    p = Policy()
    p.check(sgx(), at=AT)
    # every non-revoked status passes by default (the vectors expect OutOfDate etc. to be valid)
    for status in sorted(DEFAULT_TCB_STATUSES) + ["GROUP_OUT_OF_DATE", "CONFIGURATION_NEEDED", "OK"]:
        p.check(VerificationResult(EvidenceKind.SGX_IAS, AT, {}, tcb_status=status), at=AT)
    rejects(
        p,
        VerificationResult(EvidenceKind.SGX_DCAP, AT, {}, tcb_status="Revoked"),
        Reason.TCB_STATUS_NOT_ALLOWED,
        "policy.tcb_statuses",
    )
    rejects(
        p,
        VerificationResult(EvidenceKind.NITRO, AT, {}, debug=True),
        Reason.DEBUG_ENCLAVE,
        "policy.allow_debug",
    )
    rejects(
        p,
        VerificationResult(EvidenceKind.NITRO, AT, {}, simulated=True),
        Reason.SIMULATION_NOT_ALLOWED,
        "policy.allow_simulation",
    )
    assert Policy().unsafe_choices() == []
    assert len(Policy(allow_debug=True, allow_simulation=True).unsafe_choices()) == 2


def test_sgx_tdx_identity_checks() -> None:
    ok = Policy.from_dict(
        {"mrenclave": ["aa" * 32, "dd" * 32], "mrsigner": "BB" * 32, "isv_prod_id": 1, "min_isv_svn": 5}
    )
    ok.check(sgx(), at=AT)
    err = rejects(
        Policy.from_dict({"mrenclave": "dd" * 32}), sgx(), Reason.MEASUREMENT_MISMATCH, "policy.mrenclave"
    )
    assert (err.observed, err.expected) == ("aa" * 32, "dd" * 32)
    rejects(Policy(min_isv_svn=6), sgx(), Reason.MEASUREMENT_MISMATCH, "policy.min_isv_svn")
    rejects(Policy(isv_prod_id=2), sgx(), Reason.MEASUREMENT_MISMATCH, "policy.isv_prod_id")
    Policy.from_dict({"mr_td": "11" * 48, "rtmr2": ["02" * 48]}).check(tdx(), at=AT)
    rejects(Policy.from_dict({"rtmr3": "00" * 48}), tdx(), Reason.MEASUREMENT_MISMATCH, "policy.rtmr3")
    # a reference value the kind cannot carry rejects rather than being skipped
    rejects(Policy.from_dict({"mrenclave": "aa" * 32}), tdx(), Reason.KIND_NOT_ALLOWED, "policy.mrenclave")


def test_tcb_and_advisories() -> None:
    Policy.from_dict({"tcb_statuses": ["SWHardeningNeeded"], "allowed_advisories": ["intel-sa-00615"]}).check(
        sgx(), at=AT
    )
    rejects(
        Policy.from_dict({"tcb_statuses": ["UpToDate"]}),
        sgx(),
        Reason.TCB_STATUS_NOT_ALLOWED,
        "policy.tcb_statuses",
    )
    rejects(
        Policy.from_dict({"denied_advisories": ["INTEL-SA-00615"]}),
        sgx(),
        Reason.ADVISORY_NOT_ALLOWED,
        "policy.denied_advisories",
    )
    rejects(
        Policy.from_dict({"allowed_advisories": ["INTEL-SA-00001"]}),
        sgx(),
        Reason.ADVISORY_NOT_ALLOWED,
        "policy.allowed_advisories",
    )
    assert canonical_tcb_status("GROUP_OUT_OF_DATE") == "OutOfDate"


def test_tcb_statuses_reject_evidence_without_a_tcb_status() -> None:
    """Nitro and SEV-SNP verification establishes no TCB status: a policy that admits only some
    statuses cannot be satisfied by them (module rule: a reference value the kind cannot carry
    rejects), while the default (no tcb_statuses) still accepts them."""
    only_current = Policy.from_dict({"tcb_statuses": ["UpToDate"]})
    only_current.check(tdx(), at=AT)
    for kind in (EvidenceKind.NITRO, EvidenceKind.SEV_SNP):
        result = VerificationResult(kind, AT, {})
        Policy().check(result, at=AT)
        err = rejects(only_current, result, Reason.KIND_NOT_ALLOWED, "policy.tcb_statuses")
        assert "carries no tcb_statuses" in str(err.observed)
    assert canonical_tcb_status("uptodate") == "UpToDate"


def test_report_data_binding_exact_and_prefix() -> None:
    Policy.from_dict({"report_data": "CC" * 64, "report_data_prefix": "cccc"}).check(sgx(), at=AT)
    err = rejects(
        Policy.from_dict({"report_data": "00" * 64}), sgx(), Reason.REPORT_DATA_MISMATCH, "policy.report_data"
    )
    assert err.observed == "cc" * 64
    rejects(
        Policy.from_dict({"report_data_prefix": "cd"}),
        sgx(),
        Reason.REPORT_DATA_MISMATCH,
        "policy.report_data_prefix",
    )


def test_kinds_allow_list() -> None:
    Policy.from_dict({"kinds": ["sgx-dcap", "nitro"]}).check(sgx(), at=AT)
    assert Policy.from_dict({"kinds": ["sgx", "SNP"]}).kinds == {"sgx-dcap", "sev-snp"}
    rejects(Policy.from_dict({"kinds": ["nitro"]}), sgx(), Reason.KIND_NOT_ALLOWED, "policy.kinds")


@pytest.mark.parametrize(
    ("doc", "words", "hint"),
    [
        ({"allow_degub": True}, "unknown policy key 'allow_degub'", "allow_debug"),
        ({"expected_pcr": {}}, "unknown policy key", "expected_pcrs"),
        ({"mrenclave": []}, "empty list", "leave 'mrenclave' out"),
        ({"mrenclave": "zz"}, "not hex", None),
        ({"mrenclave": "aa"}, "1 bytes, expected 32", None),
        ({"allow_debug": "yes"}, "true or false", None),
        ({"isv_prod_id": -1}, "non-negative", None),
        ({"expected_pcrs": {40: "00" * 48}}, "0..31", None),
        ({"expected_pcrs": {"x": "00" * 48}}, "not a number", None),
        ({"expected_pcrs": {0: "00" * 47}}, "expected 32 or 48 or 64", None),
        ({"tcb_statuses": ["UpToDat"]}, "unknown value", "UpToDate"),
        ({"kinds": ["tpm"]}, "unknown value", "valid: sgx-dcap"),
        ({"max_age": "soon"}, "duration", None),
        ({"max_age": 0}, "positive", None),
        ({"report_data": "00" * 63}, "expected 64", None),
    ],
)
def test_schema_errors_name_the_key(doc: dict[str, Any], words: str, hint: str | None) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(doc)
    assert words in info.value.message
    if hint:
        assert info.value.hint and hint in info.value.hint


def test_yaml_loading(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "# reference values\nallow_debug: false\nmax_age: 5m\nexpected_pcrs:\n  0: " + "ab" * 48 + "\n"
        "tcb_statuses: [UpToDate, OK]\n"
    )
    p = load_policy(path)
    assert p.max_age == 300 and p.expected_pcrs == {0: "ab" * 48} and p.tcb_statuses == {"UpToDate"}
    assert p.to_dict() == {"expected_pcrs": {"0": "ab" * 48}, "max_age": 300.0, "tcb_statuses": ["UpToDate"]}
    (tmp_path / "bad.yaml").write_text("allow_debug: [\n")
    with pytest.raises(PolicyError, match=r"bad.yaml:\d+: not valid YAML"):
        load_policy(tmp_path / "bad.yaml")
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")
    with pytest.raises(PolicyError, match="mapping"):
        Policy.from_yaml("- a list")
    assert Policy.from_yaml("") == Policy()


def test_merge_is_the_stricter_policy() -> None:
    a = Policy.from_dict(
        {"mrenclave": ["aa" * 32, "dd" * 32], "allow_debug": True, "min_isv_svn": 2, "max_age": 60}
        | {"expected_pcrs": {0: "00" * 48}, "denied_advisories": ["A"]}
    )
    b = Policy.from_dict(
        {"mrenclave": ["aa" * 32], "min_isv_svn": 4, "max_age": 30, "expected_pcrs": {8: "11" * 48}}
        | {"denied_advisories": ["B"], "report_data_prefix": "cc"}
    )
    m = a.merge(b)
    assert m.mrenclave == {"aa" * 32} and not m.allow_debug and m.min_isv_svn == 4 and m.max_age == 30
    assert dict(m.expected_pcrs) == {0: "00" * 48, 8: "11" * 48} and m.denied_advisories == {"A", "B"}
    assert m.report_data_prefix == "cc"
    assert Policy().merge(a) == a.merge(Policy()) == Policy(**{**a.__dict__, "allow_debug": False})
    for x, y in (
        ({"mrenclave": "aa" * 32}, {"mrenclave": "bb" * 32}),
        ({"expected_pcrs": {0: "00" * 48}}, {"expected_pcrs": {0: "11" * 48}}),
        ({"nonce": "00"}, {"nonce": "01"}),
        ({"report_data_prefix": "aa"}, {"report_data_prefix": "ab"}),
    ):
        with pytest.raises(PolicyError):
            Policy.from_dict(x).merge(Policy.from_dict(y))
    over = Policy().with_overrides(allow_debug=True, pcrs={4: "AB" * 48})
    assert over.allow_debug and over.expected_pcrs == {4: "ab" * 48}


def test_all_of_any_of() -> None:
    sgx_policy = Policy.from_dict({"kinds": ["sgx-dcap"], "mrenclave": "aa" * 32})
    tdx_policy = Policy.from_dict({"kinds": ["tdx-dcap"], "mr_td": "11" * 48})
    either = AnyOf([sgx_policy, tdx_policy])
    either.check(sgx(), at=AT)
    either.check(tdx(), at=AT)
    rejects(either, sgx(mrenclave="ee" * 32), Reason.MEASUREMENT_MISMATCH, "policy.mrenclave")
    both = AllOf([Policy(), sgx_policy])
    both.check(sgx(), at=AT)
    rejects(both, tdx(), Reason.KIND_NOT_ALLOWED, "policy.kinds")
    with pytest.raises(PolicyError):
        AnyOf([])
    with pytest.raises(PolicyError):
        AllOf([])


def test_age_needs_a_timestamp() -> None:
    nitro = VerificationResult(
        EvidenceKind.NITRO, AT, {"timestamp": int((AT - timedelta(seconds=10)).timestamp() * 1000)}
    )
    Policy(max_age=30).check(nitro, at=AT)
    rejects(Policy(max_age=5), nitro, Reason.EVIDENCE_TOO_OLD, "policy.max_age")
    rejects(Policy(max_age=5), sgx(), Reason.KIND_NOT_ALLOWED, "policy.max_age")


def test_yaml_hex_that_looks_like_a_number_stays_hex() -> None:
    """YAML would read 0404... as an octal integer and 1234... as a decimal one."""
    digits = "0404" * 16
    p = Policy.from_yaml(
        f"mrenclave: {digits}\nexpected_pcrs:\n  8: {'12' * 48}\nisv_prod_id: 0\nmin_isv_svn: 3\n"
    )
    assert p.mrenclave == {digits} and p.expected_pcrs == {8: "12" * 48}
    assert (p.isv_prod_id, p.min_isv_svn) == (0, 3)
