"""Nitro attestation documents: builder-made acceptance and every rejection class, field-level
format checks, caching that never skips time checks, and byte sweeps over real documents."""

from __future__ import annotations

import base64
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r3e_tee.attestation.nitro import NitroVerifier, verify_nitro
from r3e_tee.attestation.pinned_roots_nitro_ias import (
    AWS_NITRO_ROOT_G1,
    AWS_NITRO_ROOT_G1_SHA256,
    TrustAnchor,
)
from r3e_tee.attestation.policy import Policy
from r3e_tee.attestation.result import EvidenceKind
from r3e_tee.attestation.verify import Verifier, verify_evidence
from r3e_tee.errors import EvidenceFormatError, Reason, VerificationError
from r3e_tee.evidence.cose import ALG_ES256, ecdsa_der_to_raw, sig_structure, sign1
from r3e_tee.evidence.nitro import NitroPki, build_nitro_pki, parse_nitro_document

PCRS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48, 3: b"\x00" * 48, 4: b"\x14" * 48, 8: b"\x18" * 48}
NONCE = bytes.fromhex("00112233445566778899aabbccddeeff")


def make_doc(pki: NitroPki, t0: datetime, **kw: Any) -> bytes:
    fields: dict[str, Any] = dict(pcrs=PCRS, timestamp=t0, nonce=NONCE, user_data=b"ud", public_key=b"pk")
    fields.update(kw)
    return pki.document(**fields)


def _payload(pki: NitroPki, t0: datetime, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
        "digest": "SHA384",
        "timestamp": int(t0.timestamp() * 1000),
        "pcrs": dict(PCRS),
        "certificate": pki.certificate,
        "cabundle": pki.cabundle,
        "public_key": None,
        "user_data": None,
        "nonce": NONCE,
    }
    for key, value in changes.items():
        if value is _DROP:
            doc.pop(key)
        else:
            doc[key] = value
    return doc


_DROP = object()


def _signed(pki: NitroPki, payload: bytes, **kw: Any) -> bytes:
    return sign1(payload, pki.leaf_key, **kw)


# --- acceptance ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tagged", [False, True])
def test_builder_document_verifies_with_claims(nitro_pki: NitroPki, t0: datetime, tagged: bool) -> None:
    doc = make_doc(nitro_pki, t0, tagged=tagged)
    result = verify_nitro(doc, at=t0 + timedelta(seconds=5), trust_root=nitro_pki.root)
    assert result.kind == EvidenceKind.NITRO
    assert result.claims == {
        "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
        "digest": "SHA384",
        "timestamp": int(t0.timestamp() * 1000),
        # 0, 1, 2, 8 always; other PCRs only when extended (PCR3 is zero here)
        "pcrs": {"0": "10" * 48, "1": "11" * 48, "2": "12" * 48, "4": "14" * 48, "8": "18" * 48},
        "user_data": b"ud".hex(),
        "nonce": NONCE.hex(),
        "public_key": b"pk".hex(),
        "debug": False,
    }
    assert result.details["pcrs"]["3"] == "00" * 48
    assert result.details["tagged"] is tagged
    assert result.valid_until == nitro_pki.leaf.not_valid_after_utc
    assert not result.simulated


def test_indefinite_length_payload_is_accepted(nitro_pki: NitroPki, t0: datetime) -> None:
    """NSM uses definite lengths, but CBOR allows indefinite ones; the signature decides."""
    fields = _payload(nitro_pki, t0)
    body = b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in fields.items() if k != "nonce")
    nonce_chunks = b"\x5f" + cbor2.dumps(NONCE[:5]) + cbor2.dumps(NONCE[5:]) + b"\xff"
    payload = b"\xbf" + body + cbor2.dumps("nonce") + nonce_chunks + b"\xff"
    doc = _signed(nitro_pki, payload)
    assert parse_nitro_document(doc).nonce == NONCE
    result = verify_nitro(doc, at=t0, trust_root=nitro_pki.root)
    assert result.claims["nonce"] == NONCE.hex()
    # the same document with one payload byte changed is rejected
    bad = bytearray(doc)
    bad[-120] ^= 0x01
    with pytest.raises((VerificationError, EvidenceFormatError)):
        verify_nitro(bytes(bad), at=t0, trust_root=nitro_pki.root)


def test_pinned_aws_root_is_the_published_one() -> None:
    import hashlib

    assert hashlib.sha256(AWS_NITRO_ROOT_G1.der).hexdigest() == AWS_NITRO_ROOT_G1_SHA256
    assert (
        AWS_NITRO_ROOT_G1.certificate.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    )


# --- format: every field of the AWS spec ------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"module_id": _DROP}, "module_id"),
        ({"module_id": ""}, "module_id"),
        ({"module_id": b"bytes"}, "module_id"),
        ({"module_id": None}, "module_id"),
        ({"digest": "SHA256"}, "digest"),
        ({"timestamp": 0}, "timestamp"),
        ({"timestamp": -5}, "timestamp"),
        ({"timestamp": "now"}, "timestamp"),
        ({"timestamp": 2**63}, "timestamp"),
        ({"pcrs": {}}, "pcrs"),
        ({"pcrs": {32: b"\x00" * 48}}, "pcrs"),
        ({"pcrs": {"0": b"\x00" * 48}}, "pcrs"),
        ({"pcrs": {0: b"\x00" * 20}}, "pcrs.0"),
        ({"pcrs": {0: "00" * 48}}, "pcrs.0"),
        ({"pcrs": {i: b"\x00" * 48 for i in range(33)}}, "pcrs"),
        ({"certificate": b""}, "certificate"),
        ({"certificate": b"\x30" * 1025}, "certificate"),
        ({"cabundle": []}, "cabundle"),
        ({"cabundle": ["pem text"]}, "cabundle[0]"),
        ({"cabundle": b"der"}, "cabundle"),
        ({"public_key": b""}, "public_key"),
        ({"public_key": b"k" * 1025}, "public_key"),
        ({"user_data": b"u" * 1025}, "user_data"),
        ({"user_data": "text"}, "user_data"),
        ({"nonce": 7}, "nonce"),
        ({"extra": b""}, "extra"),
    ],
)
def test_each_field_is_checked(
    nitro_pki: NitroPki, t0: datetime, changes: dict[str, Any], field: str
) -> None:
    doc = _signed(nitro_pki, cbor2.dumps(_payload(nitro_pki, t0, **changes)))
    with pytest.raises(EvidenceFormatError) as info:
        parse_nitro_document(doc)
    assert info.value.field == f"nitro.payload.{field}"
    assert info.value.offset is not None and 0 < info.value.offset < len(doc)


def test_optional_fields_may_be_absent_or_null(nitro_pki: NitroPki, t0: datetime) -> None:
    absent = _payload(nitro_pki, t0, public_key=_DROP, user_data=_DROP, nonce=_DROP)
    doc = parse_nitro_document(_signed(nitro_pki, cbor2.dumps(absent)))
    assert (doc.public_key, doc.user_data, doc.nonce) == (None, None, None)
    assert "nonce" not in doc.claims()
    empty = parse_nitro_document(_signed(nitro_pki, cbor2.dumps(_payload(nitro_pki, t0, user_data=b""))))
    assert empty.claims()["user_data"] == ""


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda p, pl: sign1(pl, ec.generate_private_key(ec.SECP256R1()), alg=ALG_ES256), "protected.alg"),
        (lambda p, pl: cbor2.dumps([cbor2.dumps({1: -35}), {}, pl, b"\x00" * 64]), "signature"),
        (lambda p, pl: cbor2.dumps([cbor2.dumps({1: -35}), {}, cbor2.dumps([1]), b"\x00" * 96]), "payload"),
        (lambda p, pl: cbor2.dumps([cbor2.dumps({1: -35}), {}, b"", b"\x00" * 96]), "payload"),
    ],
)
def test_cose_envelope_checks(nitro_pki: NitroPki, t0: datetime, build: Any, field: str) -> None:
    with pytest.raises(EvidenceFormatError) as info:
        parse_nitro_document(build(nitro_pki, cbor2.dumps(_payload(nitro_pki, t0))))
    assert field in info.value.field


def test_truncation_sweep_only_format_errors(nitro_pki: NitroPki, t0: datetime) -> None:
    doc = make_doc(nitro_pki, t0)
    for n in range(len(doc)):
        with pytest.raises(EvidenceFormatError):
            parse_nitro_document(doc[:n])


@given(st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_documents_never_crash(nitro_pki: NitroPki, t0: datetime, data: st.DataObject) -> None:
    doc = bytearray(_FUZZ_BASE.setdefault("doc", make_doc(nitro_pki, t0)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(doc) - 1))
        doc[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(doc)))
        doc = doc[:cut] + bytearray(data.draw(st.binary(max_size=16)))
    try:
        verify_nitro(bytes(doc), at=t0, trust_root=nitro_pki.root)
    except (VerificationError, EvidenceFormatError):
        pass


_FUZZ_BASE: dict[str, bytes] = {}


# --- rejections (each with its acceptance counterpart) ---------------------------------------------


def test_expired_and_not_yet_valid_leaf(nitro_pki: NitroPki, t0: datetime) -> None:
    doc = make_doc(nitro_pki, t0)
    nb, na = nitro_pki.leaf.not_valid_before_utc, nitro_pki.leaf.not_valid_after_utc
    verify_nitro(doc, at=na, trust_root=nitro_pki.root)  # inclusive bounds
    verify_nitro(doc, at=nb, trust_root=nitro_pki.root)
    with pytest.raises(VerificationError) as info:
        verify_nitro(doc, at=na + timedelta(seconds=1), trust_root=nitro_pki.root)
    assert info.value.reason == Reason.EXPIRED and info.value.check == "nitro.certificate-validity"
    with pytest.raises(VerificationError) as info:
        verify_nitro(doc, at=nb - timedelta(seconds=1), trust_root=nitro_pki.root)
    assert info.value.reason == Reason.NOT_YET_VALID


def test_expired_intermediate_is_caught(t0: datetime) -> None:
    pki = build_nitro_pki(
        not_before=t0 - timedelta(days=2),
        not_after=t0 - timedelta(days=1),
        leaf_not_before=t0 - timedelta(hours=1),
        leaf_not_after=t0 + timedelta(hours=1),
    )
    with pytest.raises(VerificationError) as info:
        verify_nitro(make_doc(pki, t0), at=t0, trust_root=pki.root)
    assert info.value.reason == Reason.EXPIRED


def test_wrong_root(nitro_pki: NitroPki, t0: datetime) -> None:
    doc = make_doc(nitro_pki, t0)
    verify_nitro(doc, at=t0, trust_root=nitro_pki.root)
    with pytest.raises(VerificationError) as info:
        verify_nitro(doc, at=t0)  # the pinned AWS root
    assert info.value.reason == Reason.BAD_CHAIN and info.value.check == "nitro.cabundle-root"
    other = build_nitro_pki(not_before=t0 - timedelta(days=1), not_after=t0 + timedelta(days=1))
    with pytest.raises(VerificationError) as info:
        verify_nitro(doc, at=t0, trust_root=other.root)
    assert info.value.reason == Reason.BAD_CHAIN


def test_leaf_not_issued_by_the_bundle(nitro_pki: NitroPki, t0: datetime) -> None:
    stranger = build_nitro_pki(not_before=t0 - timedelta(days=1), not_after=t0 + timedelta(days=1))
    # signed by a foreign leaf whose certificate is presented with our cabundle
    doc = stranger.document(pcrs=PCRS, timestamp=t0)
    fields = cbor2.loads(parse_nitro_document(doc).cose.payload)
    fields["cabundle"] = nitro_pki.cabundle
    forged = sign1(cbor2.dumps(fields), stranger.leaf_key)
    with pytest.raises(VerificationError) as info:
        verify_nitro(forged, at=t0, trust_root=nitro_pki.root)
    assert info.value.reason == Reason.BAD_CHAIN


def test_bad_cose_signature(nitro_pki: NitroPki, t0: datetime) -> None:
    payload = cbor2.dumps(_payload(nitro_pki, t0))
    doc = sign1(payload, ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(VerificationError) as info:
        verify_nitro(doc, at=t0, trust_root=nitro_pki.root)
    assert info.value.reason == Reason.BAD_SIGNATURE


def test_debug_enclave_needs_allow_debug(nitro_pki: NitroPki, t0: datetime) -> None:
    debug_doc = make_doc(nitro_pki, t0, pcrs={i: b"\x00" * 48 for i in (0, 1, 2, 8)})
    with pytest.raises(VerificationError) as info:
        verify_evidence(debug_doc, at=t0, trust_root=nitro_pki.root)
    assert info.value.reason == Reason.DEBUG_ENCLAVE
    result = verify_evidence(debug_doc, at=t0, trust_root=nitro_pki.root, policy={"allow_debug": True})
    assert result.debug and result.claims["debug"] is True
    assert result.details["unsafe"] and "allow_debug" in result.details["unsafe"][0]


def test_pcr_policy(nitro_pki: NitroPki, t0: datetime) -> None:
    doc = make_doc(nitro_pki, t0)
    ok = {"expected_pcrs": {0: "10" * 48, "8": "18" * 48, 3: "00" * 48}}
    verify_evidence(doc, at=t0, trust_root=nitro_pki.root, policy=ok)
    with pytest.raises(VerificationError) as info:
        verify_evidence(doc, at=t0, trust_root=nitro_pki.root, policy={"expected_pcrs": {2: "ab" * 48}})
    exc = info.value
    assert exc.reason == Reason.PCR_MISMATCH and exc.check == "policy.expected_pcrs.2"
    assert exc.observed == "12" * 48 and exc.expected == "ab" * 48
    with pytest.raises(VerificationError) as info:
        verify_evidence(doc, at=t0, trust_root=nitro_pki.root, policy={"expected_pcrs": {9: "00" * 48}})
    assert info.value.reason == Reason.PCR_MISMATCH and info.value.observed is None


def test_nonce_binding_and_replay(nitro_pki: NitroPki, t0: datetime) -> None:
    doc = make_doc(nitro_pki, t0)
    verify_evidence(doc, at=t0, trust_root=nitro_pki.root, policy={"nonce": NONCE.hex()})
    # a replayed document carries yesterday's nonce, not the one just issued
    with pytest.raises(VerificationError) as info:
        verify_evidence(doc, at=t0, trust_root=nitro_pki.root, policy={"nonce": "ff" * 16})
    assert info.value.reason == Reason.NONCE_MISMATCH and info.value.observed == NONCE.hex()
    unbound = make_doc(nitro_pki, t0, nonce=None)
    with pytest.raises(VerificationError) as info:
        verify_evidence(unbound, at=t0, trust_root=nitro_pki.root, policy={"nonce": NONCE.hex()})
    assert info.value.reason == Reason.NONCE_MISMATCH and info.value.observed is None
    # user_data / public_key bindings
    verify_evidence(
        doc, at=t0, trust_root=nitro_pki.root, policy={"user_data": b"ud".hex(), "public_key": b"pk".hex()}
    )
    with pytest.raises(VerificationError) as info:
        verify_evidence(doc, at=t0, trust_root=nitro_pki.root, policy={"public_key": b"other".hex()})
    assert info.value.reason == Reason.REPORT_DATA_MISMATCH


def test_evidence_age(nitro_pki: NitroPki, t0: datetime) -> None:
    doc = make_doc(nitro_pki, t0)
    verify_evidence(doc, at=t0 + timedelta(seconds=30), trust_root=nitro_pki.root, policy={"max_age": "1m"})
    with pytest.raises(VerificationError) as info:
        verify_evidence(doc, at=t0 + timedelta(minutes=5), trust_root=nitro_pki.root, policy={"max_age": 60})
    assert info.value.reason == Reason.EVIDENCE_TOO_OLD and info.value.check == "policy.max_age"
    with pytest.raises(VerificationError) as info:
        verify_evidence(doc, at=t0 - timedelta(minutes=10), trust_root=nitro_pki.root, policy={"max_age": 60})
    assert info.value.reason == Reason.NOT_YET_VALID


def test_simulation_needs_allow_simulation(nitro_pki: NitroPki, t0: datetime) -> None:
    doc = make_doc(nitro_pki, t0)
    sim = TrustAnchor(nitro_pki.root, simulated=True)
    with pytest.raises(VerificationError) as info:
        verify_evidence(doc, at=t0, trust_root=sim)
    assert info.value.reason == Reason.SIMULATION_NOT_ALLOWED
    assert verify_evidence(doc, at=t0, trust_root=sim, policy={"allow_simulation": True}).simulated
    # a Verifier with the simulation root registered: real root first, then the simulated one
    verifier = Verifier(simulation_roots={EvidenceKind.NITRO: nitro_pki.root})
    with pytest.raises(VerificationError) as info:
        verifier.verify(doc, at=t0)
    assert info.value.reason == Reason.SIMULATION_NOT_ALLOWED
    result = verifier.verify(doc, at=t0, policy=Policy(allow_simulation=True))
    assert result.simulated and result.details["trust_root"]


def test_cache_never_skips_time_checks(nitro_pki: NitroPki, t0: datetime) -> None:
    verifier = NitroVerifier(nitro_pki.root)
    doc = make_doc(nitro_pki, t0)
    for _ in range(3):
        verifier.verify(doc, at=t0)
    with pytest.raises(VerificationError) as info:
        verifier.verify(doc, at=nitro_pki.leaf.not_valid_after_utc + timedelta(seconds=1))
    assert info.value.reason == Reason.EXPIRED
    tampered = bytearray(doc)
    tampered[-1] ^= 0x01
    with pytest.raises(VerificationError):
        verifier.verify(bytes(tampered), at=t0)
    verifier.verify(doc, at=t0)


# --- byte sweeps ---------------------------------------------------------------------------------------


def _sweep(verify: Any, doc: bytes, offsets: range | list[int]) -> dict[str, int]:
    """Flip one bit (a different bit per offset) at each offset; every change must be rejected."""
    outcomes: dict[str, int] = {}
    for i in offsets:
        bad = bytearray(doc)
        bad[i] ^= 1 << (i % 8)
        try:
            verify(bytes(bad))
        except VerificationError as exc:
            key = exc.reason.value
        except EvidenceFormatError:
            key = "malformed"
        else:
            pytest.fail(f"a change at byte {i} was accepted")
        outcomes[key] = outcomes.get(key, 0) + 1
    return outcomes


def test_sweep_builder_document_every_byte(nitro_pki: NitroPki, t0: datetime) -> None:
    doc = make_doc(nitro_pki, t0)
    verifier = NitroVerifier(nitro_pki.root)
    verifier.verify(doc, at=t0)
    outcomes = _sweep(lambda d: verifier.verify(d, at=t0), doc, range(len(doc)))
    assert sum(outcomes.values()) == len(doc)
    assert outcomes.get("bad-signature") and outcomes.get("malformed")


def _vector_offsets(doc: bytes, index: int) -> list[int]:
    """Every byte of the envelope, protected header, module_id/digest/timestamp, the PCR map
    head and the signature; a stride-23 walk (phase per document) over the rest, which is PCR
    values and certificate bytes (the builder-document test covers every byte of those kinds).
    R3E_FULL_SWEEP=1: every byte of every real document (about a minute)."""
    if os.environ.get("R3E_FULL_SWEEP") == "1":
        return list(range(len(doc)))
    head = set(range(min(len(doc), 400)))
    tail = set(range(len(doc) - 110, len(doc)))
    body = set(range(index % 23, len(doc), 23))
    return sorted(head | tail | body)


def test_sweep_real_nitro_documents(nitro_case: dict[str, Any] | None, vectors_dir: Path, vec: Any) -> None:
    valid_case = nitro_case
    assert valid_case is not None
    doc = vec.binary(valid_case, vectors_dir)
    at = vec.at(valid_case)
    root = vectors_dir / valid_case["trust_root"]
    verifier = NitroVerifier(root)
    verifier.verify(doc, at=at)
    offsets = _vector_offsets(doc, len(valid_case["id"]))
    outcomes = _sweep(lambda d: verifier.verify(d, at=at), doc, offsets)
    assert sum(outcomes.values()) == len(offsets)


def test_real_document_base64_roundtrip(vectors_dir: Path) -> None:
    path = vectors_dir / "nitro/evervault-attestation-doc-validation/valid-attestation-doc-base64"
    raw = base64.b64decode(b"".join(path.read_bytes().split()))
    assert parse_nitro_document(raw).module_id.startswith("i-0918f6c55e3b61d89")


def test_results_do_not_share_cached_containers(nitro_pki: NitroPki, t0: datetime) -> None:
    verifier = NitroVerifier(nitro_pki.root)
    doc = make_doc(nitro_pki, t0)
    first = verifier.verify(doc, at=t0)
    first.claims["pcrs"]["0"] = "tampered"  # type: ignore[index]
    first.details["pcrs"]["0"] = "tampered"
    second = verifier.verify(doc, at=t0)
    assert second.claims["pcrs"]["0"] == "10" * 48 and second.details["pcrs"]["0"] == "10" * 48


def test_unknown_critical_header_is_rejected(nitro_pki: NitroPki, t0: datetime) -> None:
    """RFC 9052 section 3.1: a document whose ``crit`` names a header the verifier does not
    process is rejected, even though its signature verifies; the same document without it passes."""
    payload = cbor2.dumps(_payload(nitro_pki, t0))

    def signed(protected: dict[object, object]) -> bytes:
        raw = cbor2.dumps(protected)
        der = nitro_pki.leaf_key.sign(sig_structure(raw, payload), ec.ECDSA(hashes.SHA384()))
        return cbor2.dumps([raw, {}, payload, ecdsa_der_to_raw(der, 48)])

    verifier = NitroVerifier(nitro_pki.root)
    assert verifier.verify(signed({1: -35}), at=t0).claims["nonce"] == NONCE.hex()
    with pytest.raises(EvidenceFormatError, match="does not understand") as info:
        verifier.verify(signed({1: -35, 2: [99], 99: True}), at=t0)
    assert info.value.field == "nitro.cose_sign1.protected.crit"
