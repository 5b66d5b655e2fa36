"""The generated development KEK survives a crash at any point of its creation.

The child process is really killed (SIGKILL) at the named step; the next start must come up with
a complete KEK, and the KEK's name must be durable (its directory fsynced) before it is used.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from tests.shared import kill_during, spy_fsync

from r3e_tee.keys.kek import KEK_SIZE, FileKek

CHILD = """
import os, signal, sys
from pathlib import Path

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

setattr(os, sys.argv[2], die)
from r3e_tee.keys.kek import FileKek
FileKek.generate(Path(sys.argv[1]))
"""


@pytest.mark.parametrize("point", ["fdopen", "fsync"])
def test_a_kek_generation_killed_half_way_does_not_block_the_next_start(tmp_path: Path, point: str) -> None:
    path = tmp_path / "data" / "kek.key"
    kill_during(CHILD, path, point)
    kek = FileKek.generate(path)  # the next start
    assert path.stat().st_size == KEK_SIZE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert FileKek.load(path).kek_id == kek.kek_id
    blob = kek.wrap(b"k" * 32, b"aad")
    assert bytes(FileKek.generate(path).unwrap(blob, b"aad")) == b"k" * 32


def test_the_generated_kek_is_named_durably_before_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an fsync of the directory, a power loss can drop the new file's name while keys
    wrapped with it are already committed to the store: those keys would never unwrap again."""
    path = tmp_path / "kek.key"
    synced = spy_fsync(monkeypatch, path)
    FileKek.generate(path)
    assert (True, True) in synced, synced  # the directory, once the KEK has its name
    assert [p.name for p in tmp_path.iterdir()] == ["kek.key"]  # no temporary file left
