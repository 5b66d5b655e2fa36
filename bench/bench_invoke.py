"""Warm invocation throughput and latency over HTTP, against a bare ASGI endpoint served the same way.

    .venv/bin/python bench/bench_invoke.py [--seconds 8] [--connections 32] [--rounds 3]

Both servers run as a separate process under uvicorn with the same settings, side by side; the
rounds alternate between them (anchor, service, anchor, ...) because this machine's speed drifts
by tens of percent within minutes, and the medians are what is judged; the load comes from
`wrk` (Debian package `wrk`; install it with `apt-get install wrk`) with 32 keep-alive
connections, or, without wrk, from a small asyncio client in this process. The anchor is a raw
ASGI app that reads the request body and answers a small JSON document. Targets (issue 6):
throughput >= 50% of the anchor and p99 <= 10 ms with 32 concurrent clients; cold start to the
first result <= 150 ms on the simulation provider.

Each round also prints where the CPU went, in microseconds per request (from /proc): the
service process, the enclave runtime, its sandboxes, and the rest of the machine (mostly the
load generator). The service is one process, so it can never go faster than one core allows;
bench_relay_floor.py measures the same path with no product code, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BARE_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"status":"ok","output":' + body + b'}'})
"""

ECHO = b"def handler(event, ctx):\n    return event\n"
EVENT = b'{"pair":"NEO/USD","price":12.0}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str) -> None:
    """Until ``url`` answers 200 (a service's /readyz: started and its store reachable)."""
    for _ in range(300):
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200")


def _proc_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds used, command line) of every process (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd)
    return table


def cpu_by_role(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each root process and its descendants, by role. Below an enclave
    zygote, its children are enclave runtimes and theirs the function sandboxes."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}

    def in_zygote(pid: int) -> bool:
        argv = table[pid][2].split()
        return bool(argv) and "python" in Path(argv[0]).name and "r3e_tee.runtime.zygote" in argv

    def walk(pid: int, role: str, depth: int | None) -> None:
        # depth below the enclave zygote: 1 an enclave runtime, 2 its sandboxes
        if depth is None and in_zygote(pid):
            depth = 0
        name = role if not depth else "enclave runtime" if depth == 1 else "sandboxes"
        out[name] = out.get(name, 0.0) + table[pid][1]
        for child in children.get(pid, []):
            if child in table:
                walk(child, role, None if depth is None else depth + 1)

    for role, pid in roots.items():
        if pid in table:
            walk(pid, role, None)
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def measured_load(
    url: str, headers: dict[str, str], seconds: int, connections: int, roots: dict[str, int]
) -> tuple[float, dict[str, float], str, str]:
    """``load`` plus where the CPU went: microseconds per request of each role under ``roots``
    and of everything else on the machine (the load generator, mostly)."""
    before, busy0 = cpu_by_role(roots), machine_busy()
    rps, lat, tool = load(url, headers, seconds, connections)
    after, busy1 = cpu_by_role(roots), machine_busy()
    requests = rps * seconds
    parts, ours = [], 0.0
    for role, used in after.items():
        spent = max(0.0, used - before.get(role, 0.0))
        ours += spent
        parts.append(f"{role} {spent / requests * 1e6:.0f}")
    ticks = os.sysconf("SC_CLK_TCK")
    busy = (busy1[0] - busy0[0]) / ticks
    share = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * (os.cpu_count() or 1)
    parts.append(f"rest of the machine {max(0.0, busy - ours) / requests * 1e6:.0f}")
    return rps, lat, tool, f"CPU us/request: {', '.join(parts)} (cores busy {share:.2f} of {os.cpu_count()})"


def run_wrk(
    url: str, headers: dict[str, str], seconds: int, connections: int
) -> tuple[float, dict[str, float]]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "POST"\n')
        f.write(f"wrk.body = {json.dumps(EVENT.decode())}\n")
        for k, v in headers.items():
            f.write(f'wrk.headers["{k}"] = "{v}"\n')
        script = f.name
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out:
        raise RuntimeError(f"errors under load:\n{out}")
    lat = {}
    for p in ("50", "90", "99"):
        m = re.search(rf"\s{p}(?:\.000)?%\s+([\d.]+)(us|ms|s)", out)
        if m:
            value, unit = float(m.group(1)), m.group(2)
            lat[p] = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    return rps, lat


async def _client_load(
    url: str, headers: dict[str, str], seconds: int, connections: int
) -> tuple[float, list[float]]:
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(EVENT)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    request = head.encode() + EVENT
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        while time.perf_counter() < stop:
            t = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            length, chunked = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
                elif name.lower() == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
            if chunked:  # an ASGI answer without a content-length header comes chunked
                while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
                    await reader.readexactly(size + 2)
                await reader.readline()  # the CRLF after the last (empty) chunk
            else:
                await reader.readexactly(length)
            if b" 200 " not in status:
                raise RuntimeError(status.decode())
            latencies.append((time.perf_counter() - t) * 1000)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return len(latencies) / (time.perf_counter() - start), latencies


def load(
    url: str, headers: dict[str, str], seconds: int, connections: int
) -> tuple[float, dict[str, float], str]:
    if shutil.which("wrk"):
        rps, lat = run_wrk(url, headers, seconds, connections)
        return rps, lat, "wrk"
    rps, latencies = asyncio.run(_client_load(url, headers, seconds, connections))
    q = statistics.quantiles(latencies, n=100)
    return (
        rps,
        {"50": q[49], "90": q[89], "99": q[98]},
        "asyncio client (install wrk for a lighter load generator)",
    )


def start_bare(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    app_file = Path(tmp) / "bare_asgi.py"
    app_file.write_text(BARE_APP)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {tmp!r}); import uvicorn, bare_asgi; "
            f"uvicorn.run(bare_asgi.app, host='127.0.0.1', port={port}, log_config=None, "
            "access_log=False, server_header=False)",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}"


def start_service(tmp: str) -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    env = {**os.environ, "XDG_STATE_HOME": str(Path(tmp) / "state"), "R3E_TEE_CONFIG": ""}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "r3e_tee.service",
            "--dev",
            "--data-dir",
            str(Path(tmp) / "d"),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/readyz")
    return proc, url, (Path(tmp) / "d" / "admin-token").read_text().strip()


def deploy_and_cold_start(url: str, auth: dict[str, str], args: argparse.Namespace) -> list[float]:
    """Deploy the echo function (warm) and a scale-to-zero twin; time five cold starts."""
    with httpx.Client(base_url=url, headers=auth, timeout=60) as c:
        for name, mins in (("cold", 0), ("echo", args.enclaves)):
            r = c.post(
                "/v1/functions",
                json={
                    "name": name,
                    "runtime": "python",
                    "code": base64.b64encode(ECHO).decode(),
                    "concurrency": args.concurrency,
                    "memory": "32M",
                    "enclave_size": max(128, 32 * args.concurrency) * 2**20,
                    "min_enclaves": mins,
                    "max_enclaves": max(1, args.enclaves),
                    "idempotent": True,
                },
            )
            if r.status_code != 201:  # the service's answer says what to change (e.g. enclave size)
                raise SystemExit(f"deploying {name!r} failed: HTTP {r.status_code} {r.text}")
        cold = []
        for _ in range(5):
            t = time.perf_counter()
            r = c.post("/v1/functions/cold/invoke", content=EVENT).json()
            cold.append((time.perf_counter() - t) * 1000)
            assert r.get("status") == "ok", r
            for e in c.get("/v1/enclaves").json():
                if e["function_name"] == "cold":
                    c.delete(f"/v1/enclaves/{e['id']}")
            time.sleep(0.2)
        for _ in range(50):
            assert c.post("/v1/functions/echo/invoke", content=EVENT).json()["status"] == "ok"
    return cold


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4, help="sandboxes per enclave")
    ap.add_argument("--enclaves", type=int, default=1)
    ap.add_argument(
        "--rounds", type=int, default=3, help="anchor/service pairs, alternated (the machine drifts)"
    )
    args = ap.parse_args()

    pairs: list[tuple[float, dict[str, float], float, dict[str, float]]] = []
    cpu: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        bare, bare_url = start_bare(tmp)
        svc, url, token = start_service(tmp)
        try:
            wait_ready(f"{bare_url}/")
            auth = {"Authorization": f"Bearer {token}"}
            cold = deploy_and_cold_start(url, auth, args)
            targets = ((f"{bare_url}/invoke", {}), (f"{url}/v1/functions/echo/invoke", auth))
            for target, headers in targets:
                load(target, headers, 2, args.connections)  # warm-up
            for _ in range(args.rounds):
                bare_rps, bare_lat, tool, bare_cpu = measured_load(
                    targets[0][0], {}, args.seconds, args.connections, {"server": bare.pid}
                )
                rps, lat, _, svc_cpu = measured_load(
                    targets[1][0], auth, args.seconds, args.connections, {"service": svc.pid}
                )
                pairs.append((bare_rps, bare_lat, rps, lat))
                cpu.append((bare_cpu, svc_cpu))
        finally:
            bare.terminate()
            bare.wait()
            svc.terminate()
            svc.wait(30)

    print(f"load generator: {tool}; {args.connections} connections, {args.seconds} s per run")
    for i, (pair, (bare_cpu, svc_cpu)) in enumerate(zip(pairs, cpu, strict=True), 1):
        bare_rps, bare_lat, rps, lat = pair
        print(
            f"round {i}: bare ASGI {bare_rps:8.0f} req/s p99 {bare_lat['99']:5.2f} ms | warm invocation"
            f" {rps:6.0f} req/s p50 {lat['50']:5.2f} p90 {lat['90']:5.2f} p99 {lat['99']:5.2f} ms"
            f" | ratio {rps / bare_rps:.2f}"
        )
        print(f"  bare ASGI        {bare_cpu}")
        print(f"  warm invocation  {svc_cpu}")
    ratio = statistics.median(rps / bare_rps for bare_rps, _, rps, _ in pairs)
    p99 = statistics.median(lat["99"] for *_, lat in pairs)
    met = sum(lat["99"] <= 10 for *_, lat in pairs)
    print(
        f"median throughput ratio vs bare ASGI: {ratio:.2f}"
        f" (target >= 0.50: {'OK' if ratio >= 0.5 else 'MISSED'})"
    )
    print(
        f"median p99: {p99:.2f} ms, <= 10 ms in {met} of {len(pairs)} rounds"
        f" (target <= 10 ms: {'OK' if p99 <= 10 else 'MISSED'})"
    )
    print(
        f"cold start to first result: p50 {statistics.median(cold):.0f} ms, max {max(cold):.0f} ms"
        f" (target <= 150 ms: {'OK' if statistics.median(cold) <= 150 else 'MISSED'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
