"""HPKE (RFC 9180) as the broker and the enclave runtime use it: one definition for both sides.

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, base mode, single shot, sealed to
the X25519 key the enclave bound into its attestation evidence (the token's ``cnf.x25519``). A
sealed blob is ``enc (32 bytes) || ciphertext || tag``. The HPKE ``info`` binds what the blob is
for: the attestation it was released against, the secret's name and revision (or the sealing
key's owner and version), so a host that swaps or replays blobs makes the open fail.

Base mode gives confidentiality, not origin: only the enclave reads a blob, but anyone holding the
enclave's (public) key could seal a value of their own to it. The enclave has no pinned key of
the broker to check against; binding one into the measured image (or HPKE auth mode) would.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
SUITE_NAME = "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM"
ENC_LEN = 32


def secret_info(attestation_id: str, name: str, revision: int) -> bytes:
    return b"\0".join(
        [b"r3e-tee/secret-release/v1", attestation_id.encode(), name.encode(), str(revision).encode()]
    )


def seal_key_info(attestation_id: str, owner: str, version: int) -> bytes:
    return b"\0".join(
        [b"r3e-tee/seal-key/v1", attestation_id.encode(), owner.encode(), str(version).encode()]
    )


def public_key_from_b64u(value: str) -> x25519.X25519PublicKey:
    """The raw X25519 key of a token's ``cnf.x25519`` (base64url without padding)."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("cnf.x25519 is not base64url") from None
    if len(raw) != 32:
        raise ValueError(f"cnf.x25519 is {len(raw)} bytes, expected 32")
    return x25519.X25519PublicKey.from_public_bytes(raw)


def seal(public_key: x25519.X25519PublicKey, plaintext: bytes | bytearray, info: bytes) -> bytes:
    return SUITE.encrypt(bytes(plaintext), public_key, info=info)


def open_sealed(private_key: x25519.X25519PrivateKey, blob: bytes, info: bytes) -> bytes:
    """Raises ``cryptography.exceptions.InvalidTag`` (or ValueError) when the blob does not open."""
    return SUITE.decrypt(blob, private_key, info=info)
