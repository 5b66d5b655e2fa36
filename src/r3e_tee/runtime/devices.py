"""Where evidence comes from inside an enclave.

- Gramine-SGX: write ``user_report_data`` then read ``quote`` under ``/dev/attestation``.
- Nitro: an Attestation request to the NSM device (``/dev/nsm``), see runtime/nsm.py.
- Simulation: the host's simulated quoting enclave, asked over the channel.
"""

from __future__ import annotations

import abc
import asyncio
from pathlib import Path
from typing import Any

from r3e_tee.errors import EnclaveError
from r3e_tee.runtime.channel import Channel


class AttestationDevice(abc.ABC):
    @abc.abstractmethod
    async def evidence(self, *, report_data: bytes, nonce: bytes, public_key: bytes) -> tuple[bytes, str]:
        """Evidence binding ``report_data`` (Nitro: also nonce and public key) and its format."""


class GramineAttestationDevice(AttestationDevice):
    """Gramine's pseudo-files: https://gramine.readthedocs.io/en/stable/attestation.html"""

    def __init__(self, root: Path = Path("/dev/attestation")) -> None:
        self.root = root
        # user_report_data and quote are one pair of files per process: one quote at a time
        self._lock = asyncio.Lock()

    async def evidence(self, *, report_data: bytes, nonce: bytes, public_key: bytes) -> tuple[bytes, str]:
        # the pseudo-files block while the quoting enclave works: keep the event loop free
        async with self._lock:
            return await asyncio.to_thread(self._quote, report_data)

    def _quote(self, report_data: bytes) -> tuple[bytes, str]:
        kind_file = self.root / "attestation_type"
        try:
            kind = kind_file.read_text().strip()
        except OSError as exc:
            raise EnclaveError(
                f"cannot read {kind_file}: {exc.strerror}; is this a Gramine-SGX enclave?"
            ) from None
        if kind != "dcap":
            raise EnclaveError(
                f"Gramine attestation type is {kind!r}; this runtime needs 'dcap'",
                hint='set sgx.remote_attestation = "dcap" in the manifest',
            )
        try:
            (self.root / "user_report_data").write_bytes(report_data.ljust(64, b"\0"))
            quote = (self.root / "quote").read_bytes()
        except OSError as exc:
            raise EnclaveError(f"Gramine quote generation failed: {exc.strerror}") from None
        return quote, "sgx-dcap"


class HostQuotingDevice(AttestationDevice):
    """Simulation: the host plays the quoting enclave and signs under its simulated roots."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def evidence(self, *, report_data: bytes, nonce: bytes, public_key: bytes) -> tuple[bytes, str]:
        reply: dict[str, Any] = await self.channel.request(
            "sim_quote", report_data=report_data, nonce=nonce, public_key=public_key, timeout=30
        )
        evidence = reply.get("evidence")
        if not isinstance(evidence, bytes):
            raise EnclaveError("host returned no simulated evidence")
        return evidence, str(reply.get("format", "sgx-dcap"))
