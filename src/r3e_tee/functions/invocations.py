"""Asynchronous invocations: a durable queue in the store, at-least-once, with idempotency keys.

Each replica runs a dispatcher that claims queued work with a lease (PostgreSQL: ``FOR UPDATE
SKIP LOCKED``, so replicas never take the same row; SQLite: one writer at a time). A crash
leaves the lease to expire and the work is claimed again; the idempotency key makes a
resubmission return the first invocation instead of running twice.

A claim's ``attempts`` value is its fencing token: the worker renews its lease while the attempt
runs (a function may run far longer than one lease), and its result, retry or renewal only
counts while the row is still ``running`` under that same attempt. A worker that stalled past
its lease and was superseded cannot overwrite the newer attempt's result, nor send a finished
invocation back to the queue. An invocation whose lease expired MAX_ATTEMPTS times (its worker
died each time) fails instead of being claimed forever.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from r3e_tee.errors import ConflictError, NotFoundError, R3ETeeError
from r3e_tee.store import Store

log = logging.getLogger("r3e_tee.functions")

MAX_ATTEMPTS = 5
T = TypeVar("T")
Runner = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def request_digest(*, input: bytes, encrypted: bool, reply_key: bytes | None, enclave_id: str | None) -> str:
    """What an idempotency key is bound to: every part of the request that changes what runs."""
    h = hashlib.sha256(b"r3e-tee/invocation-request/v1")
    for part in (
        input,
        b"e" if encrypted else b"p",
        reply_key,
        None if enclave_id is None else enclave_id.encode(),
    ):
        if part is None:
            h.update(b"\xff" * 8)
        else:
            h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


class InvocationQueue:
    def __init__(self, store: Store) -> None:
        self.store = store

    def submit(
        self,
        *,
        function: str,
        version: int,
        input: bytes,
        encrypted: bool,
        reply_key: bytes | None,
        idempotency_key: str | None,
        enclave_id: str | None = None,
    ) -> tuple[str, bool]:
        """Queue an invocation; returns (id, created). An idempotency key (unique per function)
        seen before returns the earlier invocation's id with created=False, provided the request
        is the same; reusing a key for a different request is a :class:`ConflictError` rather
        than a silently dropped invocation."""
        idempotency_key = idempotency_key or None  # an empty header is no key
        digest = request_digest(input=input, encrypted=encrypted, reply_key=reply_key, enclave_id=enclave_id)
        inv_id = uuid.uuid4().hex
        with self.store.transaction() as tx:
            # PostgreSQL: ON CONFLICT waits for a concurrent submission of the same key and then
            # does nothing; the SELECT below (a new snapshot) sees the invocation it committed
            inserted = tx.fetchone(
                "INSERT INTO invocations (id, function, version, status, input, encrypted, reply_key, "
                "idempotency_key, enclave_id, request_sha256, created_at) "
                "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (function, idempotency_key) DO NOTHING RETURNING id",
                (
                    inv_id,
                    function,
                    version,
                    input,
                    int(encrypted),
                    reply_key,
                    idempotency_key,
                    enclave_id,
                    digest,
                    time.time(),
                ),
            )
            if inserted is not None:
                return inv_id, True
            row = tx.fetchone(
                "SELECT id, request_sha256 FROM invocations WHERE function = ? AND idempotency_key = ?",
                (function, idempotency_key),
            )
        if row is None:
            raise ConflictError(
                f"a submission to {function} with the same Idempotency-Key was withdrawn meanwhile",
                hint="submit again",
            )
        first = row["request_sha256"]
        if first is not None and not hmac.compare_digest(str(first), digest):
            raise ConflictError(
                f"this Idempotency-Key was already used for invocation {row['id']} of {function} "
                "with a different request (body, encryption, enclave or reply key)",
                hint="use a new Idempotency-Key for a different request; resend the identical "
                "request to get the first invocation",
            )
        return str(row["id"]), False

    def get(self, inv_id: str) -> dict[str, Any]:
        row = self.store.fetchone(
            "SELECT id, function, version, status, encrypted, output, output_encrypted, receipt, error, "
            "attempts, enclave_id, created_at, started_at, finished_at FROM invocations WHERE id = ?",
            (inv_id,),
        )
        if row is None:
            raise NotFoundError(f"no invocation {inv_id}")
        out = dict(row)
        out["encrypted"] = bool(row["encrypted"])
        output = row["output"]
        out.pop("output")
        out.pop("output_encrypted")
        if output is not None:
            if row["output_encrypted"]:
                out["output_encrypted"] = base64.b64encode(bytes(output)).decode()
            else:
                out["output"] = json.loads(bytes(output))
        out["receipt"] = json.loads(row["receipt"]) if row["receipt"] else None
        return out

    def claim(self, limit: int, lease: float) -> list[dict[str, Any]]:
        """Up to ``limit`` queued invocations (or ones whose worker's lease expired), leased to
        the caller until now + ``lease``. Each row's ``attempts`` is the claim's fencing token."""
        now = time.time()
        with self.store.transaction() as tx:
            # PostgreSQL: rows another replica is claiming right now are skipped, never waited for
            skip = " FOR UPDATE SKIP LOCKED" if tx.dialect == "postgresql" else ""
            # leases that expired on their last allowed attempt: the worker died every time
            tx.execute(
                "UPDATE invocations SET status = 'failed', error = ?, finished_at = ?, lease_until = NULL "  # noqa: S608 - constant clause
                "WHERE id IN (SELECT id FROM invocations WHERE status = 'running' AND lease_until < ? "
                f"AND attempts >= ?{skip})",
                (
                    f"gave up after {MAX_ATTEMPTS} attempts: the worker running it stopped "
                    "(crashed or lost the store) each time",
                    now,
                    now,
                    MAX_ATTEMPTS,
                ),
            )
            rows = tx.fetchall(
                "UPDATE invocations SET status = 'running', lease_until = ?, attempts = attempts + 1, "  # noqa: S608 - constant clause
                "started_at = ? WHERE id IN (SELECT id FROM invocations WHERE status = 'queued' "
                "OR (status = 'running' AND lease_until < ? AND attempts < ?) ORDER BY created_at "
                f"LIMIT ?{skip}) RETURNING *",
                (now + lease, now, now, MAX_ATTEMPTS, limit),
            )
        return rows

    def renew(self, inv_id: str, attempt: int, lease: float) -> bool:
        """Extend a running attempt's lease; False when the attempt no longer holds it."""
        changed = self.store.execute(
            "UPDATE invocations SET lease_until = ? WHERE id = ? AND status = 'running' AND attempts = ?",
            (time.time() + lease, inv_id, attempt),
        )
        return changed == 1

    def complete(self, inv_id: str, attempt: int, result: dict[str, Any]) -> bool:
        """Record attempt ``attempt``'s result; False (nothing written) when a newer attempt
        took the invocation over or it already finished."""
        encrypted_out = result.get("output_encrypted")
        changed = self.store.execute(
            "UPDATE invocations SET status = ?, output = ?, output_encrypted = ?, receipt = ?, error = ?, "
            "enclave_id = ?, finished_at = ?, lease_until = NULL "
            "WHERE id = ? AND status = 'running' AND attempts = ?",
            (
                "succeeded" if result["status"] == "ok" else "failed",
                encrypted_out if encrypted_out is not None else result.get("output"),
                int(encrypted_out is not None),
                json.dumps(result["receipt"]),
                result.get("error"),
                result.get("enclave_id"),
                time.time(),
                inv_id,
                attempt,
            ),
        )
        return changed == 1

    def retry_or_fail(self, inv_id: str, attempt: int, error: str) -> bool:
        """Queue attempt ``attempt`` again, or fail it after MAX_ATTEMPTS; False (nothing
        written) when the attempt no longer holds the invocation."""
        if attempt >= MAX_ATTEMPTS:
            changed = self.store.execute(
                "UPDATE invocations SET status = 'failed', error = ?, finished_at = ?, lease_until = NULL "
                "WHERE id = ? AND status = 'running' AND attempts = ?",
                (f"gave up after {attempt} attempts: {error}", time.time(), inv_id, attempt),
            )
        else:
            changed = self.store.execute(
                "UPDATE invocations SET status = 'queued', error = ?, lease_until = NULL "
                "WHERE id = ? AND status = 'running' AND attempts = ?",
                (error, inv_id, attempt),
            )
        return changed == 1

    def release(self, inv_id: str, attempt: int) -> bool:
        """Give a running attempt back to the queue uncounted (this replica is shutting down,
        the attempt did not fail); False when the attempt no longer holds the invocation."""
        changed = self.store.execute(
            "UPDATE invocations SET status = 'queued', attempts = attempts - 1, lease_until = NULL "
            "WHERE id = ? AND status = 'running' AND attempts = ?",
            (inv_id, attempt),
        )
        return changed == 1

    def depth(self) -> dict[str, int]:
        rows = self.store.fetchall(
            "SELECT function, count(*) AS n FROM invocations "
            "WHERE status IN ('queued', 'running') GROUP BY function"
        )
        return {str(r["function"]): int(r["n"]) for r in rows}


class Dispatcher:
    """Claims queued invocations and runs them; one per replica."""

    def __init__(
        self, queue: InvocationQueue, run: Runner, *, concurrency: int = 16, lease: float = 120.0
    ) -> None:
        self.queue = queue
        self.run_one = run
        self.concurrency = concurrency
        self.lease = lease
        self.wake = asyncio.Event()
        self._running = 0
        self._task: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()
        self._calls: set[asyncio.Future[Any]] = set()
        # rows a claim took that no attempt runs yet: a claim still in its thread when stop()
        # cancels the loop takes rows nobody would run (or release) otherwise
        self._unstarted: dict[str, int] = {}
        self._unstarted_lock = threading.Lock()

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (a store call) in a worker thread. Cancelling the caller does not stop
        the thread, so :meth:`stop` waits for every call still running: the service closes the
        store right after, and SQLite crashes on a connection closed under a running query."""
        call = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        return await asyncio.shield(call)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop claiming, and hand the attempts still running back to the queue at once (another
        replica takes them now, not after their lease, and a restart is not a failed attempt)."""
        if self._task is not None:
            self._task.cancel()
        attempts = list(self._attempts)
        for task in attempts:
            task.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)
        await asyncio.gather(*list(self._calls), return_exceptions=True)
        with self._unstarted_lock:
            unstarted, self._unstarted = self._unstarted, {}
        for inv_id, attempt in unstarted.items():
            self._release(inv_id, attempt)

    def _release(self, inv_id: str, attempt: int) -> None:
        """Hand an attempt back at shutdown (blocking: called where nothing may be awaited)."""
        try:
            self.queue.release(inv_id, attempt)
        except R3ETeeError as exc:  # its lease expires and another replica claims it then
            log.warning(
                "releasing an invocation at shutdown failed",
                extra={"invocation_id": inv_id, "error": exc.message},
            )

    def _claim(self, limit: int) -> list[dict[str, Any]]:
        rows = self.queue.claim(limit, self.lease)
        with self._unstarted_lock:
            for row in rows:
                self._unstarted[str(row["id"])] = int(row["attempts"])
        return rows

    async def _loop(self) -> None:
        while True:
            free = self.concurrency - self._running
            try:
                rows = await self._in_thread(self._claim, free) if free > 0 else []
            except R3ETeeError as exc:
                # the store is unreachable for now: keep the dispatcher alive and try again
                log.warning("claiming queued invocations failed", extra={"error": exc.message})
                rows = []
            for row in rows:
                self._running += 1
                with self._unstarted_lock:
                    self._unstarted.pop(str(row["id"]), None)
                task = asyncio.get_running_loop().create_task(self._execute(row))
                self._attempts.add(task)
                task.add_done_callback(self._attempts.discard)
            if not rows:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), 1.0)
                except TimeoutError:
                    pass

    async def _keep_lease(self, inv_id: str, attempt: int) -> None:
        """Renew the lease while the attempt runs, so only a dead worker's lease expires."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                held = await self._in_thread(self.queue.renew, inv_id, attempt, self.lease)
            except R3ETeeError as exc:
                log.warning("renewing a lease failed", extra={"invocation_id": inv_id, "error": exc.message})
                continue
            if not held:
                log.warning("invocation lease lost to another attempt", extra={"invocation_id": inv_id})
                return

    async def _execute(self, row: dict[str, Any]) -> None:
        inv_id = str(row["id"])
        attempt = int(row["attempts"])
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(inv_id, attempt))
        try:
            try:
                result = await self.run_one(row)
            except R3ETeeError as exc:
                error = exc.message
            except Exception as exc:  # noqa: BLE001 - the queue must still retry or fail it
                error = f"internal error ({type(exc).__name__})"
            else:
                done = await self._in_thread(self.queue.complete, inv_id, attempt, result)
                if not done:
                    log.warning(
                        "invocation result discarded: a newer attempt holds it",
                        extra={"invocation_id": inv_id, "attempt": attempt},
                    )
                return
            log.warning("invocation attempt failed", extra={"invocation_id": inv_id, "error": error})
            await self._in_thread(self.queue.retry_or_fail, inv_id, attempt, error)
        except asyncio.CancelledError:
            self._release(inv_id, attempt)  # shutting down: nothing may be awaited here
            raise
        except R3ETeeError as exc:  # the store failed: the lease expires and the work is claimed again
            log.warning(
                "recording an invocation attempt failed",
                extra={"invocation_id": inv_id, "error": exc.message},
            )
        finally:
            keeper.cancel()
            self._running -= 1
            self.wake.set()
