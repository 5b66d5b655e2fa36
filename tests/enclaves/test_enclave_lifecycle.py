"""Enclaves end to end on the simulation provider: real processes, real evidence formats."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from r3e_tee.attestation.tokens import TokenError, verify_token

from .conftest import LiveService, runtime_pids, start_service, stop_service, wait_state


@pytest.mark.parametrize("fmt", ["sgx-dcap", "nitro"])
def test_create_attest_list_destroy(live: LiveService, fmt: str) -> None:
    with live.client() as c:
        r = c.post(
            "/v1/enclaves",
            params={"wait": 10},
            json={"provider": "simulation", "size": "128M", "evidence_format": fmt},
        )
        assert r.status_code == 201
        enclave = r.json()
        assert enclave["state"] == "ready", enclave
        assert enclave["size_bytes"] == 128 * 2**20 and enclave["attestation_id"] and enclave["pid"]
        assert len(enclave["measurement"]) == (64 if fmt == "sgx-dcap" else 96)
        assert enclave["pid"] in runtime_pids()
        assert enclave["id"] in {e["id"] for e in c.get("/v1/enclaves").json()}

        report = c.get(f"/v1/attestations/{enclave['attestation_id']}").json()
        assert report["verdict"] == "valid" and report["claims"]["simulated"] is True
        assert report["kind"] == fmt and report["enclave_id"] == enclave["id"]
        if fmt == "sgx-dcap":
            assert report["collateral"]["bundle"]["tcb_info"]

        destroyed = c.delete(f"/v1/enclaves/{enclave['id']}").json()
        assert destroyed["state"] == "terminated"
        deadline = time.monotonic() + 5
        while enclave["pid"] in runtime_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert enclave["pid"] not in runtime_pids()
        assert enclave["id"] not in {e["id"] for e in c.get("/v1/enclaves").json()}
        assert enclave["id"] in {e["id"] for e in c.get("/v1/enclaves", params={"all": "true"}).json()}


def test_token_verifies_with_jwks_and_is_revoked_with_the_enclave(live: LiveService) -> None:
    with live.client() as c:
        enclave = c.post(
            "/v1/enclaves", params={"wait": 10}, json={"provider": "simulation", "size": "64M"}
        ).json()
        grant = c.post(f"/v1/enclaves/{enclave['id']}/attest").json()
        jwks = httpx.get(f"{live.url}/.well-known/jwks.json").json()  # public, no token
        claims = verify_token(grant["token"], jwks, issuer="r3e-tee-service")
        assert claims["sub"] == enclave["id"] and claims["simulated"] is True
        assert claims["measurement"] == enclave["measurement"]
        p256 = base64.urlsafe_b64encode(bytes.fromhex(enclave["public_keys"]["p256"])).rstrip(b"=").decode()
        assert claims["cnf"]["p256"] == p256
        # a token is only as good as the JWKS: another key's JWKS rejects it
        other = {"keys": [{**jwks["keys"][0], "x": jwks["keys"][0]["y"]}]}
        with pytest.raises(TokenError):
            verify_token(grant["token"], other)
        with pytest.raises(TokenError, match="issuer"):
            verify_token(grant["token"], jwks, issuer="someone-else")
        c.delete(f"/v1/enclaves/{enclave['id']}")
        record = c.get(f"/v1/attestations/{grant['attestation_id']}").json()
        assert record["revoked_at"] is not None


def _verify_body(report: dict, nonce: str) -> dict:  # type: ignore[type-arg]
    keys = {}
    for name, value in report["public_keys"].items():
        keys[name] = base64.b64encode(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))).decode()
    return {
        "evidence": report["evidence"],
        "nonce": nonce,
        "public_keys": keys,
        "provider": "simulation",
        "enclave_id": report["enclave_id"],
        "collateral": (report.get("collateral") or {}).get("bundle"),
    }


def test_replayed_nonce_unbound_evidence_and_tampering_are_rejected(live: LiveService) -> None:
    with live.client() as c:
        enclave = c.post(
            "/v1/enclaves", params={"wait": 10}, json={"provider": "simulation", "size": "64M"}
        ).json()
        report = c.get(f"/v1/attestations/{enclave['attestation_id']}").json()
        # the same evidence and nonce again: the nonce was used
        r = c.post("/v1/attestation/verify", json=_verify_body(report, report["nonce"]))
        assert r.status_code == 422 and r.json()["reason"] == "nonce-mismatch"
        # old evidence with a fresh nonce: not bound to it
        fresh = c.post("/v1/attestation/nonce").json()["nonce"]
        r = c.post("/v1/attestation/verify", json=_verify_body(report, fresh))
        assert r.status_code == 422 and r.json()["reason"] == "report-data-mismatch"
        assert r.json()["check"] == "binding.report_data"
        # a flipped bit in the signed report body
        evidence = bytearray(base64.b64decode(report["evidence"]))
        evidence[48 + 64] ^= 1
        body = _verify_body(report, c.post("/v1/attestation/nonce").json()["nonce"])
        body["evidence"] = base64.b64encode(bytes(evidence)).decode()
        r = c.post("/v1/attestation/verify", json=body)
        assert r.status_code == 422 and r.json()["reason"] == "bad-signature"
        # an unknown nonce
        r = c.post("/v1/attestation/verify", json=_verify_body(report, "00" * 32))
        assert r.status_code == 422 and r.json()["reason"] == "nonce-mismatch"
        rejected = c.get(f"/v1/enclaves/{enclave['id']}").json()
        assert rejected["state"] == "ready"  # rejected re-submissions do not touch the enclave
        c.delete(f"/v1/enclaves/{enclave['id']}")


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"provider": "simulation", "size": "0"}, 400, "greater than zero"),
        ({"provider": "simulation", "size": "12Q"}, 400, "12Q"),
        ({"provider": "simulation", "size": "64G"}, 409, "of 8192 MiB is free"),
        ({"provider": "quantum", "size": "64M"}, 400, "enabled providers: simulation"),
        ({"provider": "sgx", "size": "64M"}, 503, "sgx"),
        ({"provider": "simulation", "size": "64M", "evidence_format": "tpm"}, 400, "sgx-dcap"),
    ],
)
def test_bad_requests_leave_nothing_behind(live: LiveService, body: dict, status: int, text: str) -> None:  # type: ignore[type-arg]
    with live.client() as c:
        before = len(c.get("/v1/enclaves", params={"all": "true"}).json())
        r = c.post("/v1/enclaves", json=body)
        assert r.status_code == status, r.text
        assert text in r.json()["message"] + (r.json().get("hint") or "")
        assert len(c.get("/v1/enclaves", params={"all": "true"}).json()) == before


def test_sgx_on_a_host_without_sgx_explains_why(live: LiveService) -> None:
    with live.client() as c:
        r = c.post("/v1/enclaves", json={"provider": "sgx", "size": "128M"})
    body = r.json()
    assert r.status_code == 503
    assert "not enabled" in body["message"] and "/dev/sgx_enclave" in body["message"]
    assert "doctor" in body["hint"]


def test_killed_enclave_process_fails_with_the_reason(live: LiveService) -> None:
    with live.client() as c:
        enclave = c.post(
            "/v1/enclaves", params={"wait": 10}, json={"provider": "simulation", "size": "64M"}
        ).json()
        os.kill(enclave["pid"], signal.SIGKILL)
        failed = wait_state(c, enclave["id"], {"failed"})
        assert failed["state"] == "failed"
        assert failed["reason"] == f"enclave process {enclave['pid']} killed by signal SIGKILL"
        # its capacity is free again
        assert (
            c.post(
                "/v1/enclaves", params={"wait": 10}, json={"provider": "simulation", "size": "8064M"}
            ).json()["state"]
            == "ready"
        )
        for e in c.get("/v1/enclaves").json():
            c.delete(f"/v1/enclaves/{e['id']}")


def test_concurrent_creates_cannot_overbook_capacity(live: LiveService) -> None:
    import concurrent.futures

    with live.client() as c:

        def create() -> int:
            return c.post("/v1/enclaves", json={"provider": "simulation", "size": "3G"}).status_code

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = sorted(pool.map(lambda _: create(), range(4)))
        assert codes == [201, 201, 409, 409]
        for e in c.get("/v1/enclaves").json():
            c.delete(f"/v1/enclaves/{e['id']}")


def test_restart_keeps_the_list_and_reconciles_processes(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "data", tmp_path / "state")
    try:
        with svc.client() as c:
            enclave = c.post(
                "/v1/enclaves", params={"wait": 10}, json={"provider": "simulation", "size": "64M"}
            ).json()
            assert enclave["state"] == "ready"
    finally:
        stop_service(svc, signal.SIGKILL)  # a crash: no graceful destroy
    deadline = time.monotonic() + 5
    while enclave["pid"] in runtime_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert enclave["pid"] not in runtime_pids(), "enclave processes must not outlive their worker"
    svc = start_service(tmp_path / "data", tmp_path / "state")
    try:
        with svc.client() as c:
            after = c.get(f"/v1/enclaves/{enclave['id']}").json()
        assert after["state"] == "failed"
        assert after["reason"].startswith("worker restarted: the enclave's channel was lost")
    finally:
        stop_service(svc)


def test_graceful_stop_destroys_enclaves_and_exits_zero(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "data", tmp_path / "state")
    with svc.client() as c:
        enclave = c.post(
            "/v1/enclaves", params={"wait": 10}, json={"provider": "simulation", "size": "64M"}
        ).json()
    start = time.monotonic()
    out = stop_service(svc)
    assert svc.proc.returncode == 0 and time.monotonic() - start < 10
    assert "service stopped" in out
    assert enclave["pid"] not in runtime_pids()
    assert svc.token not in out


def test_cli_round_trip_against_the_live_service(live: LiveService) -> None:
    env = {**live.env, "R3E_TEE_URL": live.url}
    cli = [sys.executable, "-m", "r3e_tee.cli.main"]
    out = subprocess.run([*cli, "attestation-test"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for step in (
        "replayed nonce is rejected",
        "tampered evidence is rejected",
        "token verifies with the JWKS",
    ):
        assert f"PASS {step}" in out.stdout
    out = subprocess.run(
        [*cli, "create-enclave", "--size", "128M", "--provider", "simulation", "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and " ready " in out.stdout
    enclave_id = out.stdout.split()[1]
    listing = subprocess.run([*cli, "list-enclaves"], env=env, capture_output=True, text=True, timeout=60)
    assert enclave_id[:12] in listing.stdout
    start = time.monotonic()
    out = subprocess.run(
        [*cli, "create-enclave", "--size", "128M", "--provider", "sgx"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "sgx" in out.stderr and time.monotonic() - start < 10
    for bad in ("0", "12Q"):
        out = subprocess.run(
            [*cli, "create-enclave", "--size", bad], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 2 and "--size" in out.stderr
    out = subprocess.run(
        [*cli, "destroy-enclave", enclave_id], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "terminated" in out.stdout
