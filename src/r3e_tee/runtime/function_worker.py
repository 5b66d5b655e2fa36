"""The function sandbox: a process forked inside the enclave that runs one function's code.

It is kept warm and serves invocations one at a time, in the order they arrive, over a
socketpair; the runtime may send several at once, and each is answered before the next is
read. During an invocation the handler may call back into the enclave runtime through ``ctx``
(sign with the attested key, seal/unseal, log); the runtime answers on the same socket. The
parent enforces the deadline by killing this process; the memory limit is an rlimit set here.

Frames: a 4-byte big-endian length, then one kind byte and the payload. The hot path needs no
encoding: an invocation is ``I`` + deadline (double) + invocation id + the input bytes, its
answer ``O`` + the output bytes or ``E`` + the (scrubbed) error text. Calls back into the
runtime (``C``) and the load report (``L``) carry a CBOR map.
"""

from __future__ import annotations

import base64
import collections
import gc
import io
import json
import os
import resource
import socket
import struct
import sys
import traceback
import types
import zipfile
from collections.abc import Callable
from typing import Any

import cbor2
import quickjs  # loaded before the zygote forks: sandboxes may not see the install path

# the one canonical form: what the receipt's input and output hashes (and verifiers) are taken over
from r3e_tee.functions.receipts import canonical as canonical_json

_LEN = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024

INVOKE, OUTPUT, ERROR, CALL, LOADED = b"I", b"O", b"E", b"C", b"L"
_INVOKE_HEAD = struct.Struct(">dH")  # deadline (epoch seconds), length of the invocation id


class FunctionFailed(Exception):
    """The handler raised; carries a message already scrubbed of secrets."""


def frame(kind: bytes, payload: bytes) -> bytes:
    return _LEN.pack(len(payload) + 1) + kind + payload


def invoke_payload(deadline: float, invocation_id: str, input_bytes: bytes) -> bytes:
    ident = invocation_id.encode()
    return _INVOKE_HEAD.pack(deadline, len(ident)) + ident + input_bytes


def parse_invoke(payload: bytes) -> tuple[float, str, bytes]:
    deadline, n = _INVOKE_HEAD.unpack_from(payload)
    start = _INVOKE_HEAD.size
    return deadline, payload[start : start + n].decode(), payload[start + n :]


def send_frame(sock: socket.socket, kind: bytes, payload: bytes) -> None:
    sock.sendall(frame(kind, payload))


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    (length,) = _LEN.unpack(_recv_exact(sock, 4))
    if not 1 <= length <= MAX_FRAME:
        raise EOFError("bad frame length")
    body = _recv_exact(sock, length)
    return body[:1], body[1:]


def send(sock: socket.socket, message: dict[str, Any], kind: bytes = CALL) -> None:
    send_frame(sock, kind, cbor2.dumps(message))


def recv(sock: socket.socket, backlog: collections.deque[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The runtime's answer to a call. Invocations the runtime queued here meanwhile arrive
    before it: they wait in ``backlog``, in order."""
    while True:
        kind, payload = recv_frame(sock)
        if kind == CALL:
            break
        if kind != INVOKE:
            raise EOFError("expected the answer to a call")
        backlog.append((kind, payload))
    message = cbor2.loads(payload)
    if not isinstance(message, dict):
        raise EOFError("not a map")
    return message


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError("runtime closed the socket")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class _Bridge:
    """Calls from the handler back into the enclave runtime (over the same socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.backlog: collections.deque[tuple[bytes, bytes]] = collections.deque()

    def call(self, fn: str, **args: Any) -> Any:
        send(self.sock, {"op": "call", "fn": fn, **args}, CALL)
        reply = recv(self.sock, self.backlog)
        if not reply.get("ok"):
            raise RuntimeError(str(reply.get("error", f"{fn} failed")))
        return reply.get("result")


class Logger:
    def __init__(self, bridge: _Bridge) -> None:
        self._bridge = bridge

    def _log(self, level: str, message: str) -> None:
        self._bridge.call("log", level=level, message=str(message)[:4096])

    def info(self, message: str) -> None:
        self._log("info", message)

    def warning(self, message: str) -> None:
        self._log("warning", message)

    def error(self, message: str) -> None:
        self._log("error", message)


class Context:
    """What a handler gets besides its event: secrets, the enclave's key, sealing, a logger."""

    def __init__(self, bridge: _Bridge, secrets: dict[str, bytes], metadata: dict[str, Any]) -> None:
        self._bridge = bridge
        self.secrets = secrets
        self.metadata = metadata
        self.logger = Logger(bridge)

    def secret_text(self, name: str) -> str:
        return self.secrets[name].decode()

    def sign(self, data: bytes | str) -> bytes:
        """ECDSA P-256 (DER) by the enclave's attested key over b"r3e-function-sign/v1\\n" + data."""
        payload = data.encode() if isinstance(data, str) else bytes(data)
        return bytes(self._bridge.call("sign", data=payload))

    def seal(self, data: bytes) -> bytes:
        return bytes(self._bridge.call("seal", data=bytes(data)))

    def unseal(self, blob: bytes) -> bytes:
        return bytes(self._bridge.call("unseal", data=bytes(blob)))


def _load_python(code: bytes, handler: str) -> Callable[..., Any]:
    module_name, _, func = handler.rpartition(".")
    if zipfile.is_zipfile(io.BytesIO(code)):
        sys.path.insert(0, _unzip(code))
        module = __import__(module_name or "main", fromlist=[func])
    else:
        module = types.ModuleType(module_name or "function")
        exec(compile(code, f"<{module_name or 'function'}>", "exec"), module.__dict__)  # noqa: S102 - measured code
    fn = getattr(module, func, None)
    if not callable(fn):
        raise FunctionFailed(f"handler {handler!r} is not a function of the deployed code")
    return fn  # type: ignore[no-any-return]


def _unzip(code: bytes) -> str:
    import tempfile

    target = tempfile.mkdtemp(prefix="fn-")
    with zipfile.ZipFile(io.BytesIO(code)) as z:
        for info in z.infolist():
            path = os.path.realpath(os.path.join(target, info.filename))
            if not path.startswith(os.path.realpath(target) + os.sep):
                raise FunctionFailed(f"zip member {info.filename!r} escapes the code directory")
        z.extractall(target)
    return target


class _JsFunction:
    """One QuickJS context per function, with its own memory limit."""

    def __init__(self, code: bytes, handler: str, memory: int, ctx: Context) -> None:
        self._ctx = ctx
        self.js = quickjs.Context()
        self.js.set_memory_limit(memory)
        self.js.set_max_stack_size(1024 * 1024)
        b64 = base64.b64encode
        self.js.add_callable("__r3e_sign", lambda d: b64(ctx.sign(str(d))).decode())
        self.js.add_callable("__r3e_seal", lambda d: b64(ctx.seal(base64.b64decode(str(d)))).decode())
        self.js.add_callable("__r3e_unseal", lambda d: b64(ctx.unseal(base64.b64decode(str(d)))).decode())
        self.js.add_callable("__r3e_log", lambda lvl, m: ctx.logger._log(str(lvl), str(m)))
        self.js.eval(code.decode())
        self.handler = handler
        if self.js.eval(f"typeof {handler}") != "function":
            raise FunctionFailed(f"handler {handler!r} is not a function of the deployed code")

    def __call__(self, event: Any, ctx: Context) -> Any:
        secrets = {}
        for name, value in ctx.secrets.items():
            try:
                secrets[name] = value.decode()
            except UnicodeDecodeError:
                secrets[name] = base64.b64encode(value).decode()
        prelude = {"secrets": secrets, "metadata": ctx.metadata}
        script = (
            f"(function(){{ const c = {json.dumps(prelude)};"
            " c.sign = __r3e_sign; c.seal = __r3e_seal; c.unseal = __r3e_unseal;"
            " c.log = function(m){ __r3e_log('info', String(m)); };"
            f" return JSON.stringify({self.handler}({json.dumps(event)}, c)); }})()"
        )
        result = self.js.eval(script)
        return None if result is None else json.loads(result)


def _scrub(text: str, secrets: dict[str, bytes]) -> str:
    """``text`` without the secrets' values in the forms an exception message shows them: as
    text, base64, hex, and escaped as ``repr`` of the str or the bytes escapes them (a value
    with a quote, newline or non-ASCII byte appears only so in ``ValueError(f"{v!r}")``)."""
    for value in secrets.values():
        decoded = value.decode(errors="ignore")
        forms = {
            decoded,
            base64.b64encode(value).decode(),
            value.hex(),
            repr(decoded)[1:-1],
            repr(value)[2:-1],
        }
        for form in sorted(forms, key=len, reverse=True):
            if len(form) >= 4:
                text = text.replace(form, "***")
    return text


def serve(sock: socket.socket, spec: dict[str, Any], secrets: dict[str, bytes]) -> None:
    """Load the function and serve invocations until the socket closes."""
    memory = int(spec.get("memory", 64 * 1024 * 1024))
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    bridge = _Bridge(sock)
    base_meta = {k: spec.get(k) for k in ("function", "version", "measurement", "enclave_id")}
    code, handler = bytes(spec["code"]), str(spec["handler"])
    load_error = None
    fn: Callable[[Any, Context], Any] | None = None
    try:
        if spec["runtime"] == "javascript":
            fn = _JsFunction(code, handler, memory, Context(bridge, secrets, base_meta))
        else:
            fn = _load_python(code, handler)
    except Exception as exc:  # noqa: BLE001 - reported to the caller, scrubbed
        load_error = _scrub(f"loading the function failed: {type(exc).__name__}: {exc}", secrets)
    send(sock, {"ok": load_error is None, "error": load_error}, LOADED)
    if fn is None:
        return
    gc.freeze()  # what loading built stays: keep it out of the collector's full passes
    backlog = bridge.backlog
    while True:
        try:
            kind, payload = backlog.popleft() if backlog else recv_frame(sock)
        except EOFError:
            return
        if kind != INVOKE:
            return  # out of step with the runtime: it replaces a sandbox that goes away
        deadline, invocation_id, input_bytes = parse_invoke(payload)
        ctx = Context(bridge, secrets, {**base_meta, "invocation_id": invocation_id, "deadline": deadline})
        try:
            event = json.loads(input_bytes)
            output = fn(event, ctx)
            out_bytes = canonical_json(output)
            send_frame(sock, OUTPUT, out_bytes)
        except MemoryError:
            send_frame(sock, ERROR, b"MemoryError: the function exceeded its memory limit")
        except Exception as exc:  # noqa: BLE001 - the function's own failure, returned as a result
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" (line {tb[-1].lineno})" if tb else ""
            message = _scrub(f"{type(exc).__name__}: {exc}{where}", secrets)
            send_frame(sock, ERROR, message[:2000].encode(errors="replace"))
