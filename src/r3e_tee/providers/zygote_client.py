"""Host side of the simulation fork server (see runtime/zygote.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import cbor2

from r3e_tee.errors import ProviderError
from r3e_tee.providers import sandbox
from r3e_tee.providers.sandbox import bubblewrap_argv

log = logging.getLogger("r3e_tee.providers.simulation")
_LEN = struct.Struct(">I")

#: the only host environment variables enclaves (and the functions they run) see: the service's
#: or worker's own (its token to the service, a store URL with a password) are not theirs
ZYGOTE_ENV_KEEP = ("PATH", "PYTHONPATH", "PYTHONHOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


def zygote_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    source = os.environ if env is None else env
    return {k: source[k] for k in ZYGOTE_ENV_KEEP if k in source}


class ZygoteClient:
    """Starts the zygote, asks it to fork enclaves, learns about their exits."""

    def __init__(
        self, *, use_bubblewrap: bool, on_exit: Callable[[int, int], None], hidden: tuple[str, ...] = ()
    ) -> None:
        self.use_bubblewrap = use_bubblewrap
        self.hidden = hidden
        self.on_exit = on_exit
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[tuple[int, int]]]] = {}
        self._fds: list[int] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.sandboxed_with: str = "none"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        host, child = socket.socketpair()
        prefix = bubblewrap_argv() if self.use_bubblewrap else None
        self.sandboxed_with = "bubblewrap" if prefix else "process"
        argv = [*(prefix or []), sys.executable, "-m", "r3e_tee.runtime.zygote", "--fd", str(child.fileno())]
        if prefix is None:
            # without bubblewrap's --die-with-parent the zygote arms PDEATHSIG itself
            argv += ["--parent", str(os.getpid())]
        # enclave and function code runs as this process's user: not dumpable, its memory, its
        # environment and its descriptors under /proc/<pid> are closed to them (as sshd does)
        sandbox.set_dumpable(False)
        try:
            self._proc = subprocess.Popen(
                argv, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, env=zygote_environment()
            )
        except OSError as exc:
            host.close()
            raise ProviderError(f"cannot start the simulation fork server: {exc}") from None
        finally:
            child.close()
        self._sock = host
        threading.Thread(target=self._reader, name="zygote-reader", daemon=True).start()
        log.info(
            "simulation fork server started", extra={"pid": self._proc.pid, "sandbox": self.sandboxed_with}
        )

    def _reader(self) -> None:
        sock = self._sock
        assert sock is not None
        buf = b""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(sock, 65536, 16)
            except OSError:
                data, fds = b"", []
            if not data:
                self._fail_all("the simulation fork server exited")
                return
            self._fds.extend(fds)
            buf += data
            while len(buf) >= 4:
                (length,) = _LEN.unpack_from(buf)
                if len(buf) < 4 + length:
                    break
                message = cbor2.loads(buf[4 : 4 + length])
                buf = buf[4 + length :]
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("op") == "exited":
            self.on_exit(int(message["pid"]), int(message["status"]))
            return
        rid = message.get("rid")
        with self._lock:
            waiter = self._pending.pop(int(rid), None) if isinstance(rid, int) else None
        if waiter is None:
            return
        loop, fut = waiter
        if message.get("ok") and "pid" in message and self._fds:
            fd = self._fds.pop(0)
            loop.call_soon_threadsafe(_set_result, fut, (int(message["pid"]), fd))
        else:
            loop.call_soon_threadsafe(_set_exception, fut, ProviderError("the fork server refused to spawn"))

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for loop, fut in pending.values():
            loop.call_soon_threadsafe(_set_exception, fut, ProviderError(reason))

    def _send(self, message: dict[str, Any]) -> None:
        if self._sock is None:
            raise ProviderError("the simulation fork server is not running")
        body = cbor2.dumps(message)
        try:
            with self._lock:
                self._sock.sendall(_LEN.pack(len(body)) + body)
        except OSError as exc:
            raise ProviderError(f"the simulation fork server is gone: {exc}") from None

    async def spawn(
        self, *, memory: int, cpu_seconds: int | None, seccomp: bool, measured: dict[str, Any] | None = None
    ) -> tuple[int, socket.socket]:
        if not self.running:
            self.stop()
            self.start()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, int]] = loop.create_future()
        rid = next(self._ids)
        with self._lock:
            self._pending[rid] = (loop, fut)
        self._send(
            {
                "op": "spawn",
                "rid": rid,
                "memory": memory,
                "cpu_seconds": cpu_seconds,
                "seccomp": seccomp,
                "measured": measured or {},
                "hidden": list(self.hidden),
            }
        )
        pid, fd = await asyncio.wait_for(fut, 30)
        return pid, socket.socket(fileno=fd)

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProviderError):
            self._send({"op": "kill", "pid": pid})

    def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def _set_result(fut: asyncio.Future[tuple[int, int]], value: tuple[int, int]) -> None:
    if not fut.done():
        fut.set_result(value)
    else:
        os.close(value[1])


def _set_exception(fut: asyncio.Future[tuple[int, int]], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
