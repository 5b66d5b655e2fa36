"""A remote worker's id belongs to the token that registered it.

Every worker host is untrusted in this design, and every worker holds an enclave-scope token:
one compromised host must not take over another worker's id (and with it the function inputs,
code and secrets the service sends there), heartbeat for it, report its enclaves' state, or
attest evidence as one of its enclaves.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from fastapi.testclient import TestClient

from r3e_tee.service.auth import Scope, token_hash

ADMIN = {"Authorization": "Bearer r3e_test-admin-token-0123456789"}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _registration(url: str) -> dict[str, Any]:
    return {"id": "w1", "url": url, "providers": ["simulation"], "capacity": {}}


def _register(client: TestClient, token: str, url: str) -> int:
    return client.post("/v1/workers", json=_registration(url), headers=_bearer(token)).status_code


def _enclave_of(client: TestClient, worker_id: str, enclave_id: str) -> None:
    now = time.time()
    client.app.state.ctx.store.execute(  # type: ignore[attr-defined]
        "INSERT INTO enclaves (id, provider, size_bytes, debug, evidence_format, state, worker_id, "
        "created_at, updated_at) VALUES (?, 'simulation', 1, 0, 'sgx-dcap', 'creating', ?, ?, ?)",
        (enclave_id, worker_id, now, now),
    )


def test_a_worker_id_belongs_to_the_token_that_registered_it(client: TestClient) -> None:
    tokens = client.app.state.ctx.tokens  # type: ignore[attr-defined]
    mine, other = tokens.issue(Scope.ENCLAVE, "worker w1"), tokens.issue(Scope.ENCLAVE, "worker w2")
    assert _register(client, mine, "http://w1") == 200
    # another worker's token cannot take the id over (and redirect the service's calls)
    r = client.post("/v1/workers", json=_registration("http://evil"), headers=_bearer(other))
    assert r.status_code == 403 and "w1" in r.json()["message"], r.text
    assert [w["url"] for w in client.get("/v1/workers", headers=ADMIN).json()] == ["http://w1"]
    # the same token registers again after a restart
    assert _register(client, mine, "http://w1") == 200
    # heartbeats, reconciliation and state reports: the owner only
    hb = {"capacity": {"simulation": {"free_bytes": 1}}}
    assert client.post("/v1/workers/w1/heartbeat", json=hb, headers=_bearer(other)).status_code == 403
    assert client.post("/v1/workers/w1/heartbeat", json=hb, headers=_bearer(mine)).status_code == 204
    assert client.get("/v1/workers/w1/enclaves", headers=_bearer(other)).status_code == 403
    assert client.get("/v1/workers/w1/enclaves", headers=_bearer(mine)).status_code == 200
    _enclave_of(client, "w1", "e1")
    report = {"state": "failed", "reason": "spoofed"}
    r = client.post("/v1/workers/w1/enclaves/e1", json=report, headers=_bearer(other))
    assert r.status_code == 403, r.text
    assert client.get("/v1/enclaves/e1", headers=ADMIN).json()["state"] == "creating"
    r = client.post("/v1/workers/w1/enclaves/e1", json={"state": "attesting"}, headers=_bearer(mine))
    assert r.status_code == 204, r.text
    # an admin frees the id: the next worker token to register claims it
    third = tokens.issue(Scope.ENCLAVE, "worker w1, new token")
    assert client.post("/v1/workers", json=_registration("http://w1"), headers=ADMIN).status_code == 200
    assert _register(client, third, "http://w1") == 200
    assert _register(client, mine, "http://w1") == 403
    assert client.post("/v1/workers/w1/heartbeat", json=hb, headers=_bearer(third)).status_code == 204
    tokens.revoke(token_hash(third))
    # a revoked owner's id can be registered by the worker's new token
    tokens.revoke(token_hash(mine))
    assert _register(client, other, "http://w1b") == 200
    assert client.post("/v1/workers/w1/heartbeat", json=hb, headers=_bearer(other)).status_code == 204


def test_a_worker_attests_only_as_its_own_enclaves(client: TestClient) -> None:
    tokens = client.app.state.ctx.tokens  # type: ignore[attr-defined]
    mine, other = tokens.issue(Scope.ENCLAVE, "worker w1"), tokens.issue(Scope.ENCLAVE, "worker w2")
    assert _register(client, mine, "http://w1") == 200
    _enclave_of(client, "w1", "e1")
    _enclave_of(client, "embedded-host", "e2")  # an enclave of no registered worker
    key = base64.b64encode(b"k" * 32).decode()
    body: dict[str, Any] = {
        "evidence": base64.b64encode(b"not evidence").decode(),
        "public_keys": {"x25519": key, "p256": base64.b64encode(b"\x04" + b"p" * 64).decode()},
        "provider": "simulation",
    }
    for token, enclave_id in ((other, "e1"), (mine, "e2"), (other, "e2")):
        nonce = client.post("/v1/attestation/nonce", headers=_bearer(token)).json()["nonce"]
        r = client.post(
            "/v1/attestation/verify",
            json={**body, "nonce": nonce, "enclave_id": enclave_id},
            headers=_bearer(token),
        )
        assert r.status_code == 403 and enclave_id in r.json()["message"], r.text
    # its own enclave gets as far as the evidence (which does not parse here)
    nonce = client.post("/v1/attestation/nonce", headers=_bearer(mine)).json()["nonce"]
    r = client.post(
        "/v1/attestation/verify", json={**body, "nonce": nonce, "enclave_id": "e1"}, headers=_bearer(mine)
    )
    assert r.status_code == 400, r.text


def test_registration_and_heartbeats_must_be_well_formed(client: TestClient) -> None:
    """Before: any JSON was stored as a worker's capacity, URL and simulated roots. One worker
    heartbeating ``{"simulation": {"free_bytes": "lots"}}`` made every simulation enclave
    placed on remote workers a 500 (placement reads every worker's capacity); a ``file://`` URL or roots of an
    unknown kind failed only when the service used them."""
    token = client.app.state.ctx.tokens.issue(Scope.ENCLAVE, "worker w1")  # type: ignore[attr-defined]
    good = {
        "simulation": {"total_bytes": 8, "used_bytes": 0, "free_bytes": 8, "running": 0, "max_enclaves": 4}
    }
    bad_capacities: list[Any] = [
        {"simulation": {"free_bytes": "lots"}},
        {"simulation": "x"},
        {"simulation": {"free_bytes": -1}},
        {"simulation": {"free_bytes": 10**30}},
    ]
    for capacity in bad_capacities:
        body = {**_registration("http://w1"), "capacity": capacity}
        r = client.post("/v1/workers", json=body, headers=_bearer(token))
        assert r.status_code == 422, (capacity, r.text)
    for changed in (
        {"url": "file:///etc/passwd"},
        {"url": "http://w1\r\nX-Injected: 1"},
        {"providers": ["simulation", "a b"]},
        {"simulation_roots": {"bogus-kind": "x"}},
    ):
        r = client.post("/v1/workers", json={**_registration("http://w1"), **changed}, headers=_bearer(token))
        assert r.status_code == 422, (changed, r.text)
    r = client.post(
        "/v1/workers",
        json={**_registration("http://w1"), "simulation_roots": {"sgx-dcap": "not a certificate"}},
        headers=_bearer(token),
    )
    assert r.status_code == 400 and "simulation_roots" in r.json()["message"], r.text
    r = client.post(
        "/v1/workers", json={**_registration("https://w1:8443/"), "capacity": good}, headers=_bearer(token)
    )
    assert r.status_code == 200, r.text
    for capacity in bad_capacities:
        r = client.post("/v1/workers/w1/heartbeat", json={"capacity": capacity}, headers=_bearer(token))
        assert r.status_code == 422, (capacity, r.text)
    assert (
        client.post("/v1/workers/w1/heartbeat", json={"capacity": good}, headers=_bearer(token)).status_code
        == 204
    )
    # placement (of a service without an embedded worker) reads every worker's capacity
    assert client.app.state.ctx.components["workers"].choose("simulation", 1).worker_id == "w1"  # type: ignore[attr-defined]


def _attestation(
    client: TestClient,
    att_id: str,
    enclave_id: str,
    x25519: bytes,
    verdict: str = "valid",
    mrenclave: str = "ab" * 32,
) -> None:
    keys = {"x25519": base64.urlsafe_b64encode(x25519).rstrip(b"=").decode()}
    result = {"kind": "sgx-dcap", "claims": {"mrenclave": mrenclave}}
    client.app.state.ctx.store.execute(  # type: ignore[attr-defined]
        "INSERT INTO attestations (id, enclave_id, provider, verdict, evidence, evidence_sha256, "
        "public_keys, claims, created_at) VALUES (?, ?, 'simulation', ?, ?, 'x', ?, ?, ?)",
        (att_id, enclave_id, verdict, b"evidence", json.dumps(keys), json.dumps(result), time.time()),
    )


def test_a_worker_reports_only_the_keys_its_enclave_attested(client: TestClient) -> None:
    """Before: a worker's state report set an enclave's public keys (what GET
    /v1/functions/NAME/enclave hands clients to encrypt their inputs to), its attestation id and
    'ready' to anything. A hostile worker host could so have clients seal inputs to its own key.
    Now keys come only with an accepted attestation of that enclave, and must be its keys."""
    token = client.app.state.ctx.tokens.issue(Scope.ENCLAVE, "worker w1")  # type: ignore[attr-defined]
    assert _register(client, token, "http://w1") == 200
    _enclave_of(client, "w1", "e1")
    _enclave_of(client, "w1", "e2")
    attested, hostile = b"\x01" * 32, b"\x02" * 32
    _attestation(client, "a-e1", "e1", attested)
    _attestation(client, "a-e2", "e2", hostile)
    _attestation(client, "a-bad", "e1", hostile, verdict="invalid")
    url = "/v1/workers/w1/enclaves/e1"
    for report in (
        {"state": "ready", "public_keys": {"x25519": hostile.hex()}},  # keys without an attestation
        {"state": "ready"},  # ready without one
        {"state": "ready", "attestation_id": "a-e1", "public_keys": {"x25519": hostile.hex()}},
        {"state": "ready", "attestation_id": "a-e2", "public_keys": {"x25519": hostile.hex()}},
        {"state": "ready", "attestation_id": "a-bad", "public_keys": {"x25519": hostile.hex()}},
        {"state": "ready", "attestation_id": "nope", "public_keys": {"x25519": hostile.hex()}},
        {"state": "resurrected"},
    ):
        r = client.post(url, json=report, headers=_bearer(token))
        assert r.status_code in (409, 422), (report, r.text)
    enclave = client.get("/v1/enclaves/e1", headers=ADMIN).json()
    assert enclave["state"] == "creating" and not enclave.get("public_keys"), enclave
    ready = {"state": "ready", "attestation_id": "a-e1", "public_keys": {"x25519": attested.hex()}}
    assert client.post(url, json=ready, headers=_bearer(token)).status_code == 204
    assert client.get("/v1/enclaves/e1", headers=ADMIN).json()["state"] == "ready"
    # a re-attestation reports the new attestation alone
    _attestation(client, "a-e1-2", "e1", attested)
    assert client.post(url, json={"attestation_id": "a-e1-2"}, headers=_bearer(token)).status_code == 204
    assert client.post(url, json={"state": "terminated"}, headers=_bearer(token)).status_code == 204


def test_a_worker_reports_only_the_measurement_its_enclave_attested(client: TestClient) -> None:
    """A function's launch is checked against the measurement its enclave is listed with: once
    the enclave is attested, that is the attested measurement, whatever its worker's host says."""
    token = client.app.state.ctx.tokens.issue(Scope.ENCLAVE, "worker w1")  # type: ignore[attr-defined]
    assert _register(client, token, "http://w1") == 200
    _enclave_of(client, "w1", "e1")
    key, measured, claimed = b"\x01" * 32, "ab" * 32, "cd" * 32
    url = "/v1/workers/w1/enclaves/e1"
    # before attestation the host's figure is listed (and replaced by the verified one)
    assert client.post(url, json={"measurement": claimed}, headers=_bearer(token)).status_code == 204
    _attestation(client, "a-e1", "e1", key, mrenclave=measured)
    ready = {"state": "ready", "attestation_id": "a-e1", "public_keys": {"x25519": key.hex()}}
    for lie in ({**ready, "measurement": claimed}, {"measurement": claimed}):
        if "attestation_id" not in lie:  # after a report that made it attested
            assert (
                client.post(url, json={**ready, "measurement": measured}, headers=_bearer(token)).status_code
                == 204
            )
        r = client.post(url, json=lie, headers=_bearer(token))
        assert r.status_code == 409 and "measurement" in r.text, (lie, r.text)
    enclave = client.get("/v1/enclaves/e1", headers=ADMIN).json()
    assert enclave["measurement"] == measured and enclave["state"] == "ready", enclave
