"""The key store on SQLite and PostgreSQL: envelope encryption, AAD binding, rotation end to end,
KEK checks at start and KEK rotation by re-wrapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from r3e_tee.keys.audit import AuditLog
from r3e_tee.keys.errors import KekError, KeyIntegrityError, KeyRetiredError
from r3e_tee.keys.kek import FileKek
from r3e_tee.keys.keystore import KeyStore
from r3e_tee.store import Store

from .conftest import SECRET, Keys, make_keys, write_kek


def _dump(store: Store) -> bytes:
    """Every value of every table, as bytes (what a reader of the database sees)."""
    tables = [
        "kek_registry",
        "data_keys",
        "secrets",
        "secret_releases",
        "signing_keys",
        "audit_log",
        "attestations",
        "meta",
    ]
    out = bytearray()
    for table in tables:
        for row in store.fetchall(f"SELECT * FROM {table}"):
            for value in row.values():
                out += bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()
                out += b"\0"
    return bytes(out)


def test_encrypt_decrypt_and_associated_data(keys: Keys) -> None:
    ks = keys.keystore
    with keys.store.transaction() as tx:
        v, blob = ks.encrypt(tx, "tenant:acme", "secret:a", SECRET, actor="t")
        v2, blob2 = ks.encrypt(tx, "tenant:acme", "secret:b", b"other", actor="t")
    assert v == v2 == 1 and SECRET not in blob
    assert ks.decrypt(None, "tenant:acme", "secret:a", 1, blob) == SECRET
    # a ciphertext moved to another record, owner or version does not decrypt
    with pytest.raises(KeyIntegrityError, match="secret:b"):
        ks.decrypt(None, "tenant:acme", "secret:b", 1, blob)
    with pytest.raises(KeyIntegrityError):
        ks.decrypt(None, "tenant:other", "secret:a", 1, blob)
    with pytest.raises(KeyIntegrityError, match="truncated"):
        ks.decrypt(None, "tenant:acme", "secret:a", 1, blob[:8])
    flipped = bytearray(blob)
    flipped[-3] ^= 1
    with pytest.raises(KeyIntegrityError, match="does not authenticate"):
        ks.decrypt(None, "tenant:acme", "secret:a", 1, bytes(flipped))
    assert SECRET not in _dump(keys.store)


def test_corrupted_wrapped_key_is_a_typed_error(keys: Keys) -> None:
    ks = keys.keystore
    with keys.store.transaction() as tx:
        _, blob = ks.encrypt(tx, "secret:x", "secret:x", SECRET, actor="t")
    wrapped = bytes(keys.store.fetchval("SELECT wrapped FROM data_keys WHERE owner = 'secret:x'"))
    bad = bytearray(wrapped)
    bad[15] ^= 0x40
    keys.store.execute("UPDATE data_keys SET wrapped = ? WHERE owner = 'secret:x'", (bytes(bad),))
    ks.drop_cache()
    with pytest.raises(KeyIntegrityError, match="wrapped key does not authenticate") as err:
        ks.decrypt(None, "secret:x", "secret:x", 1, blob)
    assert err.value.code == "key_integrity" and err.value.hint
    keys.store.execute("UPDATE data_keys SET wrapped = ? WHERE owner = 'secret:x'", (b"\x01short",))
    with pytest.raises(KeyIntegrityError, match="not a wrapped key"):
        ks.decrypt(None, "secret:x", "secret:x", 1, blob)
    with pytest.raises(KeyIntegrityError, match="does not exist"):
        ks.decrypt(None, "secret:x", "secret:x", 7, blob)


def test_rotation_end_to_end_new_version_old_decrypts_retired_refuses(keys: Keys) -> None:
    """retain_versions=2: v1 survives one rotation, is retired by the second."""
    ks, store = keys.keystore, keys.store
    with store.transaction() as tx:
        v1, blob1 = ks.encrypt(tx, "function:pricing", "rec", SECRET, actor="t")
    with store.transaction() as tx:
        assert ks.rotate(tx, "function:pricing", actor="t") == 2
        v2, blob2 = ks.encrypt(tx, "function:pricing", "rec", SECRET, actor="t")
        assert ks.retire(tx, "function:pricing", keep=2, actor="t", in_use=set()) == []
    assert (v1, v2) == (1, 2)  # new version issued
    assert ks.decrypt(None, "function:pricing", "rec", 1, blob1) == SECRET  # old one still decrypts
    with store.transaction() as tx:
        ks.rotate(tx, "function:pricing", actor="t")
        # still referenced versions are kept (and the skip is audited)
        assert ks.retire(tx, "function:pricing", keep=2, actor="t", in_use={1}) == []
        assert ks.retire(tx, "function:pricing", keep=2, actor="t", in_use=set()) == [1]
    with pytest.raises(KeyRetiredError, match="version 1 is retired"):  # retired one refuses
        ks.decrypt(None, "function:pricing", "rec", 1, blob1)
    assert ks.decrypt(None, "function:pricing", "rec", 2, blob2) == SECRET
    states = {k.version: k.state for k in ks.list_keys("function:pricing")}
    assert states == {1: "retired", 2: "previous", 3: "current"}
    row = store.fetchone(
        "SELECT wrapped, kek_id FROM data_keys WHERE owner = 'function:pricing' AND version = 1"
    )
    assert row == {"wrapped": None, "kek_id": None}  # the key material is gone
    actions = [e.action for e in keys.audit.entries(limit=100)]
    assert actions.count("key.rotate") == 2 and "key.retire" in actions and "key.create" in actions


def test_check_kek_registers_then_refuses_a_wrong_kek(store: Store, tmp_path: Path) -> None:
    k = make_keys(store, write_kek(tmp_path / "a.key"))
    with store.transaction() as tx:
        k.keystore.encrypt(tx, "secret:s", "secret:s", SECRET, actor="t")
    entries = k.audit.entries()
    assert entries[0].action == "kek.register" and entries[0].subject == k.kek.kek_id
    # the same KEK again: fine, nothing new registered
    again = KeyStore(store, FileKek.load(tmp_path / "a.key"), AuditLog(store)).check_kek()
    assert again == {"kek_id": k.kek.kek_id, "registered": False, "rewrapped": 0}
    # another KEK: the store's keys are not wrapped by it
    other = FileKek.load(write_kek(tmp_path / "b.key"))
    with pytest.raises(KekError, match="wrong KEK") as err:
        KeyStore(store, other, AuditLog(store)).check_kek()
    assert k.kek.kek_id in err.value.message and "previous_kek" in (err.value.hint or "")


def test_replaced_key_with_the_same_id_fails_its_check_value(store: Store, tmp_path: Path) -> None:
    """A PKCS#11 key replaced under the same label keeps its id: the check value catches it."""
    k = make_keys(store, write_kek(tmp_path / "a.key"))
    impostor = FileKek.load(write_kek(tmp_path / "b.key"))
    impostor.kek_id = k.kek.kek_id
    with pytest.raises(KekError, match="does not decrypt the check value"):
        KeyStore(store, impostor, AuditLog(store)).check_kek()


def test_kek_rotation_rewraps_without_plaintext(store: Store, tmp_path: Path) -> None:
    old_path, new_path = write_kek(tmp_path / "old.key"), write_kek(tmp_path / "new.key")
    k = make_keys(store, old_path)
    with store.transaction() as tx:
        _, blob = k.keystore.encrypt(tx, "secret:s", "secret:s", SECRET, actor="t")
    k.rotation.rotate_signing_keys(actor="t")  # a stored signing key is wrapped too
    old, new = FileKek.load(old_path), FileKek.load(new_path)
    ks = KeyStore(store, new, AuditLog(store), previous=old)
    status = ks.check_kek(actor="operator")
    assert status["registered"] and status["rewrapped"] == 1 + 3  # one data key, three signing keys
    ids = {
        r["kek_id"]
        for r in store.fetchall("SELECT kek_id FROM data_keys UNION SELECT kek_id FROM signing_keys")
    }
    assert ids == {new.kek_id}
    # the new KEK alone decrypts; the old one is no longer needed (nor accepted as current)
    alone = KeyStore(store, FileKek.load(new_path), AuditLog(store))
    alone.check_kek()
    assert alone.decrypt(None, "secret:s", "secret:s", 1, blob) == SECRET
    with pytest.raises(KekError, match="wrong KEK"):
        KeyStore(store, FileKek.load(old_path), AuditLog(store)).check_kek()
    rewrap = [e for e in AuditLog(store).entries(limit=1000) if e.action == "kek.rewrap"]
    assert rewrap and rewrap[0].detail == {"from": old.kek_id, "to": new.kek_id, "keys": 4}
    assert SECRET not in _dump(store)


def test_a_replica_still_on_the_old_kek_wraps_nothing_after_the_rewrap(store: Store, tmp_path: Path) -> None:
    """Rolling KEK rotation: replica B still runs with the old KEK after replica A (new KEK, old
    one as previous) re-wrapped every key. Keys B wrapped now would be lost with the old KEK."""
    old_path, new_path = write_kek(tmp_path / "old.key"), write_kek(tmp_path / "new.key")
    b = make_keys(store, old_path)
    with store.transaction() as tx:
        b.keystore.encrypt(tx, "secret:s", "secret:s", SECRET, actor="t")
    old, new = FileKek.load(old_path), FileKek.load(new_path)
    assert KeyStore(store, new, AuditLog(store), previous=old).check_kek(actor="operator")["rewrapped"]
    with pytest.raises(KekError, match="retired by a KEK rotation") as err, store.transaction() as tx:
        b.keystore.encrypt(tx, "secret:fresh", "secret:fresh", SECRET, actor="t")
    assert "restart this replica with the new KEK" in (err.value.hint or "")
    with pytest.raises(KekError, match="retired by a KEK rotation"):
        b.rotation.rotate_signing_keys(actor="t")
    wrapped_by = {
        r["kek_id"]
        for r in store.fetchall(
            "SELECT kek_id FROM data_keys WHERE wrapped IS NOT NULL "
            "UNION SELECT kek_id FROM signing_keys WHERE wrapped IS NOT NULL"
        )
    }
    assert wrapped_by == {new.kek_id}
    # the new KEK alone opens everything: the old one can go
    alone = KeyStore(store, FileKek.load(new_path), AuditLog(store))
    assert alone.check_kek()["rewrapped"] == 0


def test_owner_names_are_checked(keys: Keys) -> None:
    from r3e_tee.errors import InvalidRequestError

    with keys.store.transaction() as tx, pytest.raises(InvalidRequestError, match="invalid key owner"):
        keys.keystore.encrypt(tx, "no-colon", "r", b"x", actor="t")
