from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.enclaves.conftest import LiveService, start_service, stop_service

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "functions"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    base = tmp_path_factory.mktemp("fn")
    svc = start_service(base / "data", base / "state")
    try:
        yield svc
    finally:
        stop_service(svc)


def deploy(c: httpx.Client, name: str, runtime: str, code: bytes, **settings: object) -> dict:  # type: ignore[type-arg]
    r = c.post(
        "/v1/functions",
        json={"name": name, "runtime": runtime, "code": base64.b64encode(code).decode(), **settings},
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]
