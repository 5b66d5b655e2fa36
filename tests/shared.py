"""Values and helpers several test folders use (importable as tests.shared)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import r3e_tee

SRC = str(Path(r3e_tee.__file__).resolve().parents[1])

# the deployment guide's ConfigMap content, verbatim
GUIDE_CONFIGMAP = """\
providers:
  - name: sgx
    enabled: true
    attestation:
      service: "https://api.trustedservices.intel.com/sgx/attestation/v4"
      apiKey: "${SGX_API_KEY}"
  - name: nitro
    enabled: true
    attestation:
      service: "https://vsock.nitro-enclaves.amazonaws.com"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_during(code: str, target: Path, point: str) -> None:
    """Run ``code`` (argv: target, point) in a child process that replaces ``os.<point>`` with
    a SIGKILL of itself; asserts the child really died by SIGKILL at that step."""
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(target), point], env=env, capture_output=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def run_threads(target: Callable[[], None], n: int) -> None:
    """Run ``target`` in ``n`` threads at once and wait for all of them."""
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def spy_fsync(monkeypatch: Any, path: Path) -> list[tuple[bool, bool]]:
    """Record each fsync as (of a directory, ``path`` exists then): what a durable create must show."""
    synced: list[tuple[bool, bool]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), path.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced
