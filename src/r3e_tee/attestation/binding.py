"""How an enclave binds a verifier's nonce and its own public keys into its evidence.

``report_data = SHA-512(nonce || x25519_public || p256_public)``: 64 bytes, exactly the SGX/TDX
REPORTDATA size. Nitro documents carry the nonce and public keys in their own fields and the
same digest in ``user_data``. Runtime and verifier share this one function.
"""

from __future__ import annotations

import hashlib
import hmac

X25519_LEN = 32
P256_LEN = 65  # uncompressed SEC1 point


def report_data_for(nonce: bytes, x25519_public: bytes, p256_public: bytes) -> bytes:
    if len(x25519_public) != X25519_LEN or len(p256_public) != P256_LEN:
        raise ValueError("public keys must be a raw X25519 key (32 B) and an uncompressed P-256 point (65 B)")
    return hashlib.sha512(nonce + x25519_public + p256_public).digest()


def nitro_public_key_field(x25519_public: bytes, p256_public: bytes) -> bytes:
    """The Nitro document's ``public_key``: both keys, concatenated (97 bytes)."""
    return x25519_public + p256_public


def matches(expected: bytes, observed: bytes | None) -> bool:
    return observed is not None and hmac.compare_digest(expected, observed)
