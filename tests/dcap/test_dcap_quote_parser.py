"""Quote parser: layouts of real and built quotes, and that nothing but EvidenceFormatError escapes."""

from __future__ import annotations

import struct

import pytest
from dcap_vectors import Case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r3e_tee.errors import EvidenceFormatError
from r3e_tee.evidence.dcap_builder import DcapPlatform, build_sgx_quote, build_tdx_quote
from r3e_tee.evidence.dcap_collateral import QuoteCollateral
from r3e_tee.evidence.sgx_quote import (
    BODY_SGX,
    BODY_TD10,
    BODY_TD15,
    CERT_TYPE_PCK_CHAIN,
    CERT_TYPE_QE_REPORT,
    EnclaveReport,
    TdReport,
    parse_quote,
)

Platform = tuple[DcapPlatform, QuoteCollateral]


def test_real_quotes_parse(dcap_cases: list[Case]) -> None:
    seen = set()
    for case in dcap_cases:
        if case.raw.get("mutate"):
            continue
        q = parse_quote(case.quote)
        seen.add((q.header.version, q.body_type))
        assert q.signature_data.certification.pck_chain is not None
        assert q.pck_chain_pem is not None and q.pck_chain_pem.count(b"BEGIN CERTIFICATE") == 3
        if q.header.version == 3:
            assert q.signature_data.certification.cert_type == CERT_TYPE_PCK_CHAIN
        else:
            assert q.signature_data.certification.cert_type == CERT_TYPE_QE_REPORT
        if case.id == "tdx-dcap/phala/tdx_quote":
            assert q.trailing == 70
        if case.id == "tdx-dcap/google/tdx_prod_quote_SPR_E4":
            assert q.trailing == 39
    assert {(3, BODY_SGX), (4, BODY_TD10), (5, BODY_TD15)} <= seen


def test_built_quotes_round_trip(sgx_platform: Platform, tdx_platform: Platform) -> None:
    p, _ = sgx_platform
    for version in (3, 4, 5):
        raw = build_sgx_quote(
            p, version=version, report_data=b"\x07" * 64, mr_enclave=b"\x01" * 32, padding=9
        )
        q = parse_quote(raw)
        assert isinstance(q.body, EnclaveReport) and q.body_type == BODY_SGX
        assert q.header.version == version and q.trailing == 9
        assert q.body.report_data == b"\x07" * 64 and q.body.mr_enclave == b"\x01" * 32
        assert q.signature_data.qe_report.raw == p.qe_report
        assert len(q.signed_region) == 48 + 384 + (6 if version == 5 else 0)
    t, _ = tdx_platform
    for version, td15, body_type, size in (
        (4, False, BODY_TD10, 584),
        (5, False, BODY_TD10, 584),
        (5, True, BODY_TD15, 648),
    ):
        q = parse_quote(build_tdx_quote(t, version=version, td15=td15, mr_td=b"\x02" * 48))
        assert isinstance(q.body, TdReport) and q.body_type == body_type and len(q.body.raw) == size
        assert q.body.mr_td == b"\x02" * 48 and q.is_tdx
        assert (q.body.mr_servicetd is not None) == td15


def _expect_format_error(data: bytes) -> None:
    try:
        parse_quote(data)
    except EvidenceFormatError as exc:
        assert exc.field and (exc.offset is None or 0 <= exc.offset <= len(data))


def test_truncation_sweep(dcap_cases: list[Case], sgx_platform: Platform) -> None:
    """Every prefix of every real quote either parses (only past the signature data) or fails typed."""
    quotes = [c.quote for c in dcap_cases if not c.raw.get("mutate")]
    quotes.append(build_sgx_quote(sgx_platform[0], version=5))
    for quote in {q: None for q in quotes}:
        q = parse_quote(quote)
        end = len(quote) - q.trailing
        for n in range(len(quote)):
            if n < end:
                with pytest.raises(EvidenceFormatError):
                    parse_quote(quote[:n])
            else:
                assert parse_quote(quote[:n]).trailing == n - end


def test_errors_name_field_and_offset(sgx_platform: Platform) -> None:
    raw = bytearray(build_sgx_quote(sgx_platform[0], version=4))
    cases = {
        "header.version": (0, struct.pack("<H", 6)),
        "header.att_key_type": (2, struct.pack("<H", 3)),
        "header.tee_type": (4, struct.pack("<I", 0x42)),
    }
    for fld, (off, val) in cases.items():
        bad = bytearray(raw)
        bad[off : off + len(val)] = val
        with pytest.raises(EvidenceFormatError) as info:
            parse_quote(bytes(bad))
        assert info.value.field == fld and info.value.offset == off
    bad = bytearray(raw)
    bad[432:436] = struct.pack("<I", len(raw))  # signature data length past the end
    with pytest.raises(EvidenceFormatError) as info:
        parse_quote(bytes(bad))
    assert info.value.field == "signature_data.size" and info.value.offset == 432
    bad = bytearray(raw)
    bad[436 + 128 : 438 + 128] = struct.pack("<H", 5)  # v4 must carry type 6
    with pytest.raises(EvidenceFormatError) as info:
        parse_quote(bytes(bad))
    assert info.value.field.startswith("signature_data.certification_data")


def test_v5_body_header_checked(tdx_platform: Platform) -> None:
    raw = bytearray(build_tdx_quote(tdx_platform[0], version=5))
    bad = bytearray(raw)
    bad[50:54] = struct.pack("<I", 584)  # TD 1.5 type with a TD 1.0 size
    with pytest.raises(EvidenceFormatError) as info:
        parse_quote(bytes(bad))
    assert info.value.field == "body.size" and info.value.offset == 50
    bad = bytearray(raw)
    bad[48:50] = struct.pack("<H", 9)
    with pytest.raises(EvidenceFormatError) as info:
        parse_quote(bytes(bad))
    assert info.value.field == "body.type"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    _expect_format_error(data)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([3, 4, 5]),
    st.lists(st.tuples(st.integers(0, 5200), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 6000),
)
def test_fuzz_mutated_quotes(version: int, edits: list[tuple[int, int]], cut: int) -> None:
    raw = bytearray(_FUZZ_BASE[version])
    for off, val in edits:
        if off < len(raw):
            raw[off] = val
    _expect_format_error(bytes(raw[:cut]))
    _expect_format_error(bytes(raw))


def _fuzz_bases() -> dict[int, bytes]:
    from r3e_tee.evidence.dcap_builder import build_test_platform

    sgx, _ = build_test_platform(tee="sgx")
    tdx, _ = build_test_platform(tee="tdx")
    return {
        3: build_sgx_quote(sgx, version=3),
        4: build_tdx_quote(tdx, version=4),
        5: build_tdx_quote(tdx, version=5),
    }


_FUZZ_BASE = _fuzz_bases()
