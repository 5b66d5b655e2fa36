"""Rotation: secrets re-encrypted under new data keys, retired versions erased, the schedule run
once across replicas, token signing keys rotated with the old key kept in the JWKS until its
tokens expire, and every replica adopting the rotated key."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from r3e_tee.attestation.tokens import TokenError, verify_token
from r3e_tee.errors import ConflictError, NotFoundError
from r3e_tee.keys.errors import KeyRetiredError
from r3e_tee.keys.rotation import LOCK_NAME, META_LAST
from r3e_tee.store import Store, open_store

from .conftest import SECRET, Keys, make_keys

M = "ab" * 32
POLICY = {"measurements": [M], "allow_simulation": True}


def test_rotation_reencrypts_secrets_and_retires_beyond_retain(keys: Keys) -> None:
    keys.broker.put_secret("api-key", SECRET, POLICY, actor="t")
    old_blob = bytes(keys.store.fetchval("SELECT ciphertext FROM secrets WHERE name = 'api-key'"))
    report = keys.rotation.rotate(actor="admin:t", signing_keys=False)
    assert report["data_keys"] == [{"owner": "secret:api-key", "version": 2, "reencrypted": 1, "retired": []}]
    row = keys.store.fetchone("SELECT key_version, revision, ciphertext FROM secrets WHERE name = 'api-key'")
    assert row is not None and row["key_version"] == 2 and row["revision"] == 1
    assert bytes(row["ciphertext"]) != old_blob
    # the old version still decrypts what it encrypted (retain_versions = 2)
    assert keys.keystore.decrypt(None, "secret:api-key", "secret:api-key", 1, old_blob) == SECRET
    enclave = keys.attest(measurement=M)
    assert len(keys.broker.release(enclave.token, ["api-key"], actor="w").secrets) == 1
    report = keys.rotation.rotate(actor="admin:t", signing_keys=False)
    assert report["data_keys"][0]["retired"] == [1]
    with pytest.raises(KeyRetiredError):
        keys.keystore.decrypt(None, "secret:api-key", "secret:api-key", 1, old_blob)
    enclave = keys.attest(measurement=M)
    assert len(keys.broker.release(enclave.token, ["api-key"], actor="w").secrets) == 1
    assert keys.rotation.last_rotation() == pytest.approx(time.time(), abs=5)
    with pytest.raises(NotFoundError):
        keys.rotation.rotate(actor="t", owners=["secret:absent"], signing_keys=False)


def test_a_secret_moved_to_another_owner_during_its_old_owners_rotation_survives(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL replicas: an admin replaces a secret with a new key owner while the old owner
    rotates, after the rotation read the secret. The admin's write must wait for the rotation
    and then win: not deadlock with it (one of the two aborted), and never be overwritten by the
    rotation's re-encrypted old value (bound to the wrong owner, it would never decrypt)."""
    keys.broker.put_secret("db", SECRET, POLICY, actor="t", owner="tenant:a")
    fresh = b"the-new-password-written-during-rotation"
    encrypt = keys.keystore.encrypt
    writer: list[threading.Thread] = []
    errors: list[BaseException] = []

    def admin_write() -> None:
        try:
            keys.broker.put_secret("db", fresh, POLICY, actor="admin", owner="tenant:b")
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    def encrypt_then_let_the_admin_in(*args: object, **kwargs: object) -> tuple[int, bytes]:
        out = encrypt(*args, **kwargs)  # type: ignore[arg-type]
        if kwargs.get("actor") == "rotation" and not writer:
            # the rotation has read the secret: the admin's replacement runs now
            t = threading.Thread(target=admin_write)
            writer.append(t)
            t.start()
            t.join(1.0)  # done now unless it waits for this rotation (it should)
        return out

    monkeypatch.setattr(keys.keystore, "encrypt", encrypt_then_let_the_admin_in)
    keys.rotation.rotate_owner("tenant:a", actor="t")
    writer[0].join(15)
    assert not writer[0].is_alive() and not errors, errors
    row = keys.store.fetchone("SELECT owner, key_version, ciphertext FROM secrets WHERE name = 'db'")
    assert row is not None and row["owner"] == "tenant:b"
    value = keys.keystore.decrypt(
        None, "tenant:b", "secret:db", int(row["key_version"]), bytes(row["ciphertext"])
    )
    assert value == fresh


def test_schedule_runs_once_across_replicas(store_url: str, tmp_path: Path, kek_file: Path) -> None:
    stores = [open_store(store_url) for _ in range(3)]
    stores[0].migrate()
    replicas = [make_keys(s, kek_file) for s in stores]
    try:
        replicas[0].broker.put_secret("api-key", SECRET, POLICY, actor="t")
        assert not any(r.rotation.due() for r in replicas)  # the period counts from the first start
        assert replicas[0].rotation.run_if_due() is None
        stores[0].execute("UPDATE meta SET value = ? WHERE key = ?", (repr(time.time() - 7200), META_LAST))
        assert all(r.rotation.due() for r in replicas)
        # while one replica holds the lock the others skip
        with stores[0].try_lock(LOCK_NAME) as got:
            assert got
            assert replicas[1].rotation.run_if_due() is None
            with pytest.raises(ConflictError, match="rotation is running"):
                replicas[2].rotation.rotate(actor="admin:t")
        results: list[object] = []
        barrier = threading.Barrier(3)

        def run(r: Keys) -> None:
            barrier.wait()
            results.append(r.rotation.run_if_due())

        threads = [threading.Thread(target=run, args=(r,)) for r in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = [r for r in results if r is not None]
        assert len(done) == 1, results  # exactly one replica rotated
        versions = [k.version for k in replicas[0].keystore.list_keys("secret:api-key")]
        assert versions == [1, 2]
        assert not any(r.rotation.due() for r in replicas)
        rotations = replicas[0].audit.entries(action="key.rotate", limit=100)
        assert len(rotations) == 1 and rotations[0].actor == "scheduler"
    finally:
        for r in replicas:
            r.keystore.close()
        for s in stores:
            s.close()


def test_signing_key_rotation_keeps_the_old_key_until_its_tokens_expire(keys: Keys) -> None:
    old_token = keys.attest(measurement=M).token
    old_kid = keys.issuer.key_for("simulation").kid
    report = keys.rotation.rotate(actor="admin:t", data_keys=False)
    new = next(r for r in report["signing_keys"] if r["provider"] == "simulation")
    assert new["previous_kid"] == old_kid and new["kid"] != old_kid and new["alg"] == "ES256"
    jwks = keys.issuer.jwks()
    kids = {k["kid"] for k in jwks["keys"]}
    assert {old_kid, new["kid"]} <= kids
    assert verify_token(old_token, jwks)["measurement"] == M  # tokens of the old key still verify
    fresh = keys.attest(measurement=M)
    assert verify_token(fresh.token, jwks)  # new tokens carry the new kid
    import jwt

    assert jwt.get_unverified_header(fresh.token)["kid"] == new["kid"]
    stored = {k["kid"]: k for k in keys.rotation.signing_keys()}
    assert stored[new["kid"]]["state"] == "current" and stored[new["kid"]]["stored"]
    # once every token of the old key expired, it leaves the JWKS; a second rotation retires the
    # first stored key and, after its tokens expired, erases its wrapped copy
    keys.rotation.rotate(actor="admin:t", data_keys=False)
    keys.rotation.clock = lambda: time.time() + keys.issuer.ttl + 10
    assert keys.rotation.erase_expired_signing_keys() >= 1
    stored = {k["kid"]: k for k in keys.rotation.signing_keys()}
    assert stored[new["kid"]]["state"] == "retired" and not stored[new["kid"]]["stored"]
    for k in keys.issuer._retired:
        object.__setattr__(k, "retire_after", time.time() - 1)
    assert old_kid not in {k["kid"] for k in keys.issuer.jwks()["keys"]}
    with pytest.raises(TokenError, match="unknown key"):
        verify_token(old_token, keys.issuer.jwks())


def test_replicas_adopt_rotated_signing_keys(store: Store, kek_file: Path) -> None:
    a, b = make_keys(store, kek_file), make_keys(store, kek_file)
    try:
        # a replica's token verifies on another only if both know the key: rotate on A ...
        a.rotation.rotate(actor="admin:t", data_keys=False)
        a.broker.put_secret("api-key", SECRET, POLICY, actor="t")
        enclave = a.attest(measurement=M)
        # ... and B, which never saw the new key, adopts it on demand (unknown kid) and releases
        assert enclave.token and b.issuer.key_for("simulation").kid != a.issuer.key_for("simulation").kid
        out = b.broker.release(enclave.token, ["api-key"], actor="w")
        assert out.secrets and b.issuer.key_for("simulation").kid == a.issuer.key_for("simulation").kid
        assert b.rotation.sync_signing_keys() == 0  # already in step
        # B's JWKS keeps A's previous key too (tokens it signed are still valid)
        previous = a.audit.entries(action="signing_key.rotate")[0].detail["previous_kid"]
        assert previous in {k["kid"] for k in a.issuer.jwks()["keys"]}
    finally:
        a.keystore.close()
        b.keystore.close()


def test_stored_signing_key_swapped_between_rows_is_refused(keys: Keys) -> None:
    keys.rotation.rotate(actor="t", data_keys=False)
    rows = keys.store.fetchall("SELECT kid, provider, wrapped FROM signing_keys WHERE state = 'current'")
    sim = next(r for r in rows if r["provider"] == "simulation")
    sgx = next(r for r in rows if r["provider"] == "sgx")
    keys.store.execute(
        "UPDATE signing_keys SET wrapped = ? WHERE kid = ?", (bytes(sgx["wrapped"]), sim["kid"])
    )
    from r3e_tee.keys.errors import KeyIntegrityError

    with pytest.raises(KeyIntegrityError):
        keys.rotation._load(
            keys.store.fetchone("SELECT * FROM signing_keys WHERE kid = ?", (sim["kid"],))  # type: ignore[arg-type]
        )


def test_the_broker_identity_never_rotates(keys: Keys) -> None:
    """Enclaves are measured with the broker's identity key: scheduled rotation skips it and an
    explicit request is refused with the reason, and the key stays the same."""
    before = keys.broker.public_key_b64u()
    report = keys.rotation.rotate(actor="admin:t", signing_keys=False)
    assert all(not r["owner"].startswith("identity:") for r in report["data_keys"])
    with pytest.raises(ConflictError, match="measured with"):
        keys.rotation.rotate(actor="admin:t", signing_keys=False, owners=["identity:key-broker"])
    assert [k.version for k in keys.keystore.list_keys("identity:key-broker")] == [1]
    assert keys.broker.public_key_b64u() == before
