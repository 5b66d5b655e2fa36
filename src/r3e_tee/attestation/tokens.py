"""Signed attestation results: short-lived JWTs and the JWKS that verifies them offline.

One signing key per provider (the guide's Secret ``tee-attestation-keys``: ``sgx-key.pem``,
``nitro-key.pem``; a generated key for simulation and development). A relying party needs only
the JWKS to check a token; ``kid`` is the RFC 7638 thumbprint so keys can rotate with old ones
kept in the JWKS until every token they signed has expired.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from r3e_tee.errors import KeyManagementError, R3ETeeError

TOKEN_TYPE = "r3e-attestation+jwt"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


class TokenError(R3ETeeError):
    """A token failed verification (signature, expiry, issuer, unknown key)."""

    code = "invalid_token"
    http_status = 401
    exit_code = 1


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64u_int(value: int, length: int | None = None) -> str:
    size = length or max(1, (value.bit_length() + 7) // 8)
    return _b64u(value.to_bytes(size, "big"))


_CURVES: dict[str, tuple[str, int, str]] = {
    "secp256r1": ("P-256", 32, "ES256"),
    "secp384r1": ("P-384", 48, "ES384"),
    "secp521r1": ("P-521", 66, "ES512"),
}


def public_jwk(key: PublicKey) -> dict[str, str]:
    """The JWK of a public key (members in RFC 7638 order for the thumbprint)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv, size, _ = _CURVES[key.curve.name]
        nums = key.public_numbers()
        return {"crv": crv, "kty": "EC", "x": _b64u_int(nums.x, size), "y": _b64u_int(nums.y, size)}
    if isinstance(key, rsa.RSAPublicKey):
        rnums = key.public_numbers()
        return {"e": _b64u_int(rnums.e), "kty": "RSA", "n": _b64u_int(rnums.n)}
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"crv": "Ed25519", "kty": "OKP", "x": _b64u(raw)}


def thumbprint(key: PublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256), used as ``kid``."""
    canonical = json.dumps(public_jwk(key), separators=(",", ":"), sort_keys=True)
    return _b64u(hashlib.sha256(canonical.encode()).digest())


def algorithm_for(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return _CURVES[key.curve.name][2]
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    return "EdDSA"


def load_private_key(path: Path, *, what: str) -> PrivateKey:
    """Load a PEM signing key; errors name the file, never its content."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyManagementError(
            f"cannot read {what} {path}: {exc.strerror}",
            hint="mount the Secret tee-attestation-keys or fix the keyFile path",
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyManagementError(
            f"{what} {path} is not an unencrypted PEM private key",
            hint="store an EC P-256 key: openssl ecparam -name prime256v1 -genkey -noout",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise KeyManagementError(f"{what} {path}: unsupported key type {type(key).__name__}")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in _CURVES:
        raise KeyManagementError(f"{what} {path}: unsupported curve {key.curve.name}")
    return key


def generate_key_file(path: Path) -> PrivateKey:
    """A new P-256 signing key written with mode 0600 (development only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


@dataclass(frozen=True)
class SigningKey:
    kid: str
    provider: str
    key: PrivateKey
    alg: str
    # until when tokens signed by this key may still be valid (retired keys only)
    retire_after: float | None = None

    @classmethod
    def of(cls, provider: str, key: PrivateKey, retire_after: float | None = None) -> SigningKey:
        return cls(thumbprint(key.public_key()), provider, key, algorithm_for(key), retire_after)


@dataclass(frozen=True)
class IssuedToken:
    token: str
    jti: str
    kid: str
    issued_at: int
    expires_at: int


class TokenIssuer:
    """Signs attestation results; knows current and retired keys for the JWKS."""

    def __init__(self, keys: Mapping[str, PrivateKey], *, issuer: str, ttl: float) -> None:
        if not keys:
            raise KeyManagementError("no attestation token signing key configured")
        self._current: dict[str, SigningKey] = {p: SigningKey.of(p, k) for p, k in keys.items()}
        self._retired: list[SigningKey] = []
        self.issuer = issuer
        self.ttl = int(ttl)

    def key_for(self, provider: str) -> SigningKey:
        key = self._current.get(provider) or self._current.get("default")
        if key is None:
            raise KeyManagementError(
                f"no attestation token signing key for provider {provider!r}",
                hint=f"set providers[].attestation.keyFile for {provider} (e.g. {provider}-key.pem)",
            )
        return key

    def issue(
        self, provider: str, claims: Mapping[str, Any], *, subject: str, jti: str | None = None
    ) -> IssuedToken:
        key = self.key_for(provider)
        now = int(time.time())
        jti = jti or uuid.uuid4().hex
        payload = {
            **claims,
            "iss": self.issuer,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl,
            "jti": jti,
        }
        token = jwt.encode(payload, key.key, algorithm=key.alg, headers={"kid": key.kid, "typ": TOKEN_TYPE})
        return IssuedToken(token, jti, key.kid, now, now + self.ttl)

    def rotate(self, provider: str, new_key: PrivateKey) -> SigningKey:
        """Make ``new_key`` current; the old key stays in the JWKS until its tokens expire."""
        old = self._current.get(provider)
        if old is not None:
            self._retired.append(SigningKey.of(provider, old.key, time.time() + self.ttl))
        self._current[provider] = SigningKey.of(provider, new_key)
        return self._current[provider]

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        now = time.time()
        self._retired = [k for k in self._retired if k.retire_after is None or k.retire_after > now]
        keys = []
        seen: set[str] = set()
        for sk in [*self._current.values(), *self._retired]:
            if sk.kid in seen:
                continue
            seen.add(sk.kid)
            jwk = public_jwk(sk.key.public_key())
            keys.append({**jwk, "kid": sk.kid, "alg": sk.alg, "use": "sig"})
        return {"keys": keys}


def verify_token(
    token: str,
    jwks: Mapping[str, Any],
    *,
    issuer: str | None = None,
    at: float | None = None,
    leeway: float = 0,
) -> dict[str, Any]:
    """Check a token against a JWKS (offline). Raises :class:`TokenError` with the reason."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("not a JWT (cannot read its header)") from None
    kid = header.get("kid")
    keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys, list) or not all(isinstance(k, Mapping) for k in keys):
        # a relying party's own file or URL: say what is wrong with it rather than crash on it
        raise TokenError(
            'the JWKS is not a JWK set: it must be an object whose "keys" is a list of JWKs',
            hint="use the issuing service's /.well-known/jwks.json as it serves it",
        )
    match = next((k for k in keys if k.get("kid") == kid), None)
    if match is None:
        raise TokenError(
            f"token signed by unknown key {kid!r}",
            hint="fetch the current JWKS from /.well-known/jwks.json of the issuing service",
        )
    alg = match.get("alg") or header.get("alg")
    if alg not in ("ES256", "ES384", "ES512", "RS256", "EdDSA") or header.get("alg") != alg:
        raise TokenError(f"algorithm {header.get('alg')!r} is not allowed for key {kid}")
    try:
        key = jwt.PyJWK(dict(match)).key
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[alg],
            issuer=issuer,
            leeway=leeway,
            options={"require": ["exp", "iat", "iss", "sub", "jti"], "verify_exp": at is None},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("token expired", hint="attest again to obtain a fresh token") from None
    except jwt.InvalidIssuerError:
        raise TokenError(f"token issuer is not {issuer!r}") from None
    except jwt.PyJWTError as exc:
        raise TokenError(f"token rejected: {exc}") from None
    if at is not None and not (claims["iat"] - leeway <= at <= claims["exp"] + leeway):
        raise TokenError(f"token not valid at {at:.0f} (valid {claims['iat']}..{claims['exp']})")
    return claims
