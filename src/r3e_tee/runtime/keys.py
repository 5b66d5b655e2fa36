"""The enclave's own key pairs, made fresh at every boot and never leaving the enclave.

X25519 receives HPKE-sealed secrets and inputs; P-256 signs receipts. Python cannot overwrite
the memory OpenSSL holds for a key object, so "zeroize" drops every reference and overwrites
the raw copies this module made; the process exit that follows frees the rest.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils, x25519

from r3e_tee.attestation.binding import report_data_for
from r3e_tee.errors import EnclaveError

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_ECDSA_PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


class EnclaveKeys:
    def __init__(self) -> None:
        self._hpke: x25519.X25519PrivateKey | None = x25519.X25519PrivateKey.generate()
        self._signing: ec.EllipticCurvePrivateKey | None = ec.generate_private_key(ec.SECP256R1())
        self.x25519_public = self._hpke.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.p256_public = self._signing.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def public_keys(self) -> dict[str, bytes]:
        return {"x25519": self.x25519_public, "p256": self.p256_public}

    def report_data(self, nonce: bytes) -> bytes:
        return report_data_for(nonce, self.x25519_public, self.p256_public)

    @property
    def hpke(self) -> x25519.X25519PrivateKey:
        if self._hpke is None:
            raise EnclaveError("enclave keys were zeroized")
        return self._hpke

    def sign(self, data: bytes) -> bytes:
        """DER ECDSA-P256-SHA256 signature with the attested key."""
        if self._signing is None:
            raise EnclaveError("enclave keys were zeroized")
        return self._signing.sign(data, _ECDSA_SHA256)

    def sign_digest(self, digest: bytes) -> bytes:
        """:meth:`sign` of the data whose SHA-256 is ``digest`` (the same signature)."""
        if self._signing is None:
            raise EnclaveError("enclave keys were zeroized")
        return self._signing.sign(digest, _ECDSA_PREHASHED)

    def zeroize(self) -> None:
        self._hpke = None
        self._signing = None
