"""A small DER walker and the Intel SGX PCK certificate extension (OID 1.2.840.113741.1.13.1).

The PCK leaf certificate carries the platform's TCB (16 CPU SVN components, PCESVN, CPUSVN),
its FMSPC, PCE-ID and SGX type in a private extension that generic X.509 libraries expose only as
opaque bytes. DCAP TCB matching needs those values, so this module decodes them with a strict
DER reader (definite lengths, minimal length encoding, no trailing bytes). Every failure raises
:class:`~r3e_tee.errors.EvidenceFormatError` naming the field and the byte offset inside the
extension value. The encoder half builds the same extension for test and simulated PCK certs.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import NamedTuple

from r3e_tee.errors import EvidenceFormatError

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"

TAG_BOOLEAN = 0x01
TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_ENUMERATED = 0x0A
TAG_SEQUENCE = 0x30

_SGX = SGX_EXTENSION_OID
_OID_PPID = _SGX + ".1"
_OID_TCB = _SGX + ".2"
_OID_PCEID = _SGX + ".3"
_OID_FMSPC = _SGX + ".4"
_OID_SGX_TYPE = _SGX + ".5"
_OID_PLATFORM_INSTANCE_ID = _SGX + ".6"
_OID_CONFIGURATION = _SGX + ".7"
_OID_PCESVN = _OID_TCB + ".17"
_OID_CPUSVN = _OID_TCB + ".18"

# --- decoding ----------------------------------------------------------------------------------


class DerNode(NamedTuple):
    """One TLV: ``tag``, header ``offset``, and the value's span ``[start, end)`` in ``data``."""

    tag: int
    offset: int
    start: int
    end: int
    data: bytes

    @property
    def value(self) -> bytes:
        return self.data[self.start : self.end]

    @property
    def encoded(self) -> bytes:
        """The whole TLV (header and value)."""
        return self.data[self.offset : self.end]


def der_read(data: bytes, offset: int, limit: int | None = None, *, field: str = "der") -> DerNode:
    """Read one TLV at ``offset`` that must end at or before ``limit`` (default: end of data)."""
    end_limit = len(data) if limit is None else limit
    if offset + 2 > end_limit:
        raise EvidenceFormatError("truncated DER header", field=field, offset=offset)
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise EvidenceFormatError(f"multi-byte DER tag 0x{tag:02x} not supported", field=field, offset=offset)
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise EvidenceFormatError("indefinite length is not DER", field=field, offset=offset + 1)
    else:
        count = first & 0x7F
        if count > 4 or pos + count > end_limit:
            raise EvidenceFormatError("bad DER length", field=field, offset=offset + 1)
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise EvidenceFormatError("non-minimal DER length", field=field, offset=offset + 1)
        pos += count
    if pos + length > end_limit:
        raise EvidenceFormatError(
            f"DER value of {length} bytes runs past the end", field=field, offset=offset
        )
    return DerNode(tag, offset, pos, pos + length, data)


def der_header(data: bytes, pos: int, end: int, field: str = "der") -> tuple[int, int, int]:
    """Fast TLV header read: (tag, value start, value end) of the TLV at ``pos``, within ``end``.

    Same strictness as :func:`der_read` (definite, minimal lengths) without building a node; the
    hot paths (certificate slicing, the PCK extension) use it.
    """
    if pos + 2 > end:
        raise EvidenceFormatError("truncated DER header", field=field, offset=pos)
    tag = data[pos]
    n = data[pos + 1]
    start = pos + 2
    if tag & 0x1F == 0x1F:
        raise EvidenceFormatError(f"multi-byte DER tag 0x{tag:02x} not supported", field=field, offset=pos)
    if n >= 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or start + k > end:
            raise EvidenceFormatError("bad DER length", field=field, offset=pos + 1)
        n = int.from_bytes(data[start : start + k], "big")
        if n < 0x80 or data[start] == 0:
            raise EvidenceFormatError("non-minimal DER length", field=field, offset=pos + 1)
        start += k
    if start + n > end:
        raise EvidenceFormatError(f"DER value of {n} bytes runs past the end", field=field, offset=pos)
    return tag, start, start + n


def der_children(node: DerNode, *, field: str = "der") -> list[DerNode]:
    """The TLVs inside a constructed node, which must exactly fill it."""
    out = []
    pos = node.start
    data = node.data
    end = node.end
    while pos < end:
        child = der_read(data, pos, end, field=field)
        out.append(child)
        pos = child.end
    return out


def _expect(node: DerNode, tag: int, field: str) -> DerNode:
    if node.tag != tag:
        raise EvidenceFormatError(
            f"expected DER tag 0x{tag:02x}, found 0x{node.tag:02x}", field=field, offset=node.offset
        )
    return node


def oid_to_dotted(raw: bytes) -> str:
    """Decode OID content octets (no tag/length) to dotted form; raises ValueError if malformed."""
    if not raw or raw[-1] & 0x80:
        raise ValueError("malformed OID")
    arcs: list[int] = []
    acc = 0
    for b in raw:
        if acc == 0 and b == 0x80:
            raise ValueError("non-minimal OID arc")
        acc = (acc << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(acc)
            acc = 0
    first = arcs[0]
    head = [0, first] if first < 40 else ([1, first - 40] if first < 80 else [2, first - 80])
    return ".".join(str(a) for a in head + arcs[1:])


def der_oid(node: DerNode, field: str = "oid") -> str:
    """Decode an OBJECT IDENTIFIER node to dotted form."""
    _expect(node, TAG_OID, field)
    try:
        return oid_to_dotted(node.value)
    except ValueError as exc:
        raise EvidenceFormatError(str(exc), field=field, offset=node.offset) from None


def der_uint(node: DerNode, field: str, *, tag: int = TAG_INTEGER, max_bytes: int = 8) -> int:
    """Decode a non-negative INTEGER/ENUMERATED with minimal encoding."""
    _expect(node, tag, field)
    raw = node.data[node.start : node.end]
    if not raw or len(raw) > max_bytes + 1:
        raise EvidenceFormatError("bad integer length", field=field, offset=node.offset)
    if raw[0] & 0x80:
        raise EvidenceFormatError("negative integer", field=field, offset=node.start)
    if len(raw) > 1 and raw[0] == 0 and not raw[1] & 0x80:
        raise EvidenceFormatError("non-minimal integer", field=field, offset=node.start)
    return int.from_bytes(raw, "big")


def der_octets(node: DerNode, field: str, size: int | None = None) -> bytes:
    _expect(node, TAG_OCTET_STRING, field)
    raw = node.data[node.start : node.end]
    if size is not None and len(raw) != size:
        raise EvidenceFormatError(f"expected {size} bytes, found {len(raw)}", field=field, offset=node.offset)
    return raw


def der_bool(node: DerNode, field: str) -> bool:
    _expect(node, TAG_BOOLEAN, field)
    if node.end - node.start != 1 or node.data[node.start] not in (0x00, 0xFF):
        raise EvidenceFormatError("malformed BOOLEAN", field=field, offset=node.offset)
    return node.data[node.start] == 0xFF


# --- encoding ----------------------------------------------------------------------------------


def der_tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def enc_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for value in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [value & 0x7F]
        rest = value >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return der_tlv(TAG_OID, bytes(out))


def enc_uint(value: int, tag: int = TAG_INTEGER) -> bytes:
    raw = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return der_tlv(tag, raw)


def enc_seq(*items: bytes) -> bytes:
    return der_tlv(TAG_SEQUENCE, b"".join(items))


def enc_octets(value: bytes) -> bytes:
    return der_tlv(TAG_OCTET_STRING, value)


def enc_bool(value: bool) -> bytes:
    return der_tlv(TAG_BOOLEAN, b"\xff" if value else b"\x00")


# --- PEM chains --------------------------------------------------------------------------------

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \t\r\n"


def pem_chain_to_der(pem: bytes | str, *, field: str = "pem_chain") -> list[bytes]:
    """Split a concatenated PEM certificate chain into DER blobs, leaf first, as given.

    Bytes outside the armour (newlines, a trailing NUL as in DCAP certification data) are ignored;
    inside it only base64 and whitespace are allowed.
    """
    raw = pem.encode() if isinstance(pem, str) else pem
    out: list[bytes] = []
    pos = 0
    while True:
        begin = raw.find(_PEM_BEGIN, pos)
        if begin < 0:
            break
        start = begin + len(_PEM_BEGIN)
        end = raw.find(_PEM_END, start)
        if end < 0:
            raise EvidenceFormatError("PEM certificate without END line", field=field, offset=begin)
        body = raw[start:end]
        if body.translate(None, _B64_ALPHABET):
            raise EvidenceFormatError("non-base64 byte in PEM certificate", field=field, offset=start)
        try:
            out.append(binascii.a2b_base64(body))
        except binascii.Error as exc:
            raise EvidenceFormatError(
                f"bad base64 in PEM certificate: {exc}", field=field, offset=start
            ) from None
        pos = end + len(_PEM_END)
    if not out:
        raise EvidenceFormatError("no PEM certificate found", field=field, offset=0)
    return out


def der_to_pem(der: bytes) -> str:
    b64 = base64.b64encode(der).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


# --- the SGX PCK extension ---------------------------------------------------------------------


@dataclass(frozen=True)
class PckExtension:
    """What the PCK certificate says about the platform (Intel SGX PCK Certificate spec)."""

    ppid: bytes
    tcb_components: tuple[int, ...]  # SGX TCB comp 01..16 SVNs
    pce_svn: int
    cpu_svn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int  # 0 standard, 1 scalable, 2 scalable with integrity
    platform_instance_id: bytes | None = None
    dynamic_platform: bool | None = None
    cached_keys: bool | None = None
    smt_enabled: bool | None = None


def _oid_content(dotted: str) -> bytes:
    enc = enc_oid(dotted)
    return enc[2:]


_Node = tuple[int, int, int, int]  # tag, value start, value end, header offset


def _pairs(data: bytes, node: _Node, field: str) -> dict[bytes, _Node]:
    """SEQUENCE OF SEQUENCE {OID, value} -> {raw OID content: value}; duplicates rejected."""
    tag, start, end, off = node
    if tag != TAG_SEQUENCE:
        raise EvidenceFormatError("expected a SEQUENCE", field=field, offset=off)
    out: dict[bytes, _Node] = {}
    pos = start
    while pos < end:
        t, s, e = der_header(data, pos, end, field)
        if t != TAG_SEQUENCE:
            raise EvidenceFormatError("entry is not a SEQUENCE", field=field, offset=pos)
        t1, os_, oe = der_header(data, s, e, field)
        t2, vs, ve = der_header(data, oe, e, field) if t1 == TAG_OID else (0, 0, 0)
        if t1 != TAG_OID or ve != e:
            raise EvidenceFormatError("entry is not {OID, value}", field=field, offset=pos)
        oid = data[os_:oe]
        if oid in out:
            raise EvidenceFormatError("duplicate entry", field=field, offset=pos)
        out[oid] = (t2, vs, ve, oe)
        pos = e
    return out


def _uint(data: bytes, node: _Node, field: str, *, tag: int = TAG_INTEGER, hi: int = 0xFFFF) -> int:
    t, s, e, off = node
    raw = data[s:e]
    if t != tag or not raw or len(raw) > 3:
        raise EvidenceFormatError("expected a small non-negative integer", field=field, offset=off)
    if raw[0] & 0x80 or (len(raw) > 1 and raw[0] == 0 and not raw[1] & 0x80):
        raise EvidenceFormatError("negative or non-minimal integer", field=field, offset=off)
    value = int.from_bytes(raw, "big")
    if value > hi:
        raise EvidenceFormatError(f"value above {hi}", field=field, offset=off)
    return value


def _octets(data: bytes, node: _Node, field: str, size: int) -> bytes:
    t, s, e, off = node
    if t != TAG_OCTET_STRING or e - s != size:
        raise EvidenceFormatError(f"expected an OCTET STRING of {size} bytes", field=field, offset=off)
    return data[s:e]


def _boolean(data: bytes, node: _Node, field: str) -> bool:
    t, s, e, off = node
    if t != TAG_BOOLEAN or e - s != 1 or data[s] not in (0x00, 0xFF):
        raise EvidenceFormatError("malformed BOOLEAN", field=field, offset=off)
    return data[s] == 0xFF


def parse_pck_extension(value: bytes) -> PckExtension:
    """Decode the extension value (the DER SEQUENCE inside the extension's OCTET STRING)."""
    f = "pck_extension"
    tag, start, end = der_header(value, 0, len(value), f)
    if end != len(value):
        raise EvidenceFormatError("trailing bytes after extension", field=f, offset=end)
    found = _pairs(value, (tag, start, end, 0), f)

    def need(key: str, name: str) -> _Node:
        node = found.get(_RAW[key])
        if node is None:
            raise EvidenceFormatError(f"missing {name} ({key})", field=f"{f}.{name}", offset=0)
        return node

    ppid = _octets(value, need(_OID_PPID, "ppid"), f"{f}.ppid", 16)
    tcb_node = need(_OID_TCB, "tcb")
    comps = _pairs(value, tcb_node, f"{f}.tcb")
    svns: list[int] = []
    for i, raw_oid in enumerate(_RAW_COMPS):
        node = comps.get(raw_oid)
        name = f"{f}.tcb.comp{i + 1:02d}"
        if node is None:
            raise EvidenceFormatError("missing TCB component", field=name, offset=tcb_node[3])
        svns.append(_uint(value, node, name, hi=255))
    pce_node = comps.get(_RAW[_OID_PCESVN])
    cpu_node = comps.get(_RAW[_OID_CPUSVN])
    if pce_node is None or cpu_node is None:
        raise EvidenceFormatError("missing PCESVN or CPUSVN", field=f"{f}.tcb", offset=tcb_node[3])
    pce_svn = _uint(value, pce_node, f"{f}.tcb.pcesvn")
    cpu_svn = _octets(value, cpu_node, f"{f}.tcb.cpusvn", 16)
    pce_id = _octets(value, need(_OID_PCEID, "pce_id"), f"{f}.pce_id", 2)
    fmspc = _octets(value, need(_OID_FMSPC, "fmspc"), f"{f}.fmspc", 6)
    sgx_type = _uint(value, need(_OID_SGX_TYPE, "sgx_type"), f"{f}.sgx_type", tag=TAG_ENUMERATED, hi=255)
    pid_node = found.get(_RAW[_OID_PLATFORM_INSTANCE_ID])
    pid = _octets(value, pid_node, f"{f}.platform_instance_id", 16) if pid_node is not None else None
    flags: dict[bytes, bool] = {}
    cfg = found.get(_RAW[_OID_CONFIGURATION])
    if cfg is not None:
        for oid, node in _pairs(value, cfg, f"{f}.configuration").items():
            flags[oid] = _boolean(value, node, f"{f}.configuration")
    return PckExtension(
        ppid=ppid,
        tcb_components=tuple(svns),
        pce_svn=pce_svn,
        cpu_svn=cpu_svn,
        pce_id=pce_id,
        fmspc=fmspc,
        sgx_type=sgx_type,
        platform_instance_id=pid,
        dynamic_platform=flags.get(_RAW[_OID_CONFIGURATION + ".1"]),
        cached_keys=flags.get(_RAW[_OID_CONFIGURATION + ".2"]),
        smt_enabled=flags.get(_RAW[_OID_CONFIGURATION + ".3"]),
    )


def encode_pck_extension(ext: PckExtension) -> bytes:
    """Encode the extension value in Intel's layout (used by builders of test/simulated PCKs)."""
    if len(ext.tcb_components) != 16:
        raise ValueError("tcb_components must have 16 entries")
    tcb_items = [
        enc_seq(enc_oid(f"{_OID_TCB}.{i + 1}"), enc_uint(svn)) for i, svn in enumerate(ext.tcb_components)
    ]
    tcb_items.append(enc_seq(enc_oid(_OID_PCESVN), enc_uint(ext.pce_svn)))
    tcb_items.append(enc_seq(enc_oid(_OID_CPUSVN), enc_octets(ext.cpu_svn)))
    items = [
        enc_seq(enc_oid(_OID_PPID), enc_octets(ext.ppid)),
        enc_seq(enc_oid(_OID_TCB), enc_seq(*tcb_items)),
        enc_seq(enc_oid(_OID_PCEID), enc_octets(ext.pce_id)),
        enc_seq(enc_oid(_OID_FMSPC), enc_octets(ext.fmspc)),
        enc_seq(enc_oid(_OID_SGX_TYPE), enc_uint(ext.sgx_type, TAG_ENUMERATED)),
    ]
    if ext.platform_instance_id is not None:
        items.append(enc_seq(enc_oid(_OID_PLATFORM_INSTANCE_ID), enc_octets(ext.platform_instance_id)))
    cfg = [
        enc_seq(enc_oid(f"{_OID_CONFIGURATION}.{i}"), enc_bool(v))
        for i, v in ((1, ext.dynamic_platform), (2, ext.cached_keys), (3, ext.smt_enabled))
        if v is not None
    ]
    if cfg:
        items.append(enc_seq(enc_oid(_OID_CONFIGURATION), enc_seq(*cfg)))
    return enc_seq(*items)


_RAW: dict[str, bytes] = {
    k: _oid_content(k)
    for k in (
        _OID_PPID,
        _OID_TCB,
        _OID_PCEID,
        _OID_FMSPC,
        _OID_SGX_TYPE,
        _OID_PLATFORM_INSTANCE_ID,
        _OID_CONFIGURATION,
        _OID_PCESVN,
        _OID_CPUSVN,
        _OID_CONFIGURATION + ".1",
        _OID_CONFIGURATION + ".2",
        _OID_CONFIGURATION + ".3",
    )
}
_RAW_COMPS: tuple[bytes, ...] = tuple(_oid_content(f"{_OID_TCB}.{i}") for i in range(1, 17))
