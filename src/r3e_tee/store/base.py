"""The store interface shared by the SQLite and PostgreSQL backends.

Repositories (enclaves, secrets, audit log, ...) write portable SQL with ``?`` placeholders and
run it through a :class:`Tx`; the backend adapts placeholders and dialect details. Keeping the
interface this small is what lets one test suite run unchanged against both backends.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

Row = dict[str, Any]
Params = Sequence[Any]
Dialect = Literal["sqlite", "postgresql"]


_QUERY_SECRET_RE = re.compile(r"((?:^|&)(?:password|sslpassword)=)[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The store URL with any password replaced, safe for logs and errors."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@")
    # libpq also takes passwords as query parameters
    query = _QUERY_SECRET_RE.sub(r"\1***", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class Tx(abc.ABC):
    """One transaction. Commits when its context exits normally, rolls back on an exception."""

    dialect: Dialect

    @abc.abstractmethod
    def execute(self, sql: str, params: Params = ()) -> int:
        """Run a statement; returns the number of rows it changed."""

    @abc.abstractmethod
    def fetchone(self, sql: str, params: Params = ()) -> Row | None: ...

    @abc.abstractmethod
    def fetchall(self, sql: str, params: Params = ()) -> list[Row]: ...

    def fetchval(self, sql: str, params: Params = ()) -> Any:
        row = self.fetchone(sql, params)
        return None if row is None else next(iter(row.values()))


class Store(abc.ABC):
    """A database holding all service state; several replicas may share one PostgreSQL store."""

    dialect: Dialect
    url: str

    @abc.abstractmethod
    def transaction(self, *, write: bool = True) -> AbstractContextManager[Tx]:
        """A transaction. ``write=False`` lets SQLite readers run alongside a writer."""

    @abc.abstractmethod
    def try_lock(self, name: str) -> AbstractContextManager[bool]:
        """A cluster-wide exclusive lock held for the context; yields False when taken elsewhere.

        Used so that scheduled jobs (key rotation, reaping) run once across replicas.
        """

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- conveniences over a one-statement transaction ---------------------------------------

    def execute(self, sql: str, params: Params = ()) -> int:
        with self.transaction() as tx:
            return tx.execute(sql, params)

    def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        with self.transaction(write=False) as tx:
            return tx.fetchone(sql, params)

    def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        with self.transaction(write=False) as tx:
            return tx.fetchall(sql, params)

    def fetchval(self, sql: str, params: Params = ()) -> Any:
        with self.transaction(write=False) as tx:
            return tx.fetchval(sql, params)

    # -- schema --------------------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied. Safe to run from replicas at once."""
        from r3e_tee.store.migrations import apply_migrations

        return apply_migrations(self)

    def schema_version(self) -> int:
        from r3e_tee.store.migrations import current_version

        return current_version(self)

    def ping(self) -> None:
        """Raise StoreError when the store cannot answer a trivial query."""
        self.fetchval("SELECT 1")

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_QMARK = re.compile(r"\?")


def qmark_to_format(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s`` (literal ``%`` doubled first)."""
    return _QMARK.sub("%s", sql.replace("%", "%%"))


def iter_statements(script: str) -> Iterator[str]:
    for stmt in script.split(";"):
        if stmt.strip():
            yield stmt.strip()
