"""Collateral: formats (TCB Info, QE Identity, PCS responses, bundles), the PCS/PCCS client
against a local fake PCS, the cache protocol, and failing fast when offline."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from dcap_vectors import NOW
from hypothesis import given, settings
from hypothesis import strategies as st

from r3e_tee.attestation.collateral import (
    CollateralCache,
    MemoryCollateralCache,
    PcsClient,
    collateral_expiry,
    load_collateral,
    load_pcs_directory,
)
from r3e_tee.attestation.dcap import verify_dcap
from r3e_tee.errors import CollateralError, EvidenceFormatError
from r3e_tee.evidence.dcap_builder import DcapPlatform, build_sgx_quote, build_tdx_quote, build_test_platform
from r3e_tee.evidence.dcap_collateral import (
    QuoteCollateral,
    enclave_identity_json,
    parse_enclave_identity,
    parse_tcb_info,
    split_signed_response,
    tcb_info_json,
)

Platform = tuple[DcapPlatform, QuoteCollateral]
DAY = timedelta(days=1)

# --- formats -----------------------------------------------------------------------------------


def test_real_collateral_parses(vectors_dir: Path) -> None:
    files = sorted(vectors_dir.glob("*-dcap/**/*collateral*.json"))
    assert len(files) >= 10
    kinds = set()
    for f in files:
        c = load_collateral(f)
        info = parse_tcb_info(c.tcb_info)
        ident = parse_enclave_identity(c.qe_identity)
        kinds.add((info.id, info.version, ident.id))
        if info.id == "SGX" and '"category"' not in c.tcb_info:  # (component names are not kept)
            assert tcb_info_json(info).lower() == c.tcb_info.lower()  # our serialiser is Intel's form
        if ident.id == "QE":
            assert enclave_identity_json(ident) == c.qe_identity
        assert collateral_expiry(c) <= info.next_update
    assert {("SGX", 2, "QE"), ("SGX", 3, "QE"), ("TDX", 3, "TD_QE")} <= kinds


def test_raw_pcs_responses_match_the_bundle(vectors_dir: Path) -> None:
    d = vectors_dir / "tdx-dcap/google-go-tdx-guest"
    bundle = load_collateral(d / "derived_collateral_v4_dcapqvl_format.json")
    raw = QuoteCollateral.from_pcs_responses(
        tcb_info_response=(d / "sample_tcbInfo_response").read_bytes(),
        tcb_info_issuer_chain=(d / "tcb_info_issuer_chain.pem").read_text(),
        qe_identity_response=(d / "sample_qeIdentity_response").read_bytes(),
        qe_identity_issuer_chain=(d / "qe_identity_issuer_chain.pem").read_text(),
        pck_crl=(d / "pckcrl").read_bytes(),
        pck_crl_issuer_chain=quote((d / "pck_crl_issuer_chain.pem").read_text()),  # as the header sends it
        root_ca_crl=(d / "rootcrl.der").read_bytes().hex(),  # as a PCCS sends it
    )
    assert raw.tcb_info == bundle.tcb_info and raw.tcb_info_signature == bundle.tcb_info_signature
    assert raw.qe_identity == bundle.qe_identity and raw.pck_crl == bundle.pck_crl
    assert raw.root_ca_crl == bundle.root_ca_crl
    assert raw.pck_crl_issuer_chain.strip() == bundle.pck_crl_issuer_chain.strip()


def test_signed_member_is_sliced_verbatim() -> None:
    body = '{ "a" :[1, 2 ,{"b":"\\"}"}] }'
    text, sig = split_signed_response('{"tcbInfo":' + body + ' , "signature" : "0a0b"}', "tcbInfo")
    assert text == body and sig == b"\x0a\x0b"
    for bad in (
        '{"tcbInfo":{}}',
        '{"tcbInfo":{},"signature":"zz"}',
        "[]",
        '{"tcbInfo":{},"signature":5}',
        "{",
    ):
        with pytest.raises(EvidenceFormatError):
            split_signed_response(bad, "tcbInfo")


def test_checked_parser_names_the_json_path(sgx_platform: Platform) -> None:
    _, c = sgx_platform
    doc = json.loads(c.tcb_info)
    doc["tcbLevels"][0]["tcb"]["sgxtcbcomponents"][3]["svn"] = 256
    with pytest.raises(EvidenceFormatError) as info:
        parse_tcb_info(json.dumps(doc))
    assert info.value.field == "tcb_info.tcbLevels[0].tcb.sgxtcbcomponents[3].svn"
    doc = json.loads(c.qe_identity)
    doc["mrsigner"] = "00"
    with pytest.raises(EvidenceFormatError) as info:
        parse_enclave_identity(json.dumps(doc))
    assert info.value.field == "qe_identity.mrsigner"
    doc = json.loads(c.tcb_info)
    doc["tcbLevels"][0]["tcb"]["sgxtcbcomponents"][0]["svn"] = True  # a JSON boolean is not an SVN
    with pytest.raises(EvidenceFormatError):
        parse_tcb_info(json.dumps(doc))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(list('0{}[]",:9aZ\\ -')))
def test_fuzz_collateral_json(pos: int, ch: str) -> None:
    for text, parse in ((_FUZZ_TCB, parse_tcb_info), (_FUZZ_QE, parse_enclave_identity)):
        p = pos % len(text)
        mutated = text[:p] + ch + text[p + 1 :]
        try:
            parse(mutated)
        except EvidenceFormatError:
            pass


def _fuzz_texts() -> tuple[str, str]:
    _, c = build_test_platform(tee="tdx", now=NOW)
    return c.tcb_info, c.qe_identity


_FUZZ_TCB, _FUZZ_QE = _fuzz_texts()


def test_bundle_json_round_trip_and_errors(sgx_platform: Platform, tmp_path: Path) -> None:
    _, c = sgx_platform
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(c.to_json()))
    assert load_collateral(path) == c
    assert load_collateral(json.dumps(c.to_json())) == c
    assert QuoteCollateral.from_json({**c.to_json(), "pck_crl": list(c.pck_crl)}) == c  # byte arrays too
    with pytest.raises(CollateralError):
        load_collateral(tmp_path / "missing.json")
    with pytest.raises(CollateralError):
        load_collateral('{"pck_crl": "zz"}')


def test_pcs_directory(sgx_platform: Platform, tmp_path: Path) -> None:
    _, c = sgx_platform
    (tmp_path / "tcb_info.json").write_text(c.tcb_info_response())
    (tmp_path / "qe_identity.json").write_text(c.qe_identity_response())
    (tmp_path / "tcb_info_issuer_chain.pem").write_text(quote(c.tcb_info_issuer_chain))
    (tmp_path / "qe_identity_issuer_chain.pem").write_text(c.qe_identity_issuer_chain)
    (tmp_path / "pck_crl_issuer_chain.pem").write_text(c.pck_crl_issuer_chain)
    (tmp_path / "pck_crl.der").write_bytes(c.pck_crl)
    (tmp_path / "root_ca_crl.der").write_bytes(c.root_ca_crl)
    assert load_pcs_directory(tmp_path) == c
    assert load_collateral(tmp_path) == c
    (tmp_path / "pck_crl.der").unlink()
    with pytest.raises(CollateralError, match="pck_crl.der"):
        load_pcs_directory(tmp_path)


# --- cache -------------------------------------------------------------------------------------


class _Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


def test_memory_cache_expiry_and_bound() -> None:
    clock = _Clock(NOW)
    cache = MemoryCollateralCache(max_entries=2, clock=clock)
    assert isinstance(cache, CollateralCache)
    cache.put("a", b"1", NOW + DAY)
    cache.put("b", b"2", NOW + 2 * DAY)
    assert cache.get("a") == b"1" and cache.get("missing") is None
    cache.put("c", b"3", NOW + 3 * DAY)  # evicts the entry that expires first
    assert cache.get("a") is None and cache.get("c") == b"3"
    clock.t = NOW + 2 * DAY + timedelta(seconds=1)
    assert cache.get("b") is None and cache.get("c") == b"3"


# --- a fake PCS --------------------------------------------------------------------------------


class FakePcs:
    """Serves one platform's collateral on the Intel PCS v4 paths, with issuer-chain headers."""

    def __init__(
        self, sgx: QuoteCollateral, tdx: QuoteCollateral, *, hex_root_crl: bool = False, delay: float = 0
    ) -> None:
        self.collateral = {"sgx": sgx, "tdx": tdx}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.hex_root_crl = hex_root_crl
        self.delay = delay
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.requests.append((self.path, dict(self.headers)))
                if fake.delay:
                    time.sleep(fake.delay)
                status, headers, body = fake.answer(self.path)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        parts = url.path.strip("/").split("/")
        if parts[:1] == ["sgx"] and parts[-1] == "rootcacrl":
            crl = self.collateral["sgx"].root_ca_crl
            return 200, {}, crl.hex().encode() if self.hex_root_crl else crl
        if len(parts) < 4 or parts[1:3] != ["certification", "v4"] or parts[0] not in self.collateral:
            return 404, {"Error-Message": "no such resource"}, b""
        c = self.collateral[parts[0]]
        res = "/".join(parts[3:])
        if res == "pckcrl" and q.get("ca") in ("processor", "platform") and q.get("encoding") == "der":
            return 200, {"SGX-PCK-CRL-Issuer-Chain": quote(c.pck_crl_issuer_chain)}, c.pck_crl
        if res == "tcb":
            if q.get("fmspc", "").upper() != json.loads(c.tcb_info)["fmspc"].upper():
                return 404, {}, b""
            return (
                200,
                {"TCB-Info-Issuer-Chain": quote(c.tcb_info_issuer_chain)},
                c.tcb_info_response().encode(),
            )
        if res == "qe/identity":
            return (
                200,
                {"SGX-Enclave-Identity-Issuer-Chain": quote(c.qe_identity_issuer_chain)},
                c.qe_identity_response().encode(),
            )
        return 404, {}, b""


@pytest.fixture(scope="module")
def one_pki() -> tuple[Platform, Platform]:
    """An SGX and a TDX platform under one root, PCK CA and TCB signing key, as with Intel."""
    sgx = build_test_platform(tee="sgx", now=NOW)
    p = sgx[0]
    tdx = build_test_platform(
        tee="tdx", now=NOW, root_key=p.root_key, pck_ca_key=p.pck_ca_key, tcb_signing_key=p.tcb_signing_key
    )
    return sgx, tdx


@pytest.fixture
def fake_pcs(one_pki: tuple[Platform, Platform]) -> Iterator[FakePcs]:
    fake = FakePcs(one_pki[0][1], one_pki[1][1], hex_root_crl=True)
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def test_client_fetches_and_verifies(fake_pcs: FakePcs, one_pki: tuple[Platform, Platform]) -> None:
    sgx_platform, tdx_platform = one_pki
    with PcsClient(fake_pcs.url + "/sgx/certification/v4/", api_key="k-123") as client:
        for platform, quote in (
            (sgx_platform[0], build_sgx_quote(sgx_platform[0])),
            (tdx_platform[0], build_tdx_quote(tdx_platform[0])),
        ):
            coll = client.get_collateral_for_quote(quote)
            res = verify_dcap(quote, coll, at=NOW, trust_root=platform.root_cert_pem)
            assert res.tcb_status == "UpToDate"
    paths = [p for p, _ in fake_pcs.requests]
    assert "/sgx/certification/v4/pckcrl?ca=processor&encoding=der" in paths
    assert "/sgx/certification/v4/tcb?fmspc=00906ED50000" in paths
    assert "/tdx/certification/v4/tcb?fmspc=00906ED50000" in paths
    assert "/tdx/certification/v4/qe/identity" in paths and "/sgx/certification/v4/rootcacrl" in paths
    assert all(h.get("Ocp-Apim-Subscription-Key") == "k-123" for _, h in fake_pcs.requests)


def test_client_cache_until_next_update(fake_pcs: FakePcs) -> None:
    clock = _Clock(NOW)
    cache = MemoryCollateralCache(clock=clock)
    client = PcsClient(fake_pcs.url, cache=cache, clock=clock)
    a = client.get_collateral(fmspc=bytes.fromhex("00906ed50000"), ca="processor", tee="sgx")
    n = len(fake_pcs.requests)
    b = client.get_collateral(fmspc="00906ed50000", ca="processor", tee="sgx")
    assert a == b and len(fake_pcs.requests) == n  # served from the cache
    # a second client sharing the cache (another replica) does not fetch either
    assert (
        PcsClient(fake_pcs.url, cache=cache, clock=clock).get_collateral(
            fmspc="00906ED50000", ca="processor", tee="sgx"
        )
        == a
    )
    assert len(fake_pcs.requests) == n
    clock.t = NOW + 31 * DAY  # past nextUpdate: fetched again
    client.get_collateral(fmspc="00906ED50000", ca="processor", tee="sgx")
    assert len(fake_pcs.requests) == 2 * n
    client.close()


def test_client_http_errors_name_the_url(fake_pcs: FakePcs) -> None:
    with PcsClient(fake_pcs.url) as client, pytest.raises(CollateralError) as info:
        client.get_collateral(fmspc="AABBCCDDEEFF", ca="processor", tee="sgx")
    assert "tcb?fmspc=AABBCCDDEEFF" in str(info.value) and "404" in str(info.value)


def test_client_times_out_fast(sgx_platform: Platform, tdx_platform: Platform) -> None:
    slow = FakePcs(sgx_platform[1], tdx_platform[1], delay=3)
    slow.thread.start()
    try:
        t0 = time.monotonic()
        with (
            PcsClient(slow.url, connect_timeout=0.5, read_timeout=0.3) as client,
            pytest.raises(CollateralError) as info,
        ):
            client.get_collateral(fmspc="00906ED50000", ca="processor", tee="sgx")
        assert time.monotonic() - t0 < 2.5
        assert "timed out" in str(info.value) and slow.url in str(info.value)
    finally:
        slow.server.shutdown()
        slow.server.server_close()


def test_client_unreachable_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    t0 = time.monotonic()
    client = PcsClient(f"http://127.0.0.1:{port}", connect_timeout=0.5, read_timeout=0.5)
    with client, pytest.raises(CollateralError) as info:
        client.get_collateral(fmspc="00906ED50000", ca="processor", tee="sgx")
    assert time.monotonic() - t0 < 2
    assert f"127.0.0.1:{port}/sgx/certification/v4/pckcrl" in str(info.value)
    assert info.value.hint


def test_intel_pcs_defaults() -> None:
    client = PcsClient()
    assert client.is_intel_pcs and client.base_url == "https://api.trustedservices.intel.com"
    assert client.root_ca_crl_url == "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
    client.close()
    pccs = PcsClient("https://pccs.example:8081/sgx/certification/v4")
    assert pccs.root_ca_crl_url == "https://pccs.example:8081/sgx/certification/v4/rootcacrl"
    pccs.close()
