"""Pinned DCAP trust anchors.

Intel re-issued the SGX Root CA with the same key (the 2018 issuance expires 2033, the current one
2049) and 2020-era quotes still embed the old certificate, so trust is pinned by the *public key*
(SubjectPublicKeyInfo), not by certificate hash. The simulation provider pins its per-installation
root the same way through :meth:`TrustRoot.from_pem` / :meth:`TrustRoot.from_der`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from r3e_tee.errors import ConfigError

# Intel SGX Root CA (public trust anchor of DCAP / PCS), issuance valid 2018-05-21 .. 2049-12-31,
# SPKI SHA-256 a0af031289f5d5d4... (same key as the 2018 issuance that expires 2033).
INTEL_SGX_ROOT_CA_PEM = """-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
"""

INTEL_SGX_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"


@dataclass(frozen=True, eq=False)
class TrustRoot:
    """A pinned root: its certificate (for name, validity and key) and its SPKI (the pin)."""

    certificate: x509.Certificate
    der: bytes
    spki: bytes

    @property
    def public_key(self) -> CertificateIssuerPublicKeyTypes:
        return self.certificate.public_key()  # type: ignore[return-value]

    @cached_property
    def subject_der(self) -> bytes:
        """The subject Name exactly as encoded (compared with issuer names byte for byte)."""
        return self.certificate.subject.public_bytes()

    @property
    def spki_sha256(self) -> str:
        return hashlib.sha256(self.spki).hexdigest()

    @property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def same_key(self, cert: x509.Certificate) -> bool:
        """True when ``cert`` carries this root's public key (any issuance of the root)."""
        return _spki(cert) == self.spki

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> TrustRoot:
        return cls(cert, cert.public_bytes(Encoding.DER), _spki(cert))

    @classmethod
    def from_der(cls, der: bytes) -> TrustRoot:
        try:
            return cls.from_certificate(x509.load_der_x509_certificate(der))
        except ValueError as exc:
            raise ConfigError(f"trust root is not a DER certificate: {exc}") from None

    @classmethod
    def from_pem(cls, pem: bytes | str) -> TrustRoot:
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            return cls.from_certificate(x509.load_pem_x509_certificate(data))
        except ValueError as exc:
            raise ConfigError(f"trust root is not a PEM certificate: {exc}") from None

    @classmethod
    def load(cls, source: TrustRoot | x509.Certificate | bytes | str | Path) -> TrustRoot:
        """Accept a TrustRoot, certificate, PEM/DER bytes, PEM text, or a path to a PEM/DER file."""
        if isinstance(source, TrustRoot):
            return source
        if isinstance(source, x509.Certificate):
            return cls.from_certificate(source)
        if isinstance(source, Path) or (isinstance(source, str) and "-----BEGIN" not in source):
            path = Path(source)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read trust root: {exc}", file=str(path)) from None
            return cls.load(data)
        if isinstance(source, str):
            return cls.from_pem(source)
        return cls.from_pem(source) if b"-----BEGIN" in source else cls.from_der(source)


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@lru_cache(maxsize=1)
def intel_sgx_root() -> TrustRoot:
    """The pinned Intel SGX Root CA."""
    return TrustRoot.from_pem(INTEL_SGX_ROOT_CA_PEM)
