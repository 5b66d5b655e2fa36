"""Key management on a live development service: real processes (the fork server's sandboxed
enclaves), the CLI as operators run it, start-up failures for a missing or wrong KEK, and the
PKCS#11 KEK in SoftHSM2. The value is looked for in every CLI output, the service's log and the
store's files."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.enclaves.conftest import LiveService, start_service, stop_service

from r3e_tee.cli.main import main

from .conftest import HSM_KEYS, SECRET, SoftHsm, write_kek

TEXT = SECRET.decode()
CONFIG = """\
attestation:
  allow_debug: true       # so debug enclaves get a token and the release policy is what refuses them
  token_ttl: 4s
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    base = tmp_path_factory.mktemp("keys-live")
    cfg = base / "tee-config.yaml"
    cfg.write_text(CONFIG)
    svc = start_service(base / "data", base / "state", config=cfg)
    try:
        yield svc
    finally:
        stop_service(svc)


OUTPUTS: list[str] = []


def cli(live: LiveService, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["--server", live.url, "--token", live.token, *args])
    out, err = capsys.readouterr()
    OUTPUTS.append(out + err)
    return code, out + err


def _policy(tmp_path: Path, name: str, body: str) -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(body)
    return f


def _enclave(c: httpx.Client, **body: object) -> dict:  # type: ignore[type-arg]
    r = c.post("/v1/enclaves", params={"wait": 20}, json={"provider": "simulation", "size": "64M", **body})
    assert r.status_code == 201 and r.json()["state"] == "ready", r.text
    OUTPUTS.append(r.text)
    return r.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("fmt", ["sgx-dcap", "nitro"])
def test_put_secret_and_deliver_to_a_sandboxed_enclave(
    live: LiveService, capsys: pytest.CaptureFixture[str], tmp_path: Path, fmt: str
) -> None:
    with live.client() as c:
        enclave = _enclave(c, evidence_format=fmt)
        value_file = tmp_path / "value"
        value_file.write_bytes(SECRET)
        policy = _policy(
            tmp_path,
            "p",
            f"measurements:\n  - {enclave['measurement']}\nallow_simulation: true  # dev only\n",
        )
        code, out = cli(
            live,
            capsys,
            "put-secret",
            f"oracle-{fmt}",
            "--value-file",
            str(value_file),
            "--policy",
            str(policy),
        )
        assert code == 0 and "created: revision 1" in out and "UNSAFE" in out
        r = c.post("/v1/secrets/deliver", json={"enclave_id": enclave["id"], "names": [f"oracle-{fmt}"]})
        OUTPUTS.append(r.text)
        # the runtime in the sandboxed process opened the HPKE blob (AES-GCM authenticated it)
        assert r.status_code == 200 and r.json()["received"] == [
            {"name": f"oracle-{fmt}", "size": len(SECRET)}
        ]
        c.delete(f"/v1/enclaves/{enclave['id']}")
    code, out = cli(live, capsys, "-o", "json", "list-secrets")
    assert code == 0 and f"oracle-{fmt}" in {s["name"] for s in json.loads(out)}


def test_each_denial_class_over_http(
    live: LiveService, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with live.client() as c:
        good = _enclave(c)
        debug = _enclave(c, debug=True)
        m = good["measurement"]
        os.environ["R3E_TEST_SECRET_VALUE"] = TEXT
        try:
            for name, body in (
                ("sim-ok", f"measurements: [{m}]\nallow_simulation: true\n"),
                ("wrong-code", f"measurements: [{'00' * 32}]\nallow_simulation: true\n"),
                ("hardware-only", f"measurements: [{m}]\n"),
            ):
                code, _ = cli(
                    live, capsys, "put-secret", name, "--value-env", "R3E_TEST_SECRET_VALUE", "--policy",
                    str(_policy(tmp_path, name, body)),
                )  # fmt: skip
                assert code == 0
        finally:
            del os.environ["R3E_TEST_SECRET_VALUE"]

        def deliver(enclave: dict, name: str) -> httpx.Response:  # type: ignore[type-arg]
            r = c.post("/v1/secrets/deliver", json={"enclave_id": enclave["id"], "names": [name]})
            OUTPUTS.append(r.text)
            return r

        assert deliver(good, "wrong-code").json()["reason"] == "measurement-mismatch"
        assert deliver(debug, "sim-ok").json()["reason"] == "debug-enclave"
        assert deliver(good, "hardware-only").json()["reason"] == "simulation-not-allowed"
        assert deliver(good, "sim-ok").status_code == 200
        # a token handed out earlier: expired after token_ttl, revoked once its enclave is destroyed
        grant = c.post(f"/v1/enclaves/{good['id']}/attest").json()
        ok = c.post("/v1/secrets/release", json={"token": grant["token"], "names": ["sim-ok"]})
        assert ok.status_code == 200 and TEXT not in ok.text
        time.sleep(grant["expires_at"] - time.time() + 1.1)
        r = c.post("/v1/secrets/release", json={"token": grant["token"], "names": ["sim-ok"]})
        assert r.status_code == 403 and r.json()["reason"] == "expired", r.text
        fresh = c.post(f"/v1/enclaves/{good['id']}/attest").json()
        c.delete(f"/v1/enclaves/{good['id']}")
        r = c.post("/v1/secrets/release", json={"token": fresh["token"], "names": ["sim-ok"]})
        assert r.status_code == 403 and r.json()["reason"] == "revoked", r.text
        c.delete(f"/v1/enclaves/{debug['id']}")
    code, out = cli(live, capsys, "-o", "json", "audit-log", "--action", "secret.deny", "--limit", "1000")
    reasons = [e["reason"] for e in json.loads(out)["entries"]]
    assert reasons[-5:] == [
        "measurement-mismatch",
        "debug-enclave",
        "simulation-not-allowed",
        "expired",
        "revoked",
    ]
    code, out = cli(live, capsys, "-o", "json", "audit-log", "--subject", "wrong-code")
    assert code == 0 and [e["action"] for e in json.loads(out)["entries"]] == ["secret.create", "secret.deny"]
    code, out = cli(live, capsys, "audit-log", "--subject", "wrong-code")
    assert code == 0 and "SEQ" in out and "ACTION" in out


def test_remote_worker_secret_source(live: LiveService) -> None:
    """What r3e-tee-worker uses: release over HTTP with an enclave-scope token; denials keep their reason."""
    import asyncio

    from r3e_tee.keys.errors import ReleaseDenied
    from r3e_tee.keys.remote import HttpSecretSource

    with live.client() as c:
        enclave = _enclave(c)
        grant = c.post(f"/v1/enclaves/{enclave['id']}/attest").json()
        worker_token = c.post("/v1/tokens", json={"scope": "enclave", "label": "worker-test"}).json()["token"]
        m = enclave["measurement"]
        c.put(
            "/v1/secrets/remote-ok",
            json={"value": TEXT, "policy": {"measurements": [m], "allow_simulation": True}},
        )

    async def main() -> None:
        source = HttpSecretSource(live.url, worker_token)
        try:
            out = await source.release(token=grant["token"], names=["remote-ok"])
            assert out["attestation_id"] == grant["attestation_id"]
            (item,) = out["secrets"]
            assert (
                item["name"] == "remote-ok"
                and isinstance(item["sealed"], bytes)
                and SECRET not in item["sealed"]
            )
            with pytest.raises(ReleaseDenied) as err:
                await source.release(token=grant["token"], names=["wrong-code"])
            assert err.value.reason == "measurement-mismatch"
            with pytest.raises(ReleaseDenied) as err:
                await source.sealing_key(token=grant["token"])
            assert err.value.reason == "kind-not-allowed"
        finally:
            await source.aclose()
        reader = HttpSecretSource(live.url, "r3e_not-a-valid-token")
        try:
            with pytest.raises(Exception, match="HTTP 401"):
                await reader.release(token=grant["token"], names=["remote-ok"])
        finally:
            await reader.aclose()

    asyncio.run(main())
    with live.client() as c:
        c.delete(f"/v1/enclaves/{enclave['id']}")


def test_cli_rotate_delete_and_audit_verify(live: LiveService, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = cli(live, capsys, "rotate-keys")
    assert code == 0 and "data key secret:sim-ok: now v2, 1 secret(s) re-encrypted" in out
    assert "signing key simulation" in out and "kept in the JWKS" in out
    code, out = cli(live, capsys, "list-keys")
    assert code == 0 and "KEK: file file:" in out and "current" in out
    with live.client() as c:
        broker_key = c.get("/v1/keys").json()["broker_key"]
    assert f"key broker: {broker_key}" in out
    code, out = cli(live, capsys, "delete-secret", "wrong-code")
    assert code == 0 and "deleted" in out
    code, out = cli(live, capsys, "delete-secret", "wrong-code")
    assert code == 2 and "no secret 'wrong-code'" in out
    code, out = cli(live, capsys, "audit-log", "--verify")
    assert code == 0 and "audit log intact" in out
    # someone with access to the database edits an entry: the CLI names it
    with sqlite3.connect(live.data_dir / "r3e-tee.sqlite3") as db:
        db.execute("UPDATE audit_log SET reason = NULL WHERE action = 'secret.deny' AND reason = 'revoked'")
        seq = db.execute(
            "SELECT seq FROM audit_log WHERE action = 'secret.deny' AND reason IS NULL"
        ).fetchone()[0]
    code, out = cli(live, capsys, "audit-log", "--verify")
    assert code == 1 and f"BROKEN at entry {seq}" in out and "edited" in out
    code, out = cli(live, capsys, "-o", "json", "audit-log", "--verify")
    assert code == 1 and json.loads(out)["first_broken"] == seq


def test_zz_the_value_is_nowhere(live: LiveService) -> None:
    """Last in this module: stops the service and searches its whole log and the store's files."""
    log = stop_service(live)
    assert "secrets released" in log and "secret release denied" in log
    assert TEXT not in log
    for out in OUTPUTS:
        assert TEXT not in out
    files = [f for f in live.data_dir.rglob("*") if f.is_file()]
    assert any(f.name.startswith("r3e-tee.sqlite3") for f in files)
    for f in files:
        assert SECRET not in f.read_bytes(), f


# --- start-up: a missing or wrong KEK stops the service ---------------------------------------------


def _start(tmp_path: Path, config: str, *, dev: bool = False) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "tee-config.yaml"
    cfg.write_text(config)
    data = str(tmp_path / "data")
    args = [sys.executable, "-m", "r3e_tee.service", "--config", str(cfg), "--data-dir", data, "--port", "1"]
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    return subprocess.run(
        [*args, *(["--dev"] if dev else [])], capture_output=True, text=True, timeout=60, env=env
    )


def test_missing_kek_stops_the_service(tmp_path: Path) -> None:
    proc = _start(tmp_path, f"keys:\n  file:\n    path: {tmp_path / 'kek' / 'kek.key'}\n")
    assert proc.returncode == 2
    assert f"KEK file {tmp_path / 'kek' / 'kek.key'} does not exist" in proc.stderr
    assert "openssl rand -out kek.key 32" in proc.stderr


def test_malformed_kek_stops_the_service(tmp_path: Path) -> None:
    kek = tmp_path / "kek.key"
    kek.write_text(os.urandom(32).hex() + "\n")
    proc = _start(tmp_path, f"keys:\n  file:\n    path: {kek}\n")
    assert proc.returncode == 2 and "64 hex characters" in proc.stderr and "xxd -r -p" in proc.stderr
    assert kek.read_text().strip() not in proc.stderr + proc.stdout


def test_wrong_kek_stops_the_service(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    right, wrong = write_kek(tmp_path / "right.key"), write_kek(tmp_path / "wrong.key")
    data = tmp_path / "data"
    svc = start_service(
        data, tmp_path / "state", config=_cfg(tmp_path, f"keys:\n  file:\n    path: {right}\n")
    )
    try:
        policy = _policy(tmp_path, "p", f"measurements: [{'ab' * 32}]\n")
        value = tmp_path / "v"
        value.write_bytes(SECRET)
        assert main(["--server", svc.url, "--token", svc.token, "put-secret", "s", "--value-file", str(value),
                     "--policy", str(policy)]) == 0  # fmt: skip
    finally:
        stop_service(svc)
    proc = _start(tmp_path, f"keys:\n  file:\n    path: {wrong}\n", dev=True)
    assert proc.returncode == 2, proc.stderr
    assert "wrong KEK" in proc.stderr and "previous_kek" in proc.stderr
    # KEK rotation: the new KEK with the old one as previous_kek re-wraps, then the new one alone works
    rotated = _cfg(
        tmp_path, f"keys:\n  file:\n    path: {wrong}\n  previous_kek:\n    file:\n      path: {right}\n"
    )
    svc = start_service(data, tmp_path / "state", config=rotated)
    stop_service(svc)
    svc = start_service(
        data, tmp_path / "state", config=_cfg(tmp_path, f"keys:\n  file:\n    path: {wrong}\n")
    )
    try:
        with svc.client() as c:
            assert c.get("/v1/secrets/s").json()["revision"] == 1
            entries = c.get("/v1/audit", params={"action": "kek.rewrap"}).json()["entries"]
            assert len(entries) == 1 and entries[0]["detail"]["keys"] >= 1
    finally:
        stop_service(svc)


def _cfg(tmp_path: Path, text: str) -> Path:
    f = tmp_path / f"cfg-{abs(hash(text))}.yaml"
    f.write_text(text)
    return f


# --- PKCS#11 KEK (SoftHSM2) in the service ------------------------------------------------------------


@pytest.mark.softhsm
def test_service_with_a_pkcs11_kek(
    softhsm: SoftHsm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pin = tmp_path / "pin"
    pin.write_text(softhsm.pin + "\n")
    pin.chmod(0o600)
    base = (
        f"keys:\n  kek_provider: pkcs11\n  pkcs11:\n    module: {softhsm.module}\n"
        f"    token_label: {softhsm.token}\n    pin_file: {pin}\n"
    )
    svc = start_service(
        tmp_path / "data", tmp_path / "state", config=_cfg(tmp_path, base + f"    key_label: {HSM_KEYS[2]}\n")
    )
    try:
        with svc.client() as c:
            enclave = _enclave(c)
            value = tmp_path / "v"
            value.write_bytes(SECRET)
            policy = _policy(
                tmp_path, "p", f"measurements: [{enclave['measurement']}]\nallow_simulation: true\n"
            )
            args = ["put-secret", "hsm-secret", "--value-file", str(value), "--policy", str(policy)]
            assert main(["--server", svc.url, "--token", svc.token, *args]) == 0
            r = c.post("/v1/secrets/deliver", json={"enclave_id": enclave["id"], "names": ["hsm-secret"]})
            assert r.status_code == 200 and r.json()["received"][0]["size"] == len(SECRET)
            keys = c.get("/v1/keys").json()
            assert keys["kek"] == {
                "provider": "pkcs11",
                "kek_id": f"pkcs11:{softhsm.token}/{HSM_KEYS[2]}",
                "location": f"pkcs11 token {softhsm.token!r} key {HSM_KEYS[2]!r}",
            }
            c.delete(f"/v1/enclaves/{enclave['id']}")
    finally:
        log = stop_service(svc)
    assert TEXT not in log and softhsm.pin not in log
    # another key of the token is the wrong KEK for this store; a wrong PIN is named, not echoed
    proc = _start(tmp_path, base + f"    key_label: {HSM_KEYS[1]}\n", dev=True)
    assert proc.returncode == 2 and "wrong KEK" in proc.stderr
    pin.write_text("999999\n")
    proc = _start(tmp_path, base + f"    key_label: {HSM_KEYS[2]}\n", dev=True)
    assert proc.returncode == 2 and "rejected the user PIN" in proc.stderr and "999999" not in proc.stderr
