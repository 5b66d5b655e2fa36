"""The strict CBOR decoder and COSE_Sign1 parsing: acceptance, precise errors, fuzzing."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from r3e_tee.errors import EvidenceFormatError
from r3e_tee.evidence.cbor import UNDEFINED, CborSimple, CborTag, decode
from r3e_tee.evidence.cose import (
    ALG_ES256,
    ALG_ES384,
    ecdsa_der_to_raw,
    parse_cose_sign1,
    sig_structure,
    sign1,
)

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=64)
    | st.text(max_size=32)
    | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.integers(-100, 100) | st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=30,
)


@given(cbor_values)
@settings(max_examples=150, deadline=None)
def test_decodes_what_cbor2_encodes(value: object) -> None:
    assert decode(cbor2.dumps(value)) == value


@given(st.binary(max_size=200))
@settings(max_examples=1000, deadline=None)
def test_random_bytes_only_ever_raise_format_errors(data: bytes) -> None:
    try:
        decode(data)
    except EvidenceFormatError as exc:
        assert exc.field and exc.offset is not None and 0 <= exc.offset <= len(data)


def test_indefinite_lengths_and_tags() -> None:
    # (_ h'0102', h'03') indefinite bytes, [_ 1, [_ ]] indefinite arrays, {_ "a": 1} indefinite map
    assert decode(bytes.fromhex("5f42010241 03ff")) == b"\x01\x02\x03"
    assert decode(bytes.fromhex("7f616161 62ff")) == "ab"
    assert decode(bytes.fromhex("9f019fffff")) == [1, []]
    assert decode(bytes.fromhex("bf616101ff")) == {"a": 1}
    assert decode(bytes.fromhex("d2 80")) == CborTag(18, [])
    assert decode(bytes.fromhex("f7")) is UNDEFINED
    assert decode(bytes.fromhex("f820")) == CborSimple(32)
    assert decode(bytes.fromhex("f93c00")) == 1.0


@pytest.mark.parametrize(
    ("hexdata", "offset", "words"),
    [
        ("", 0, "end of data"),
        ("1c", 0, "reserved additional information"),
        ("ff", 0, "break outside"),
        ("1f", 0, "indefinite length is not allowed"),
        ("5a00000010 01", 5, "needs 16 bytes"),
        ("62c328", 0, "UTF-8"),
        ("a201010102", 3, "duplicate map key"),
        ("5f 61 61 ff", 1, "same type"),
        ("9f 01", 2, "unterminated"),
        ("f810", 0, "one-byte form"),
        ("0101", 1, "trailing"),
        ("9b ffffffffffffffff", 0, "cannot fit"),
        ("a1 80 01", 1, "scalar"),
    ],
)
def test_malformed_reports_field_and_offset(hexdata: str, offset: int, words: str) -> None:
    with pytest.raises(EvidenceFormatError) as info:
        decode(bytes.fromhex(hexdata.replace(" ", "")), field="doc")
    assert info.value.offset == offset
    assert words in info.value.message
    assert info.value.field.startswith("doc")


def test_deep_nesting_is_refused_not_a_crash() -> None:
    with pytest.raises(EvidenceFormatError, match="nesting deeper"):
        decode(b"\x81" * 1000 + b"\x00")


def test_cose_sign1_tagged_untagged_and_sig_structure() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    for tagged in (False, True):
        raw = sign1(b"payload", key, tagged=tagged)
        cose = parse_cose_sign1(raw)
        assert cose.tagged is tagged
        assert cose.alg == ALG_ES384
        assert cose.payload == b"payload"
        assert raw[cose.payload_offset : cose.payload_offset + 7] == b"payload"
        # our direct Sig_structure encoding equals cbor2's encoding of the array
        assert cose.to_be_signed() == cbor2.dumps(["Signature1", cose.protected, b"", b"payload"])
    assert sig_structure(b"\xa1\x01\x26", b"x" * 300) == cbor2.dumps(
        ["Signature1", b"\xa1\x01\x26", b"", b"x" * 300]
    )


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        (cbor2.CBORTag(17, [b"", {}, b"", b""]), "not COSE_Sign1"),
        ({"a": 1}, "must be a CBOR array"),
        ([b"", {}, b""], "4 items"),
        (["x", {}, b"", b""], "protected header must be a byte string"),
        ([b"", [], b"", b""], "unprotected header must be a map"),
        ([b"", {}, None, b""], "detached"),
        ([b"", {}, "text", b""], "payload must be a byte string"),
        ([b"", {}, b"", 5], "signature must be a byte string"),
        ([b"\x01", {}, b"", b""], "must encode a map"),
        ([cbor2.dumps({1: -7}), {1: -7}, b"", b""], "both protected and unprotected"),
    ],
)
def test_cose_structure_errors(obj: object, words: str) -> None:
    with pytest.raises(EvidenceFormatError, match=words):
        parse_cose_sign1(cbor2.dumps(obj))


def test_cose_indefinite_array_and_other_alg() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    definite = sign1(b"p", key, alg=ALG_ES256)
    indefinite = b"\x9f" + definite[1:] + b"\xff"
    cose = parse_cose_sign1(indefinite)
    assert cose.alg == ALG_ES256 and cose.payload == b"p"
    with pytest.raises(EvidenceFormatError, match="trailing"):
        parse_cose_sign1(definite + b"\x00")


def _sign_with_protected(protected: dict[object, object], unprotected: dict[object, object]) -> bytes:
    """A COSE_Sign1 ES384 whose protected header is ``protected`` (``sign1`` only writes alg)."""
    key = ec.generate_private_key(ec.SECP384R1())
    raw_protected = cbor2.dumps(protected)
    der = key.sign(sig_structure(raw_protected, b"p"), ec.ECDSA(hashes.SHA384()))
    return cbor2.dumps([raw_protected, unprotected, b"p", ecdsa_der_to_raw(der, 48)])


def test_cose_crit_header_must_be_understood() -> None:
    # RFC 9052 section 3.1: crit names labels the recipient MUST understand, else it rejects
    assert parse_cose_sign1(_sign_with_protected({1: ALG_ES384}, {})).alg == ALG_ES384
    assert parse_cose_sign1(_sign_with_protected({1: ALG_ES384, 2: [1]}, {})).alg == ALG_ES384
    for protected, unprotected, words in (
        ({1: ALG_ES384, 2: [99], 99: True}, {}, "does not understand"),
        ({1: ALG_ES384, 2: ["x-must-check"], "x-must-check": 1}, {}, "does not understand"),
        ({1: ALG_ES384, 2: []}, {}, "non-empty array"),
        ({1: ALG_ES384, 2: 99}, {}, "non-empty array"),
        ({1: ALG_ES384, 2: [b"x"]}, {}, "not a header label"),
        ({1: ALG_ES384}, {2: [99], 99: True}, "protected header"),
    ):
        with pytest.raises(EvidenceFormatError, match=words) as info:
            parse_cose_sign1(_sign_with_protected(protected, unprotected))
        assert info.value.field.endswith(".crit")
