"""State of the service: SQLite (embedded default) or PostgreSQL (replicas), one interface."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from r3e_tee.errors import StoreError
from r3e_tee.store.base import Row, Store, Tx, redact_url

__all__ = ["Row", "Store", "Tx", "open_store", "redact_url"]


def open_store(url: str, *, pool_size: int = 10, connect_timeout: float = 5.0) -> Store:
    """Open (not migrate) the store named by ``url``: ``sqlite:///path`` or ``postgresql://...``."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        # SQLAlchemy's reading: sqlite:///relative/file, sqlite:////absolute/file
        raw = url[len("sqlite://") :]
        path = unquote(raw[1:] if raw.startswith("/") else raw)
        if not path or path == "/":
            raise StoreError(
                f"SQLite URL {url!r} names no file", hint="use sqlite:////abs/path/r3e-tee.sqlite3"
            )
        from r3e_tee.store.sqlite import SqliteStore

        return SqliteStore(Path(path))
    if scheme in ("postgresql", "postgres"):
        from r3e_tee.store.postgres import PostgresStore

        return PostgresStore(url, pool_size=pool_size, connect_timeout=connect_timeout)
    raise StoreError(
        f"unsupported store URL scheme {scheme!r} in {redact_url(url)}",
        hint="use sqlite:///path or postgresql://user@host:5432/db",
    )
