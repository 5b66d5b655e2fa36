"""The Nitro provider: each enclave is an AWS Nitro Enclave booted from the R3E runtime's EIF.

``nitro-cli run-enclave --eif-path P --memory MiB --cpu-count N --enclave-cid C --enclave-name
r3e-<id> [--debug-mode]`` starts it; its runtime (``python -m r3e_tee.runtime.enclave --vsock-port
5005``, deploy/nitro/enclave.Dockerfile) listens on AF_VSOCK and the provider connects to
(CID, port), retrying while the enclave boots. Evidence is made inside from the NSM (``/dev/nsm``,
runtime/nsm.py). ``nitro-cli describe-enclaves`` is the source of truth for what runs: a monitor
polls it (and checks at once when a channel drops) and reports enclaves that vanished through
their handles; ``terminate-enclave`` stops one. Enclaves named with this provider's prefix that a
previous worker left behind are terminated at start.

Memory and CPUs come from the Nitro allocator configuration (``/etc/nitro_enclaves/allocator.yaml``,
``memory_mib`` and ``cpu_count``/``cpu_pool``): enclave sizes are rounded up to whole MiB, at least
64 MiB (the Nitro minimum), and each enclave takes ``cpu_count`` CPUs of the pool. The measurement
is the EIF's PCR0 (from ``nitro-cli build-enclave``'s measurements JSON, or ``describe-eif``).

Provider options (``providers[].options`` of tee-config.yaml, all optional):

``eif_path`` (``/opt/r3e-tee/nitro/r3e-tee-runtime.eif``)
    The enclave image (deploy/nitro/build-eif.sh).
``measurements``
    The measurements JSON written next to it by build-eif.sh. Default: ``measurements.json``
    beside the EIF when present, else ``nitro-cli describe-eif`` is asked. build-eif.sh also
    records there the key broker the image pins (``BrokerKey``): an enclave for a service whose
    broker is another is refused at once, rather than when its first secret does not open.
``nitro_cli`` (``nitro-cli``)
    The tool, a name on PATH or a path.
``cpu_count`` (2)
    vCPUs per enclave (whole cores: even on hyper-threaded instances).
``allocator`` (``/etc/nitro_enclaves/allocator.yaml``), ``memory_mib``, ``pool_cpus``
    Where the pool is read from; ``memory_mib`` and ``pool_cpus`` override it.
``vsock_port`` (5005)
    The port the enclave runtime listens on (must match the EIF's entrypoint).
``cid_base`` (16)
    Enclave CIDs are the lowest free ones from here.
``connect_timeout`` (``60s``), ``command_timeout`` (``2m``), ``poll_interval`` (``5s``)
    Boot deadline, nitro-cli deadline, describe-enclaves period.
``enclave_name_prefix`` (``r3e-``), ``terminate_orphans`` (true)
    How this provider's enclaves are named, and whether ones left by a previous worker are
    terminated at start.
``host_root`` (``/``)
    Root of the filesystem the hardware probe reads (tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r3e_tee.errors import CapacityError, ConfigError, EnclaveError, ProviderError, ProviderUnavailableError
from r3e_tee.providers.base import EnclaveHandle, EnclaveSpec, Provider, check_spec
from r3e_tee.providers.hardware import ProviderProbe, probe_nitro
from r3e_tee.providers.nitro_allocator import read_allocator
from r3e_tee.providers.sgx import ProviderOptions, call_on_exit, run_tool
from r3e_tee.runtime.channel import Channel
from r3e_tee.runtime.enclave import DEFAULT_VSOCK_PORT
from r3e_tee.runtime.secrets import UNSAFE_UNPINNED

if TYPE_CHECKING:
    from r3e_tee.config import TeeConfig

log = logging.getLogger("r3e_tee.providers.nitro")

MIB = 1024 * 1024
NITRO_MIN_MIB = 64
DEFAULT_EIF = Path("/opt/r3e-tee/nitro/r3e-tee-runtime.eif")
DEFAULT_ALLOCATOR = Path("/etc/nitro_enclaves/allocator.yaml")
_PCR_RE = re.compile(r"^[0-9a-fA-F]{96}$")
VSOCK_MAX = 0xFFFFFFFE  # vsock ports and CIDs are 32 bits; 0xFFFFFFFF means "any"
_ENCLAVE_ID_RE = re.compile(r"^i-[0-9A-Za-z-]{1,120}$")  # i-<instance>-enc<id>

VsockConnect = Callable[[int, int], socket.socket]
"""Open a connected stream to (CID, port); raise OSError while nobody listens there yet."""


def vsock_connect(cid: int, port: int, timeout: float = 2.0) -> socket.socket:
    """The real connector: AF_VSOCK to the enclave."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise ProviderUnavailableError(
            "this Python has no AF_VSOCK support",
            hint="run the worker on Linux with a Python built with vsock",
        )
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((cid, port))
        sock.settimeout(None)
    except OSError:
        sock.close()
        raise
    return sock


def nitro_memory_mib(size_bytes: int) -> int:
    """``--memory`` for a requested size: whole MiB, rounded up, at least the Nitro minimum."""
    return max(NITRO_MIN_MIB, -(-size_bytes // MIB))


def parse_cli_json(text: str, what: str) -> Any:
    """The JSON document in nitro-cli's output (it may print progress lines before it)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"(?m)^\s*[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, match.end() - 1)
        except json.JSONDecodeError:
            continue
        return value
    raise ProviderError(f"{what} printed no JSON: {text.strip()[-300:] or '(nothing)'}")


def pcr0_from_measurements(data: Any, source: str) -> str:
    """PCR0 (hex, lower case) from build-enclave's or describe-eif's ``Measurements``."""
    measurements = data.get("Measurements") if isinstance(data, dict) else None
    pcr0 = measurements.get("PCR0") if isinstance(measurements, dict) else None
    if not isinstance(pcr0, str) or not _PCR_RE.match(pcr0):
        raise ProviderError(
            f"{source} has no Measurements.PCR0 of 48 hex bytes",
            hint="rebuild the EIF with deploy/nitro/build-eif.sh (it writes measurements.json)",
        )
    return pcr0.lower()


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class _NitroEnclave:
    spec: EnclaveSpec
    name: str
    enclave_id: str
    cid: int
    process_id: int | None
    handle: EnclaveHandle | None = None
    watcher: asyncio.Task[None] | None = None
    destroying: bool = False


NITRO_OPTIONS = (
    "eif_path",
    "measurements",
    "nitro_cli",
    "cpu_count",
    "allocator",
    "memory_mib",
    "pool_cpus",
    "vsock_port",
    "cid_base",
    "connect_timeout",
    "command_timeout",
    "poll_interval",
    "enclave_name_prefix",
    "terminate_orphans",
    "host_root",
    "unsafe_allow_unpinned_image",
)


class NitroProvider(Provider):
    name = "nitro"

    def __init__(
        self,
        *,
        eif_path: Path = DEFAULT_EIF,
        measurements: Path | None = None,
        nitro_cli: str = "nitro-cli",
        cpu_count: int = 2,
        allocator: Path | None = None,
        memory_mib: int | None = None,
        pool_cpus: int | None = None,
        vsock_port: int = DEFAULT_VSOCK_PORT,
        cid_base: int = 16,
        connect_timeout: float = 60.0,
        command_timeout: float = 120.0,
        poll_interval: float = 5.0,
        enclave_name_prefix: str = "r3e-",
        terminate_orphans: bool = True,
        host_root: Path = Path("/"),
        max_enclaves: int = 256,
        unsafe_allow_unpinned_image: bool = False,
        connect: VsockConnect | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        for option, value, low, high in (
            ("vsock_port", vsock_port, 1, VSOCK_MAX),
            ("cid_base", cid_base, 4, VSOCK_MAX),
            ("cpu_count", cpu_count, 1, 4096),
        ):
            # Python truncates AF_VSOCK ports and CIDs to 32 bits: 2**32 + 16 would reach CID 16
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(
                    f"expected an integer from {low} to {high}, got {value!r}",
                    key_path=f"providers[nitro].options.{option}",
                )
        self.eif_path = eif_path
        default_measurements = eif_path.with_name("measurements.json")
        self.measurements = measurements or (default_measurements if default_measurements.is_file() else None)
        self.nitro_cli = nitro_cli
        self.cpu_count = cpu_count
        self.vsock_port = vsock_port
        self.cid_base = cid_base
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.poll_interval = poll_interval
        self.name_prefix = enclave_name_prefix
        self.terminate_orphans = terminate_orphans
        self.host_root = host_root
        self.max_enclaves = max_enclaves
        self.unsafe_allow_unpinned_image = unsafe_allow_unpinned_image
        self._connect_fn: VsockConnect = connect or vsock_connect
        self._env = dict(env if env is not None else os.environ)
        self.allocator = allocator or host_root / str(DEFAULT_ALLOCATOR).lstrip("/")
        pool_mib, cpus = memory_mib, pool_cpus
        if pool_mib is None or cpus is None:
            try:
                alloc_mib, alloc_cpus = read_allocator(self.allocator)
            except (OSError, ValueError) as exc:
                raise ProviderError(
                    f"cannot read the Nitro allocator configuration {self.allocator}: {exc}",
                    hint="set memory_mib and cpu_count there (and restart nitro-enclaves-allocator), or "
                    "set providers[nitro].options.memory_mib and pool_cpus",
                ) from None
            pool_mib = pool_mib if pool_mib is not None else alloc_mib
            cpus = cpus if cpus is not None else alloc_cpus
        if cpu_count > cpus:
            raise ProviderError(
                f"each enclave takes cpu_count={cpu_count} CPUs but the allocator pool has only {cpus}",
                hint="lower providers[nitro].options.cpu_count or give the allocator more CPUs",
            )
        self.pool_mib = pool_mib
        self.pool_cpus = cpus
        self._enclaves: dict[str, _NitroEnclave] = {}
        self._pending_cids: set[int] = set()
        self._pcr0: tuple[tuple[float, int, str], str] | None = None
        self._broker_key: str | None = None  # what the EIF pins, when its measurements file says
        self._poke = asyncio.Event()
        self._monitor_task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: TeeConfig, data_dir: Path) -> NitroProvider:
        """``data_dir`` is not used: nitro-cli keeps the state of running enclaves."""
        entry = config.provider("nitro")
        opts = ProviderOptions("nitro", entry.options if entry else {}, NITRO_OPTIONS)
        given = opts.options
        memory_mib = opts.integer("memory_mib", 0, minimum=NITRO_MIN_MIB) if "memory_mib" in given else None
        pool_cpus = opts.integer("pool_cpus", 0, minimum=1) if "pool_cpus" in given else None
        return cls(
            eif_path=opts.path("eif_path", DEFAULT_EIF) or DEFAULT_EIF,
            measurements=opts.path("measurements", None),
            nitro_cli=opts.string("nitro_cli", "nitro-cli"),
            cpu_count=opts.integer("cpu_count", 2, minimum=1),
            allocator=opts.path("allocator", None),
            memory_mib=memory_mib,
            pool_cpus=pool_cpus,
            vsock_port=opts.integer("vsock_port", DEFAULT_VSOCK_PORT, minimum=1, maximum=VSOCK_MAX),
            cid_base=opts.integer("cid_base", 16, minimum=4, maximum=VSOCK_MAX),
            connect_timeout=opts.seconds("connect_timeout", 60.0),
            command_timeout=opts.seconds("command_timeout", 120.0),
            poll_interval=opts.seconds("poll_interval", 5.0),
            enclave_name_prefix=opts.string("enclave_name_prefix", "r3e-"),
            terminate_orphans=opts.boolean("terminate_orphans", True),
            host_root=opts.path("host_root", Path("/")) or Path("/"),
            max_enclaves=config.workers.max_enclaves,
            unsafe_allow_unpinned_image=opts.boolean("unsafe_allow_unpinned_image", False),
        )

    # -- capacity ------------------------------------------------------------------------------

    def probe(self) -> ProviderProbe:
        path = self._env.get("PATH")

        def which(name: str) -> str | None:
            return shutil.which(self.nitro_cli if name == "nitro-cli" else name, path=path)

        return probe_nitro(self.host_root, which)

    def total_bytes(self) -> int:
        return self.pool_mib * MIB

    def reserve(self, spec: EnclaveSpec) -> None:
        """Take whole MiB of the allocator pool and ``cpu_count`` of its CPUs, or refuse with both
        numbers."""
        check_spec(spec)
        cap = self.capacity()
        self.check_capacity(cap, 0)
        cpus_used = cap.running * self.cpu_count
        if cpus_used + self.cpu_count > self.pool_cpus:
            raise CapacityError(
                f"not enough enclave CPUs: {cap.running} enclaves hold {cpus_used} of the "
                f"{self.pool_cpus} CPUs of the Nitro allocator pool and each takes {self.cpu_count}",
                hint="destroy Nitro enclaves, or give the allocator more CPUs (cpu_count in "
                "allocator.yaml, then restart nitro-enclaves-allocator)",
            )
        mib = nitro_memory_mib(spec.size_bytes)
        if mib * MIB > cap.free_bytes:
            why = "" if mib * MIB == spec.size_bytes else f" (requested {spec.size_bytes / MIB:.1f} MiB)"
            raise CapacityError(
                f"not enough enclave memory: the enclave needs {mib} MiB{why} but only "
                f"{cap.free_bytes // MIB} of {cap.total_bytes // MIB} MiB of the Nitro allocator pool "
                "is free",
                hint="ask for a smaller --size, destroy Nitro enclaves, or raise memory_mib in "
                "allocator.yaml (then restart nitro-enclaves-allocator)",
            )
        self._reserved[spec.id] = mib * MIB

    # -- nitro-cli -----------------------------------------------------------------------------

    async def _cli(self, *args: str) -> str:
        return await run_tool(
            [self.nitro_cli, *args],
            what=f"nitro-cli {args[0]}",
            timeout=self.command_timeout,
            env=self._env,
            missing_hint="install aws-nitro-enclaves-cli in the worker image, or set "
            "providers[nitro].options.nitro_cli",
        )

    async def describe(self) -> list[dict[str, Any]]:
        """``nitro-cli describe-enclaves``: every enclave on this instance."""
        value = parse_cli_json(await self._cli("describe-enclaves"), "nitro-cli describe-enclaves")
        if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
            raise ProviderError("nitro-cli describe-enclaves did not print a list of enclaves")
        return value

    async def measurement(self) -> str:
        """PCR0 of the EIF (re-read when the EIF changes)."""
        try:
            st = self.eif_path.stat()
        except OSError as exc:
            raise ProviderUnavailableError(
                f"the enclave image {self.eif_path} is not readable: {exc.strerror}",
                hint="build it with deploy/nitro/build-eif.sh (the nitro image ships it), or set "
                "providers[nitro].options.eif_path",
            ) from None
        key = (st.st_mtime, st.st_size, str(self.measurements))
        if self._pcr0 is not None and self._pcr0[0] == key:
            return self._pcr0[1]
        if self.measurements is not None:
            try:
                data = json.loads(self.measurements.read_text())
            except (OSError, ValueError) as exc:
                raise ProviderError(
                    f"cannot read the EIF measurements {self.measurements}: {exc}",
                    hint="rebuild with deploy/nitro/build-eif.sh or drop the measurements option",
                ) from None
            pcr0 = pcr0_from_measurements(data, str(self.measurements))
            broker_key = data.get("BrokerKey") if isinstance(data, dict) else None
            self._broker_key = broker_key if isinstance(broker_key, str) else None
        else:
            out = await self._cli("describe-eif", "--eif-path", str(self.eif_path))
            pcr0 = pcr0_from_measurements(parse_cli_json(out, "nitro-cli describe-eif"), "describe-eif")
        self._pcr0 = (key, pcr0)
        return pcr0

    async def _terminate(self, record: _NitroEnclave) -> None:
        try:
            await self._cli("terminate-enclave", "--enclave-id", record.enclave_id)
        except ProviderError:
            # already gone is fine; still running is not
            if any(e.get("EnclaveID") == record.enclave_id for e in await self.describe()):
                raise

    # -- lifecycle -----------------------------------------------------------------------------

    def _ensure_monitor(self) -> None:
        if self._monitor_task is None or self._monitor_task.done():
            self._poke = asyncio.Event()
            self._monitor_task = asyncio.get_running_loop().create_task(self._monitor(), name="nitro-monitor")

    async def start(self) -> None:
        self._ensure_monitor()
        if not self.terminate_orphans:
            return
        try:
            described = await self.describe()
        except ProviderError as exc:
            log.warning("could not list Nitro enclaves at start", extra={"why": exc.message})
            return
        ours = {r.enclave_id for r in self._enclaves.values()}
        for entry in described:
            name, enclave_id = entry.get("EnclaveName"), entry.get("EnclaveID")
            if not isinstance(name, str) or not name.startswith(self.name_prefix) or enclave_id in ours:
                continue
            try:
                await self._cli("terminate-enclave", "--enclave-id", str(enclave_id))
                log.warning(
                    "terminated a Nitro enclave left by a previous worker",
                    extra={"enclave_name": name, "nitro_enclave_id": enclave_id},
                )
            except ProviderError as exc:
                log.warning("could not terminate an orphaned Nitro enclave", extra={"why": exc.message})

    async def stop(self) -> None:
        for record in list(self._enclaves.values()):
            if record.handle is not None:
                await self.destroy(record.handle)
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task
            self._monitor_task = None

    async def _free_cid(self) -> int:
        used = {r.cid for r in self._enclaves.values()}
        with contextlib.suppress(ProviderError):
            used |= {
                int(e["EnclaveCID"]) for e in await self.describe() if isinstance(e.get("EnclaveCID"), int)
            }
        cid = next(c for c in itertools.count(self.cid_base) if c not in used and c not in self._pending_cids)
        self._pending_cids.add(cid)
        return cid

    async def create(self, spec: EnclaveSpec) -> EnclaveHandle:
        check_spec(spec)  # its id names the enclave (terminated at start when left behind)
        probe = self.probe()
        if not probe.available:
            raise ProviderUnavailableError(probe.explanation(), hint="run r3e-tee-cli doctor on this node")
        pcr0 = await self.measurement()
        wanted = spec.payload.get("broker_key")
        if isinstance(wanted, str) and self._broker_key not in (None, wanted, UNSAFE_UNPINNED):
            raise ProviderError(
                f"the enclave image {self.eif_path} pins key broker {self._broker_key}, but this "
                f"service's broker is {wanted}: its enclaves would accept no secret from it",
                hint=f"rebuild it: R3E_TEE_BROKER_KEY={wanted} deploy/nitro/build-eif.sh",
            )
        if self._broker_key == UNSAFE_UNPINNED and not self.unsafe_allow_unpinned_image:
            # such an enclave opens secrets sealed by whatever key its host names: the host could
            # plant values, or a sealing key it knows
            raise ProviderError(
                f"the enclave image {self.eif_path} was built unsafe-unpinned: its enclaves would "
                "take secrets from any key the host names",
                hint=f"rebuild it pinned: R3E_TEE_BROKER_KEY={wanted if isinstance(wanted, str) else 'KEY'} "
                "deploy/nitro/build-eif.sh (r3e-tee-cli list-keys shows the broker key); for "
                "development only, set providers[nitro].options.unsafe_allow_unpinned_image: true",
            )
        mib = nitro_memory_mib(spec.size_bytes)
        name = f"{self.name_prefix}{spec.id}"
        cid = await self._free_cid()
        try:
            argv = [
                "run-enclave",
                "--eif-path",
                str(self.eif_path),
                "--memory",
                str(mib),
                "--cpu-count",
                str(self.cpu_count),
                "--enclave-cid",
                str(cid),
                "--enclave-name",
                name,
            ]
            if spec.debug:
                argv.append("--debug-mode")
            info = parse_cli_json(await self._cli(*argv), "nitro-cli run-enclave")
        finally:
            self._pending_cids.discard(cid)
        enclave_id, got_cid, process_id = (
            info.get("EnclaveID") if isinstance(info, dict) else None,
            info.get("EnclaveCID") if isinstance(info, dict) else None,
            info.get("ProcessID") if isinstance(info, dict) else None,
        )
        if not isinstance(enclave_id, str) or not _ENCLAVE_ID_RE.match(enclave_id):
            raise ProviderError(f"nitro-cli run-enclave printed no EnclaveID of form i-...: {info!r}"[:400])
        clash = next(
            (r for r in self._enclaves.values() if r.enclave_id == enclave_id or r.cid == got_cid), None
        )
        if isinstance(got_cid, bool) or got_cid != cid or clash is not None:
            # vsock reaches whichever enclave has that CID: connecting to a CID other than the one
            # this enclave was started with could hand this spec's channel to another enclave
            what = f"nitro-cli run-enclave reported enclave {enclave_id} with CID {got_cid!r}"
            if clash is not None:
                what += f", the id or CID of running enclave {clash.name}"
            if clash is None or clash.enclave_id != enclave_id:  # never terminate another's enclave
                with contextlib.suppress(ProviderError):
                    await self._cli("terminate-enclave", "--enclave-id", enclave_id)
            raise ProviderError(
                f"{what}, but it was started with --enclave-cid {cid}; the enclave is not used",
                hint="check the nitro-cli version and that nothing else starts enclaves in this CID "
                "range (providers[nitro].options.cid_base)",
            )
        record = _NitroEnclave(
            spec=spec,
            name=name,
            enclave_id=enclave_id,
            cid=cid,
            process_id=process_id if isinstance(process_id, int) else None,
        )
        self._enclaves[spec.id] = record
        channel: Channel | None = None
        try:
            sock = await self._connect(record)
            reader, writer = await asyncio.open_connection(sock=sock)
            channel = Channel(reader, writer, name=f"nitro-{spec.id[:8]}")
            handle = EnclaveHandle(
                spec=spec, provider=self.name, pid=record.process_id, channel=channel, measurement=pcr0
            )
            record.handle = handle
            channel.start()
            await channel.request("ping", timeout=30)
        except BaseException:
            self._enclaves.pop(spec.id, None)
            if channel is not None:
                await channel.aclose()
            with contextlib.suppress(ProviderError):
                await self._terminate(record)
            raise
        self._ensure_monitor()
        record.watcher = asyncio.get_running_loop().create_task(
            self._watch_channel(record, channel), name=f"nitro-watch-{spec.id}"
        )
        log.info(
            "Nitro enclave started",
            extra={"enclave_id": spec.id, "nitro_enclave_id": enclave_id, "cid": cid, "pcr0": pcr0},
        )
        return handle

    async def _connect(self, record: _NitroEnclave) -> socket.socket:
        """Connect to the runtime on vsock, retrying while the enclave boots."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        delay, last = 0.05, "no attempt"
        while True:
            try:
                return await asyncio.to_thread(self._connect_fn, record.cid, self.vsock_port)
            except OSError as exc:
                last = exc.strerror or str(exc)
            if record.process_id is not None and not _pid_alive(record.process_id):
                raise EnclaveError(
                    f"Nitro enclave {record.enclave_id} stopped while booting (its process "
                    f"{record.process_id} exited) before its runtime listened on vsock port "
                    f"{self.vsock_port}",
                    hint="create it with --debug and read: nitro-cli console --enclave-id "
                    + record.enclave_id,
                )
            if loop.time() >= deadline:
                raise EnclaveError(
                    f"no enclave runtime answered on vsock {record.cid}:{self.vsock_port} within "
                    f"{self.connect_timeout:g} s (last error: {last})",
                    hint="the EIF's entrypoint must run python -m r3e_tee.runtime.enclave --vsock-port "
                    f"{self.vsock_port} (providers[nitro].options.vsock_port); a --debug enclave shows its "
                    "console with nitro-cli console",
                )
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    async def _watch_channel(self, record: _NitroEnclave, channel: Channel) -> None:
        await channel.closed.wait()
        if not record.destroying:
            self._poke.set()  # the monitor checks at once whether the enclave is still there

    async def _monitor(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.poll_interval)
            self._poke.clear()
            live = [r for r in self._enclaves.values() if r.handle is not None and not r.destroying]
            if not live:
                continue
            try:
                described = {e.get("EnclaveID"): e for e in await self.describe()}
            except ProviderError as exc:
                log.warning("nitro-cli describe-enclaves failed", extra={"why": exc.message})
                continue
            for record in live:
                if record.destroying or record.handle is None:
                    continue
                entry = described.get(record.enclave_id)
                state = str(entry.get("State", "")).upper() if entry else ""
                if entry is None:
                    reason = "it is no longer listed by nitro-cli describe-enclaves"
                elif state != "RUNNING":
                    reason = f"nitro-cli describe-enclaves reports it {state or 'without a state'}"
                elif not record.handle.channel.is_open:
                    reason = "its runtime closed the channel while the enclave kept running"
                else:
                    continue
                await self._lost(record, reason, still_listed=entry is not None)

    async def _lost(self, record: _NitroEnclave, reason: str, *, still_listed: bool) -> None:
        """An enclave ended without destroy: terminate what is left, then tell its observers."""
        handle = record.handle
        if handle is None or self._enclaves.get(record.spec.id) is not record:
            return
        self._enclaves.pop(record.spec.id, None)
        record.destroying = True
        if still_listed:
            with contextlib.suppress(ProviderError):
                await self._terminate(record)
        await handle.channel.aclose()
        log.warning(
            "Nitro enclave ended unexpectedly",
            extra={"enclave_id": record.spec.id, "nitro_enclave_id": record.enclave_id, "why": reason},
        )
        # nitro-cli does not report an exit status: exit_status stays None
        await call_on_exit(handle, log)

    async def destroy(self, handle: EnclaveHandle) -> None:
        record = self._enclaves.pop(handle.spec.id, None)
        if record is not None:
            record.destroying = True  # its end is expected now, not a failure
        if handle.channel.is_open:
            with contextlib.suppress(EnclaveError):
                await handle.channel.request("shutdown", timeout=2)
        await handle.channel.aclose()
        if record is not None:
            if record.watcher is not None and record.watcher is not asyncio.current_task():
                record.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await record.watcher
            await self._terminate(record)
        handle.exited.set()

    def running(self) -> dict[str, str]:
        """Enclave id -> Nitro enclave id of the enclaves this provider runs."""
        return {eid: r.enclave_id for eid, r in self._enclaves.items() if r.handle is not None}


__all__ = [
    "NITRO_MIN_MIB",
    "NitroProvider",
    "VsockConnect",
    "nitro_memory_mib",
    "parse_cli_json",
    "pcr0_from_measurements",
    "vsock_connect",
]
