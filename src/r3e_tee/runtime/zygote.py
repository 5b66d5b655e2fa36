"""The simulation provider's fork server.

Starting a Python interpreter and importing the crypto stack costs ~100 ms; forking a process
that already has them costs ~2 ms. The zygote is started once (inside bubblewrap where
installed: no network, read-only root) and forks one process per simulated enclave. Each child
confines itself (own session, rlimits, not dumpable, seccomp) before running the runtime, and
gets its own socketpair whose other end travels to the host over SCM_RIGHTS.

Control protocol (length-prefixed CBOR, see runtime/channel.py): host -> zygote
``{"op": "spawn", "rid", "memory", "cpu_seconds", "seccomp"}`` -> zygote replies
``{"rid", "ok", "pid"}`` with the host's end attached; ``{"op": "kill", "pid"}``; and the zygote
reports ``{"op": "exited", "pid", "status"}`` for every child it reaps.
"""

from __future__ import annotations

import gc
import os
import selectors
import signal
import socket
import struct
import sys
from typing import Any

import cbor2

# imported before any fork so every child starts warm
from r3e_tee.providers import sandbox
from r3e_tee.providers.sandbox import SandboxLimits, apply_in_child
from r3e_tee.runtime import enclave as _enclave

sandbox.warm()
_enclave.warm()

_LEN = struct.Struct(">I")


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    body = cbor2.dumps(message)
    data = _LEN.pack(len(body)) + body
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _recv(sock: socket.socket) -> dict[str, Any]:
    (length,) = _LEN.unpack(_recv_exact(sock, 4))
    message = cbor2.loads(_recv_exact(sock, length))
    if not isinstance(message, dict):
        raise ValueError("control message is not a map")
    return message


def _child(control: socket.socket, mine: socket.socket, message: dict[str, Any], close: list[int]) -> None:
    code = 0
    try:
        control.close()
        signal.set_wakeup_fd(-1)
        for fd in close:
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        limits = SandboxLimits(
            memory_bytes=int(message["memory"]) if message.get("memory") else None,
            cpu_seconds=int(message["cpu_seconds"]) if message.get("cpu_seconds") else None,
            seccomp=bool(message.get("seccomp", True)),
            hidden_paths=tuple(str(p) for p in message.get("hidden", ())),
        )
        apply_in_child(limits)
        measured = message.get("measured")
        _enclave.run_in_child(mine, measured if isinstance(measured, dict) else None)
    except BaseException:  # noqa: BLE001 - the child must never return into the zygote loop
        code = 70
    finally:
        os._exit(code)


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        _send(control, {"op": "exited", "pid": pid, "status": code})


def serve(control: socket.socket) -> None:
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(control, selectors.EVENT_READ, "control")
    sel.register(rfd, selectors.EVENT_READ, "signal")
    while True:
        for key, _ in sel.select():
            if key.data == "signal":
                os.read(rfd, 4096)
                _reap(control)
                continue
            try:
                message = _recv(control)
            except (EOFError, ConnectionError):
                return  # the host went away: children die with us (PDEATHSIG)
            op = message.get("op")
            if op == "spawn":
                host_end, child_end = socket.socketpair()
                pid = os.fork()
                if pid == 0:
                    host_end.close()
                    sel.close()
                    _child(control, child_end, message, [rfd, wfd])
                child_end.close()
                _send(control, {"rid": message.get("rid"), "ok": True, "pid": pid}, [host_end.fileno()])
                host_end.close()
            elif op == "kill":
                try:
                    os.kill(int(message["pid"]), signal.SIGKILL)
                except (ProcessLookupError, KeyError, ValueError):
                    pass
            elif op == "ping":
                _send(control, {"rid": message.get("rid"), "ok": True, "pid": os.getpid()})


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 4) or args[0] != "--fd" or (len(args) == 4 and args[2] != "--parent"):
        print("usage: python -m r3e_tee.runtime.zygote --fd N [--parent PID]", file=sys.stderr)
        return 2
    if len(args) == 4:
        sandbox.die_with_parent()
        if os.getppid() != int(args[3]):
            return 0  # the parent died before PDEATHSIG was armed
    control = socket.socket(fileno=int(args[1]))
    sandbox.set_dumpable(False)  # enclaves run as our user: our memory and environ are not theirs
    # the warm heap every enclave inherits: out of the collector's way (no full-pass pauses in
    # the enclaves, and no copy-on-write of its pages just for the collector's bookkeeping)
    gc.collect()
    gc.freeze()
    serve(control)
    return 0


if __name__ == "__main__":
    sys.exit(main())
