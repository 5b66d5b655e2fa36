"""``invoke --encrypt`` seals the input only to an enclave it may trust with it: the attested
key, the function's measurement, and not a debug enclave (whose host reads its memory)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from r3e_tee.attestation.tokens import TokenIssuer
from r3e_tee.cli.client import ServiceClient
from r3e_tee.cli.main import main
from r3e_tee.runtime.keys import EnclaveKeys

MEASUREMENT = "ab" * 32


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **claims: Any) -> tuple[list[str], list[str]]:
    """A service stand-in offering one enclave whose token carries ``claims``; returns the JWKS
    file argument and the list the paths of POSTs (invocations sent) are recorded in."""
    keys = EnclaveKeys()
    issuer = TokenIssuer({"default": ec.generate_private_key(ec.SECP256R1())}, issuer="r3e-test", ttl=300)
    token = issuer.issue(
        "simulation",
        {
            "provider": "simulation",
            "evidence_kind": "sgx-dcap",
            "measurement": MEASUREMENT,
            "simulated": True,
            "cnf": {"x25519": _b64u(keys.x25519_public), "p256": _b64u(keys.p256_public)},
            **claims,
        },
        subject="e" * 32,
    ).token
    answers = {
        "/v1/functions/echo/enclave": {
            "token": token,
            "enclave_id": "e" * 32,
            "x25519": base64.b64encode(keys.x25519_public).decode(),
        },
        "/v1/functions/echo": {"name": "echo", "measurement": MEASUREMENT},
    }
    posted: list[str] = []

    def get(self: ServiceClient, path: str, **kwargs: Any) -> Any:
        return answers[path]

    def post(self: ServiceClient, path: str, **kwargs: Any) -> Any:
        posted.append(path)
        return {"invocation_id": "i" * 32}

    monkeypatch.setattr(ServiceClient, "get", get)
    monkeypatch.setattr(ServiceClient, "post", post)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    return ["--jwks", str(jwks)], posted


def test_invoke_encrypt_refuses_a_debug_enclave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--server", "http://127.0.0.1:9", "--token", "t", "invoke", "echo", "--encrypt", "--async"]
    jwks, posted = _service(monkeypatch, tmp_path, debug=False)
    assert main([*args, *jwks]) == 0 and posted == ["/v1/functions/echo/invocations"]
    capsys.readouterr()
    for claims in ({"debug": True}, {}):  # a debug enclave, or a token that does not say
        jwks, posted = _service(monkeypatch, tmp_path, **claims)
        code = main([*args, *jwks])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2 and "debug enclave" in err, err
        assert posted == [], "the input was sent, sealed to a debug enclave"
