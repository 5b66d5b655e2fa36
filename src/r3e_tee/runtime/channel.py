"""The host <-> enclave channel: length-prefixed CBOR frames over a byte stream.

The same framing runs over a socketpair (simulation), a UNIX socket (Gramine) and AF_VSOCK
(Nitro). Either side may send requests; each request carries an id its response echoes, so
an enclave can ask its host for something (a simulated quote) while answering a request.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import cbor2

from r3e_tee.errors import EnclaveError

MAX_FRAME = 64 * 1024 * 1024
_LEN = struct.Struct(">I")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
#: a handler that runs inside the read callback, with no task; it answers later through
#: :meth:`Channel.respond` or :meth:`Channel.respond_error` (the invocation path)
DirectHandler = Callable[[dict[str, Any]], None]


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


class FrameSplitter:
    """Whole length-prefixed frames out of a byte stream that arrives in arbitrary pieces."""

    __slots__ = ("_parts", "_have", "_need")

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # the bytes of an incomplete frame
        self._have = 0  # their length
        self._need = 4  # how many the frame needs

    def feed(self, chunk: bytes) -> list[memoryview]:
        """The bodies of the frames ``chunk`` completes (views: decode before the next feed)."""
        if self._parts or len(chunk) < self._need:
            self._parts.append(chunk)
            self._have += len(chunk)
            if self._have < self._need:
                return []
            data = b"".join(self._parts)
        else:
            data = chunk
        view, start, size, self._need = memoryview(data), 0, len(data), 4
        bodies = []
        while size - start >= 4:
            (length,) = _LEN.unpack_from(data, start)
            if length > MAX_FRAME:
                raise EnclaveError(f"peer sent a {length}-byte frame (limit {MAX_FRAME})")
            end = start + 4 + length
            if end > size:
                self._need = 4 + length
                break
            bodies.append(view[start + 4 : end])
            start = end
        self._parts = [data[start:]] if start < size else []
        self._have = size - start
        return bodies


class _TransportWriter:
    """The part of a StreamWriter a Channel uses, over a bare transport (protocol mode)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._resumed: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the channel's transport is closed")
        if self._resumed is not None:
            await asyncio.shield(self._resumed)

    def pause(self) -> None:
        if self._resumed is None:
            self._resumed = asyncio.get_running_loop().create_future()

    def resume(self) -> None:
        resumed, self._resumed = self._resumed, None
        if resumed is not None and not resumed.done():
            resumed.set_result(None)

    def close(self) -> None:
        self.resume()
        self.transport.close()


class _ChannelProtocol(asyncio.Protocol):
    """Feeds a Channel from its transport's callbacks: no reader task, no stream buffer.
    Bytes that arrive before the channel starts wait for it (with reading paused)."""

    def __init__(self) -> None:
        self.channel: Channel | None = None
        self.transport: asyncio.Transport | None = None
        self.splitter = FrameSplitter()
        self.writer: _TransportWriter | None = None
        self.started = False
        self._early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.writer = _TransportWriter(self.transport)  # type: ignore[arg-type]

    def start(self) -> None:
        self.started = True
        early, self._early = self._early, []
        for chunk in early:
            self.data_received(chunk)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        channel = self.channel
        if not self.started or channel is None:
            self._early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if channel.closed.is_set():
            return
        try:
            for body in self.splitter.feed(data):
                channel._dispatch(decode_body(body))
        except EnclaveError as exc:
            channel._close(exc.message)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.writer is not None:
            self.writer.resume()
        if self.channel is not None:
            self.channel._close(str(exc) if exc else "the channel was closed by the other side")

    def pause_writing(self) -> None:
        if self.writer is not None:
            self.writer.pause()

    def resume_writing(self) -> None:
        if self.writer is not None:
            self.writer.resume()


def _expire(fut: asyncio.Future[dict[str, Any]]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class Channel:
    """A request/response multiplexer over one stream.

    Built on a StreamReader/StreamWriter pair it runs its reader as a task; built with
    :meth:`over_socket` the transport's callbacks feed it directly. Either way every whole
    frame that has arrived is handled at once, and frames written during one turn of the event
    loop leave in one write (one wake-up of the peer).
    """

    #: write-buffer size above which a writer waits for the peer to catch up
    HIGH_WATER = 256 * 1024

    def __init__(
        self,
        reader: asyncio.StreamReader | None,
        writer: asyncio.StreamWriter | _TransportWriter,
        handlers: dict[str, Handler] | None = None,
        *,
        name: str = "channel",
        _protocol: _ChannelProtocol | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._protocol = _protocol
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.direct: dict[str, DirectHandler] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed_reason: str | None = None
        self.closed = asyncio.Event()
        self.name = name
        self._outbox: list[bytes] = []
        self._outbox_size = 0  # bytes in _outbox

    @classmethod
    async def over_socket(
        cls, sock: socket.socket, handlers: dict[str, Handler] | None = None, *, name: str = "channel"
    ) -> Channel:
        """A channel on a connected stream socket, read by protocol callbacks (the fast way).
        Nothing is read before :meth:`start`."""
        protocol = _ChannelProtocol()
        await asyncio.get_running_loop().create_connection(lambda: protocol, sock=sock)
        assert protocol.writer is not None
        channel = cls(None, protocol.writer, handlers, name=name, _protocol=protocol)
        protocol.channel = channel
        return channel

    def start(self) -> None:
        if self._protocol is not None:
            if not self.closed.is_set():
                self._protocol.start()
            return
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name=f"{self.name}-reader")

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()

    def _send(self, frame: bytes) -> None:
        """Queue a frame; the queue is written once the current turn of the loop is done."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(frame)
        self._outbox_size += len(frame)

    def _flush(self) -> None:
        frames, self._outbox, self._outbox_size = self._outbox, [], 0
        if not frames or self.closed.is_set():
            return
        try:
            self._writer.write(frames[0] if len(frames) == 1 else b"".join(frames))
        except (ConnectionError, OSError, RuntimeError) as exc:
            self._close(f"write failed: {exc}")

    async def _drain(self) -> None:
        transport = self._writer.transport
        if transport.get_write_buffer_size() + self._outbox_size > self.HIGH_WATER:
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

    def _start_respond(self, loop: asyncio.AbstractEventLoop, message: dict[str, Any]) -> None:
        loop.create_task(self._respond(message))

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

    def respond(self, rid: Any, result: dict[str, Any]) -> None:
        """Answer a request a direct handler took (the frame leaves with this turn's others)."""
        if not self.closed.is_set():
            self._send(encode_frame({"id": rid, "ok": True, "result": result}))

    def respond_error(self, rid: Any, exc: EnclaveError) -> None:
        if not self.closed.is_set():
            self._send(encode_frame({"id": rid, "ok": False, "error": exc.message, "kind": exc.code}))

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "op" in message:
            direct = self.direct.get(str(message["op"]))
            if direct is not None:
                try:
                    direct(message)
                except EnclaveError as exc:
                    self.respond_error(message.get("id"), exc)
                except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the channel
                    self._send(
                        encode_frame(
                            {
                                "id": message.get("id"),
                                "ok": False,
                                "error": type(exc).__name__,
                                "kind": "internal",
                            }
                        )
                    )
                return
            # A request starts on the next pass of the ready queue, after what is already due
            # (answers that arrived with it, results to send): work in flight finishes first.
            loop = asyncio.get_running_loop()
            loop.call_soon(self._start_respond, loop, message)
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
        assert self._reader is not None
        splitter = FrameSplitter()
        try:
            while True:
                chunk = await self._reader.read(1 << 18)
                if not chunk:
                    raise ChannelClosed("the channel was closed by the other side")
                for body in splitter.feed(chunk):
                    self._dispatch(decode_body(body))
        except ChannelClosed as exc:
            self._close(exc.message)
        except (EnclaveError, ConnectionError, OSError) as exc:
            self._close(str(exc))

    def _close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self._closed_reason = reason
        self.closed.set()
        self._outbox, self._outbox_size = [], 0
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
