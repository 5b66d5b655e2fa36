"""Files the service writes that must survive a crash whole: all or nothing, and durable.

A file is written under a temporary name in its directory, fsynced, then given its final name
in one step, and the directory is fsynced so the name itself survives a power loss. A process
killed at any instruction leaves either no file or the complete one, never an empty or torn
file that the next start would refuse (or, for a key, silently replace).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a file just created or renamed in it) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes | bytearray, mode: int) -> str:
    """``data`` in a new private file next to ``path``, fsynced; returns its name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def create_exclusive(path: Path, data: bytes | bytearray, *, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` unless it exists; returns False when it already did.

    ``os.link`` gives the complete file its name atomically and never replaces an existing one,
    so processes racing to create the same file agree on one content and none reads it half
    written. Raises OSError.
    """
    tmp = _write_temp(path, data, mode)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def replace_atomically(path: Path, data: bytes | bytearray, *, mode: int = 0o600) -> None:
    """Write ``path`` as a whole (replacing any previous content) and durably. Raises OSError."""
    tmp = _write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def secret_file_exposure(st: os.stat_result) -> str | None:
    """Why a file holding a secret (a KEK, a PIN, a signing key) is exposed, or None.

    Any access for other users, or write access for the group, lets someone besides this service
    read or replace the secret. Group read is accepted only for a group this process is in: that
    is how a Kubernetes Secret volume is mounted (defaultMode 0440, group fsGroup).
    """
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        return f"mode {mode:o} gives every user of this host access to it"
    if mode & 0o020:
        return f"mode {mode:o} lets group {st.st_gid} replace it"
    if mode & 0o040 and st.st_gid not in {os.getegid(), *os.getgroups()}:
        return f"mode {mode:o} lets group {st.st_gid}, which this service is not in, read it"
    return None
