"""Typed errors of key management, all under :class:`r3e_tee.errors.KeyManagementError` or
:class:`r3e_tee.errors.SecretReleaseDenied`.

Messages name keys (owner, version, KEK id, file path) and secrets (by name), never their values.
"""

from __future__ import annotations

from typing import Any

from r3e_tee.errors import KeyManagementError, SecretReleaseDenied, with_observation


class KekError(KeyManagementError):
    """The key-encryption key is missing, unreadable, malformed or not the store's KEK."""

    code = "kek"
    http_status = 503


class KeyIntegrityError(KeyManagementError):
    """A wrapped key or an encrypted value does not authenticate: corrupted, moved or wrong KEK."""

    code = "key_integrity"


class KeyRetiredError(KeyManagementError):
    """A data key version was retired by rotation: what it encrypted can no longer be decrypted."""

    code = "key_retired"
    http_status = 409
    exit_code = 1


class AuditChainError(KeyManagementError):
    """The audit log could not be appended to (the chain head is unreadable)."""

    code = "audit_chain"


class ReleaseDenied(SecretReleaseDenied):
    """The broker refused to release secrets. ``reason`` is machine-readable:

    ``expired``, ``revoked``, ``invalid-token``, ``unknown-secret``, ``provider-not-allowed``, or
    an attestation policy reason (``measurement-mismatch``, ``debug-enclave``,
    ``simulation-not-allowed``, ``pcr-mismatch``, ``kind-not-allowed``, ``tcb-status-not-allowed``, ...).
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        secret: str | None = None,
        check: str | None = None,
        observed: str | None = None,
        expected: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.reason = reason
        self.secret = secret
        self.check = check
        self.observed = observed
        self.expected = expected
        super().__init__(f"[{reason}] {with_observation(message, observed, expected)}", hint=hint)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(
            {
                "reason": self.reason,
                "secret": self.secret,
                "check": self.check,
                "observed": self.observed,
                "expected": self.expected,
            }
        )
        return out
