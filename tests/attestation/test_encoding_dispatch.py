"""Encoding and kind detection, and the dispatcher's routing, on builder-made and real evidence."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from r3e_tee.attestation.verify import Verifier, inspect_evidence, resolve_kind, verify_evidence
from r3e_tee.errors import CollateralError, EvidenceFormatError, VerificationError
from r3e_tee.evidence.encoding import build_scale_versioned, build_x509_san_hex_cert, decode_evidence
from r3e_tee.evidence.nitro import NitroPki

PCRS = {0: b"\x01" * 48, 1: b"\x02" * 48, 2: b"\x03" * 48, 8: b"\x04" * 48}


@pytest.fixture(scope="module")
def doc(nitro_pki: NitroPki, t0: datetime) -> bytes:
    return nitro_pki.document(pcrs=PCRS, timestamp=t0)


def test_text_encodings_of_a_nitro_document(doc: bytes, nitro_pki: NitroPki, t0: datetime) -> None:
    b64 = base64.b64encode(doc)
    forms = {
        b"0x" + doc.hex().upper().encode(): "hex+binary",
        "\n".join(doc.hex()[i : i + 64] for i in range(0, len(doc) * 2, 64)).encode(): "hex+binary",
        b64: "base64+binary",
        b64.rstrip(b"="): "base64+binary",
        base64.urlsafe_b64encode(doc): "base64+binary",
        b"\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)) + b"\n": "base64+binary",
        b"-----BEGIN ATTESTATION DOCUMENT-----\n"
        + b64
        + b"\n-----END ATTESTATION DOCUMENT-----\n": "pem+binary",
        build_scale_versioned("nitro", doc) + b"ignored": "scale",
        doc: "binary",
    }
    for data, label in forms.items():
        decoded = decode_evidence(data)
        assert (decoded.kind, decoded.data, decoded.encoding_label) == ("nitro", doc, label)
        result = verify_evidence(data, at=t0, trust_root=nitro_pki.root)
        assert result.details["encoding"] == label


def test_certificate_container(doc: bytes, nitro_pki: NitroPki, t0: datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = build_x509_san_hex_cert(doc, key=key, not_before=t0, not_after=t0 + timedelta(days=1))
    assert decode_evidence(der).encoding_label == "x509-san-hex+binary"
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"
    decoded = decode_evidence(pem)
    assert (decoded.data, decoded.encoding_label) == (doc, "pem+x509-san-hex+binary")
    verify_evidence(pem, at=t0, trust_root=nitro_pki.root)


def test_scale_length_modes() -> None:
    for size in (10, 100, 20000):
        payload = b"\x84" + b"\x00" * (size - 1)
        assert decode_evidence(build_scale_versioned("nitro", payload)).data == payload
    with pytest.raises(EvidenceFormatError, match="exceeds"):
        decode_evidence(b"\x00\x02" + (1000 << 2 | 1).to_bytes(2, "little") + b"\x84")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"", "evidence"),
        (b"   \n", "evidence.text"),
        (b"not hex and not base64 !", "evidence.text"),
        (b"\x01\x02\x03", "evidence"),
        (b"\x30\x03\x02\x01", "x509"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n", "pem"),
    ],
)
def test_unrecognised_input_is_a_format_error(data: bytes, field: str) -> None:
    with pytest.raises(EvidenceFormatError) as info:
        verify_evidence(data)
    assert info.value.field == field


def test_forced_kind(doc: bytes, nitro_pki: NitroPki, t0: datetime) -> None:
    verify_evidence(doc, kind="nitro", at=t0, trust_root=nitro_pki.root)
    with pytest.raises(EvidenceFormatError, match="not sgx-ias"):
        verify_evidence(doc, kind="ias", at=t0)
    # bytes matching nothing go to the forced kind's parser, which says exactly what is wrong
    with pytest.raises(EvidenceFormatError) as info:
        verify_evidence(b"\x01" * 50, kind="snp")
    assert info.value.field == "snp.report"
    assert resolve_kind("auto") is None and resolve_kind("SNP") is not None
    with pytest.raises(ValueError, match="unknown evidence kind"):
        resolve_kind("tpm")


def test_collateral_rules(doc: bytes, nitro_pki: NitroPki, t0: datetime) -> None:
    with pytest.raises(CollateralError, match="no collateral"):
        verify_evidence(doc, at=t0, trust_root=nitro_pki.root, collateral=b"{}")


def test_inspect_without_verifying(doc: bytes) -> None:
    seen = inspect_evidence(base64.b64encode(doc))
    assert seen.kind.value == "nitro" and seen.encoding == "base64+binary"
    assert seen.claims is not None and seen.claims["pcrs"]["0"] == "01" * 48


@given(st.binary(max_size=300))
@settings(max_examples=400, deadline=None)
def test_dispatcher_never_crashes_on_random_input(data: bytes) -> None:
    try:
        Verifier().verify(data)
    except (EvidenceFormatError, VerificationError, CollateralError):
        pass


def test_real_vectors_detected(vectors_dir: Path) -> None:
    ev = "nitro/evervault-attestation-doc-validation/"
    cage = ev + "non-debug-cert-containing-attestation-document-18-1-23"
    expect = {
        "nitro/eternis-remote-attestation-verifier/example_attestation.b64": ("nitro", "base64+binary"),
        cage + ".pem": ("nitro", "pem+x509-san-hex+binary"),
        cage + "-der.crt": ("nitro", "x509-san-hex+binary"),
        "sgx-ias/integritee-pallets/ra_dump_cert_TEST8_PRODUCTION.der": ("sgx-ias", "ra-tls-cert"),
        "sev-snp/virtee-sev/report_milan.hex": ("sev-snp", "hex+binary"),
        "sgx-dcap/phala-dcap-qvl/sgx_quote": ("sgx-dcap", "binary"),
        "tdx-dcap/phala-dcap-qvl/tdx-quote.hex": ("tdx-dcap", "hex+binary"),
    }
    for path, (kind, label) in expect.items():
        decoded = decode_evidence((vectors_dir / path).read_bytes())
        assert (decoded.kind, decoded.encoding_label) == (kind, label), path
    derived = vectors_dir / ev / "extracted_from_non-debug-cert.cose"
    container = vectors_dir / (cage + ".pem")
    assert decode_evidence(container.read_bytes()).data == derived.read_bytes()


def test_verifier_trust_roots_and_dcap_routing(
    doc: bytes, nitro_pki: NitroPki, t0: datetime, vectors_dir: Path
) -> None:
    from r3e_tee.attestation.result import EvidenceKind

    verifier = Verifier(trust_roots={EvidenceKind.NITRO: nitro_pki.root})
    assert verifier.verify(doc, at=t0).kind == EvidenceKind.NITRO
    quote = (vectors_dir / "sgx-dcap/phala-dcap-qvl/sgx_quote").read_bytes()
    with pytest.raises(CollateralError, match="collateral"):
        verifier.verify(quote, at=t0)
    coll = vectors_dir / "sgx-dcap/phala-dcap-qvl/sgx_quote_collateral.json"
    result = verifier.verify(
        quote, kind="sgx", collateral=coll, at=datetime.fromisoformat("2025-07-01T00:00:00+00:00")
    )
    assert result.kind == EvidenceKind.SGX_DCAP and result.tcb_status == "ConfigurationAndSWHardeningNeeded"
