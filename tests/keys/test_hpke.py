"""HPKE auth mode, built here from primitives: RFC 9180's known answers, and the ways a blob
must fail to open (another sender, another recipient, another info, altered bytes)."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519

from r3e_tee.keys import hpke

# RFC 9180 Appendix A.1.3: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, Auth mode
INFO = bytes.fromhex("4f6465206f6e2061204772656369616e2055726e")
SK_E = "ff4442ef24fbc3c1ff86375b0be1e77e88a0de1e79b30896d73411c5ff4c3518"
ENC = "23fb952571a14a25e3d678140cd0e5eb47a0961bb18afcf85896e5453c312e76"
SK_R = "fdea67cf831f1ca98d8e27b1f6abeb5b7745e9d35348b80fa407ff6958f9137e"
PK_R = "1632d5c2f71c2b38d0a8fcc359355200caa8b1ffdf28618080466c909cb69b2e"
SK_S = "dc4a146313cce60a278a5323d321f051c5707e9c45ba21a3479fecdf76fc69dd"
PK_S = "8b0c70873dc5aecb7f9ee4e62406a397b350e57012be45cf53b7105ae731790b"
PT = bytes.fromhex("4265617574792069732074727574682c20747275746820626561757479")
AAD = bytes.fromhex("436f756e742d30")  # sequence number 0
CT = "5fd92cc9d46dbf8943e72a07e42f363ed5f721212cd90bcfd072bfd9f44e06b80fd17824947496e21b680c141b"


def _sk(hexkey: str) -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(hexkey))


def test_auth_mode_reproduces_rfc9180_a13() -> None:
    recipient, sender = _sk(SK_R), _sk(SK_S)
    assert recipient.public_key().public_bytes_raw().hex() == PK_R
    assert sender.public_key().public_bytes_raw().hex() == PK_S
    blob = hpke._seal_auth(recipient.public_key(), sender, PT, INFO, aad=AAD, key_len=16, ephemeral=_sk(SK_E))
    assert blob.hex() == ENC + CT
    assert hpke._open_auth(recipient, sender.public_key(), blob, INFO, aad=AAD, key_len=16) == PT
    # the same vector with one bit of the ciphertext flipped, or another sender named, fails
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(InvalidTag):
        hpke._open_auth(recipient, sender.public_key(), bytes(bad), INFO, aad=AAD, key_len=16)
    with pytest.raises(InvalidTag):
        hpke._open_auth(recipient, recipient.public_key(), blob, INFO, aad=AAD, key_len=16)


def test_sealed_blobs_open_only_for_the_recipient_from_the_sender_for_the_info() -> None:
    broker, enclave = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    host = x25519.X25519PrivateKey.generate()  # anyone else who knows the enclave's public key
    info = hpke.secret_info("att-1", "api-key", 3)
    blob = hpke.seal(enclave.public_key(), b"s3cret", info, broker)
    assert hpke.open_sealed(enclave, blob, info, broker.public_key()) == b"s3cret"
    assert len(blob) == hpke.ENC_LEN + len(b"s3cret") + 16

    planted = hpke.seal(enclave.public_key(), b"host's value", info, host)
    with pytest.raises(InvalidTag):  # a value sealed by anyone but the pinned broker
        hpke.open_sealed(enclave, planted, info, broker.public_key())
    with pytest.raises(InvalidTag):  # replayed for another secret or attestation
        hpke.open_sealed(enclave, blob, hpke.secret_info("att-1", "db-url", 3), broker.public_key())
    with pytest.raises(InvalidTag):  # opened by another enclave
        hpke.open_sealed(host, blob, info, broker.public_key())
    with pytest.raises(InvalidTag):  # truncated, or an all-zero (low-order) ephemeral key
        hpke.open_sealed(enclave, blob[:40], info, broker.public_key())
    with pytest.raises(InvalidTag):
        hpke.open_sealed(enclave, bytes(32) + blob[32:], info, broker.public_key())
