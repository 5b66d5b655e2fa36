"""One suite, two backends: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from r3e_tee.errors import StoreError
from r3e_tee.store import open_store, redact_url
from r3e_tee.store.base import Store
from r3e_tee.store.migrations import LATEST_VERSION, MIGRATIONS

ALL_VERSIONS = [m.version for m in MIGRATIONS]


def test_migrations_apply_once_and_are_idempotent(store: Store) -> None:
    assert store.schema_version() == LATEST_VERSION
    assert store.migrate() == []  # already applied: nothing to do
    tables = {"meta", "admin_tokens", "locks", "cache"}
    for table in tables:
        assert store.fetchval(f"SELECT count(*) FROM {table}") == 0


def test_fresh_store_has_version_zero_until_migrated(store_url: str) -> None:
    s = open_store(store_url)
    try:
        assert s.schema_version() == 0
        assert s.migrate() == ALL_VERSIONS
        assert s.schema_version() == LATEST_VERSION
    finally:
        s.close()


def test_transaction_commits_and_rolls_back(store: Store) -> None:
    with store.transaction() as tx:
        tx.execute("INSERT INTO meta (key, value) VALUES (?, ?)", ("a", "1"))
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.execute("INSERT INTO meta (key, value) VALUES (?, ?)", ("b", "2"))
        raise RuntimeError("abort")
    rows = store.fetchall("SELECT key, value FROM meta ORDER BY key")
    assert rows == [{"key": "a", "value": "1"}]


def test_blob_and_float_round_trip(store: Store) -> None:
    payload = bytes(range(256)) * 4
    store.execute("INSERT INTO cache (key, value, expires_at) VALUES (?, ?, ?)", ("k", payload, 1.5))
    row = store.fetchone("SELECT value, expires_at FROM cache WHERE key = ?", ("k",))
    assert row is not None
    assert bytes(row["value"]) == payload
    assert row["expires_at"] == 1.5


def test_percent_in_parameters_and_literals(store: Store) -> None:
    store.execute("INSERT INTO meta (key, value) VALUES (?, '100%')", ("pct",))
    assert store.fetchval("SELECT value FROM meta WHERE key LIKE ?", ("pc%",)) == "100%"


def test_primary_key_conflict_is_an_error_and_leaves_data(store: Store) -> None:
    store.execute("INSERT INTO meta (key, value) VALUES (?, ?)", ("dup", "first"))
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        store.execute("INSERT INTO meta (key, value) VALUES (?, ?)", ("dup", "second"))
    assert store.fetchval("SELECT value FROM meta WHERE key = ?", ("dup",)) == "first"


def test_lock_is_exclusive_across_store_instances(store: Store, store_url: str) -> None:
    other = open_store(store_url)
    try:
        with store.try_lock("rotation") as mine:
            assert mine is True
            with other.try_lock("rotation") as theirs:
                assert theirs is False
        with other.try_lock("rotation") as theirs_after:
            assert theirs_after is True
    finally:
        other.close()


def test_replicas_migrating_at_once_apply_each_version_once(store_url: str) -> None:
    stores = [open_store(store_url) for _ in range(3)]
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run(s: Store) -> None:
        try:
            results.append(s.migrate())
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        applied = sorted(v for r in results for v in r)
        assert applied == ALL_VERSIONS
        assert stores[0].fetchval("SELECT count(*) FROM schema_migrations") == len(ALL_VERSIONS)
    finally:
        for s in stores:
            s.close()


def test_concurrent_writers_lose_nothing(store: Store) -> None:
    def write(n: int) -> None:
        for i in range(20):
            store.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (f"{n}-{i}", "x"))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.fetchval("SELECT count(*) FROM meta") == 80


def test_newer_schema_is_refused(store: Store) -> None:
    store.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
        (LATEST_VERSION + 1, "from the future", 0.0),
    )
    with pytest.raises(StoreError, match="newer than this release"):
        store.migrate()


def test_unreachable_postgres_fails_fast_with_redacted_url() -> None:
    with pytest.raises(StoreError) as info:
        open_store("postgresql://u:hunter2@127.0.0.1:1/db", connect_timeout=1)
    assert "hunter2" not in str(info.value)
    assert "127.0.0.1:1" in str(info.value)


def test_unwritable_sqlite_location_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open the SQLite store"):
        open_store(f"sqlite:///{blocker / 'sub' / 'db.sqlite3'}")


def test_unknown_scheme_and_redaction() -> None:
    with pytest.raises(StoreError, match="unsupported store URL scheme"):
        open_store("mysql://root:pw@localhost/db")
    assert redact_url("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert redact_url("postgresql://h/db") == "postgresql://h/db"


def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path / 'd' / 's.sqlite3'}")
    try:
        s.migrate()
        assert s.fetchval("PRAGMA journal_mode") == "wal"
        assert ((tmp_path / "d" / "s.sqlite3").stat().st_mode & 0o777) == 0o600
    finally:
        s.close()


def test_redaction_covers_passwords_in_the_query_string() -> None:
    """libpq takes ``?password=`` too; before, such a URL reached errors whole, and the store's
    errors are what the unauthenticated /readyz shows."""
    redacted = redact_url("postgresql://u@h/db?sslmode=require&password=hunter2&sslpassword=k3y")
    assert "hunter2" not in redacted and "k3y" not in redacted, redacted
    assert redacted == "postgresql://u@h/db?sslmode=require&password=***&sslpassword=***"
    assert redact_url("postgresql://u:pw@h/db?password=pw2") == "postgresql://u:***@h/db?password=***"


def test_sqlite_close_waits_for_transactions_in_flight_and_refuses_new_ones(tmp_path: Path) -> None:
    """Closing a sqlite3 connection under a statement another thread runs crashes the process
    (seen at shutdown, with the async dispatcher's claim in flight): close() must wait."""
    s = open_store(f"sqlite:///{tmp_path / 'gate.sqlite3'}")
    s.migrate()
    inside, release = threading.Event(), threading.Event()
    result: list[int] = []

    def busy() -> None:
        with s.transaction() as tx:
            inside.set()
            release.wait(10)
            result.append(int(tx.fetchval("SELECT COUNT(*) FROM invocations")))

    def close_under_a_transaction(while_closing: Callable[[], None]) -> None:
        inside.clear()
        release.clear()
        worker = threading.Thread(target=busy)
        worker.start()
        assert inside.wait(10)
        closer = threading.Thread(target=s.close)
        closer.start()
        closer.join(0.3)
        assert closer.is_alive(), "close() did not wait for the transaction in flight"
        while_closing()
        release.set()
        closer.join(10)
        worker.join(10)

    close_under_a_transaction(lambda: None)
    assert result == [0]

    def refused() -> None:  # a transaction started while close() waits is refused, not crashed into
        with pytest.raises(StoreError, match="closed"):
            s.fetchval("SELECT 1")

    close_under_a_transaction(refused)
    assert result == [0, 0]
    # afterwards every thread reconnects (its old connection is closed, not reused)
    assert s.fetchval("SELECT 1") == 1
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.append(int(s.fetchval("SELECT 2"))))
    reader.start()
    reader.join(10)
    assert seen == [2]
    s.close()
