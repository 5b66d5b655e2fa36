"""``r3e-tee-worker``: host enclaves on a TEE node for a remote service.

It starts the providers this node can run, registers with the service (URL, providers,
capacity), heartbeats, reconciles enclaves the store still assigns to it after a restart, and
serves a small API the service calls to launch, re-attest and destroy enclaves. Its own
``/healthz``, ``/readyz`` and ``/metrics`` are what Kubernetes probes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from r3e_tee import __version__
from r3e_tee.config import TeeConfig, load_config, port_number
from r3e_tee.errors import AuthenticationError, InvalidRequestError, R3ETeeError
from r3e_tee.logging import configure_logging
from r3e_tee.providers.base import EnclaveSpec

log = logging.getLogger("r3e_tee.worker")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="r3e-tee-worker",
        description="Host enclaves on this TEE node for an R3E TEE Service.",
        epilog="Example (Kubernetes sets these from the pod spec):\n"
        "  r3e-tee-worker --server http://r3e-tee-service:8080 --config /etc/r3e-tee/tee-config.yaml\n"
        "The service token comes from R3E_TEE_TOKEN (never a flag in production: flags show in ps).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=env("R3E_TEE_CONFIG"), help="tee-config.yaml [R3E_TEE_CONFIG]")
    p.add_argument("--server", default=env("R3E_TEE_URL"), help="the service URL [R3E_TEE_URL]")
    p.add_argument("--token", default=env("R3E_TEE_TOKEN"), help="token with enclave scope [R3E_TEE_TOKEN]")
    p.add_argument("--host", default=env("R3E_TEE_WORKER_HOST", "0.0.0.0"), help="API listen address")  # noqa: S104
    p.add_argument(
        "--port",
        type=port_number,
        default=env("R3E_TEE_WORKER_PORT", "8081"),
        help="API port, 1-65535 [R3E_TEE_WORKER_PORT] (default 8081)",
    )
    p.add_argument(
        "--advertise-url",
        default=env("R3E_TEE_WORKER_URL"),
        help="URL the service reaches this worker at [R3E_TEE_WORKER_URL] (default http://<POD_IP>:port)",
    )
    p.add_argument("--id", default=env("R3E_TEE_WORKER_ID") or socket.gethostname(), help="worker id")
    p.add_argument("--data-dir", default=env("R3E_TEE_DATA_DIR", "/var/lib/r3e-tee"), help="state directory")
    p.add_argument("--provider", action="append", help="run only these providers (default: enabled ones)")
    p.add_argument("--version", action="version", version=f"r3e-tee-worker {__version__}")
    return p


class WorkerProcess:
    def __init__(self, args: argparse.Namespace, config: TeeConfig) -> None:
        from r3e_tee.service.components import build_providers
        from r3e_tee.worker.manager import EnclaveManager
        from r3e_tee.worker.remote import HttpAttestation, HttpSink, ServiceLink

        self.args = args
        self.config = config
        from r3e_tee.service.__main__ import prepare_data_dir

        data_dir = Path(args.data_dir)
        prepare_data_dir(data_dir)
        providers = build_providers(config, data_dir)
        if args.provider:
            providers = {k: v for k, v in providers.items() if k in args.provider}
        if not providers:
            raise R3ETeeError(
                "no provider can run on this node",
                hint="run `r3e-tee-cli doctor` here; enable a provider this hardware supports",
            )
        self.link = ServiceLink(args.server, args.token)
        self.manager = EnclaveManager(
            args.id,
            providers,
            HttpAttestation(self.link, self._collateral),
            HttpSink(self.link, args.id),
            heartbeat_interval=config.workers.heartbeat_interval,
        )
        from r3e_tee.keys.remote import HttpSecretSource

        # secrets and Nitro sealing keys come from the service's key broker, sealed to each enclave
        self.manager.secret_source = HttpSecretSource(args.server, args.token)
        pod_ip = os.environ.get("POD_IP") or socket.gethostbyname(socket.gethostname())
        self.url = args.advertise_url or f"http://{pod_ip}:{args.port}"
        self.secret: str | None = None
        self.registered = asyncio.Event()

    def _collateral(self, provider: str, evidence: bytes) -> dict[str, Any] | None:
        """The simulation provider's DCAP collateral for its quotes (Nitro documents need none)."""
        if provider != "simulation" or evidence[:2] not in (b"\x03\x00", b"\x04\x00", b"\x05\x00"):
            return None
        collateral = self.manager.providers[provider].verification_roots()["collateral"](None, evidence)
        result: dict[str, Any] = collateral.to_json()
        return result

    def _simulation_roots(self) -> dict[str, str] | None:
        sim = self.manager.providers.get("simulation")
        if sim is None:
            return None
        from cryptography.hazmat.primitives.serialization import Encoding

        return {
            kind.value: cert.public_bytes(Encoding.PEM).decode()
            for kind, cert in sim.verification_roots()["trust_roots"].items()
        }

    async def register(self) -> None:
        reply = await self.link.call(
            "POST",
            "/v1/workers",
            json={
                "id": self.manager.worker_id,
                "url": self.url,
                "providers": sorted(self.manager.providers),
                "capacity": self.manager.capacity(),
                "simulation_roots": self._simulation_roots(),
            },
        )
        self.secret = str(reply["secret"])
        self.registered.set()
        log.info("registered with the service", extra={"server": self.link.server, "worker_url": self.url})

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.workers.heartbeat_interval)
            try:
                if not self.registered.is_set():
                    await self.register()
                await self.link.call(
                    "POST",
                    f"/v1/workers/{self.manager.worker_id}/heartbeat",
                    json={"capacity": self.manager.capacity()},
                )
            except R3ETeeError as exc:
                log.warning("heartbeat failed", extra={"error": exc.message})
                if "not registered" in exc.message:
                    self.registered.clear()

    def check(self, authorization: str | None) -> None:
        expected = f"Bearer {self.secret}" if self.secret else None
        if expected is None or authorization is None or not hmac.compare_digest(authorization, expected):
            raise AuthenticationError("not the registered service")


# module level: FastAPI resolves these (string) annotations in the module's globals
Auth = Annotated[str | None, Header(alias="Authorization")]


def create_worker_app(worker: WorkerProcess) -> FastAPI:
    registry = CollectorRegistry()
    free = Gauge("r3e_tee_worker_free_bytes", "Free enclave memory", ["provider"], registry=registry)
    running = Gauge("r3e_tee_worker_enclaves", "Running enclaves", ["provider"], registry=registry)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await worker.manager.start()
        try:
            await worker.register()
        except R3ETeeError as exc:
            log.warning("registration failed; retrying with the heartbeats", extra={"error": exc.message})
        task = asyncio.get_running_loop().create_task(worker.heartbeats())
        try:
            yield
        finally:
            task.cancel()
            await worker.manager.stop()
            await worker.link.aclose()

    app = FastAPI(title="R3E TEE worker", version=__version__, lifespan=lifespan)

    @app.exception_handler(R3ETeeError)
    async def _typed(_: Request, exc: R3ETeeError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.http_status)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ok = worker.registered.is_set()
        return JSONResponse(
            {"status": "ready" if ok else "not registered", "providers": sorted(worker.manager.providers)},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    def metrics() -> Response:
        for name, cap in worker.manager.capacity().items():
            free.labels(name).set(cap["free_bytes"])
            running.labels(name).set(cap["running"])
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/enclaves", status_code=202)
    async def launch(body: dict[str, Any], authorization: Auth = None) -> dict[str, str]:
        worker.check(authorization)
        fields, provider = body.get("spec"), body.get("provider")
        if not isinstance(fields, dict) or not isinstance(provider, str):
            raise InvalidRequestError(
                "a launch names its 'provider' and carries the enclave 'spec' (an object)"
            )
        try:
            spec = EnclaveSpec(**fields)
        except TypeError as exc:
            raise InvalidRequestError(f"the enclave spec does not fit: {exc}") from None
        worker.manager.launch(provider, spec)
        return {"id": spec.id}

    @app.delete("/enclaves/{enclave_id}", status_code=204)
    async def destroy(enclave_id: str, authorization: Auth = None) -> None:
        worker.check(authorization)
        await worker.manager.destroy(enclave_id)

    @app.post("/enclaves/{enclave_id}/secrets")
    async def secrets(enclave_id: str, body: dict[str, Any], authorization: Auth = None) -> dict[str, Any]:
        worker.check(authorization)
        names = body.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise R3ETeeError("names must be a list of secret names")
        return await worker.manager.deliver_secrets(enclave_id, names)

    @app.post("/enclaves/{enclave_id}/call")
    async def call(enclave_id: str, request: Request, authorization: Auth = None) -> Response:
        """Relay one operation to the enclave's runtime (only those the service may ask for)."""
        import cbor2

        from r3e_tee.runtime.channel import RemoteError
        from r3e_tee.service.workers import RELAYED_OPS

        worker.check(authorization)
        try:
            message = cbor2.loads(await request.body())
        except (cbor2.CBORError, ValueError):
            raise InvalidRequestError("a relayed call is one CBOR map") from None
        if not isinstance(message, dict):
            raise InvalidRequestError("a relayed call is one CBOR map")
        op = str(message.get("op"))
        if op not in RELAYED_OPS:
            raise AuthenticationError(f"operation {op!r} is not relayed")
        args, timeout = message.get("args") or {}, message.get("timeout")
        if not isinstance(args, dict) or not all(
            isinstance(k, str) and k not in ("op", "timeout") for k in args
        ):
            raise InvalidRequestError(
                "a relayed call's 'args' is a map with text keys other than op and timeout"
            )
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
            raise InvalidRequestError("a relayed call's 'timeout' is a number of seconds")
        handle = worker.manager.handles.get(enclave_id)
        if handle is None:
            return JSONResponse({"message": f"no enclave {enclave_id} here"}, status_code=404)
        try:
            result = await handle.channel.request(op, timeout=timeout, **args)
            reply = {"ok": True, "result": result}
        except RemoteError as exc:
            reply = {"ok": False, "error": exc.message, "kind": exc.kind}
        return Response(cbor2.dumps(reply), media_type="application/cbor")

    @app.post("/enclaves/{enclave_id}/attest")
    async def attest(enclave_id: str, authorization: Auth = None) -> dict[str, Any]:
        worker.check(authorization)
        grant = await worker.manager.reattest(enclave_id)
        return {
            "attestation_id": grant.attestation_id,
            "token": grant.token,
            "expires_at": grant.expires_at,
            "measurement": grant.measurement,
        }

    return app


def preflight(server: str, token: str, worker_id: str) -> None:
    """Check the service answers and takes the token before anything starts.

    The first call otherwise happens inside uvicorn's startup, whose failure is a multi-line
    traceback in the log; the worker would stop either way.
    """
    import httpx

    from r3e_tee.cli.client import ConnectionFailed, segment

    path = f"/v1/workers/{segment(worker_id, 'worker id', listed_by='--id')}/enclaves"
    try:
        resp = httpx.get(
            f"{server}{path}",
            headers={"Authorization": f"Bearer {token}", "User-Agent": "r3e-tee-worker"},
            timeout=httpx.Timeout(10.0, connect=5.0),
        )
    except httpx.HTTPError as exc:
        raise ConnectionFailed(
            f"cannot reach the service at {server}: {exc or type(exc).__name__}",
            hint="check --server / R3E_TEE_URL and the network between worker and service",
        ) from None
    if resp.status_code in (401, 403):
        raise AuthenticationError(
            f"the service at {server} refused the worker's token (HTTP {resp.status_code})",
            hint="set R3E_TEE_TOKEN to a token of this service with the enclave scope",
        )


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.server:
            raise R3ETeeError("no service URL", hint="pass --server or set R3E_TEE_URL")
        from r3e_tee.cli.client import checked_server, checked_token

        args.server = checked_server(args.server)
        # httpx's error for a malformed header value repeats it: the token would be logged
        args.token = checked_token(args.token)
        if not args.token:
            raise R3ETeeError("no token", hint="set R3E_TEE_TOKEN to a token with enclave scope")
        config = load_config(args.config or None).config
        configure_logging(config.server.log_level)
        from r3e_tee.service.__main__ import prepare_data_dir

        prepare_data_dir(Path(args.data_dir))  # local problems first, then the network
        preflight(args.server, args.token, args.id)
        worker = WorkerProcess(args, config)
    except R3ETeeError as exc:
        print(f"r3e-tee-worker: {exc}", file=sys.stderr)
        return exc.exit_code
    import uvicorn

    from r3e_tee.service.__main__ import _GracefulServer

    server = _GracefulServer(
        uvicorn.Config(
            create_worker_app(worker), host=args.host, port=args.port, log_config=None, access_log=False
        )
    )
    server.run()
    return 0 if server.started else 1
