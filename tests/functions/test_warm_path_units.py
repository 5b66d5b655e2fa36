"""Units of the warm invocation path: channel framing, the sandbox frames, the receipt
signer, the scheduler's hand-off and the function-version cache."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from r3e_tee.errors import EnclaveError, FunctionError, ReceiptError
from r3e_tee.functions.model import FunctionConfig
from r3e_tee.functions.receipts import RECEIPT_DOMAIN, canonical, signed_message
from r3e_tee.functions.registry import FunctionRegistry, FunctionVersion
from r3e_tee.functions.scheduler import MAX_PIPELINE_DEPTH, PIPELINE_BUDGET, InvokeResult, Pool
from r3e_tee.runtime import function_worker
from r3e_tee.runtime.channel import Channel, encode_frame
from r3e_tee.runtime.functions import FunctionHost, ReceiptSigner, _SandboxProtocol, _Unsigned
from r3e_tee.runtime.keys import EnclaveKeys
from r3e_tee.store import open_store


async def _pair() -> tuple[Channel, Channel, socket.socket]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    return Channel(ra, wa, name="a"), Channel(rb, wb, name="b"), a


def test_channel_reassembles_frames_split_anywhere_and_batched() -> None:
    async def main() -> None:
        raw_a, raw_b = socket.socketpair()
        rb, wb = await asyncio.open_connection(sock=raw_b)
        b = Channel(rb, wb, name="b")
        seen: list[int] = []

        async def note(msg: dict[str, Any]) -> dict[str, Any]:
            seen.append(msg["n"])
            return {}

        b.handlers["note"] = note
        b.start()
        payloads = [b"", b"x" * 5, b"y" * 70_000, b"z" * 3]
        stream = b"".join(
            encode_frame({"id": n, "op": "note", "n": n, "pad": payloads[n % len(payloads)]})
            for n in range(60)
        )
        rng = random.Random(7)
        raw_a.setblocking(False)
        loop = asyncio.get_running_loop()
        i = 0
        while i < len(stream):  # 1-byte pieces, whole batches and everything between
            step = rng.choice([1, 2, 3, 4, 5, 17, 4096, 100_000])
            await loop.sock_sendall(raw_a, stream[i : i + step])
            i += step
            if rng.random() < 0.2:
                await asyncio.sleep(0)
        deadline = time.monotonic() + 5
        while len(seen) < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert sorted(seen) == list(range(60))
        assert b.is_open
        raw_a.close()
        await asyncio.wait_for(b.closed.wait(), 2)
        await b.aclose()

    asyncio.run(main())


def test_channel_concurrent_requests_times_out_and_fails_pending_on_close() -> None:
    async def main() -> None:
        a, b, _ = await _pair()

        async def echo(msg: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(random.random() / 100)
            return {"n": msg["n"]}

        b.handlers["echo"] = echo
        b.handlers["hang"] = lambda _: asyncio.sleep(10)  # type: ignore[assignment,return-value]
        a.start()
        b.start()
        results = await asyncio.gather(*(a.request("echo", n=n, timeout=5) for n in range(200)))
        assert [r["n"] for r in results] == list(range(200))
        with pytest.raises(EnclaveError, match="no answer"):
            await a.request("hang", timeout=0.05)
        pending = asyncio.ensure_future(a.request("hang", timeout=10))
        await asyncio.sleep(0.05)
        await b.aclose()
        with pytest.raises(EnclaveError):
            await pending
        assert not a._pending
        await a.aclose()

    asyncio.run(main())


def test_channel_over_socket_keeps_what_arrives_before_start_and_answers_both_ways() -> None:
    async def main() -> None:
        raw_a, raw_b = socket.socketpair()
        a = await Channel.over_socket(raw_a, name="a")
        b = await Channel.over_socket(raw_b, name="b")

        async def echo(msg: dict[str, Any]) -> dict[str, Any]:
            return {"n": msg["n"]}

        async def nested(msg: dict[str, Any]) -> dict[str, Any]:
            return await b.request("echo", n=msg["n"] + 1, timeout=5)

        a.handlers["echo"] = echo
        b.handlers["nested"] = nested
        a.start()
        # b has not started: what a sends waits for it, nothing is lost
        early = [asyncio.ensure_future(a.request("nested", n=n, timeout=5)) for n in range(50)]
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in early)
        b.start()
        assert [(await f)["n"] for f in early] == [n + 1 for n in range(50)]
        big = b"\x01" * (3 << 20)  # bigger than any one read: backpressure and reassembly
        b.handlers["size"] = lambda msg: asyncio.sleep(0, {"len": len(msg["blob"])})  # type: ignore[assignment,return-value,misc]
        sizes = await asyncio.gather(*(a.request("size", blob=big, timeout=10) for _ in range(4)))
        assert [r["len"] for r in sizes] == [len(big)] * 4
        await b.aclose()
        await asyncio.wait_for(a.closed.wait(), 2)
        with pytest.raises(EnclaveError):
            await a.request("nested", n=1, timeout=1)
        await a.aclose()

    asyncio.run(main())


def test_sandbox_frames_round_trip_through_the_runtime_protocol() -> None:
    deadline, ident, data = 1796404240.25, "inv-\u00e9", b'{"a": 1}'
    payload = function_worker.invoke_payload(deadline, ident, data)
    assert function_worker.parse_invoke(payload) == (deadline, ident, data)

    proto = _SandboxProtocol()
    frames = [(function_worker.OUTPUT, b"o" * n) for n in (0, 1, 5000, 100_000)]
    stream = b"".join(function_worker.frame(k, p) for k, p in frames)
    for cut in (1, 3, 4, 5, 1000, len(stream)):
        proto = _SandboxProtocol()
        for i in range(0, len(stream), cut):
            proto.data_received(stream[i : i + cut])
        assert list(proto.frames) == frames and proto.lost is None
    bad = _SandboxProtocol()
    bad.data_received((0).to_bytes(4, "big"))  # an empty frame has no kind: malformed
    assert bad.lost and "malformed" in bad.lost


def test_receipt_signer_signs_exactly_the_canonical_body() -> None:
    keys = EnclaveKeys()
    public = keys._signing.public_key()  # type: ignore[union-attr]
    specs = [
        {"enclave_id": "e" * 32, "function": "echo", "measurement": "m" * 64, "version": 3},
        {"enclave_id": "\u00e9\u2028\"'\\", "function": None, "measurement": None, "version": None},
    ]
    for spec in specs:
        for att, token in ((None, None), ("att-1", "h.p.\u00e9")):
            signer = ReceiptSigner(spec, keys, att, token)
            for error, status, inv, t0 in (
                (None, "ok", "0" * 32, 1796404240.12248),
                ("ab" * 32, "error", 'in"v\\\u00e9\n\x00', 0.1),
                (None, "timeout", "x", 1e-7),
                (None, "ok", "y", 12345678901.0),
            ):
                body = {
                    "v": 1,
                    "function": spec["function"],
                    "version": spec["version"],
                    "measurement": spec["measurement"],
                    "invocation_id": inv,
                    "status": status,
                    "input_sha256": "1" * 64,
                    "output_sha256": "2" * 64,
                    "error_sha256": error,
                    "enclave_id": spec["enclave_id"],
                    "enclave_key": signer.enclave_key,
                    "attestation": {"id": att, "token": token},
                    "started_at": round(t0, 6),
                    "finished_at": round(t0 + 0.001, 6),
                }
                message = RECEIPT_DOMAIN + canonical(body)
                assert RECEIPT_DOMAIN + signer.head + signer.tail(body) == message
                assert signer.digest(body) == hashlib.sha256(message).digest()
                public.verify(keys.sign_digest(signer.digest(body)), message, ec.ECDSA(hashes.SHA256()))
            with pytest.raises(EnclaveError):
                signer.tail({**body, "enclave_id": "other"})
            with pytest.raises(EnclaveError):
                signer.tail({**body, "extra": 1})


# -- scheduler ------------------------------------------------------------------------------------


class _Flag:
    def __init__(self) -> None:
        self.value = False

    def is_set(self) -> bool:
        return self.value


class _Handle:
    def __init__(self, eid: str) -> None:
        self.exited = _Flag()
        self.on_exit: list[Any] = []
        self.spec = type("Spec", (), {"id": eid})()

    @property
    def alive(self) -> bool:
        return not self.exited.value


async def _launch_e0(fv: FunctionVersion) -> tuple[str, Any]:
    return "e0", _Handle("e0")


async def _destroy_nothing(eid: str) -> None:
    pass


def _fv(**settings: Any) -> FunctionVersion:
    config = FunctionConfig(name="f", runtime="python", **settings)
    return FunctionVersion(config, 1, b"x=1", "0" * 64, None, 0.0)


def test_pool_hands_a_freed_sandbox_to_the_longest_waiter_only() -> None:
    async def main() -> None:
        launched: list[str] = []

        async def launch(fv: FunctionVersion) -> tuple[str, Any]:
            eid = f"e{len(launched)}"
            launched.append(eid)
            return eid, _Handle(eid)

        async def destroy(eid: str) -> None:
            pass

        pool = Pool(_fv(concurrency=2, max_enclaves=1), launch, destroy)
        first = await pool.acquire(5)  # scales up to the one enclave
        second = await pool.acquire(5)
        assert first is second and first.inflight == 2 and launched == ["e0"]
        order: list[int] = []

        async def wait(n: int) -> None:
            slot = await pool.acquire(5)
            order.append(n)
            await asyncio.sleep(0)
            pool.release_nowait(slot)

        waiters = [asyncio.ensure_future(wait(n)) for n in range(6)]
        await asyncio.sleep(0.01)
        assert pool.waiting == 6 and order == []
        pool.release_nowait(first)
        pool.release_nowait(second)
        await asyncio.gather(*waiters)
        assert order == list(range(6)) and first.inflight == 0 and pool.waiting == 0
        # a waiter that times out leaves the queue; the capacity it did not take stays free
        held = [await pool.acquire(5), await pool.acquire(5)]
        with pytest.raises(FunctionError, match="became free"):
            await pool.acquire(0.05)
        assert not pool._waiters
        for slot in held:
            pool.release_nowait(slot)
        assert first.inflight == 0

    asyncio.run(main())


def test_pool_cancelled_waiter_passes_its_sandbox_on_and_exits_wake_everyone() -> None:
    async def main() -> None:
        handles: dict[str, _Handle] = {}

        async def launch(fv: FunctionVersion) -> tuple[str, Any]:
            eid = f"e{len(handles)}"
            handles[eid] = _Handle(eid)
            return eid, handles[eid]

        async def destroy(eid: str) -> None:
            pass

        pool = Pool(_fv(concurrency=1, max_enclaves=2), launch, destroy)
        a = await pool.acquire(5)
        b = await pool.acquire(5)  # a second enclave
        assert a.enclave_id != b.enclave_id
        w1 = asyncio.ensure_future(pool.acquire(5))
        w2 = asyncio.ensure_future(pool.acquire(5))
        await asyncio.sleep(0.01)
        pool.release_nowait(a)  # handed to w1 ...
        w1.cancel()  # ... which is cancelled before it runs: w2 gets the sandbox
        got = await w2
        assert got is a and a.inflight == 1
        with pytest.raises(asyncio.CancelledError):
            await w1
        pool.release_nowait(got)
        # both enclaves busy, one waiter; an enclave that ends wakes it and it scales up again
        x = await pool.acquire(5)
        assert x is a
        w3 = asyncio.ensure_future(pool.acquire(5))
        await asyncio.sleep(0.01)
        assert pool.waiting == 1 and len(handles) == 2
        handles[b.enclave_id].exited.value = True
        pool._forget(b.enclave_id)
        slot = await asyncio.wait_for(w3, 2)
        assert slot.enclave_id not in (a.enclave_id, b.enclave_id) and len(handles) == 3
        pool.release_nowait(x)
        pool.release_nowait(slot)
        pool.release_nowait(b)  # the ended enclave's invocation finishes late: nothing breaks
        assert b.enclave_id not in pool.slots

    asyncio.run(main())


# -- registry -------------------------------------------------------------------------------------


def test_resolve_caches_briefly_and_local_deploys_and_deletes_take_effect_at_once(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'r.sqlite3'}")  # absolute: sqlite:////tmp/...
    store.migrate()
    try:
        registry = FunctionRegistry(store, resolve_ttl=30)
        other = FunctionRegistry(store, resolve_ttl=0.2)  # another replica
        config = FunctionConfig(name="f", runtime="python")
        registry.deploy(config, b"handler = 1")
        assert registry.resolve("f").version == other.resolve("f").version == 1
        registry.deploy(config, b"handler = 2")
        assert registry.resolve("f").version == 2  # this replica: at once
        assert other.resolve("f").version == 1  # the other: within its TTL
        time.sleep(0.25)
        assert other.resolve("f").version == 2
        assert registry.resolve("f", 1).code == b"handler = 1"
        registry.delete("f")
        with pytest.raises(Exception, match="no function"):
            registry.resolve("f")
        with pytest.raises(Exception, match="no function"):
            registry.resolve("f", 1)
        time.sleep(0.25)
        with pytest.raises(Exception, match="no function"):
            other.resolve("f")
    finally:
        store.close()


def test_pool_pipelines_short_idempotent_functions_only() -> None:
    async def main() -> None:
        quick = Pool(_fv(concurrency=2, max_enclaves=1, idempotent=True), _launch_e0, _destroy_nothing)
        assert quick.depth == 1 and quick.capacity == 2  # nothing measured yet: one per sandbox
        quick.observe_run_time(0.0002)
        assert quick.depth == MAX_PIPELINE_DEPTH and quick.capacity == 2 * MAX_PIPELINE_DEPTH
        held = [await quick.acquire(5) for _ in range(quick.capacity)]
        assert len({id(s) for s in held}) == 1 and held[0].inflight == quick.capacity
        # all but the two running are queued inside the enclave: the queue depth an HPA sees
        assert quick.waiting == 0 and quick.queued == quick.capacity - 2
        with pytest.raises(FunctionError, match="became free"):
            await quick.acquire(0.05)  # the enclave holds all it may: the next caller waits
        for slot in held:
            quick.release_nowait(slot)
        # a function that turns slow stops being queued inside its enclave
        for _ in range(100):
            quick.observe_run_time(1.0)
        assert quick.depth == 1 and quick.capacity == 2
        # between the two, the queue inside an enclave holds about PIPELINE_BUDGET of work
        mid = Pool(_fv(concurrency=1, idempotent=True), _launch_e0, _destroy_nothing)
        mid.observe_run_time(PIPELINE_BUDGET / 3)
        assert mid.depth == 3
        # a function that is not idempotent is never pipelined: a queued invocation lost with
        # its enclave could not be retried
        strict = Pool(_fv(concurrency=2, max_enclaves=1), _launch_e0, _destroy_nothing)
        strict.observe_run_time(0.0002)
        assert strict.depth == 1 and strict.capacity == 2

    asyncio.run(main())


def test_invoke_answer_splices_the_hashed_output_and_the_enclave_receipt() -> None:
    receipt = b'{"alg":"ES256","body":{"note":"r\xc3\xa9sum\xc3\xa9","v":1},"signature":"c2ln"}'

    def result(**kw: Any) -> InvokeResult:
        fields: dict[str, Any] = {
            "invocation_id": 'i\u00e9"',
            "status": "ok",
            "output": b'{"b":1e+300,"a":[1,2]}',
            "output_encrypted": None,
            "receipt_json": receipt,
            "error": None,
            "enclave_id": "e" * 32,
        }
        fields.update(kw)
        return InvokeResult(**fields)

    plain = result()
    answer = plain.to_json_bytes()
    assert b'"output":{"b":1e+300,"a":[1,2]}}' in answer  # the very bytes output_sha256 covers
    assert json.loads(answer) == {**plain.to_json(), "receipt": json.loads(receipt)}
    assert plain.receipt["body"]["note"] == "r\u00e9sum\u00e9"
    # NaN and Infinity are not JSON: they leave as null; a string naming them is untouched
    odd = json.loads(result(output=b'{"x":NaN,"y":[-Infinity,1.5],"s":"NaN"}').to_json_bytes())
    assert odd["output"] == {"x": None, "y": [None, 1.5], "s": "NaN"}
    failed = json.loads(result(status="error", error="ValueError: \u2028x", output=b"null").to_json_bytes())
    assert failed["error"] == "ValueError: \u2028x" and failed["output"] is None
    sealed = json.loads(result(output=None, output_encrypted=b"\x00\xff").to_json_bytes())
    assert sealed["output_encrypted"] == "AP8=" and "output" not in sealed


def test_signed_receipt_text_is_canonical_and_its_body_is_what_was_signed() -> None:
    keys = EnclaveKeys()
    spec = {"enclave_id": "e" * 32, "function": "echo", "measurement": "m" * 64, "version": 2}
    signer = ReceiptSigner(spec, keys, "att-1", "h.p.s")
    body = {
        "v": 1,
        "function": "echo",
        "version": 2,
        "measurement": "m" * 64,
        "invocation_id": "inv-\u00e9",
        "status": "ok",
        "input_sha256": "aa" * 32,
        "output_sha256": "bb" * 32,
        "error_sha256": None,
        "enclave_id": "e" * 32,
        "enclave_key": signer.enclave_key,
        "attestation": {"id": "att-1", "token": "h.p.s"},
        "started_at": 1796404240.122481,
        "finished_at": 1796404240.122999,
    }
    text = signer.sign(body, keys.sign_digest)
    receipt = json.loads(text)
    assert text == canonical(receipt) and receipt["body"] == body and receipt["alg"] == "ES256"
    public = keys._signing.public_key()  # type: ignore[union-attr]
    signature = __import__("base64").b64decode(receipt["signature"])
    public.verify(signature, RECEIPT_DOMAIN + canonical(body), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(
            signature, RECEIPT_DOMAIN + canonical({**body, "status": "error"}), ec.ECDSA(hashes.SHA256())
        )
    with pytest.raises(EnclaveError, match="does not match its enclave"):
        signer.sign({**body, "function": "other"}, keys.sign_digest)


class _RecordingChannel:
    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.direct: dict[str, Any] = {}
        self.answers: list[tuple[Any, dict[str, Any]]] = []
        self.errors: list[tuple[Any, EnclaveError]] = []

    def respond(self, rid: Any, result: dict[str, Any]) -> None:
        self.answers.append((rid, result))

    def respond_error(self, rid: Any, exc: EnclaveError) -> None:
        self.errors.append((rid, exc))


def _turn(count: int) -> tuple[list[dict[str, Any]], EnclaveKeys, _RecordingChannel]:
    """Receipts of ``count`` invocations finished in one loop turn, signed as the runtime does."""
    keys = EnclaveKeys()
    channel = _RecordingChannel()
    runtime = type("Runtime", (), {"keys": keys, "channel": channel, "on_shutdown": []})()
    host = FunctionHost(runtime)  # type: ignore[arg-type]
    spec = {"enclave_id": "e" * 32, "function": "echo", "measurement": "m" * 64, "version": 1}
    signer = ReceiptSigner(spec, keys, "att", "h.p.s")
    for n in range(count):
        body = {
            "v": 1,
            "function": "echo",
            "version": 1,
            "measurement": "m" * 64,
            "invocation_id": f"inv-{n}",
            "status": "ok",
            "input_sha256": f"{n:064x}",
            "output_sha256": f"{n:064x}",
            "error_sha256": None,
            "enclave_id": "e" * 32,
            "enclave_key": signer.enclave_key,
            "attestation": {"id": "att", "token": "h.p.s"},
            "started_at": 1796404240.5 + n,
            "finished_at": 1796404240.75 + n,
        }
        tail, digest = signer.statement(body)
        host._unsigned.append(_Unsigned(n, {"status": "ok"}, signer.head, tail, digest))
    host._sign_turn()
    assert [rid for rid, _ in channel.answers] == list(range(count))
    receipts = [json.loads(out["receipt_json"]) for _, out in channel.answers]
    for out in (o for _, o in channel.answers):
        assert out["receipt_json"] == canonical(json.loads(out["receipt_json"]))
    return receipts, keys, channel


def _check(receipt: dict[str, Any], keys: EnclaveKeys) -> None:
    public = keys._signing.public_key()  # type: ignore[union-attr]
    message = signed_message(receipt, RECEIPT_DOMAIN + canonical(receipt["body"]))
    public.verify(base64.b64decode(receipt["signature"]), message, ec.ECDSA(hashes.SHA256()))


def test_receipts_of_one_turn_share_one_signature_and_each_still_verifies_alone() -> None:
    single, keys, _ = _turn(1)
    assert single[0]["alg"] == "ES256" and "batch" not in single[0]
    _check(single[0], keys)
    receipts, keys, _ = _turn(5)
    assert {r["alg"] for r in receipts} == {"ES256-batch"} and len({r["signature"] for r in receipts}) == 1
    for index, receipt in enumerate(receipts):
        assert receipt["batch"]["index"] == index and len(receipt["batch"]["leaves"]) == 5
        _check(receipt, keys)
    good = receipts[2]
    forged: list[tuple[str, dict[str, Any], type[Exception]]] = [
        ("body", {**good, "body": {**good["body"], "output_sha256": "00" * 32}}, ReceiptError),
        ("index", {**good, "batch": {**good["batch"], "index": 3}}, ReceiptError),
        ("index out of range", {**good, "batch": {**good["batch"], "index": 5}}, ReceiptError),
        ("bool index", {**good, "batch": {**good["batch"], "index": True}}, ReceiptError),
        (
            "a leaf dropped",
            {**good, "batch": {"index": 2, "leaves": good["batch"]["leaves"][:4]}},
            InvalidSignature,
        ),
        (
            "leaves reordered",
            {
                **good,
                "batch": {
                    "index": 2,
                    "leaves": [*good["batch"]["leaves"][1::-1], *good["batch"]["leaves"][2:]],
                },
            },
            InvalidSignature,
        ),
        (
            "a spaced leaf",
            {
                **good,
                "batch": {
                    "index": 2,
                    "leaves": [" " * 2 + good["batch"]["leaves"][0][2:], *good["batch"]["leaves"][1:]],
                },
            },
            ReceiptError,
        ),
        ("one leaf", {**good, "batch": {"index": 0, "leaves": good["batch"]["leaves"][2:3]}}, ReceiptError),
        ("alg", {**good, "alg": "ES256"}, InvalidSignature),
    ]
    for name, receipt, error in forged:
        with pytest.raises(error):
            _check(receipt, keys)
            pytest.fail(f"accepted a receipt with its {name} changed")
    # another enclave's batch signature does not cover this one's statements
    other, other_keys, _ = _turn(5)
    with pytest.raises(InvalidSignature):
        _check({**good, "signature": other[2]["signature"]}, keys)
    # keys gone before the turn ended (shut down): each waiting invocation gets an error
    keys = EnclaveKeys()
    channel = _RecordingChannel()
    host = FunctionHost(type("Runtime", (), {"keys": keys, "channel": channel, "on_shutdown": []})())  # type: ignore[arg-type]
    host._unsigned.append(_Unsigned(7, {}, b"{", b"}", b"\0" * 32))
    keys.zeroize()
    host._sign_turn()
    assert not channel.answers and [rid for rid, _ in channel.errors] == [7]


def test_pool_room_from_a_deeper_pipeline_goes_to_those_already_waiting() -> None:
    async def main() -> None:
        pool = Pool(_fv(concurrency=2, max_enclaves=1, idempotent=True), _launch_e0, _destroy_nothing)
        held = [await pool.acquire(5), await pool.acquire(5)]  # one per sandbox until measured
        order: list[int] = []

        async def wait(n: int) -> None:
            await pool.acquire(5)
            order.append(n)

        waiters = [asyncio.ensure_future(wait(n)) for n in range(3)]
        await asyncio.sleep(0.01)
        assert pool.waiting == 3 and not order
        pool.observe_run_time(0.0002)  # short: the enclave may now hold 16
        late = asyncio.ensure_future(wait(99))
        await asyncio.gather(*waiters, late)
        assert order == [0, 1, 2, 99] and held[0].inflight == 6 and pool.waiting == 0

    asyncio.run(main())


def test_pool_shrinks_an_enclave_to_a_shallower_pipeline() -> None:
    async def main() -> None:
        pool = Pool(_fv(concurrency=1, max_enclaves=1, idempotent=True), _launch_e0, _destroy_nothing)
        pool.observe_run_time(0.0002)
        held = [await pool.acquire(5) for _ in range(MAX_PIPELINE_DEPTH)]
        waiter = asyncio.ensure_future(pool.acquire(5))
        await asyncio.sleep(0.01)
        for _ in range(100):
            pool.observe_run_time(1.0)  # the function turned slow: one at a time
        assert pool.capacity == 1
        for slot in held[:-1]:
            pool.release_nowait(slot)  # above capacity: released, not handed on
            assert not waiter.done()
        pool.release_nowait(held[-1])  # at capacity: the waiter gets it
        assert (await waiter).inflight == 1

    asyncio.run(main())


def test_a_versions_measurement_names_its_key_broker(tmp_path: Path) -> None:
    """The broker key is part of what a function's enclaves are measured with: another broker,
    another measurement, so a receipt also says which broker could have given the function its
    secrets."""
    from r3e_tee.functions.model import enclave_payload, expected_measurement

    config = FunctionConfig(name="f", runtime="python")
    code = b"def handler(event, ctx):\n    return event\n"
    a, b = "A" * 43, "B" * 43
    assert enclave_payload(config, 1, code, a)["broker_key"] == a
    assert len({expected_measurement(config, 1, code, key) for key in (a, b, None)}) == 3
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    try:
        fv = FunctionRegistry(store, broker_key=a).deploy(config, code)
        assert fv.payload["broker_key"] == a and fv.measurement == expected_measurement(config, 1, code, a)
    finally:
        store.close()
