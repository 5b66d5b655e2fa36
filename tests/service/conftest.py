from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from r3e_tee.config import TeeConfig
from r3e_tee.service.__main__ import build_context
from r3e_tee.service.app import create_app
from r3e_tee.service.auth import token_hash

ADMIN_TOKEN = "r3e_test-admin-token-0123456789"


def _make_config(tmp_path: Path, store_url: str = "", **server: object) -> TeeConfig:
    cfg = TeeConfig()
    return cfg.model_copy(
        update={
            "server": cfg.server.model_copy(
                update={
                    "data_dir": tmp_path / "data",
                    "admin_token_hashes": (token_hash(ADMIN_TOKEN),),
                    **server,
                }
            ),
            "store": cfg.store.model_copy(update={"url": store_url}),
        }
    )


@pytest.fixture
def client(tmp_path: Path, store_url: str) -> Iterator[TestClient]:
    ctx = build_context(_make_config(tmp_path, store_url))
    with TestClient(create_app(ctx)) as c:
        yield c


@pytest.fixture
def make_config() -> Callable[..., TeeConfig]:
    """Config factory: data dir under tmp_path, the test admin token accepted."""
    return _make_config
