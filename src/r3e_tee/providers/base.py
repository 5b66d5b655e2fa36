"""The provider interface: what the worker needs from every kind of enclave host."""

from __future__ import annotations

import abc
import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from r3e_tee.providers.hardware import ProviderProbe
from r3e_tee.runtime.channel import Channel

EVIDENCE_FORMATS = ("sgx-dcap", "nitro")
_SPEC_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


@dataclass(frozen=True)
class EnclaveSpec:
    id: str
    size_bytes: int
    debug: bool = False
    evidence_format: str = "sgx-dcap"
    cpu_seconds: int | None = None
    # what the enclave is for (a function's code and configuration); part of the measurement
    payload: dict[str, Any] = field(default_factory=dict)


#: no enclave is larger (256 TiB, far past any machine's enclave memory); bounds client-given
#: sizes below what the store's 64-bit integers hold
MAX_ENCLAVE_BYTES = 2**48


@dataclass(frozen=True)
class Capacity:
    total_bytes: int
    used_bytes: int
    running: int
    max_enclaves: int

    @property
    def free_bytes(self) -> int:
        return max(0, self.total_bytes - self.used_bytes)

    def to_dict(self) -> dict[str, int]:
        return {
            "total_bytes": self.total_bytes,
            "used_bytes": self.used_bytes,
            "free_bytes": self.free_bytes,
            "running": self.running,
            "max_enclaves": self.max_enclaves,
        }


@dataclass
class EnclaveHandle:
    """A running enclave as its host sees it."""

    spec: EnclaveSpec
    provider: str
    pid: int | None
    channel: Channel
    measurement: str
    started_at: float = field(default_factory=time.time)
    exit_status: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    on_exit: list[Callable[[EnclaveHandle], Awaitable[None] | None]] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return not self.exited.is_set() and self.channel.is_open


class Provider(abc.ABC):
    """Hosts enclaves of one kind. All methods are safe to call from the worker's event loop.

    Capacity is reserved synchronously when a create is accepted, so two concurrent creates
    cannot both take the last free memory.
    """

    name: str
    max_enclaves: int = 256

    def __init__(self) -> None:
        self._reserved: dict[str, int] = {}

    @abc.abstractmethod
    def probe(self) -> ProviderProbe:
        """Can this host run the provider? (the doctor's findings)"""

    @abc.abstractmethod
    def total_bytes(self) -> int:
        """Memory this provider may hand out to enclaves (EPC, allocator pool, configured)."""

    def capacity(self) -> Capacity:
        return Capacity(
            self.total_bytes(), sum(self._reserved.values()), len(self._reserved), self.max_enclaves
        )

    def reserve(self, spec: EnclaveSpec) -> None:
        """Check and take capacity for ``spec``; raises CapacityError with both numbers."""
        self.check_capacity(self.capacity(), spec.size_bytes)
        self._reserved[spec.id] = spec.size_bytes

    def release(self, enclave_id: str) -> None:
        self._reserved.pop(enclave_id, None)

    @abc.abstractmethod
    async def create(self, spec: EnclaveSpec) -> EnclaveHandle:
        """Launch an enclave; returns once its runtime answers on the channel."""

    @abc.abstractmethod
    async def destroy(self, handle: EnclaveHandle) -> None:
        """Stop an enclave (asking its runtime to zeroize first) and release its capacity."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare long-lived resources (fork servers, device handles)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release them; running enclaves are destroyed."""

    def verification_roots(self) -> dict[str, Any]:
        """Extra trust anchors and collateral for evidence this provider makes (simulation only)."""
        return {}

    @staticmethod
    def check_capacity(cap: Capacity, size: int) -> None:
        from r3e_tee.errors import CapacityError

        if cap.running >= cap.max_enclaves:
            raise CapacityError(
                f"already {cap.running} enclaves, the maximum is {cap.max_enclaves}",
                hint="destroy idle enclaves or raise workers.max_enclaves",
            )
        if size > cap.free_bytes:
            raise CapacityError(
                f"requested {_mib(size)} but only {_mib(cap.free_bytes)} of {_mib(cap.total_bytes)} is free",
                hint="ask for less, destroy enclaves, or add capacity",
            )


def check_spec(spec: EnclaveSpec) -> None:
    """Refuse a spec a hardware provider must not act on.

    Its id becomes a directory that is later removed (SGX) and an enclave name (Nitro), so it
    must be one plain path component; a size or CPU budget that is not a positive integer would
    free capacity on reserve or silently drop the RLIMIT_CPU.
    """
    from r3e_tee.errors import ProviderError

    if not isinstance(spec.id, str) or not _SPEC_ID_RE.match(spec.id):
        raise ProviderError(
            f"enclave id {spec.id!r} is not 1-128 letters, digits, '_' or '-' (starting with a letter "
            "or digit)",
            hint="enclave ids come from the service (a UUID); check what sent this request",
        )
    if isinstance(spec.size_bytes, bool) or not isinstance(spec.size_bytes, int) or spec.size_bytes <= 0:
        raise ProviderError(f"enclave {spec.id}: size {spec.size_bytes!r} is not a positive number of bytes")
    cpu = spec.cpu_seconds
    if cpu is not None and (isinstance(cpu, bool) or not isinstance(cpu, int) or cpu <= 0):
        raise ProviderError(f"enclave {spec.id}: cpu_seconds {cpu!r} is not a positive integer")


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MiB"
