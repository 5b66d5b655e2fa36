"""The development admin token file: private, created whole (even when killed mid-write), and
one token for processes starting at once."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from tests.shared import kill_during, run_threads, spy_fsync

from r3e_tee.service.auth import ensure_dev_admin_token, read_token_file

CHILD = """
import os, signal, sys
from pathlib import Path

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

setattr(os, sys.argv[2], die)
from r3e_tee.service.auth import ensure_dev_admin_token
ensure_dev_admin_token(Path(sys.argv[1]))
"""


@pytest.mark.parametrize("point", ["fdopen", "fsync"])
def test_a_start_killed_while_writing_the_token_does_not_block_the_next(tmp_path: Path, point: str) -> None:
    data = tmp_path / "data"
    kill_during(CHILD, data, point)
    path, _ = ensure_dev_admin_token(data)  # the next start
    (token,) = read_token_file(path)
    assert token.startswith("r3e_")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_dev_admin_token(data) == (path, False)


def test_processes_starting_at_once_read_one_complete_token(tmp_path: Path) -> None:
    data = tmp_path / "data"
    barrier = threading.Barrier(8)
    tokens: list[str] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            barrier.wait()
            path, _ = ensure_dev_admin_token(data)
            tokens.extend(read_token_file(path))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    for _ in range(20):
        for p in list(data.glob("*")) if data.exists() else []:
            p.unlink()
        tokens.clear()
        run_threads(start, 8)
        assert not errors, errors
        assert len(tokens) == 8 and len(set(tokens)) == 1


def test_the_token_file_is_named_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "admin-token"
    synced = spy_fsync(monkeypatch, path)
    ensure_dev_admin_token(tmp_path)
    assert (False, False) in synced and (True, True) in synced, synced
