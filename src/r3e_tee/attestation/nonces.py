"""Single-use, expiring attestation nonces kept in the store (shared by every replica)."""

from __future__ import annotations

import hmac
import secrets
import time

from r3e_tee.errors import Reason, VerificationError
from r3e_tee.store import Store


class NonceStore:
    def __init__(self, store: Store, *, ttl: float) -> None:
        self._store = store
        self.ttl = ttl

    def issue(self) -> tuple[str, float]:
        """A fresh 32-byte nonce (hex) and its expiry time."""
        nonce = secrets.token_hex(32)
        now = time.time()
        with self._store.transaction() as tx:
            tx.execute("DELETE FROM nonces WHERE expires_at < ?", (now - 3600,))
            tx.execute(
                "INSERT INTO nonces (nonce, created_at, expires_at) VALUES (?, ?, ?)",
                (nonce, now, now + self.ttl),
            )
        return nonce, now + self.ttl

    def consume(self, nonce: str) -> None:
        """Use a nonce once. A second use, an unknown or an expired nonce is a rejection."""
        normalized = nonce.strip().lower()
        with self._store.transaction() as tx:
            row = tx.fetchone("SELECT nonce, expires_at FROM nonces WHERE nonce = ?", (normalized,))
            deleted = tx.execute("DELETE FROM nonces WHERE nonce = ?", (normalized,)) if row else 0
        if row is None or deleted != 1 or not hmac.compare_digest(str(row["nonce"]), normalized):
            raise VerificationError(
                Reason.NONCE_MISMATCH,
                "nonce unknown or already used (a replay)",
                check="nonce",
                hint="request a fresh nonce with POST /v1/attestation/nonce for every attestation",
            )
        if float(row["expires_at"]) < time.time():
            raise VerificationError(
                Reason.NONCE_MISMATCH,
                f"nonce expired {time.time() - float(row['expires_at']):.0f} s ago",
                check="nonce",
                hint=f"attest within {self.ttl:.0f} s of requesting the nonce",
            )
