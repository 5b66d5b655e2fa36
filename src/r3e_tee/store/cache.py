"""A store-backed cache of immutable-until-expiry values (fetched DCAP collateral).

Every replica shares it, so Intel PCS or a PCCS is asked once per platform per nextUpdate window
across the cluster. Entries are never returned after their expiry.
"""

from __future__ import annotations

import time
from datetime import datetime

from r3e_tee.store.base import Store


class StoreCache:
    """Implements r3e_tee.attestation.collateral.CollateralCache over the ``cache`` table."""

    def __init__(self, store: Store, *, namespace: str) -> None:
        self.store = store
        self.prefix = f"{namespace}:"

    def get(self, key: str) -> bytes | None:
        row = self.store.fetchone(
            "SELECT value, expires_at FROM cache WHERE key = ? AND expires_at > ?",
            (self.prefix + key, time.time()),
        )
        return None if row is None else bytes(row["value"])

    def put(self, key: str, value: bytes, expires_at: datetime) -> None:
        with self.store.transaction() as tx:
            tx.execute("DELETE FROM cache WHERE key = ? OR expires_at < ?", (self.prefix + key, time.time()))
            tx.execute(
                "INSERT INTO cache (key, value, expires_at) VALUES (?, ?, ?)",
                (self.prefix + key, value, expires_at.timestamp()),
            )
