"""The asynchronous invocation queue under crashes, stalls and concurrent replicas (both stores)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tests.shared import SRC, run_threads

from r3e_tee.errors import ConflictError, FunctionError, StoreError
from r3e_tee.functions.invocations import MAX_ATTEMPTS, Dispatcher, InvocationQueue
from r3e_tee.store import Store, open_store


def _submit(queue: InvocationQueue, n: int = 0) -> str:
    inv_id, created = queue.submit(
        function="f",
        version=1,
        input=json.dumps({"n": n}).encode(),
        encrypted=False,
        reply_key=None,
        idempotency_key=None,
    )
    assert created
    return inv_id


def _result(tag: str) -> dict[str, Any]:
    return {
        "status": "ok",
        "output": json.dumps({"by": tag}).encode(),
        "output_encrypted": None,
        "receipt": {"body": {"by": tag}},
        "error": None,
        "enclave_id": f"e-{tag}",
    }


def _hanging() -> tuple[asyncio.Event, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]]:
    """A runner whose attempts never finish, and the event its first attempt sets."""
    started = asyncio.Event()

    async def hang(row: dict[str, Any]) -> dict[str, Any]:
        started.set()
        await asyncio.sleep(3600)
        return _result("never")

    return started, hang


def _wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class _Replica:
    """A dispatcher on its own event loop and thread, with its own store connection: a replica."""

    def __init__(self, store_url: str, run: Callable[[dict[str, Any]], Any], lease: float) -> None:
        self.store = open_store(store_url)
        self.queue = InvocationQueue(self.store)
        self._run = run
        self._lease = lease
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        dispatcher = Dispatcher(self.queue, self._run, concurrency=4, lease=self._lease)
        dispatcher.start()
        await self._stop.wait()
        await dispatcher.stop()

    def close(self) -> None:
        _wait_for(lambda: self._loop is not None and self._stop is not None)
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self.store.close()


def test_a_long_attempt_keeps_its_lease_and_runs_once(store: Store, store_url: str) -> None:
    """A function running longer than one lease is not claimed again (by its own replica or
    another) while its worker is alive: the worker renews the lease."""
    runs: list[str] = []

    async def run(row: dict[str, Any]) -> dict[str, Any]:
        runs.append(str(row["id"]))
        await asyncio.sleep(2.0)  # several leases long
        return _result("only")

    inv_id = _submit(InvocationQueue(store))
    replicas = [_Replica(store_url, run, lease=0.3) for _ in range(2)]
    try:
        _wait_for(
            lambda: store.fetchval("SELECT status FROM invocations WHERE id = ?", (inv_id,)) == "succeeded"
        )
    finally:
        for r in replicas:
            r.close()
    assert runs == [inv_id]
    assert store.fetchval("SELECT attempts FROM invocations WHERE id = ?", (inv_id,)) == 1


@pytest.mark.parametrize("stale_outcome", ["result", "error"])
def test_a_stalled_worker_cannot_undo_the_attempt_that_superseded_it(
    store: Store, store_url: str, stale_outcome: str
) -> None:
    """Replica A stalls (its event loop blocked, as in a long GC pause or a frozen VM) past its
    lease; replica B takes the invocation over and finishes it. When A wakes up, neither its
    late result nor its late failure may replace B's result or queue the invocation again."""
    queue = InvocationQueue(store)
    inv_id = _submit(queue)
    a_done = threading.Event()

    async def run_a(row: dict[str, Any]) -> dict[str, Any]:
        time.sleep(2.5)  # blocks A's loop: no lease renewal can run, exactly like a stalled process
        a_done.set()
        if stale_outcome == "error":
            raise FunctionError("stale attempt failed")
        return _result("stale")

    async def run_b(row: dict[str, Any]) -> dict[str, Any]:
        return _result("fresh")

    a = _Replica(store_url, run_a, lease=0.3)
    _wait_for(lambda: store.fetchval("SELECT status FROM invocations WHERE id = ?", (inv_id,)) == "running")
    b = _Replica(store_url, run_b, lease=0.3)
    try:
        _wait_for(a_done.is_set)
        time.sleep(0.5)  # A records its late outcome now
    finally:
        a.close()
        b.close()
    state = queue.get(inv_id)
    assert state["status"] == "succeeded", state
    assert state["output"] == {"by": "fresh"} and state["receipt"] == {"body": {"by": "fresh"}}
    assert state["attempts"] == 2


def test_a_superseded_attempt_is_fenced_out(store: Store) -> None:
    queue = InvocationQueue(store)
    inv_id = _submit(queue)
    (first,) = queue.claim(10, 0.05)
    time.sleep(0.1)
    (second,) = queue.claim(10, 60)
    assert (first["attempts"], second["attempts"]) == (1, 2)
    assert not queue.renew(inv_id, 1, 60)
    assert not queue.complete(inv_id, 1, _result("stale"))
    assert not queue.retry_or_fail(inv_id, 1, "stale")
    assert queue.get(inv_id)["status"] == "running"
    assert queue.complete(inv_id, 2, _result("fresh"))
    assert not queue.retry_or_fail(inv_id, 2, "late")  # finished: never queued again
    assert queue.get(inv_id)["output"] == {"by": "fresh"}
    assert queue.claim(10, 60) == []


def test_an_invocation_whose_worker_keeps_dying_fails_instead_of_looping(store: Store) -> None:
    """A worker that dies mid-attempt never completes nor retries: only its lease expires.
    After MAX_ATTEMPTS such deaths the invocation fails, it is not claimed forever."""
    queue = InvocationQueue(store)
    inv_id = _submit(queue)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        rows = queue.claim(10, 0.01)
        assert [(r["id"], r["attempts"]) for r in rows] == [(inv_id, attempt)]
        time.sleep(0.02)  # the worker is gone; its lease runs out
    assert queue.claim(10, 60) == []
    state = queue.get(inv_id)
    assert state["status"] == "failed" and state["attempts"] == MAX_ATTEMPTS
    assert f"gave up after {MAX_ATTEMPTS} attempts" in state["error"]


def test_replicas_claiming_at_once_never_take_the_same_invocation(store: Store, store_url: str) -> None:
    queue = InvocationQueue(store)
    ids = {_submit(queue, n) for n in range(120)}
    claimed: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def replica() -> None:
        s = open_store(store_url)
        try:
            q = InvocationQueue(s)
            while True:
                rows = q.claim(3, 60)
                if not rows:
                    return
                with lock:
                    claimed.extend(str(r["id"]) for r in rows)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            s.close()

    run_threads(replica, 4)
    assert not errors
    assert sorted(claimed) == sorted(ids)


def test_the_dispatcher_outlives_a_store_outage(store: Store) -> None:
    """A claim failing (the store unreachable for a moment) must not end the dispatcher: the
    replica would never run queued work again."""

    class Flaky(InvocationQueue):
        failures = 2

        def claim(self, limit: int, lease: float) -> list[dict[str, Any]]:
            if self.failures:
                self.failures -= 1
                raise StoreError("PostgreSQL store unavailable: connection refused")
            return super().claim(limit, lease)

    queue = Flaky(store)
    inv_id = _submit(queue)

    async def run(row: dict[str, Any]) -> dict[str, Any]:
        return _result("after-outage")

    async def main() -> None:
        dispatcher = Dispatcher(queue, run, lease=30)
        dispatcher.start()
        try:
            for _ in range(300):
                if queue.get(inv_id)["status"] == "succeeded":
                    return
                dispatcher.wake.set()
                await asyncio.sleep(0.05)
        finally:
            await dispatcher.stop()

    asyncio.run(main())
    assert queue.get(inv_id)["status"] == "succeeded"


def _submit_keyed(
    queue: InvocationQueue, body: bytes, key: str, *, function: str = "f", reply_key: bytes | None = None
) -> tuple[str, bool]:
    return queue.submit(
        function=function,
        version=1,
        input=body,
        encrypted=False,
        reply_key=reply_key,
        idempotency_key=key,
    )


def test_an_idempotency_key_reused_for_a_different_request_is_refused(store: Store) -> None:
    """Resending the same request with its key returns the first invocation; sending another
    request with a used key must not be acknowledged as if it had been queued (it would never run)."""
    queue = InvocationQueue(store)
    first, created = _submit_keyed(queue, b'{"amount": 10}', "pay-1")
    assert created
    assert _submit_keyed(queue, b'{"amount": 10}', "pay-1") == (first, False)
    with pytest.raises(ConflictError, match="different request"):
        _submit_keyed(queue, b'{"amount": 99}', "pay-1")
    with pytest.raises(ConflictError, match="different request"):
        _submit_keyed(queue, b'{"amount": 10}', "pay-1", reply_key=b"k" * 32)
    # keys are per function: another function's key space is its own
    other, created_other = _submit_keyed(queue, b'{"amount": 99}', "pay-1", function="g")
    assert created_other and other != first
    assert store.fetchval("SELECT count(*) FROM invocations") == 2


def test_replicas_submitting_one_key_at_once_queue_it_once(store: Store, store_url: str) -> None:
    results: list[tuple[str, bool]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def replica() -> None:
        s = open_store(store_url)
        try:
            barrier.wait()
            results.append(_submit_keyed(InvocationQueue(s), b'{"n": 1}', "once"))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            s.close()

    run_threads(replica, 4)
    assert not errors
    assert len({inv_id for inv_id, _ in results}) == 1
    assert sorted(created for _, created in results) == [False, False, False, True]
    assert store.fetchval("SELECT count(*) FROM invocations") == 1


def test_a_replica_shutting_down_hands_its_running_invocations_back(store: Store) -> None:
    """A stopping replica's in-flight attempts go back to the queue at once and uncounted: they
    neither wait out their lease nor move towards MAX_ATTEMPTS with every rolling restart."""
    queue = InvocationQueue(store)
    inv_id = _submit(queue)
    started, hang = _hanging()

    async def main() -> None:
        dispatcher = Dispatcher(queue, hang, lease=60)
        dispatcher.start()
        await asyncio.wait_for(started.wait(), 10)
        await dispatcher.stop()

    asyncio.run(main())
    row = store.fetchone("SELECT status, attempts, lease_until FROM invocations WHERE id = ?", (inv_id,))
    assert row == {"status": "queued", "attempts": 0, "lease_until": None}
    (again,) = queue.claim(10, 60)
    assert again["id"] == inv_id and again["attempts"] == 1


WORKER = """
import asyncio, sys
from pathlib import Path
from r3e_tee.functions.invocations import Dispatcher, InvocationQueue
from r3e_tee.store import open_store

async def run(row):
    Path(sys.argv[2]).write_text(str(row["id"]))
    await asyncio.sleep(3600)

async def main():
    Dispatcher(InvocationQueue(open_store(sys.argv[1])), run, lease=1.0).start()
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_an_invocation_whose_worker_is_killed_is_run_by_another_replica(
    store: Store, store_url: str, tmp_path: Path
) -> None:
    """A replica SIGKILLed mid-invocation loses nothing: its lease expires and another replica
    runs the invocation (at least once), then nothing runs it again."""
    queue = InvocationQueue(store)
    inv_id = _submit(queue)
    marker = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": SRC}
    child = subprocess.Popen([sys.executable, "-c", WORKER, store_url, str(marker)], env=env)
    try:
        _wait_for(marker.exists, 30)
        assert marker.read_text() == inv_id
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    assert queue.get(inv_id)["status"] == "running"
    survivor = _Replica(store_url, lambda row: _ok("survivor"), lease=1.0)
    try:
        _wait_for(lambda: queue.get(inv_id)["status"] == "succeeded", 30)
    finally:
        survivor.close()
    state = queue.get(inv_id)
    assert state["output"] == {"by": "survivor"} and state["attempts"] == 2
    assert queue.claim(10, 60) == []


async def _ok(tag: str) -> dict[str, Any]:
    return _result(tag)


def test_stop_waits_for_the_claim_in_flight() -> None:
    """Before: stop() cancelled the dispatcher's loop without waiting for it, so the service went
    on to close the store while a claim still ran in a worker thread: SQLite then crashed the
    process (a segmentation fault at shutdown). Now stop() returns after the claim is done."""
    started, finished = threading.Event(), threading.Event()

    class SlowQueue:
        def claim(self, limit: int, lease: float) -> list[dict[str, Any]]:
            started.set()
            time.sleep(0.3)
            finished.set()
            return []

    async def run(row: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def main() -> None:
        dispatcher = Dispatcher(SlowQueue(), run)  # type: ignore[arg-type]
        dispatcher.start()
        while not started.is_set():
            await asyncio.sleep(0.01)
        await dispatcher.stop()
        assert finished.is_set(), "stop() returned while a claim was still using the store"

    asyncio.run(main())


def test_rows_a_claim_in_flight_takes_while_the_replica_stops_go_back_to_the_queue(store: Store) -> None:
    """stop() cancels the claiming loop, but a claim already in its thread goes on and takes
    rows (here: the one the stop just handed back, and a new one). Nobody would run them: they
    must be handed back too, not left running until their lease expires."""
    in_second, go = threading.Event(), threading.Event()

    class SlowSecondClaim(InvocationQueue):
        calls = 0

        def claim(self, limit: int, lease: float) -> list[dict[str, Any]]:
            SlowSecondClaim.calls += 1
            if SlowSecondClaim.calls == 2:
                in_second.set()
                go.wait(10)
            return super().claim(limit, lease)

    queue = SlowSecondClaim(store)
    first = _submit(queue, 1)
    started, hang = _hanging()

    async def main() -> str:
        dispatcher = Dispatcher(queue, hang, lease=60)
        dispatcher.start()
        await asyncio.wait_for(started.wait(), 10)
        assert await asyncio.to_thread(in_second.wait, 10)
        second = _submit(queue, 2)
        asyncio.get_running_loop().call_later(0.3, go.set)  # the claim ends after stop() began
        await dispatcher.stop()
        return second

    second = asyncio.run(main())
    assert go.is_set()
    for inv_id in (first, second):
        row = store.fetchone("SELECT status, attempts, lease_until FROM invocations WHERE id = ?", (inv_id,))
        assert row == {"status": "queued", "attempts": 0, "lease_until": None}, (inv_id, row)
