"""The service skeleton on both stores: health, readiness, metrics, auth scopes, errors, logs."""

from __future__ import annotations

import io
import json
import logging
import stat
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from r3e_tee.config import TeeConfig
from r3e_tee.logging import JsonFormatter
from r3e_tee.service.__main__ import build_context
from r3e_tee.service.app import create_app
from r3e_tee.store.migrations import LATEST_VERSION

ADMIN_TOKEN = "r3e_test-admin-token-0123456789"  # accepted by make_config
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_health_ready_and_version(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["store"] == "ok" and ready.json()["checks"]["migrations"] == "ok"
    assert client.get("/v1/version").json()["providers"] == ["simulation"]


def test_readyz_fails_when_migrations_are_missing(client: TestClient) -> None:
    ctx = client.app.state.ctx  # type: ignore[attr-defined]
    ctx.store.execute("DELETE FROM schema_migrations")
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert "schema at 0" in ready.json()["checks"]["migrations"]


def test_an_older_replica_stays_ready_when_a_newer_one_migrated(client: TestClient) -> None:
    """Rolling update: the first new replica applies its migration; the replicas still on the
    old release must keep serving, not all turn unready at once."""
    ctx = client.app.state.ctx  # type: ignore[attr-defined]
    ctx.store.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
        (LATEST_VERSION + 1, "from a newer release", 0.0),
    )
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.json()
    assert f"schema at {LATEST_VERSION + 1}" in ready.json()["checks"]["migrations"]


def test_openapi_lists_versioned_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["info"]["title"] == "R3E TEE Service"
    assert "/v1/tokens" in spec["paths"] and "/v1/version" in spec["paths"]


def test_metrics_are_prometheus_text(client: TestClient) -> None:
    client.get("/healthz")
    body = client.get("/metrics").text
    assert 'r3e_tee_http_requests_total{method="GET",route="/healthz",status="200"}' in body
    assert "r3e_tee_http_request_duration_seconds_bucket" in body


def test_401_without_token_and_with_wrong_token(client: TestClient) -> None:
    r = client.get("/v1/tokens")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"] == "unauthenticated"
    assert client.get("/v1/tokens", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/tokens", headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.get("/v1/tokens", headers=AUTH).status_code == 200


def test_403_for_the_wrong_scope_and_revocation(client: TestClient) -> None:
    issued = client.post("/v1/tokens", json={"scope": "read", "label": "dashboard"}, headers=AUTH)
    assert issued.status_code == 201
    body = issued.json()
    read_auth = {"Authorization": f"Bearer {body['token']}"}
    r = client.get("/v1/tokens", headers=read_auth)
    assert r.status_code == 403 and "'admin' needed" in r.json()["message"]
    listing = client.get("/v1/tokens", headers=AUTH).json()
    assert [t["label"] for t in listing] == ["dashboard"]
    assert body["token"] not in json.dumps(listing)  # only hashes are stored and listed
    ctx = client.app.state.ctx  # type: ignore[attr-defined]
    assert ctx.store.fetchval("SELECT count(*) FROM admin_tokens WHERE token_hash = ?", (body["token"],)) == 0
    assert client.delete(f"/v1/tokens/{body['token_hash']}", headers=AUTH).status_code == 204
    assert client.get("/v1/tokens", headers=read_auth).status_code == 401
    assert client.delete(f"/v1/tokens/{body['token_hash']}", headers=AUTH).status_code == 404


def test_bad_request_body_is_explained(client: TestClient) -> None:
    r = client.post("/v1/tokens", json={"scope": "root", "label": ""}, headers=AUTH)
    assert r.status_code == 422
    fields = {p["field"] for p in r.json()["problems"]}
    assert {"body.scope", "body.label"} <= fields


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces" and len(r.headers["x-request-id"]) == 32


def test_logs_are_json_with_request_ids_and_no_token(client: TestClient) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("r3e_tee")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        client.get("/v1/tokens", headers={**AUTH, "X-Request-ID": "req-42"})
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    entry = next(e for e in lines if e.get("route") == "/v1/tokens")
    assert entry["request_id"] == "req-42" and entry["status"] == 200
    assert ADMIN_TOKEN not in stream.getvalue()


def test_json_formatter_scrubs_secret_looking_fields() -> None:
    record = logging.LogRecord("x", logging.INFO, "", 0, "hello", (), None)
    record.api_key = "leak"
    record.admin_token_file = "/data/admin-token"
    out = json.loads(JsonFormatter().format(record))
    assert out["api_key"] == "***" and out["admin_token_file"] == "/data/admin-token"


def test_dev_mode_writes_a_private_admin_token_once(
    tmp_path: Path, make_config: Callable[..., TeeConfig]
) -> None:
    import pytest

    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    try:
        cfg = make_config(tmp_path, dev=True, admin_token_hashes=())
        ctx = build_context(cfg)
        token_file = tmp_path / "data" / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        with TestClient(create_app(ctx)) as c:
            assert c.get("/v1/tokens", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        ctx2 = build_context(cfg)  # second start keeps the same token
        ctx2.store.close()
        assert token_file.read_text().strip() == token
        discovery = json.loads((tmp_path / "state" / "r3e-tee" / "dev-8080.json").read_text())
        assert discovery["admin_token_file"] == str(token_file.resolve())
    finally:
        mp.undo()


def test_production_generates_no_token(tmp_path: Path, make_config: Callable[..., TeeConfig]) -> None:
    ctx = build_context(make_config(tmp_path, admin_token_hashes=()))
    ctx.store.close()
    assert not (tmp_path / "data" / "admin-token").exists()


def test_admin_token_file_is_read_and_hashed(tmp_path: Path, make_config: Callable[..., TeeConfig]) -> None:
    f = tmp_path / "tokens"
    f.write_text("# admins\nr3e_from-file-token\n")
    ctx = build_context(make_config(tmp_path, admin_token_file=f, admin_token_hashes=()))
    with TestClient(create_app(ctx)) as c:
        assert c.get("/v1/tokens", headers={"Authorization": "Bearer r3e_from-file-token"}).status_code == 200
    assert ctx.store.fetchval("SELECT count(*) FROM admin_tokens") == 0
