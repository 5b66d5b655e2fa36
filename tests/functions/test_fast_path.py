"""The warm invocation fast route answers exactly what the FastAPI route answers.

``POST /v1/functions/{name}/invoke`` is served by a plain ASGI handler in front of FastAPI; the
FastAPI route stays as the reference. Every case here runs through both (the app's
``fast_routes_enabled`` switch) and compares status, headers and body bytes, with an enclave
stand-in whose replies cover the awkward JSON (non-ASCII, big and small numbers, NaN, nesting).
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from fastapi.testclient import TestClient

from r3e_tee.config import TeeConfig
from r3e_tee.functions import service as functions_service
from r3e_tee.functions.model import FunctionConfig
from r3e_tee.logging import JsonFormatter
from r3e_tee.runtime.channel import RemoteError
from r3e_tee.service.__main__ import build_context
from r3e_tee.service.app import ServiceApp, create_app
from r3e_tee.service.auth import Scope, token_hash

ADMIN = "r3e_fast-path-admin-token-0123456789"
ROUTE = "/v1/functions/{name}/invoke"

OUTPUTS: list[bytes] = [
    b'{"pair":"NEO/USD","price":12.0}',
    '{"text":"h\u00e9llo \u2028 \U0001f600","quote":"\\"<&>\'"}'.encode(),
    b'{"big":123456789012345678901234567890,"small":1e-300,"huge":1e300,"neg":-0.0}',
    b'{"nested":[{"a":[1,[2,[3,{"b":null}]]]},true,false],"empty":{},"list":[]}',
    b"[1,2,3]",
    b'"just a string"',
    b"null",
    b"NaN",
]


class _Closed:
    def is_set(self) -> bool:
        return False


class _Channel:
    is_open = True

    def __init__(self) -> None:
        self.outputs = iter(())  # type: Iterator[bytes]
        self.last: dict[str, Any] = {}

    async def request(self, op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        self.last = args
        out = next(self.outputs)
        receipt = {
            "body": {"v": 1, "function": "echo", "output_sha256": "ab" * 32, "note": "r\u00e9sum\u00e9"},
            "signature": "c2ln",
            "alg": "ES256",
        }
        if out == b"error":
            return {"status": "error", "receipt": receipt, "error": "ValueError: nope", "output": b"null"}
        reply: dict[str, Any] = {"status": "ok", "receipt": receipt, "error": None}
        if args.get("reply_key") is not None:
            reply["output_encrypted"] = b"\x00sealed" + out
        else:
            reply["output"] = out
        return reply


class _Handle:
    def __init__(self, channel: _Channel) -> None:
        self.channel = channel
        self.exited = _Closed()
        self.on_exit: list[Any] = []

    @property
    def alive(self) -> bool:
        return True


@pytest.fixture
def app_and_channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, _Channel]]:
    cfg = TeeConfig()
    cfg = cfg.model_copy(
        update={
            "server": cfg.server.model_copy(
                update={"data_dir": tmp_path / "data", "admin_token_hashes": (token_hash(ADMIN),)}
            ),
            "workers": cfg.workers.model_copy(update={"embedded": False}),
        }
    )
    ctx = build_context(cfg)
    svc = ctx.components["functions"]
    svc.registry.deploy(FunctionConfig(name="echo", runtime="python"), b"def handler(e, c):\n    return e\n")
    channel = _Channel()

    async def launch(fv: Any) -> tuple[str, Any]:
        return "e" * 32, _Handle(channel)

    svc.scheduler._launch = launch
    monkeypatch.setattr(functions_service, "new_id", lambda: "0123456789abcdef0123456789abcdef")
    app = create_app(ctx)
    assert isinstance(app, ServiceApp) and app.fast_routes
    with TestClient(app) as client:
        yield client, channel


def _both(client: TestClient, channel: _Channel, outputs: list[bytes], **kwargs: Any) -> tuple[Any, Any]:
    app = client.app
    assert isinstance(app, ServiceApp)
    answers = []
    for fast in (True, False):
        app.fast_routes_enabled = fast
        channel.outputs = iter(outputs)
        answers.append(client.post("/v1/functions/echo/invoke", **kwargs))
    app.fast_routes_enabled = True
    return answers[0], answers[1]


def _same(fast: Any, ref: Any) -> None:
    assert fast.status_code == ref.status_code, (fast.text, ref.text)
    assert fast.content == ref.content
    drop = {"date"}
    assert [(k, v) for k, v in fast.headers.items() if k not in drop] == [
        (k, v) for k, v in ref.headers.items() if k not in drop
    ]


def test_fast_route_answers_the_reference_bytes(app_and_channel: tuple[TestClient, _Channel]) -> None:
    client, channel = app_and_channel
    headers = {"Authorization": f"Bearer {ADMIN}", "X-Request-ID": "req-1"}
    for output in [*OUTPUTS, b"error"]:
        fast, ref = _both(client, channel, [output], content=b'{"x": 1}', headers=headers)
        _same(fast, ref)
        assert fast.status_code == 200 and fast.headers["x-request-id"] == "req-1"
    # the body reached the enclave byte for byte, and nothing was encrypted
    assert channel.last["input"] == b'{"x": 1}' and channel.last["encrypted"] is False


def test_fast_route_headers_encryption_and_errors(app_and_channel: tuple[TestClient, _Channel]) -> None:
    client, channel = app_and_channel
    auth = {"Authorization": f"Bearer {ADMIN}", "X-Request-ID": "req-2"}
    reply_key = base64.b64encode(b"k" * 32).decode()
    cases: list[dict[str, Any]] = [
        # a reply key: the output comes back sealed (base64)
        {"headers": {**auth, "X-R3E-Reply-Key": reply_key}},
        # encrypted input without the enclave it is sealed to
        {"headers": {**auth, "Content-Type": "application/r3e-hpke; x=1"}},
        # a bad reply key
        {"headers": {**auth, "X-R3E-Reply-Key": "not base64!"}},
        # the enclave named is not serving the function
        {"headers": {**auth, "X-R3E-Enclave": "f" * 32}},
    ]
    statuses = []
    for case in cases:
        fast, ref = _both(client, channel, [OUTPUTS[0]], content=b"{}", **case)
        _same(fast, ref)
        statuses.append(fast.status_code)
    assert statuses == [200, 400, 400, 502]
    fast, ref = _both(
        client, channel, [OUTPUTS[0]], content=b"{}", headers={**auth, "X-R3E-Reply-Key": reply_key}
    )
    assert "output" not in fast.json() and base64.b64decode(fast.json()["output_encrypted"]).startswith(
        b"\x00"
    )
    # an unknown function
    app = client.app
    assert isinstance(app, ServiceApp)
    for fast_on in (True, False):
        app.fast_routes_enabled = fast_on
        r = client.post("/v1/functions/nope/invoke", content=b"{}", headers=auth)
        assert r.status_code == 404 and r.json()["request_id"] == "req-2"
    app.fast_routes_enabled = True


def test_fast_route_auth_is_the_reference_auth(app_and_channel: tuple[TestClient, _Channel]) -> None:
    client, channel = app_and_channel
    ctx = client.app.state.ctx  # type: ignore[attr-defined]
    reader = ctx.tokens.issue(Scope.READ, "reader")
    invoker = ctx.tokens.issue(Scope.INVOKE, "invoker")
    rid = {"X-Request-ID": "req-3"}
    for headers, status in [
        ({}, 401),
        ({"Authorization": "Bearer nope"}, 401),
        ({"Authorization": "Basic abc"}, 401),
        ({"Authorization": "Bearer "}, 401),
        ({"Authorization": f"Bearer {reader}"}, 403),
        ({"Authorization": f"Bearer {invoker}"}, 200),
        ({"Authorization": f"bearer {ADMIN}"}, 200),
    ]:
        fast, ref = _both(client, channel, [OUTPUTS[0]], content=b"{}", headers={**headers, **rid})
        _same(fast, ref)
        assert fast.status_code == status, fast.text
        if status == 401:
            assert fast.headers["www-authenticate"] == "Bearer"
    # a revoked token stops working on the fast route too (after the authority's cache)
    ctx.tokens.revoke(token_hash(invoker))
    fast, ref = _both(
        client, channel, [OUTPUTS[0]], content=b"{}", headers={"Authorization": f"Bearer {invoker}"}
    )
    assert fast.status_code == ref.status_code == 401


def test_fast_route_logs_and_counts_like_the_middleware(app_and_channel: tuple[TestClient, _Channel]) -> None:
    client, channel = app_and_channel
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("r3e_tee")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        _both(
            client,
            channel,
            [OUTPUTS[0]],
            content=b"{}",
            headers={"Authorization": f"Bearer {ADMIN}", "X-Request-ID": "req-log"},
        )
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    entries = [e for e in lines if e.get("msg") == "request" and e.get("route") == ROUTE]
    assert len(entries) == 2
    for entry in entries:
        assert entry["request_id"] == "req-log" and entry["status"] == 200 and entry["method"] == "POST"
        assert entry["path"] == "/v1/functions/echo/invoke"
    assert [sorted(e) for e in entries][0] == [sorted(e) for e in entries][1]
    assert ADMIN not in stream.getvalue()
    metrics = client.get("/metrics").text
    assert f'r3e_tee_http_requests_total{{method="POST",route="{ROUTE}",status="200"}} 2.0' in metrics
    assert 'r3e_tee_invocation_duration_seconds_count{function="echo",status="ok"} 2.0' in metrics
    # a generated request id when the client's is missing or malformed
    for rid in ({}, {"X-Request-ID": "bad id"}):
        channel.outputs = iter([OUTPUTS[0]])
        r = client.post(
            "/v1/functions/echo/invoke", content=b"{}", headers={"Authorization": f"Bearer {ADMIN}", **rid}
        )
        assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32


def test_other_methods_and_paths_fall_through_to_fastapi(
    app_and_channel: tuple[TestClient, _Channel],
) -> None:
    client, _ = app_and_channel
    auth = {"Authorization": f"Bearer {ADMIN}"}
    assert client.get("/v1/functions/echo/invoke", headers=auth).status_code == 405
    assert client.post("/v1/functions/echo/invoke/extra", headers=auth).status_code == 404
    assert client.get("/v1/functions/echo", headers=auth).json()["name"] == "echo"


def test_reply_keys_nothing_can_be_sealed_to_are_refused_at_the_edge(
    app_and_channel: tuple[TestClient, _Channel],
) -> None:
    """A reply key of the wrong length or of low order is a 400 at once, on both invoke routes
    and when queued, instead of a function run whose output is then lost (on every retry)."""
    client, channel = app_and_channel
    auth = {"Authorization": f"Bearer {ADMIN}", "X-Request-ID": "req-reply-key"}
    key = base64.b64encode(x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    ok = _both(client, channel, [OUTPUTS[0]], content=b"{}", headers={**auth, "X-R3E-Reply-Key": key})
    assert [r.status_code for r in ok] == [200, 200]
    for raw in (bytes(32), (1).to_bytes(32, "little"), bytes.fromhex("ec" + "ff" * 30 + "7f"), b"k" * 31):
        headers = {**auth, "X-R3E-Reply-Key": base64.b64encode(raw).decode()}
        channel.last = {}
        fast, ref = _both(client, channel, [OUTPUTS[0]], content=b"{}", headers=headers)
        _same(fast, ref)
        assert fast.status_code == 400 and "reply key" in fast.json()["message"], fast.text
        assert channel.last == {}, "the invocation reached the enclave"
        r = client.post("/v1/functions/echo/invocations", content=b"{}", headers=headers)
        assert r.status_code == 400 and "reply key" in r.json()["message"], r.text
    # (last: the queued one is then run in the background)
    queued = client.post(
        "/v1/functions/echo/invocations", content=b"{}", headers={**auth, "X-R3E-Reply-Key": key}
    )
    assert queued.status_code == 202


def test_an_input_the_enclave_refuses_is_a_400_and_does_not_cost_the_enclave(
    app_and_channel: tuple[TestClient, _Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An enclave that refuses an invocation's input (a ciphertext that does not open, not JSON)
    is healthy: the caller gets a 400 and the enclave keeps serving. Recycling it instead would
    let any invoker destroy enclaves (an encrypted input even names the one it is for)."""
    client, channel = app_and_channel
    auth = {"Authorization": f"Bearer {ADMIN}", "X-Request-ID": "req-bad-input"}
    svc = client.app.state.ctx.components["functions"]  # type: ignore[attr-defined]
    launches: list[str] = []
    launch = svc.scheduler._launch

    async def counting(fv: Any) -> tuple[str, Any]:
        launches.append(fv.name)
        return await launch(fv)  # type: ignore[no-any-return]

    svc.scheduler._launch = counting
    ok = _both(client, channel, [OUTPUTS[0], OUTPUTS[0]], content=b"{}", headers=auth)
    assert [r.status_code for r in ok] == [200, 200]
    refusal = RemoteError("cannot decrypt the input: not encrypted to this enclave", kind="invalid_input")

    async def refuse(op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        raise refusal

    monkeypatch.setattr(channel, "request", refuse)
    fast, ref = _both(client, channel, [], content=b"\x00junk", headers=auth)
    _same(fast, ref)
    assert fast.status_code == 400 and "cannot decrypt the input" in fast.json()["message"], fast.text
    monkeypatch.undo()
    again = _both(client, channel, [OUTPUTS[0], OUTPUTS[0]], content=b"{}", headers=auth)
    assert [r.status_code for r in again] == [200, 200]
    assert launches == ["echo"], "the enclave was recycled for a caller's bad input"
    # an enclave that fails otherwise is still recycled
    monkeypatch.setattr(channel, "request", lambda *a, **k: _raise(RemoteError("boom", kind="internal")))
    fast = client.post("/v1/functions/echo/invoke", content=b"{}", headers=auth)
    assert fast.status_code == 502


async def _raise(exc: Exception) -> dict[str, Any]:
    raise exc


def test_bodies_over_the_limit_are_refused_early_with_413(
    app_and_channel: tuple[TestClient, _Channel],
) -> None:
    """Before: any body was buffered whole (a multi-gigabyte invoke input, deploy or token
    request), by the fast route and FastAPI alike. Now a declared Content-Length over the
    route's limit is a 413 before anything is read, a chunked body is cut off at the limit,
    and both invoke routes answer the same bytes."""
    from r3e_tee.functions.routes import MAX_INPUT_BYTES

    client, channel = app_and_channel
    auth = {"Authorization": f"Bearer {ADMIN}", "X-Request-ID": "req-big"}
    big = b" " * (MAX_INPUT_BYTES + 1)
    # declared length
    channel.last = {}
    fast, ref = _both(client, channel, [OUTPUTS[0]], content=big, headers=auth)
    _same(fast, ref)
    assert fast.status_code == 413, fast.text
    assert fast.json()["error"] == "too_large" and str(MAX_INPUT_BYTES) in fast.json()["message"]
    assert channel.last == {}, "the oversized input reached the enclave"
    # no Content-Length (chunked): counted as it arrives (a fresh iterator for each route)
    app = client.app
    assert isinstance(app, ServiceApp)
    answers = []
    for fast_on in (True, False):
        app.fast_routes_enabled = fast_on
        answers.append(client.post("/v1/functions/echo/invoke", content=iter([big]), headers=auth))
    app.fast_routes_enabled = True
    _same(*answers)
    assert answers[0].status_code == 413 and channel.last == {}, answers[0].text
    # at the limit is fine
    fast, ref = _both(client, channel, [OUTPUTS[0]], content=big[:-1], headers=auth)
    assert fast.status_code == ref.status_code == 200
    # the queued route, a deploy and any other route have their limits too, token or not
    r = client.post("/v1/functions/echo/invocations", content=big, headers=auth)
    assert r.status_code == 413 and r.headers["x-request-id"] == "req-big", r.text
    r = client.post("/v1/functions/echo/invocations", content=iter([big]), headers=auth)
    assert r.status_code == 413, r.text
    r = client.post("/v1/functions", content=b" " * (40 * 1024 * 1024), headers=auth)
    assert r.status_code == 413, r.text
    r = client.post("/v1/tokens", content=iter([b" " * (8 * 1024 * 1024)]), headers=auth)
    assert r.status_code == 413 and r.json()["error"] == "too_large", r.text
    r = client.post("/v1/tokens", content=b" " * (8 * 1024 * 1024))
    assert r.status_code == 413, r.text
    metrics = client.get("/metrics").text
    assert 'route="unmatched",status="413"' in metrics  # refused before routing


def test_the_encrypted_media_type_is_recognised_in_any_case(
    app_and_channel: tuple[TestClient, _Channel],
) -> None:
    """Media types are case-insensitive (RFC 9110). Before, ``Application/R3E-HPKE`` was taken
    for a plaintext JSON event: the ciphertext went to the function as its input (and a queued
    one was stored as plaintext). Now it is the encrypted path on both invoke routes."""
    client, channel = app_and_channel
    auth = {"Authorization": f"Bearer {ADMIN}", "X-Request-ID": "req-case"}
    for content_type in ("Application/R3E-HPKE", "APPLICATION/r3e-hpke; charset=binary"):
        channel.last = {}
        fast, ref = _both(
            client,
            channel,
            [OUTPUTS[0]],
            content=b"\x00sealed",
            headers={**auth, "Content-Type": content_type},
        )
        _same(fast, ref)
        assert fast.status_code == 400 and "X-R3E-Enclave" in fast.json()["message"], fast.text
        assert channel.last == {}
        queued = client.post(
            "/v1/functions/echo/invocations",
            content=b"\x00sealed",
            headers={**auth, "Content-Type": content_type, "X-R3E-Enclave": "e" * 32},
        )
        assert queued.status_code == 202, queued.text
        ctx = client.app.state.ctx  # type: ignore[attr-defined]
        row = ctx.store.fetchone(
            "SELECT encrypted FROM invocations WHERE id = ?", (queued.json()["invocation_id"],)
        )
        assert row["encrypted"] == 1
