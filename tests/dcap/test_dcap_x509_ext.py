"""The PCK certificate SGX extension and the DER/PEM helpers."""

from __future__ import annotations

import pytest
from cryptography import x509
from dcap_vectors import Case
from hypothesis import given, settings
from hypothesis import strategies as st

from r3e_tee.errors import EvidenceFormatError
from r3e_tee.evidence.sgx_quote import parse_quote
from r3e_tee.evidence.x509_ext import (
    SGX_EXTENSION_OID,
    PckExtension,
    encode_pck_extension,
    parse_pck_extension,
    pem_chain_to_der,
)


def _ext_value(quote: bytes) -> bytes:
    pem = parse_quote(quote).pck_chain_pem
    assert pem is not None
    leaf = x509.load_der_x509_certificate(pem_chain_to_der(pem)[0])
    ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID)).value
    assert isinstance(ext, x509.UnrecognizedExtension)
    return ext.value


def test_real_pck_extensions(dcap_cases: list[Case]) -> None:
    seen: dict[str, PckExtension] = {}
    for case in dcap_cases:
        if case.raw.get("mutate"):
            continue
        value = _ext_value(case.quote)
        ext = parse_pck_extension(value)
        assert ext.fmspc.hex().upper() == case.raw["claims"]["fmspc"]
        assert len(ext.tcb_components) == 16 and ext.cpu_svn == bytes(ext.tcb_components)
        assert encode_pck_extension(ext) == value  # our encoder writes Intel's exact layout
        seen[case.id] = ext
    phala = seen["sgx-dcap/phala/sgx_quote"]
    assert phala.pce_svn == 13 and phala.tcb_components[:6] == (11, 11, 2, 2, 255, 1) and phala.sgx_type == 0
    # Platform-CA PCKs carry the platform instance id and configuration flags
    assert seen["tdx-dcap/phala/tdx_quote"].platform_instance_id is not None


def test_round_trip_with_optional_parts() -> None:
    ext = PckExtension(
        ppid=bytes(range(16)),
        tcb_components=tuple(range(16)),
        pce_svn=300,
        cpu_svn=bytes(range(16)),
        pce_id=b"\x00\x01",
        fmspc=bytes.fromhex("00906ed50000"),
        sgx_type=1,
        platform_instance_id=b"\x05" * 16,
        dynamic_platform=True,
        cached_keys=False,
        smt_enabled=True,
    )
    assert parse_pck_extension(encode_pck_extension(ext)) == ext


def test_missing_and_malformed_entries() -> None:
    base = encode_pck_extension(PckExtension(bytes(16), (0,) * 16, 1, bytes(16), b"\0\0", bytes(6), 0))
    with pytest.raises(EvidenceFormatError, match="trailing"):
        parse_pck_extension(base + b"\0")
    bad = bytearray(base)
    bad[1] ^= 0x01  # outer length off by one
    with pytest.raises(EvidenceFormatError):
        parse_pck_extension(bytes(bad))
    with pytest.raises(EvidenceFormatError) as info:
        parse_pck_extension(b"\x30\x00")
    assert info.value.field == "pck_extension.ppid"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 500), st.integers(0, 255)), min_size=1, max_size=6), st.integers(0, 600)
)
def test_fuzz_extension(edits: list[tuple[int, int]], cut: int) -> None:
    raw = bytearray(_BASE)
    for off, val in edits:
        if off < len(raw):
            raw[off] = val
    for data in (bytes(raw), bytes(raw[:cut])):
        try:
            parse_pck_extension(data)
        except EvidenceFormatError:
            pass


_BASE = encode_pck_extension(
    PckExtension(bytes(16), tuple(range(16)), 13, bytes(range(16)), b"\0\0", bytes(6), 0)
)


def test_pem_chain_errors() -> None:
    with pytest.raises(EvidenceFormatError, match="no PEM"):
        pem_chain_to_der(b"garbage")
    with pytest.raises(EvidenceFormatError, match="non-base64"):
        pem_chain_to_der(b"-----BEGIN CERTIFICATE-----\nAB*D\n-----END CERTIFICATE-----\n")
    with pytest.raises(EvidenceFormatError, match="END"):
        pem_chain_to_der(b"-----BEGIN CERTIFICATE-----\nABCD\n")
