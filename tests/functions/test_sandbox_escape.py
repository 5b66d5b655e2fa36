"""A hostile function against its sandbox, on a live development service: each probe is
something a handler could try to reach the enclave runtime, the service, or other functions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from tests.enclaves.conftest import LiveService, start_service, stop_service

from .conftest import deploy

PROBE = b"""
import ctypes, os

def _err(exc):
    return f"{type(exc).__name__}:{exc.errno}"

def handler(event, ctx):
    op = event["op"]
    if op == "open_tree":  # a clone of / without the tmpfs that hides the data directory
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        fd = libc.syscall(428, -100, b"/", 1 | 0x80000)  # OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
        if fd < 0:
            return {"errno": ctypes.get_errno()}
        try:
            return {"listing": os.listdir(f"/proc/self/fd/{fd}/{event['path'].lstrip('/')}")}
        except OSError as exc:
            return {"listing": None, "error": _err(exc)}
    if op == "parent_mem":
        pid = os.getppid()
        try:
            with open(f"/proc/{pid}/maps") as f:
                start = int(f.readline().split("-")[0], 16)
            with open(f"/proc/{pid}/mem", "rb") as f:
                f.seek(start)
                return {"read": len(f.read(64))}
        except OSError as exc:
            return {"read": None, "error": _err(exc)}
    if op == "caps":
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd")}
    return {"pid": os.getpid()}
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    base = tmp_path_factory.mktemp("hostile")
    svc = start_service(base / "data", base / "state")
    try:
        with svc.client() as c:
            deploy(c, "probe", "python", PROBE, timeout="5s", memory="64M", concurrency=2)
        yield svc
    finally:
        stop_service(svc)


def probe(svc: LiveService, op: str, **args: Any) -> dict[str, Any]:
    with svc.client() as c:
        r = c.post("/v1/functions/probe/invoke", content=json.dumps({"op": op, **args}))
    result: dict[str, Any] = r.json()
    assert result.get("status") == "ok", result
    output: dict[str, Any] = result["output"]
    return output


def test_the_new_mount_api_does_not_uncover_the_service_data_directory(hostile: LiveService) -> None:
    assert (hostile.data_dir / "kek.key").exists()
    seen = probe(hostile, "open_tree", path=str(hostile.data_dir))
    assert seen.get("errno") or seen.get("listing") is None, f"a function listed {seen['listing']}"


def test_a_function_cannot_read_the_enclave_runtime_memory(hostile: LiveService) -> None:
    seen = probe(hostile, "parent_mem")
    assert seen["read"] is None, "a function read its enclave runtime's memory"


def test_a_function_holds_no_capabilities(hostile: LiveService) -> None:
    caps = probe(hostile, "caps")
    assert int(caps["CapEff"], 16) == 0 and int(caps["CapPrm"], 16) == 0, caps
    assert int(caps["CapBnd"], 16) == 0, caps
