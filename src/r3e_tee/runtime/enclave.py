"""The enclave runtime: the code that runs inside each enclave.

Boot makes fresh keys; ``attest`` binds the verifier's nonce and those keys into evidence; the
host then hands over the attestation token (and later secrets sealed to the attested key and
functions to run). ``shutdown`` zeroizes the keys before the process exits.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from r3e_tee.errors import EnclaveError
from r3e_tee.runtime.channel import Channel
from r3e_tee.runtime.devices import AttestationDevice, GramineAttestationDevice, HostQuotingDevice
from r3e_tee.runtime.keys import EnclaveKeys

DeviceFactory = Callable[[Channel], AttestationDevice]


class EnclaveRuntime:
    def __init__(self, channel: Channel, device: AttestationDevice) -> None:
        self.channel = channel
        self.device = device
        self.keys = EnclaveKeys()
        self.started = time.monotonic()
        self.token: str | None = None
        self.attestation_id: str | None = None
        self.token_expires_at: float | None = None
        self.stopping = asyncio.Event()
        channel.handlers.update(
            {
                "attest": self.op_attest,
                "set_token": self.op_set_token,
                "ping": self.op_ping,
                "shutdown": self.op_shutdown,
            }
        )

    async def op_attest(self, msg: dict[str, Any]) -> dict[str, Any]:
        nonce = msg.get("nonce")
        if not isinstance(nonce, bytes) or not 16 <= len(nonce) <= 64:
            raise EnclaveError("attest needs a nonce of 16 to 64 bytes")
        public_key = self.keys.x25519_public + self.keys.p256_public
        evidence, fmt = await self.device.evidence(
            report_data=self.keys.report_data(nonce), nonce=nonce, public_key=public_key
        )
        return {"evidence": evidence, "format": fmt, "public_keys": self.keys.public_keys()}

    async def op_set_token(self, msg: dict[str, Any]) -> dict[str, Any]:
        token, att = msg.get("token"), msg.get("attestation_id")
        if not isinstance(token, str) or not isinstance(att, str):
            raise EnclaveError("set_token needs token and attestation_id")
        self.token, self.attestation_id = token, att
        exp = msg.get("expires_at")
        self.token_expires_at = float(exp) if isinstance(exp, int | float) else None
        return {"stored": True}

    async def op_ping(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "uptime": time.monotonic() - self.started,
            "attested": self.token is not None,
            "token_expires_at": self.token_expires_at,
            "pid": os.getpid(),
        }

    async def op_shutdown(self, _: dict[str, Any]) -> dict[str, Any]:
        self.keys.zeroize()
        self.token = None
        self.stopping.set()
        return {"zeroized": True}

    async def run(self) -> None:
        """Serve until shutdown is asked or the host goes away."""
        closed = asyncio.ensure_future(self.channel.closed.wait())
        stopping = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for fut in (closed, stopping):
            fut.cancel()
        self.keys.zeroize()
        await asyncio.sleep(0)  # let the shutdown reply be written
        await self.channel.aclose()


async def serve(sock: socket.socket, device_factory: DeviceFactory) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)
    channel = Channel(reader, writer, name="host")
    runtime = EnclaveRuntime(channel, device_factory(channel))
    channel.start()
    await runtime.run()


def warm() -> None:
    """First use of OpenSSL's curves costs tens of ms; pay it once in the zygote, not per fork."""
    keys = EnclaveKeys()
    keys.sign(b"warm-up")
    keys.report_data(bytes(32))
    keys.zeroize()
    asyncio.new_event_loop().close()


def run_in_child(sock: socket.socket) -> None:
    """Entry of a simulated enclave process (forked by the zygote)."""
    asyncio.run(serve(sock, HostQuotingDevice))


def main(argv: list[str] | None = None) -> int:
    """Entry inside Gramine-SGX: ``python -m r3e_tee.runtime.enclave --fd N`` or ``--unix PATH``."""
    import argparse

    p = argparse.ArgumentParser(prog="r3e-tee-enclave", description="R3E TEE enclave runtime")
    p.add_argument("--fd", type=int, help="an inherited, connected stream socket")
    p.add_argument("--unix", help="connect to this UNIX socket")
    p.add_argument("--device", choices=["gramine", "host"], default="gramine")
    p.add_argument("--attestation-root", default="/dev/attestation")
    args = p.parse_args(argv)
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    elif args.unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.unix)
    else:
        p.error("give --fd or --unix")
    from pathlib import Path

    root = Path(args.attestation_root)
    factory: DeviceFactory = (
        (lambda _ch: GramineAttestationDevice(root)) if args.device == "gramine" else HostQuotingDevice
    )
    asyncio.run(serve(sock, factory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
