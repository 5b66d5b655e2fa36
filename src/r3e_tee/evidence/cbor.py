"""A small, strict CBOR (RFC 8949) decoder for attestation evidence.

Why our own: evidence is hostile input, and every failure must name the field and the byte
offset where parsing stopped (``EvidenceFormatError``), which general-purpose decoders do not
report. Definite and indefinite lengths, tags and the simple values are supported; anything
RFC 8949 calls malformed (reserved additional information, a break outside an indefinite item,
lengths past the end, invalid UTF-8, duplicate map keys, nesting deeper than a fixed limit) is
rejected. Encoding (used only by builders) is left to ``cbor2``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from r3e_tee.errors import EvidenceFormatError

__all__ = ["CborReader", "CborSimple", "CborTag", "Undefined", "decode", "UNDEFINED"]

MAX_DEPTH = 32
_BREAK = 0xFF


@dataclass(frozen=True)
class CborTag:
    """A tagged item (major type 6) whose tag the caller interprets."""

    tag: int
    value: Any


@dataclass(frozen=True)
class CborSimple:
    """A simple value other than false/true/null/undefined."""

    value: int


class Undefined:
    """The CBOR ``undefined`` simple value (23); distinct from ``None`` (null)."""

    _instance: Undefined | None = None

    def __new__(cls) -> Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "undefined"


UNDEFINED = Undefined()

_HASHABLE_KEYS = (int, str, bytes, bool, float, type(None), CborSimple, Undefined)


class CborReader:
    """Reads CBOR items from ``data`` one after another, tracking the absolute offset.

    ``base_offset`` is added to every reported offset so that a nested document (a CBOR
    payload inside a COSE byte string) reports positions in the outer buffer.
    """

    def __init__(self, data: bytes, *, field: str = "cbor", base_offset: int = 0) -> None:
        self.data = bytes(data)
        self.pos = 0
        self.field = field
        self.base_offset = base_offset
        # absolute offset of every map value and array item read, keyed by its field path
        self.offsets: dict[str, int] = {}

    # --- low level -------------------------------------------------------------------------

    def error(self, message: str, field: str | None = None, pos: int | None = None) -> EvidenceFormatError:
        at = self.pos if pos is None else pos
        return EvidenceFormatError(message, field=field or self.field, offset=self.base_offset + at)

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def _take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.error(f"needs {n} bytes but only {len(self.data) - self.pos} remain", field)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def read_head(self, field: str) -> tuple[int, int, int | None]:
        """Return (major type, additional info, argument or None for indefinite length)."""
        start = self.pos
        if self.pos >= len(self.data):
            raise self.error("unexpected end of data", field)
        ib = self.data[self.pos]
        self.pos += 1
        major, info = ib >> 5, ib & 0x1F
        if info < 24:
            return major, info, info
        if info in (24, 25, 26, 27):
            size = 1 << (info - 24)
            raw = self._take(size, field)
            return major, info, int.from_bytes(raw, "big")
        if info == 31:
            if major in (0, 1, 6):
                raise self.error(f"indefinite length is not allowed for major type {major}", field, start)
            return major, info, None
        raise self.error(f"reserved additional information {info}", field, start)

    # --- values ----------------------------------------------------------------------------

    def read_value(self, field: str | None = None, depth: int = 0) -> Any:
        """Decode one complete item at the current position."""
        name = field or self.field
        if depth > MAX_DEPTH:
            raise self.error(f"nesting deeper than {MAX_DEPTH}", name)
        start = self.pos
        if self.pos < len(self.data) and self.data[self.pos] == _BREAK:
            raise self.error("break outside an indefinite-length item", name)
        major, info, arg = self.read_head(name)
        if major == 0:
            assert arg is not None
            return arg
        if major == 1:
            assert arg is not None
            return -1 - arg
        if major in (2, 3):
            raw = self._read_string(major, arg, name)
            if major == 2:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.error(f"text is not valid UTF-8 ({exc.reason})", name, start) from None
        if major == 4:
            return self._read_array(arg, name, depth, start)
        if major == 5:
            return self._read_map(arg, name, depth, start)
        if major == 6:
            assert arg is not None
            return CborTag(arg, self.read_value(f"{name}<tag {arg}>", depth + 1))
        # major 7: simple values and floats
        if info < 24:
            return {20: False, 21: True, 22: None, 23: UNDEFINED}.get(info, CborSimple(info))
        if info == 24:
            assert arg is not None
            if arg < 32:
                raise self.error(f"simple value {arg} must use the one-byte form", name, start)
            return CborSimple(arg)
        if info == 25:
            return struct.unpack(">e", self.data[self.pos - 2 : self.pos])[0]
        if info == 26:
            return struct.unpack(">f", self.data[self.pos - 4 : self.pos])[0]
        if info == 27:
            return struct.unpack(">d", self.data[self.pos - 8 : self.pos])[0]
        raise self.error("break outside an indefinite-length item", name, start)  # info == 31

    def _read_string(self, major: int, arg: int | None, name: str) -> bytes:
        if arg is not None:
            return self._take(arg, name)
        chunks: list[bytes] = []
        while True:
            if self.pos >= len(self.data):
                raise self.error("unterminated indefinite-length string", name)
            if self.data[self.pos] == _BREAK:
                self.pos += 1
                return b"".join(chunks)
            chunk_start = self.pos
            cmajor, _, carg = self.read_head(name)
            if cmajor != major or carg is None:
                raise self.error(
                    "indefinite-length string chunk must be a definite string of the same type",
                    name,
                    chunk_start,
                )
            chunks.append(self._take(carg, name))

    def _read_array(self, arg: int | None, name: str, depth: int, start: int) -> list[Any]:
        out: list[Any] = []
        if arg is not None:
            # each item needs at least one byte: refuse absurd counts before looping
            if arg > len(self.data) - self.pos:
                raise self.error(f"array of {arg} items cannot fit in the remaining bytes", name, start)
            for i in range(arg):
                self.offsets[f"{name}[{i}]"] = self.base_offset + self.pos
                out.append(self.read_value(f"{name}[{i}]", depth + 1))
            return out
        while True:
            if self.pos >= len(self.data):
                raise self.error("unterminated indefinite-length array", name)
            if self.data[self.pos] == _BREAK:
                self.pos += 1
                return out
            self.offsets[f"{name}[{len(out)}]"] = self.base_offset + self.pos
            out.append(self.read_value(f"{name}[{len(out)}]", depth + 1))

    def _read_map(self, arg: int | None, name: str, depth: int, start: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        if arg is not None and 2 * arg > len(self.data) - self.pos:
            raise self.error(f"map of {arg} entries cannot fit in the remaining bytes", name, start)
        i = 0
        while True:
            if arg is None:
                if self.pos >= len(self.data):
                    raise self.error("unterminated indefinite-length map", name)
                if self.data[self.pos] == _BREAK:
                    self.pos += 1
                    return out
            elif i >= arg:
                return out
            key_pos = self.pos
            key = self.read_value(f"{name}.<key {i}>", depth + 1)
            if not isinstance(key, _HASHABLE_KEYS):
                raise self.error("map key must be a scalar (int, text, bytes, simple)", name, key_pos)
            # note: Python equates 1, 1.0 and True; such mixed keys are rejected as duplicates
            if key in out:
                raise self.error(f"duplicate map key {key!r}", name, key_pos)
            path = f"{name}.{key.hex() if isinstance(key, bytes) else key}"
            self.offsets[path] = self.base_offset + self.pos
            out[key] = self.read_value(path, depth + 1)
            i += 1


def decode(data: bytes, *, field: str = "cbor", base_offset: int = 0, allow_trailing: bool = False) -> Any:
    """Decode exactly one CBOR item; trailing bytes are an error unless ``allow_trailing``."""
    reader = CborReader(data, field=field, base_offset=base_offset)
    value = reader.read_value()
    if not allow_trailing and not reader.at_end():
        raise reader.error(f"{len(reader.data) - reader.pos} trailing bytes after the item")
    return value
