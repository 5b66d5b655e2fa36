"""Enclave registry of the service: validation, placement on a worker, state in the store."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from r3e_tee.config import KNOWN_PROVIDERS, TeeConfig, parse_size
from r3e_tee.errors import InvalidRequestError, NotFoundError, ProviderUnavailableError
from r3e_tee.providers.base import EVIDENCE_FORMATS, MAX_ENCLAVE_BYTES, EnclaveSpec
from r3e_tee.providers.hardware import probe_provider
from r3e_tee.service.workers import WorkerClient, WorkerDirectory
from r3e_tee.store import Store
from r3e_tee.worker.manager import StateSink

_COLUMNS = (
    "id, provider, size_bytes, debug, evidence_format, state, reason, measurement, attestation_id, "
    "worker_id, pid, public_keys, function_name, created_at, updated_at, ready_at, terminated_at"
)
_UPDATABLE = {
    "state",
    "reason",
    "measurement",
    "attestation_id",
    "worker_id",
    "pid",
    "public_keys",
    "ready_at",
    "terminated_at",
}


def row_to_enclave(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["debug"] = bool(row["debug"])
    out["public_keys"] = json.loads(row["public_keys"]) if row.get("public_keys") else None
    return out


class StoreSink(StateSink):
    """State changes written straight to the store (embedded worker)."""

    def __init__(self, store: Store, on_change: list[Any] | None = None) -> None:
        self.store = store
        self.on_change = on_change if on_change is not None else []

    def update_sync(self, enclave_id: str, **fields: Any) -> None:
        bad = set(fields) - _UPDATABLE
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        if "public_keys" in fields and not isinstance(fields["public_keys"], str | None):
            fields["public_keys"] = json.dumps(fields["public_keys"])
        fields["updated_at"] = time.time()
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self.store.transaction() as tx:
            current = tx.fetchone("SELECT state FROM enclaves WHERE id = ?", (enclave_id,))
            if current is None:
                return
            # terminal states are final: a late 'ready' must not resurrect a destroyed enclave
            final = current["state"] in ("terminated", "failed")
            if final and "state" in fields and fields["state"] != "terminated":
                return
            # column names come from _UPDATABLE, values are parameters
            sql = f"UPDATE enclaves SET {assignments} WHERE id = ?"  # noqa: S608
            tx.execute(sql, (*fields.values(), enclave_id))
        for callback in self.on_change:
            callback(enclave_id, fields)

    async def update(self, enclave_id: str, **fields: Any) -> None:
        self.update_sync(enclave_id, **fields)

    async def owned(self, worker_id: str) -> list[dict[str, Any]]:
        return self.store.fetchall(
            "SELECT id, state, pid FROM enclaves "
            "WHERE worker_id = ? AND state NOT IN ('terminated', 'failed')",
            (worker_id,),
        )


class EnclaveRegistry:
    """Validates requests, places enclaves on a worker (embedded first, then registered remote
    workers) and reads state from the store, which every worker writes to."""

    def __init__(
        self,
        config: TeeConfig,
        store: Store,
        local: WorkerClient | None,
        directory: WorkerDirectory | None = None,
        *,
        on_destroy: Callable[[str], object] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.local = local
        self.directory = directory
        self.on_destroy = on_destroy
        # the key broker's identity (keys/service.py sets it): measured into every enclave
        self.broker_key: str | None = None

    def _place(self, provider: str, size: int) -> WorkerClient:
        enabled = self.config.enabled_providers
        if provider not in KNOWN_PROVIDERS:
            raise InvalidRequestError(
                f"unknown provider {provider!r}", hint=f"enabled providers: {', '.join(enabled) or '(none)'}"
            )
        local_probe = probe_provider(provider) if provider in ("sgx", "nitro") else None
        if provider not in enabled:
            why = f"provider {provider!r} is not enabled"
            if local_probe is not None and not local_probe.available:
                why += "; " + local_probe.explanation()
            raise ProviderUnavailableError(
                why, hint=f"enabled providers: {', '.join(enabled) or '(none)'}; details: r3e-tee-cli doctor"
            )
        if self.local is not None and self.local.serves(provider):
            return self.local
        if self.directory is not None:
            try:
                return self.directory.choose(provider, size)
            except ProviderUnavailableError as exc:
                if local_probe is not None and not local_probe.available:
                    raise ProviderUnavailableError(
                        f"{exc.message}, and {local_probe.explanation()}", hint=exc.hint
                    ) from None
                raise
        raise ProviderUnavailableError(
            f"no worker serves provider {provider!r}"
            + (f"; {local_probe.explanation()}" if local_probe and not local_probe.available else ""),
            hint="start r3e-tee-worker on a node with this hardware, or enable the embedded worker",
        )

    def measured_payload(self, payload: Mapping[str, Any] | None) -> dict[str, Any]:
        """What an enclave is measured with: the caller's payload and the broker key it will
        accept secrets from (the simulation provider measures the payload; SGX and Nitro images
        carry the key in their own measured configuration, see keys/hpke.py)."""
        out = dict(payload or {})
        if self.broker_key is not None:
            out["broker_key"] = self.broker_key  # this service's broker, whatever a caller asked
        return out

    async def create(
        self,
        *,
        provider: str,
        size: str | int,
        debug: bool = False,
        evidence_format: str | None = None,
        payload: Mapping[str, Any] | None = None,
        function_name: str | None = None,
    ) -> dict[str, Any]:
        try:
            size_bytes = parse_size(size)
        except ValueError as exc:
            raise InvalidRequestError(f"size: {exc}", hint="write sizes as 128M, 512Mi or 2G") from None
        if size_bytes > MAX_ENCLAVE_BYTES:
            raise InvalidRequestError(
                f"size: {size_bytes} bytes is more than any enclave ({MAX_ENCLAVE_BYTES} bytes at most)",
                hint="write sizes as 128M, 512Mi or 2G",
            )
        fmt = evidence_format or ("nitro" if provider == "nitro" else "sgx-dcap")
        if fmt not in EVIDENCE_FORMATS:
            raise InvalidRequestError(
                f"unknown evidence format {fmt!r}", hint=f"use one of {', '.join(EVIDENCE_FORMATS)}"
            )
        if (provider == "sgx" and fmt != "sgx-dcap") or (provider == "nitro" and fmt != "nitro"):
            raise InvalidRequestError(f"provider {provider!r} cannot produce {fmt!r} evidence")
        worker = self._place(provider, size_bytes)
        spec = EnclaveSpec(
            id=uuid.uuid4().hex,
            size_bytes=size_bytes,
            debug=debug,
            evidence_format=fmt,
            payload=self.measured_payload(payload),
        )
        now = time.time()
        self.store.execute(
            "INSERT INTO enclaves (id, provider, size_bytes, debug, evidence_format, state, worker_id, "
            "function_name, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'creating', ?, ?, ?, ?)",
            (spec.id, provider, size_bytes, int(debug), fmt, worker.worker_id, function_name, now, now),
        )
        try:
            await worker.launch(provider, spec)
        except BaseException:
            self.store.execute("DELETE FROM enclaves WHERE id = ?", (spec.id,))
            raise
        return self.get(spec.id)

    def worker_of(self, enclave: Mapping[str, Any]) -> WorkerClient | None:
        wid = enclave.get("worker_id")
        if self.local is not None and wid == self.local.worker_id:
            return self.local
        if self.directory is not None and wid:
            try:
                return self.directory.client(str(wid))
            except NotFoundError:
                return None
        return None

    async def wait(self, enclave_id: str, timeout: float) -> dict[str, Any]:
        """Until ready, failed or terminated, or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        enclave = self.get(enclave_id)
        worker = self.worker_of(enclave)
        if worker is not None:
            try:
                await worker.wait_ready(enclave_id, timeout)
            except TimeoutError:
                pass
        enclave = self.get(enclave_id)
        while enclave["state"] in ("creating", "attesting") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            enclave = self.get(enclave_id)
        return enclave

    def get(self, enclave_id: str) -> dict[str, Any]:
        row = self.store.fetchone(f"SELECT {_COLUMNS} FROM enclaves WHERE id = ?", (enclave_id,))  # noqa: S608
        if row is None:
            raise NotFoundError(
                f"no enclave {enclave_id}", hint="list enclaves with r3e-tee-cli list-enclaves"
            )
        return row_to_enclave(row)

    def list(self, *, state: str | None = None, include_terminated: bool = False) -> list[dict[str, Any]]:
        sql = f"SELECT {_COLUMNS} FROM enclaves"  # noqa: S608 - constant column list
        params: list[Any] = []
        if state:
            sql += " WHERE state = ?"
            params.append(state)
        elif not include_terminated:
            sql += " WHERE state <> 'terminated'"
        return [row_to_enclave(r) for r in self.store.fetchall(sql + " ORDER BY created_at", params)]

    async def attest(self, enclave_id: str) -> dict[str, Any]:
        """A fresh round trip for a running enclave: new nonce, new evidence, new token."""
        enclave = self.get(enclave_id)
        worker = self.worker_of(enclave)
        if enclave["state"] != "ready" or worker is None:
            raise InvalidRequestError(
                f"enclave {enclave_id} is {enclave['state']}, not ready", hint="only ready enclaves re-attest"
            )
        grant = await worker.reattest(enclave_id)
        return {
            "enclave_id": enclave_id,
            "attestation_id": grant.attestation_id,
            "token": grant.token,
            "expires_at": grant.expires_at,
            "measurement": grant.measurement,
        }

    async def destroy(self, enclave_id: str) -> dict[str, Any]:
        enclave = self.get(enclave_id)
        if enclave["state"] == "terminated":
            return enclave
        worker = self.worker_of(enclave)
        if worker is not None and enclave["state"] != "failed":
            await worker.destroy(enclave_id)
        else:
            StoreSink(self.store).update_sync(enclave_id, state="terminated", terminated_at=time.time())
        if self.on_destroy is not None:
            self.on_destroy(enclave_id)  # its tokens are revoked with it
        return self.get(enclave_id)
