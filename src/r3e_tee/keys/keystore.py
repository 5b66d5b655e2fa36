"""Versioned data keys per owner, wrapped by the KEK (envelope encryption).

An *owner* is what a data key protects: ``secret:<name>``, ``function:<name>``, ``tenant:<id>``,
``seal:<...>`` (the sealing keys the broker holds for Nitro enclaves) or ``identity:<...>`` (the
broker's own X25519 identity, which enclaves pin). Sealing and identity keys never rotate on
schedule: enclaves depend on them staying the same. Each owner has one
``current`` version (new encryptions), ``previous`` versions (still decrypt) and ``retired``
versions (the wrapped key is erased: what they encrypted can no longer be decrypted, and asking
is a :class:`KeyRetiredError`). Rotation adds a version; ``retain_versions`` bounds how many
stay usable.

Values are AES-256-GCM with associated data ``owner || version || record id``: a ciphertext
copied to another record, owner or version does not decrypt. Wrapped keys bind owner and version
the same way. Unwrapped keys are cached (as cipher objects) for a short time so a release does
not call an HSM per secret; the cache is dropped on rotation and on close.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from r3e_tee.errors import InvalidRequestError, KeyManagementError
from r3e_tee.keys.audit import AuditLog
from r3e_tee.keys.errors import KekError, KeyIntegrityError, KeyRetiredError
from r3e_tee.keys.kek import KekProvider, zeroize
from r3e_tee.store import Store, Tx
from r3e_tee.store.postgres import lock_key

OWNER_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}:[A-Za-z0-9._:/@+=-]{1,200}$")
SEAL_PREFIX = "seal:"
IDENTITY_PREFIX = "identity:"
RESERVED_PREFIXES = (SEAL_PREFIX, IDENTITY_PREFIX)  # not for secrets, not rotated on schedule
_VALUE_FORMAT = b"\x01"
_NONCE = 12
_CHECK_PLAINTEXT = b"r3e-tee KEK check value v1"

CURRENT, PREVIOUS, RETIRED = "current", "previous", "retired"


def check_owner(owner: str) -> str:
    if not OWNER_RE.match(owner):
        raise InvalidRequestError(
            f"invalid key owner {owner!r}",
            hint="write owners as kind:name, e.g. secret:db-password, function:pricing or tenant:acme",
        )
    return owner


def _dek_aad(owner: str, version: int) -> bytes:
    return b"data-key\0" + owner.encode() + b"\0" + str(version).encode()


def _value_aad(owner: str, version: int, record_id: str) -> bytes:
    return b"r3e-tee/value/v1\0" + owner.encode() + b"\0" + str(version).encode() + b"\0" + record_id.encode()


def _check_aad(kek_id: str) -> bytes:
    return b"kek-check\0" + kek_id.encode()


def lock_owner(tx: Tx, owner: str) -> None:
    """Serialise changes to one owner's keys across replicas (SQLite: the writer lock does it)."""
    if tx.dialect == "postgresql":
        tx.execute("SELECT pg_advisory_xact_lock(?)", (lock_key("data-key:" + owner),))


@dataclass(frozen=True)
class DataKeyInfo:
    owner: str
    version: int
    state: str
    kek_id: str | None
    created_at: float
    retired_at: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "version": self.version,
            "state": self.state,
            "kek_id": self.kek_id,
            "created_at": self.created_at,
            "retired_at": self.retired_at,
        }


class KeyStore:
    def __init__(
        self,
        store: Store,
        kek: KekProvider,
        audit: AuditLog,
        *,
        previous: KekProvider | None = None,
        cache_ttl: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.kek = kek
        self.previous = previous
        self.audit = audit
        self.cache_ttl = cache_ttl
        self.clock = clock
        self._cache: dict[tuple[str, int], tuple[float, AESGCM]] = {}
        self._cache_lock = threading.Lock()

    # -- KEK ---------------------------------------------------------------------------------------

    def _kek_for(self, kek_id: str | None, what: str) -> KekProvider:
        if kek_id == self.kek.kek_id:
            return self.kek
        if self.previous is not None and kek_id == self.previous.kek_id:
            return self.previous
        raise KekError(
            f"{what} is wrapped by KEK {kek_id}, which is not configured (current KEK: {self.kek.kek_id})",
            hint="configure that KEK as keys.previous_kek so the service re-wraps under the current one",
        )

    def wrap(self, key: bytes | bytearray, aad: bytes) -> tuple[str, bytes]:
        """Wrap key material under the current KEK; returns (kek_id, wrapped)."""
        return self.kek.kek_id, self.kek.wrap(key, aad)

    def ensure_kek_current(self, tx: Tx, kek_id: str) -> None:
        """Refuse to store a key wrapped by a KEK that a KEK rotation has retired.

        During a rolling KEK rotation a replica still on the old KEK would otherwise keep
        wrapping new keys with it after another replica re-wrapped everything: once the old KEK
        is removed (or destroyed, if it leaked) those keys never unwrap again. PostgreSQL: the
        shared lock waits for a re-wrap in progress (it holds the exclusive one) and then sees it.
        """
        if tx.dialect == "postgresql":
            tx.execute("SELECT pg_advisory_xact_lock_shared(?)", (lock_key("kek-registry"),))
        retired = tx.fetchval("SELECT retired_at FROM kek_registry WHERE kek_id = ?", (kek_id,))
        if retired is not None:
            raise KekError(
                f"KEK {kek_id} of this replica was retired by a KEK rotation; keys are now wrapped "
                "by a newer KEK and none may be wrapped by this one",
                hint="restart this replica with the new KEK (and the old one as keys.previous_kek)",
            )

    def unwrap(self, kek_id: str | None, blob: bytes, aad: bytes, *, what: str) -> bytearray:
        return self._kek_for(kek_id, what).unwrap(bytes(blob), aad)

    def check_kek(self, *, actor: str = "service") -> dict[str, Any]:
        """At start: is the configured KEK the store's KEK? Registers a new store's KEK, and
        re-wraps every key under the current KEK when ``keys.previous_kek`` names the old one.

        Raises :class:`KekError` for a wrong KEK: one whose check value does not decrypt, or a
        store whose keys are wrapped by a KEK that is neither the current nor the previous one.
        """
        cur = self.kek
        out: dict[str, Any] = {"kek_id": cur.kek_id, "registered": False, "rewrapped": 0}
        with self.store.transaction() as tx:
            if tx.dialect == "postgresql":
                tx.execute("SELECT pg_advisory_xact_lock(?)", (lock_key("kek-registry"),))
            registry = {
                str(r["kek_id"]): r
                for r in tx.fetchall("SELECT kek_id, check_blob, retired_at FROM kek_registry")
            }
            in_use = {
                str(r["kek_id"])
                for r in tx.fetchall(
                    "SELECT DISTINCT kek_id FROM data_keys WHERE wrapped IS NOT NULL "
                    "UNION SELECT DISTINCT kek_id FROM signing_keys WHERE wrapped IS NOT NULL"
                )
                if r["kek_id"] is not None
            }
            if cur.kek_id in registry:
                self._verify_check(cur, bytes(registry[cur.kek_id]["check_blob"]))
            foreign = in_use - {cur.kek_id}
            prev = self.previous
            if foreign:
                if prev is None or foreign != {prev.kek_id}:
                    where = ", ".join(sorted(foreign))
                    raise KekError(
                        f"wrong KEK: the configured KEK ({cur.label}, id {cur.kek_id}) is not the KEK "
                        f"this store's keys are wrapped with (id {where})",
                        hint="mount the KEK this store was created with; to move to a new KEK, keep the "
                        "old one configured as keys.previous_kek for one start so the service re-wraps",
                    )
                if prev.kek_id in registry:
                    self._verify_check(prev, bytes(registry[prev.kek_id]["check_blob"]))
            if cur.kek_id not in registry:
                tx.execute(
                    "INSERT INTO kek_registry (kek_id, provider, location, check_blob, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (cur.kek_id, cur.provider, cur.label, cur.wrap(_CHECK_PLAINTEXT, _check_aad(cur.kek_id)),
                     self.clock()),
                )  # fmt: skip
                self.audit.append(
                    tx,
                    actor=actor,
                    action="kek.register",
                    subject=cur.kek_id,
                    detail={"provider": cur.provider, "location": cur.label},
                )
                out["registered"] = True
            if foreign and prev is not None:
                out["rewrapped"] = self._rewrap(tx, prev, actor=actor)
        return out

    def _verify_check(self, kek: KekProvider, blob: bytes) -> None:
        try:
            plain = kek.unwrap(blob, _check_aad(kek.kek_id))
        except KeyIntegrityError:
            raise KekError(
                f"wrong KEK: {kek.label} (id {kek.kek_id}) does not decrypt the check value the store "
                "recorded for it; the key was replaced",
                hint="restore the original KEK (the HSM key or the Secret r3e-tee-kek)",
            ) from None
        ok = bytes(plain) == _CHECK_PLAINTEXT
        zeroize(plain)
        if not ok:
            raise KekError(f"wrong KEK: the check value of {kek.kek_id} decrypts to something else")

    def _rewrap(self, tx: Tx, old: KekProvider, *, actor: str) -> int:
        """Every key wrapped by ``old`` re-wrapped under the current KEK, in memory only."""
        count = 0
        for row in tx.fetchall(
            "SELECT owner, version, wrapped FROM data_keys WHERE kek_id = ? AND wrapped IS NOT NULL",
            (old.kek_id,),
        ):
            aad = _dek_aad(str(row["owner"]), int(row["version"]))
            key = old.unwrap(bytes(row["wrapped"]), aad)
            try:
                tx.execute(
                    "UPDATE data_keys SET kek_id = ?, wrapped = ? WHERE owner = ? AND version = ?",
                    (self.kek.kek_id, self.kek.wrap(key, aad), row["owner"], row["version"]),
                )
            finally:
                zeroize(key)
            count += 1
        for row in tx.fetchall(
            "SELECT kid, provider, wrapped FROM signing_keys WHERE kek_id = ? AND wrapped IS NOT NULL",
            (old.kek_id,),
        ):
            aad = signing_key_aad(str(row["provider"]), str(row["kid"]))
            key = old.unwrap(bytes(row["wrapped"]), aad)
            try:
                tx.execute(
                    "UPDATE signing_keys SET kek_id = ?, wrapped = ? WHERE kid = ?",
                    (self.kek.kek_id, self.kek.wrap(key, aad), row["kid"]),
                )
            finally:
                zeroize(key)
            count += 1
        tx.execute("UPDATE kek_registry SET retired_at = ? WHERE kek_id = ?", (self.clock(), old.kek_id))
        self.audit.append(
            tx,
            actor=actor,
            action="kek.rewrap",
            subject=self.kek.kek_id,
            detail={"from": old.kek_id, "to": self.kek.kek_id, "keys": count},
        )
        return count

    # -- data keys ---------------------------------------------------------------------------------

    def _create_version(self, tx: Tx, owner: str, *, actor: str, action: str) -> int:
        top = tx.fetchval("SELECT max(version) FROM data_keys WHERE owner = ?", (owner,))
        version = 1 if top is None else int(top) + 1
        key = bytearray(AESGCM.generate_key(bit_length=256))
        try:
            kek_id, wrapped = self.wrap(key, _dek_aad(owner, version))
        finally:
            zeroize(key)
        self.ensure_kek_current(tx, kek_id)
        tx.execute("UPDATE data_keys SET state = ? WHERE owner = ? AND state = ?", (PREVIOUS, owner, CURRENT))
        tx.execute(
            "INSERT INTO data_keys (owner, version, state, kek_id, wrapped, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (owner, version, CURRENT, kek_id, wrapped, self.clock()),
        )
        self.audit.append(
            tx,
            actor=actor,
            action=action,
            subject=owner,
            detail={"owner": owner, "version": version, "kek_id": kek_id},
        )
        return version

    def current_version(self, tx: Tx, owner: str, *, actor: str, create: bool = True) -> int | None:
        """The owner's current version (created as version 1 on first use). Call with the owner locked."""
        value = tx.fetchval(
            "SELECT version FROM data_keys WHERE owner = ? AND state = ?", (check_owner(owner), CURRENT)
        )
        if value is not None:
            return int(value)
        if not create:
            return None
        return self._create_version(tx, owner, actor=actor, action="key.create")

    def rotate(self, tx: Tx, owner: str, *, actor: str) -> int:
        """A new current version; the old current one becomes previous (still decrypts)."""
        lock_owner(tx, owner)
        version = self._create_version(tx, owner, actor=actor, action="key.rotate")
        self.drop_cache()
        return version

    def retire(self, tx: Tx, owner: str, *, keep: int, actor: str, in_use: set[int]) -> list[int]:
        """Retire (erase) versions beyond the newest ``keep``, except those still ``in_use``."""
        rows = tx.fetchall(
            "SELECT version FROM data_keys WHERE owner = ? AND state <> ? ORDER BY version DESC",
            (owner, RETIRED),
        )
        retired = []
        for row in rows[keep:]:
            version = int(row["version"])
            if version in in_use:
                self.audit.append(
                    tx,
                    actor=actor,
                    action="key.retire",
                    subject=owner,
                    outcome="skipped",
                    reason="in-use",
                    detail={"owner": owner, "version": version},
                )
                continue
            tx.execute(
                "UPDATE data_keys SET state = ?, wrapped = NULL, kek_id = NULL, retired_at = ? "
                "WHERE owner = ? AND version = ?",
                (RETIRED, self.clock(), owner, version),
            )
            self.audit.append(
                tx,
                actor=actor,
                action="key.retire",
                subject=owner,
                detail={"owner": owner, "version": version},
            )
            retired.append(version)
        if retired:
            self.drop_cache()
        return retired

    def _cipher(
        self, tx: Tx | None, owner: str, version: int, key_row: Mapping[str, Any] | None = None
    ) -> AESGCM:
        """The cipher of a data key version. ``key_row`` (state, kek_id, wrapped) saves the lookup
        when the caller read it in the same transaction."""
        now = time.monotonic()
        row = key_row
        if row is None:
            sql = "SELECT state, kek_id, wrapped FROM data_keys WHERE owner = ? AND version = ?"
            row = (
                tx.fetchone(sql, (owner, version))
                if tx is not None
                else self.store.fetchone(sql, (owner, version))
            )
        if row is None:
            raise KeyIntegrityError(
                f"data key {owner} version {version} does not exist",
                hint="the record names a key that was never created here: restore the store from a backup",
            )
        if row["state"] == RETIRED or row["wrapped"] is None:
            with self._cache_lock:
                self._cache.pop((owner, version), None)
            raise KeyRetiredError(
                f"data key {owner} version {version} is retired: what it encrypted can no longer be "
                "decrypted",
                hint="write the value again (it is encrypted with the current version)",
            )
        with self._cache_lock:
            hit = self._cache.get((owner, version))
        if hit is not None and hit[0] > now:
            return hit[1]
        key = self.unwrap(
            row["kek_id"],
            bytes(row["wrapped"]),
            _dek_aad(owner, version),
            what=f"data key {owner} v{version}",
        )
        try:
            cipher = AESGCM(bytes(key))
        finally:
            zeroize(key)
        with self._cache_lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[(owner, version)] = (now + self.cache_ttl, cipher)
        return cipher

    def encrypt(
        self, tx: Tx, owner: str, record_id: str, plaintext: bytes, *, actor: str
    ) -> tuple[int, bytes]:
        """Encrypt under the owner's current version (created on first use); returns (version, blob).

        Runs inside ``tx`` with the owner locked, so a concurrent rotation cannot retire the
        version between choosing it and committing the record.
        """
        lock_owner(tx, owner)
        version = self.current_version(tx, owner, actor=actor)
        assert version is not None
        nonce = os.urandom(_NONCE)
        blob = (
            _VALUE_FORMAT
            + nonce
            + self._cipher(tx, owner, version).encrypt(
                nonce, plaintext, _value_aad(owner, version, record_id)
            )
        )
        return version, blob

    def decrypt(
        self,
        tx: Tx | None,
        owner: str,
        record_id: str,
        version: int,
        blob: bytes,
        *,
        key_row: Mapping[str, Any] | None = None,
    ) -> bytes:
        blob = bytes(blob)
        if len(blob) < 1 + _NONCE + 16 or blob[:1] != _VALUE_FORMAT:
            raise KeyIntegrityError(f"the stored value of {record_id} is truncated or not of this product")
        cipher = self._cipher(tx, owner, version, key_row)
        try:
            return cipher.decrypt(
                blob[1 : 1 + _NONCE], blob[1 + _NONCE :], _value_aad(owner, version, record_id)
            )
        except InvalidTag:
            raise KeyIntegrityError(
                f"the stored value of {record_id} does not authenticate under data key {owner} version "
                f"{version}: it was corrupted or copied from another record",
                hint="write the value again, or restore the store from a backup",
            ) from None

    def key_material(self, tx: Tx, owner: str, *, actor: str) -> tuple[int, bytearray]:
        """The raw current key of an owner (the broker's Nitro sealing keys and its identity).
        Zeroize it after use."""
        lock_owner(tx, owner)
        version = self.current_version(tx, owner, actor=actor)
        assert version is not None
        row = tx.fetchone(
            "SELECT kek_id, wrapped FROM data_keys WHERE owner = ? AND version = ?", (owner, version)
        )
        if row is None or row["wrapped"] is None:
            raise KeyManagementError(f"data key {owner} version {version} vanished")
        key = self.unwrap(
            row["kek_id"],
            bytes(row["wrapped"]),
            _dek_aad(owner, version),
            what=f"data key {owner} v{version}",
        )
        return version, key

    def owners(self, *, rotating: bool = True) -> list[str]:
        rows = self.store.fetchall("SELECT DISTINCT owner FROM data_keys WHERE state = ?", (CURRENT,))
        names = sorted(str(r["owner"]) for r in rows)
        return [o for o in names if not (rotating and o.startswith(RESERVED_PREFIXES))]

    def list_keys(self, owner: str | None = None) -> list[DataKeyInfo]:
        sql = "SELECT owner, version, state, kek_id, created_at, retired_at FROM data_keys"
        params: tuple[Any, ...] = ()
        if owner:
            sql += " WHERE owner = ?"
            params = (owner,)
        return [
            DataKeyInfo(
                str(r["owner"]),
                int(r["version"]),
                str(r["state"]),
                r["kek_id"],
                float(r["created_at"]),
                r["retired_at"],
            )
            for r in self.store.fetchall(sql + " ORDER BY owner, version", params)
        ]

    def drop_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def close(self) -> None:
        self.drop_cache()
        self.kek.close()
        if self.previous is not None:
            self.previous.close()


def signing_key_aad(provider: str, kid: str) -> bytes:
    return b"r3e-tee/signing-key/v1\0" + provider.encode() + b"\0" + kid.encode()
