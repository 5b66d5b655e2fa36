"""r3e-tee-cli shell: config validate, doctor, version, connection errors, output formats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.shared import GUIDE_CONFIGMAP
from tests.shared import free_port as _free_port

from r3e_tee.cli.client import discover_local_token
from r3e_tee.cli.main import main


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def guide_config(tmp_path: Path) -> Path:
    f = tmp_path / "tee-config.yaml"
    f.write_text(GUIDE_CONFIGMAP)
    return f


def test_config_validate_accepts_the_guide_configmap_with_the_key_set(
    guide_config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SGX_API_KEY", "the-real-key")
    code, out, _ = run(["config", "validate", str(guide_config)], capsys)
    assert code == 0 and "valid" in out and "sgx, nitro" in out
    assert "the-real-key" not in out
    code, out, _ = run(["-o", "json", "config", "validate", str(guide_config)], capsys)
    assert code == 0 and json.loads(out)["providers"] == ["sgx", "nitro"]


def test_config_validate_names_the_missing_variable(
    guide_config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SGX_API_KEY", raising=False)
    code, _, err = run(["config", "validate", str(guide_config)], capsys)
    assert code == 2
    assert "SGX_API_KEY" in err and f"{guide_config}:6" in err
    code, out, _ = run(["-o", "json", "config", "validate", str(guide_config)], capsys)
    body = json.loads(out)
    assert code == 2 and body["error"] == "config" and body["line"] == 6
    assert body["key_path"] == "providers[0].attestation.apiKey"


def test_config_validate_reads_r3e_tee_config(
    guide_config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("R3E_TEE_CONFIG", str(guide_config))
    monkeypatch.setenv("SGX_API_KEY", "k")
    code, out, _ = run(["config", "validate"], capsys)
    assert code == 0 and str(guide_config) in out


def test_config_validate_rejects_a_bad_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SGX_API_KEY", "k")
    bad_key = tmp_path / "sgx-key.pem"
    bad_key.write_text("hello")
    f = tmp_path / "c.yaml"
    f.write_text(
        GUIDE_CONFIGMAP.replace(
            'apiKey: "${SGX_API_KEY}"', f'apiKey: "${{SGX_API_KEY}}"\n      keyFile: {bad_key}'
        )
    )
    code, _, err = run(["config", "validate", str(f)], capsys)
    assert code == 2 and "not PEM" in err


def test_connection_errors_name_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    code, out, _ = run(["--server", url, "-o", "json", "version"], capsys)
    body = json.loads(out)
    assert code == 0 and body["cli"] and url in body["server"]["error"]
    assert "connection refused" in body["server"]["error"]


def test_unknown_output_format_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["-o", "yaml", "version"], capsys)
    assert code == 2 and "table" in err


def test_help_teaches() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "r3e_tee.cli.main", "--help"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0
    for word in ("doctor", "config", "version", "--server", "R3E_TEE_URL", "--token"):
        assert word in proc.stdout


def test_local_dev_token_is_discovered(tmp_path: Path) -> None:
    token_file = tmp_path / "data" / "admin-token"
    token_file.parent.mkdir()
    token_file.write_text("r3e_local\n")
    state = tmp_path / "state" / "r3e-tee"
    state.mkdir(parents=True)
    (state / "dev-9999.json").write_text(json.dumps({"admin_token_file": str(token_file)}))
    env = {"XDG_STATE_HOME": str(tmp_path / "state"), "HOME": str(tmp_path)}
    assert discover_local_token("http://127.0.0.1:9999", env) == "r3e_local"
    assert discover_local_token("http://localhost:9999", env) == "r3e_local"
    # a remote server never gets the local token
    assert discover_local_token("http://tee.example.com:9999", env) is None
    assert (
        discover_local_token("http://127.0.0.1:9998", {**env, "R3E_TEE_DATA_DIR": str(tmp_path / "data")})
        == "r3e_local"
    )


def test_cli_against_a_running_dev_service(tmp_path: Path) -> None:
    """The dev token is found by itself: no --token, no R3E_TEE_TOKEN."""
    from tests.enclaves.conftest import start_service, stop_service

    svc = start_service(tmp_path / "d", tmp_path / "state")
    try:
        env = {k: v for k, v in svc.env.items() if k != "R3E_TEE_TOKEN"}
        cli = [sys.executable, "-m", "r3e_tee.cli.main", "--server", svc.url, "-o", "json"]
        out = subprocess.run([*cli, "version"], env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["server"]["providers"] == ["simulation"]
        listing = subprocess.run([*cli, "list-enclaves"], env=env, capture_output=True, text=True, timeout=30)
        assert listing.returncode == 0 and json.loads(listing.stdout) == []
    finally:
        stop_service(svc)
