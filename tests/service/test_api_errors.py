"""Unexpected errors and out-of-range numbers: what the client gets back."""

from __future__ import annotations

import io
import json
import logging

import pytest
from fastapi.testclient import TestClient

from r3e_tee.logging import JsonFormatter

AUTH = {"Authorization": "Bearer r3e_test-admin-token-0123456789"}


def test_an_unexpected_error_answers_with_the_request_id_that_locates_it(client: TestClient) -> None:
    """Before: the 500 body said "the request id locates it in the service log" but carried
    ``"request_id": null``, had no X-Request-ID header, and the log line had no id either."""
    svc = client.app.state.ctx.components["functions"]  # type: ignore[attr-defined]

    def broken() -> list[dict[str, object]]:
        raise RuntimeError("secret detail that must not be echoed")

    svc.registry.list = broken
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("r3e_tee")
    logger.addHandler(handler)
    c = TestClient(client.app, raise_server_exceptions=False)  # the app is started by ``client``
    try:
        r = c.get("/v1/functions", headers={**AUTH, "X-Request-ID": "req-500"})
    finally:
        logger.removeHandler(handler)
    assert r.status_code == 500
    assert r.json()["request_id"] == "req-500" and r.headers["x-request-id"] == "req-500", r.text
    assert "secret detail" not in r.text
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    errors = [e for e in lines if e.get("msg") == "unhandled error"]
    assert len(errors) == 1 and errors[0]["request_id"] == "req-500", lines
    assert "secret detail" not in stream.getvalue()
    assert 'route="/v1/functions",status="500"' in c.get("/metrics").text


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("GET", "/v1/functions/nope?version=100000000000000000000000000", None),
        ("GET", "/v1/audit?after=100000000000000000000000000", None),
        ("POST", "/v1/enclaves", {"provider": "simulation", "size": 10**30}),
        ("POST", "/v1/enclaves", {"provider": "simulation", "size": "99999999999999T"}),
        (
            "POST",
            "/v1/functions",
            {"name": "big", "runtime": "python", "code": "eD0x", "enclave_size": 10**30, "memory": 10**20},
        ),
        # secret names no secret can have: every enclave launch of the function would fail
        ("POST", "/v1/functions", {"name": "s", "runtime": "python", "code": "eD0x", "secrets": ["a/b"]}),
        ("POST", "/v1/functions", {"name": "s", "runtime": "python", "code": "eD0x", "secrets": ["x" * 200]}),
        (
            "POST",
            "/v1/functions",
            {"name": "s", "runtime": "python", "code": "eD0x", "secrets": [f"s{i}" for i in range(65)]},
        ),
    ],
)
def test_numbers_beyond_what_the_store_holds_are_refused(
    client: TestClient, method: str, url: str, body: object
) -> None:
    """Before: a 500 (the store cannot hold the integer), or a function stored with an enclave
    size no enclave could be created with, or with secrets no enclave could be given."""
    r = TestClient(client.app, raise_server_exceptions=False).request(method, url, json=body, headers=AUTH)
    assert r.status_code in (400, 422), r.text


def test_client_chosen_methods_do_not_grow_the_metrics(client: TestClient) -> None:
    """Before: every distinct HTTP method a client sent (any token is a method to HTTP/1.1)
    became a new labelled series of the request counter and histogram, kept for the life of
    the process: an unauthenticated client could grow memory and /metrics without bound. Now
    methods outside the standard ones are counted as OTHER."""
    for i in range(50):
        client.request(f"M{i}", "/v1/version")
        client.request(f"X{i}", "/healthz")
    text = client.get("/metrics").text
    methods = {
        line.split('method="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith("r3e_tee_http_request") and 'method="' in line
    }
    assert methods <= {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "OTHER"}, methods
    assert 'method="OTHER",route="/v1/version",status="405"' in text


def test_framework_errors_are_typed_like_every_other_error(client: TestClient) -> None:
    """Before: an unknown route, a wrong method and a body the JSON parser gave up on (nested
    100 000 deep) answered Starlette's ``{"detail": ...}``: no error type, no fix, no request
    id. Now they have the service's error shape."""
    rid = {"X-Request-ID": "req-typed"}
    deep = b"[" * 100_000 + b"]" * 100_000
    cases = [
        (client.get("/v1/nope", headers=rid), 404, "not_found"),
        (client.delete("/v1/version", headers=rid), 405, "method_not_allowed"),
        (
            client.post(
                "/v1/functions", content=deep, headers={**AUTH, **rid, "Content-Type": "application/json"}
            ),
            400,
            "invalid_request",
        ),
    ]
    for r, status, error in cases:
        body = r.json()
        assert r.status_code == status and body["error"] == error, r.text
        assert body["message"] and body["request_id"] == "req-typed" and "detail" not in body, body
    assert cases[1][0].headers["allow"]  # what the method would have had to be
