"""A hostile function against its sandbox, on a live development service: each probe is
something a handler could try to reach the enclave runtime, the service, or other functions."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from tests.enclaves.conftest import LiveService, start_service, stop_service

from r3e_tee.errors import ReceiptError
from r3e_tee.functions.receipts import RECEIPT_DOMAIN, canonical, verify_receipt
from r3e_tee.runtime.function_worker import _scrub

from .conftest import deploy

HOST_SECRET = "R3E_TEST_HOST_SECRET"  # stands for a worker's R3E_TEE_TOKEN, a store URL
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
    if op == "fds":  # what this process holds besides stdio
        links = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                links[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass  # the listing's own descriptor, closed already
        return {"links": sorted(v for k, v in links.items() if int(k) > 2)}
    if op == "fork":  # a grandchild would outlive the deadline's kill; many are a fork bomb
        try:
            pid = os.fork()
        except OSError as exc:
            return {"forked": False, "error": _err(exc)}
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return {"forked": True}
    if op == "exec":
        try:
            os.execv("/bin/true", ["true"])
        except OSError as exc:
            return {"error": _err(exc)}
    if op == "kill":  # signal 0: the permission check without a signal
        seen = {}
        for name, pid in (("self", os.getpid()), ("parent", os.getppid()), ("group", 0)):
            try:
                os.kill(pid, 0)
                seen[name] = "allowed"
            except OSError as exc:
                seen[name] = _err(exc)
        return seen
    if op == "shared_memory":  # MAP_SHARED | MAP_ANONYMOUS is not counted by RLIMIT_DATA
        import mmap
        try:
            m = mmap.mmap(-1, event["mib"] * 1024 * 1024)
        except OSError as exc:
            return {"mapped": False, "error": _err(exc)}
        for i in range(0, len(m), 4096):
            m[i] = 1
        return {"mapped": True}
    if op == "nsm_ioctl":  # NSM_IOCTL_REQUEST: ENOTTY on /dev/null if it gets to the driver
        import fcntl
        with open("/dev/null", "rb") as f:
            try:
                fcntl.ioctl(f.fileno(), 0xC0200A00, bytes(32))
            except OSError as exc:
                return {"error": _err(exc)}
        return {"error": None}
    if op == "seal":
        return {"sealed": len(ctx.seal(b"cached key"))}
    if op == "sealing_keys":  # what the runtime's secrets extension holds in this process
        import gc
        gc.unfreeze()
        held = [o for o in gc.get_objects() if type(o).__name__ == "SecretsExtension"]
        return {"ciphers": sum(len(o._ciphers) for o in held), "found": len(held)}
    if op == "environ":
        return {"names": sorted(os.environ)}
    if op == "host_environ":  # the enclave runtime's parent (the zygote) and the service
        with open(f"/proc/{os.getppid()}/status") as f:
            zygote = int(next(line for line in f if line.startswith("PPid:")).split()[1])
        seen = {}
        for name, pid in (("zygote", zygote), ("service", event["service"])):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    seen[name] = f.read().decode(errors="replace")
            except OSError as exc:
                seen[name] = _err(exc)
        return seen
    if op == "seal_blob":
        import base64
        return {"blob": base64.b64encode(ctx.seal(b"for probe only")).decode()}
    if op == "unseal_blob":
        import base64
        return {"plain": ctx.unseal(base64.b64decode(event["blob"])).decode()}
    if op == "sign":
        import base64
        return {"sig": base64.b64encode(ctx.sign(base64.b64decode(event["data"]))).decode()}
    if op == "die":
        os._exit(3)
    return {"pid": os.getpid()}
"""

JS_PROBE = b"""
function handler(event, ctx) {
  if (event.op === "alloc") { const a = []; for (;;) { a.push(new Array(1 << 16).fill(1)); } }
  if (event.op === "loop") { for (;;) {} }
  if (event.op === "reach") {  // anything of the host interpreter behind the bridge functions?
    const seen = {};
    for (const name of ["require", "process", "os", "sys", "__import__", "globalThis.__builtins__"]) {
      try { seen[name] = typeof eval(name); } catch (e) { seen[name] = "undefined"; }
    }
    seen.sign = typeof __r3e_sign;
    seen.constructed = typeof Function("return this")().__r3e_sign;
    seen.own = Object.getOwnPropertyNames(__r3e_sign).sort().join(",");
    return seen;
  }
  return {ok: true};
}
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    base = tmp_path_factory.mktemp("hostile")
    os.environ[HOST_SECRET] = "the-service-token-in-its-environment"
    try:
        svc = start_service(base / "data", base / "state")
    finally:
        del os.environ[HOST_SECRET]
    try:
        with svc.client() as c:
            deploy(c, "probe", "python", PROBE, timeout="5s", memory="64M", concurrency=2)
            deploy(c, "probe-one", "python", PROBE, timeout="1s", memory="64M", concurrency=1)
            deploy(c, "probe-js", "javascript", JS_PROBE, timeout="2s", memory="32M", concurrency=1)
        yield svc
    finally:
        stop_service(svc)


def invoke(svc: LiveService, op: str, function: str = "probe", **args: Any) -> dict[str, Any]:
    with svc.client() as c:
        r = c.post(f"/v1/functions/{function}/invoke", content=json.dumps({"op": op, **args}))
    result: dict[str, Any] = r.json()
    return result


def probe(svc: LiveService, op: str, function: str = "probe", **args: Any) -> dict[str, Any]:
    result = invoke(svc, op, function, **args)
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


def test_a_function_inherits_no_descriptor_but_its_own_socket(hostile: LiveService) -> None:
    # the runtime's channel to its host, the other sandbox's socket, the event loop's epoll and
    # io_uring: none of them is the function's
    links = probe(hostile, "fds")["links"]
    assert len([link for link in links if link.startswith("socket:")]) == 1, links
    assert not [link for link in links if "eventpoll" in link or "io_uring" in link or "pipe:" in link], links


def test_a_function_cannot_fork_exec_or_signal_other_processes(hostile: LiveService) -> None:
    assert probe(hostile, "fork") == {"forked": False, "error": "PermissionError:1"}
    assert probe(hostile, "exec") == {"error": "PermissionError:1"}
    assert probe(hostile, "kill") == {
        "self": "allowed",
        "parent": "PermissionError:1",
        "group": "PermissionError:1",
    }
    assert probe(hostile, "nsm_ioctl") == {"error": "PermissionError:1"}


def test_shared_memory_counts_against_the_memory_limit(hostile: LiveService) -> None:
    over = invoke(hostile, "shared_memory", mib=256)
    assert over["status"] == "ok" and over["output"]["mapped"] is False, over
    assert probe(hostile, "shared_memory", mib=8) == {"mapped": True}  # within the limit


def test_a_replacement_sandbox_holds_no_sealing_key(hostile: LiveService) -> None:
    assert probe(hostile, "seal", "probe-one")["sealed"] > 0  # the runtime caches the key now
    died = invoke(hostile, "die", "probe-one")  # the runtime forks a new sandbox after this
    assert died["status"] == "error" and "replaced" in died["error"], died
    held = probe(hostile, "sealing_keys", "probe-one")
    assert held["found"] == 1 and held["ciphers"] == 0, held
    assert probe(hostile, "seal", "probe-one")["sealed"] > 0  # ctx.seal still works


def test_a_function_sees_none_of_the_service_environment(hostile: LiveService) -> None:
    assert hostile.env[HOST_SECRET]  # the service was started with it
    names = probe(hostile, "environ")["names"]
    assert HOST_SECRET not in names and "XDG_STATE_HOME" not in names, names
    seen = probe(hostile, "host_environ", service=hostile.proc.pid)
    for name, text in seen.items():
        assert HOST_SECRET not in text, f"a function read the {name}'s environment"
    assert seen["service"] == "PermissionError:13", seen


def test_ctx_sign_cannot_forge_a_receipt(hostile: LiveService) -> None:
    with hostile.client() as c:
        real = invoke(hostile, "ping")
        jwks = c.get("/.well-known/jwks.json").json()
    verify_receipt(real["receipt"], jwks)
    forged_body = {**real["receipt"]["body"], "output_sha256": "00" * 32}
    # whatever the function asks the enclave's key to sign, it is under the function domain
    for data in (canonical(forged_body), RECEIPT_DOMAIN + canonical(forged_body)):
        sig = probe(hostile, "sign", data=base64.b64encode(data).decode())["sig"]
        forged = {**real["receipt"], "body": forged_body, "signature": sig}
        with pytest.raises(ReceiptError, match="does not verify"):
            verify_receipt(forged, jwks)


def test_a_function_cannot_unseal_another_functions_data(hostile: LiveService) -> None:
    blob = probe(hostile, "seal_blob")["blob"]
    assert probe(hostile, "unseal_blob", blob=blob) == {"plain": "for probe only"}
    other = invoke(hostile, "unseal_blob", "probe-one", blob=blob)
    assert other["status"] == "error" and "does not open" in other["error"], other


def test_javascript_stays_within_its_limits_and_reaches_no_python(hostile: LiveService) -> None:
    alloc = invoke(hostile, "alloc", "probe-js")
    assert alloc["status"] == "error" and "memory" in alloc["error"].lower(), alloc
    assert invoke(hostile, "ping", "probe-js")["status"] == "ok"  # recovered
    loop = invoke(hostile, "loop", "probe-js")
    assert loop["status"] == "timeout", loop
    assert invoke(hostile, "ping", "probe-js")["status"] == "ok"
    seen = probe(hostile, "reach", "probe-js")
    assert seen["sign"] == "function" and seen["constructed"] == "function"
    assert {seen[k] for k in ("require", "process", "os", "sys", "__import__")} == {"undefined"}
    assert set(seen["own"].split(",")) <= {"length", "name"}, seen  # no handle on the Python callable


def test_errors_hide_secrets_in_every_form_an_exception_shows_them() -> None:
    secrets = {"k": b"tok'en\n\xff-42"}
    value = secrets["k"]
    text = value.decode(errors="ignore")
    for message in (text, repr(text), repr(value), value.hex(), base64.b64encode(value).decode()):
        scrubbed = _scrub(f"ValueError: bad {message} here", secrets)
        assert scrubbed.startswith("ValueError: bad ") and "***" in scrubbed, (message, scrubbed)
        assert "en\\n" not in scrubbed and "42" not in scrubbed.replace("***", ""), scrubbed
