"""Bearer-token authentication and scopes.

Tokens are random strings shown once; only their SHA-256 is kept (config, token file, store).
Comparisons run in constant time over every candidate, so response timing says nothing about
how close a guess was.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from r3e_tee.errors import AuthenticationError, ConfigError, PermissionDeniedError
from r3e_tee.fsio import create_exclusive
from r3e_tee.store import Store

TOKEN_PREFIX = "r3e_"


class Scope(StrEnum):
    ADMIN = "admin"  # everything
    INVOKE = "invoke"  # invoke functions, read their results
    READ = "read"  # read-only views
    ENCLAVE = "enclave"  # an enclave runtime talking to its service


_IMPLIES: dict[Scope, set[Scope]] = {
    Scope.ADMIN: set(Scope),
    Scope.INVOKE: {Scope.INVOKE, Scope.READ},
    Scope.READ: {Scope.READ},
    Scope.ENCLAVE: {Scope.ENCLAVE},
}


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    scope: Scope
    label: str
    token_hash: str

    def allows(self, needed: Scope) -> bool:
        return needed in _IMPLIES[self.scope]


def read_token_file(path: Path) -> list[str]:
    """Tokens, one per line ('#' comments allowed). The file should be mode 0600."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(
            f"cannot read admin token file {path}: {exc.strerror}",
            key_path="server.admin_token_file",
            hint="create it (one token per line, mode 0600) or remove server.admin_token_file",
        ) from None
    tokens = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not tokens:
        raise ConfigError(
            f"admin token file {path} holds no token",
            key_path="server.admin_token_file",
            hint="write one token per line",
        )
    return tokens


def ensure_dev_admin_token(data_dir: Path) -> tuple[Path, bool]:
    """Create ``<data-dir>/admin-token`` (0600) on first start in development mode.

    Returns the path and whether it was created now. Never called in production. The file
    appears whole or not at all (a crash mid-write must not leave an empty token file that
    stops the next start), and two processes starting at once agree on one token.
    """
    path = data_dir / "admin-token"
    if path.exists():
        return path, False
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = create_exclusive(path, (new_token() + "\n").encode())
    except OSError as exc:
        raise ConfigError(
            f"cannot create the development admin token file {path}: {exc.strerror}",
            key_path="server.data_dir",
            hint="make the data directory writable by the service user (--data-dir)",
        ) from None
    return path, created


class TokenAuthority:
    """Knows every valid token hash: static (config/file) and issued (store)."""

    def __init__(self, store: Store, static_hashes: list[str], *, cache_ttl: float = 5.0) -> None:
        self._store = store
        self._static = [h.lower() for h in static_hashes]
        # one immutable principal per static token, built once (this runs on every request)
        self._static_principals = {h: Principal(Scope.ADMIN, "static admin token", h) for h in self._static}
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()
        self._ttl = cache_ttl

    def issue(self, scope: Scope, label: str) -> str:
        token = new_token()
        self._store.execute(
            "INSERT INTO admin_tokens (token_hash, scope, label, created_at) VALUES (?, ?, ?, ?)",
            (token_hash(token), scope.value, label, time.time()),
        )
        return token

    def revoke(self, digest: str) -> bool:
        with self._lock:
            self._cache.pop(digest, None)
        return self._store.execute("DELETE FROM admin_tokens WHERE token_hash = ?", (digest,)) > 0

    def is_live(self, digest: str) -> bool:
        """Whether the token with this SHA-256 still authenticates (static, or issued and not
        revoked)."""
        live = False
        for known in self._static:
            if hmac.compare_digest(known, digest):
                live = True
        return live or self._lookup(digest) is not None

    def authenticate(self, authorization: str | None) -> Principal:
        principal, digest = self._static_check(authorization)
        if principal is None:
            principal = self._lookup(digest)
            if principal is None:
                raise AuthenticationError("invalid or revoked token")
        return principal

    def authenticate_cached(self, authorization: str | None) -> Principal | None:
        """:meth:`authenticate` without the store: the principal, an error, or None when only
        the store can tell (then call :meth:`authenticate` off the event loop)."""
        principal, digest = self._static_check(authorization)
        if principal is not None:
            return principal
        with self._lock:
            hit = self._cache.get(digest)
        if hit is None or hit[0] <= time.monotonic():
            return None
        if hit[1] is None:
            raise AuthenticationError("invalid or revoked token")
        return hit[1]

    def _static_check(self, authorization: str | None) -> tuple[Principal | None, str]:
        """The static admin principal, or None and the token's digest (malformed: raises)."""
        if not authorization:
            raise AuthenticationError(
                "missing bearer token", hint="send 'Authorization: Bearer <token>' (r3e-tee-cli --token)"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("the Authorization header must be 'Bearer <token>'")
        digest = token_hash(token.strip())
        match = None
        for known in self._static:  # every one compared, in constant time: no early exit
            if hmac.compare_digest(known, digest):
                match = known
        if match is not None:
            return self._static_principals[match], digest
        return None, digest

    def _lookup(self, digest: str) -> Principal | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit and hit[0] > now:
            return hit[1]
        row = self._store.fetchone(
            "SELECT token_hash, scope, label FROM admin_tokens WHERE token_hash = ?", (digest,)
        )
        principal = None
        if row is not None and hmac.compare_digest(str(row["token_hash"]), digest):
            principal = Principal(Scope(row["scope"]), str(row["label"]), digest)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now + self._ttl, principal)
        return principal

    @staticmethod
    def require(principal: Principal, needed: Scope) -> None:
        if not principal.allows(needed):
            raise PermissionDeniedError(
                f"token scope {principal.scope.value!r} does not allow this ({needed.value!r} needed)",
                hint="use a token with the needed scope (issue one with POST /v1/tokens as admin)",
            )
