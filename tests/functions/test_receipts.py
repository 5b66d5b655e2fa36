"""Offline receipt verification against hostile receipts: each case a receipt signed by the
attested enclave key (so only the check under test can refuse it) and its accepted twin."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from r3e_tee.attestation.policy import Policy
from r3e_tee.attestation.tokens import TokenIssuer
from r3e_tee.errors import ReceiptError
from r3e_tee.functions.receipts import RECEIPT_DOMAIN, canonical, verify_receipt
from r3e_tee.runtime.functions import ReceiptSigner
from r3e_tee.runtime.keys import EnclaveKeys

INPUT = b'{"pair": "NEO/USD"}'
OUTPUT = b'{"price": 12.0}'


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Enclave:
    keys: EnclaveKeys
    issuer: TokenIssuer
    body: dict[str, Any]
    receipt: dict[str, Any]

    @property
    def jwks(self) -> dict[str, Any]:
        return self.issuer.jwks()

    def resign(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` as a receipt signed by this enclave's attested key (as the runtime signs)."""
        signature = self.keys.sign(RECEIPT_DOMAIN + canonical(body))
        return {"alg": "ES256", "body": body, "signature": base64.b64encode(signature).decode()}


@pytest.fixture
def enclave() -> Enclave:
    keys = EnclaveKeys()
    issuer = TokenIssuer({"default": ec.generate_private_key(ec.SECP256R1())}, issuer="r3e-test", ttl=300)
    measurement = "ab" * 32
    token = issuer.issue(
        "simulation",
        {
            "provider": "simulation",
            "evidence_kind": "sgx-dcap",
            "measurement": measurement,
            "tcb_status": "UpToDate",
            "advisories": [],
            "debug": False,
            "simulated": True,
            "cnf": {"x25519": _b64u(keys.x25519_public), "p256": _b64u(keys.p256_public)},
            "tee": {"mrenclave": measurement, "mrsigner": "cd" * 32},
        },
        subject="e" * 32,
    )
    spec = {"enclave_id": "e" * 32, "function": "echo", "measurement": measurement, "version": 1}
    signer = ReceiptSigner(spec, keys, token.jti, token.token)
    now = time.time()
    body = {
        "v": 1,
        "function": "echo",
        "version": 1,
        "measurement": measurement,
        "invocation_id": "inv-1",
        "status": "ok",
        "input_sha256": hashlib.sha256(canonical(json.loads(INPUT))).hexdigest(),
        "output_sha256": hashlib.sha256(canonical(json.loads(OUTPUT))).hexdigest(),
        "error_sha256": None,
        "enclave_id": "e" * 32,
        "enclave_key": signer.enclave_key,
        "attestation": {"id": token.jti, "token": token.token},
        "started_at": round(now, 6),
        "finished_at": round(now + 0.01, 6),
    }
    receipt = json.loads(signer.sign(body, keys.sign_digest))
    return Enclave(keys, issuer, body, receipt)


def test_a_receipt_without_a_usable_start_time_is_a_receipt_error(enclave: Enclave) -> None:
    check = verify_receipt(enclave.receipt, enclave.jwks, input_bytes=INPUT, output_bytes=OUTPUT)
    assert "input matches" in check.checks and "output matches" in check.checks
    assert verify_receipt(enclave.resign(copy.deepcopy(enclave.body)), enclave.jwks).body == enclave.body
    for started_at in (None, "yesterday", [1], {"t": 1}, True, float("nan"), float("inf")):
        body = copy.deepcopy(enclave.body)
        if started_at is None:
            del body["started_at"]
        else:
            body["started_at"] = started_at
        with pytest.raises(ReceiptError, match="started_at"):
            verify_receipt(enclave.resign(body), enclave.jwks)
            pytest.fail(f"accepted a receipt with started_at={started_at!r}")


def test_a_receipt_signed_by_the_enclave_still_needs_its_token_valid_when_it_ran(enclave: Enclave) -> None:
    body = copy.deepcopy(enclave.body)
    body["started_at"] = body["started_at"] + 3600  # after the token expired
    with pytest.raises(ReceiptError, match="not valid at"):
        verify_receipt(enclave.resign(body), enclave.jwks)


def test_a_malformed_jwks_is_a_receipt_error_naming_it(enclave: Enclave) -> None:
    assert verify_receipt(enclave.receipt, {"keys": [{"kid": "other"}, *enclave.jwks["keys"]]})
    for jwks in ({"keys": [1]}, {"keys": "abc"}, {"keys": [None, *enclave.jwks["keys"]]}, {"keys": {"a": 1}}):
        with pytest.raises(ReceiptError, match="JWK"):
            verify_receipt(enclave.receipt, jwks)
            pytest.fail(f"accepted the JWKS {jwks!r}")
    with pytest.raises(ReceiptError, match="unknown key"):
        verify_receipt(enclave.receipt, {"keys": []})


def test_a_max_age_policy_judges_the_attestation_when_the_invocation_ran(enclave: Enclave) -> None:
    """``max_age`` bounds how old the evidence was; for a receipt what matters is its age when
    the invocation ran, not when the token was issued (a token may be used for its whole life)."""
    evidence_time = int(time.time()) - 5
    token = enclave.issuer.issue(
        "nitro",
        {
            "provider": "simulation",
            "evidence_kind": "nitro",
            "measurement": enclave.body["measurement"],
            "debug": False,
            "simulated": True,
            "cnf": {"x25519": _b64u(enclave.keys.x25519_public), "p256": _b64u(enclave.keys.p256_public)},
            "tee": {"timestamp": evidence_time * 1000, "pcrs": {"0": enclave.body["measurement"]}},
        },
        subject="e" * 32,
    )
    policy = Policy.from_dict({"allow_simulation": True, "max_age": 60})

    def receipt(started_at: float) -> dict[str, Any]:
        body = {
            **copy.deepcopy(enclave.body),
            "attestation": {"id": token.jti, "token": token.token},
            "started_at": started_at,
        }
        return enclave.resign(body)

    fresh = verify_receipt(receipt(evidence_time + 30.0), enclave.jwks, policy=policy)
    assert "attestation claims satisfy the policy" in fresh.checks
    # the token is still valid 200 s after it was issued, but the evidence was then 200 s old
    with pytest.raises(ReceiptError, match="max_age"):
        verify_receipt(receipt(evidence_time + 200.0), enclave.jwks, policy=policy)
        pytest.fail("accepted an invocation that ran on 200 s old evidence under max_age 60")
    assert verify_receipt(receipt(evidence_time + 200.0), enclave.jwks, policy=Policy(allow_simulation=True))


def test_a_debug_enclaves_receipt_is_refused_unless_the_policy_allows_debug(enclave: Enclave) -> None:
    """A debug enclave's host can read its signing key, so its receipts prove nothing: refused
    by default, as the default policy refuses debug evidence; accepted only when asked."""
    claims = {
        "provider": "simulation",
        "evidence_kind": "sgx-dcap",
        "measurement": enclave.body["measurement"],
        "simulated": True,
        "cnf": {"x25519": _b64u(enclave.keys.x25519_public), "p256": _b64u(enclave.keys.p256_public)},
        "tee": {},
    }
    assert verify_receipt(enclave.receipt, enclave.jwks).checks  # debug: false
    for debug in ({"debug": True}, {}):
        token = enclave.issuer.issue("simulation", {**claims, **debug}, subject="e" * 32)
        body = {**copy.deepcopy(enclave.body), "attestation": {"id": token.jti, "token": token.token}}
        with pytest.raises(ReceiptError, match="debug"):
            verify_receipt(enclave.resign(body), enclave.jwks)
            pytest.fail(f"accepted a receipt whose token says {debug or 'nothing about debug'}")
        with pytest.raises(ReceiptError, match="debug"):
            verify_receipt(enclave.resign(body), enclave.jwks, policy=Policy(allow_simulation=True))
    unsafe = Policy(allow_simulation=True, allow_debug=True)
    assert (
        "attestation claims satisfy the policy"
        in verify_receipt(enclave.resign(body), enclave.jwks, policy=unsafe).checks
    )
