"""Placing invocations on enclaves, and scaling each function's enclaves with demand.

One pool per function version. An invocation takes the least-loaded ready enclave with a
free sandbox; when none is free the pool scales up (to max_enclaves) and the caller waits.
Short idempotent functions are pipelined: an enclave holds more than one invocation per
sandbox, the extra ones queued inside it, so a sandbox that finishes starts the next one
without a round trip to the service. For a function that runs for a fraction of a
millisecond that round trip is most of an invocation's cost (the warm path's throughput).
The queue inside an enclave is bounded in time, about PIPELINE_BUDGET of the function's
measured running time per sandbox (never more than MAX_PIPELINE_DEPTH invocations), so
a slow function is not pipelined and queued work never hides from a new enclave for long.
Invocations queued inside an enclave that dies are retried elsewhere, which only an
idempotent function allows; the others run one per sandbox.
The autoscaler keeps min_enclaves, adds enclaves when demand per enclave passes the target,
and retires idle ones after a cooldown (down to min, zero allowed: the next call is a cold
start). An enclave that timed out is drained and replaced.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from r3e_tee.errors import EnclaveError, FunctionError, InvalidRequestError, InvocationInputError, R3ETeeError
from r3e_tee.functions.registry import FunctionVersion
from r3e_tee.runtime.channel import ChannelClosed, RemoteError

log = logging.getLogger("r3e_tee.functions")


class EnclaveRef(Protocol):
    """What the scheduler needs of an enclave: a runtime channel and whether it still lives.
    A local EnclaveHandle is one; so is a remote worker's enclave (service/workers.py)."""

    channel: Any
    on_exit: list[Any]

    @property
    def alive(self) -> bool: ...


@dataclass
class RemoteEnclave:
    """An enclave on a remote worker: alive until its relay fails."""

    channel: Any
    on_exit: list[Any] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return bool(self.channel.is_open)


@dataclass
class Slot:
    enclave_id: str
    handle: EnclaveRef
    inflight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    draining: bool = False

    @property
    def usable(self) -> bool:
        return not self.draining and self.handle.alive


@dataclass
class InvokeResult:
    invocation_id: str
    status: str
    output: bytes | None
    output_encrypted: bytes | None
    receipt_json: bytes  # the signed receipt's JSON text, as the enclave rendered it
    error: str | None
    enclave_id: str

    @functools.cached_property
    def receipt(self) -> dict[str, Any]:
        receipt: dict[str, Any] = json.loads(self.receipt_json)
        return receipt

    def to_json(self, *, decode_output: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "invocation_id": self.invocation_id,
            "status": self.status,
            "enclave_id": self.enclave_id,
            "receipt": self.receipt,
            "error": self.error,
        }
        if self.output_encrypted is not None:
            out["output_encrypted"] = base64.b64encode(self.output_encrypted).decode()
        elif self.output is not None:
            out["output"] = json.loads(self.output) if decode_output else self.output.decode()
        return out

    def to_json_bytes(self) -> bytes:
        """The HTTP answer: :meth:`to_json` as compact JSON, with the output spliced in as the
        exact bytes the enclave hashed into ``receipt.body.output_sha256``."""
        head = (
            f'{{"invocation_id":{_encode_str(self.invocation_id)},"status":{_encode_str(self.status)},'
            f'"enclave_id":{_encode_str(self.enclave_id)},"receipt":'
        ).encode()
        head += (
            self.receipt_json
            + f',"error":{"null" if self.error is None else _encode_str(self.error)}'.encode()
        )
        if self.output_encrypted is not None:
            return head + b',"output_encrypted":"' + base64.b64encode(self.output_encrypted) + b'"}'
        if self.output is None:
            return head + b"}"
        output = self.output
        if b"NaN" in output or b"Infinity" in output:
            # JSON has no NaN or Infinity: such numbers go out as null (strings merely naming
            # them take this path too, and come out unchanged)
            output = _COMPACT_JSON.encode(_finite(json.loads(output))).encode()
        return head + b',"output":' + output + b"}"


_encode_str = json.encoder.encode_basestring  # json.dumps(str, ensure_ascii=False)
_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


# launches an enclave for a function version and returns its id once ready and loaded
Launcher = Callable[[FunctionVersion], Awaitable[tuple[str, EnclaveRef]]]
Destroyer = Callable[[str], Awaitable[None]]

#: work an enclave may hold queued per sandbox, in seconds of the function's measured running time
PIPELINE_BUDGET = 0.05
#: invocations an enclave may hold per sandbox at most (running plus queued inside it)
MAX_PIPELINE_DEPTH = 8


class _Waiter:
    """A caller waiting for a sandbox: its future gets a slot (already counted as in flight)
    or None (something changed: check again)."""

    __slots__ = ("future", "enclave_id", "queued")

    def __init__(self, future: asyncio.Future[Slot | None], enclave_id: str | None) -> None:
        self.future = future
        self.enclave_id = enclave_id
        self.queued = True  # still in the pool's queue (False once handed a slot or woken)


def _wake(future: asyncio.Future[Slot | None]) -> None:
    if not future.done():
        future.set_result(None)


class Pool:
    """The enclaves of one function version and the callers waiting for a free sandbox.

    A free sandbox goes to the longest waiting caller that can use it (first come, first
    served; one wake-up per freed sandbox). Everyone waiting checks again only when the set of
    enclaves changes (one started, failed to start, ended or was drained)."""

    def __init__(self, fv: FunctionVersion, launch: Launcher, destroy: Destroyer) -> None:
        self.fv = fv
        self.slots: dict[str, Slot] = {}
        self.starting = 0
        self.waiting = 0
        self.last_error: str | None = None
        self.failures = 0  # failed scale-ups so far; a waiter gives up after one during its wait
        self.run_time: float | None = None  # the function's running time per invocation, averaged
        self.depth = 1  # invocations one sandbox may have on hand: 1 until a run time is known
        self.capacity = fv.config.concurrency  # invocations one enclave may hold at once
        self._launch = launch
        self._destroy = destroy
        self._waiters: collections.deque[_Waiter] = collections.deque()

    @property
    def concurrency(self) -> int:
        return self.fv.config.concurrency

    def observe_run_time(self, seconds: float) -> None:
        """One invocation's running time in its sandbox (reported with its answer): a moving
        average, from which the pipelining depth follows (see the module docstring)."""
        if seconds < 0 or not self.fv.config.idempotent:
            return
        run = self.run_time = seconds if self.run_time is None else 0.9 * self.run_time + 0.1 * seconds
        self.depth = max(1, min(MAX_PIPELINE_DEPTH, int(PIPELINE_BUDGET / max(run, 1e-6))))
        grew = self.concurrency * self.depth > self.capacity
        self.capacity = self.concurrency * self.depth
        if grew and self._waiters:
            # room that appeared goes to those already waiting, first come first served, so
            # free capacity and waiters still never coexist (a newcomer cannot overtake them)
            for slot in self.slots.values():
                while slot.inflight < self.capacity and slot.usable and self._hand_over(slot):
                    slot.inflight += 1

    def _pick(self, enclave_id: str | None) -> Slot | None:
        """The least-loaded usable enclave with a free sandbox (the first such in start order)."""
        limit = self.capacity
        if enclave_id is not None:
            slot = self.slots.get(enclave_id)
            return slot if slot is not None and slot.inflight < limit and slot.usable else None
        best: Slot | None = None
        for slot in self.slots.values():
            if slot.inflight < limit and (best is None or slot.inflight < best.inflight) and slot.usable:
                if slot.inflight == 0:
                    return slot
                best = slot
        return best

    def scale_up(self) -> None:
        if len(self.slots) + self.starting >= self.fv.config.max_enclaves:
            return
        self.starting += 1
        asyncio.get_running_loop().create_task(self._start_one())

    async def _start_one(self) -> None:
        try:
            enclave_id, handle = await self._launch(self.fv)
            slot = self.slots[enclave_id] = Slot(enclave_id, handle)
            self.last_error = None
            handle.on_exit.append(lambda h: self._forget(h.spec.id))
            while slot.inflight < self.capacity and self._hand_over(slot):
                slot.inflight += 1
        except Exception as exc:  # noqa: BLE001 - any failure must reach the waiters, never hang them
            self.last_error = (
                exc.message if isinstance(exc, R3ETeeError) else f"internal error ({type(exc).__name__})"
            )
            self.failures += 1
            log.warning("scale-up failed", extra={"function": self.fv.name, "error": self.last_error})
        finally:
            self.starting -= 1
            self._wake_all()

    def _purge(self) -> None:
        """Forget enclaves that ended (destroyed elsewhere, or died) and have nothing in flight."""
        for eid, slot in list(self.slots.items()):
            if not slot.handle.alive and slot.inflight == 0:
                del self.slots[eid]

    def _forget(self, enclave_id: str) -> None:
        self.slots.pop(enclave_id, None)
        self._wake_all()

    def _wake_all(self) -> None:
        """The set of enclaves changed: every waiter checks again (and may scale up)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.queued = False
            _wake(waiter.future)

    def _hand_over(self, slot: Slot) -> bool:
        """Give one sandbox of ``slot`` to the longest waiting caller that can use it."""
        for i, waiter in enumerate(self._waiters):
            if waiter.future.done():
                continue  # timed out or cancelled: its owner removes it
            if waiter.enclave_id is None or waiter.enclave_id == slot.enclave_id:
                del self._waiters[i]
                waiter.queued = False
                slot.last_used = time.monotonic()
                waiter.future.set_result(slot)
                return True
        return False

    async def acquire(self, timeout: float, enclave_id: str | None = None) -> Slot:
        # Free capacity and waiters never coexist for the same enclave (a freed sandbox goes to
        # a waiter), so taking a free sandbox here never overtakes a waiter that could use it.
        slot = self._pick(enclave_id)
        if slot is not None:
            slot.inflight += 1
            slot.last_used = time.monotonic()
            return slot
        return await self._wait(timeout, enclave_id)

    async def _wait(self, timeout: float, enclave_id: str | None) -> Slot:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        failures_before = self.failures
        self.waiting += 1
        try:
            while True:
                self._purge()
                slot = self._pick(enclave_id)
                if slot is not None:
                    slot.inflight += 1
                    slot.last_used = time.monotonic()
                    return slot
                if enclave_id is not None and enclave_id not in self.slots:
                    raise FunctionError(
                        f"enclave {enclave_id} is not serving {self.fv.name} any more",
                        hint="fetch a fresh enclave key (GET /v1/functions/NAME/enclave), encrypt again",
                    )
                nothing_usable = not any(s.usable for s in self.slots.values())
                if self.failures > failures_before and self.starting == 0 and nothing_usable:
                    raise FunctionError(f"no enclave can run {self.fv.name}: {self.last_error}")
                if self.starting == 0 and len(self.slots) < self.fv.config.max_enclaves:
                    self.scale_up()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FunctionError(
                        f"no enclave of {self.fv.name} became free within {timeout:g} s",
                        hint="raise max_enclaves or concurrency",
                    )
                future: asyncio.Future[Slot | None] = loop.create_future()
                waiter = _Waiter(future, enclave_id)
                self._waiters.append(waiter)
                timer = loop.call_later(remaining, _wake, future)
                try:
                    handed = await future
                except BaseException:
                    # cancelled after a sandbox was handed over: pass it on, do not leak it
                    if future.done() and not future.cancelled():
                        given = future.result()
                        if given is not None:
                            self.release_nowait(given)
                    raise
                finally:
                    timer.cancel()
                    if waiter.queued:  # timed out or cancelled while queued
                        waiter.queued = False
                        with contextlib.suppress(ValueError):
                            self._waiters.remove(waiter)
                if handed is not None:
                    return handed
        finally:
            self.waiting -= 1

    @property
    def queued(self) -> int:
        """Invocations not yet running: waiting here, or queued inside an enclave (pipelined)
        behind its ``concurrency`` sandboxes."""
        limit = self.concurrency
        return self.waiting + sum(max(0, s.inflight - limit) for s in self.slots.values())

    def release_nowait(self, slot: Slot) -> None:
        slot.last_used = time.monotonic()
        # (above capacity, after the function turned slower and its pipeline shallower: shrink)
        if self._waiters and slot.usable and slot.inflight <= self.capacity and self._hand_over(slot):
            return  # the sandbox stays in flight, for the waiter it went to
        slot.inflight -= 1
        if slot.draining and slot.inflight == 0:
            self.slots.pop(slot.enclave_id, None)
            asyncio.get_running_loop().create_task(self._destroy_quietly(slot.enclave_id))
            self._wake_all()
        elif not slot.usable and self._waiters:
            self._wake_all()

    async def release(self, slot: Slot) -> None:
        self.release_nowait(slot)

    async def _destroy_quietly(self, enclave_id: str) -> None:
        with contextlib.suppress(R3ETeeError):
            await self._destroy(enclave_id)

    async def autoscale(self, target: float = 0.8) -> None:
        cfg = self.fv.config
        cooldown = cfg.cooldown
        live = [s for s in self.slots.values() if s.usable]
        demand = sum(s.inflight for s in live) + self.waiting
        desired = max(cfg.min_enclaves, math.ceil(demand / (self.concurrency * target)) if demand else 0)
        desired = min(desired, cfg.max_enclaves)
        for _ in range(desired - len(live) - self.starting):
            self.scale_up()
        idle = sorted(
            (s for s in live if s.inflight == 0 and time.monotonic() - s.last_used > cooldown),
            key=lambda s: s.last_used,
        )
        surplus = len(live) - max(desired, cfg.min_enclaves)
        for slot in idle[: max(0, surplus)]:
            self.slots.pop(slot.enclave_id, None)
            log.info(
                "scaled down idle enclave", extra={"function": self.fv.name, "enclave_id": slot.enclave_id}
            )
            await self._destroy_quietly(slot.enclave_id)

    async def close(self) -> None:
        for enclave_id in list(self.slots):
            self.slots.pop(enclave_id, None)
            await self._destroy_quietly(enclave_id)
        self._wake_all()


class Scheduler:
    def __init__(self, launch: Launcher, destroy: Destroyer, *, interval: float = 1.0) -> None:
        self.pools: dict[tuple[str, int], Pool] = {}
        self._launch = launch
        self._destroy = destroy
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def pool(self, fv: FunctionVersion) -> Pool:
        key = (fv.name, fv.version)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(fv, self._launch, self._destroy)
        return pool

    async def invoke(
        self,
        fv: FunctionVersion,
        request: dict[str, Any],
        *,
        enclave_id: str | None = None,
        retry: bool | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Run on a ready enclave; returns (runtime reply, enclave id). Retries once on another
        enclave when the first dies mid-invocation and the function is idempotent."""
        pool = self.pool(fv)
        timeout = fv.config.timeout
        attempts = 2 if (retry if retry is not None else fv.config.idempotent) and enclave_id is None else 1
        last: R3ETeeError | None = None
        for _ in range(attempts):
            slot = await pool.acquire(timeout + 30, enclave_id)
            try:
                # queued inside the enclave, it may wait for those ahead of it to end first, on
                # one sandbox fewer while the enclave replaces one that died or timed out
                rounds = 1 if pool.depth == 1 else (slot.inflight - 1) // max(1, pool.concurrency - 1) + 1
                reply = await slot.handle.channel.request("invoke", timeout=timeout * rounds + 5, **request)
                run_time = reply.get("run_time")
                if isinstance(run_time, float) and reply.get("status") != "timeout":
                    pool.observe_run_time(run_time)
                if reply.get("status") == "timeout":
                    slot.draining = True  # a timed-out enclave is recycled
                return reply, slot.enclave_id
            except (ChannelClosed, EnclaveError) as exc:
                if isinstance(exc, RemoteError) and exc.kind == InvocationInputError.code:
                    # the enclave refused the caller's input and is fine: it keeps serving
                    raise InvalidRequestError(
                        exc.message,
                        hint="an encrypted input is sealed to the enclave named by X-R3E-Enclave, for the "
                        "reply key X-R3E-Reply-Key names; a plain input is JSON",
                    ) from None
                slot.draining = True
                last = exc if isinstance(exc, R3ETeeError) else EnclaveError(str(exc))
                log.warning("enclave failed mid-invocation", extra={"enclave_id": slot.enclave_id})
            finally:
                pool.release_nowait(slot)
        msg = f"the enclave running {fv.name} failed during the invocation"
        if not fv.config.idempotent:
            msg += "; it was not retried because the function is not marked idempotent"
        raise FunctionError(f"{msg} ({last.message if last else 'unknown'})")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for pool in list(self.pools.values()):
                try:
                    await pool.autoscale()
                except R3ETeeError as exc:
                    log.warning("autoscale failed", extra={"function": pool.fv.name, "error": exc.message})

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for pool in self.pools.values():
            await pool.close()

    def queue_depth(self) -> dict[str, int]:
        """Invocations not yet running, per function: waiting for an enclave, or pipelined into
        one behind its busy sandboxes (what an autoscaler outside the service should see)."""
        depth: dict[str, int] = {}
        for p in self.pools.values():
            depth[p.fv.name] = depth.get(p.fv.name, 0) + p.queued
        return depth
