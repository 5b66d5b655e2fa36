"""The audit log: append-only and hash-chained.

Each entry holds the SHA-256 of the previous entry, and its own hash covers every field (sequence
number, time, actor, action, subject, outcome, reason, detail, claims digest, previous hash). An
entry edited, inserted or deleted in the store breaks the chain at that point, and
:meth:`AuditLog.verify` names the first broken link. Key creation, rotation and retirement,
KEK re-wraps, secret changes, releases and denials are logged; details carry names, versions,
ids and digests, never a secret value or key material.

Appends serialise across replicas (a PostgreSQL transaction-scoped advisory lock; SQLite's
writer lock) and happen in the caller's transaction, so an action and its entry commit together.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from r3e_tee.store import Store, Tx
from r3e_tee.store.postgres import lock_key

GENESIS = "0" * 64
_COLUMNS = "seq, ts, actor, action, subject, outcome, reason, detail, claims_digest, prev_hash, hash"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def claims_digest(claims: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of attestation claims (what the audit log keeps of them)."""
    return hashlib.sha256(canonical_json(dict(claims)).encode()).hexdigest()


def entry_hash(
    *,
    seq: int,
    ts: float,
    actor: str,
    action: str,
    subject: str | None,
    outcome: str,
    reason: str | None,
    detail: str,
    claims_digest: str | None,
    prev_hash: str,
) -> str:
    body = canonical_json(
        ["r3e-tee-audit-v1", seq, repr(float(ts)), actor, action, subject, outcome, reason, detail,
         claims_digest, prev_hash]
    )  # fmt: skip
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    ts: float
    actor: str
    action: str
    subject: str | None
    outcome: str
    reason: str | None
    detail: dict[str, Any]
    claims_digest: str | None
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "outcome": self.outcome,
            "reason": self.reason,
            "detail": self.detail,
            "claims_digest": self.claims_digest,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class ChainVerdict:
    ok: bool
    entries: int
    head: str
    first_broken: int | None = None
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "head": self.head,
            "first_broken": self.first_broken,
            "problem": self.problem,
        }


class AuditLog:
    _LOCK = lock_key("audit-log")

    def __init__(self, store: Store, *, clock: Any = time.time) -> None:
        self.store = store
        self.clock = clock

    def append(
        self,
        tx: Tx,
        *,
        actor: str,
        action: str,
        subject: str | None = None,
        outcome: str = "ok",
        reason: str | None = None,
        detail: Mapping[str, Any] | None = None,
        claims_digest: str | None = None,
    ) -> int:
        """Append one entry inside ``tx``; returns its sequence number."""
        if tx.dialect == "postgresql":
            tx.execute("SELECT pg_advisory_xact_lock(?)", (self._LOCK,))
        last = tx.fetchone("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        seq = 1 if last is None else int(last["seq"]) + 1
        prev = GENESIS if last is None else str(last["hash"])
        ts = float(self.clock())
        detail_text = canonical_json(dict(detail or {}))
        digest = entry_hash(
            seq=seq,
            ts=ts,
            actor=actor,
            action=action,
            subject=subject,
            outcome=outcome,
            reason=reason,
            detail=detail_text,
            claims_digest=claims_digest,
            prev_hash=prev,
        )
        tx.execute(
            f"INSERT INTO audit_log ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
            (seq, ts, actor, action, subject, outcome, reason, detail_text, claims_digest, prev, digest),
        )
        return seq

    def record(self, **fields: Any) -> int:
        """Append in a transaction of its own (denials: nothing else is written)."""
        with self.store.transaction() as tx:
            return self.append(tx, **fields)

    def entries(
        self,
        *,
        after: int = 0,
        limit: int = 100,
        action: str | None = None,
        subject: str | None = None,
    ) -> list[AuditEntry]:
        sql = f"SELECT {_COLUMNS} FROM audit_log WHERE seq > ?"  # noqa: S608 - constant columns
        params: list[Any] = [after]
        if action:
            sql += " AND action = ?"
            params.append(action)
        if subject:
            sql += " AND subject = ?"
            params.append(subject)
        sql += " ORDER BY seq LIMIT ?"
        params.append(max(1, min(int(limit), 10_000)))
        return [_entry(r) for r in self.store.fetchall(sql, params)]

    def _rows(self, page: int = 1000) -> Iterator[dict[str, Any]]:
        after = 0
        while True:
            rows = self.store.fetchall(
                f"SELECT {_COLUMNS} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
                (after, page),
            )
            yield from rows
            if len(rows) < page:
                return
            after = int(rows[-1]["seq"])

    def verify(self) -> ChainVerdict:
        """Walk the chain from the first entry; the first entry that does not hold is named."""
        prev = GENESIS
        expected_seq = 1
        count = 0
        for row in self._rows():
            seq = int(row["seq"])
            if seq != expected_seq:
                return ChainVerdict(
                    False,
                    count,
                    prev,
                    expected_seq,
                    f"entry {expected_seq} is missing (the log jumps from {expected_seq - 1} to {seq}): "
                    "entries were deleted",
                )
            if row["prev_hash"] != prev:
                return ChainVerdict(
                    False,
                    count,
                    prev,
                    seq,
                    f"entry {seq} does not link to entry {seq - 1}: its prev_hash is not the hash of "
                    "the entry before it (entries were removed, inserted or rewritten)",
                )
            recomputed = entry_hash(
                seq=seq,
                ts=float(row["ts"]),
                actor=str(row["actor"]),
                action=str(row["action"]),
                subject=row["subject"],
                outcome=str(row["outcome"]),
                reason=row["reason"],
                detail=str(row["detail"]),
                claims_digest=row["claims_digest"],
                prev_hash=str(row["prev_hash"]),
            )
            if recomputed != row["hash"]:
                return ChainVerdict(
                    False,
                    count,
                    prev,
                    seq,
                    f"entry {seq} was edited: its content does not match its hash",
                )
            prev = str(row["hash"])
            expected_seq += 1
            count += 1
        return ChainVerdict(True, count, prev)


def _entry(row: Mapping[str, Any]) -> AuditEntry:
    try:
        detail = json.loads(row["detail"]) if row["detail"] else {}
    except ValueError:
        detail = {"unparseable": True}
    return AuditEntry(
        seq=int(row["seq"]),
        ts=float(row["ts"]),
        actor=str(row["actor"]),
        action=str(row["action"]),
        subject=row["subject"],
        outcome=str(row["outcome"]),
        reason=row["reason"],
        detail=detail if isinstance(detail, dict) else {"value": detail},
        claims_digest=row["claims_digest"],
        prev_hash=str(row["prev_hash"]),
        hash=str(row["hash"]),
    )
