"""A live development service (real process, real fork server) shared by the enclave tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tests.shared import free_port


@dataclass
class LiveService:
    url: str
    token: str
    data_dir: Path
    proc: subprocess.Popen[str]
    env: dict[str, str]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.auth, timeout=30)


def start_service(
    data_dir: Path, state_dir: Path, *, config: Path | None = None, port: int | None = None
) -> LiveService:
    port = port or free_port()
    env = {**os.environ, "XDG_STATE_HOME": str(state_dir), "R3E_TEE_CONFIG": str(config or "")}
    # the log goes to a file: a pipe nobody reads until the end fills up, and a service whose
    # log cannot be written stops (as it would on a node whose log collector stalls)
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (data_dir.parent / f"service-{port}.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "r3e_tee.service", "--dev", "--data-dir", str(data_dir), "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.stdout = log  # read back by stop_service
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"service exited: {log.read()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=0.5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("service did not become ready in 20 s")
    token = (data_dir / "admin-token").read_text().strip()
    return LiveService(url, token, data_dir, proc, env)


def stop_service(svc: LiveService, sig: int = 15) -> str:
    if svc.proc.poll() is None:
        svc.proc.send_signal(sig)
    try:
        svc.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        svc.proc.kill()
        svc.proc.wait()
    log = svc.proc.stdout
    if log is None or log.closed:  # stopped before
        return ""
    log.seek(0)
    out = log.read()
    log.close()
    return out


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    base = tmp_path_factory.mktemp("live")
    svc = start_service(base / "data", base / "state")
    try:
        yield svc
    finally:
        stop_service(svc)


def wait_state(client: httpx.Client, enclave_id: str, states: set[str], timeout: float = 10) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        enclave = client.get(f"/v1/enclaves/{enclave_id}").json()
        if enclave["state"] in states or time.monotonic() > deadline:
            return enclave  # type: ignore[no-any-return]
        time.sleep(0.05)


def runtime_pids() -> set[int]:
    """Processes running the enclave runtime (zygote children included)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"r3e_tee.runtime" in cmdline:
            pids.add(int(entry.name))
    return pids
