"""The floor of the invocation path's shape: three Python processes relaying bytes, nothing else.

    .venv/bin/python bench/bench_relay_floor.py [--seconds 6] [--connections 32] [--rounds 3]

A diagnostic, not a target. Issue 6 prescribes the path an invocation takes: the HTTP service,
then the enclave runtime (its own process), then a warm sandboxed subprocess fed over a pipe,
and back. This script builds that shape with no product code at all and measures it against the
bare ASGI endpoint, both under the same uvicorn settings as bench_invoke.py:

* the front is a raw ASGI app that reads the body, writes it as one length-prefixed frame to the
  relay process over a UNIX socket and answers what comes back (no auth, routing, metrics, log);
* the relay (asyncio on uvloop, as the enclave runtime) forwards each frame to its sandbox and
  the sandbox's answer back, writes coalesced per loop turn (no parsing, hashing or signing);
* the sandbox is a blocking loop, as the real one: read a frame, write it back.

Up to four sandboxes take frames in turn, as the benchmark's function has four. Whatever this
reaches relative to the bare endpoint is more than any faithful implementation of the issue's
path can reach here: the real one does the same relaying plus the work the product exists for.
``--relay-work-us N`` adds N microseconds of busy work per invocation in the relay process, to
show how the ratio falls as the enclave runtime's share of the work grows.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_invoke import free_port, load, measured_load, start_bare, wait_ready

FRAMING = r'''
import asyncio, struct

LEN = struct.Struct(">I")


class Framed(asyncio.Protocol):
    """Length-prefixed frames; writes made in one loop turn leave in one send."""

    def __init__(self, on_frame):
        self.buf = bytearray()
        self.on_frame = on_frame
        self.out = []

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        buf = self.buf
        buf += data
        while len(buf) >= 4:
            (n,) = LEN.unpack_from(buf)
            if len(buf) < 4 + n:
                break
            frame = bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            self.on_frame(self, frame)

    def send(self, frame):
        if not self.out:
            asyncio.get_running_loop().call_soon(self.flush)
        self.out.append(LEN.pack(len(frame)) + frame)

    def flush(self):
        out, self.out = self.out, []
        self.transport.write(b"".join(out))
'''

RELAY = (
    FRAMING
    + r'''
import os, socket, sys, time
import uvloop


def sandbox(sock):
    """Blocking, as the real sandbox: one frame in, the same frame out."""
    f = sock.makefile("rb", buffering=0)
    while True:
        head = f.read(4)
        if len(head) < 4:
            os._exit(0)
        (n,) = LEN.unpack(head)
        body = f.read(n)
        sock.sendall(head + body)


async def main(path, sandboxes, work):
    loop = asyncio.get_running_loop()
    waiting = []  # per sandbox: the front connections awaiting its answers, in order
    boxes = []
    for _ in range(sandboxes):
        a, b = socket.socketpair()
        if os.fork() == 0:
            a.close()
            sandbox(b)
        b.close()
        queue = []
        waiting.append(queue)

        def answered(proto, frame, queue=queue):
            queue.pop(0).send(frame)

        _, proto = await loop.create_connection(lambda: Framed(answered), sock=a)
        boxes.append(proto)
    turn = [0]

    def request(proto, frame):
        if work:  # --relay-work-us: stand-in for what the enclave runtime does per invocation
            end = time.perf_counter() + work
            while time.perf_counter() < end:
                pass
        i = turn[0] = (turn[0] + 1) % len(boxes)
        waiting[i].append(proto)
        boxes[i].send(frame)

    server = await loop.create_unix_server(lambda: Framed(request), path)
    print("ready", flush=True)
    await server.serve_forever()


uvloop.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) / 1e6))
'''
)

FRONT = (
    FRAMING
    + r"""
PATH = @PATH@
_conn = None
_pending = {}  # request number -> the future its answer resolves
_next = [0]


def _answered(proto, frame):
    _pending.pop(int.from_bytes(frame[:8], "big")).set_result(frame[8:])


async def app(scope, receive, send):
    global _conn
    if scope["type"] != "http":
        return
    if _conn is None:
        _, _conn = await asyncio.get_running_loop().create_unix_connection(lambda: Framed(_answered), PATH)
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    rid = _next[0] = _next[0] + 1
    _pending[rid] = asyncio.get_running_loop().create_future()
    _conn.send(rid.to_bytes(8, "big") + body)
    answer = await _pending[rid]
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"status":"ok","output":' + answer + b'}'})
"""
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--sandboxes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--relay-work-us",
        type=float,
        default=0.0,
        help="busy CPU time added per invocation in the relay process (what the enclave runtime"
        " spends per invocation is printed by bench_invoke.py)",
    )
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sock_path = str(Path(tmp) / "relay.sock")
        (Path(tmp) / "relay.py").write_text(RELAY)
        (Path(tmp) / "front.py").write_text(FRONT.replace("@PATH@", repr(sock_path)))
        relay = subprocess.Popen(
            [
                sys.executable,
                str(Path(tmp) / "relay.py"),
                sock_path,
                str(args.sandboxes),
                str(args.relay_work_us),
            ],
            stdout=subprocess.PIPE,
        )
        assert relay.stdout is not None and relay.stdout.readline().strip() == b"ready"
        port = free_port()
        front = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {tmp!r}); import uvicorn, front; "
                f"uvicorn.run(front.app, host='127.0.0.1', port={port}, log_config=None, "
                "access_log=False, server_header=False)",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        bare, bare_url = start_bare(tmp)
        try:
            relay_url = f"http://127.0.0.1:{port}"
            wait_ready(f"{relay_url}/")
            wait_ready(f"{bare_url}/")
            for url in (bare_url, relay_url):
                load(f"{url}/invoke", {}, 2, args.connections)
            for _ in range(args.rounds):
                bare_rps, _, tool, bare_cpu = measured_load(
                    f"{bare_url}/invoke", {}, args.seconds, args.connections, {"server": bare.pid}
                )
                rps, lat, _, relay_cpu = measured_load(
                    f"{relay_url}/invoke",
                    {},
                    args.seconds,
                    args.connections,
                    {"front": front.pid, "relay and sandboxes": relay.pid},
                )
                rows.append((bare_rps, rps, lat, bare_cpu, relay_cpu))
        finally:
            for p in (front, bare, relay):
                p.terminate()
                p.wait(10)
    print(f"load generator: {tool}; {args.connections} connections, {args.seconds} s per run")
    for i, (bare_rps, rps, lat, bare_cpu, relay_cpu) in enumerate(rows, 1):
        print(
            f"round {i}: bare ASGI {bare_rps:8.0f} req/s | 3-process relay {rps:8.0f} req/s"
            f" p99 {lat['99']:5.2f} ms | ratio {rps / bare_rps:.2f}"
        )
        print(f"  bare ASGI  {bare_cpu}")
        print(f"  relay      {relay_cpu}")
    ratio = statistics.median(row[1] / row[0] for row in rows)
    print(f"median ratio, bare relay / bare endpoint: {ratio:.2f} (issue 6 asks the product for >= 0.50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
