"""The key broker: stores secrets encrypted and releases them only to attested enclaves.

An enclave (through its worker) presents the attestation token the service signed for it. The
broker checks the token (signature, issuer, expiry), that it is not revoked and its enclave still
runs, then each requested secret's release policy against the token's claims, and returns the
secrets sealed with HPKE to the X25519 key the enclave bound into its evidence (``cnf.x25519``).
Only that enclave can open them, and only as coming from this broker: they are sealed in HPKE
auth mode with the broker's identity key (``identity:key-broker``, wrapped by the KEK like every
data key, never rotated), whose public half the service puts into every enclave's measured
configuration (``broker_key``). Every release and every denial is an audit-log entry with the
actor, the reason and a digest of the claims.

Changing a secret's release policy, or deleting the secret, revokes every token it was released
to: those enclaves must attest again and are checked against the new policy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import x25519

from r3e_tee.attestation.service import AttestationService
from r3e_tee.attestation.tokens import TokenError, verify_token
from r3e_tee.errors import InvalidRequestError, KeyManagementError, NotFoundError, PolicyError
from r3e_tee.keys import hpke
from r3e_tee.keys.audit import AuditLog, claims_digest
from r3e_tee.keys.errors import ReleaseDenied
from r3e_tee.keys.kek import zeroize
from r3e_tee.keys.keystore import (
    IDENTITY_PREFIX,
    RESERVED_PREFIXES,
    SEAL_PREFIX,
    KeyStore,
    check_owner,
    lock_owner,
)
from r3e_tee.keys.policy import ReleasePolicy
from r3e_tee.store import Store, Tx

log = logging.getLogger("r3e_tee.keys")

IDENTITY_OWNER = f"{IDENTITY_PREFIX}key-broker"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_SECRET_BYTES = 1024 * 1024
MAX_NAMES = 64
_SECRET_COLUMNS = (
    "name, owner, key_version, revision, size_bytes, policy, policy_digest, description, "
    "created_at, updated_at, created_by, updated_by"
)
_ENDED = ("terminated", "failed", "draining")
# only "?" placeholders and a locking clause are formatted in
_RELEASE_SQL = (
    "SELECT s.name, s.owner, s.key_version, s.revision, s.ciphertext, s.policy, s.policy_digest, "
    "k.state AS key_state, k.kek_id AS key_kek_id, k.wrapped AS key_wrapped "
    "FROM secrets s LEFT JOIN data_keys k ON k.owner = s.owner AND k.version = s.key_version "
    "WHERE s.name IN ({marks}){lock}"
)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequestError(
            f"invalid secret name {name!r}",
            hint="1-128 characters: letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    return name


def record_id(name: str) -> str:
    """What a secret's ciphertext is bound to (with the key owner and version)."""
    return f"secret:{name}"


def _share(tx: Tx) -> str:
    return " FOR SHARE OF s" if tx.dialect == "postgresql" else ""


def _update(tx: Tx) -> str:
    return " FOR UPDATE" if tx.dialect == "postgresql" else ""


@dataclass(frozen=True)
class SecretInfo:
    """A secret's metadata: everything but the value."""

    name: str
    owner: str
    revision: int
    key_version: int
    size_bytes: int
    policy: dict[str, Any]
    policy_digest: str
    description: str | None
    created_at: float
    updated_at: float
    created_by: str
    updated_by: str

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SecretInfo:
        return cls(
            name=str(row["name"]),
            owner=str(row["owner"]),
            revision=int(row["revision"]),
            key_version=int(row["key_version"]),
            size_bytes=int(row["size_bytes"]),
            policy=json.loads(row["policy"]),
            policy_digest=str(row["policy_digest"]),
            description=row["description"],
            created_at=float(row["created_at"]),
            updated_at=float(row["updated_at"]),
            created_by=str(row["created_by"]),
            updated_by=str(row["updated_by"]),
        )

    def to_dict(self) -> dict[str, Any]:
        unsafe = [k for k in ("allow_debug", "allow_simulation") if self.policy.get(k)]
        return {
            "name": self.name,
            "owner": self.owner,
            "revision": self.revision,
            "key_version": self.key_version,
            "size_bytes": self.size_bytes,
            "policy": self.policy,
            "policy_digest": self.policy_digest,
            "unsafe": unsafe,
            "description": self.description,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "created_by": self.created_by,
            "updated_by": self.updated_by,
        }


@dataclass(frozen=True)
class SecretChange:
    secret: SecretInfo
    created: bool
    policy_changed: bool
    revoked_attestations: tuple[str, ...]
    revoked_enclaves: tuple[str, ...]


@dataclass(frozen=True)
class SealedSecret:
    name: str
    revision: int
    sealed: bytes

    def to_wire(self) -> dict[str, Any]:
        """For the runtime channel (CBOR carries bytes)."""
        return {"name": self.name, "revision": self.revision, "sealed": self.sealed}


@dataclass(frozen=True)
class Release:
    attestation_id: str
    enclave_id: str
    expires_at: int
    secrets: tuple[SealedSecret, ...]
    broker_key: str  # the sender of the sealed blobs (base64url X25519)


@dataclass(frozen=True)
class SealedKey:
    attestation_id: str
    owner: str
    version: int
    sealed: bytes
    broker_key: str


class KeyBroker:
    def __init__(
        self,
        store: Store,
        keystore: KeyStore,
        audit: AuditLog,
        attestation: AttestationService,
        *,
        clock: Callable[[], float] = time.time,
        refresh_keys: Callable[[], object] | None = None,
    ) -> None:
        self.store = store
        self.keystore = keystore
        self.audit = audit
        self.attestation = attestation
        self.clock = clock
        # called once when a token names an unknown signing key (another replica rotated)
        self.refresh_keys = refresh_keys
        self._policies: dict[str, ReleasePolicy] = {}
        self._policies_lock = threading.Lock()
        self._tokens: dict[bytes, tuple[dict[str, Any], str]] = {}
        self._tokens_lock = threading.Lock()
        self._identity: x25519.X25519PrivateKey | None = None
        self._identity_b64u = ""
        self._identity_lock = threading.Lock()

    # -- identity ------------------------------------------------------------------------------------

    def identity(self) -> x25519.X25519PrivateKey:
        """The broker's X25519 identity: made once per installation (replicas share it through the
        store), kept in memory from then on, as the token signing keys are."""
        with self._identity_lock:
            if self._identity is None:
                with self.store.transaction() as tx:
                    _, raw = self.keystore.key_material(tx, IDENTITY_OWNER, actor="service")
                try:
                    identity = x25519.X25519PrivateKey.from_private_bytes(bytes(raw))
                finally:
                    zeroize(raw)
                self._identity_b64u = hpke.public_key_b64u(identity.public_key())
                self._identity = identity
            return self._identity

    def public_key_b64u(self) -> str:
        """What enclaves pin as ``broker_key`` (raw X25519, base64url without padding); encoded
        once, as every release names it."""
        self.identity()
        return self._identity_b64u

    # -- secrets (admin) ----------------------------------------------------------------------------

    def put_secret(
        self,
        name: str,
        value: bytes | bytearray,
        policy: ReleasePolicy | Mapping[str, Any],
        *,
        actor: str,
        owner: str | None = None,
        description: str | None = None,
    ) -> SecretChange:
        """Create or replace a secret. The value is encrypted before it reaches the store."""
        check_name(name)
        if not 1 <= len(value) <= MAX_SECRET_BYTES:
            raise InvalidRequestError(
                f"the value of secret {name!r} is {len(value)} bytes; 1 to {MAX_SECRET_BYTES} are accepted"
            )
        if not isinstance(policy, ReleasePolicy):
            policy = ReleasePolicy.from_dict(policy, source=f"release policy of secret {name!r}")
        key_owner = check_owner(owner or f"secret:{name}")
        if key_owner.startswith(RESERVED_PREFIXES):
            raise InvalidRequestError(
                f"key owner {key_owner!r} is reserved for the broker's sealing and identity keys"
            )
        if description is not None and len(description) > 1000:
            raise InvalidRequestError("description: at most 1000 characters")
        now = self.clock()
        with self.store.transaction() as tx:
            lock_owner(tx, key_owner)
            old = tx.fetchone(
                f"SELECT {_SECRET_COLUMNS} FROM secrets WHERE name = ?{_update(tx)}",  # noqa: S608
                (name,),
            )
            key_version, blob = self.keystore.encrypt(
                tx, key_owner, record_id(name), bytes(value), actor=actor
            )
            revision = 1 if old is None else int(old["revision"]) + 1
            policy_json = json.dumps(policy.to_dict(), sort_keys=True)
            if old is None:
                tx.execute(
                    "INSERT INTO secrets (name, owner, key_version, revision, ciphertext, size_bytes, "
                    "policy, policy_digest, description, created_at, updated_at, created_by, updated_by) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, key_owner, key_version, revision, blob, len(value), policy_json, policy.digest,
                     description, now, now, actor, actor),
                )  # fmt: skip
            else:
                tx.execute(
                    "UPDATE secrets SET owner = ?, key_version = ?, revision = ?, ciphertext = ?, "
                    "size_bytes = ?, policy = ?, policy_digest = ?, description = ?, updated_at = ?, "
                    "updated_by = ? WHERE name = ?",
                    (key_owner, key_version, revision, blob, len(value), policy_json, policy.digest,
                     description if description is not None else old["description"], now, actor, name),
                )  # fmt: skip
            changed = old is not None and old["policy_digest"] != policy.digest
            revoked_atts, revoked_enclaves = self._revoke_releases(tx, name) if changed else ((), ())
            self.audit.append(
                tx,
                actor=actor,
                action="secret.create" if old is None else "secret.update",
                subject=name,
                detail={
                    "revision": revision,
                    "owner": key_owner,
                    "key_version": key_version,
                    "size_bytes": len(value),
                    "policy_digest": policy.digest,
                    "policy_changed": changed,
                    "unsafe": policy.unsafe_choices(),
                    "revoked_attestations": list(revoked_atts),
                },
            )
            row = tx.fetchone(f"SELECT {_SECRET_COLUMNS} FROM secrets WHERE name = ?", (name,))  # noqa: S608
        assert row is not None
        log.info(
            "secret stored",
            extra={"secret_name": name, "revision": revision, "policy_changed": changed, "actor": actor},
        )
        return SecretChange(SecretInfo.from_row(row), old is None, changed, revoked_atts, revoked_enclaves)

    def _revoke_releases(self, tx: Tx, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        rows = tx.fetchall(
            "SELECT DISTINCT attestation_id, enclave_id FROM secret_releases WHERE secret_name = ?", (name,)
        )
        atts = tuple(sorted({str(r["attestation_id"]) for r in rows}))
        enclaves = tuple(sorted({str(r["enclave_id"]) for r in rows if r["enclave_id"]}))
        now = self.clock()
        for att in atts:
            tx.execute(
                "UPDATE attestations SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, att)
            )
        tx.execute("DELETE FROM secret_releases WHERE secret_name = ?", (name,))
        return atts, enclaves

    def get_secret(self, name: str) -> SecretInfo:
        row = self.store.fetchone(
            f"SELECT {_SECRET_COLUMNS} FROM secrets WHERE name = ?",  # noqa: S608 - constant columns
            (check_name(name),),
        )
        if row is None:
            raise NotFoundError(f"no secret {name!r}", hint="list secrets with r3e-tee-cli list-secrets")
        return SecretInfo.from_row(row)

    def list_secrets(self) -> list[SecretInfo]:
        rows = self.store.fetchall(f"SELECT {_SECRET_COLUMNS} FROM secrets ORDER BY name")  # noqa: S608
        return [SecretInfo.from_row(r) for r in rows]

    def delete_secret(self, name: str, *, actor: str) -> SecretChange:
        check_name(name)
        with self.store.transaction() as tx:
            row = tx.fetchone(
                f"SELECT {_SECRET_COLUMNS} FROM secrets WHERE name = ?{_update(tx)}",  # noqa: S608
                (name,),
            )
            if row is None:
                raise NotFoundError(f"no secret {name!r}")
            atts, enclaves = self._revoke_releases(tx, name)
            tx.execute("DELETE FROM secrets WHERE name = ?", (name,))
            self.audit.append(
                tx,
                actor=actor,
                action="secret.delete",
                subject=name,
                detail={"revision": int(row["revision"]), "revoked_attestations": list(atts)},
            )
        log.info("secret deleted", extra={"secret_name": name, "actor": actor})
        return SecretChange(SecretInfo.from_row(row), False, True, atts, enclaves)

    # -- rotation support --------------------------------------------------------------------------

    def reencrypt(self, tx: Tx, owner: str) -> int:
        """Re-encrypt every secret of ``owner`` under its current key version (in memory only)."""
        version = self.keystore.current_version(tx, owner, actor="rotation", create=False)
        if version is None:
            return 0
        count = 0
        for row in tx.fetchall(
            "SELECT name, key_version, ciphertext FROM secrets WHERE owner = ? AND key_version <> ?",
            (owner, version),
        ):
            name = str(row["name"])
            plain = bytearray(
                self.keystore.decrypt(
                    tx, owner, record_id(name), int(row["key_version"]), bytes(row["ciphertext"])
                )
            )
            try:
                new_version, blob = self.keystore.encrypt(
                    tx, owner, record_id(name), bytes(plain), actor="rotation"
                )
            finally:
                zeroize(plain)
            tx.execute(
                "UPDATE secrets SET key_version = ?, ciphertext = ? WHERE name = ?", (new_version, blob, name)
            )
            count += 1
        return count

    @staticmethod
    def versions_in_use(tx: Tx, owner: str) -> set[int]:
        rows = tx.fetchall("SELECT DISTINCT key_version FROM secrets WHERE owner = ?", (owner,))
        return {int(r["key_version"]) for r in rows}

    # -- release ----------------------------------------------------------------------------------

    def _policy(self, text: str, digest: str, name: str) -> ReleasePolicy:
        with self._policies_lock:
            hit = self._policies.get(digest)
        if hit is not None:
            return hit
        try:
            policy = ReleasePolicy.from_dict(json.loads(text), source=f"stored policy of {name!r}")
        except (PolicyError, ValueError) as exc:
            raise KeyManagementError(
                f"the stored release policy of secret {name!r} is unusable: {exc}"
            ) from None
        with self._policies_lock:
            if len(self._policies) > 1000:
                self._policies.clear()
            self._policies[digest] = policy
        return policy

    def verify_token(self, token: str) -> dict[str, Any]:
        """The claims of a token this service signed, still valid now; :class:`ReleaseDenied` otherwise.

        A token whose signature verified once is remembered (by its SHA-256) with the key that
        signed it: later checks of the same token re-check its validity window and that the key is
        still in the JWKS, not the signature. Revocation is checked by the caller on every release.
        """
        issuer = self.attestation.issuer
        now = self.clock()
        digest = hashlib.sha256(token.encode(errors="replace")).digest()
        kids = {str(k["kid"]) for k in issuer.jwks()["keys"]}
        with self._tokens_lock:
            hit = self._tokens.get(digest)
        if hit is not None:
            claims, kid = hit
            if kid in kids and claims["iat"] <= now <= claims["exp"]:
                return claims
            with self._tokens_lock:
                self._tokens.pop(digest, None)
        for attempt in (1, 2):
            try:
                claims = verify_token(token, issuer.jwks(), issuer=issuer.issuer, at=now)
            except TokenError as exc:
                if attempt == 1 and "unknown key" in exc.message and self.refresh_keys is not None:
                    self.refresh_keys()
                    continue
                exp = _unverified_exp(token)
                if exp is not None and exp < now and "unknown key" not in exc.message:
                    raise ReleaseDenied(
                        "expired",
                        f"the attestation token expired at {exp:.0f} (now {now:.0f})",
                        hint="attest again to obtain a fresh token",
                    ) from None
                raise ReleaseDenied(
                    "invalid-token", f"the attestation token is not valid: {exc.message}"
                ) from None
            kid = str(jwt.get_unverified_header(token).get("kid"))
            with self._tokens_lock:
                if len(self._tokens) >= 4096:
                    self._tokens.clear()
                self._tokens[digest] = (claims, kid)
            return claims
        raise AssertionError("unreachable")

    def _check_live(self, tx: Tx, claims: Mapping[str, Any]) -> None:
        att_id = str(claims.get("jti", ""))
        row = tx.fetchone(
            "SELECT a.verdict, a.revoked_at, a.enclave_id, e.state FROM attestations a "
            "LEFT JOIN enclaves e ON e.id = a.enclave_id WHERE a.id = ?",
            (att_id,),
        )
        if row is None or row["verdict"] != "valid":
            raise ReleaseDenied("revoked", f"attestation {att_id} is not on record as valid")
        if row["revoked_at"] is not None:
            raise ReleaseDenied(
                "revoked",
                f"attestation {att_id} was revoked at {float(row['revoked_at']):.0f} (enclave destroyed or a "
                "release policy changed)",
                hint="attest the enclave again",
            )
        if row["state"] in _ENDED:
            raise ReleaseDenied("revoked", f"enclave {row['enclave_id']} is {row['state']}")

    def _deny(
        self, exc: ReleaseDenied, *, actor: str, names: Sequence[str], digest: str | None, claims: Any
    ) -> None:
        detail: dict[str, Any] = {"secrets": list(names), "message": exc.message}
        if isinstance(claims, Mapping):
            detail.update(
                {
                    "attestation_id": claims.get("jti"),
                    "enclave_id": claims.get("sub"),
                    "provider": claims.get("provider"),
                    "measurement": claims.get("measurement"),
                }
            )
        if exc.check:
            detail["check"] = exc.check
        self.audit.record(
            actor=actor,
            action="secret.deny",
            subject=exc.secret or ",".join(names),
            outcome="denied",
            reason=exc.reason,
            detail=detail,
            claims_digest=digest,
        )
        log.warning(
            "secret release denied",
            extra={
                "reason": exc.reason,
                "secret_name": ",".join(names),
                "attestation_id": detail.get("attestation_id"),
                "actor": actor,
            },
        )

    def release(self, token: str, names: Iterable[str], *, actor: str) -> Release:
        """Seal the named secrets to the token's enclave, or raise :class:`ReleaseDenied` (audited).

        All or nothing: one secret the enclave may not have denies the whole request.
        """
        wanted = list(dict.fromkeys(names))
        if not wanted or len(wanted) > MAX_NAMES:
            raise InvalidRequestError(f"name 1 to {MAX_NAMES} secrets to release")
        for name in wanted:
            check_name(name)
        claims: dict[str, Any] | None = None
        digest: str | None = None
        try:
            try:
                claims = self.verify_token(token)
            finally:
                digest = claims_digest(claims) if claims is not None else _token_digest(token)
            try:
                public_key = hpke.public_key_from_b64u(str((claims.get("cnf") or {}).get("x25519", "")))
            except ValueError as exc:
                raise ReleaseDenied("invalid-token", f"the token binds no usable X25519 key: {exc}") from None
            att_id, enclave_id = str(claims["jti"]), str(claims["sub"])
            identity = self.identity()
            sealed: list[SealedSecret] = []
            with self.store.transaction() as tx:
                self._check_live(tx, claims)
                marks = ", ".join("?" for _ in wanted)
                rows = {
                    str(r["name"]): r
                    for r in tx.fetchall(
                        _RELEASE_SQL.format(marks=marks, lock=_share(tx)),
                        wanted,
                    )
                }
                for name in wanted:
                    row = rows.get(name)
                    if row is None:
                        raise ReleaseDenied("unknown-secret", f"no secret {name!r}", secret=name)
                    self._policy(str(row["policy"]), str(row["policy_digest"]), name).check(
                        claims, secret=name
                    )
                now = self.clock()
                for name in wanted:
                    row = rows[name]
                    revision = int(row["revision"])
                    value = self.keystore.decrypt(
                        tx,
                        str(row["owner"]),
                        record_id(name),
                        int(row["key_version"]),
                        bytes(row["ciphertext"]),
                        key_row=_key_row(row),
                    )
                    sealed.append(
                        SealedSecret(
                            name,
                            revision,
                            hpke.seal(public_key, value, hpke.secret_info(att_id, name, revision), identity),
                        )
                    )
                    tx.execute(
                        "INSERT INTO secret_releases (secret_name, revision, attestation_id, enclave_id, "
                        "released_at) VALUES (?, ?, ?, ?, ?)",
                        (name, revision, att_id, enclave_id, now),
                    )
                    self.audit.append(
                        tx,
                        actor=actor,
                        action="secret.release",
                        subject=name,
                        detail={
                            "revision": revision,
                            "attestation_id": att_id,
                            "enclave_id": enclave_id,
                            "provider": claims.get("provider"),
                            "measurement": claims.get("measurement"),
                            "suite": hpke.SUITE_NAME,
                        },
                        claims_digest=digest,
                    )
        except ReleaseDenied as exc:
            self._deny(exc, actor=actor, names=wanted, digest=digest, claims=claims)
            raise
        except KeyManagementError as exc:
            # a corrupted or retired key: nothing was released; the failure is on record
            self.audit.record(
                actor=actor,
                action="secret.release",
                subject=",".join(wanted),
                outcome="error",
                reason=exc.code,
                detail={"secrets": wanted, "message": exc.message},
                claims_digest=digest,
            )
            raise
        log.info(
            "secrets released",
            extra={
                "secret_name": ",".join(wanted),
                "attestation_id": att_id,
                "enclave_id": enclave_id,
                "actor": actor,
            },
        )
        return Release(att_id, enclave_id, int(claims["exp"]), tuple(sealed), self.public_key_b64u())

    # -- Nitro sealing keys ---------------------------------------------------------------------------

    def sealing_key(self, token: str, *, actor: str) -> SealedKey:
        """The broker-held sealing key of the token's PCRs (Nitro has no hardware sealing), sealed to
        the enclave. Only an enclave with the same PCR0, PCR1, PCR2 and PCR8 receives the same key."""
        claims: dict[str, Any] | None = None
        digest: str | None = None
        what = ["sealing-key"]
        try:
            try:
                claims = self.verify_token(token)
            finally:
                digest = claims_digest(claims) if claims is not None else _token_digest(token)
            if claims.get("evidence_kind") != "nitro":
                raise ReleaseDenied(
                    "kind-not-allowed",
                    "the broker holds sealing keys for Nitro enclaves only; SGX enclaves seal with "
                    "their own hardware key",
                    check="seal.kind",
                    observed=str(claims.get("evidence_kind")),
                    expected="nitro",
                )
            if claims.get("debug"):
                raise ReleaseDenied(
                    "debug-enclave",
                    "a debug Nitro enclave reports zero PCRs: it cannot have a sealing key of its own",
                    check="seal.debug",
                    observed="debug=true",
                    expected="debug=false",
                )
            owner = nitro_seal_owner(claims)
            public_key = hpke.public_key_from_b64u(str((claims.get("cnf") or {}).get("x25519", "")))
            att_id = str(claims["jti"])
            identity = self.identity()
            with self.store.transaction() as tx:
                self._check_live(tx, claims)
                version, key = self.keystore.key_material(tx, owner, actor=actor)
                try:
                    sealed = hpke.seal(public_key, key, hpke.seal_key_info(att_id, owner, version), identity)
                finally:
                    zeroize(key)
                self.audit.append(
                    tx,
                    actor=actor,
                    action="seal_key.release",
                    subject=owner,
                    detail={"version": version, "attestation_id": att_id, "enclave_id": claims.get("sub")},
                    claims_digest=digest,
                )
        except ValueError as exc:
            denied = ReleaseDenied("invalid-token", f"the token binds no usable key material: {exc}")
            self._deny(denied, actor=actor, names=what, digest=digest, claims=claims)
            raise denied from None
        except ReleaseDenied as exc:
            self._deny(exc, actor=actor, names=what, digest=digest, claims=claims)
            raise
        return SealedKey(att_id, owner, version, sealed, self.public_key_b64u())


def nitro_seal_owner(claims: Mapping[str, Any]) -> str:
    """The key owner named by an enclave's PCRs (and whether its evidence was simulated)."""
    tee = claims.get("tee") if isinstance(claims.get("tee"), Mapping) else {}
    pcrs = tee.get("pcrs") if isinstance(tee, Mapping) else None
    if not isinstance(pcrs, Mapping):
        raise ValueError("the token carries no PCRs")
    h = hashlib.sha256(b"simulated\0" if claims.get("simulated") else b"hardware\0")
    for idx in (0, 1, 2, 8):
        value = pcrs.get(str(idx), pcrs.get(idx))
        if idx != 8 and not isinstance(value, str):
            raise ValueError(f"the token carries no PCR{idx}")
        h.update(f"{idx}=".encode() + str(value or "").lower().encode() + b";")
    return f"{SEAL_PREFIX}nitro:{h.hexdigest()[:40]}"


def _key_row(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """The data-key columns joined onto a secret row (None when the key row is missing)."""
    if row["key_state"] is None:
        return None
    return {"state": row["key_state"], "kek_id": row["key_kek_id"], "wrapped": row["key_wrapped"]}


def _unverified_exp(token: str) -> float | None:
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, int | float) else None


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode(errors="replace")).hexdigest()


__all__ = [
    "IDENTITY_OWNER",
    "KeyBroker",
    "Release",
    "SealedKey",
    "SealedSecret",
    "SecretChange",
    "SecretInfo",
    "check_name",
    "nitro_seal_owner",
]
