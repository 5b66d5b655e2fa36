"""IAS reports: builder-made acceptance and rejections, container forms, byte sweeps over real
reports, and the IAS client against a local fake IAS (errors, timeouts: never hangs)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r3e_tee.attestation.ias import IasClient, IasVerifier, verify_ias
from r3e_tee.attestation.pinned_roots_nitro_ias import AWS_NITRO_ROOT_G1
from r3e_tee.attestation.verify import verify_evidence
from r3e_tee.errors import CollateralError, EvidenceFormatError, Reason, VerificationError
from r3e_tee.evidence.ias import (
    IasPki,
    build_ias_json,
    build_quote_body,
    build_ra_tls_cert,
    parse_ias_evidence,
    parse_ias_report,
)

MRENCLAVE = bytes(range(32))
MRSIGNER = bytes(range(32, 64))
REPORT_DATA = bytes(range(64))


def make_report(pki: IasPki, t0: datetime, *, debug: bool = False, **kw: Any) -> tuple[bytes, bytes]:
    quote = build_quote_body(
        mrenclave=MRENCLAVE, mrsigner=MRSIGNER, isv_prod_id=3, isv_svn=7, report_data=REPORT_DATA, debug=debug
    )
    return pki.report(quote, timestamp=t0, **kw)


def make_cert(pki: IasPki, t0: datetime, *, form: str = "pipe", **kw: Any) -> bytes:
    body, sig = make_report(pki, t0, **kw)
    return build_ra_tls_cert(body, sig, pki.signing_der, form=form, not_before=t0)


# --- acceptance ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["pipe", "json"])
def test_ra_tls_forms_verify(ias_pki: IasPki, t0: datetime, form: str) -> None:
    cert = make_cert(ias_pki, t0, form=form, advisory_ids=["INTEL-SA-00334"], status="SW_HARDENING_NEEDED")
    result = verify_evidence(cert, at=t0 + timedelta(seconds=30), trust_root=ias_pki.ca)
    assert result.kind.value == "sgx-ias"
    assert result.tcb_status == "SW_HARDENING_NEEDED" and result.advisories == ("INTEL-SA-00334",)
    claims = dict(result.claims)
    assert claims.pop("timestamp").startswith(t0.strftime("%Y-%m-%dT%H:%M:%S"))
    assert claims == {
        "isvEnclaveQuoteStatus": "SW_HARDENING_NEEDED",
        "advisoryIDs": ["INTEL-SA-00334"],
        "mrenclave": MRENCLAVE.hex(),
        "mrsigner": MRSIGNER.hex(),
        "isv_prod_id": 3,
        "isv_svn": 7,
        "debug": False,
        "report_data": REPORT_DATA.hex(),
    }
    assert result.details["encoding"] == "ra-tls-cert" and result.details["container"] == "ra-tls-cert"


@pytest.mark.parametrize("byte_arrays", [False, True])
def test_json_container_and_text_encodings(ias_pki: IasPki, t0: datetime, byte_arrays: bool) -> None:
    body, sig = make_report(ias_pki, t0, nonce="n-123")
    container = build_ias_json(body, sig, [ias_pki.signing_der], byte_arrays=byte_arrays)
    result = verify_evidence(container, at=t0, trust_root=ias_pki.ca)
    assert result.claims["nonce"] == "n-123" and result.details["encoding"] == "json"
    # the report JSON as a string and the signing chain as a PEM bundle
    pem = ias_pki.signing_cert.public_bytes(Encoding.PEM) + ias_pki.ca.public_bytes(Encoding.PEM)
    doc = {"report": body.decode(), "signature": base64.b64encode(sig).decode(), "signing_cert": pem.decode()}
    assert verify_evidence(json.dumps(doc).encode(), at=t0, trust_root=ias_pki.ca).claims["nonce"] == "n-123"
    # RA-TLS certificate as base64 text
    cert_b64 = base64.b64encode(make_cert(ias_pki, t0))
    assert verify_evidence(cert_b64, at=t0, trust_root=ias_pki.ca).details["encoding"] == "base64+ra-tls-cert"


# --- rejections ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ("SIGNATURE_INVALID", Reason.BAD_SIGNATURE),
        ("GROUP_REVOKED", Reason.REVOKED),
        ("SIGNATURE_REVOKED", Reason.REVOKED),
        ("KEY_REVOKED", Reason.REVOKED),
        ("SIGRL_VERSION_MISMATCH", Reason.COLLATERAL_MISMATCH),
    ],
)
def test_rejected_quote_statuses(ias_pki: IasPki, t0: datetime, status: str, reason: Reason) -> None:
    with pytest.raises(VerificationError) as info:
        verify_ias(make_cert(ias_pki, t0, status=status), at=t0, trust_root=ias_pki.ca)
    assert info.value.reason == reason and info.value.observed == status


def test_tcb_status_and_advisory_policy(ias_pki: IasPki, t0: datetime) -> None:
    cert = make_cert(
        ias_pki, t0, status="GROUP_OUT_OF_DATE", advisory_ids=["INTEL-SA-00161", "INTEL-SA-00219"]
    )
    assert verify_evidence(cert, at=t0, trust_root=ias_pki.ca).tcb_status == "GROUP_OUT_OF_DATE"
    with pytest.raises(VerificationError) as info:
        verify_evidence(cert, at=t0, trust_root=ias_pki.ca, policy={"tcb_statuses": ["UpToDate"]})
    assert info.value.reason == Reason.TCB_STATUS_NOT_ALLOWED and info.value.observed == "GROUP_OUT_OF_DATE"
    verify_evidence(cert, at=t0, trust_root=ias_pki.ca, policy={"tcb_statuses": ["GROUP_OUT_OF_DATE"]})
    with pytest.raises(VerificationError) as info:
        verify_evidence(cert, at=t0, trust_root=ias_pki.ca, policy={"denied_advisories": ["INTEL-SA-00219"]})
    assert info.value.reason == Reason.ADVISORY_NOT_ALLOWED
    with pytest.raises(VerificationError) as info:
        verify_evidence(cert, at=t0, trust_root=ias_pki.ca, policy={"allowed_advisories": ["INTEL-SA-00161"]})
    assert info.value.reason == Reason.ADVISORY_NOT_ALLOWED and info.value.observed == "INTEL-SA-00219"


def test_signing_certificate_validity(ias_pki: IasPki, t0: datetime) -> None:
    cert = make_cert(ias_pki, t0)
    na = ias_pki.signing_cert.not_valid_after_utc
    nb = ias_pki.signing_cert.not_valid_before_utc
    verify_ias(cert, at=na, trust_root=ias_pki.ca)
    with pytest.raises(VerificationError) as info:
        verify_ias(cert, at=na + timedelta(seconds=1), trust_root=ias_pki.ca)
    assert info.value.reason == Reason.EXPIRED
    with pytest.raises(VerificationError) as info:
        verify_ias(cert, at=nb - timedelta(seconds=1), trust_root=ias_pki.ca)
    assert info.value.reason == Reason.NOT_YET_VALID


def test_wrong_root(ias_pki: IasPki, t0: datetime) -> None:
    cert = make_cert(ias_pki, t0)
    for root in (None, AWS_NITRO_ROOT_G1):  # the pinned Intel CA, then an unrelated root
        with pytest.raises(VerificationError) as info:
            verify_ias(cert, at=t0, trust_root=root)
        assert info.value.reason == Reason.BAD_CHAIN


def test_report_signature_by_another_key(ias_pki: IasPki, t0: datetime) -> None:
    body, _ = make_report(ias_pki, t0)
    _, other_sig = make_report(ias_pki, t0 + timedelta(seconds=1))
    with pytest.raises(VerificationError) as info:
        verify_ias(build_ias_json(body, other_sig, [ias_pki.signing_der]), at=t0, trust_root=ias_pki.ca)
    assert info.value.reason == Reason.BAD_SIGNATURE


def test_identity_binding_and_age_policies(ias_pki: IasPki, t0: datetime) -> None:
    cert = make_cert(ias_pki, t0, nonce="abc")
    ok = {
        "mrenclave": [MRENCLAVE.hex(), "ff" * 32],
        "mrsigner": MRSIGNER.hex(),
        "isv_prod_id": 3,
        "min_isv_svn": 7,
        "report_data": REPORT_DATA.hex(),
        "report_data_prefix": REPORT_DATA[:32].hex(),
        "nonce": b"abc".hex(),
        "max_age": 60,
    }
    verify_evidence(cert, at=t0 + timedelta(seconds=10), trust_root=ias_pki.ca, policy=ok)
    cases: list[tuple[dict[str, Any], Reason, str]] = [
        ({"mrenclave": "ee" * 32}, Reason.MEASUREMENT_MISMATCH, "policy.mrenclave"),
        ({"mrsigner": ["ee" * 32]}, Reason.MEASUREMENT_MISMATCH, "policy.mrsigner"),
        ({"isv_prod_id": 4}, Reason.MEASUREMENT_MISMATCH, "policy.isv_prod_id"),
        ({"min_isv_svn": 8}, Reason.MEASUREMENT_MISMATCH, "policy.min_isv_svn"),
        ({"report_data": "00" * 64}, Reason.REPORT_DATA_MISMATCH, "policy.report_data"),
        ({"report_data_prefix": "0001ff"}, Reason.REPORT_DATA_MISMATCH, "policy.report_data_prefix"),
        ({"nonce": b"abd".hex()}, Reason.NONCE_MISMATCH, "policy.nonce"),
        ({"max_age": 5}, Reason.EVIDENCE_TOO_OLD, "policy.max_age"),
        ({"mr_td": "00" * 48}, Reason.KIND_NOT_ALLOWED, "policy.mr_td"),
        ({"kinds": ["nitro"]}, Reason.KIND_NOT_ALLOWED, "policy.kinds"),
    ]
    for policy, reason, check in cases:
        with pytest.raises(VerificationError) as info:
            verify_evidence(cert, at=t0 + timedelta(seconds=10), trust_root=ias_pki.ca, policy=policy)
        assert (info.value.reason, info.value.check) == (reason, check), policy
        assert info.value.observed is not None and info.value.expected is not None


def test_debug_enclave(ias_pki: IasPki, t0: datetime) -> None:
    cert = make_cert(ias_pki, t0, debug=True)
    with pytest.raises(VerificationError) as info:
        verify_evidence(cert, at=t0, trust_root=ias_pki.ca)
    assert info.value.reason == Reason.DEBUG_ENCLAVE
    assert verify_evidence(cert, at=t0, trust_root=ias_pki.ca, policy={"allow_debug": True}).debug


# --- format ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.pop("id"), "ias.report.id"),
        (lambda d: d.update(version=9), "ias.report.version"),
        (lambda d: d.update(version="4"), "ias.report.version"),
        (lambda d: d.update(isvEnclaveQuoteStatus="FINE"), "ias.report.isvEnclaveQuoteStatus"),
        (
            lambda d: d.update(isvEnclaveQuoteBody=base64.b64encode(b"x" * 431).decode()),
            "ias.isvEnclaveQuoteBody",
        ),
        (lambda d: d.update(isvEnclaveQuoteBody="!!"), "ias.report.isvEnclaveQuoteBody"),
        (lambda d: d.update(timestamp="yesterday"), "ias.report.timestamp"),
        (lambda d: d.update(advisoryIDs=[1]), "ias.report.advisoryIDs"),
        (lambda d: d.update(nonce="n" * 33), "ias.report.nonce"),
    ],
)
def test_report_fields_are_checked(ias_pki: IasPki, t0: datetime, edit: Any, field: str) -> None:
    body, _ = make_report(ias_pki, t0)
    doc = json.loads(body)
    edit(doc)
    new = json.dumps(doc).encode()
    sig = ias_pki.signing_key.sign(new, *_pkcs1())
    with pytest.raises(EvidenceFormatError) as info:
        parse_ias_report(new, sig, [ias_pki.signing_der])
    assert info.value.field == field


def _pkcs1() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.PKCS1v15(), hashes.SHA256()


def test_container_errors(ias_pki: IasPki, t0: datetime) -> None:
    body, sig = make_report(ias_pki, t0)
    bad = [
        (b'{"report": "x"}', "ias.container.signature"),
        (b'{"report": 5, "signature": "", "signing_cert": ""}', "ias.container.report"),
        (b'{"a": 1, "a": 2}', "ias.container"),
        (b"{not json", "ias.container"),
    ]
    for data, field in bad:
        with pytest.raises(EvidenceFormatError) as info:
            parse_ias_evidence(data)
        assert info.value.field == field
    with pytest.raises(EvidenceFormatError, match="duplicate"):
        parse_ias_report(b'{"id": "1", "id": "2"}', sig, [ias_pki.signing_der])
    with pytest.raises(EvidenceFormatError, match="report extension"):
        from r3e_tee.evidence.ias import parse_ra_tls_cert

        parse_ra_tls_cert(ias_pki.signing_der)


# --- sweeps -----------------------------------------------------------------------------------------------


def _sweep_report(verifier: IasVerifier, report: Any, at: datetime) -> int:
    """Flip one bit at every byte of the signed JSON and of the signature."""
    n = 0
    for region in ("body", "signature"):
        raw: bytes = getattr(report, region)
        for i in range(len(raw)):
            bad = bytearray(raw)
            bad[i] ^= 1 << (i % 8)
            try:
                if region == "body":
                    mutated = parse_ias_report(bytes(bad), report.signature, report.signing_chain)
                else:
                    mutated = replace(report, signature=bytes(bad))
                verifier.verify(mutated, at=at)
            except (VerificationError, EvidenceFormatError):
                n += 1
            else:
                pytest.fail(f"a change at {region}[{i}] was accepted")
    return n


def test_sweep_builder_report(ias_pki: IasPki, t0: datetime) -> None:
    verifier = IasVerifier(ias_pki.ca)
    report = parse_ias_evidence(make_cert(ias_pki, t0, advisory_ids=["INTEL-SA-00001"], nonce="x"))
    verifier.verify(report, at=t0)
    assert _sweep_report(verifier, report, t0) == len(report.body) + len(report.signature)


def test_sweep_real_reports(ias_case: dict[str, Any] | None, vectors_dir: Path, vec: Any) -> None:
    assert ias_case is not None
    verifier = IasVerifier(vectors_dir / ias_case["trust_root"])
    report = verifier.parse(vec.binary(ias_case, vectors_dir))
    verifier.verify(report, at=vec.at(ias_case))
    assert _sweep_report(verifier, report, vec.at(ias_case)) == len(report.body) + len(report.signature)


def test_truncated_ra_tls_certs_are_malformed(ias_pki: IasPki, t0: datetime) -> None:
    cert = make_cert(ias_pki, t0)
    for n in range(0, len(cert), 3):
        with pytest.raises(EvidenceFormatError):
            verify_evidence(cert[:n], at=t0, trust_root=ias_pki.ca, kind="ias")


# --- the IAS client against a local fake IAS ------------------------------------------------------


class FakeIas:
    """Answers like IAS v4 (signed by the test PKI); ``mode`` selects misbehaviour."""

    def __init__(self, pki: IasPki, t0: datetime) -> None:
        self.pki, self.t0, self.mode = pki, t0, "ok"
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.requests.append(
                    {"path": self.path, "key": self.headers.get("Ocp-Apim-Subscription-Key")}
                )
                body = base64.b64encode(b"sigrl-bytes") if self.path.endswith("/sigrl/00000b0a") else b""
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                req = json.loads(self.rfile.read(length))
                fake.requests.append(
                    {"path": self.path, "key": self.headers.get("Ocp-Apim-Subscription-Key"), **req}
                )
                if fake.mode == "slow":
                    time.sleep(3)
                if self.headers.get("Ocp-Apim-Subscription-Key") != "test-key" or fake.mode == "401":
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                quote = base64.b64decode(req["isvEnclaveQuote"])
                if len(quote) < 432 or fake.mode == "400":
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body, sig = fake.pki.report(quote[:432], timestamp=fake.t0, nonce=req.get("nonce"))
                chain = fake.pki.signing_cert.public_bytes(Encoding.PEM) + fake.pki.ca.public_bytes(
                    Encoding.PEM
                )
                self.send_response(503 if fake.mode == "503" else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Request-ID", "req-1")
                if fake.mode != "nosig":
                    self.send_header("X-IASReport-Signature", base64.b64encode(sig).decode())
                self.send_header("X-IASReport-Signing-Certificate", urllib.parse.quote(chain.decode()))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fake.mode == "drip":
                    try:
                        for b in body:
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                            time.sleep(0.05)
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the client gave up, as it should
                else:
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/sgx/attestation/v4"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_ias(ias_pki: IasPki, t0: datetime) -> Iterator[FakeIas]:
    fake = FakeIas(ias_pki, t0)
    yield fake
    fake.close()


def _epid_quote() -> bytes:
    body = build_quote_body(mrenclave=MRENCLAVE, mrsigner=MRSIGNER, report_data=REPORT_DATA)
    return body + (680).to_bytes(4, "little") + b"\x00" * 680


def test_client_report_roundtrip(fake_ias: FakeIas, ias_pki: IasPki, t0: datetime) -> None:
    client = IasClient(fake_ias.url, "test-key", timeout=5)
    report = client.report(_epid_quote(), nonce="nonce-1")
    assert fake_ias.requests[-1]["key"] == "test-key" and fake_ias.requests[-1]["path"].endswith("/report")
    assert fake_ias.requests[-1]["nonce"] == "nonce-1"
    result = IasVerifier(ias_pki.ca).verify(report, at=t0)
    assert result.claims["mrenclave"] == MRENCLAVE.hex() and result.claims["nonce"] == "nonce-1"
    assert client.sigrl(bytes.fromhex("0a0b0000")) == b"sigrl-bytes"
    assert "test-key" not in repr(client)


@pytest.mark.parametrize(
    ("mode", "error", "words"),
    [
        ("401", CollateralError, "API key"),
        ("400", EvidenceFormatError, "invalid attestation evidence"),
        ("503", CollateralError, "HTTP 503"),
        ("nosig", CollateralError, "X-IASReport-Signature"),
    ],
)
def test_client_errors(fake_ias: FakeIas, mode: str, error: type[Exception], words: str) -> None:
    fake_ias.mode = mode
    with pytest.raises(error, match=words) as info:
        IasClient(fake_ias.url, "test-key", timeout=5).report(_epid_quote())
    assert "test-key" not in str(info.value)


def test_client_unreachable_and_timeouts_never_hang(fake_ias: FakeIas) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    start = time.monotonic()
    with pytest.raises(CollateralError, match="unreachable"):
        IasClient(f"http://127.0.0.1:{port}/v4", "k", timeout=2).report(_epid_quote())
    for mode in ("slow", "drip"):
        fake_ias.mode = mode
        t = time.monotonic()
        with pytest.raises(CollateralError, match="within"):
            IasClient(fake_ias.url, "test-key", timeout=0.5).report(_epid_quote())
        assert time.monotonic() - t < 2.5, mode
    assert time.monotonic() - start < 8


@given(st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_ias_evidence_never_crashes(ias_pki: IasPki, t0: datetime, data: st.DataObject) -> None:
    forms = _FUZZ.setdefault(
        "forms", [make_cert(ias_pki, t0), build_ias_json(*make_report(ias_pki, t0), [ias_pki.signing_der])]
    )
    raw = bytearray(data.draw(st.sampled_from(forms)))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        verify_evidence(bytes(raw), at=t0, trust_root=ias_pki.ca)
    except (VerificationError, EvidenceFormatError):
        pass


_FUZZ: dict[str, list[bytes]] = {}


def test_client_from_provider_config(fake_ias: FakeIas) -> None:
    from r3e_tee.config import ProviderAttestation

    cfg = ProviderAttestation.model_validate({"service": fake_ias.url, "apiKey": "test-key"})
    client = IasClient.from_provider(cfg, timeout=5)
    assert client.report(_epid_quote()).quote.mrenclave == MRENCLAVE
    assert "test-key" not in repr(client)
