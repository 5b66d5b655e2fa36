"""The secrets API end to end in one process (TestClient) with the simulation provider's evidence
and roots, the runtime in this process so the test sees what the enclave holds; on SQLite and
PostgreSQL. The value must never show up in a response, a log line or the store."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from tests.service.conftest import _make_config as make_config

from r3e_tee.config import TeeConfig
from r3e_tee.logging import JsonFormatter
from r3e_tee.service import components
from r3e_tee.service.__main__ import build_context
from r3e_tee.service.app import create_app
from r3e_tee.service.auth import Scope

from .conftest import SECRET, InProcessSimulation
from .test_keystore import _dump

ADMIN = "r3e_keys-test-admin-token-0123456789"
TEXT = SECRET.decode()
B64 = base64.b64encode(SECRET).decode()


@dataclass
class Svc:
    client: TestClient
    provider: InProcessSimulation
    ctx: Any
    logs: io.StringIO
    responses: list[str] = field(default_factory=list)

    def call(self, method: str, path: str, *, token: str = ADMIN, **kwargs: Any) -> httpx.Response:
        r = self.client.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)
        self.responses.append(r.text)
        return r

    def enclave(self, **body: Any) -> dict[str, Any]:
        r = self.call(
            "POST",
            "/v1/enclaves",
            params={"wait": 20},
            json={"provider": "simulation", "size": "64M", **body},
        )
        assert r.status_code == 201 and r.json()["state"] == "ready", r.text
        return r.json()  # type: ignore[no-any-return]

    def runtime(self, enclave_id: str) -> Any:
        return self.provider.runtimes[enclave_id]


@pytest.fixture
def svc(
    tmp_path: Path,
    store_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Svc]:
    cfg = make_config(tmp_path, store_url)
    cfg = cfg.model_copy(
        update={
            "attestation": cfg.attestation.model_copy(update={"allow_simulation": True, "allow_debug": True})
        }
    )
    providers: dict[str, InProcessSimulation] = {}

    def build(config: TeeConfig, data_dir: Path) -> dict[str, Any]:
        providers["simulation"] = InProcessSimulation(data_dir, capacity_bytes=2**34)
        return dict(providers)

    monkeypatch.setattr(components, "build_providers", build)
    from r3e_tee.service.auth import token_hash

    cfg = cfg.model_copy(
        update={"server": cfg.server.model_copy(update={"admin_token_hashes": (token_hash(ADMIN),)})}
    )
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        ctx = build_context(cfg)
        with TestClient(create_app(ctx)) as client:
            yield Svc(client, providers["simulation"], ctx, logs)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _policy(measurement: str, **extra: Any) -> dict[str, Any]:
    return {"measurements": [measurement], "allow_simulation": True, **extra}


def test_secret_reaches_the_matching_enclave_and_never_leaks(svc: Svc, tmp_path: Path) -> None:
    enclave = svc.enclave()
    r = svc.call(
        "PUT", "/v1/secrets/api-key", json={"value": TEXT, "policy": _policy(enclave["measurement"])}
    )
    assert r.status_code == 201 and r.json()["size_bytes"] == len(SECRET) and r.json()["revision"] == 1
    assert r.json()["unsafe"] == ["allow_simulation"]
    r = svc.call("POST", "/v1/secrets/deliver", json={"enclave_id": enclave["id"], "names": ["api-key"]})
    assert r.status_code == 200, r.text
    assert r.json()["received"] == [{"name": "api-key", "size": len(SECRET)}]
    runtime = svc.runtime(enclave["id"])
    assert runtime.state["secrets"]["api-key"] == SECRET  # decrypted inside the enclave
    # the enclave was measured with the broker's identity and opened the secret as the broker's
    assert r.json()["broker"] == "pinned"
    assert runtime.measured["broker_key"] == svc.call("GET", "/v1/keys").json()["broker_key"]
    # the enclave seals with its own key (the host's sim_seal_key) and unseals
    sealed = svc.client.portal.call(runtime.state["seal"], b"enclave state")  # type: ignore[union-attr]
    assert svc.client.portal.call(runtime.state["unseal"], sealed) == b"enclave state"  # type: ignore[union-attr]
    # metadata and listing, as admin and as a read-only token
    reader = svc.ctx.tokens.issue(Scope.READ, "auditor")
    assert svc.call("GET", "/v1/secrets/api-key", token=reader).json()["name"] == "api-key"
    assert [s["name"] for s in svc.call("GET", "/v1/secrets", token=reader).json()] == ["api-key"]
    assert (
        svc.call("PUT", "/v1/secrets/x", token=reader, json={"value": "v", "policy": {}}).status_code == 403
    )
    # replace with base64, then a bad request that carries the value: the error does not echo it
    r = svc.call(
        "PUT", "/v1/secrets/api-key", json={"value_b64": B64, "policy": _policy(enclave["measurement"])}
    )
    assert r.status_code == 200 and r.json()["revision"] == 2 and not r.json()["policy_changed"]
    for body in (
        {"value": TEXT, "value_b64": B64, "policy": _policy(enclave["measurement"])},
        {"value": TEXT, "policy": {"allow_simulation": True}},
        {"value": TEXT, "policy": "not-a-mapping"},
        {"value_b64": TEXT + "!", "policy": _policy(enclave["measurement"])},
        {"value": TEXT},
    ):
        assert svc.call("PUT", "/v1/secrets/api-key", json=body).status_code in (400, 422)
    assert svc.call("PUT", "/v1/secrets/bad name", json={"value": TEXT, "policy": {}}).status_code in (
        400,
        422,
    )
    svc.call("GET", "/v1/audit", params={"limit": 1000})
    svc.call("GET", "/v1/keys")
    svc.call("POST", "/v1/keys/rotate")
    svc.call("GET", "/v1/secrets")
    # nowhere: responses, log lines, the store (every table; SQLite's files too)
    for text in svc.responses:
        assert TEXT not in text and B64 not in text
    logs = svc.logs.getvalue()
    assert "secrets released" in logs and "api-key" in logs
    assert TEXT not in logs and B64 not in logs
    assert SECRET not in _dump(svc.ctx.store)
    for f in (tmp_path / "data").glob("*"):
        if f.is_file():
            assert SECRET not in f.read_bytes(), f
    if svc.ctx.store.dialect == "sqlite":
        for f in tmp_path.glob("store.sqlite3*"):
            assert SECRET not in f.read_bytes(), f


def test_denials_over_http_with_reason_and_audit(svc: Svc) -> None:
    good = svc.enclave()
    debug = svc.enclave(debug=True)
    m = good["measurement"]
    svc.call("PUT", "/v1/secrets/pinned", json={"value": TEXT, "policy": _policy("00" * 32)})
    svc.call("PUT", "/v1/secrets/hardware-only", json={"value": TEXT, "policy": {"measurements": [m]}})
    svc.call("PUT", "/v1/secrets/ok", json={"value": TEXT, "policy": _policy(m)})
    cases = [
        (good, "pinned", "measurement-mismatch"),
        (good, "hardware-only", "simulation-not-allowed"),
        (debug, "ok", "debug-enclave"),
    ]
    for enclave, name, reason in cases:
        r = svc.call("POST", "/v1/secrets/deliver", json={"enclave_id": enclave["id"], "names": [name]})
        assert r.status_code == 403 and r.json()["reason"] == reason, r.text
        assert svc.runtime(enclave["id"]).state["secrets"] == {}
    # the release route (what remote workers call) with a token: revoked once the enclave is destroyed
    grant = svc.call("POST", f"/v1/enclaves/{good['id']}/attest").json()
    r = svc.call("POST", "/v1/secrets/release", json={"token": grant["token"], "names": ["ok"]})
    assert r.status_code == 200 and r.json()["suite"].startswith("DHKEM(X25519")
    assert base64.b64decode(r.json()["secrets"][0]["sealed"]) and TEXT not in r.text
    svc.call("DELETE", f"/v1/enclaves/{good['id']}")
    r = svc.call("POST", "/v1/secrets/release", json={"token": grant["token"], "names": ["ok"]})
    assert r.status_code == 403 and r.json()["reason"] == "revoked"
    r = svc.call(
        "POST", "/v1/secrets/release", json={"token": grant["token"][:-6] + "AAAAAA", "names": ["ok"]}
    )
    assert r.status_code == 403 and r.json()["reason"] == "invalid-token"
    denials = svc.call("GET", "/v1/audit", params={"action": "secret.deny"}).json()["entries"]
    assert [d["reason"] for d in denials] == [
        "measurement-mismatch",
        "simulation-not-allowed",
        "debug-enclave",
        "revoked",
        "invalid-token",
    ]
    assert all(d["outcome"] == "denied" and d["claims_digest"] for d in denials)
    assert denials[0]["detail"]["measurement"] == m and denials[0]["actor"].startswith("worker:")
    assert (
        svc.call("POST", "/v1/secrets/deliver", json={"enclave_id": "nope", "names": ["ok"]}).status_code
        == 404
    )


def test_policy_change_revokes_and_the_enclave_is_judged_again(svc: Svc) -> None:
    enclave = svc.enclave()
    m = enclave["measurement"]
    svc.call("PUT", "/v1/secrets/api-key", json={"value": TEXT, "policy": _policy(m)})
    assert (
        svc.call(
            "POST", "/v1/secrets/deliver", json={"enclave_id": enclave["id"], "names": ["api-key"]}
        ).status_code
        == 200
    )
    runtime = svc.runtime(enclave["id"])
    first_attestation = runtime.attestation_id
    # a stricter policy the enclave still meets: its token is revoked, it forgets the secret ...
    r = svc.call(
        "PUT", "/v1/secrets/api-key", json={"value": TEXT, "policy": _policy(m, providers=["simulation"])}
    )
    assert r.json()["policy_changed"] and r.json()["revoked_attestations"] == [first_attestation]
    assert "api-key" not in runtime.state["secrets"]
    # ... and on the next delivery it attests again and is checked against the new policy
    assert (
        svc.call(
            "POST", "/v1/secrets/deliver", json={"enclave_id": enclave["id"], "names": ["api-key"]}
        ).status_code
        == 200
    )
    assert runtime.attestation_id != first_attestation and runtime.state["secrets"]["api-key"] == SECRET
    # a policy it does not meet: revoked, and the fresh attestation is denied
    svc.call("PUT", "/v1/secrets/api-key", json={"value": TEXT, "policy": _policy("11" * 32)})
    r = svc.call("POST", "/v1/secrets/deliver", json={"enclave_id": enclave["id"], "names": ["api-key"]})
    assert r.status_code == 403 and r.json()["reason"] == "measurement-mismatch"
    r = svc.call("DELETE", "/v1/secrets/api-key")
    assert r.status_code == 200 and r.json()["deleted"] == "api-key"
    assert svc.call("GET", "/v1/secrets/api-key").status_code == 404


def test_rotation_keys_and_audit_api(svc: Svc) -> None:
    enclave = svc.enclave()
    svc.call("PUT", "/v1/secrets/api-key", json={"value": TEXT, "policy": _policy(enclave["measurement"])})
    jwks_before = {k["kid"] for k in svc.client.get("/.well-known/jwks.json").json()["keys"]}
    r = svc.call("POST", "/v1/keys/rotate", json={"data_keys": True, "signing_keys": True})
    assert r.status_code == 200, r.text
    assert r.json()["data_keys"][0]["version"] == 2
    jwks_after = {k["kid"] for k in svc.client.get("/.well-known/jwks.json").json()["keys"]}
    assert jwks_before < jwks_after  # the old key stays until its tokens expire
    keys = svc.call("GET", "/v1/keys").json()
    assert keys["kek"]["provider"] == "file" and keys["rotation"]["retain_versions"] == 3
    assert {k["state"] for k in keys["data_keys"]} == {"current", "previous"}
    assert any(k["state"] == "current" for k in keys["signing_keys"])
    # secrets still reach the enclave after rotation (a fresh token, signed by the new key)
    assert (
        svc.call(
            "POST", "/v1/secrets/deliver", json={"enclave_id": enclave["id"], "names": ["api-key"]}
        ).status_code
        == 200
    )
    assert svc.runtime(enclave["id"]).state["secrets"]["api-key"] == SECRET
    verdict = svc.call("GET", "/v1/audit/verify").json()
    assert verdict["ok"] and verdict["entries"] >= 6
    page = svc.call("GET", "/v1/audit", params={"after": 2, "limit": 3}).json()
    assert [e["seq"] for e in page["entries"]] == [3, 4, 5] and page["next_after"] == 5
    svc.ctx.store.execute("UPDATE audit_log SET subject = 'other' WHERE seq = 4")
    verdict = svc.call("GET", "/v1/audit/verify").json()
    assert not verdict["ok"] and verdict["first_broken"] == 4 and "edited" in verdict["problem"]
    assert svc.call("GET", "/v1/audit", token=svc.ctx.tokens.issue(Scope.READ, "r")).status_code == 403
    body = json.dumps(svc.responses)
    assert TEXT not in body
