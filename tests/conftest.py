"""Shared fixtures: where the real-hardware vectors live, and the PostgreSQL test server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _vectors_dir() -> Path:
    env = os.environ.get("R3E_TEE_VECTORS")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "vectors"


VECTORS_DIR = _vectors_dir()


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The shared real-hardware vectors; tests using it skip with the reason when absent."""
    if not (VECTORS_DIR / "cases.json").is_file():
        pytest.skip(f"shared vectors not found at {VECTORS_DIR} (set R3E_TEE_VECTORS)")
    return VECTORS_DIR
