"""The simulation provider: real processes and real evidence formats, no TEE hardware.

Each enclave is its own sandboxed process (forked by the zygote, see runtime/zygote.py). Its
evidence is format-exact: a DCAP SGX quote under a per-installation simulated PCK chain with
matching collateral, or a Nitro COSE document under a simulated root, so the same verifier
code paths run as for hardware. The roots are generated on first start and persisted; the
verifier marks evidence chaining to them ``simulated`` and the default policy rejects it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import r3e_tee.runtime
from r3e_tee.attestation.result import EvidenceKind
from r3e_tee.errors import EnclaveError
from r3e_tee.providers.base import EnclaveHandle, EnclaveSpec, Provider
from r3e_tee.providers.hardware import ProviderProbe, probe_simulation
from r3e_tee.providers.sandbox import seccomp_supported
from r3e_tee.providers.sim_authority import SimulationAuthority
from r3e_tee.providers.zygote_client import ZygoteClient
from r3e_tee.runtime.channel import Channel, Handler

log = logging.getLogger("r3e_tee.providers.simulation")


def runtime_code_digest() -> bytes:
    """SHA-256 over the enclave runtime's source files: what a simulated enclave 'contains'."""
    root = Path(r3e_tee.runtime.__file__).parent
    files = sorted(
        [*root.glob("*.py"), Path(root.parent / "attestation" / "binding.py")], key=lambda p: p.name
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.digest()


def measurement_for(code_digest: bytes, spec: EnclaveSpec) -> tuple[bytes, bytes]:
    """(MRENCLAVE analogue, PCR0 analogue): deterministic over code and configuration."""
    config = json.dumps(
        {"size": spec.size_bytes, "payload": spec.payload}, sort_keys=True, separators=(",", ":")
    ).encode()
    return (
        hashlib.sha256(b"r3e-sim-mrenclave\0" + code_digest + config).digest(),
        hashlib.sha384(b"r3e-sim-pcr0\0" + code_digest + config).digest(),
    )


def sim_seal_key(cpu_secret: bytes, evidence_format: str, measurement: bytes, *, debug: bool) -> bytes:
    """The simulated CPU's sealing key for one enclave identity: HKDF-SHA256 over the per-installation
    CPU secret, bound to the measurement (and debug mode, as SGX binds ATTRIBUTES.DEBUG)."""
    info = b"\0".join(
        [
            b"r3e-tee/sim-seal-key/v1",
            evidence_format.encode(),
            measurement,
            b"debug" if debug else b"production",
        ]
    )
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(cpu_secret)


class SimulationProvider(Provider):
    name = "simulation"

    def __init__(
        self,
        data_dir: Path,
        *,
        capacity_bytes: int,
        max_enclaves: int = 256,
        cpu_seconds: int | None = 3600,
        use_bubblewrap: bool = True,
        use_seccomp: bool = True,
        extra_hidden: tuple[Path, ...] = (),
    ) -> None:
        super().__init__()
        self.authority = SimulationAuthority.load_or_create(data_dir / "simulation")
        self._capacity = capacity_bytes
        self.max_enclaves = max_enclaves
        self.cpu_seconds = cpu_seconds
        self.use_seccomp = use_seccomp and seccomp_supported()[0]
        self.code_digest = runtime_code_digest()
        # enclave code must never read the service's data directory or configuration
        hidden = tuple(
            str(p)
            for p in (data_dir.resolve(), Path("/etc/r3e-tee"), Path("/var/lib/r3e-tee"), *extra_hidden)
        )
        self.zygote = ZygoteClient(use_bubblewrap=use_bubblewrap, on_exit=self._child_exited, hidden=hidden)
        self._by_pid: dict[int, EnclaveHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def probe(self) -> ProviderProbe:
        return probe_simulation()

    def total_bytes(self) -> int:
        return self._capacity

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.zygote.start()

    async def stop(self) -> None:
        for handle in list(self._by_pid.values()):
            await self.destroy(handle)
        self.zygote.stop()

    def verification_roots(self) -> dict[str, Any]:
        return {
            "trust_roots": {
                EvidenceKind.SGX_DCAP: self.authority.dcap_root,
                EvidenceKind.NITRO: self.authority.nitro_root,
            },
            "collateral": lambda _kind, _evidence: self.authority.dcap_collateral(),
        }

    def host_handlers(self, spec: EnclaveSpec) -> dict[str, Handler]:
        """What the host plays for a simulated enclave: its quoting enclave (``sim_quote``) and the
        CPU's sealing-key derivation (``sim_seal_key``: EGETKEY's role, bound to the measurement)."""
        mrenclave, pcr0 = measurement_for(self.code_digest, spec)

        async def sim_quote(msg: dict[str, Any]) -> dict[str, Any]:
            report_data = msg.get("report_data")
            if not isinstance(report_data, bytes) or len(report_data) != 64:
                raise EnclaveError("sim_quote needs 64 bytes of report_data")
            if spec.evidence_format == "nitro":
                nonce, public_key = msg.get("nonce"), msg.get("public_key")
                evidence = self.authority.nitro_document(
                    pcr0=pcr0,
                    code_digest=self.code_digest,
                    debug=spec.debug,
                    user_data=report_data,
                    nonce=nonce if isinstance(nonce, bytes) else None,
                    public_key=public_key if isinstance(public_key, bytes) else None,
                    module_id=f"i-r3esim-enc{spec.id[:16]}",
                )
            else:
                evidence = self.authority.sgx_quote(
                    mrenclave=mrenclave, report_data=report_data, debug=spec.debug
                )
            return {"evidence": evidence, "format": spec.evidence_format}

        async def seal_key(_: dict[str, Any]) -> dict[str, Any]:
            measurement = pcr0 if spec.evidence_format == "nitro" else mrenclave
            return {
                "key": sim_seal_key(
                    self.authority.cpu_secret, spec.evidence_format, measurement, debug=spec.debug
                )
            }

        return {"sim_quote": sim_quote, "sim_seal_key": seal_key}

    async def create(self, spec: EnclaveSpec) -> EnclaveHandle:
        mrenclave, pcr0 = measurement_for(self.code_digest, spec)
        pid, sock = await self.zygote.spawn(
            memory=spec.size_bytes,
            cpu_seconds=spec.cpu_seconds or self.cpu_seconds,
            seccomp=self.use_seccomp,
            measured=spec.payload,
        )
        channel = await Channel.over_socket(sock, name=f"enclave-{spec.id[:8]}")
        measurement = (pcr0 if spec.evidence_format == "nitro" else mrenclave).hex()
        handle = EnclaveHandle(
            spec=spec, provider=self.name, pid=pid, channel=channel, measurement=measurement
        )
        channel.handlers.update(self.host_handlers(spec))
        channel.start()
        self._by_pid[pid] = handle
        try:
            await channel.request("ping", timeout=10)
        except EnclaveError:
            self._by_pid.pop(pid, None)
            self.zygote.kill(pid)
            raise
        return handle

    def _child_exited(self, pid: int, status: int) -> None:
        """Called from the zygote reader thread."""
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._mark_exited, pid, status)

    def _mark_exited(self, pid: int, status: int) -> None:
        handle = self._by_pid.pop(pid, None)
        if handle is None or handle.exited.is_set():
            return
        handle.exit_status = status
        handle.exited.set()
        for callback in handle.on_exit:
            result = callback(handle)
            if asyncio.iscoroutine(result):
                asyncio.ensure_future(result)

    async def destroy(self, handle: EnclaveHandle) -> None:
        # the handle leaves _by_pid first: its exit is expected, not a failure
        self._by_pid.pop(handle.pid or -1, None)
        if handle.channel.is_open:
            with contextlib.suppress(EnclaveError):
                await handle.channel.request("shutdown", timeout=2)
        await handle.channel.aclose()
        if handle.pid is not None:
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and _alive(handle.pid):
                await asyncio.sleep(0.01)
            if _alive(handle.pid):
                self.zygote.kill(handle.pid)
        handle.exited.set()

    def process_memory(self, pid: int) -> dict[str, int]:
        """RSS and PSS (proportional: shared zygote pages split among sharers) in bytes."""
        out: dict[str, int] = {}
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("Rss", "Pss", "Private_Dirty"):
                        out[key.lower()] = int(rest.split()[0]) * 1024
        except OSError:
            pass
        return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


__all__ = ["SimulationProvider", "measurement_for", "runtime_code_digest", "sim_seal_key"]
