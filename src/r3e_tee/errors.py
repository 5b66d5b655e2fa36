"""One typed error hierarchy for the whole product.

Every error carries what a user needs to act: what went wrong, where, and how to fix it.
Messages never contain secret values; callers pass names of secrets, never their contents.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class R3ETeeError(Exception):
    """Base of every error the product raises on purpose.

    ``hint`` says how to fix the problem; ``exit_code`` is what the CLI exits with.
    """

    exit_code: int = 2
    http_status: int = 500
    code: str = "error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (fix: {self.hint})"
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """Stable JSON form used by the API and by ``-o json``."""
        out: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        return out


# --- configuration -----------------------------------------------------------------------------


class ConfigError(R3ETeeError):
    """A configuration problem, located as precisely as the source allows."""

    code = "config"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key_path: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.key_path = key_path
        where = []
        if file:
            where.append(file if line is None else f"{file}:{line}")
        if key_path:
            where.append(key_path)
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message, hint=hint)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update({"file": self.file, "line": self.line, "key_path": self.key_path})
        return out


# --- store -------------------------------------------------------------------------------------


class StoreError(R3ETeeError):
    """The store is unreachable, misconfigured, or its schema is not what this version expects."""

    code = "store"
    http_status = 503


class NotFoundError(R3ETeeError):
    code = "not_found"
    http_status = 404
    exit_code = 1


class ConflictError(R3ETeeError):
    code = "conflict"
    http_status = 409
    exit_code = 1


class InvalidRequestError(R3ETeeError):
    """The caller sent something unusable (bad size, unknown provider, ...)."""

    code = "invalid_request"
    http_status = 400
    exit_code = 2


class PayloadTooLargeError(InvalidRequestError):
    """A request body over the route's limit, refused before it is buffered."""

    code = "too_large"
    http_status = 413


# --- authentication ----------------------------------------------------------------------------


class AuthenticationError(R3ETeeError):
    code = "unauthenticated"
    http_status = 401
    exit_code = 1


class PermissionDeniedError(R3ETeeError):
    code = "forbidden"
    http_status = 403
    exit_code = 1


# --- evidence and attestation ------------------------------------------------------------------


class EvidenceFormatError(R3ETeeError):
    """Evidence bytes do not parse. Names the field and the byte offset where parsing stopped."""

    code = "malformed"
    http_status = 400
    exit_code = 2

    def __init__(self, message: str, *, field: str, offset: int | None = None, hint: str | None = None):
        self.field = field
        self.offset = offset
        loc = field if offset is None else f"{field} at offset {offset}"
        super().__init__(f"{loc}: {message}", hint=hint)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update({"reason": "malformed", "field": self.field, "offset": self.offset})
        return out


class Reason(StrEnum):
    """Why evidence was rejected. Values match ``reason_classes`` of the shared vectors."""

    BAD_SIGNATURE = "bad-signature"
    BAD_QE_REPORT = "bad-qe-report"
    BAD_CHAIN = "bad-chain"
    REVOKED = "revoked"
    EXPIRED_COLLATERAL = "expired-collateral"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    TCB_LEVEL_NOT_FOUND = "tcb-level-not-found"
    DEBUG_ENCLAVE = "debug-enclave"
    PCR_MISMATCH = "pcr-mismatch"
    MALFORMED = "malformed"
    COLLATERAL_MISMATCH = "collateral-mismatch"
    # policy (reference values) beyond the vector classes
    MEASUREMENT_MISMATCH = "measurement-mismatch"
    TCB_STATUS_NOT_ALLOWED = "tcb-status-not-allowed"
    ADVISORY_NOT_ALLOWED = "advisory-not-allowed"
    REPORT_DATA_MISMATCH = "report-data-mismatch"
    NONCE_MISMATCH = "nonce-mismatch"
    EVIDENCE_TOO_OLD = "evidence-too-old"
    SIMULATION_NOT_ALLOWED = "simulation-not-allowed"
    KIND_NOT_ALLOWED = "kind-not-allowed"


def with_observation(message: str, observed: str | None, expected: str | None) -> str:
    """``message (observed X, expected Y)``: how every rejection reports what it compared."""
    if observed is None and expected is None:
        return message
    return f"{message} (observed {observed!s}, expected {expected!s})"


class VerificationError(R3ETeeError):
    """Evidence was parsed but rejected. Names the check, what was observed and what was expected."""

    code = "rejected"
    http_status = 422
    exit_code = 1

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        check: str,
        observed: str | None = None,
        expected: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.reason = reason
        self.check = check
        self.observed = observed
        self.expected = expected
        super().__init__(
            f"[{reason.value}] {check}: {with_observation(message, observed, expected)}", hint=hint
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(
            {
                "reason": self.reason.value,
                "check": self.check,
                "observed": self.observed,
                "expected": self.expected,
            }
        )
        return out


class CollateralError(R3ETeeError):
    """Collateral could not be obtained or is unusable (offline, bad bundle, HTTP error)."""

    code = "collateral"
    http_status = 502
    exit_code = 2


class PolicyError(R3ETeeError):
    """A policy document is malformed (not a rejection: the policy itself is unusable)."""

    code = "policy"
    http_status = 400
    exit_code = 2


# --- providers, enclaves, runtime --------------------------------------------------------------


class ProviderError(R3ETeeError):
    code = "provider"
    http_status = 503
    exit_code = 1


class ProviderUnavailableError(ProviderError):
    """The provider cannot run on this machine; the hint carries the doctor's explanation."""

    code = "provider_unavailable"


class CapacityError(ProviderError):
    code = "capacity"
    http_status = 409


class EnclaveError(R3ETeeError):
    code = "enclave"
    http_status = 502
    exit_code = 1


# --- keys and secrets --------------------------------------------------------------------------


class KeyManagementError(R3ETeeError):
    code = "keys"
    http_status = 500
    exit_code = 2


class SecretReleaseDenied(R3ETeeError):
    code = "release_denied"
    http_status = 403
    exit_code = 1


class AuditLogError(R3ETeeError):
    code = "audit"
    exit_code = 1


# --- functions ---------------------------------------------------------------------------------


class FunctionError(R3ETeeError):
    code = "function"
    http_status = 502
    exit_code = 1


class InvocationInputError(EnclaveError):
    """The enclave refused an invocation's input (a ciphertext that does not open, not JSON, a
    reply key nothing can be sealed to): the caller's mistake, not a sign the enclave is unwell,
    so the service answers 400 and keeps the enclave."""

    code = "invalid_input"
    http_status = 400


class ReceiptError(R3ETeeError):
    code = "receipt"
    http_status = 422
    exit_code = 1
