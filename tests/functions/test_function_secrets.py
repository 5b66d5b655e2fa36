"""A function receives the secrets it names, released to its attested enclave; another function
cannot; a failing function's error never carries a secret."""

from __future__ import annotations

import base64
import json

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .conftest import EXAMPLES, LiveService, deploy

PEEK = b"""
def handler(event, ctx):
    if event.get("op") == "fail":
        raise RuntimeError("leaking " + ctx.secret_text("api-token"))
    return {"names": sorted(ctx.secrets), "len": {k: len(v) for k, v in ctx.secrets.items()}}
"""


def test_price_oracle_signs_with_its_released_key(live: LiveService) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with live.client() as c:
        fv = deploy(
            c,
            "oracle-signed",
            "python",
            (EXAMPLES / "price_oracle.py").read_bytes(),
            secrets=["oracle-signing-key"],
        )
        r = c.put(
            "/v1/secrets/oracle-signing-key",
            json={
                "value_b64": base64.b64encode(pem).decode(),
                "policy": {"measurements": [fv["measurement"]], "allow_simulation": True},
            },
        )
        assert r.status_code in (200, 201), r.text
        out = c.post(
            "/v1/functions/oracle-signed/invoke", content=b'{"pair": "NEO/USD", "prices": [12]}'
        ).json()
        assert out["status"] == "ok", out
        message = json.dumps(out["output"]["payload"], sort_keys=True, separators=(",", ":")).encode()
        key.public_key().verify(
            base64.b64decode(out["output"]["oracle_signature"]), message, ec.ECDSA(hashes.SHA256())
        )
        assert pem.decode() not in json.dumps(out)


def test_one_function_cannot_obtain_anothers_secret_and_errors_are_scrubbed(live: LiveService) -> None:
    with live.client() as c:
        owner = deploy(c, "peek-owner", "python", PEEK, secrets=["api-token"])
        c.put(
            "/v1/secrets/api-token",
            json={
                "value": "tok-3f9a8b7c6d5e",
                "policy": {"measurements": [owner["measurement"]], "allow_simulation": True},
            },
        ).raise_for_status()
        seen = c.post("/v1/functions/peek-owner/invoke", content=b"{}").json()
        assert seen["output"] == {"names": ["api-token"], "len": {"api-token": 16}}
        failed = c.post("/v1/functions/peek-owner/invoke", content=b'{"op": "fail"}').json()
        assert failed["status"] == "error" and "tok-3f9a8b7c6d5e" not in json.dumps(failed)
        assert "***" in failed["error"]

        # another function asking for the same secret: its measurement is not in the policy
        thief = deploy(c, "peek-thief", "python", PEEK + b"\n# another function\n", secrets=["api-token"])
        assert thief["measurement"] != owner["measurement"]
        r = c.post("/v1/functions/peek-thief/invoke", content=b"{}")
        assert r.status_code == 502 and "measurement" in r.text
        assert "tok-3f9a8b7c6d5e" not in r.text
        # a function that names no secret gets none
        deploy(c, "peek-none", "python", PEEK)
        assert c.post("/v1/functions/peek-none/invoke", content=b"{}").json()["output"] == {
            "names": [],
            "len": {},
        }
        audit = c.get("/v1/audit").json()
        text = json.dumps(audit)
        assert "tok-3f9a8b7c6d5e" not in text
        assert any(
            "denied" in json.dumps(e) or "deny" in json.dumps(e)
            for e in (audit if isinstance(audit, list) else audit.get("entries", []))
        )
