"""Offline verification of execution receipts.

A receipt says: this function version (measurement) turned an input (SHA-256) into an output
(SHA-256) in this enclave, whose attested key signed the statement. Checking it needs no trust
in the operator, only the issuer's JWKS (and, with ``evidence``, the hardware roots):

1. the receipt signature verifies with the enclave key it names (over the receipt, or over
   the batch of receipts the enclave finished together, which the receipt lists);
2. that key is the one the attestation token binds (``cnf.p256``), for the same enclave;
3. the token is signed by a JWKS key, names the same measurement, was valid when the
   invocation ran, and is not a debug enclave's (unless the policy allows debug);
4. the token's claims satisfy the caller's policy;
5. the input/output the caller holds hash to the receipt's values.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from r3e_tee.attestation.tokens import TokenError, verify_token
from r3e_tee.errors import ReceiptError

RECEIPT_DOMAIN = b"r3e-receipt/v1\n"
#: a batch signature covers this, then the SHA-256 of each receipt's signed statement, in order
BATCH_DOMAIN = b"r3e-receipt-batch/v1\n"
#: the most receipts one batch signature may cover
MAX_BATCH = 64
_CLOCK_SKEW = 5.0


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_sha256(data: bytes) -> str:
    """SHA-256 of the canonical JSON form of ``data`` (a JSON document in any formatting)."""
    try:
        value = json.loads(data)
    except ValueError:
        raise ReceiptError("the input/output file is not JSON; receipts hash canonical JSON") from None
    return hashlib.sha256(canonical(value)).hexdigest()


def _b64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class ReceiptCheck:
    body: Mapping[str, Any]
    token_claims: Mapping[str, Any]
    checks: list[str] = field(default_factory=list)


def verify_receipt(
    receipt: Mapping[str, Any],
    jwks: Mapping[str, Any],
    *,
    issuer: str | None = None,
    input_bytes: bytes | None = None,
    output_bytes: bytes | None = None,
    policy: Any = None,
) -> ReceiptCheck:
    """Raise :class:`ReceiptError` naming the first failed check; return what was checked."""
    done: list[str] = []
    try:
        body = receipt["body"]
        signature = base64.b64decode(receipt["signature"], validate=True)
        enclave_key = _b64u(str(body["enclave_key"]))
        token = str(body["attestation"]["token"])
    except (KeyError, TypeError, binascii.Error, ValueError):
        raise ReceiptError(
            "not a receipt: body, signature, enclave_key and attestation.token are required"
        ) from None
    if body.get("v") != 1 or receipt.get("alg", "ES256") not in ("ES256", "ES256-batch"):
        raise ReceiptError(f"unsupported receipt version {body.get('v')!r} / alg {receipt.get('alg')!r}")
    signed = signed_message(receipt, RECEIPT_DOMAIN + canonical(body))
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), enclave_key)
        key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise ReceiptError(
            "the receipt signature does not verify with the enclave key it names (altered or forged)"
        ) from None
    batch = receipt.get("batch") if receipt.get("alg") == "ES256-batch" else None
    done.append(
        "receipt signature by the enclave key"
        + (f" (one signature over a batch of {len(batch['leaves'])})" if isinstance(batch, Mapping) else "")
    )

    started_at = body.get("started_at")
    if (
        isinstance(started_at, bool)
        or not isinstance(started_at, int | float)
        or not math.isfinite(started_at)
    ):
        # the token must be checked at the time the invocation ran: without it nothing says
        # the enclave was attested then (and float() of it would fail with a bare ValueError)
        raise ReceiptError(
            f"the receipt's started_at is {started_at!r}, not a time (seconds since the epoch)",
            hint="pass the receipt exactly as the invocation returned it",
        )
    try:
        claims = verify_token(token, jwks, issuer=issuer, at=float(started_at), leeway=_CLOCK_SKEW)
    except TokenError as exc:
        raise ReceiptError(f"attestation token: {exc.message}", hint=exc.hint) from None
    done.append("attestation token signed by a JWKS key and valid when the invocation ran")
    bound = claims.get("cnf", {}).get("p256")
    if not isinstance(bound, str) or not hmac.compare_digest(_b64u(bound), enclave_key):
        raise ReceiptError("the enclave key is not the key the attestation token binds")
    if claims.get("sub") != body.get("enclave_id"):
        raise ReceiptError(
            f"the token is for enclave {claims.get('sub')}, the receipt for {body.get('enclave_id')}"
        )
    if body.get("attestation", {}).get("id") not in (None, claims.get("jti")):
        raise ReceiptError("the receipt names another attestation than its token")
    done.append("enclave key bound to the attestation result")
    if claims.get("debug") is not False and not getattr(policy, "allow_debug", False):
        # a debug enclave's host reads its memory, signing key included: it can sign anything
        raise ReceiptError(
            f"enclave {claims.get('sub')} is attested as a debug enclave (or its token does not say "
            "it is not): its host can read its signing key, so the receipt proves nothing",
            hint="accept it only knowingly, with a policy saying allow_debug: true (UNSAFE)",
        )
    if claims.get("measurement") != body.get("measurement"):
        raise ReceiptError(
            f"measurement mismatch: receipt {body.get('measurement')}, "
            f"attestation {claims.get('measurement')}"
        )
    done.append("measurement matches the attestation")
    if policy is not None:
        _check_policy(policy, claims, at=float(started_at))
        done.append("attestation claims satisfy the policy")
    hashed = (("input", input_bytes, "input_sha256"), ("output", output_bytes, "output_sha256"))
    for name, data, key_name in hashed:
        if data is None:
            continue
        if canonical_sha256(data) != body.get(key_name):
            raise ReceiptError(f"the {name} does not match the receipt's {key_name}")
        done.append(f"{name} matches")
    return ReceiptCheck(body, claims, done)


def signed_message(receipt: Mapping[str, Any], statement: bytes) -> bytes:
    """What the receipt's signature covers: its statement (``ES256``), or, for a receipt signed
    with others (``ES256-batch``), the batch: BATCH_DOMAIN and the SHA-256 of every statement in
    the batch, whose ``index``-th must be this receipt's."""
    if receipt.get("alg", "ES256") == "ES256":
        return statement
    batch = receipt.get("batch")
    leaves = batch.get("leaves") if isinstance(batch, Mapping) else None
    index = batch.get("index") if isinstance(batch, Mapping) else None
    if (
        not isinstance(leaves, list)
        or not 2 <= len(leaves) <= MAX_BATCH
        or not isinstance(index, int)
        or isinstance(index, bool)
        or not 0 <= index < len(leaves)
        or not all(isinstance(leaf, str) and len(leaf) == 64 for leaf in leaves)
    ):
        raise ReceiptError(
            f"a batch receipt needs batch.index and 2 to {MAX_BATCH} batch.leaves (SHA-256, hex)"
        )
    try:
        digests = [bytes.fromhex(leaf) for leaf in leaves]
    except ValueError:
        digests = []
    if len(digests) != len(leaves) or any(len(d) != 32 for d in digests):  # fromhex skips spaces
        raise ReceiptError("batch.leaves must be SHA-256 digests in hex")
    if not hmac.compare_digest(digests[index], hashlib.sha256(statement).digest()):
        raise ReceiptError(
            "the receipt body is not the one its batch signature lists at its index (altered or forged)"
        )
    return BATCH_DOMAIN + b"".join(digests)


def _check_policy(policy: Any, claims: Mapping[str, Any], *, at: float) -> None:
    """Apply a verification Policy to the attested claims carried by the token, as of ``at``,
    when the invocation ran: a ``max_age`` bounds how old the evidence was then (judged as of
    the token's issue, any evidence passes however late in the token's life the receipt is)."""
    from datetime import UTC, datetime

    from r3e_tee.attestation.result import EvidenceKind, VerificationResult
    from r3e_tee.errors import VerificationError

    result = VerificationResult(
        kind=EvidenceKind(claims["evidence_kind"]),
        verified_at=datetime.fromtimestamp(float(claims["iat"]), UTC),
        claims=dict(claims.get("tee", {})),
        tcb_status=claims.get("tcb_status"),
        advisories=tuple(claims.get("advisories", ())),
        debug=claims.get("debug") is not False,
        simulated=bool(claims.get("simulated")),
    )
    try:
        policy.check(result, at=datetime.fromtimestamp(at, UTC))
    except VerificationError as exc:
        raise ReceiptError(f"policy: {exc.message}") from None
