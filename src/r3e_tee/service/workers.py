"""Workers as the service sees them: the embedded one, and remote ``r3e-tee-worker`` processes
that register, heartbeat their capacity and accept enclave commands over HTTP."""

from __future__ import annotations

import abc
import base64
import dataclasses
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import cbor2
import httpx

from r3e_tee.attestation.service import measurement_from_claims
from r3e_tee.attestation.verify import Verifier
from r3e_tee.errors import (
    CapacityError,
    ConflictError,
    EnclaveError,
    NotFoundError,
    PermissionDeniedError,
    ProviderUnavailableError,
)
from r3e_tee.providers.base import EnclaveSpec
from r3e_tee.runtime.channel import ChannelClosed, RemoteError
from r3e_tee.store import Store
from r3e_tee.worker.manager import AttestationGrant, EnclaveManager


class WorkerClient(abc.ABC):
    worker_id: str

    @abc.abstractmethod
    def serves(self, provider: str) -> bool: ...

    @abc.abstractmethod
    async def launch(self, provider: str, spec: EnclaveSpec) -> None: ...

    @abc.abstractmethod
    async def destroy(self, enclave_id: str) -> None: ...

    @abc.abstractmethod
    async def reattest(self, enclave_id: str) -> AttestationGrant: ...

    async def wait_ready(self, enclave_id: str, timeout: float) -> None:  # noqa: B027 - optional
        """Return early when the worker can tell; the registry polls the store otherwise."""

    @abc.abstractmethod
    async def deliver_secrets(self, enclave_id: str, names: list[str]) -> dict[str, Any]:
        """Have the broker release ``names`` to the enclave, sealed to its attested key."""

    @abc.abstractmethod
    def channel(self, enclave_id: str) -> Any:
        """Something with ``request(op, timeout=, **args)`` and ``is_open`` for the enclave's runtime
        (only the operations in RELAYED_OPS when the worker is remote)."""


# what the service may ask a remote worker to pass to an enclave's runtime
RELAYED_OPS = frozenset({"load_function", "invoke", "get_token", "ping"})


class LocalWorker(WorkerClient):
    def __init__(self, manager: EnclaveManager) -> None:
        self.manager = manager
        self.worker_id = manager.worker_id

    def serves(self, provider: str) -> bool:
        return provider in self.manager.providers

    async def launch(self, provider: str, spec: EnclaveSpec) -> None:
        self.manager.launch(provider, spec)

    async def destroy(self, enclave_id: str) -> None:
        await self.manager.destroy(enclave_id)

    async def reattest(self, enclave_id: str) -> AttestationGrant:
        return await self.manager.reattest(enclave_id)

    async def wait_ready(self, enclave_id: str, timeout: float) -> None:
        await self.manager.wait_ready(enclave_id, timeout)

    async def deliver_secrets(self, enclave_id: str, names: list[str]) -> dict[str, Any]:
        return await self.manager.deliver_secrets(enclave_id, names)

    def channel(self, enclave_id: str) -> Any:
        handle = self.manager.handles.get(enclave_id)
        if handle is None:
            raise NotFoundError(f"enclave {enclave_id} is not running on worker {self.worker_id}")
        return handle.channel


class RemoteChannel:
    """The runtime of an enclave on a remote worker, reached through the worker's relay (CBOR)."""

    def __init__(self, worker: RemoteWorker, enclave_id: str) -> None:
        self.worker = worker
        self.enclave_id = enclave_id
        self.is_open = True

    async def request(self, op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        if op not in RELAYED_OPS:
            raise EnclaveError(f"operation {op!r} is not relayed to remote enclaves")
        body = cbor2.dumps({"op": op, "args": args, "timeout": timeout})
        try:
            reply = await self.worker._call(
                "POST",
                f"/enclaves/{self.enclave_id}/call",
                content=body,
                headers={"Content-Type": "application/cbor"},
                timeout=(timeout or 30) + 5,
                raw=True,
            )
        except NotFoundError:
            self.is_open = False
            raise ChannelClosed(
                f"enclave {self.enclave_id} is gone from worker {self.worker.worker_id}"
            ) from None
        except EnclaveError:
            self.is_open = False
            raise
        message = cbor2.loads(reply)
        if not message.get("ok"):
            raise RemoteError(str(message.get("error")), kind=str(message.get("kind")))
        result: dict[str, Any] = message.get("result") or {}
        return result


class RemoteWorker(WorkerClient):
    """Commands to a registered worker's own HTTP API, authenticated with its registration secret."""

    def __init__(self, worker_id: str, url: str, secret: str, providers: list[str]) -> None:
        self.worker_id = worker_id
        self.url = url.rstrip("/")
        self._secret = secret
        self.providers = providers

    def serves(self, provider: str) -> bool:
        return provider in self.providers

    async def _call(
        self, method: str, path: str, *, timeout: float = 30.0, raw: bool = False, **kwargs: Any
    ) -> Any:
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=3.0)) as client:
                headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {self._secret}"}
                resp = await client.request(method, f"{self.url}{path}", headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise EnclaveError(
                f"worker {self.worker_id} at {self.url} unreachable: {exc or type(exc).__name__}",
                hint="check the worker pod and the network policy between service and workers",
            ) from None
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {"message": resp.text[:200]}
            message = f"worker {self.worker_id}: {body.get('message', resp.status_code)}"
            if resp.status_code == 409:
                raise CapacityError(message, hint=body.get("hint"))
            if resp.status_code == 404:
                raise NotFoundError(message)
            raise EnclaveError(message, hint=body.get("hint"))
        if raw:
            return resp.content
        return resp.json() if resp.content else None

    async def launch(self, provider: str, spec: EnclaveSpec) -> None:
        await self._call("POST", "/enclaves", json={"provider": provider, "spec": dataclasses.asdict(spec)})

    async def destroy(self, enclave_id: str) -> None:
        await self._call("DELETE", f"/enclaves/{enclave_id}")

    async def reattest(self, enclave_id: str) -> AttestationGrant:
        reply = await self._call("POST", f"/enclaves/{enclave_id}/attest")
        return AttestationGrant(**reply)

    async def deliver_secrets(self, enclave_id: str, names: list[str]) -> dict[str, Any]:
        reply: dict[str, Any] = await self._call(
            "POST", f"/enclaves/{enclave_id}/secrets", json={"names": names}
        )
        return reply

    def channel(self, enclave_id: str) -> Any:
        return RemoteChannel(self, enclave_id)


class WorkerDirectory:
    """Registered remote workers (in the store, so every service replica sees them)."""

    def __init__(self, store: Store, *, heartbeat_timeout: float) -> None:
        self.store = store
        self.heartbeat_timeout = heartbeat_timeout
        self._sim_verifiers: dict[str, Verifier] = {}
        self._lock = threading.Lock()

    def register(
        self,
        worker_id: str,
        url: str,
        providers: list[str],
        capacity: dict[str, Any],
        simulation_roots: dict[str, str] | None = None,
        *,
        owner: str | None,
        owner_live: Callable[[str], bool] = lambda digest: True,
    ) -> str:
        """(Re)register; returns the secret the service will use to call the worker.

        ``owner`` (the SHA-256 of the caller's token) owns the id from now on. An id another
        token registered stays that token's while it is ``owner_live`` (not revoked): a worker's
        token cannot redirect another worker's enclaves. ``owner`` None (an admin) registers the
        id unowned: the next worker token to register it claims it.
        ``simulation_roots`` (PEM by evidence kind) are trusted for the worker's simulated
        enclaves only, and what they sign is always marked simulated."""
        row = self.store.fetchone("SELECT token_hash FROM workers WHERE id = ?", (worker_id,))
        previous = str(row["token_hash"] or "") if row is not None else ""
        if (
            previous
            and owner is not None
            and not hmac.compare_digest(previous, owner)
            and owner_live(previous)
        ):
            raise PermissionDeniedError(
                f"worker id {worker_id} is registered by another token",
                hint="give each worker its own id (R3E_TEE_WORKER_ID); to move an id to a new token, "
                "revoke the old token, or register the id once with an admin token (which frees it)",
            )
        secret = secrets.token_urlsafe(32)
        now = time.time()
        with self.store.transaction() as tx:
            tx.execute(
                "DELETE FROM workers WHERE id = ? AND COALESCE(token_hash, '') = ?", (worker_id, previous)
            )
            inserted = tx.fetchone(
                "INSERT INTO workers (id, url, providers, capacity, secret, simulation_roots, started_at, "
                "last_heartbeat, token_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING RETURNING id",
                (
                    worker_id,
                    url,
                    json.dumps(providers),
                    json.dumps(capacity),
                    secret,
                    json.dumps(simulation_roots) if simulation_roots else None,
                    now,
                    now,
                    owner,
                ),
            )
        if inserted is None:
            raise ConflictError(f"worker id {worker_id} was registered concurrently", hint="register again")
        return secret

    def check_caller(self, worker_id: str, caller: str) -> None:
        """The worker ``worker_id`` was registered by the token with SHA-256 ``caller``.

        An unknown id, or one registered before ids had owners, is "not registered": the worker
        registers again by itself and so claims it."""
        row = self.store.fetchone("SELECT token_hash FROM workers WHERE id = ?", (worker_id,))
        if row is None or not row["token_hash"]:
            raise NotFoundError(
                f"worker {worker_id} is not registered", hint="the worker re-registers by itself"
            )
        if not hmac.compare_digest(str(row["token_hash"]), caller):
            raise PermissionDeniedError(
                f"worker {worker_id} was registered by another token",
                hint="a worker speaks only for itself: use the token it registered with",
            )

    def check_enclave_caller(self, enclave_id: str, caller: str) -> None:
        """The enclave runs on a worker the token with SHA-256 ``caller`` registered (what an
        enclave-scope token may attest as)."""
        row = self.store.fetchone(
            "SELECT e.worker_id AS worker_id, w.token_hash AS token_hash FROM enclaves e "
            "LEFT JOIN workers w ON w.id = e.worker_id WHERE e.id = ?",
            (enclave_id,),
        )
        if row is None:
            raise NotFoundError(f"no enclave {enclave_id}", hint="attest enclaves the service launched")
        if not row["token_hash"] or not hmac.compare_digest(str(row["token_hash"]), caller):
            raise PermissionDeniedError(
                f"enclave {enclave_id} does not run on a worker this token registered",
                hint="a worker attests only its own enclaves",
            )

    def heartbeat(self, worker_id: str, capacity: dict[str, Any]) -> None:
        if (
            self.store.execute(
                "UPDATE workers SET capacity = ?, last_heartbeat = ? WHERE id = ?",
                (json.dumps(capacity), time.time(), worker_id),
            )
            == 0
        ):
            raise NotFoundError(
                f"worker {worker_id} is not registered", hint="the worker re-registers by itself"
            )

    def list_workers(self) -> list[dict[str, Any]]:
        out = []
        now = time.time()
        for row in self.store.fetchall(
            "SELECT id, url, providers, capacity, started_at, last_heartbeat FROM workers"
        ):
            out.append(
                {
                    "id": row["id"],
                    "url": row["url"],
                    "providers": json.loads(row["providers"]),
                    "capacity": json.loads(row["capacity"]),
                    "started_at": row["started_at"],
                    "last_heartbeat": row["last_heartbeat"],
                    "alive": now - float(row["last_heartbeat"]) < self.heartbeat_timeout,
                }
            )
        return out

    def client(self, worker_id: str) -> RemoteWorker:
        row = self.store.fetchone("SELECT id, url, providers, secret FROM workers WHERE id = ?", (worker_id,))
        if row is None:
            raise NotFoundError(f"worker {worker_id} is not registered")
        return RemoteWorker(row["id"], row["url"], row["secret"], json.loads(row["providers"]))

    def choose(self, provider: str, size: int) -> RemoteWorker:
        """The live worker of ``provider`` with the most free memory for it."""
        best: tuple[int, str] | None = None
        alive_any = False
        for w in self.list_workers():
            if not w["alive"] or provider not in w["providers"]:
                continue
            alive_any = True
            free = int(w["capacity"].get(provider, {}).get("free_bytes", 0))
            if free >= size and (best is None or free > best[0]):
                best = (free, w["id"])
        if best is None:
            if alive_any:
                raise CapacityError(
                    f"no {provider} worker has {size // (1024 * 1024)} MiB free",
                    hint="add nodes or destroy enclaves",
                )
            raise ProviderUnavailableError(
                f"no live worker serves provider {provider!r}",
                hint="start r3e-tee-worker on a node with this hardware (see r3e-tee-cli doctor there)",
            )
        return self.client(best[1])

    def simulation_verifier(self, enclave_id: str | None) -> Verifier | None:
        """A verifier trusting the simulated roots the enclave's worker registered."""
        if not enclave_id:
            return None
        row = self.store.fetchone(
            "SELECT w.simulation_roots AS roots FROM enclaves e JOIN workers w ON w.id = e.worker_id "
            "WHERE e.id = ?",
            (enclave_id,),
        )
        if row is None or not row["roots"]:
            return None
        text = str(row["roots"])
        with self._lock:
            verifier = self._sim_verifiers.get(text)
            if verifier is None:
                from r3e_tee.attestation.pinned_roots_nitro_ias import TrustAnchor
                from r3e_tee.attestation.result import EvidenceKind

                roots = json.loads(text)
                verifier = Verifier(
                    trust_roots={
                        EvidenceKind(kind): TrustAnchor.load(
                            pem.encode(), simulated=True, name="worker simulated root"
                        )
                        for kind, pem in roots.items()
                    }
                )
                self._sim_verifiers[text] = verifier
        return verifier

    def reap(self) -> list[str]:
        """Enclaves of workers that stopped heartbeating are failed (their channels are gone).

        Runs on one replica at a time; returns the enclave ids it failed."""
        lost: list[str] = []
        with self.store.try_lock("reap-lost-workers") as mine:
            if not mine:
                return lost
            cutoff = time.time() - 2 * self.heartbeat_timeout
            for w in self.store.fetchall("SELECT id FROM workers WHERE last_heartbeat < ?", (cutoff,)):
                rows = self.store.fetchall(
                    "SELECT id FROM enclaves WHERE worker_id = ? AND state NOT IN ('terminated', 'failed')",
                    (w["id"],),
                )
                for row in rows:
                    self.store.execute(
                        "UPDATE enclaves SET state = 'failed', reason = ?, updated_at = ?, terminated_at = ? "
                        "WHERE id = ?",
                        (f"worker {w['id']} stopped heartbeating", time.time(), time.time(), row["id"]),
                    )
                    lost.append(str(row["id"]))
        return lost

    def check_attested(self, enclave_id: str, fields: dict[str, Any]) -> None:
        """A worker's state report may set an enclave's public keys (what clients seal inputs to)
        and call it ready only with an accepted, unrevoked attestation of that enclave, and the
        keys must be the attested ones: the worker's host is not trusted with them."""
        att_id = fields.get("attestation_id")
        if fields.get("measurement") is not None:
            self._check_measurement(enclave_id, att_id, str(fields["measurement"]))
        if att_id is None:
            if fields.get("public_keys") is not None:
                raise ConflictError(
                    f"enclave {enclave_id}: public keys are reported with the attestation that binds them",
                    hint="send attestation_id with public_keys",
                )
            if fields.get("state") == "ready":
                row = self.store.fetchone("SELECT attestation_id FROM enclaves WHERE id = ?", (enclave_id,))
                if row is None or not row["attestation_id"]:
                    raise ConflictError(
                        f"enclave {enclave_id} is not ready before it is attested",
                        hint="report ready with the attestation_id the service returned",
                    )
            return
        row = self.store.fetchone(
            "SELECT enclave_id, verdict, revoked_at, public_keys FROM attestations WHERE id = ?", (att_id,)
        )
        if row is None or row["enclave_id"] != enclave_id or row["verdict"] != "valid" or row["revoked_at"]:
            raise ConflictError(
                f"attestation {att_id} is no accepted attestation of enclave {enclave_id}",
                hint="report the attestation_id POST /v1/attestation/verify returned for this enclave",
            )
        reported = fields.get("public_keys")
        if reported is not None:
            attested = {k: _b64u_hex(v) for k, v in json.loads(row["public_keys"] or "{}").items()}
            if reported != attested:
                raise ConflictError(
                    f"enclave {enclave_id}: the reported public keys are not the ones attestation {att_id} "
                    "bound",
                    hint="report the keys the enclave attested with",
                )

    def _check_measurement(self, enclave_id: str, att_id: str | None, reported: str) -> None:
        """Once an enclave is attested, the measurement it is listed with (what a function's
        launch is checked against) is the attested one, not what its worker's host says."""
        if att_id is None:
            row = self.store.fetchone("SELECT attestation_id FROM enclaves WHERE id = ?", (enclave_id,))
            att_id = row["attestation_id"] if row is not None else None
            if not att_id:
                return  # before attestation: the host's figure, shown until the verified one
        att = self.store.fetchone(
            "SELECT claims FROM attestations WHERE id = ? AND enclave_id = ?", (att_id, enclave_id)
        )
        result = json.loads(att["claims"]) if att is not None and att["claims"] else {}
        attested = measurement_from_claims(result.get("claims") or {})
        if attested is None or reported.lower() != attested.lower():  # public values
            raise ConflictError(
                f"enclave {enclave_id}: the reported measurement is not the one attestation {att_id} "
                f"verified ({attested})",
                hint="report the measurement the attestation returned",
            )

    def check_owner(self, worker_id: str, enclave_id: str) -> None:
        row = self.store.fetchone("SELECT worker_id FROM enclaves WHERE id = ?", (enclave_id,))
        if row is None:
            raise NotFoundError(f"no enclave {enclave_id}")
        if row["worker_id"] != worker_id:
            raise ConflictError(f"enclave {enclave_id} belongs to worker {row['worker_id']}, not {worker_id}")


def _b64u_hex(value: str) -> str:
    """A stored (base64url) attested key as the hex an enclave row holds."""
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
