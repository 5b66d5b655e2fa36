"""The remote worker's own API answers malformed calls from its service with typed 400s.

Only the registered service (holding the worker's secret) reaches these routes, but a service of
another release, or a bug, must get an error that names the problem, not a 500 and a traceback.
The routes are served by the real worker app; the worker behind them records what it was asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cbor2
import pytest
from fastapi.testclient import TestClient

from r3e_tee.errors import AuthenticationError
from r3e_tee.providers.base import EnclaveSpec
from r3e_tee.worker.cli import create_worker_app

SECRET = "s3cret"
AUTH = {"Authorization": f"Bearer {SECRET}"}


@dataclass
class _Manager:
    launched: list[tuple[str, EnclaveSpec]] = field(default_factory=list)
    handles: dict[str, Any] = field(default_factory=dict)

    def launch(self, provider: str, spec: EnclaveSpec) -> None:
        self.launched.append((provider, spec))


@dataclass
class _Worker:
    manager: _Manager = field(default_factory=_Manager)

    def check(self, authorization: str | None) -> None:
        if authorization != f"Bearer {SECRET}":
            raise AuthenticationError("not the registered service")


@pytest.fixture
def worker_client() -> tuple[TestClient, _Worker]:
    worker = _Worker()
    return TestClient(create_worker_app(worker), raise_server_exceptions=False), worker  # type: ignore[arg-type]


def test_malformed_launches_and_relayed_calls_are_named_400s(
    worker_client: tuple[TestClient, _Worker],
) -> None:
    c, worker = worker_client
    for body in (
        {},
        {"provider": "simulation"},
        {"provider": 3, "spec": {}},
        {"provider": "simulation", "spec": []},
    ):
        r = c.post("/enclaves", json=body, headers=AUTH)
        assert r.status_code == 400 and "'spec'" in r.json()["message"], (body, r.text)
    r = c.post("/enclaves", json={"provider": "simulation", "spec": {"id": "e1", "nope": 1}}, headers=AUTH)
    assert r.status_code == 400 and "spec does not fit" in r.json()["message"], r.text
    ok = {"provider": "simulation", "spec": {"id": "e1", "size_bytes": 64 << 20}}
    assert c.post("/enclaves", json=ok, headers=AUTH).status_code == 202
    assert worker.manager.launched[0][1] == EnclaveSpec(id="e1", size_bytes=64 << 20)

    for raw, problem in (
        (b"", "one CBOR map"),
        (b"\xff", "one CBOR map"),
        (cbor2.dumps([1, 2]), "one CBOR map"),
        (cbor2.dumps({"op": "ping", "args": [1]}), "'args'"),
        (cbor2.dumps({"op": "ping", "args": {1: 2}}), "'args'"),
        (cbor2.dumps({"op": "ping", "args": {"op": "x"}}), "'args'"),
        (cbor2.dumps({"op": "ping", "timeout": "soon"}), "'timeout'"),
    ):
        r = c.post("/enclaves/e1/call", content=raw, headers=AUTH)
        assert r.status_code == 400 and problem in r.json()["message"], (raw, r.text)
    # well formed: the operation allow-list and the enclave lookup answer as before
    r = c.post("/enclaves/e1/call", content=cbor2.dumps({"op": "load_keys"}), headers=AUTH)
    assert r.status_code == 401 and "not relayed" in r.json()["message"]
    r = c.post("/enclaves/e1/call", content=cbor2.dumps({"op": "ping", "timeout": 5}), headers=AUTH)
    assert r.status_code == 404
    assert c.post("/enclaves/e1/call", content=b"", headers={}).status_code == 401
