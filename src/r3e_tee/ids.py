"""Random identifiers for requests and invocations."""

from __future__ import annotations

import os
import threading

_POOL_SIZE = 16 * 256
_pool = b""
_offset = _POOL_SIZE
_lock = threading.Lock()


def _forget_pool() -> None:
    # a forked child must not hand out the identifiers its parent will also hand out
    global _pool, _offset
    _pool, _offset = b"", _POOL_SIZE


os.register_at_fork(after_in_child=_forget_pool)


def new_id() -> str:
    """A random (version 4) UUID as 32 hex digits, as ``uuid.uuid4().hex``.

    The random bytes come from the OS 4 KiB at a time (one getrandom call per 256 ids: this
    runs several times per invocation); the pool is dropped in a forked child."""
    global _offset
    with _lock:
        start = _offset
        if start >= _POOL_SIZE:
            global _pool
            _pool = os.urandom(_POOL_SIZE)
            start = 0
        _offset = start + 16
        b = bytearray(_pool[start : start + 16])
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    return b.hex()
