"""Random identifiers for requests and invocations."""

from __future__ import annotations

import os


def new_id() -> str:
    """A random (version 4) UUID as 32 hex digits: ``uuid.uuid4().hex``, without building the
    UUID object (this runs several times per invocation)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    return b.hex()
