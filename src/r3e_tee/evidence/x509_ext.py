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
import re
from collections.abc import Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True)
class DerNode:
    """One TLV: ``tag``, and the value's span ``[start, end)`` inside ``data``."""

    tag: int
    offset: int
    start: int
    end: int
    data: bytes

    @property
    def value(self) -> bytes:
        return self.data[self.start : self.end]


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


def der_children(node: DerNode, *, field: str = "der") -> Iterator[DerNode]:
    """The TLVs inside a constructed node, which must exactly fill it."""
    pos = node.start
    while pos < node.end:
        child = der_read(node.data, pos, node.end, field=field)
        yield child
        pos = child.end


def _expect(node: DerNode, tag: int, field: str) -> DerNode:
    if node.tag != tag:
        raise EvidenceFormatError(
            f"expected DER tag 0x{tag:02x}, found 0x{node.tag:02x}", field=field, offset=node.offset
        )
    return node


def der_oid(node: DerNode, field: str = "oid") -> str:
    """Decode an OBJECT IDENTIFIER to dotted form."""
    _expect(node, TAG_OID, field)
    raw = node.value
    if not raw or raw[-1] & 0x80:
        raise EvidenceFormatError("malformed OID", field=field, offset=node.offset)
    arcs: list[int] = []
    acc = 0
    for i, b in enumerate(raw):
        if acc == 0 and b == 0x80:
            raise EvidenceFormatError("non-minimal OID arc", field=field, offset=node.start + i)
        acc = (acc << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(acc)
            acc = 0
    first = arcs[0]
    head = [0, first] if first < 40 else ([1, first - 40] if first < 80 else [2, first - 80])
    return ".".join(str(a) for a in head + arcs[1:])


def der_uint(node: DerNode, field: str, *, tag: int = TAG_INTEGER, max_bytes: int = 8) -> int:
    """Decode a non-negative INTEGER/ENUMERATED with minimal encoding."""
    _expect(node, tag, field)
    raw = node.value
    if not raw or len(raw) > max_bytes + 1:
        raise EvidenceFormatError("bad integer length", field=field, offset=node.offset)
    if raw[0] & 0x80:
        raise EvidenceFormatError("negative integer", field=field, offset=node.start)
    if len(raw) > 1 and raw[0] == 0 and not raw[1] & 0x80:
        raise EvidenceFormatError("non-minimal integer", field=field, offset=node.start)
    return int.from_bytes(raw, "big")


def der_octets(node: DerNode, field: str, size: int | None = None) -> bytes:
    _expect(node, TAG_OCTET_STRING, field)
    raw = node.value
    if size is not None and len(raw) != size:
        raise EvidenceFormatError(f"expected {size} bytes, found {len(raw)}", field=field, offset=node.offset)
    return raw


def der_bool(node: DerNode, field: str) -> bool:
    _expect(node, TAG_BOOLEAN, field)
    if node.end - node.start != 1 or node.value[0] not in (0x00, 0xFF):
        raise EvidenceFormatError("malformed BOOLEAN", field=field, offset=node.offset)
    return node.value[0] == 0xFF


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
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
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

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


def pem_chain_to_der(pem: bytes | str, *, field: str = "pem_chain") -> list[bytes]:
    """Split a concatenated PEM certificate chain into DER blobs, leaf first, as given.

    Bytes outside the armour (newlines, a trailing NUL as in DCAP certification data) are ignored.
    """
    raw = pem.encode() if isinstance(pem, str) else pem
    out: list[bytes] = []
    for m in _PEM_CERT.finditer(raw):
        try:
            out.append(base64.b64decode(b"".join(m.group(1).split()), validate=True))
        except (binascii.Error, ValueError) as exc:
            raise EvidenceFormatError(
                f"bad base64 in PEM certificate: {exc}", field=field, offset=m.start()
            ) from None
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


def parse_pck_extension(value: bytes) -> PckExtension:
    """Decode the extension value (the DER SEQUENCE inside the extension's OCTET STRING)."""
    f = "pck_extension"
    root = _expect(der_read(value, 0, field=f), TAG_SEQUENCE, f)
    if root.end != len(value):
        raise EvidenceFormatError("trailing bytes after extension", field=f, offset=root.end)
    found: dict[str, DerNode] = {}
    for entry in der_children(root, field=f):
        _expect(entry, TAG_SEQUENCE, f)
        kids = list(der_children(entry, field=f))
        if len(kids) != 2:
            raise EvidenceFormatError("extension entry is not {OID, value}", field=f, offset=entry.offset)
        oid = der_oid(kids[0], f)
        if oid in found:
            raise EvidenceFormatError(f"duplicate entry {oid}", field=f, offset=entry.offset)
        found[oid] = kids[1]

    def need(oid: str, name: str) -> DerNode:
        node = found.get(oid)
        if node is None:
            raise EvidenceFormatError(f"missing {name} ({oid})", field=f"{f}.{name}", offset=0)
        return node

    ppid = der_octets(need(_OID_PPID, "ppid"), f"{f}.ppid", 16)
    tcb_node = _expect(need(_OID_TCB, "tcb"), TAG_SEQUENCE, f"{f}.tcb")
    comps: dict[str, DerNode] = {}
    for entry in der_children(tcb_node, field=f"{f}.tcb"):
        _expect(entry, TAG_SEQUENCE, f"{f}.tcb")
        kids = list(der_children(entry, field=f"{f}.tcb"))
        if len(kids) != 2:
            raise EvidenceFormatError("TCB entry is not {OID, value}", field=f"{f}.tcb", offset=entry.offset)
        comps[der_oid(kids[0], f"{f}.tcb")] = kids[1]
    svns: list[int] = []
    for i in range(1, 17):
        node = comps.get(f"{_OID_TCB}.{i}")
        name = f"{f}.tcb.comp{i:02d}"
        if node is None:
            raise EvidenceFormatError("missing TCB component", field=name, offset=tcb_node.offset)
        svn = der_uint(node, name)
        if svn > 255:
            raise EvidenceFormatError("component SVN above 255", field=name, offset=node.offset)
        svns.append(svn)
    pce_node = comps.get(_OID_PCESVN)
    cpu_node = comps.get(_OID_CPUSVN)
    if pce_node is None or cpu_node is None:
        raise EvidenceFormatError("missing PCESVN or CPUSVN", field=f"{f}.tcb", offset=tcb_node.offset)
    pce_svn = der_uint(pce_node, f"{f}.tcb.pcesvn")
    if pce_svn > 0xFFFF:
        raise EvidenceFormatError("PCESVN above 65535", field=f"{f}.tcb.pcesvn", offset=pce_node.offset)
    cpu_svn = der_octets(cpu_node, f"{f}.tcb.cpusvn", 16)
    pce_id = der_octets(need(_OID_PCEID, "pce_id"), f"{f}.pce_id", 2)
    fmspc = der_octets(need(_OID_FMSPC, "fmspc"), f"{f}.fmspc", 6)
    sgx_type = der_uint(need(_OID_SGX_TYPE, "sgx_type"), f"{f}.sgx_type", tag=TAG_ENUMERATED, max_bytes=1)
    pid_node = found.get(_OID_PLATFORM_INSTANCE_ID)
    pid = der_octets(pid_node, f"{f}.platform_instance_id", 16) if pid_node is not None else None
    flags: dict[str, bool] = {}
    cfg = found.get(_OID_CONFIGURATION)
    if cfg is not None:
        _expect(cfg, TAG_SEQUENCE, f"{f}.configuration")
        for entry in der_children(cfg, field=f"{f}.configuration"):
            kids = list(der_children(_expect(entry, TAG_SEQUENCE, f"{f}.configuration")))
            if len(kids) != 2:
                raise EvidenceFormatError(
                    "bad configuration entry", field=f"{f}.configuration", offset=entry.offset
                )
            flags[der_oid(kids[0], f"{f}.configuration")] = der_bool(kids[1], f"{f}.configuration")
    return PckExtension(
        ppid=ppid,
        tcb_components=tuple(svns),
        pce_svn=pce_svn,
        cpu_svn=cpu_svn,
        pce_id=pce_id,
        fmspc=fmspc,
        sgx_type=sgx_type,
        platform_instance_id=pid,
        dynamic_platform=flags.get(_OID_CONFIGURATION + ".1"),
        cached_keys=flags.get(_OID_CONFIGURATION + ".2"),
        smt_enabled=flags.get(_OID_CONFIGURATION + ".3"),
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
