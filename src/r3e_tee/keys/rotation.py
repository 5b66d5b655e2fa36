"""Key rotation: data keys and attestation-token signing keys, on schedule or on request.

* Data keys: every owner (except the broker's sealing keys) gets a new current version; the
  secrets of that owner are re-encrypted under it in the same transaction (decrypted in memory
  only); versions beyond ``keys.retain_versions`` are retired (their wrapped key is erased) unless
  something still uses them. Older versions decrypt until retired.
* Signing keys: each provider's token signing key is replaced by a new one of the same kind,
  stored wrapped by the KEK so every replica signs with it; the old key stays in the JWKS (and
  in the store) until every token it signed has expired, then its wrapped copy is erased.
* The schedule (``keys.rotation_period``) runs once across replicas: each replica checks now and
  then, and the one that takes the store's lock (PostgreSQL advisory lock, SQLite lease) and still
  finds the rotation due performs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from r3e_tee.attestation.tokens import PrivateKey, TokenIssuer, algorithm_for, thumbprint
from r3e_tee.errors import ConflictError, KeyManagementError, NotFoundError, R3ETeeError
from r3e_tee.keys.audit import AuditLog
from r3e_tee.keys.broker import KeyBroker
from r3e_tee.keys.kek import zeroize
from r3e_tee.keys.keystore import IDENTITY_PREFIX, KeyStore, lock_owner, signing_key_aad
from r3e_tee.store import Store

log = logging.getLogger("r3e_tee.keys")

LOCK_NAME = "keys.rotation"
META_LAST = "keys.last_rotation"


def _new_key_like(old: PrivateKey) -> ec.EllipticCurvePrivateKey:
    curve = old.curve if isinstance(old, ec.EllipticCurvePrivateKey) else ec.SECP256R1()
    return ec.generate_private_key(curve)


class KeyRotation:
    def __init__(
        self,
        store: Store,
        keystore: KeyStore,
        broker: KeyBroker,
        audit: AuditLog,
        issuer: TokenIssuer,
        *,
        providers: Sequence[str],
        retain_versions: int,
        rotation_period: float,
        check_interval: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.keystore = keystore
        self.broker = broker
        self.audit = audit
        self.issuer = issuer
        self.providers = list(providers)
        self.retain_versions = retain_versions
        self.rotation_period = rotation_period
        self.check_interval = check_interval or max(1.0, min(60.0, rotation_period / 4))
        self.clock = clock
        self._issuer_lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    # -- schedule bookkeeping ------------------------------------------------------------------------

    def last_rotation(self) -> float | None:
        value = self.store.fetchval("SELECT value FROM meta WHERE key = ?", (META_LAST,))
        return float(value) if value is not None else None

    def _set_last(self, when: float) -> None:
        self.store.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (META_LAST, repr(when)),
        )

    def initialize(self) -> None:
        """At start: the schedule counts from the first start; signing keys rotated by any
        replica are loaded (the JWKS and token checks of every replica agree)."""
        if self.last_rotation() is None:
            self.store.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                (META_LAST, repr(self.clock())),
            )
        self.sync_signing_keys()

    def due(self) -> bool:
        last = self.last_rotation()
        return last is None or self.clock() - last >= self.rotation_period

    def next_rotation(self) -> float | None:
        last = self.last_rotation()
        return None if last is None else last + self.rotation_period

    # -- rotation --------------------------------------------------------------------------------------

    def rotate(
        self,
        *,
        actor: str,
        data_keys: bool = True,
        signing_keys: bool = True,
        owners: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Rotate now (``r3e-tee-cli rotate-keys``). Refused while another replica rotates."""
        with self.store.try_lock(LOCK_NAME) as got:
            if not got:
                raise ConflictError(
                    "a key rotation is running (another replica or the scheduler holds the lock)",
                    hint="try again in a minute",
                )
            return self._rotate(actor=actor, data_keys=data_keys, signing_keys=signing_keys, owners=owners)

    def run_if_due(self, *, actor: str = "scheduler") -> dict[str, Any] | None:
        """The scheduled rotation: at most one replica performs it per period."""
        if not self.due():
            return None
        with self.store.try_lock(LOCK_NAME) as got:
            if not got or not self.due():  # another replica holds it, or has just rotated
                return None
            log.info("scheduled key rotation", extra={"period_s": self.rotation_period})
            return self._rotate(actor=actor, data_keys=True, signing_keys=True, owners=None)

    def _rotate(
        self, *, actor: str, data_keys: bool, signing_keys: bool, owners: Sequence[str] | None
    ) -> dict[str, Any]:
        now = self.clock()
        report: dict[str, Any] = {"rotated_at": now, "data_keys": [], "signing_keys": []}
        if data_keys:
            for owner in owners if owners is not None else self.keystore.owners(rotating=True):
                report["data_keys"].append(self.rotate_owner(owner, actor=actor))
        if signing_keys:
            report["signing_keys"] = self.rotate_signing_keys(actor=actor)
        self._set_last(now)
        return report

    def rotate_owner(self, owner: str, *, actor: str) -> dict[str, Any]:
        if owner.startswith(IDENTITY_PREFIX):
            raise ConflictError(
                f"{owner} is the key broker's identity, which every enclave is measured with; "
                "rotating it would leave them unable to open anything the broker seals",
                hint="a compromised identity means a new installation: new measurements for every enclave",
            )
        with self.store.transaction() as tx:
            known = tx.fetchval("SELECT count(*) FROM data_keys WHERE owner = ?", (owner,))
            if not known:
                raise NotFoundError(f"no data keys of owner {owner!r}", hint="list them with GET /v1/keys")
            if tx.dialect == "postgresql":
                # hold this owner's secrets (after the owner lock, the order put_secret takes
                # them in): a concurrent put_secret moving one to another owner commits before
                # this reads it or after this commits, never in between; else the re-encryption
                # below would overwrite its new value with the old one under this owner's key
                lock_owner(tx, owner)
                tx.fetchall("SELECT name FROM secrets WHERE owner = ? FOR UPDATE", (owner,))
            version = self.keystore.rotate(tx, owner, actor=actor)
            reencrypted = self.broker.reencrypt(tx, owner)
            retired = self.keystore.retire(
                tx,
                owner,
                keep=self.retain_versions,
                actor=actor,
                in_use=self.broker.versions_in_use(tx, owner),
            )
        log.info(
            "data key rotated",
            extra={"owner": owner, "version": version, "reencrypted": reencrypted, "retired": retired},
        )
        return {"owner": owner, "version": version, "reencrypted": reencrypted, "retired": retired}

    def rotate_signing_keys(self, *, actor: str) -> list[dict[str, Any]]:
        out = []
        ttl = float(self.issuer.ttl)
        with self._issuer_lock:
            for provider in self.providers:
                old = self.issuer.key_for(provider)
                new_key = _new_key_like(old.key)
                kid, alg = thumbprint(new_key.public_key()), algorithm_for(new_key)
                der = bytearray(
                    new_key.private_bytes(
                        serialization.Encoding.DER,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
                try:
                    kek_id, wrapped = self.keystore.wrap(der, signing_key_aad(provider, kid))
                finally:
                    zeroize(der)
                now = self.clock()
                with self.store.transaction() as tx:
                    self.keystore.ensure_kek_current(tx, kek_id)
                    tx.execute(
                        "UPDATE signing_keys SET state = 'retired', retired_at = ?, retire_after = ? "
                        "WHERE provider = ? AND state = 'current'",
                        (now, now + ttl, provider),
                    )
                    tx.execute(
                        "INSERT INTO signing_keys (kid, provider, alg, state, kek_id, wrapped, created_at) "
                        "VALUES (?, ?, ?, 'current', ?, ?, ?)",
                        (kid, provider, alg, kek_id, wrapped, now),
                    )
                    self.audit.append(
                        tx,
                        actor=actor,
                        action="signing_key.rotate",
                        subject=provider,
                        detail={
                            "kid": kid,
                            "alg": alg,
                            "previous_kid": old.kid,
                            "kept_in_jwks_until": now + ttl,
                        },
                    )
                self.issuer.rotate(provider, new_key)
                out.append({"provider": provider, "kid": kid, "previous_kid": old.kid, "alg": alg})
        self.erase_expired_signing_keys()
        return out

    def erase_expired_signing_keys(self) -> int:
        """Retired signing keys whose last token has expired: their wrapped copy is erased."""
        return self.store.execute(
            "UPDATE signing_keys SET wrapped = NULL, kek_id = NULL "
            "WHERE state = 'retired' AND retire_after < ? AND wrapped IS NOT NULL",
            (self.clock(),),
        )

    def sync_signing_keys(self) -> int:
        """Adopt signing keys another replica rotated to; returns how many were loaded."""
        now = self.clock()
        rows = self.store.fetchall(
            "SELECT kid, provider, state, kek_id, wrapped FROM signing_keys WHERE wrapped IS NOT NULL "
            "AND (state = 'current' OR retire_after > ?) ORDER BY created_at",
            (now,),
        )
        loaded = 0
        with self._issuer_lock:
            known = {str(k["kid"]) for k in self.issuer.jwks()["keys"]}
            for provider in self.providers:
                mine = [r for r in rows if r["provider"] == provider]
                current = next((r for r in mine if r["state"] == "current"), None)
                if current is None or self.issuer.key_for(provider).kid == current["kid"]:
                    continue
                for row in mine:
                    if row["kid"] in known and row is not current:
                        continue
                    self.issuer.rotate(provider, self._load(row))
                    loaded += 1
        if loaded:
            log.info("signing keys loaded from the store", extra={"count": loaded})
        return loaded

    def _load(self, row: dict[str, Any]) -> PrivateKey:
        provider, kid = str(row["provider"]), str(row["kid"])
        der = self.keystore.unwrap(
            row["kek_id"], bytes(row["wrapped"]), signing_key_aad(provider, kid), what=f"signing key {kid}"
        )
        try:
            key = serialization.load_der_private_key(bytes(der), password=None)
        finally:
            zeroize(der)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or thumbprint(key.public_key()) != kid:
            raise KeyManagementError(f"stored signing key {kid} of {provider} is not the key its id names")
        return key

    def signing_keys(self) -> list[dict[str, Any]]:
        rows = self.store.fetchall(
            "SELECT kid, provider, alg, state, created_at, retired_at, retire_after, "
            "(wrapped IS NOT NULL) AS stored FROM signing_keys ORDER BY created_at"
        )
        return [{**r, "stored": bool(r["stored"])} for r in rows]

    # -- background loop -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="key-rotation")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                await anyio.to_thread.run_sync(self.run_if_due)
                await anyio.to_thread.run_sync(self.sync_signing_keys)
                await anyio.to_thread.run_sync(self.erase_expired_signing_keys)
            except R3ETeeError as exc:
                log.error("key rotation check failed", extra={"error": exc.message})
            except Exception as exc:  # noqa: BLE001 - the schedule must survive a store hiccup
                log.error("key rotation check failed", extra={"error": type(exc).__name__})
