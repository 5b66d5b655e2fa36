"""HPKE (RFC 9180) as the broker and the enclave runtime use it: one definition for both sides.

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, single shot, sealed to the X25519
key the enclave bound into its attestation evidence (the token's ``cnf.x25519``). A sealed blob
is ``enc (32 bytes) || ciphertext || tag``. The HPKE ``info`` binds what the blob is for: the
attestation it was released against, the secret's name and revision (or the sealing key's owner
and version), so a host that swaps or replays blobs makes the open fail.

The broker seals in **auth mode** (RFC 9180 section 5.1.3) with its identity key: a blob opens
only with the broker's public key as the sender, so it also proves its origin. Base mode would
give confidentiality alone: anyone holding the enclave's (public) key could seal a value of their
own to it, and a host relaying blobs could plant secrets or a Nitro sealing key it knows. Origin
is only as good as the enclave's knowledge of the broker's key: an enclave launched with the key
in its measured configuration (``broker_key``) opens nothing else, and one launched without it
opens nothing at all unless its image says ``unsafe-unpinned`` (runtime/secrets.py).

``cryptography`` implements base mode only, so auth mode is built here from its primitives (X25519,
HKDF, AES-GCM) and checked against RFC 9180's test vectors (tests/keys/test_hpke.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

SUITE_NAME = "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, auth mode"
ENC_LEN = 32

_KEM_ID, _KDF_ID = 0x0020, 0x0001
_AEAD_IDS = {16: 0x0001, 32: 0x0002}  # AES-128-GCM, AES-256-GCM by key length
_MODE_AUTH = 0x02
_NONCE_LEN = 12
#: a throwaway key to test public keys with (see public_key_from_b64u)
_PROBE = x25519.X25519PrivateKey.generate()


def _extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(32), b"HPKE-v1" + suite_id + label + ikm, hashlib.sha256).digest()


def _expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled = length.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info
    return HKDFExpand(hashes.SHA256(), length, labeled).derive(prk)


def _kem_shared_secret(dh: bytes, kem_context: bytes) -> bytes:
    suite_id = b"KEM" + _KEM_ID.to_bytes(2, "big")
    eae_prk = _extract(suite_id, b"", b"eae_prk", dh)
    return _expand(suite_id, eae_prk, b"shared_secret", kem_context, 32)


def _auth_key_schedule(shared_secret: bytes, info: bytes, key_len: int) -> tuple[AESGCM, bytes]:
    """KeyScheduleS/R for mode_auth (no PSK): the AEAD and the base nonce (sequence 0)."""
    suite_id = b"HPKE" + b"".join(i.to_bytes(2, "big") for i in (_KEM_ID, _KDF_ID, _AEAD_IDS[key_len]))
    context = (
        bytes([_MODE_AUTH])
        + _extract(suite_id, b"", b"psk_id_hash", b"")
        + _extract(suite_id, b"", b"info_hash", info)
    )
    secret = _extract(suite_id, shared_secret, b"secret", b"")
    key = _expand(suite_id, secret, b"key", context, key_len)
    return AESGCM(key), _expand(suite_id, secret, b"base_nonce", context, _NONCE_LEN)


def _seal_auth(
    public_key: x25519.X25519PublicKey,
    sender: x25519.X25519PrivateKey,
    plaintext: bytes,
    info: bytes,
    *,
    aad: bytes = b"",
    key_len: int = 32,
    ephemeral: x25519.X25519PrivateKey | None = None,
) -> bytes:
    """SealAuth, single shot. ``ephemeral`` and ``key_len`` exist for the RFC's test vectors."""
    eph = ephemeral or x25519.X25519PrivateKey.generate()
    enc = eph.public_key().public_bytes_raw()
    dh = eph.exchange(public_key) + sender.exchange(public_key)
    kem_context = enc + public_key.public_bytes_raw() + sender.public_key().public_bytes_raw()
    aead, nonce = _auth_key_schedule(_kem_shared_secret(dh, kem_context), info, key_len)
    return enc + aead.encrypt(nonce, bytes(plaintext), aad)


def _open_auth(
    private_key: x25519.X25519PrivateKey,
    sender: x25519.X25519PublicKey,
    blob: bytes,
    info: bytes,
    *,
    aad: bytes = b"",
    key_len: int = 32,
) -> bytes:
    if len(blob) < ENC_LEN + 16:
        raise ValueError("the sealed blob is too short")
    enc = blob[:ENC_LEN]
    pk_e = x25519.X25519PublicKey.from_public_bytes(enc)
    dh = private_key.exchange(pk_e) + private_key.exchange(sender)
    kem_context = enc + private_key.public_key().public_bytes_raw() + sender.public_bytes_raw()
    aead, nonce = _auth_key_schedule(_kem_shared_secret(dh, kem_context), info, key_len)
    return aead.decrypt(nonce, blob[ENC_LEN:], aad)


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
    return usable_public_key(raw, "cnf.x25519")


def usable_public_key(raw: bytes, what: str) -> x25519.X25519PublicKey:
    """``raw`` as an X25519 key a shared secret can be made with: anyone may name any 32 bytes,
    and a low-order point gives an all-zero shared secret. Raises ValueError naming ``what``."""
    key = x25519.X25519PublicKey.from_public_bytes(raw)
    try:
        _PROBE.exchange(key)
    except ValueError:
        raise ValueError(f"{what} is a low-order X25519 point: nothing can be sealed to it") from None
    return key


def public_key_b64u(public_key: x25519.X25519PublicKey) -> str:
    return base64.urlsafe_b64encode(public_key.public_bytes_raw()).rstrip(b"=").decode()


def seal(
    public_key: x25519.X25519PublicKey,
    plaintext: bytes | bytearray,
    info: bytes,
    sender: x25519.X25519PrivateKey,
) -> bytes:
    """Seal to ``public_key`` as ``sender`` (auth mode): it opens only with the sender's key."""
    return _seal_auth(public_key, sender, bytes(plaintext), info)


def open_sealed(
    private_key: x25519.X25519PrivateKey, blob: bytes, info: bytes, sender: x25519.X25519PublicKey
) -> bytes:
    """Raises ``cryptography.exceptions.InvalidTag`` when the blob does not open: not sealed to
    this key, by this sender, for this ``info``, or altered (a short blob or a low-order key too)."""
    try:
        return _open_auth(private_key, sender, blob, info)
    except ValueError as exc:  # a low-order point or a short blob: the same answer as a bad tag
        raise InvalidTag from exc
