"""The enclave runtime: the code that runs inside each enclave.

Boot makes fresh keys; ``attest`` binds the verifier's nonce and those keys into evidence; the
host then hands over the attestation token (and later secrets sealed to the attested key and
functions to run). ``shutdown`` zeroizes the keys before the process exits.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from r3e_tee.errors import EnclaveError
from r3e_tee.runtime.channel import Channel
from r3e_tee.runtime.devices import AttestationDevice, GramineAttestationDevice, HostQuotingDevice
from r3e_tee.runtime.keys import EnclaveKeys
from r3e_tee.runtime.nsm import NsmAttestationDevice, NsmTransport

DeviceFactory = Callable[[Channel], AttestationDevice]

# Modules that add operations to the runtime (secrets, functions): each has install(runtime).
# Imported here, at module import, so the zygote has them loaded before it forks.
RUNTIME_EXTENSIONS: list[str] = ["r3e_tee.runtime.secrets", "r3e_tee.runtime.functions"]
_EXTENSIONS = [importlib.import_module(name) for name in RUNTIME_EXTENSIONS]

try:  # libuv's event loop: a fraction of asyncio's cost per socket event (the invocation path)
    import uvloop

    _loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
except (ImportError, OSError):  # not installed (or not readable inside this enclave)
    _loop_factory = None


def run_loop(main: Coroutine[Any, Any, None], sock: socket.socket | None = None) -> None:
    """``asyncio.run`` on uvloop's loop when it is available (and, given the host socket, it is
    one libuv handles: UNIX or TCP; an AF_VSOCK channel stays on asyncio's loop)."""
    factory = _loop_factory
    if sock is not None and sock.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


class EnclaveRuntime:
    def __init__(
        self, channel: Channel, device: AttestationDevice, measured: dict[str, Any] | None = None
    ) -> None:
        self.channel = channel
        self.device = device
        # what the enclave was measured with (a function's code digest, runtime, limits)
        self.measured: dict[str, Any] = dict(measured or {})
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
                "get_token": self.op_get_token,
                "shutdown": self.op_shutdown,
            }
        )
        # what extensions keep (released secrets, loaded functions); cleared on shutdown
        self.state: dict[str, Any] = {}
        self.on_shutdown: list[Callable[[], None]] = []
        for extension in _EXTENSIONS:
            extension.install(self)

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

    async def op_get_token(self, _: dict[str, Any]) -> dict[str, Any]:
        """The signed attestation result this enclave holds (a statement, not a credential)."""
        return {
            "token": self.token,
            "attestation_id": self.attestation_id,
            "expires_at": self.token_expires_at,
        }

    async def op_ping(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "uptime": time.monotonic() - self.started,
            "attested": self.token is not None,
            "token_expires_at": self.token_expires_at,
            "pid": os.getpid(),
        }

    async def op_shutdown(self, _: dict[str, Any]) -> dict[str, Any]:
        for hook in self.on_shutdown:
            hook()
        self.state.clear()
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


async def serve(
    sock: socket.socket, device_factory: DeviceFactory, measured: dict[str, Any] | None = None
) -> None:
    channel = await Channel.over_socket(sock, name="host")
    runtime = EnclaveRuntime(channel, device_factory(channel), measured)
    channel.start()
    await runtime.run()


def warm() -> None:
    """First use of OpenSSL's curves costs tens of ms; pay it once in the zygote, not per fork."""
    keys = EnclaveKeys()
    keys.sign(b"warm-up")
    keys.report_data(bytes(32))
    keys.zeroize()
    asyncio.new_event_loop().close()


def run_in_child(sock: socket.socket, measured: dict[str, Any] | None = None) -> None:
    """Entry of a simulated enclave process (forked by the zygote)."""
    run_loop(serve(sock, HostQuotingDevice, measured), sock)


#: the address the runtime connects to, when no option gives one (Gramine passes it through the
#: environment so the measured manifest stays the same for every enclave)
CONNECT_ENV = "R3E_ENCLAVE_CONNECT"
#: hex bytes the runtime sends first on a connection it opens, so its host knows it is the enclave
#: it launched and not another local process that found the listening port
HELLO_ENV = "R3E_ENCLAVE_HELLO"
#: where a Nitro Enclave's runtime listens for its host on AF_VSOCK
DEFAULT_VSOCK_PORT = 5005


def _connect(address: str) -> socket.socket:
    """``unix:PATH`` or ``tcp:HOST:PORT``."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = rest
    elif kind == "tcp" and rest.rpartition(":")[2].isdigit():
        host, _, port = rest.rpartition(":")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        target = (host.strip("[]"), int(port))
    else:
        raise ValueError(f"cannot connect to {address!r}: expected unix:PATH or tcp:HOST:PORT")
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


def _accept_one(family: int, address: Any) -> socket.socket:
    """Listen at ``address`` and return the first connection (the host)."""
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        if family == socket.AF_UNIX:
            try:
                os.unlink(address)
            except FileNotFoundError:
                pass
        listener.bind(address)
        listener.listen(1)
        conn, _ = listener.accept()
    if family == socket.AF_UNIX:
        try:
            os.unlink(address)
        except FileNotFoundError:
            pass
    return conn


def main(argv: list[str] | None = None, *, nsm_transport: NsmTransport | None = None) -> int:
    """Entry inside an enclave: ``python -m r3e_tee.runtime.enclave [channel] [--device D]``.

    The channel to the host is one of ``--fd N`` (an inherited socket), ``--unix PATH`` or
    ``--connect unix:PATH|tcp:HOST:PORT`` (connect; default ``$R3E_ENCLAVE_CONNECT``, how the
    SGX provider reaches a Gramine enclave), ``--vsock-port N`` (listen on AF_VSOCK, any CID, and
    serve the first host that connects: Nitro) or ``--listen-unix PATH`` (the same on a UNIX
    socket). With none of them inside a Nitro Enclave (``/dev/nsm`` present) it listens on vsock
    port 5005 with the NSM device. ``nsm_transport`` replaces the NSM ioctl (tests).
    """
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="r3e-tee-enclave", description="R3E TEE enclave runtime")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--fd", type=int, help="an inherited, connected stream socket")
    where.add_argument("--unix", help="connect to this UNIX socket")
    where.add_argument(
        "--connect", metavar="ADDR", help=f"unix:PATH or tcp:HOST:PORT (default ${CONNECT_ENV})"
    )
    where.add_argument("--vsock-port", type=int, metavar="N", help="listen on AF_VSOCK (any CID) at port N")
    where.add_argument("--listen-unix", metavar="PATH", help="listen on this UNIX socket (a vsock stand-in)")
    p.add_argument("--device", choices=["gramine", "nsm", "host"], default=None)
    p.add_argument("--attestation-root", default="/dev/attestation")
    p.add_argument("--nsm-path", default="/dev/nsm")
    args = p.parse_args(argv)
    nsm_path = Path(args.nsm_path)
    connect, vsock_port = args.connect, args.vsock_port
    # nothing the enclave runs later needs these two
    env_connect, hello_hex = os.environ.pop(CONNECT_ENV, None), os.environ.pop(HELLO_ENV, "")
    if args.fd is None and not args.unix and not connect and vsock_port is None and not args.listen_unix:
        if env_connect:
            connect = env_connect
        elif nsm_path.exists():
            vsock_port = DEFAULT_VSOCK_PORT
        else:
            p.error(f"give --fd, --unix, --connect, --vsock-port or --listen-unix (or set ${CONNECT_ENV})")
    device = args.device or ("nsm" if vsock_port is not None else "gramine")
    try:
        hello = bytes.fromhex(hello_hex)
        if args.fd is not None:
            sock = socket.socket(fileno=args.fd)
        elif vsock_port is not None:
            if not hasattr(socket, "AF_VSOCK"):
                p.error("this Python has no AF_VSOCK support")
            sock = _accept_one(socket.AF_VSOCK, (socket.VMADDR_CID_ANY, vsock_port))
        elif args.listen_unix:
            sock = _accept_one(socket.AF_UNIX, args.listen_unix)
        else:
            sock = _connect(f"unix:{args.unix}" if args.unix else str(connect))
            if hello:
                sock.sendall(hello)
    except (OSError, ValueError) as exc:
        print(f"r3e-tee-enclave: no channel to the host: {exc}", file=sys.stderr)
        return 1

    root = Path(args.attestation_root)

    def factory(channel: Channel) -> AttestationDevice:
        if device == "gramine":
            return GramineAttestationDevice(root)
        if device == "nsm":
            return NsmAttestationDevice(nsm_transport, path=nsm_path)
        return HostQuotingDevice(channel)

    run_loop(serve(sock, factory), sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
