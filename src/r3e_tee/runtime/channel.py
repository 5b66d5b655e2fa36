"""The host <-> enclave channel: length-prefixed CBOR frames over a byte stream.

The same framing runs over a socketpair (simulation), a UNIX socket (Gramine) and AF_VSOCK
(Nitro). Either side may send requests; each request carries an id its response echoes, so
an enclave can ask its host for something (a simulated quote) while answering a request.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import cbor2

from r3e_tee.errors import EnclaveError

MAX_FRAME = 64 * 1024 * 1024
_LEN = struct.Struct(">I")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ChannelClosed(EnclaveError):
    code = "channel_closed"


class RemoteError(EnclaveError):
    """The other side answered a request with an error."""

    def __init__(self, message: str, *, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


def encode_frame(message: dict[str, Any]) -> bytes:
    body = cbor2.dumps(message)
    if len(body) > MAX_FRAME:
        raise EnclaveError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes | memoryview) -> dict[str, Any]:
    try:
        message = cbor2.loads(body)
    except (cbor2.CBORDecodeError, ValueError) as exc:
        raise EnclaveError(f"malformed frame from peer: {exc}") from None
    if not isinstance(message, dict):
        raise EnclaveError("malformed frame from peer: not a map")
    return message


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        header = await reader.readexactly(4)
        (length,) = _LEN.unpack(header)
        if length > MAX_FRAME:
            raise EnclaveError(f"peer sent a {length}-byte frame (limit {MAX_FRAME})")
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ChannelClosed("the channel was closed by the other side") from None
    return decode_body(body)


def _expire(fut: asyncio.Future[dict[str, Any]]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class Channel:
    """A request/response multiplexer over one stream. Runs its reader as a task.

    The reader takes whatever bytes have arrived and handles every whole frame in them; frames
    written during one turn of the event loop leave in one write (one wake-up of the peer).
    """

    #: write-buffer size above which a writer waits for the peer to catch up
    HIGH_WATER = 256 * 1024

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handlers: dict[str, Handler] | None = None,
        *,
        name: str = "channel",
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed_reason: str | None = None
        self.closed = asyncio.Event()
        self.name = name
        self._outbox: list[bytes] = []

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name=f"{self.name}-reader")

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()

    def _send(self, frame: bytes) -> None:
        """Queue a frame; the queue is written once the current turn of the loop is done."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(frame)

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if not frames or self.closed.is_set():
            return
        try:
            self._writer.write(frames[0] if len(frames) == 1 else b"".join(frames))
        except (ConnectionError, OSError, RuntimeError) as exc:
            self._close(f"write failed: {exc}")

    async def _drain(self) -> None:
        transport = self._writer.transport
        if transport.get_write_buffer_size() + sum(map(len, self._outbox)) > self.HIGH_WATER:
            self._flush()
            await self._writer.drain()

    async def request(self, op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        if self.closed.is_set():
            raise ChannelClosed(f"{self.name}: closed ({self._closed_reason})")
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending[rid] = fut
        timer = loop.call_later(timeout, _expire, fut) if timeout is not None else None
        try:
            args["id"] = rid
            args["op"] = op
            self._send(encode_frame(args))
            await self._drain()
            return await fut
        except TimeoutError:
            raise EnclaveError(f"{self.name}: no answer to {op!r} within {timeout:g} s") from None
        except (ConnectionError, OSError) as exc:
            raise ChannelClosed(f"{self.name}: {exc}") from None
        finally:
            if timer is not None:
                timer.cancel()
            self._pending.pop(rid, None)

    async def _respond(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        rid = message.get("id")
        handler = self.handlers.get(str(op))
        reply: dict[str, Any]
        if handler is None:
            reply = {"id": rid, "ok": False, "error": f"unknown operation {op!r}", "kind": "unknown_op"}
        else:
            try:
                reply = {"id": rid, "ok": True, "result": await handler(message)}
            except EnclaveError as exc:
                reply = {"id": rid, "ok": False, "error": exc.message, "kind": exc.code}
            except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the channel
                reply = {"id": rid, "ok": False, "error": f"{type(exc).__name__}", "kind": "internal"}
        if self.closed.is_set():
            return
        try:
            self._send(encode_frame(reply))
            await self._drain()
        except (ConnectionError, OSError):
            self._close("peer went away while answering")

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "op" in message:
            asyncio.get_running_loop().create_task(self._respond(message))
            return
        fut = self._pending.get(int(message.get("id", -1)))
        if fut is None or fut.done():
            return
        if message.get("ok"):
            result = message.get("result")
            fut.set_result(result if isinstance(result, dict) else {"value": result})
        else:
            fut.set_exception(
                RemoteError(str(message.get("error", "unknown error")), kind=str(message.get("kind")))
            )

    async def _read_loop(self) -> None:
        parts: list[bytes] = []  # bytes of an incomplete frame
        have, need = 0, 4  # their length; how many the frame needs
        try:
            while True:
                chunk = await self._reader.read(1 << 18)
                if not chunk:
                    raise ChannelClosed("the channel was closed by the other side")
                if parts or len(chunk) < need:
                    parts.append(chunk)
                    have += len(chunk)
                    if have < need:
                        continue
                    data = b"".join(parts)
                else:
                    data = chunk
                view, start, size, need = memoryview(data), 0, len(data), 4
                while size - start >= 4:
                    (length,) = _LEN.unpack_from(data, start)
                    if length > MAX_FRAME:
                        raise EnclaveError(f"peer sent a {length}-byte frame (limit {MAX_FRAME})")
                    end = start + 4 + length
                    if end > size:
                        need = 4 + length
                        break
                    self._dispatch(decode_body(view[start + 4 : end]))
                    start = end
                parts = [data[start:]] if start < size else []
                have = size - start
        except ChannelClosed as exc:
            self._close(exc.message)
        except (EnclaveError, ConnectionError, OSError) as exc:
            self._close(str(exc))

    def _close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self._closed_reason = reason
        self.closed.set()
        self._outbox = []
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"{self.name}: {reason}"))
        try:
            self._writer.close()
        except (ConnectionError, OSError, RuntimeError):
            pass

    async def aclose(self) -> None:
        self._flush()
        self._close("closed locally")
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, ChannelClosed):
                pass

    @property
    def closed_reason(self) -> str | None:
        return self._closed_reason
