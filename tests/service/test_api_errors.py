"""Unexpected errors and out-of-range numbers: what the client gets back."""

from __future__ import annotations

import io
import json
import logging

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
