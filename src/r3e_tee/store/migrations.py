"""Versioned schema migrations, append-only, written once for both dialects.

``{blob}`` and ``{serial}`` are the only dialect differences the schema needs. A migration is
never edited after it ships: change the schema by appending a new version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from r3e_tee.store.base import Store, Tx, iter_statements

_TYPES = {
    "sqlite": {"blob": "BLOB", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"blob": "BYTEA", "serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"},
}


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    script: str


MIGRATIONS: list[Migration] = [
    Migration(
        1,
        "foundation: meta, admin tokens, locks, cache",
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE admin_tokens (
            token_hash TEXT PRIMARY KEY,
            scope TEXT NOT NULL,
            label TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE locks (
            name TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE cache (
            key TEXT PRIMARY KEY,
            value {blob} NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX cache_expires ON cache (expires_at)
        """,
    ),
    Migration(
        2,
        "enclaves: nonces, attestations, enclaves, workers",
        """
        CREATE TABLE nonces (
            nonce TEXT PRIMARY KEY,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX nonces_expires ON nonces (expires_at);
        CREATE TABLE attestations (
            id TEXT PRIMARY KEY,
            enclave_id TEXT,
            provider TEXT NOT NULL,
            kind TEXT,
            verdict TEXT NOT NULL,
            reason TEXT,
            detail TEXT,
            claims TEXT,
            evidence {blob} NOT NULL,
            evidence_sha256 TEXT NOT NULL,
            collateral TEXT,
            nonce TEXT,
            public_keys TEXT,
            token_kid TEXT,
            token_expires_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION,
            created_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX attestations_enclave ON attestations (enclave_id);
        CREATE TABLE workers (
            id TEXT PRIMARY KEY,
            url TEXT,
            providers TEXT NOT NULL,
            capacity TEXT NOT NULL,
            secret TEXT NOT NULL,
            simulation_roots TEXT,
            started_at DOUBLE PRECISION NOT NULL,
            last_heartbeat DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE enclaves (
            id TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            size_bytes BIGINT NOT NULL,
            debug INTEGER NOT NULL,
            evidence_format TEXT NOT NULL,
            state TEXT NOT NULL,
            reason TEXT,
            measurement TEXT,
            attestation_id TEXT,
            worker_id TEXT,
            pid INTEGER,
            public_keys TEXT,
            function_name TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            ready_at DOUBLE PRECISION,
            terminated_at DOUBLE PRECISION
        );
        CREATE INDEX enclaves_state ON enclaves (state);
        CREATE INDEX enclaves_worker ON enclaves (worker_id)
        """,
    ),
]

MIGRATIONS.append(
    Migration(
        3,
        "key management: KEKs, data keys, secrets, releases, signing keys, audit log",
        """
        CREATE TABLE kek_registry (
            kek_id TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            location TEXT NOT NULL,
            check_blob {blob} NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            retired_at DOUBLE PRECISION
        );
        CREATE TABLE data_keys (
            owner TEXT NOT NULL,
            version INTEGER NOT NULL,
            state TEXT NOT NULL,
            kek_id TEXT,
            wrapped {blob},
            created_at DOUBLE PRECISION NOT NULL,
            retired_at DOUBLE PRECISION,
            PRIMARY KEY (owner, version)
        );
        CREATE INDEX data_keys_state ON data_keys (state);
        CREATE TABLE secrets (
            name TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            key_version INTEGER NOT NULL,
            revision INTEGER NOT NULL,
            ciphertext {blob} NOT NULL,
            size_bytes INTEGER NOT NULL,
            policy TEXT NOT NULL,
            policy_digest TEXT NOT NULL,
            description TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            created_by TEXT NOT NULL,
            updated_by TEXT NOT NULL
        );
        CREATE INDEX secrets_owner ON secrets (owner, key_version);
        CREATE TABLE secret_releases (
            id {serial},
            secret_name TEXT NOT NULL,
            revision INTEGER NOT NULL,
            attestation_id TEXT NOT NULL,
            enclave_id TEXT,
            released_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX secret_releases_name ON secret_releases (secret_name);
        CREATE TABLE signing_keys (
            kid TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            alg TEXT NOT NULL,
            state TEXT NOT NULL,
            kek_id TEXT,
            wrapped {blob},
            created_at DOUBLE PRECISION NOT NULL,
            retired_at DOUBLE PRECISION,
            retire_after DOUBLE PRECISION
        );
        CREATE TABLE audit_log (
            seq BIGINT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            subject TEXT,
            outcome TEXT NOT NULL,
            reason TEXT,
            detail TEXT NOT NULL,
            claims_digest TEXT,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )
        """,
    )
)

MIGRATIONS.append(
    Migration(
        4,
        "functions: versions and invocations",
        """
        CREATE TABLE functions (
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            config TEXT NOT NULL,
            code {blob} NOT NULL,
            code_sha256 TEXT NOT NULL,
            measurement TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            deleted_at DOUBLE PRECISION,
            PRIMARY KEY (name, version)
        );
        CREATE TABLE invocations (
            id TEXT PRIMARY KEY,
            function TEXT NOT NULL,
            version INTEGER NOT NULL,
            status TEXT NOT NULL,
            input {blob} NOT NULL,
            encrypted INTEGER NOT NULL,
            reply_key {blob},
            output {blob},
            output_encrypted INTEGER NOT NULL DEFAULT 0,
            receipt TEXT,
            error TEXT,
            idempotency_key TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            lease_until DOUBLE PRECISION,
            enclave_id TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION
        );
        CREATE UNIQUE INDEX invocations_idempotency ON invocations (function, idempotency_key);
        CREATE INDEX invocations_queue ON invocations (status, created_at)
        """,
    )
)
MIGRATIONS.append(
    Migration(
        5,
        "invocations: digest of the request an idempotency key was first used with",
        """
        ALTER TABLE invocations ADD COLUMN request_sha256 TEXT
        """,
    )
)
MIGRATIONS.append(
    Migration(
        6,
        "workers: the token that registered each worker (its id is that token's)",
        """
        ALTER TABLE workers ADD COLUMN token_hash TEXT
        """,
    )
)
# Version 3 is reserved for key management (keys/). Kept in version order whatever the append order.
MIGRATIONS.sort(key=lambda m: m.version)
LATEST_VERSION = max(m.version for m in MIGRATIONS)

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL
)
"""


def _serialise(tx: Tx) -> None:
    """Make concurrent migrators (replicas starting together) wait for each other."""
    if tx.dialect == "postgresql":
        tx.execute("SELECT pg_advisory_xact_lock(?)", (7_355_608,))
    # SQLite: the caller's BEGIN IMMEDIATE already holds the write lock


def apply_migrations(store: Store) -> list[int]:
    applied: list[int] = []
    with store.transaction() as tx:
        _serialise(tx)
        tx.execute(_BOOKKEEPING)
        done = {int(r["version"]) for r in tx.fetchall("SELECT version FROM schema_migrations")}
        newer = [v for v in done if v > LATEST_VERSION]
        if newer:
            from r3e_tee.errors import StoreError

            raise StoreError(
                f"the store's schema is at version {max(newer)}, newer than this release knows "
                f"({LATEST_VERSION})",
                hint="run the newer release, or restore a backup taken before the upgrade",
            )
        types = _TYPES[tx.dialect]
        for m in MIGRATIONS:
            if m.version in done:
                continue
            for stmt in iter_statements(m.script.format(**types)):
                tx.execute(stmt)
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (m.version, m.name, time.time()),
            )
            applied.append(m.version)
    return applied


def current_version(store: Store) -> int:
    with store.transaction(write=False) as tx:
        if tx.dialect == "sqlite":
            exists = tx.fetchval(
                "SELECT count(*) FROM sqlite_master WHERE type='table' AND name='schema_migrations'"
            )
        else:
            exists = tx.fetchval(
                "SELECT count(*) FROM information_schema.tables "
                "WHERE table_name='schema_migrations' AND table_schema = current_schema()"
            )
        if not exists:
            return 0
        return int(tx.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))
