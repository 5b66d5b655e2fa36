"""Runtime extension: load one function into this enclave and invoke it, with signed receipts.

The function's code must be the code the enclave was measured with (its SHA-256 is part of
the measured payload), so a host cannot swap code under an attested measurement. Each
invocation runs in a warm sandbox process (runtime/function_worker.py); a deadline kills and
replaces it. Every result, success or error, carries a receipt signed by the attested key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cbor2

from r3e_tee.errors import EnclaveError
from r3e_tee.runtime import function_worker

if TYPE_CHECKING:
    from r3e_tee.runtime.enclave import EnclaveRuntime

RECEIPT_DOMAIN = b"r3e-receipt/v1\n"
SIGN_DOMAIN = b"r3e-function-sign/v1\n"
_LEN = function_worker._LEN


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class _Sandbox:
    pid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    busy: bool = False

    async def send(self, message: dict[str, Any]) -> None:
        body = cbor2.dumps(message)
        self.writer.write(_LEN.pack(len(body)) + body)
        await self.writer.drain()

    async def recv(self) -> dict[str, Any]:
        header = await self.reader.readexactly(4)
        (length,) = _LEN.unpack(header)
        if length > function_worker.MAX_FRAME:
            raise EnclaveError("function sandbox sent an oversized frame")
        message = cbor2.loads(await self.reader.readexactly(length))
        if not isinstance(message, dict):
            raise EnclaveError("function sandbox sent a malformed frame")
        return message

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.writer.close()


@dataclass
class LoadedFunction:
    spec: dict[str, Any]
    sandboxes: list[_Sandbox] = field(default_factory=list)
    idle: asyncio.Queue[_Sandbox] = field(default_factory=asyncio.Queue)
    logs: list[dict[str, Any]] = field(default_factory=list)


class FunctionHost:
    def __init__(self, runtime: EnclaveRuntime) -> None:
        self.runtime = runtime
        self.loaded: LoadedFunction | None = None
        runtime.channel.handlers.update({"load_function": self.op_load, "invoke": self.op_invoke})
        runtime.on_shutdown.append(self.shutdown)

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
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                function_worker.serve(child, spec, secrets)
            except BaseException:  # noqa: BLE001 - never return into the runtime's loop
                code = 70
            finally:
                os._exit(code)
        child.close()
        reader, writer = await asyncio.open_connection(sock=parent)
        sandbox = _Sandbox(pid, reader, writer)
        loaded = await asyncio.wait_for(sandbox.recv(), 30)
        if not loaded.get("ok"):
            sandbox.kill()
            raise EnclaveError(str(loaded.get("error") or "the function did not load"))
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
        loaded = LoadedFunction(spec)
        concurrency = max(1, int(measured.get("concurrency", 1)))
        for _ in range(concurrency):
            sandbox = await self._spawn(spec)
            loaded.sandboxes.append(sandbox)
            loaded.idle.put_nowait(sandbox)
        self.loaded = loaded
        return {"loaded": measured.get("function"), "sandboxes": concurrency}

    async def _replace(self, dead: _Sandbox) -> None:
        assert self.loaded is not None
        dead.kill()
        with contextlib.suppress(ValueError):
            self.loaded.sandboxes.remove(dead)
        fresh = await self._spawn(self.loaded.spec)
        self.loaded.sandboxes.append(fresh)
        self.loaded.idle.put_nowait(fresh)

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

    async def _run(self, sandbox: _Sandbox, request: dict[str, Any]) -> dict[str, Any]:
        await sandbox.send(request)
        while True:
            message = await sandbox.recv()
            if message.get("op") == "call":
                await sandbox.send(await self._bridge(message))
                continue
            return message

    async def op_invoke(self, msg: dict[str, Any]) -> dict[str, Any]:
        loaded = self.loaded
        if loaded is None:
            raise EnclaveError("no function is loaded in this enclave")
        raw = msg.get("input")
        if not isinstance(raw, bytes):
            raise EnclaveError("invoke needs the input as bytes")
        decrypted_from = None
        if msg.get("encrypted"):
            decrypted_from = raw
            raw = self._open_input(raw)
        try:
            event = json.loads(raw)
        except ValueError:
            raise EnclaveError("the input is not JSON") from None
        input_bytes = canonical(event)
        timeout = float(msg.get("function_timeout") or 30)
        invocation_id = str(msg.get("invocation_id") or uuid.uuid4().hex)
        started = time.time()
        sandbox = await loaded.idle.get()
        status, output, error = "ok", b"null", None
        try:
            reply = await asyncio.wait_for(
                self._run(
                    sandbox,
                    {
                        "op": "invoke",
                        "input": input_bytes,
                        "invocation_id": invocation_id,
                        "deadline": started + timeout,
                    },
                ),
                timeout,
            )
            if reply.get("ok"):
                output = bytes(reply["output"])
            else:
                status, error = "error", str(reply.get("error"))
            loaded.idle.put_nowait(sandbox)
        except TimeoutError:
            status, error = "timeout", f"the function did not finish within {timeout:g} s and was stopped"
            await self._replace(sandbox)
        except (asyncio.IncompleteReadError, ConnectionError, EnclaveError) as exc:
            status = "error"
            error = f"the function's sandbox died ({type(exc).__name__}); it was replaced"
            await self._replace(sandbox)
        finished = time.time()
        receipt = self._receipt(loaded, invocation_id, input_bytes, output, status, error, started, finished)
        out: dict[str, Any] = {"status": status, "receipt": receipt, "error": error}
        reply_key = msg.get("reply_key")
        if isinstance(reply_key, bytes):
            out["output_encrypted"] = self._seal_output(output, reply_key)
        else:
            out["output"] = output
        if decrypted_from is not None:
            out["input_ciphertext_sha256"] = hashlib.sha256(decrypted_from).hexdigest()
        return out

    def _open_input(self, ciphertext: bytes) -> bytes:
        from r3e_tee.functions.e2e import open_input

        try:
            return open_input(ciphertext, self.runtime.keys.hpke)
        except ValueError as exc:
            raise EnclaveError(f"cannot decrypt the input: {exc}") from None

    @staticmethod
    def _seal_output(output: bytes, reply_key: bytes) -> bytes:
        from r3e_tee.functions.e2e import seal_output

        return seal_output(output, reply_key)

    def _receipt(
        self,
        loaded: LoadedFunction,
        invocation_id: str,
        input_bytes: bytes,
        output: bytes,
        status: str,
        error: str | None,
        started: float,
        finished: float,
    ) -> dict[str, Any]:
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
            "enclave_key": base64.urlsafe_b64encode(self.runtime.keys.p256_public).rstrip(b"=").decode(),
            "attestation": {"id": self.runtime.attestation_id, "token": self.runtime.token},
            "started_at": round(started, 6),
            "finished_at": round(finished, 6),
        }
        signature = self.runtime.keys.sign(RECEIPT_DOMAIN + canonical(body))
        return {"body": body, "signature": base64.b64encode(signature).decode(), "alg": "ES256"}

    def shutdown(self) -> None:
        if self.loaded is not None:
            for sandbox in self.loaded.sandboxes:
                sandbox.kill()
            self.loaded = None


def install(runtime: EnclaveRuntime) -> None:
    FunctionHost(runtime)
