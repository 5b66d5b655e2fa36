"""Where the layers above the foundation plug into the service.

Each layer (attestation, enclaves, keys, functions) adds its routers, readiness probes,
startup/shutdown steps and metrics here, so the app factory stays ignorant of them.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from r3e_tee.attestation.nonces import NonceStore
from r3e_tee.attestation.policy import Policy
from r3e_tee.attestation.service import AttestationService
from r3e_tee.attestation.tokens import PrivateKey, TokenIssuer, generate_key_file, load_private_key
from r3e_tee.attestation.verify import Verifier
from r3e_tee.config import TeeConfig
from r3e_tee.errors import KeyManagementError
from r3e_tee.providers.base import Provider
from r3e_tee.providers.hardware import probe_provider
from r3e_tee.service.app import ServiceContext

log = logging.getLogger("r3e_tee.service")

DEFAULT_KEY_DIR = Path("/etc/r3e-tee/keys")


def token_signing_keys(config: TeeConfig, data_dir: Path) -> dict[str, PrivateKey]:
    """One key per enabled provider: its keyFile, else the Secret's default path, else (dev and
    simulation only) a key generated once into the data directory."""
    keys: dict[str, PrivateKey] = {}
    for p in config.providers:
        if not p.enabled:
            continue
        path = p.attestation.key_file
        what = f"attestation key of provider {p.name}"
        if path is None and (DEFAULT_KEY_DIR / f"{p.name}-key.pem").exists():
            path = DEFAULT_KEY_DIR / f"{p.name}-key.pem"
        if path is not None:
            keys[p.name] = load_private_key(Path(path), what=what)
            continue
        if config.server.dev or p.name == "simulation":
            generated = data_dir / "keys" / f"{p.name}-key.pem"
            keys[p.name] = (
                load_private_key(generated, what=what) if generated.exists() else generate_key_file(generated)
            )
            continue
        raise KeyManagementError(
            f"no {what}: set providers[].attestation.keyFile",
            hint=f"mount the Secret tee-attestation-keys ({p.name}-key.pem) at {DEFAULT_KEY_DIR}",
        )
    return keys


def base_policy(config: TeeConfig) -> Policy:
    """The policy file (or the strict default) with the configuration's explicit UNSAFE
    switches (allow_simulation, allow_debug). Freshness comes from the single-use nonce."""
    policy = Policy.from_file(config.attestation.policy_file) if config.attestation.policy_file else Policy()
    updates: dict[str, Any] = {}
    if config.attestation.allow_simulation:
        updates["allow_simulation"] = True
    if config.attestation.allow_debug:
        updates["allow_debug"] = True
    return dataclasses.replace(policy, **updates)


def build_providers(config: TeeConfig, data_dir: Path) -> dict[str, Provider]:
    """The providers the embedded worker runs: enabled and able to run on this host."""
    providers: dict[str, Provider] = {}
    for name in config.enabled_providers:
        if name == "simulation":
            from r3e_tee.providers.simulation import SimulationProvider

            sim = config.simulation
            providers[name] = SimulationProvider(
                data_dir,
                capacity_bytes=sim.capacity,
                max_enclaves=config.workers.max_enclaves,
                cpu_seconds=sim.cpu_seconds,
                use_bubblewrap=sim.use_bubblewrap,
                use_seccomp=sim.use_seccomp,
            )
            continue
        probe = probe_provider(name)
        if not probe.available:
            log.warning(
                "provider not started on this host", extra={"provider": name, "why": probe.explanation()}
            )
            continue
        providers[name] = _hardware_provider(name, config, data_dir)
    return providers


def _hardware_provider(name: str, config: TeeConfig, data_dir: Path) -> Provider:
    if name == "sgx":
        from r3e_tee.providers.sgx import SgxProvider

        return SgxProvider.from_config(config, data_dir)
    from r3e_tee.providers.nitro import NitroProvider

    return NitroProvider.from_config(config, data_dir)


def hardware_collateral(config: TeeConfig, store: Any) -> Any:
    """Where DCAP collateral for hardware quotes comes from: the configured offline bundle, else
    the PCCS (or Intel PCS) with a cache in the store shared by every replica."""
    from r3e_tee.attestation.collateral import PcsClient, load_collateral
    from r3e_tee.store.cache import StoreCache

    coll = config.attestation.collateral
    if coll.offline_bundle is not None:
        bundle = load_collateral(coll.offline_bundle)
        return lambda _kind, _quote: bundle
    client = PcsClient(
        coll.pccs_url or coll.pcs_url,
        api_key=coll.api_key.get_secret_value() if coll.api_key else None,
        connect_timeout=coll.timeout,
        read_timeout=coll.timeout,
        cache=StoreCache(store, namespace="dcap-collateral") if store is not None else None,
    )
    return lambda _kind, quote: client.get_collateral_for_quote(quote)


def build_verifiers(
    config: TeeConfig, providers: Mapping[str, Provider], store: Any = None
) -> dict[str, Verifier]:
    # pinned Intel / AWS roots; collateral from the offline bundle or PCS/PCCS
    hardware = Verifier(collateral_provider=hardware_collateral(config, store))
    verifiers: dict[str, Verifier] = {"sgx": hardware, "nitro": hardware}
    sim = providers.get("simulation")
    if sim is not None:
        roots = sim.verification_roots()
        verifiers["simulation"] = Verifier(
            trust_roots={kind: _simulated_anchor(root) for kind, root in roots["trust_roots"].items()},
            collateral_provider=roots["collateral"],
        )
    return verifiers


def _simulated_anchor(root: Any) -> Any:
    from r3e_tee.attestation.pinned_roots_nitro_ias import TrustAnchor

    return TrustAnchor.load(root, simulated=True, name="R3E simulated root")


def install_components(ctx: ServiceContext) -> None:
    from r3e_tee.service.enclaves import EnclaveRegistry, StoreSink
    from r3e_tee.service.workers import LocalWorker, WorkerDirectory
    from r3e_tee.worker.local import LocalAttestation
    from r3e_tee.worker.manager import EnclaveManager

    ctx.components.setdefault("routers", [])
    ctx.components.setdefault("readiness", {})
    ctx.components.setdefault("metrics_refresh", [])
    ctx.components.setdefault("startup", [])
    ctx.components.setdefault("shutdown", [])
    config = ctx.config

    providers = build_providers(config, ctx.data_dir) if config.workers.embedded else {}
    issuer = TokenIssuer(
        token_signing_keys(config, ctx.data_dir),
        issuer=config.attestation.issuer,
        ttl=config.attestation.token_ttl,
    )
    attestation = AttestationService(
        ctx.store,
        issuer,
        NonceStore(ctx.store, ttl=config.attestation.nonce_ttl),
        policy=base_policy(config),
        verifiers=build_verifiers(config, providers, ctx.store),
    )
    directory = WorkerDirectory(ctx.store, heartbeat_timeout=config.workers.heartbeat_timeout)
    attestation.simulation_verifier = directory.simulation_verifier
    ctx.components["attestation"] = attestation

    manager = None
    if providers:
        import socket

        manager = EnclaveManager(
            f"embedded-{socket.gethostname()}",
            providers,
            LocalAttestation(attestation),
            StoreSink(ctx.store),
            heartbeat_interval=config.workers.heartbeat_interval,
        )
        ctx.components["startup"].append(manager.start)
        ctx.components["shutdown"].append(manager.stop)
    registry = EnclaveRegistry(
        config,
        ctx.store,
        LocalWorker(manager) if manager is not None else None,
        directory,
        on_destroy=attestation.revoke_enclave,
    )
    ctx.components["enclaves"] = registry
    ctx.components["manager"] = manager
    ctx.components["workers"] = directory
    reaper = _Periodic(config.workers.heartbeat_timeout, lambda: _reap(directory, attestation))
    ctx.components["startup"].append(reaper.start)
    ctx.components["shutdown"].append(reaper.stop)

    def routes(app: FastAPI) -> None:
        from r3e_tee.service.routes import attestation as attestation_routes
        from r3e_tee.service.routes import enclaves as enclave_routes
        from r3e_tee.service.routes import workers as worker_routes

        app.include_router(attestation_routes.router)
        app.include_router(enclave_routes.router)
        app.include_router(worker_routes.router)

    ctx.components["routers"].append(routes)
    for installer in COMPONENT_INSTALLERS:
        module, _, name = installer.partition(":")
        getattr(importlib.import_module(module), name)(ctx)


def _reap(directory: Any, attestation: AttestationService) -> None:
    for enclave_id in directory.reap():
        attestation.revoke_enclave(enclave_id)
        log.warning("enclave lost with its worker", extra={"enclave_id": enclave_id})


class _Periodic:
    """Run a blocking job every ``interval`` seconds off the event loop."""

    def __init__(self, interval: float, job: Any) -> None:
        self.interval = interval
        self.job = job
        self._task: Any = None

    async def start(self) -> None:
        import asyncio

        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        import asyncio

        import anyio

        from r3e_tee.errors import R3ETeeError

        while True:
            await asyncio.sleep(self.interval)
            try:
                await anyio.to_thread.run_sync(self.job)
            except R3ETeeError as exc:
                log.warning("periodic job failed", extra={"error": exc.message})

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


# Layers above attestation and enclaves (key management, functions) plug in here, in order.
COMPONENT_INSTALLERS: list[str] = ["r3e_tee.keys.service:install", "r3e_tee.functions.service:install"]
