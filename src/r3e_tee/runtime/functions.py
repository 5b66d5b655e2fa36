"""Runtime extension: load one function into this enclave and invoke it, with signed receipts.

The function's code must be the code the enclave was measured with (its SHA-256 is part of
the measured payload), so a host cannot swap code under an attested measurement. Each
invocation runs in a warm sandbox process (runtime/function_worker.py); a deadline kills and
replaces it. Every result, success or error, carries a receipt signed by the attested key.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cbor2

from r3e_tee.errors import EnclaveError, InvocationInputError
from r3e_tee.functions.receipts import BATCH_DOMAIN, MAX_BATCH, RECEIPT_DOMAIN, canonical
from r3e_tee.ids import new_id
from r3e_tee.providers.sandbox import confine_function
from r3e_tee.runtime import function_worker
from r3e_tee.runtime.channel import FrameSplitter

if TYPE_CHECKING:
    from r3e_tee.runtime.enclave import EnclaveRuntime

SIGN_DOMAIN = b"r3e-function-sign/v1\n"


class _SandboxProtocol(asyncio.Protocol):
    """The runtime's end of a sandbox socket: whole frames, as (kind, payload), in order.

    Until the sandbox is put to work its frames queue for :meth:`_Sandbox.recv` (the load
    report); after that each frame goes straight to ``on_frame`` from the read callback."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.frames: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self.waiter: asyncio.Future[tuple[bytes, bytes]] | None = None
        self.lost: str | None = None
        self.on_frame: Callable[[bytes, bytes], None] | None = None
        self.on_lost: Callable[[str], None] | None = None
        self._splitter = FrameSplitter()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            bodies = self._splitter.feed(data)
        except EnclaveError:
            bodies = [memoryview(b"")]  # oversized: malformed
        for body in bodies:
            if not body:
                self._fail("the function sandbox sent a malformed frame")
                return
            if self.lost is not None:
                return
            self._deliver((bytes(body[:1]), bytes(body[1:])))

    def _deliver(self, item: tuple[bytes, bytes]) -> None:
        if self.on_frame is not None:
            self.on_frame(*item)
            return
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(item)
        else:
            self.frames.append(item)

    def _fail(self, reason: str) -> None:
        first = self.lost is None
        self.lost = reason
        if self.transport is not None:
            self.transport.close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError(reason))
        if first and self.on_lost is not None:
            self.on_lost(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(self.lost or "the function sandbox went away")


@dataclass
class _Invocation:
    """One invocation in this enclave, from its request frame to its signed answer."""

    rid: Any  # the host's request id, which the answer echoes
    invocation_id: str
    input_bytes: bytes  # the canonical JSON input (what the receipt hashes)
    timeout: float
    reply_key: bytes | None
    decrypted_from: bytes | None
    started: float = 0.0
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Sandbox:
    """A sandbox process and the invocations sent to it, in order: the first runs, the others
    wait in its socket (the sandbox answers each before it reads the next, so only the first
    can have started)."""

    pid: int
    transport: asyncio.Transport
    protocol: _SandboxProtocol
    queue: collections.deque[_Invocation] = field(default_factory=collections.deque)
    stopped: _Invocation | None = None  # the invocation whose deadline killed this sandbox
    retired: bool = False  # dying or killed: nothing more is sent to it
    _outbox: list[bytes] = field(default_factory=list)

    @property
    def current(self) -> _Invocation | None:
        return self.queue[0] if self.queue else None

    def send(self, kind: bytes, payload: bytes) -> None:
        """Queue a frame; a loop turn's frames leave in one write (one wake-up of the sandbox)."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(function_worker.frame(kind, payload))

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if frames and not self.transport.is_closing():
            self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    async def recv(self) -> tuple[bytes, bytes]:
        protocol = self.protocol
        if protocol.frames:
            return protocol.frames.popleft()
        if protocol.lost is not None:
            raise ConnectionError(protocol.lost)
        waiter: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_running_loop().create_future()
        protocol.waiter = waiter
        return await waiter

    async def recv_map(self) -> dict[str, Any]:
        kind, payload = await self.recv()
        message = cbor2.loads(payload) if kind in (function_worker.CALL, function_worker.LOADED) else None
        if not isinstance(message, dict):
            raise EnclaveError("function sandbox sent a malformed frame")
        return message

    def expire(self, inv: _Invocation) -> None:
        """``inv``'s deadline passed: stop the function now (it reports a timeout)."""
        if self.current is not inv or self.stopped is not None:
            return  # it answered in time: the timer lost the race
        self.stopped = inv
        self.retired = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.protocol.on_lost = None
        self.transport.close()


_encode_str = json.encoder.encode_basestring  # json.dumps(str, ensure_ascii=False)


class ReceiptSigner:
    """What a receipt signature covers, ``RECEIPT_DOMAIN + canonical(body)``, made cheaply.

    The canonical form sorts the keys, and the first three (attestation, enclave_id,
    enclave_key) are the same for every invocation of this enclave under one attestation
    token: they are encoded, and hashed, once. Each receipt hashes the rest on a copy of that
    hash state and signs the digest; the signature is the one ``keys.sign`` would make over
    the whole message, so verifiers are unchanged.
    """

    def __init__(
        self, spec: dict[str, Any], keys: Any, attestation_id: str | None, token: str | None
    ) -> None:
        self.attestation_id = attestation_id
        self.token = token
        self.enclave_key = base64.urlsafe_b64encode(keys.p256_public).rstrip(b"=").decode()
        head = canonical(
            {
                "attestation": {"id": attestation_id, "token": token},
                "enclave_id": spec["enclave_id"],
                "enclave_key": self.enclave_key,
            }
        )
        self.head = head[:-1] + b","
        self._hash = hashlib.sha256(RECEIPT_DOMAIN + self.head)
        self._attestation = {"id": attestation_id, "token": token}
        self._spec = {k: spec[k] for k in ("enclave_id", "function", "measurement", "version")}
        self._function = canonical(spec["function"])
        self._measurement = canonical(spec["measurement"])
        self._version = canonical(spec["version"])

    def tail(self, body: dict[str, Any]) -> bytes:
        """The canonical bytes after :attr:`head` (the keys that change per invocation)."""
        if (
            body["attestation"] != self._attestation
            or body["enclave_id"] != self._spec["enclave_id"]
            or body["enclave_key"] != self.enclave_key
            or body["function"] != self._spec["function"]
            or body["measurement"] != self._spec["measurement"]
            or body["version"] != self._spec["version"]
            or body["v"] != 1
            or len(body) != 14
        ):
            raise EnclaveError("a receipt body does not match its enclave")  # a bug: never signed
        error = body["error_sha256"]
        return (
            f'"error_sha256":{"null" if error is None else _encode_str(error)},'
            f'"finished_at":{float.__repr__(body["finished_at"])},'
            f'"function":{self._function.decode()},'
            f'"input_sha256":{_encode_str(body["input_sha256"])},'
            f'"invocation_id":{_encode_str(body["invocation_id"])},'
            f'"measurement":{self._measurement.decode()},'
            f'"output_sha256":{_encode_str(body["output_sha256"])},'
            f'"started_at":{float.__repr__(body["started_at"])},'
            f'"status":{_encode_str(body["status"])},'
            f'"v":1,"version":{self._version.decode()}}}'
        ).encode()

    def digest(self, body: dict[str, Any]) -> bytes:
        h = self._hash.copy()
        h.update(self.tail(body))
        return h.digest()

    def statement(self, body: dict[str, Any]) -> tuple[bytes, bytes]:
        """The canonical text after :attr:`head`, and the SHA-256 of the signed statement."""
        tail = self.tail(body)
        h = self._hash.copy()
        h.update(tail)
        return tail, h.digest()

    def sign(self, body: dict[str, Any], sign_digest: Callable[[bytes], bytes]) -> bytes:
        """The signed receipt as canonical JSON, ``{"alg","body","signature"}``: its body is
        the exact text the signature covers (after RECEIPT_DOMAIN)."""
        tail = self.tail(body)
        h = self._hash.copy()
        h.update(tail)
        signature = base64.b64encode(sign_digest(h.digest()))
        return b'{"alg":"ES256","body":' + self.head + tail + b',"signature":"' + signature + b'"}'


@dataclass
class _Unsigned:
    """A finished invocation's answer waiting for the end of the loop turn to be signed."""

    rid: Any
    out: dict[str, Any]
    head: bytes
    tail: bytes
    digest: bytes  # SHA-256 of the receipt's signed statement


@dataclass
class LoadedFunction:
    spec: dict[str, Any]
    sandboxes: list[_Sandbox] = field(default_factory=list)
    pending: collections.deque[_Invocation] = field(default_factory=collections.deque)  # in no sandbox yet
    logs: list[dict[str, Any]] = field(default_factory=list)
    signer: ReceiptSigner | None = None
    concurrency: int = 1
    respawning: int = 0


#: invocations sent to one sandbox at most (the first runs; the others wait in its socket, so a
#: sandbox that finishes one reads the next without waiting for the runtime)
SANDBOX_DEPTH = 4


class FunctionHost:
    """Invocations run without tasks: the request frame places one on the least-busy sandbox
    (or queues it) from the channel's read callback, and the sandbox's answer is signed and
    sent from the sandbox's read callback. Only a handler's calls back into the runtime
    (ctx.sign, seal, log) and replacing a sandbox run as tasks.

    The host may pipeline (functions/scheduler.py): then a sandbox is sent up to
    SANDBOX_DEPTH invocations at once. Its deadline clock starts for each when the one before
    it has answered; if the sandbox dies, the one running reports it and the others, which
    never started, go to another sandbox."""

    def __init__(self, runtime: EnclaveRuntime) -> None:
        self.runtime = runtime
        self.loaded: LoadedFunction | None = None
        runtime.channel.handlers.update({"load_function": self.op_load})
        runtime.channel.direct["invoke"] = self.start_invoke
        runtime.on_shutdown.append(self.shutdown)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsigned: list[_Unsigned] = []

    def _task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sandboxes --------------------------------------------------------------------------------

    async def _spawn(self, spec: dict[str, Any]) -> _Sandbox:
        parent, child = socket.socketpair()
        secrets: dict[str, bytes] = dict(self.runtime.state.get("secrets", {}))
        pid = os.fork()
        if pid == 0:  # the sandbox: no event loop, no access to the runtime's keys by API
            code = 0
            try:
                parent.close()
                self.runtime.keys.zeroize()
                sealing = self.runtime.state.get("_secrets_extension")
                if sealing is not None:  # the sealing keys it cached: ctx.seal asks the runtime
                    sealing.zeroize()  # (``secrets`` above is a copy)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                confine_function(child.fileno(), int(spec.get("memory", 64 * 1024 * 1024)))
                function_worker.serve(child, spec, secrets)
            except BaseException:  # noqa: BLE001 - never return into the runtime's loop
                code = 70
            finally:
                os._exit(code)
        child.close()
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(_SandboxProtocol, sock=parent)
        sandbox = _Sandbox(pid, transport, protocol)
        try:
            loaded = await asyncio.wait_for(sandbox.recv_map(), 30)
        except (TimeoutError, ConnectionError, EnclaveError, ValueError):
            sandbox.kill()
            raise EnclaveError("the function sandbox did not start") from None
        if not loaded.get("ok"):
            sandbox.kill()
            raise EnclaveError(str(loaded.get("error") or "the function did not load"))
        protocol.on_frame = lambda kind, body: self._on_frame(sandbox, kind, body)
        protocol.on_lost = lambda reason: self._on_lost(sandbox)
        return sandbox

    async def op_load(self, msg: dict[str, Any]) -> dict[str, Any]:
        code = msg.get("code")
        if not isinstance(code, bytes):
            raise EnclaveError("load_function needs the code as bytes")
        measured = self.runtime.measured
        digest = hashlib.sha256(code).hexdigest()
        if measured.get("code_sha256") != digest:
            raise EnclaveError(
                "this code is not the code the enclave was measured with "
                f"(sha256 {digest}, measured {measured.get('code_sha256')})"
            )
        if self.loaded is not None:
            raise EnclaveError("a function is already loaded in this enclave")
        spec = {
            "code": code,
            "runtime": measured["runtime"],
            "handler": measured["handler"],
            "memory": int(measured.get("memory", 64 * 1024 * 1024)),
            "function": measured.get("function"),
            "version": measured.get("version"),
            "measurement": msg.get("measurement"),
            "enclave_id": msg.get("enclave_id"),
        }
        concurrency = max(1, int(measured.get("concurrency", 1)))
        loaded = LoadedFunction(spec, concurrency=concurrency)
        for _ in range(concurrency):
            loaded.sandboxes.append(await self._spawn(spec))
        self.loaded = loaded
        return {"loaded": measured.get("function"), "sandboxes": concurrency}

    def _place(self, loaded: LoadedFunction) -> None:
        """Send waiting invocations, oldest first, each to the live sandbox with the fewest."""
        pending = loaded.pending
        while pending:
            best: _Sandbox | None = None
            for sandbox in loaded.sandboxes:
                if not sandbox.retired and (best is None or len(sandbox.queue) < len(best.queue)):
                    best = sandbox
                    if not sandbox.queue:
                        break
            if best is None or len(best.queue) >= SANDBOX_DEPTH:
                return
            self._submit(best, pending.popleft())

    async def _replace(self, loaded: LoadedFunction, dead: _Sandbox) -> None:
        dead.kill()
        loaded.respawning += 1
        try:
            fresh = await self._spawn(loaded.spec)
        except EnclaveError as exc:
            if not loaded.sandboxes and loaded.respawning == 1:
                # nothing can run what waits: answer it rather than leave it hanging
                while loaded.pending:
                    inv = loaded.pending.popleft()
                    self.runtime.channel.respond_error(
                        inv.rid, EnclaveError(f"the function's sandbox could not be restarted: {exc.message}")
                    )
            return
        finally:
            loaded.respawning -= 1
        if self.loaded is not loaded:  # unloaded meanwhile (shutdown)
            fresh.kill()
            return
        loaded.sandboxes.append(fresh)
        self._place(loaded)

    # -- invocation ------------------------------------------------------------------------------

    async def _bridge(self, call: dict[str, Any]) -> dict[str, Any]:
        fn = call.get("fn")
        data = call.get("data")
        try:
            if fn == "sign" and isinstance(data, bytes):
                return {"ok": True, "result": self.runtime.keys.sign(SIGN_DOMAIN + data)}
            if fn in ("seal", "unseal") and isinstance(data, bytes):
                op = self.runtime.state.get(str(fn))
                if op is None:
                    return {"ok": False, "error": f"{fn} is not available in this enclave"}
                result = op(data)
                if asyncio.iscoroutine(result):
                    result = await result
                return {"ok": True, "result": result}
            if fn == "log":
                assert self.loaded is not None
                self.loaded.logs.append({"level": call.get("level"), "message": call.get("message")})
                del self.loaded.logs[:-100]
                return {"ok": True, "result": None}
        except EnclaveError as exc:
            return {"ok": False, "error": exc.message}
        return {"ok": False, "error": f"unknown call {fn!r}"}

    async def _answer_call(self, sandbox: _Sandbox, inv: _Invocation, body: bytes) -> None:
        """Answer a handler's ctx call (the handler waits for it; its deadline keeps running)."""
        try:
            call = cbor2.loads(body)
            answer = (
                await self._bridge(call)
                if isinstance(call, dict)
                else {"ok": False, "error": "malformed call"}
            )
        except (cbor2.CBORDecodeError, ValueError):
            answer = {"ok": False, "error": "malformed call"}
        if sandbox.current is inv and sandbox.protocol.lost is None:
            sandbox.send(function_worker.CALL, cbor2.dumps(answer))

    def start_invoke(self, msg: dict[str, Any]) -> None:
        """The ``invoke`` request (a direct handler): check it, then run or queue it."""
        loaded = self.loaded
        if loaded is None:
            raise EnclaveError("no function is loaded in this enclave")
        raw = msg.get("input")
        if not isinstance(raw, bytes):
            raise InvocationInputError("invoke needs the input as bytes")
        reply_key = msg.get("reply_key")
        if reply_key is not None:
            # checked before the function runs: an output that cannot be sealed is lost work
            self._check_reply_key(reply_key)
        decrypted_from = None
        if msg.get("encrypted"):
            decrypted_from = raw
            raw = self._open_input(raw, reply_key)
        try:
            event = json.loads(raw)
        except ValueError:
            raise InvocationInputError("the input is not JSON") from None
        inv = _Invocation(
            rid=msg.get("id"),
            invocation_id=str(msg.get("invocation_id") or new_id()),
            input_bytes=canonical(event),
            timeout=float(msg.get("function_timeout") or 30),
            reply_key=reply_key,
            decrypted_from=decrypted_from,
        )
        loaded.pending.append(inv)
        self._place(loaded)

    def _submit(self, sandbox: _Sandbox, inv: _Invocation) -> None:
        sandbox.queue.append(inv)
        if len(sandbox.queue) == 1:
            self._start_clock(sandbox, inv)
        sandbox.send(
            function_worker.INVOKE,
            function_worker.invoke_payload(time.time() + inv.timeout, inv.invocation_id, inv.input_bytes),
        )

    @staticmethod
    def _start_clock(sandbox: _Sandbox, inv: _Invocation) -> None:
        """``inv`` runs from now: the deadline kills the sandbox process, wherever it is."""
        inv.started = time.time()
        inv.timer = asyncio.get_running_loop().call_later(inv.timeout, sandbox.expire, inv)

    def _on_frame(self, sandbox: _Sandbox, kind: bytes, body: bytes) -> None:
        inv = sandbox.current
        if inv is None:  # a frame nobody asked for: out of step, replace it
            sandbox.protocol._fail("the function sandbox sent a frame out of turn")
            return
        if kind == function_worker.CALL:
            self._task(self._answer_call(sandbox, inv, body))
        elif kind == function_worker.OUTPUT:
            self._finish(sandbox, "ok", body, None)
        elif kind == function_worker.ERROR:
            self._finish(sandbox, "error", b"null", body.decode(errors="replace"))
        else:
            sandbox.protocol._fail("the function sandbox sent a malformed frame")

    def _on_lost(self, sandbox: _Sandbox) -> None:
        sandbox.retired = True
        loaded = self.loaded
        inv = sandbox.current
        mine = loaded is not None and self.loaded is loaded and sandbox in loaded.sandboxes
        if loaded is not None and mine and len(sandbox.queue) > 1:
            # what it was sent but never started goes first, ahead of newer work, elsewhere
            never_started = list(sandbox.queue)[1:]
            while len(sandbox.queue) > 1:
                sandbox.queue.pop()
            loaded.pending.extendleft(reversed(never_started))
        if inv is not None:
            if sandbox.stopped is inv:
                error = f"the function did not finish within {inv.timeout:g} s and was stopped"
                self._finish(sandbox, "timeout", b"null", error)
            elif sandbox.stopped is not None:
                error = "the function's sandbox was stopped at the deadline of the invocation before it"
                self._finish(sandbox, "error", b"null", error)
            else:
                self._finish(sandbox, "error", b"null", "the function's sandbox died; it was replaced")
        if loaded is None or not mine:
            return
        sandbox.queue.clear()
        with contextlib.suppress(ValueError):
            loaded.sandboxes.remove(sandbox)
        self._task(self._replace(loaded, sandbox))
        self._place(loaded)

    def _finish(self, sandbox: _Sandbox, status: str, output: bytes, error: str | None) -> None:
        """The running invocation answered (or its sandbox ended): sign and send its result."""
        finished = time.time()  # before the sandbox's next invocation starts its clock
        inv = sandbox.queue.popleft()
        if inv.timer is not None:
            inv.timer.cancel()
        loaded = self.loaded
        if loaded is None:
            return
        if sandbox.queue and not sandbox.retired:
            self._start_clock(sandbox, sandbox.queue[0])
        if loaded.pending:
            self._place(loaded)
        signer, body = self._receipt_body(
            loaded, inv.invocation_id, inv.input_bytes, output, status, error, inv.started, finished
        )
        out: dict[str, Any] = {"status": status, "error": error, "run_time": finished - inv.started}
        if inv.reply_key is not None:
            try:
                out["output_encrypted"] = self._seal_output(output, inv.reply_key)
            except (ValueError, EnclaveError) as exc:
                self.runtime.channel.respond_error(inv.rid, EnclaveError(f"cannot seal the output: {exc}"))
                return
        else:
            out["output"] = output
        if inv.decrypted_from is not None:
            out["input_ciphertext_sha256"] = hashlib.sha256(inv.decrypted_from).hexdigest()
        tail, digest = signer.statement(body)
        if not self._unsigned:
            asyncio.get_running_loop().call_soon(self._sign_turn)
        self._unsigned.append(_Unsigned(inv.rid, out, signer.head, tail, digest))

    def _sign_turn(self) -> None:
        """Sign the receipts finished in this loop turn: one alone as itself, several together,
        one signature over the batch (functions/receipts.py says what it covers). Under load a
        turn finishes several, and a signature costs more than everything else about a receipt.
        """
        items, self._unsigned = self._unsigned, []
        channel = self.runtime.channel
        for start in range(0, len(items), MAX_BATCH):
            chunk = items[start : start + MAX_BATCH]
            try:
                if len(chunk) == 1:
                    item = chunk[0]
                    signature = base64.b64encode(self.runtime.keys.sign_digest(item.digest))
                    item.out["receipt_json"] = (
                        b'{"alg":"ES256","body":'
                        + item.head
                        + item.tail
                        + b',"signature":"'
                        + signature
                        + b'"}'
                    )
                else:
                    digests = [item.digest for item in chunk]
                    batch = hashlib.sha256(BATCH_DOMAIN + b"".join(digests)).digest()
                    signature = base64.b64encode(self.runtime.keys.sign_digest(batch))
                    leaves = b'","'.join(d.hex().encode() for d in digests)
                    for index, item in enumerate(chunk):
                        item.out["receipt_json"] = (
                            b'{"alg":"ES256-batch","batch":{"index":%d,"leaves":["%b"]},"body":%b%b,'
                            b'"signature":"%b"}' % (index, leaves, item.head, item.tail, signature)
                        )
            except EnclaveError as exc:  # the keys are gone (shut down meanwhile)
                for item in chunk:
                    channel.respond_error(item.rid, exc)
                continue
            for item in chunk:
                channel.respond(item.rid, item.out)

    def _open_input(self, ciphertext: bytes, reply_key: bytes | None) -> bytes:
        """The input opens only for the reply key its client sealed it for (functions/e2e.py)."""
        from r3e_tee.functions.e2e import open_input

        try:
            return open_input(ciphertext, self.runtime.keys.hpke, reply_key)
        except ValueError as exc:
            raise InvocationInputError(f"cannot decrypt the input: {exc}") from None

    @staticmethod
    def _check_reply_key(reply_key: object) -> None:
        from r3e_tee.functions.e2e import reply_public_key

        if not isinstance(reply_key, bytes):
            raise InvocationInputError("the reply key must be a raw 32-byte X25519 public key")
        try:
            reply_public_key(reply_key)
        except ValueError as exc:
            raise InvocationInputError(str(exc)) from None

    @staticmethod
    def _seal_output(output: bytes, reply_key: bytes) -> bytes:
        from r3e_tee.functions.e2e import seal_output

        return seal_output(output, reply_key)

    def _receipt_body(
        self,
        loaded: LoadedFunction,
        invocation_id: str,
        input_bytes: bytes,
        output: bytes,
        status: str,
        error: str | None,
        started: float,
        finished: float,
    ) -> tuple[ReceiptSigner, dict[str, Any]]:
        runtime = self.runtime
        signer = loaded.signer
        if (
            signer is None
            or signer.token is not runtime.token
            or signer.attestation_id is not runtime.attestation_id
        ):
            signer = loaded.signer = ReceiptSigner(
                loaded.spec, runtime.keys, runtime.attestation_id, runtime.token
            )
        spec = loaded.spec
        body = {
            "v": 1,
            "function": spec["function"],
            "version": spec["version"],
            "measurement": spec["measurement"],
            "invocation_id": invocation_id,
            "status": status,
            "input_sha256": hashlib.sha256(input_bytes).hexdigest(),
            "output_sha256": hashlib.sha256(output).hexdigest(),
            "error_sha256": hashlib.sha256(error.encode()).hexdigest() if error else None,
            "enclave_id": spec["enclave_id"],
            "enclave_key": signer.enclave_key,
            "attestation": {"id": runtime.attestation_id, "token": runtime.token},
            "started_at": round(started, 6),
            "finished_at": round(finished, 6),
        }
        return signer, body

    def shutdown(self) -> None:
        loaded, self.loaded = self.loaded, None
        if loaded is not None:
            for sandbox in loaded.sandboxes:
                if sandbox.current is not None and sandbox.current.timer is not None:
                    sandbox.current.timer.cancel()
                sandbox.kill()
            for task in list(self._tasks):
                task.cancel()


def install(runtime: EnclaveRuntime) -> None:
    FunctionHost(runtime)
