"""Functions end to end on a live development service: deploy, invoke, receipts, encryption,
isolation, limits, failures and the asynchronous queue."""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tests.enclaves.conftest import start_service, stop_service

from r3e_tee.attestation.tokens import verify_token
from r3e_tee.errors import ReceiptError
from r3e_tee.functions import e2e
from r3e_tee.functions.receipts import RECEIPT_DOMAIN, canonical, verify_receipt

from .conftest import EXAMPLES, LiveService, deploy

EVENT = {"pair": "NEO/USD", "prices": [11.9, 12.1, 12.0]}


def kill_ready_enclaves(c: httpx.Client, function: str) -> None:
    """SIGKILL the processes of the function's ready enclaves (a crash, as the host sees it)."""
    for e in c.get("/v1/enclaves").json():
        if e["function_name"] == function and e["state"] == "ready":
            os.kill(e["pid"], signal.SIGKILL)


def wait_finished(c: httpx.Client, ids: list[str], seconds: float) -> dict[str, dict]:  # type: ignore[type-arg]
    """The asynchronous invocations that succeeded or failed within ``seconds``, by id."""
    deadline = time.monotonic() + seconds
    done: dict[str, dict] = {}  # type: ignore[type-arg]
    while len(done) < len(ids) and time.monotonic() < deadline:
        for inv in ids:
            if inv not in done:
                state = c.get(f"/v1/invocations/{inv}").json()
                if state["status"] in ("succeeded", "failed"):
                    done[inv] = state
        time.sleep(0.1)
    return done


def test_examples_deploy_invoke_and_receipts_verify_offline(live: LiveService) -> None:
    with live.client() as c:
        oracle = deploy(c, "price-oracle", "python", (EXAMPLES / "price_oracle.py").read_bytes())
        words = deploy(c, "word-stats", "javascript", (EXAMPLES / "word_stats.js").read_bytes())
        assert oracle["version"] == 1 and len(oracle["measurement"]) == 64
        raw = json.dumps(EVENT).encode()
        result = c.post("/v1/functions/price-oracle/invoke", content=raw).json()
        assert result["status"] == "ok" and result["output"]["payload"]["price"] == 12.0
        js = c.post("/v1/functions/word-stats/invoke", content=b'{"text": "a b a"}').json()
        assert js["status"] == "ok" and js["output"]["summary"]["words"] == 3
        jwks = c.get("/.well-known/jwks.json").json()
    output = json.dumps(result["output"]).encode()
    check = verify_receipt(
        result["receipt"], jwks, issuer="r3e-tee-service", input_bytes=raw, output_bytes=output
    )
    assert check.body["measurement"] == oracle["measurement"]
    assert verify_receipt(js["receipt"], jwks).body["measurement"] == words["measurement"]

    # one changed output byte
    changed = copy.deepcopy(result["output"])
    changed["payload"]["price"] = 12.5
    with pytest.raises(ReceiptError, match="output does not match"):
        verify_receipt(result["receipt"], jwks, output_bytes=json.dumps(changed).encode())
    # a receipt body edited and re-signed by another key
    forged = copy.deepcopy(result["receipt"])
    forged["body"]["output_sha256"] = "00" * 32
    other = ec.generate_private_key(ec.SECP256R1())
    forged["signature"] = base64.b64encode(
        other.sign(
            RECEIPT_DOMAIN + canonical(forged["body"]),
            ec.ECDSA(__import__("cryptography.hazmat.primitives.hashes", fromlist=["SHA256"]).SHA256()),
        )
    ).decode()
    with pytest.raises(ReceiptError, match="does not verify"):
        verify_receipt(forged, jwks)
    # ... and with its own key named in the receipt: the token binds another key
    forged["body"]["enclave_key"] = (
        base64.urlsafe_b64encode(
            other.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        )
        .rstrip(b"=")
        .decode()
    )
    forged["signature"] = base64.b64encode(
        other.sign(
            RECEIPT_DOMAIN + canonical(forged["body"]),
            ec.ECDSA(__import__("cryptography.hazmat.primitives.hashes", fromlist=["SHA256"]).SHA256()),
        )
    ).decode()
    with pytest.raises(ReceiptError, match="not the key the attestation token binds"):
        verify_receipt(forged, jwks)
    # a JWKS that is not the issuer's
    with pytest.raises(ReceiptError, match="unknown key"):
        verify_receipt(result["receipt"], {"keys": []})


def test_verify_receipt_checks_the_output_of_a_saved_response(
    live: LiveService, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A saved invoke response carries its output beside the receipt: an edited output there
    must fail offline verification even without --output."""
    from r3e_tee.cli.main import main

    with live.client() as c:
        deploy(c, "price-oracle-saved", "python", (EXAMPLES / "price_oracle.py").read_bytes())
        result = c.post("/v1/functions/price-oracle-saved/invoke", content=json.dumps(EVENT).encode()).json()
        (tmp_path / "jwks.json").write_text(json.dumps(c.get("/.well-known/jwks.json").json()))
    saved = tmp_path / "response.json"
    args = ["verify-receipt", str(saved), "--jwks", str(tmp_path / "jwks.json")]
    saved.write_text(json.dumps(result))
    assert main(args) == 0
    assert "output matches" in capsys.readouterr().out
    result["output"]["payload"]["price"] = 12.5
    saved.write_text(json.dumps(result))
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "output does not match" in captured.err and "valid receipt" not in captured.out


def test_end_to_end_encryption_keeps_plaintext_from_the_operator(tmp_path: Path) -> None:
    secret_text = "confidentialmergerplan7f3a"
    live = start_service(tmp_path / "data", tmp_path / "state")
    with live.client() as c:
        deploy(c, "word-stats-e2e", "javascript", (EXAMPLES / "word_stats.js").read_bytes())
        target = c.get("/v1/functions/word-stats-e2e/enclave").json()
        jwks = c.get("/.well-known/jwks.json").json()
        claims = verify_token(target["token"], jwks)
        key = base64.b64decode(target["x25519"])
        assert base64.urlsafe_b64decode(claims["cnf"]["x25519"] + "==") == key
        reply = x25519.X25519PrivateKey.generate()
        reply_public = reply.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        plaintext = json.dumps({"text": f"{secret_text} {secret_text} ok"}).encode()
        headers = {
            "Content-Type": "application/r3e-hpke",
            "X-R3E-Enclave": target["enclave_id"],
            "X-R3E-Reply-Key": base64.b64encode(reply_public).decode(),
        }
        body = e2e.seal_input(plaintext, key, reply_public)
        result = c.post("/v1/functions/word-stats-e2e/invoke", content=body, headers=headers).json()
        assert "output" not in result and result["status"] == "ok"
        output = e2e.open_output(base64.b64decode(result["output_encrypted"]), reply)
        assert json.loads(output)["summary"]["top"][0] == [secret_text, 2]
        verify_receipt(result["receipt"], jwks, input_bytes=plaintext, output_bytes=output)
        # queued (stored) encrypted invocation
        queued = c.post(
            "/v1/functions/word-stats-e2e/invocations",
            content=e2e.seal_input(plaintext, key, reply_public),
            headers=headers,
        ).json()
        deadline = time.monotonic() + 15
        while (state := c.get(queued["status_url"]).json())["status"] not in (
            "succeeded",
            "failed",
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state["status"] == "succeeded" and "output_encrypted" in state
        # a ciphertext for another key is refused inside the enclave
        wrong = e2e.seal_input(
            plaintext,
            x25519.X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
            reply_public,
        )
        r = c.post("/v1/functions/word-stats-e2e/invoke", content=wrong, headers=headers)
        assert r.status_code >= 400 and "decrypt" in r.text
        # a relay that swaps in a reply key of its own (to read the output) is refused too
        target = c.get("/v1/functions/word-stats-e2e/enclave").json()
        relay = x25519.X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        r = c.post(
            "/v1/functions/word-stats-e2e/invoke",
            content=e2e.seal_input(plaintext, base64.b64decode(target["x25519"]), reply_public),
            headers={
                **headers,
                "X-R3E-Enclave": target["enclave_id"],
                "X-R3E-Reply-Key": base64.b64encode(relay).decode(),
            },
        )
        assert r.status_code >= 400 and "decrypt" in r.text and "output_encrypted" not in r.text
    log_text = stop_service(live)
    assert "attestation accepted" in log_text  # the log was captured
    assert secret_text not in log_text
    db = live.data_dir / "r3e-tee.sqlite3"
    for path in (db, db.with_name(db.name + "-wal")):
        if path.exists():
            assert secret_text.encode() not in path.read_bytes()


BOMB = b"""
import os
def handler(event, ctx):
    if event.get("op") == "write":
        with open("/tmp/marker", "w") as f:
            f.write(event["text"])
        return {"wrote": True}
    if event.get("op") == "read":
        try:
            return {"read": open(event.get("path", "/tmp/marker")).read()}
        except OSError as exc:
            return {"read": None, "error": type(exc).__name__}
    if event.get("op") == "alloc":
        data = bytearray(event["mib"] * 1024 * 1024)
        return {"len": len(data)}
    if event.get("op") == "loop":
        while True:
            pass
    if event.get("op") == "raise":
        raise ValueError("the thing failed")
    if event.get("op") == "net":
        import socket
        try:
            socket.create_connection(("127.0.0.1", 1), timeout=1)
        except OSError as exc:
            return {"net": type(exc).__name__, "errno": exc.errno}
    return {"ok": True, "pid": os.getpid()}
"""


def test_limits_failures_and_isolation(live: LiveService) -> None:
    with live.client() as c:
        deploy(c, "bomb-a", "python", BOMB, timeout="1s", memory="64M", concurrency=1)
        deploy(c, "bomb-b", "python", BOMB, timeout="1s", memory="64M", concurrency=1)

        def call(name: str, event: dict) -> dict:  # type: ignore[type-arg]
            return c.post(f"/v1/functions/{name}/invoke", content=json.dumps(event)).json()  # type: ignore[no-any-return]

        assert call("bomb-a", {"op": "write", "text": "a-private"})["output"] == {"wrote": True}
        assert call("bomb-a", {"op": "read"})["output"]["read"] == "a-private"
        assert call("bomb-b", {"op": "read"})["output"] == {"read": None, "error": "FileNotFoundError"}
        # the service's own files (KEK, admin token, simulated roots) are not visible to functions
        for name in ("kek.key", "admin-token"):
            assert (live.data_dir / name).exists()
            seen = call("bomb-a", {"op": "read", "path": str(live.data_dir / name)})["output"]
            assert seen["read"] is None, f"a function read the service's {name}"

        over = call("bomb-a", {"op": "alloc", "mib": 512})
        assert over["status"] == "error" and "MemoryError" in over["error"]
        assert call("bomb-a", {"op": "ping"})["status"] == "ok"  # recovered

        start = time.monotonic()
        loop = call("bomb-a", {"op": "loop"})
        assert loop["status"] == "timeout" and time.monotonic() - start < 10
        assert call("bomb-a", {"op": "ping"})["status"] == "ok"  # a fresh sandbox / enclave

        raised = call("bomb-a", {"op": "raise"})
        assert raised["status"] == "error" and raised["error"].startswith("ValueError: the thing failed")
        assert raised["receipt"]["body"]["status"] == "error"

        net = call("bomb-a", {"op": "net"})["output"]
        assert net["net"] in ("PermissionError", "OSError") and net["errno"] in (97, 1)


def test_async_invocations_survive_an_enclave_kill_and_dedupe(live: LiveService) -> None:
    slow = b"import time\ndef handler(event, ctx):\n    time.sleep(0.05)\n    return {'n': event['n']}\n"
    with live.client() as c:
        deploy(c, "slow", "python", slow, concurrency=2, max_enclaves=2)
        ids = []
        for n in range(30):
            r = c.post(
                "/v1/functions/slow/invocations",
                content=json.dumps({"n": n}),
                headers={"Idempotency-Key": f"k{n}"},
            )
            assert r.status_code == 202
            ids.append(r.json()["invocation_id"])
        again = c.post(
            "/v1/functions/slow/invocations", content=b'{"n": 0}', headers={"Idempotency-Key": "k0"}
        )
        assert again.status_code == 200 and again.json()["invocation_id"] == ids[0]
        time.sleep(0.3)
        kill_ready_enclaves(c, "slow")
        done = wait_finished(c, ids, 60)
        assert len(done) == len(ids), "invocations were lost"
        assert all(s["status"] == "succeeded" for s in done.values()), [
            s for s in done.values() if s["status"] != "succeeded"
        ]
        assert sorted(s["output"]["n"] for s in done.values()) == list(range(30))


def test_non_idempotent_function_fails_clearly_when_its_enclave_dies(live: LiveService) -> None:
    code = b"import time\ndef handler(event, ctx):\n    time.sleep(event.get('sleep', 0))\n    return {}\n"
    with live.client() as c:
        deploy(c, "fragile", "python", code, concurrency=1, max_enclaves=1, timeout="10s")
        assert c.post("/v1/functions/fragile/invoke", content=b"{}").json()["status"] == "ok"
        enclave = next(
            e
            for e in c.get("/v1/enclaves").json()
            if e["function_name"] == "fragile" and e["state"] == "ready"
        )
        import threading

        killer = threading.Timer(0.5, lambda: os.kill(enclave["pid"], signal.SIGKILL))
        killer.start()
        r = c.post("/v1/functions/fragile/invoke", content=b'{"sleep": 3}')
        assert r.status_code == 502 and "not marked idempotent" in r.json()["message"]
        assert c.post("/v1/functions/fragile/invoke", content=b"{}").json()["status"] == "ok"  # a new enclave


def test_scaling_up_under_load_and_down_when_idle(live: LiveService) -> None:
    import concurrent.futures

    code = b"import time\ndef handler(event, ctx):\n    time.sleep(0.2)\n    return {}\n"
    with live.client() as c:
        deploy(c, "elastic", "python", code, concurrency=1, max_enclaves=3, min_enclaves=0, cooldown="2s")

        def count() -> int:
            return sum(
                1
                for e in c.get("/v1/enclaves").json()
                if e["function_name"] == "elastic" and e["state"] == "ready"
            )

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            statuses = list(
                pool.map(
                    lambda _: c.post("/v1/functions/elastic/invoke", content=b"{}").json()["status"],
                    range(12),
                )
            )
        assert statuses == ["ok"] * 12
        assert count() >= 2
        metrics = c.get("/metrics").text
        assert "r3e_tee_function_queue_depth" in metrics and 'r3e_tee_enclaves{state="ready"}' in metrics
        assert 'r3e_tee_invocation_duration_seconds_bucket{function="elastic"' in metrics
        deadline = time.monotonic() + 15
        while count() > 0 and time.monotonic() < deadline:
            time.sleep(0.25)
        assert count() == 0, "idle enclaves were not scaled down to min_enclaves=0"
        start = time.monotonic()
        assert (
            c.post("/v1/functions/elastic/invoke", content=b"{}").json()["status"] == "ok"
        )  # cold start again
        assert time.monotonic() - start < 5


def test_bad_deployments_are_explained(live: LiveService) -> None:
    with live.client() as c:
        r = c.post(
            "/v1/functions",
            json={"name": "Bad_Name", "runtime": "python", "code": base64.b64encode(b"x=1").decode()},
        )
        assert r.status_code == 400 and "name" in r.json()["message"]
        r = c.post(
            "/v1/functions",
            json={"name": "syntax", "runtime": "python", "code": base64.b64encode(b"def (:").decode()},
        )
        assert r.status_code == 400 and "does not compile" in r.json()["message"]
        r = c.post(
            "/v1/functions",
            json={
                "name": "fat",
                "runtime": "python",
                "memory": "256M",
                "concurrency": 4,
                "code": base64.b64encode(b"x=1").decode(),
            },
        )
        assert r.status_code == 400 and "do not fit" in r.json()["message"]
        # no handler at all: refused at deploy, before any enclave starts for it
        for code, handler in ((b"x = 1", "handler"), (b"def handler(event, ctx):\n    return 1\n", "main")):
            r = c.post(
                "/v1/functions",
                json={"name": "nohandler", "runtime": "python", "handler": handler,
                      "code": base64.b64encode(code).decode()},
            )  # fmt: skip
            assert r.status_code == 400 and f"defines no '{handler}'" in r.json()["message"], r.text
        # a handler name bound to something that is not a function: only running it tells
        r = c.post(
            "/v1/functions",
            json={
                "name": "nohandler",
                "runtime": "python",
                "code": base64.b64encode(b"handler = 1").decode(),
            },
        )
        assert r.status_code == 201
        r = c.post("/v1/functions/nohandler/invoke", content=b"{}")
        assert r.status_code == 502 and "handler" in r.json()["message"]
        assert c.post("/v1/functions/missing/invoke", content=b"{}").status_code == 404
        r = c.post("/v1/functions/price-oracle/invoke", content=b"not json")
        assert r.status_code >= 400
        # a version whose published measurement is no longer what its enclaves measure (deployed
        # before the runtime or the pinned broker key changed) is refused with what to do
        deploy(c, "stale", "python", b"def handler(event, ctx):\n    return event\n")
        with sqlite3.connect(live.data_dir / "r3e-tee.sqlite3") as db:
            db.execute("UPDATE functions SET measurement = ? WHERE name = 'stale'", ("ab" * 32,))
        r = c.post("/v1/functions/stale/invoke", content=b"{}")
        assert r.status_code == 502 and "deploy the function again" in r.json()["message"], r.text
        assert not [
            e for e in c.get("/v1/enclaves").json() if e["function_name"] == "stale" and e["state"] == "ready"
        ]


def test_pipelined_invocations_queue_in_the_enclave_and_outlive_a_timeout(live: LiveService) -> None:
    """A short idempotent function gets more invocations than it has sandboxes; one that hangs
    holds up only the work queued behind it, which then runs on the replacement sandbox."""
    import concurrent.futures

    code = (
        b"import base64, os\n"
        b"def handler(event, ctx):\n"
        b"    while event.get('hang'):\n"
        b"        pass\n"
        b"    if event.get('exit'):\n"
        b"        os._exit(3)\n"
        b"    out = {'n': event['n']}\n"
        b"    if event.get('sign'):\n"
        b"        out['sig'] = base64.b64encode(ctx.sign(b'n=%d' % event['n'])).decode()\n"
        b"    return out\n"
    )
    with live.client() as c:
        deploy(c, "queued", "python", code, concurrency=1, max_enclaves=1, timeout="1s", idempotent=True)
        for n in range(20):  # measured short: the pool now pipelines it
            assert (
                c.post("/v1/functions/queued/invoke", content=json.dumps({"n": n})).json()["status"] == "ok"
            )
        jwks = c.get("/.well-known/jwks.json").json()

    def call(event: dict) -> dict:  # type: ignore[type-arg]
        with live.client() as client:
            return client.post("/v1/functions/queued/invoke", content=json.dumps(event)).json()  # type: ignore[no-any-return]

    # one hangs, one kills its sandbox, every third calls back into the enclave (ctx.sign)
    # while others wait behind it in the same sandbox's socket
    events = [{"n": n, "hang": n == 5, "exit": n == 9, "sign": n % 3 == 0} for n in range(24)]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, events))
    assert results[5]["status"] == "timeout" and results[5]["receipt"]["body"]["status"] == "timeout"
    assert results[9]["status"] == "error" and "sandbox" in results[9]["error"], results[9]
    others = [r for i, r in enumerate(results) if i not in (5, 9)]
    assert all(r["status"] == "ok" for r in others), [r for r in others if r["status"] != "ok"]
    assert sorted(r["output"]["n"] for r in others) == [n for n in range(24) if n not in (5, 9)]
    signed = [r for r in others if r["output"]["n"] % 3 == 0]
    for r in signed:
        key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), base64.urlsafe_b64decode(r["receipt"]["body"]["enclave_key"] + "==")
        )
        key.verify(
            base64.b64decode(r["output"]["sig"]),
            b"r3e-function-sign/v1\n" + b"n=%d" % r["output"]["n"],
            ec.ECDSA(__import__("cryptography.hazmat.primitives.hashes", fromlist=["SHA256"]).SHA256()),
        )
    for r in others:
        out = json.dumps(r["output"], separators=(",", ":")).encode()
        assert verify_receipt(r["receipt"], jwks, output_bytes=out).body["status"] == "ok"
    # (under this load most of them are batch-signed, ES256-batch: each verified above on its own)
    # work queued inside the hung enclave waited there and ran after the timeout, on the
    # replacement sandbox (without pipelining it would have gone to a new enclave instead:
    # a timed-out enclave takes no new work)
    hung = results[5]
    behind = [
        r
        for r in others
        if r["enclave_id"] == hung["enclave_id"]
        and r["receipt"]["body"]["started_at"] >= hung["receipt"]["body"]["finished_at"]
    ]
    assert behind, "nothing was queued inside the enclave behind the hung invocation"
    # one sandbox: the invocations of that enclave ran one at a time
    spans = sorted(
        (r["receipt"]["body"]["started_at"], r["receipt"]["body"]["finished_at"])
        for r in results
        if r["enclave_id"] == hung["enclave_id"]
    )
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_pipelined_async_invocations_survive_an_enclave_kill(live: LiveService) -> None:
    """Queued inside an enclave that is killed, asynchronous invocations of a short idempotent
    function are retried by the queue: none is lost, none is answered twice."""
    code = b"def handler(event, ctx):\n    return {'n': event['n']}\n"
    with live.client() as c:
        deploy(c, "burst", "python", code, concurrency=2, max_enclaves=2, idempotent=True)
        for n in range(20):  # measured short: pipelined from here on
            assert (
                c.post("/v1/functions/burst/invoke", content=json.dumps({"n": -1})).json()["status"] == "ok"
            )
        ids = []
        for n in range(300):
            r = c.post(
                "/v1/functions/burst/invocations",
                content=json.dumps({"n": n}),
                headers={"Idempotency-Key": f"burst-{n}"},
            )
            assert r.status_code == 202
            ids.append(r.json()["invocation_id"])
            if n == 100:
                kill_ready_enclaves(c, "burst")
        done = wait_finished(c, ids, 90)
    assert len(done) == len(ids), f"{len(ids) - len(done)} invocations were lost"
    failed = [s for s in done.values() if s["status"] != "succeeded"]
    assert not failed, failed[:3]
    assert sorted(s["output"]["n"] for s in done.values()) == list(range(300))


def test_get_invocation_waits_verifies_and_refuses_an_edited_output(
    live: LiveService, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI reads an asynchronous result and shows its output only once the receipt, and the
    output beside it, verify; an unknown id is a clear error."""
    from r3e_tee.cli.main import main

    with live.client() as c:
        deploy(c, "price-oracle-async", "python", (EXAMPLES / "price_oracle.py").read_bytes())
        queued = c.post("/v1/functions/price-oracle-async/invocations", content=json.dumps(EVENT).encode())
        inv = queued.json()["invocation_id"]
    cli = ["--server", live.url, "--token", live.token]
    saved = tmp_path / "result.json"
    assert main([*cli, "get-invocation", inv, "--wait", "30", "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    assert '"price": 12.0' in out and "receipt verified" in out
    result = json.loads(saved.read_text())
    assert result["status"] == "succeeded"
    assert main(["verify-receipt", str(saved), "--jwks", str(_jwks_file(live, tmp_path))]) == 0
    result["output"]["payload"]["price"] = 99.0
    saved.write_text(json.dumps(result))
    assert main(["verify-receipt", str(saved), "--jwks", str(tmp_path / "jwks.json")]) == 1
    assert "output does not match" in capsys.readouterr().err
    assert main([*cli, "get-invocation", "0" * 32]) != 0
    assert "no invocation" in capsys.readouterr().err


def _jwks_file(live: LiveService, tmp_path: Path) -> Path:
    with live.client() as c:
        (tmp_path / "jwks.json").write_text(json.dumps(c.get("/.well-known/jwks.json").json()))
    return tmp_path / "jwks.json"
