"""Shared fixtures: where the real-hardware vectors live, and the PostgreSQL test server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from r3e_tee.store import Store, open_store

REPO_ROOT = Path(__file__).resolve().parents[1]


def _vectors_dir() -> Path:
    env = os.environ.get("R3E_TEE_VECTORS")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "vectors"


VECTORS_DIR = _vectors_dir()


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The shared real-hardware vectors; tests using it skip with the reason when absent."""
    if not (VECTORS_DIR / "cases.json").is_file():
        reason = f"shared vectors not found at {VECTORS_DIR} (set R3E_TEE_VECTORS)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the vector tests: {reason}")
        pytest.skip(reason)
    return VECTORS_DIR


# --- stores: the same tests run against SQLite and PostgreSQL ------------------------------------

POSTGRES_URL = os.environ.get("R3E_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _postgres_available() -> str | None:
    """None when the test server answers, else the reason to skip."""
    try:
        import psycopg

        with psycopg.connect(POSTGRES_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means "skip with the reason"
        return f"PostgreSQL not reachable at {POSTGRES_URL}: {str(exc).strip().splitlines()[0]}"
    return None


_PG_SKIP = _postgres_available()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped after the test."""
    if _PG_SKIP:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {_PG_SKIP}")
        pytest.skip(_PG_SKIP)
    import uuid

    import psycopg

    schema = f"r3e_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    s.migrate()
    try:
        yield s
    finally:
        s.close()
