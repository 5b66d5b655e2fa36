"""The real process: starts within 10 s in dev mode, drains and exits 0 on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tests.shared import free_port


def test_dev_service_answers_healthz_fast_and_stops_gracefully(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "R3E_TEE_CONFIG": ""}
    start = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "r3e_tee.service",
            "--dev",
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        healthy = False
        while time.monotonic() - start < 10:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                    healthy = True
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert healthy, "no /healthz within 10 s"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "closing the store" in out and "service stopped" in out
    token = (tmp_path / "d" / "admin-token").read_text().strip()
    assert token not in out


def test_bad_config_exits_2_with_located_error(tmp_path: Path) -> None:
    cfg = tmp_path / "tee-config.yaml"
    cfg.write_text("server:\n  prot: 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "r3e_tee.service", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert f"{cfg}:2: server.prot: unknown key 'prot'" in proc.stderr and "did you mean 'port'" in proc.stderr
