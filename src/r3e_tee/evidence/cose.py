"""COSE_Sign1 (RFC 9052) parsing, Sig_structure construction and an ES256/384/512 signer.

Only what attestation needs: one signer, an attached payload, ECDSA. The parser keeps the exact
bytes of the protected header and payload because the signature covers those bytes, not a
re-encoding of the decoded maps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from r3e_tee.errors import EvidenceFormatError
from r3e_tee.evidence.cbor import CborReader, decode

__all__ = [
    "ALG_ES256",
    "ALG_ES384",
    "ALG_ES512",
    "COSE_SIGN1_TAG",
    "algorithm",
    "CoseSign1",
    "ecdsa_der_to_raw",
    "ecdsa_raw_to_der",
    "parse_cose_sign1",
    "sig_structure",
    "sign1",
]

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_CRIT = 2
# header labels whose semantics this parser implements (what a ``crit`` list may name)
UNDERSTOOD_HEADERS = frozenset({HEADER_ALG})
ALG_ES256 = -7
ALG_ES384 = -35
ALG_ES512 = -36
# alg -> (curve, hash, coordinate size)
_ALGS: dict[int, tuple[ec.EllipticCurve, hashes.HashAlgorithm, int]] = {
    ALG_ES256: (ec.SECP256R1(), hashes.SHA256(), 32),
    ALG_ES384: (ec.SECP384R1(), hashes.SHA384(), 48),
    ALG_ES512: (ec.SECP521R1(), hashes.SHA512(), 66),
}


@dataclass(frozen=True)
class CoseSign1:
    """A decoded COSE_Sign1; ``protected`` and ``payload`` are the exact signed bytes."""

    protected: bytes
    protected_header: Mapping[Any, Any]
    unprotected: Mapping[Any, Any]
    payload: bytes
    signature: bytes
    tagged: bool
    # absolute offset of the payload's first byte in the parsed buffer (for nested error offsets)
    payload_offset: int = field(default=0, compare=False)

    @property
    def alg(self) -> int | None:
        value = self.protected_header.get(1)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def to_be_signed(self, external_aad: bytes = b"") -> bytes:
        return sig_structure(self.protected, self.payload, external_aad)


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([(major << 5) | n])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < (1 << (8 * size)):
            return bytes([(major << 5) | info]) + n.to_bytes(size, "big")
    raise ValueError("length too large for CBOR")


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """``["Signature1", protected, external_aad, payload]`` in canonical CBOR, built directly."""
    return b"".join(
        (
            b"\x84\x6aSignature1",
            _head(2, len(protected)),
            protected,
            _head(2, len(external_aad)),
            external_aad,
            _head(2, len(payload)),
            payload,
        )
    )


def parse_cose_sign1(data: bytes, *, field: str = "cose_sign1") -> CoseSign1:
    """Parse a tagged (18) or untagged COSE_Sign1; the whole buffer must be that one item."""
    r = CborReader(data, field=field)
    if r.at_end():
        raise r.error("empty input")
    tagged = False
    start = r.pos
    major, _, arg = r.read_head(field)
    if major == 6:
        if arg != COSE_SIGN1_TAG:
            raise r.error(f"tag {arg} is not COSE_Sign1 (18)", field, start)
        tagged = True
        start = r.pos
        major, _, arg = r.read_head(field)
    if major != 4:
        raise r.error("COSE_Sign1 must be a CBOR array", field, start)
    if arg is not None and arg != 4:
        raise r.error(f"COSE_Sign1 array must have 4 items, has {arg}", field, start)

    def item(name: str) -> tuple[Any, int]:
        if arg is None and (r.at_end() or r.data[r.pos] == 0xFF):
            raise r.error("COSE_Sign1 array must have 4 items", f"{field}.{name}")
        at = r.pos
        return r.read_value(f"{field}.{name}", 1), at

    protected, p_at = item("protected")
    if not isinstance(protected, bytes):
        raise r.error("protected header must be a byte string", f"{field}.protected", p_at)
    unprotected, u_at = item("unprotected")
    if not isinstance(unprotected, dict):
        raise r.error("unprotected header must be a map", f"{field}.unprotected", u_at)
    payload, pl_at = item("payload")
    if payload is None:
        raise r.error("detached payloads are not supported", f"{field}.payload", pl_at)
    if not isinstance(payload, bytes):
        raise r.error("payload must be a byte string", f"{field}.payload", pl_at)
    payload_offset = r.pos - len(payload)
    signature, s_at = item("signature")
    if not isinstance(signature, bytes):
        raise r.error("signature must be a byte string", f"{field}.signature", s_at)
    if arg is None:
        if r.at_end() or r.data[r.pos] != 0xFF:
            raise r.error("COSE_Sign1 array must have exactly 4 items", field)
        r.pos += 1
    if not r.at_end():
        raise r.error(f"{len(r.data) - r.pos} trailing bytes after COSE_Sign1", field)

    if protected:
        header = decode(protected, field=f"{field}.protected", base_offset=p_at + _hlen(data, p_at))
        if not isinstance(header, dict):
            raise EvidenceFormatError(
                "protected header must encode a map", field=f"{field}.protected", offset=p_at
            )
    else:
        header = {}
    for label in set(header) & set(unprotected):
        raise EvidenceFormatError(
            f"header label {label!r} appears in both protected and unprotected headers",
            field=f"{field}.unprotected",
            offset=u_at,
        )
    _check_crit(header, unprotected, field, p_at, u_at)
    return CoseSign1(
        protected=protected,
        protected_header=header,
        unprotected=unprotected,
        payload=payload,
        signature=signature,
        tagged=tagged,
        payload_offset=payload_offset,
    )


def _check_crit(
    header: Mapping[Any, Any], unprotected: Mapping[Any, Any], field: str, p_at: int, u_at: int
) -> None:
    """RFC 9052 section 3.1: ``crit`` lives in the protected header, is a non-empty array of
    labels, and a message listing a label this parser does not process MUST be rejected (it
    only understands ``alg``), else a signer's must-understand semantics are silently dropped."""
    if HEADER_CRIT in unprotected:
        raise EvidenceFormatError(
            "crit (label 2) must be in the protected header", field=f"{field}.unprotected.crit", offset=u_at
        )
    if HEADER_CRIT not in header:
        return
    crit = header[HEADER_CRIT]
    if not isinstance(crit, list) or not crit:
        raise EvidenceFormatError(
            "crit (label 2) must be a non-empty array of labels", field=f"{field}.protected.crit", offset=p_at
        )
    for label in crit:
        if isinstance(label, bool) or not isinstance(label, int | str):
            raise EvidenceFormatError(
                f"crit lists {label!r}, which is not a header label",
                field=f"{field}.protected.crit",
                offset=p_at,
            )
        if label not in UNDERSTOOD_HEADERS:
            raise EvidenceFormatError(
                f"crit lists header label {label!r}, which this verifier does not understand",
                field=f"{field}.protected.crit",
                offset=p_at,
            )


def _hlen(data: bytes, at: int) -> int:
    """Length of the CBOR head at ``at`` (so nested offsets point at the content)."""
    info = data[at] & 0x1F
    return 1 + {24: 1, 25: 2, 26: 4, 27: 8}.get(info, 0)


def ecdsa_raw_to_der(raw: bytes, size: int) -> bytes:
    """COSE carries r||s as fixed-size big-endian integers; cryptography wants DER."""
    if len(raw) != 2 * size:
        raise ValueError(f"signature must be {2 * size} bytes, got {len(raw)}")
    return encode_dss_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))


def ecdsa_der_to_raw(der: bytes, size: int) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def algorithm(alg: int) -> tuple[ec.EllipticCurve, hashes.HashAlgorithm, int]:
    """(curve, hash, coordinate size) of a supported COSE ECDSA algorithm."""
    try:
        return _ALGS[alg]
    except KeyError:
        raise ValueError(f"unsupported COSE algorithm {alg}") from None


def sign1(
    payload: bytes,
    key: ec.EllipticCurvePrivateKey,
    *,
    alg: int = ALG_ES384,
    tagged: bool = False,
    unprotected: Mapping[Any, Any] | None = None,
) -> bytes:
    """Build a COSE_Sign1 over ``payload`` (for builders and the simulation provider)."""
    _, hash_alg, size = algorithm(alg)
    protected = cbor2.dumps({1: alg})
    der = key.sign(sig_structure(protected, payload), ec.ECDSA(hash_alg))
    body = [protected, dict(unprotected or {}), payload, ecdsa_der_to_raw(der, size)]
    obj: Any = cbor2.CBORTag(COSE_SIGN1_TAG, body) if tagged else body
    return cbor2.dumps(obj)
