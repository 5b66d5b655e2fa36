"""PostgreSQL backend: several service replicas on one database."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from r3e_tee.errors import StoreError
from r3e_tee.store.base import Params, Row, Store, Tx, qmark_to_format, redact_url


class _PgTx(Tx):
    dialect = "postgresql"

    def __init__(self, conn: psycopg.Connection[Row]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Params = ()) -> int:
        cur = self._conn.execute(qmark_to_format(sql), tuple(params))
        return cur.rowcount

    def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        return self._conn.execute(qmark_to_format(sql), tuple(params)).fetchone()

    def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return self._conn.execute(qmark_to_format(sql), tuple(params)).fetchall()


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a lock name."""
    return zlib.crc32(b"r3e-tee:" + name.encode()) - 2**31


class PostgresStore(Store):
    dialect = "postgresql"

    def __init__(self, url: str, *, pool_size: int = 10, connect_timeout: float = 5.0) -> None:
        self.url = url
        safe = redact_url(url)
        try:
            self._pool: ConnectionPool[psycopg.Connection[Row]] = ConnectionPool(
                url,
                min_size=1,
                max_size=pool_size,
                kwargs={"row_factory": dict_row, "connect_timeout": max(1, int(connect_timeout))},
                timeout=connect_timeout,
                open=False,
            )
            self._pool.open(wait=True, timeout=connect_timeout)
        except (psycopg.Error, PoolTimeout) as exc:
            raise StoreError(
                f"cannot connect to PostgreSQL at {safe}: {_first_line(exc)}",
                hint="check store.url, that the server is running and accepts this user",
            ) from None

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Tx]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield _PgTx(conn)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreError(
                f"PostgreSQL store {redact_url(self.url)} unavailable: {_first_line(exc)}"
            ) from None

    @contextmanager
    def try_lock(self, name: str) -> Iterator[bool]:
        """``pg_try_advisory_lock`` on a connection held for the whole context."""
        key = lock_key(name)
        with self._pool.connection() as conn:
            conn.autocommit = True
            try:
                row = conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (key,)).fetchone()
                got = bool(row and row["ok"])
                try:
                    yield got
                finally:
                    if got:
                        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            finally:
                conn.autocommit = False

    def close(self) -> None:
        self._pool.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
