"""End-to-end encryption of function inputs and outputs (HPKE, RFC 9180).

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, base mode. The client seals the
input to the enclave's *attested* X25519 key (from a verified attestation token) and names a
reply key of its own; the enclave seals the output to that key. The operator relays and stores
only ciphertext.

The reply key travels beside the ciphertext (``X-R3E-Reply-Key``), so the operator could swap
in a key of its own and read the output, or drop it to have the output returned in the clear.
The input is therefore sealed with the reply key in its HPKE ``info``: the enclave opens it
only with the reply key the client sealed it for (or with none, if the client named none).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

from r3e_tee.keys.hpke import usable_public_key

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
INPUT_INFO = b"r3e-tee/function-input/v1"
OUTPUT_INFO = b"r3e-tee/function-output/v1"
#: a throwaway key to test reply keys with: X25519 with a low-order point fails


def input_info(reply_key: bytes | None) -> bytes:
    """The HPKE ``info`` of an input: it binds the reply key the output will be sealed to."""
    return INPUT_INFO if reply_key is None else INPUT_INFO + b"\0reply-key\0" + reply_key


def reply_public_key(reply_key: bytes) -> x25519.X25519PublicKey:
    """The client's reply key, refused unless it is a raw 32-byte X25519 key that a shared secret
    can be made with: a low-order point would make every output unsealable (after the function
    ran, and again on each retry of a queued invocation). Raises ValueError."""
    if not isinstance(reply_key, bytes) or len(reply_key) != 32:
        raise ValueError("the reply key must be a raw 32-byte X25519 public key")
    return usable_public_key(reply_key, "the reply key")


def seal_input(plaintext: bytes, enclave_key: bytes, reply_key: bytes | None = None) -> bytes:
    """Client side: encrypt to the enclave's raw X25519 public key (32 bytes), for the raw
    X25519 ``reply_key`` the request names (None: the output comes back unencrypted)."""
    return SUITE.encrypt(
        plaintext, x25519.X25519PublicKey.from_public_bytes(enclave_key), info=input_info(reply_key)
    )


def open_input(
    ciphertext: bytes, enclave_private: x25519.X25519PrivateKey, reply_key: bytes | None = None
) -> bytes:
    """Enclave side. Raises ValueError when the ciphertext was not made for this key and this
    reply key."""
    try:
        return SUITE.decrypt(ciphertext, enclave_private, info=input_info(reply_key))
    except Exception as exc:
        raise ValueError(
            "not encrypted to this enclave's attested key for this reply key, or altered"
        ) from exc


def seal_output(plaintext: bytes, reply_key: bytes) -> bytes:
    """Enclave side: encrypt the output to the client's raw X25519 reply key."""
    return SUITE.encrypt(plaintext, reply_public_key(reply_key), info=OUTPUT_INFO)


def open_output(ciphertext: bytes, reply_private: x25519.X25519PrivateKey) -> bytes:
    try:
        return SUITE.decrypt(ciphertext, reply_private, info=OUTPUT_INFO)
    except Exception as exc:
        raise ValueError("the output was not encrypted to this reply key, or was altered") from exc
