"""A worker's ServiceLink turns the service's rejections into typed errors, never a traceback."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from r3e_tee.errors import R3ETeeError, Reason, VerificationError
from r3e_tee.worker.remote import ServiceLink


def _call(body: dict[str, Any]) -> Exception:
    async def main() -> Exception:
        link = ServiceLink("http://service.test", "r3e_token")
        link._http = httpx.AsyncClient(
            base_url="http://service.test",
            transport=httpx.MockTransport(lambda request: httpx.Response(403, json=body)),
        )
        try:
            await link.call("POST", "/v1/attestation/verify")
        except Exception as exc:  # noqa: BLE001 - the test inspects what was raised
            return exc
        finally:
            await link.aclose()
        pytest.fail("a rejection was not raised")

    return asyncio.run(main())


def test_known_rejection_keeps_its_reason_and_an_unknown_one_is_explained() -> None:
    known = _call(
        {"error": "rejected", "reason": "bad-signature", "message": "quote signature", "check": "quote"}
    )
    assert isinstance(known, VerificationError) and known.reason is Reason.BAD_SIGNATURE
    unknown = _call({"error": "rejected", "reason": "from_the_future", "message": "new check"})
    assert type(unknown) is R3ETeeError
    assert "from_the_future" in unknown.message and "upgrade r3e-tee-worker" in (unknown.hint or "")
