"""The worker's enclave manager: launch, attest, watch, destroy, reconcile.

It runs wherever the providers are: embedded in the all-in-one service, or in
``r3e-tee-worker`` on a TEE node. It talks to the attestation service and reports enclave
state through two small interfaces, so the same code serves both placements.

States: creating -> attesting -> ready -> draining -> terminated, or failed (with a reason).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from r3e_tee.errors import EnclaveError, InvalidRequestError, NotFoundError, R3ETeeError
from r3e_tee.providers.base import EVIDENCE_FORMATS, EnclaveHandle, EnclaveSpec, Provider

log = logging.getLogger("r3e_tee.worker")

TERMINAL = ("terminated", "failed")


@dataclass(frozen=True)
class AttestationGrant:
    attestation_id: str
    token: str
    expires_at: float
    measurement: str | None


class AttestationBackend(abc.ABC):
    """How the worker reaches the attestation service (in-process or over HTTP)."""

    @abc.abstractmethod
    async def nonce(self) -> str: ...

    @abc.abstractmethod
    async def verify(
        self, *, evidence: bytes, nonce: str, public_keys: Mapping[str, bytes], provider: str, enclave_id: str
    ) -> AttestationGrant: ...


class StateSink(abc.ABC):
    """Where enclave state changes go (the store, directly or through the service)."""

    @abc.abstractmethod
    async def update(self, enclave_id: str, **fields: Any) -> None: ...

    @abc.abstractmethod
    async def owned(self, worker_id: str) -> list[dict[str, Any]]:
        """Enclaves the store believes this worker runs (for reconciliation)."""


class SecretSource(abc.ABC):
    """Where the worker gets secrets for its enclaves: the key broker (in-process or over HTTP).

    Both calls present the enclave's attestation token; what comes back is sealed (HPKE) to the
    enclave's attested key, so the worker relays ciphertext only.
    """

    @abc.abstractmethod
    async def release(self, *, token: str, names: Sequence[str]) -> dict[str, Any]:
        """``{"attestation_id": str, "secrets": [{"name", "revision", "sealed": bytes}]}``."""

    @abc.abstractmethod
    async def sealing_key(self, *, token: str) -> dict[str, Any]:
        """``{"attestation_id", "owner", "version", "sealed": bytes}`` (Nitro sealing)."""


class EnclaveManager:
    def __init__(
        self,
        worker_id: str,
        providers: Mapping[str, Provider],
        attestation: AttestationBackend,
        sink: StateSink,
        *,
        heartbeat_interval: float = 5.0,
        attest_timeout: float = 30.0,
    ) -> None:
        self.worker_id = worker_id
        self.providers = dict(providers)
        self.attestation = attestation
        self.sink = sink
        self.handles: dict[str, EnclaveHandle] = {}
        self.heartbeat_interval = heartbeat_interval
        self.attest_timeout = attest_timeout
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready_events: dict[str, asyncio.Event] = {}
        self._stopping = False
        # the key broker, when this worker may deliver secrets (set by the key-management layer)
        self.secret_source: SecretSource | None = None
        self.grants: dict[str, AttestationGrant] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        for provider in self.providers.values():
            await provider.start()
        await self.reconcile()
        self._spawn(self._heartbeats(), "heartbeats")

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.gather(*(self.destroy(eid, reason="worker stopping") for eid in list(self.handles)))
        for task in list(self._tasks):
            task.cancel()
        for provider in self.providers.values():
            await provider.stop()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def reconcile(self) -> None:
        """After a restart: processes the store lists for this worker are not ours any more.

        Their channels died with the previous worker, so they cannot be re-adopted: a process
        that is still alive is killed, and every such enclave is marked failed with the reason.
        """
        for row in await self.sink.owned(self.worker_id):
            if row["state"] in TERMINAL or row["id"] in self.handles:
                continue
            pid = row.get("pid")
            killed = False
            if isinstance(pid, int) and pid > 0 and _is_enclave_process(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            reason = "worker restarted: the enclave's channel was lost" + (
                f"; its process {pid} was stopped" if killed else "; its process had already exited"
            )
            await self.sink.update(row["id"], state="failed", reason=reason, terminated_at=time.time())
            log.warning("reconciled enclave", extra={"enclave_id": row["id"], "reason": reason})

    # -- API ------------------------------------------------------------------------------------

    def provider(self, name: str) -> Provider:
        if name not in self.providers:
            raise InvalidRequestError(
                f"provider {name!r} is not enabled on this worker",
                hint=f"enabled providers: {', '.join(sorted(self.providers)) or '(none)'}",
            )
        return self.providers[name]

    def launch(self, provider: str, spec: EnclaveSpec) -> None:
        """Reserve capacity and start creating (returns at once); progress goes to the sink.

        Raises InvalidRequestError / CapacityError before anything is started.
        """
        p = self.provider(provider)
        if spec.evidence_format not in EVIDENCE_FORMATS:
            raise InvalidRequestError(
                f"unknown evidence format {spec.evidence_format!r}",
                hint=f"use one of {', '.join(EVIDENCE_FORMATS)}",
            )
        p.reserve(spec)
        self._ready_events[spec.id] = asyncio.Event()
        self._spawn(self._launch(provider, spec), f"launch-{spec.id}")

    async def wait_ready(self, enclave_id: str, timeout: float) -> None:
        event = self._ready_events.get(enclave_id)
        if event is not None:
            await asyncio.wait_for(event.wait(), timeout)

    async def _launch(self, provider_name: str, spec: EnclaveSpec) -> None:
        provider = self.providers[provider_name]
        handle: EnclaveHandle | None = None
        try:
            handle = await provider.create(spec)
            self.handles[spec.id] = handle
            handle.on_exit.append(self._on_exit)
            handle.channel.handlers["broker_seal_key"] = self._seal_key_handler(spec.id)
            await self.sink.update(
                spec.id,
                state="attesting",
                pid=handle.pid,
                measurement=handle.measurement,
                worker_id=self.worker_id,
            )
            grant, keys = await self._attest(handle)
            await self.sink.update(
                spec.id,
                state="ready",
                attestation_id=grant.attestation_id,
                measurement=grant.measurement or handle.measurement,
                public_keys={k: v.hex() for k, v in keys.items()},
                ready_at=time.time(),
            )
            log.info(
                "enclave ready", extra={"enclave_id": spec.id, "provider": provider_name, "pid": handle.pid}
            )
        except (R3ETeeError, OSError) as exc:
            reason = exc.message if isinstance(exc, R3ETeeError) else f"{type(exc).__name__}: {exc}"
            await self.sink.update(spec.id, state="failed", reason=reason, terminated_at=time.time())
            log.warning("enclave failed", extra={"enclave_id": spec.id, "reason": reason})
            self.handles.pop(spec.id, None)
            if handle is not None:
                with contextlib.suppress(R3ETeeError, OSError):
                    await provider.destroy(handle)
            provider.release(spec.id)
        finally:
            event = self._ready_events.pop(spec.id, None)
            if event is not None:
                event.set()

    async def _attest(self, handle: EnclaveHandle) -> tuple[AttestationGrant, dict[str, bytes]]:
        nonce = await self.attestation.nonce()
        reply = await handle.channel.request(
            "attest", nonce=bytes.fromhex(nonce), timeout=self.attest_timeout
        )
        evidence, keys = reply.get("evidence"), reply.get("public_keys")
        if not isinstance(evidence, bytes) or not isinstance(keys, dict):
            raise EnclaveError("the enclave runtime answered attest without evidence and keys")
        grant = await self.attestation.verify(
            evidence=evidence,
            nonce=nonce,
            public_keys=keys,
            provider=handle.provider,
            enclave_id=handle.spec.id,
        )
        await handle.channel.request(
            "set_token",
            token=grant.token,
            attestation_id=grant.attestation_id,
            expires_at=grant.expires_at,
            timeout=self.attest_timeout,
        )
        self.grants[handle.spec.id] = grant
        return grant, keys

    async def reattest(self, enclave_id: str) -> AttestationGrant:
        handle = self._handle(enclave_id)
        grant, _ = await self._attest(handle)
        await self.sink.update(enclave_id, attestation_id=grant.attestation_id)
        return grant

    async def deliver_secrets(self, enclave_id: str, names: Sequence[str]) -> dict[str, Any]:
        """Release ``names`` from the broker for the enclave's current token and hand the sealed
        blobs to its runtime, which opens them. Returns the runtime's receipt (names and sizes).

        A token about to expire is renewed first (a fresh attestation); a token the broker calls
        revoked (a release policy changed) is renewed once, so the enclave is judged again.
        """
        handle = self._handle(enclave_id)
        if self.secret_source is None:
            raise EnclaveError(
                f"worker {self.worker_id} has no key broker to release secrets from",
                hint="secrets are delivered by the service's embedded worker",
            )
        grant = self.grants.get(enclave_id)
        if grant is None or grant.expires_at - time.time() < 5:
            grant = await self.reattest(enclave_id)
        try:
            release = await self.secret_source.release(token=grant.token, names=list(names))
        except R3ETeeError as exc:
            if getattr(exc, "reason", None) != "revoked":
                raise
            grant = await self.reattest(enclave_id)
            release = await self.secret_source.release(token=grant.token, names=list(names))
        reply: dict[str, Any] = await handle.channel.request(
            "deliver_secrets",
            attestation_id=release["attestation_id"],
            broker_key=release.get("broker_key"),
            secrets=release["secrets"],
            timeout=self.attest_timeout,
        )
        if reply.get("broker") != "pinned":
            log.warning(
                "the enclave opened its secrets without a pinned key broker (UNSAFE: its host could "
                "have planted them); build its image with R3E_TEE_BROKER_KEY",
                extra={"enclave_id": enclave_id, "broker": reply.get("broker")},
            )
        return reply

    def _seal_key_handler(self, enclave_id: str) -> Any:
        async def broker_seal_key(_: dict[str, Any]) -> dict[str, Any]:
            grant = self.grants.get(enclave_id)
            if self.secret_source is None or grant is None:
                raise EnclaveError("no key broker or no attestation token for this enclave's sealing key")
            return await self.secret_source.sealing_key(token=grant.token)

        return broker_seal_key

    def _handle(self, enclave_id: str) -> EnclaveHandle:
        handle = self.handles.get(enclave_id)
        if handle is None:
            raise NotFoundError(f"enclave {enclave_id} is not running on worker {self.worker_id}")
        return handle

    async def destroy(self, enclave_id: str, *, reason: str = "destroyed on request") -> None:
        handle = self.handles.pop(enclave_id, None)
        self.grants.pop(enclave_id, None)
        if handle is None:
            await self.sink.update(enclave_id, state="terminated", reason=reason, terminated_at=time.time())
            return
        await self.sink.update(enclave_id, state="draining")
        provider = self.providers[handle.provider]
        try:
            await provider.destroy(handle)
        finally:
            provider.release(enclave_id)
            await self.sink.update(enclave_id, state="terminated", reason=reason, terminated_at=time.time())

    async def _on_exit(self, handle: EnclaveHandle) -> None:
        """A process ended without being destroyed: the enclave failed, with the exit status."""
        self.providers[handle.provider].release(handle.spec.id)
        self.grants.pop(handle.spec.id, None)
        if self.handles.pop(handle.spec.id, None) is None or self._stopping:
            return
        status = handle.exit_status
        if status is not None and status < 0:
            what = (
                f"killed by signal {signal.Signals(-status).name}"
                if -status in signal.valid_signals()
                else "killed"
            )
        elif status is not None:
            what = f"exited with status {status}"
        else:
            what = "ended (the provider reports no exit status)"
        reason = f"enclave process {handle.pid} {what}"
        await self.sink.update(handle.spec.id, state="failed", reason=reason, terminated_at=time.time())
        log.warning("enclave process ended", extra={"enclave_id": handle.spec.id, "reason": reason})

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            for eid, handle in list(self.handles.items()):
                try:
                    pong = await handle.channel.request("ping", timeout=self.heartbeat_interval * 2)
                    expires = pong.get("token_expires_at")
                    # tokens are short-lived; refresh before expiry so receipts always carry a valid one
                    if isinstance(expires, int | float) and expires - time.time() < max(
                        60, 3 * self.heartbeat_interval
                    ):
                        await self.reattest(eid)
                except R3ETeeError as exc:
                    if self.handles.pop(eid, None) is not None:
                        await self.sink.update(
                            eid,
                            state="failed",
                            reason=f"heartbeat failed: {exc.message}",
                            terminated_at=time.time(),
                        )
                        with contextlib.suppress(R3ETeeError, OSError):
                            await self.providers[handle.provider].destroy(handle)
                        self.providers[handle.provider].release(eid)

    def capacity(self) -> dict[str, dict[str, int]]:
        return {name: p.capacity().to_dict() for name, p in self.providers.items()}


def _is_enclave_process(pid: int) -> bool:
    """Only kill a pid whose command line is one of ours (pids are reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"r3e_tee.runtime" in cmdline
