"""SQLite backend: the embedded default, one file in the data directory, WAL mode."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from r3e_tee.errors import StoreError
from r3e_tee.store.base import Params, Row, Store, Tx


class _SqliteTx(Tx):
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Params = ()) -> int:
        return self._conn.execute(sql, tuple(params)).rowcount

    def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        row = self._conn.execute(sql, tuple(params)).fetchone()
        return None if row is None else dict(row)

    def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return [dict(r) for r in self._conn.execute(sql, tuple(params)).fetchall()]


class SqliteStore(Store):
    """One connection per thread; writers serialise on ``BEGIN IMMEDIATE`` with a busy timeout."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._owner = uuid.uuid4().hex
        # transactions in flight, so close() never closes a connection under a running statement
        # (sqlite3 crashes the process when that happens); after close() none may start
        self._gate = threading.Condition()
        self._active = 0
        self._closed = False
        self._generation = 0  # bumped by close(): every thread's connection before it is gone
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            conn = self._connect()
            conn.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open the SQLite store at {path}: {exc}",
                hint="check that the data directory exists and is writable (--data-dir)",
            ) from None

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.generation == self._generation:
            return conn
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        if self.path.exists():
            os.chmod(self.path, 0o600)
        conn.row_factory = sqlite3.Row
        # FULL: a committed transaction survives a crash of the machine, not only of the process
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self._local.conn = conn
        self._local.generation = self._generation
        with self._all_lock:
            self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Tx]:
        with self._gate:
            if self._closed:
                raise StoreError(f"SQLite store {self.path} is closed: the service is stopping")
            self._active += 1
        try:
            try:
                conn = self._connect()
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path} unavailable: {exc}") from None
            try:
                yield _SqliteTx(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise StoreError(f"SQLite commit failed: {exc}") from None
        finally:
            with self._gate:
                self._active -= 1
                self._gate.notify_all()

    @contextmanager
    def try_lock(self, name: str, *, lease: float = 300.0) -> Iterator[bool]:
        """A lease row in ``locks``: processes sharing the file (one host) exclude each other."""
        now = time.time()
        with self.transaction() as tx:
            taken = tx.execute(
                "INSERT INTO locks (name, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at WHERE locks.expires_at < ?",
                (name, self._owner, now + lease, now),
            )
        try:
            yield taken == 1
        finally:
            if taken == 1:
                with self.transaction() as tx:
                    tx.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (name, self._owner))

    def close(self) -> None:
        """Close every connection once the transactions in flight are done (a busy timeout at
        most); transactions that try to start meanwhile are refused. A later one reconnects."""
        with self._gate:
            self._closed = True
            try:
                if not self._gate.wait_for(lambda: self._active == 0, timeout=self._busy_timeout + 5):
                    return  # a statement still runs: leave its connection to the process exit
                with self._all_lock:
                    for conn in self._all:
                        conn.close()
                    self._all.clear()
                self._generation += 1
            finally:
                self._closed = False

    def raw(self) -> Any:
        """The calling thread's connection (tests and migrations only)."""
        return self._connect()
