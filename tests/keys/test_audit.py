"""The audit log: hash chain, edits and deletions detected with the first broken link named,
appends from concurrent writers (replicas) staying one chain."""

from __future__ import annotations

import threading

import pytest

from r3e_tee.keys.audit import GENESIS, AuditLog, entry_hash
from r3e_tee.store import Store, open_store


def _fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.record(
            actor="admin:test",
            action="secret.update",
            subject=f"s{i}",
            detail={"revision": i, "policy_digest": "ab" * 32},
            claims_digest="cd" * 32,
        )


def test_chain_links_every_entry(store: Store) -> None:
    log = AuditLog(store)
    _fill(log, 5)
    entries = log.entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS
    for a, b in zip(entries, entries[1:], strict=False):
        assert b.prev_hash == a.hash
    e = entries[2]
    assert e.hash == entry_hash(
        seq=e.seq,
        ts=e.ts,
        actor=e.actor,
        action=e.action,
        subject=e.subject,
        outcome=e.outcome,
        reason=e.reason,
        detail=store.fetchval("SELECT detail FROM audit_log WHERE seq = 3"),
        claims_digest=e.claims_digest,
        prev_hash=e.prev_hash,
    )
    verdict = log.verify()
    assert verdict.ok and verdict.entries == 5 and verdict.head == entries[-1].hash
    assert [x.seq for x in log.entries(after=3)] == [4, 5]
    assert [x.subject for x in log.entries(subject="s1")] == ["s1"]


@pytest.mark.parametrize(
    ("sql", "params", "broken", "problem"),
    [
        ("UPDATE audit_log SET actor = ? WHERE seq = 3", ("admin:someone-else",), 3, "entry 3 was edited"),
        ("UPDATE audit_log SET detail = ? WHERE seq = 4", ('{"revision":99}',), 4, "entry 4 was edited"),
        ("UPDATE audit_log SET outcome = ? WHERE seq = 2", ("denied",), 2, "was edited"),
        ("UPDATE audit_log SET ts = ts + 1 WHERE seq = 5", (), 5, "was edited"),
        ("DELETE FROM audit_log WHERE seq = 2", (), 2, "entry 2 is missing"),
        ("UPDATE audit_log SET prev_hash = ? WHERE seq = 4", ("0" * 64,), 4, "does not link to entry 3"),
    ],
)
def test_edited_or_deleted_entry_is_detected(
    store: Store, sql: str, params: tuple[object, ...], broken: int, problem: str
) -> None:
    log = AuditLog(store)
    _fill(log, 6)
    assert log.verify().ok
    store.execute(sql, params)
    verdict = log.verify()
    assert not verdict.ok and verdict.first_broken == broken and problem in (verdict.problem or "")
    assert verdict.entries == broken - 1


def test_rewriting_an_entry_with_a_fresh_hash_breaks_the_next_link(store: Store) -> None:
    """An editor who recomputes the edited entry's own hash is caught by its successor."""
    log = AuditLog(store)
    _fill(log, 4)
    row = store.fetchone("SELECT * FROM audit_log WHERE seq = 2")
    assert row is not None
    forged = entry_hash(
        seq=2,
        ts=row["ts"],
        actor="admin:nobody",
        action=row["action"],
        subject=row["subject"],
        outcome=row["outcome"],
        reason=row["reason"],
        detail=row["detail"],
        claims_digest=row["claims_digest"],
        prev_hash=row["prev_hash"],
    )
    store.execute("UPDATE audit_log SET actor = 'admin:nobody', hash = ? WHERE seq = 2", (forged,))
    verdict = log.verify()
    assert verdict.first_broken == 3 and "does not link to entry 2" in (verdict.problem or "")


def test_concurrent_writers_keep_one_chain(store_url: str) -> None:
    """Two stores (as two replicas) appending at once: contiguous sequence, intact chain."""
    stores = [open_store(store_url), open_store(store_url)]
    stores[0].migrate()
    try:
        errors: list[BaseException] = []

        def writer(s: Store, tag: str) -> None:
            try:
                log = AuditLog(s)
                for i in range(25):
                    log.record(actor=tag, action="test.append", subject=str(i))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(s, f"replica-{i}")) for i, s in enumerate(stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        verdict = AuditLog(stores[0]).verify()
        assert verdict.ok and verdict.entries == 50
    finally:
        for s in stores:
            s.close()
