"""A control plane without an embedded worker and a separate r3e-tee-worker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .conftest import free_port, start_service, stop_service, wait_state


def start_worker(svc_url: str, token: str, tmp: Path, worker_id: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    env = {
        **os.environ,
        "R3E_TEE_URL": svc_url,
        "R3E_TEE_TOKEN": token,
        "R3E_TEE_CONFIG": str(tmp / "worker.yaml"),
        "R3E_TEE_WORKER_URL": f"http://127.0.0.1:{port}",
        "R3E_TEE_WORKER_ID": worker_id,
    }
    (tmp / "worker.yaml").write_text("workers:\n  heartbeat_interval: 0.3s\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "r3e_tee.worker",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--data-dir",
            str(tmp / "w"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=0.5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"worker not ready: {proc.stdout.read() if proc.stdout else ''}")


def test_remote_worker_registers_runs_enclaves_and_loss_is_detected(tmp_path: Path) -> None:
    cfg = tmp_path / "svc.yaml"
    cfg.write_text("workers:\n  embedded: false\n  heartbeat_interval: 0.3s\n  heartbeat_timeout: 1s\n")
    svc = start_service(tmp_path / "data", tmp_path / "state", config=cfg)
    worker, worker_url = start_worker(svc.url, svc.token, tmp_path, "node-a")
    try:
        with svc.client() as c:
            workers = c.get("/v1/workers").json()
            assert [w["id"] for w in workers] == ["node-a"] and workers[0]["alive"]
            assert "simulation" in workers[0]["capacity"]
            enclave = c.post(
                "/v1/enclaves", params={"wait": 20}, json={"provider": "simulation", "size": "64M"}
            ).json()
            assert enclave["state"] == "ready" and enclave["worker_id"] == "node-a", enclave
            report = c.get(f"/v1/attestations/{enclave['attestation_id']}").json()
            assert report["verdict"] == "valid" and report["claims"]["simulated"] is True
            grant = c.post(f"/v1/enclaves/{enclave['id']}/attest").json()
            assert grant["attestation_id"] != enclave["attestation_id"]
            # the worker's API refuses callers other than the service it registered with
            r = httpx.delete(
                f"{worker_url}/enclaves/{enclave['id']}", headers={"Authorization": "Bearer guess"}
            )
            assert r.status_code == 401
            # a worker crash: its enclaves die with it; after the heartbeat timeout they are failed
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            failed = wait_state(c, enclave["id"], {"failed"}, timeout=15)
            assert failed["state"] == "failed" and "stopped heartbeating" in failed["reason"]
            record = c.get(f"/v1/attestations/{grant['attestation_id']}").json()
            assert record["revoked_at"] is not None
            # with no live worker, creation explains itself
            r = c.post("/v1/enclaves", json={"provider": "simulation", "size": "64M"})
            assert r.status_code == 503 and "no live worker" in r.json()["message"]
    finally:
        if worker.poll() is None:
            worker.kill()
        stop_service(svc)


def test_worker_restart_reconciles_its_enclaves(tmp_path: Path) -> None:
    cfg = tmp_path / "svc.yaml"
    cfg.write_text("workers:\n  embedded: false\n")
    svc = start_service(tmp_path / "data", tmp_path / "state", config=cfg)
    worker, _ = start_worker(svc.url, svc.token, tmp_path, "node-b")
    try:
        with svc.client() as c:
            enclave = c.post(
                "/v1/enclaves", params={"wait": 20}, json={"provider": "simulation", "size": "64M"}
            ).json()
            assert enclave["state"] == "ready"
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            worker, _ = start_worker(svc.url, svc.token, tmp_path, "node-b")
            after = wait_state(c, enclave["id"], {"failed"}, timeout=15)
            assert after["state"] == "failed" and after["reason"].startswith("worker restarted")
            again = c.post(
                "/v1/enclaves", params={"wait": 20}, json={"provider": "simulation", "size": "64M"}
            ).json()
            assert again["state"] == "ready"
    finally:
        worker.terminate()
        worker.wait(20)
        stop_service(svc)


def test_functions_and_secrets_run_on_a_remote_worker(tmp_path: Path) -> None:
    import base64
    import json

    from r3e_tee.functions.receipts import verify_receipt

    cfg = tmp_path / "svc.yaml"
    cfg.write_text("workers:\n  embedded: false\n")
    svc = start_service(tmp_path / "data", tmp_path / "state", config=cfg)
    worker, _ = start_worker(svc.url, svc.token, tmp_path, "node-c")
    code = (
        b"def handler(event, ctx):\n    return {'echo': event, 'secret_len': len(ctx.secrets.get('k', ''))}\n"
    )
    try:
        with svc.client() as c:
            fv = c.post(
                "/v1/functions",
                json={
                    "name": "remote-echo",
                    "runtime": "python",
                    "secrets": ["k"],
                    "code": base64.b64encode(code).decode(),
                },
            ).json()
            c.put(
                "/v1/secrets/k",
                json={
                    "value": "remote-secret-value",
                    "policy": {"measurements": [fv["measurement"]], "allow_simulation": True},
                },
            ).raise_for_status()
            out = c.post("/v1/functions/remote-echo/invoke", content=b'{"x": 1}').json()
            assert out["status"] == "ok", out
            assert out["output"] == {"echo": {"x": 1}, "secret_len": 19}
            enclave = c.get(f"/v1/enclaves/{out['enclave_id']}").json()
            assert enclave["worker_id"] == "node-c"
            jwks = c.get("/.well-known/jwks.json").json()
            verify_receipt(
                out["receipt"], jwks, input_bytes=b'{"x": 1}', output_bytes=json.dumps(out["output"]).encode()
            )
            queued = c.post("/v1/functions/remote-echo/invocations", content=b'{"x": 2}').json()
            deadline = time.monotonic() + 20
            while (state := c.get(queued["status_url"]).json())["status"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert state["output"]["echo"] == {"x": 2}
    finally:
        worker.terminate()
        worker.wait(20)
        stop_service(svc)
