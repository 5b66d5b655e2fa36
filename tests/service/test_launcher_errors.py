"""r3e-tee-service on bad flags: one line naming the problem and the fix, exit 2, nothing set up."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from r3e_tee.service.__main__ import main


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    for name in ("R3E_TEE_CONFIG", "R3E_TEE_PORT", "R3E_TEE_HOST", "R3E_TEE_DATA_DIR", "R3E_TEE_DEV"):
        monkeypatch.delenv(name, raising=False)
    # the launchers take over the root logger (pointed at this test's captured stderr)
    monkeypatch.setattr("r3e_tee.service.__main__.configure_logging", lambda level: None)
    monkeypatch.setattr("r3e_tee.worker.cli.configure_logging", lambda level: None)


@pytest.mark.parametrize("port", ["99999", "0", "-1", "http"])
def test_a_port_out_of_range_is_a_usage_error(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: --port 99999 was passed to uvicorn, and -1 failed after the whole setup with
    '[Errno -8] Servname not supported for ai_socktype'."""
    with pytest.raises(SystemExit) as exited:
        main(["--dev", "--port", port])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"{port!r} is not a port number: use 1-65535" in err


def test_a_bad_port_variable_is_named_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("R3E_TEE_PORT", "eighty")
    with pytest.raises(SystemExit) as exited:
        main(["--dev"])
    assert exited.value.code == 2
    assert "'eighty' is not a port number" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_an_unusable_data_dir_is_named(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a traceback (FileExistsError / NotADirectoryError from mkdir)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    data_dir = a_file if kind == "file" else a_file / "sub"
    code = main(["--dev", "--port", str(_free_port()), "--data-dir", str(data_dir)])
    err = capsys.readouterr().err
    assert code == 2
    assert "server.data_dir" in err and str(data_dir) in err and "fix: pass --data-dir" in err
    assert "Traceback" not in err


def test_a_port_in_use_fails_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the store was migrated, --dev rewrote the CLI's token discovery file for the port
    (so the CLI sent the wrong token to the service already running there), then uvicorn logged
    'address already in use'."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["--dev", "--port", str(port), "--data-dir", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in err and "fix: another process listens there" in err
    assert not (tmp_path / "d").exists()
    assert not (tmp_path / "state" / "r3e-tee" / f"dev-{port}.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_worker_port_variable_no_longer_breaks_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: R3E_TEE_WORKER_PORT=abc crashed r3e-tee-worker, even --help, with a ValueError
    traceback."""
    from r3e_tee.worker.cli import run

    monkeypatch.setenv("R3E_TEE_WORKER_PORT", "abc")
    with pytest.raises(SystemExit) as exited:
        run(["--help"])
    assert exited.value.code == 0 and "R3E_TEE_WORKER_PORT" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        run(["--server", "http://127.0.0.1:1", "--token", "t"])
    assert exited.value.code == 2
    assert "'abc' is not a port number: use 1-65535" in capsys.readouterr().err


def test_worker_refuses_a_bad_server_url_and_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: --server notaurl started the worker, which failed at startup with a multi-line
    traceback in its log; a --data-dir naming a file crashed with a traceback."""
    from r3e_tee.worker.cli import run

    code = run(["--server", "notaurl", "--token", "t", "--data-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and "--server 'notaurl' is not a service URL" in err and "fix:" in err
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code = run(["--server", "http://127.0.0.1:1", "--token", "t", "--data-dir", str(a_file)])
    err = capsys.readouterr().err
    assert code == 2 and "is a file, not a directory" in err and "fix: pass --data-dir" in err


def test_worker_refuses_a_malformed_token_without_logging_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a token with a newline reached httpx, whose startup error (logged as a
    traceback) repeated the Authorization header: the token was in the log."""
    from r3e_tee.worker.cli import run

    code = run(["--server", "http://127.0.0.1:1", "--token", "r3e_SECRET\nX", "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2 and "token" in err and "R3E_TEE_TOKEN" in err
    assert "SECRET" not in out + err


@pytest.mark.parametrize("status", [401, 403])
def test_worker_with_a_refused_token_stops_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int
) -> None:
    """Before: the worker started, and its startup failed inside uvicorn with a multi-line
    traceback in the log ('HTTP 401: invalid or revoked token' at its end)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    from r3e_tee.worker.cli import run

    class Refuse(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code = run(["--server", url, "--token", "r3e_wrong", "--data-dir", str(tmp_path / "w")])
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert code == 1
    assert f"the service at {url} refused the worker's token (HTTP {status})" in err
    assert "fix: set R3E_TEE_TOKEN" in err and "Traceback" not in err


def test_worker_that_cannot_reach_the_service_stops_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from r3e_tee.worker.cli import run

    url = f"http://127.0.0.1:{_free_port()}"
    code = run(["--server", url, "--token", "r3e_t", "--data-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 3 and f"cannot reach the service at {url}" in err and "fix: check --server" in err


def test_service_help_names_defaults_and_the_unsafe_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: --host read 'listen address' and --data-dir 'state directory', no defaults."""
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exited.value.code == 0
    assert "default 127.0.0.1, this machine only" in out and "default /var/lib/r3e-tee" in out
    assert "1-65535" in out and "(UNSAFE outside development)" in out and "r3e-tee-service --dev" in out
