"""The functions layer of the service: deploy, place, invoke, queue, scale, measure."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import time
from typing import Any

from prometheus_client import Gauge

from r3e_tee.errors import FunctionError, InvalidRequestError, R3ETeeError
from r3e_tee.functions.invocations import Dispatcher, InvocationQueue
from r3e_tee.functions.registry import FunctionRegistry, FunctionVersion
from r3e_tee.functions.scheduler import EnclaveRef, InvokeResult, RemoteEnclave, Scheduler
from r3e_tee.ids import new_id
from r3e_tee.service.app import ServiceContext
from r3e_tee.service.metrics import LatencyMetrics
from r3e_tee.service.workers import LocalWorker

log = logging.getLogger("r3e_tee.functions")


class FunctionsService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.enclaves = ctx.components["enclaves"]
        self.registry = FunctionRegistry(ctx.store, broker_key=self.enclaves.broker_key)
        self.queue = InvocationQueue(ctx.store)
        self.manager = ctx.components.get("manager")
        self.scheduler = Scheduler(self._launch, self._destroy)
        self.dispatcher = Dispatcher(self.queue, self._run_queued)
        r = ctx.registry
        self.m_invocations = LatencyMetrics(
            counter="r3e_tee_invocations",
            counter_doc="Invocations by function and status",
            histogram="r3e_tee_invocation_duration_seconds",
            histogram_doc="Invocation latency inside the service, by function and status",
            labelnames=("function", "status"),
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30),
            registry=r,
        )
        self.m_queue = Gauge(
            "r3e_tee_function_queue_depth",
            "Invocations not yet running: queued, waiting for an enclave, or pipelined into one"
            " behind its busy sandboxes",
            ["function"],
            registry=r,
        )
        self.m_enclaves = Gauge("r3e_tee_enclaves", "Enclaves by state", ["state"], registry=r)

    def _observe(self, name: str, status: str, elapsed: float) -> None:
        self.m_invocations.observe((name, status), elapsed)

    # -- enclaves for functions ------------------------------------------------------------------

    async def _launch(self, fv: FunctionVersion) -> tuple[str, EnclaveRef]:
        """An enclave measured with this version, its secrets released to it, the code loaded;
        on the embedded worker or a registered remote one."""
        cfg = fv.config
        enclave = await self.enclaves.create(
            provider=cfg.provider,
            size=cfg.enclave_size,
            evidence_format=cfg.evidence_format,
            payload=fv.payload,
            function_name=fv.name,
        )
        enclave = await self.enclaves.wait(enclave["id"], 60)
        if enclave["state"] != "ready":
            raise FunctionError(f"the enclave for {fv.name} did not become ready: {enclave.get('reason')}")
        eid = str(enclave["id"])
        try:
            if fv.measurement is not None and enclave.get("measurement") != fv.measurement:
                raise FunctionError(
                    f"version {fv.version} was deployed for measurement {fv.measurement}, but its "
                    f"enclave measures {enclave.get('measurement')}: what enclaves are measured with "
                    "changed since (the runtime, or the key broker's key it pins); deploy the "
                    "function again to publish the new measurement"
                )
            worker = self.enclaves.worker_of(enclave)
            if worker is None:
                raise FunctionError(f"enclave {eid} runs on no worker this service can reach")
            handle: EnclaveRef = (
                self.manager.handles[eid]
                if isinstance(worker, LocalWorker) and self.manager is not None
                else RemoteEnclave(worker.channel(eid))
            )
            if cfg.secrets:
                await worker.deliver_secrets(eid, list(cfg.secrets))
            await handle.channel.request(
                "load_function", code=fv.code, measurement=enclave["measurement"], enclave_id=eid, timeout=60
            )
        except (R3ETeeError, KeyError) as exc:
            with contextlib.suppress(R3ETeeError):
                await self.enclaves.destroy(eid)
            raise FunctionError(f"preparing an enclave for {fv.name} failed: {exc}") from None
        log.info(
            "enclave serving function", extra={"function": fv.name, "version": fv.version, "enclave_id": eid}
        )
        return eid, handle

    async def _destroy(self, enclave_id: str) -> None:
        await self.enclaves.destroy(enclave_id)

    # -- invocation ------------------------------------------------------------------------------

    async def invoke(
        self,
        name: str,
        raw: bytes,
        *,
        encrypted: bool = False,
        reply_key: bytes | None = None,
        enclave_id: str | None = None,
        invocation_id: str | None = None,
        version: int | None = None,
        retry: bool | None = None,
    ) -> InvokeResult:
        fv = self.registry.resolve(name, version)
        if encrypted and not enclave_id:
            raise InvalidRequestError(
                "an encrypted input is sealed to one enclave's key: name it with X-R3E-Enclave",
                hint="GET /v1/functions/NAME/enclave returns an enclave and its attested key",
            )
        request: dict[str, Any] = {
            "input": raw,
            "encrypted": encrypted,
            "function_timeout": fv.config.timeout,
            "invocation_id": invocation_id or new_id(),
        }
        if reply_key is not None:
            request["reply_key"] = reply_key
        start = time.perf_counter()
        status = "error"
        try:
            reply, eid = await self.scheduler.invoke(fv, request, enclave_id=enclave_id, retry=retry)
            status = str(reply.get("status"))
        finally:
            self._observe(name, status, time.perf_counter() - start)
        return InvokeResult(
            invocation_id=str(request["invocation_id"]),
            status=status,
            output=reply.get("output"),
            output_encrypted=reply.get("output_encrypted"),
            receipt_json=receipt_json(reply),
            error=reply.get("error"),
            enclave_id=eid,
        )

    async def _run_queued(self, row: dict[str, Any]) -> dict[str, Any]:
        result = await self.invoke(
            str(row["function"]),
            bytes(row["input"]),
            encrypted=bool(row["encrypted"]),
            reply_key=bytes(row["reply_key"]) if row["reply_key"] is not None else None,
            enclave_id=row["enclave_id"],
            invocation_id=str(row["id"]),
            version=int(row["version"]),
            retry=False,  # the queue retries itself (at least once)
        )
        return {
            "status": result.status,
            "output": result.output,
            "output_encrypted": result.output_encrypted,
            "receipt": result.receipt,
            "error": result.error,
            "enclave_id": result.enclave_id,
        }

    async def enclave_for(self, name: str) -> dict[str, Any]:
        """A ready enclave of the function with its attested keys, for end-to-end encryption."""
        fv = self.registry.get(name)
        pool = self.scheduler.pool(fv)
        slot = await pool.acquire(fv.config.timeout + 30)
        try:
            enclave = self.enclaves.get(slot.enclave_id)
            held = await slot.handle.channel.request("get_token", timeout=10)
        finally:
            await pool.release(slot)
        attestation = self.ctx.components["attestation"].get(enclave["attestation_id"])
        keys = enclave["public_keys"] or {}
        return {
            "token": held.get("token"),
            "enclave_id": enclave["id"],
            "function": fv.name,
            "version": fv.version,
            "measurement": enclave["measurement"],
            "x25519": base64.b64encode(bytes.fromhex(keys.get("x25519", ""))).decode(),
            "p256": base64.b64encode(bytes.fromhex(keys.get("p256", ""))).decode(),
            "attestation_id": enclave["attestation_id"],
            "evidence_kind": attestation.get("kind"),
        }

    def refresh_metrics(self) -> None:
        depth = self.queue.depth()
        for name, waiting in self.scheduler.queue_depth().items():
            depth[name] = depth.get(name, 0) + waiting
        for name, value in depth.items():
            self.m_queue.labels(name).set(value)
        for row in self.ctx.store.fetchall("SELECT state, count(*) AS n FROM enclaves GROUP BY state"):
            self.m_enclaves.labels(row["state"]).set(int(row["n"]))

    async def start(self) -> None:
        self.scheduler.start()
        self.dispatcher.start()

    async def stop(self) -> None:
        await self.dispatcher.stop()
        await self.scheduler.stop()


def receipt_json(reply: dict[str, Any]) -> bytes:
    """The receipt of a runtime's answer as JSON text (an older runtime sends it as a map)."""
    text = reply.get("receipt_json")
    if isinstance(text, bytes):
        return text
    receipt = reply.get("receipt")
    if not isinstance(receipt, dict):
        raise FunctionError("the enclave answered without a receipt")
    return json.dumps(receipt, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def decode_b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{what} is not valid base64") from None


def decode_reply_key(value: str) -> bytes:
    """``X-R3E-Reply-Key``: a raw X25519 key the output can be sealed to, refused here (400)
    rather than after the function ran (and on each retry of a queued invocation)."""
    from r3e_tee.functions.e2e import reply_public_key

    raw = decode_b64(value, "X-R3E-Reply-Key")
    try:
        reply_public_key(raw)
    except ValueError as exc:
        raise InvalidRequestError(
            f"X-R3E-Reply-Key: {exc}",
            hint="send the base64 of a fresh X25519 public key (32 bytes) whose private key you hold",
        ) from None
    return raw


def install(ctx: ServiceContext) -> None:
    service = FunctionsService(ctx)
    ctx.components["functions"] = service
    ctx.components["startup"].append(service.start)
    ctx.components["shutdown"].append(service.stop)
    ctx.components["metrics_refresh"].append(service.refresh_metrics)

    def routes(app: Any) -> None:
        from r3e_tee.functions import routes as function_routes

        app.include_router(function_routes.router)
        if hasattr(app, "add_fast_route"):
            app.add_fast_route(function_routes.fast_invoke(ctx))
            function_routes.set_body_limits(app)

    ctx.components["routers"].append(routes)
