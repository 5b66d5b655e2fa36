"""What the service's HTTP layer alone costs per warm invocation: the ceiling for bench_invoke.

    .venv/bin/python bench/bench_service_ceiling.py [--seconds 6] [--connections 32]

A diagnostic, not a target. The real service app (auth, fast route, scheduler, channel API,
answer rendering, metrics, access log) is served by uvicorn exactly as in bench_invoke.py, but
its one function's enclave is an in-process object that answers every invocation at once with
a fixed receipt: no enclave process, sandbox or signature. Whatever throughput this reaches
relative to the bare ASGI endpoint is the most any enclave behind this service could reach, so
it tells how much of bench_invoke's gap is the service itself and how much the enclave path.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_invoke import BARE_APP, free_port, load, measured_load, wait_ready

TOKEN = "r3e_bench-ceiling-admin-token-0123456789"

SERVICE = """
import sys
from pathlib import Path
import uvicorn
from r3e_tee.config import TeeConfig
from r3e_tee.functions.model import FunctionConfig
from r3e_tee.logging import configure_logging
from r3e_tee.service.__main__ import build_context
from r3e_tee.service.app import create_app
from r3e_tee.service.auth import token_hash

RECEIPT = b'{"alg":"ES256","body":{"v":1},"signature":"' + b"A" * 1800 + b'"}'  # a real one's size


class InstantChannel:
    is_open = True

    async def request(self, op, timeout=None, **args):
        return {"status": "ok", "receipt_json": RECEIPT, "error": None, "output": args["input"],
                "run_time": 0.0001}


class InstantEnclave:
    channel = InstantChannel()
    on_exit = []
    alive = True


async def launch(fv):
    return "e" * 32, InstantEnclave()


cfg = TeeConfig()
cfg = cfg.model_copy(update={
    "server": cfg.server.model_copy(update={"data_dir": Path(sys.argv[1]),
                                            "admin_token_hashes": (token_hash(sys.argv[3]),)}),
    "workers": cfg.workers.model_copy(update={"embedded": False}),
})
configure_logging("info", stream=open("/dev/null", "w"))
ctx = build_context(cfg)
functions = ctx.components["functions"]
functions.registry.deploy(
    FunctionConfig(name="echo", runtime="python", idempotent=True, concurrency=4, memory=32 * 2**20),
    b"def handler(event, ctx):\\n    return event\\n",
)
functions.scheduler._launch = launch
uvicorn.run(create_app(ctx), host="127.0.0.1", port=int(sys.argv[2]), log_config=None,
            access_log=False, server_header=False)
"""


def serve(code: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name in ("bare", "service"):
            port = free_port()
            if name == "bare":
                app_file = Path(tmp) / "bare_asgi.py"
                app_file.write_text(BARE_APP)
                code = (
                    f"import sys; sys.path.insert(0, {tmp!r}); import uvicorn, bare_asgi; "
                    f"uvicorn.run(bare_asgi.app, host='127.0.0.1', port={port}, log_config=None, "
                    "access_log=False, server_header=False)"
                )
                proc, headers, ready = serve(code), {}, f"http://127.0.0.1:{port}/"
            else:
                data = Path(tmp) / "data"
                data.mkdir()
                proc = serve(SERVICE, str(data), str(port), TOKEN)
                headers, ready = {"Authorization": f"Bearer {TOKEN}"}, f"http://127.0.0.1:{port}/healthz"
            try:
                wait_ready(ready)
                url = f"http://127.0.0.1:{port}/v1/functions/echo/invoke"
                load(url, headers, 2, args.connections)  # warm-up
                results[name] = measured_load(url, headers, args.seconds, args.connections, {name: proc.pid})
            finally:
                proc.terminate()
                proc.wait(30)
    (bare, bare_lat, tool, bare_cpu), (svc, svc_lat, _, svc_cpu) = results["bare"], results["service"]
    print(f"load generator: {tool}; {args.connections} connections, {args.seconds} s")
    print(f"bare ASGI endpoint:                    {bare:8.0f} req/s  p99 {bare_lat['99']:.2f} ms")
    print(f"  {bare_cpu}")
    print(f"service, enclave answering at once:    {svc:8.0f} req/s  p99 {svc_lat['99']:.2f} ms")
    print(f"  {svc_cpu}")
    print(
        f"ceiling for bench_invoke's ratio: {svc / bare:.2f} of the bare endpoint"
        " (what the HTTP layer leaves for any enclave path)"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
