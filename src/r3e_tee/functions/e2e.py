"""End-to-end encryption of function inputs and outputs (HPKE, RFC 9180).

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, base mode. The client seals the
input to the enclave's *attested* X25519 key (from a verified attestation token) and names a
reply key of its own; the enclave seals the output to that key. The operator relays and stores
only ciphertext.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
INPUT_INFO = b"r3e-tee/function-input/v1"
OUTPUT_INFO = b"r3e-tee/function-output/v1"
#: a throwaway key to test reply keys with: X25519 with a low-order point fails
_PROBE = x25519.X25519PrivateKey.generate()


def reply_public_key(reply_key: bytes) -> x25519.X25519PublicKey:
    """The client's reply key, refused unless it is a raw 32-byte X25519 key that a shared secret
    can be made with: a low-order point would make every output unsealable (after the function
    ran, and again on each retry of a queued invocation). Raises ValueError."""
    if not isinstance(reply_key, bytes) or len(reply_key) != 32:
        raise ValueError("the reply key must be a raw 32-byte X25519 public key")
    key = x25519.X25519PublicKey.from_public_bytes(reply_key)
    try:
        _PROBE.exchange(key)
    except ValueError:
        raise ValueError("the reply key is a low-order X25519 point: nothing can be sealed to it") from None
    return key


def seal_input(plaintext: bytes, enclave_key: bytes) -> bytes:
    """Client side: encrypt to the enclave's raw X25519 public key (32 bytes)."""
    return SUITE.encrypt(plaintext, x25519.X25519PublicKey.from_public_bytes(enclave_key), info=INPUT_INFO)


def open_input(ciphertext: bytes, enclave_private: x25519.X25519PrivateKey) -> bytes:
    """Enclave side. Raises ValueError when the ciphertext was not made for this key."""
    try:
        return SUITE.decrypt(ciphertext, enclave_private, info=INPUT_INFO)
    except Exception as exc:
        raise ValueError("not encrypted to this enclave's attested key, or altered") from exc


def seal_output(plaintext: bytes, reply_key: bytes) -> bytes:
    """Enclave side: encrypt the output to the client's raw X25519 reply key."""
    return SUITE.encrypt(plaintext, reply_public_key(reply_key), info=OUTPUT_INFO)


def open_output(ciphertext: bytes, reply_private: x25519.X25519PrivateKey) -> bytes:
    try:
        return SUITE.decrypt(ciphertext, reply_private, info=OUTPUT_INFO)
    except Exception as exc:
        raise ValueError("the output was not encrypted to this reply key, or was altered") from exc
