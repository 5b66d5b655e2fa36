"""HTTP client of the service for r3e-tee-cli: finds the dev token, names the URL on failure."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from r3e_tee.errors import InvalidRequestError, R3ETeeError

DEFAULT_URL = "http://127.0.0.1:8080"
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def segment(value: str, what: str, *, listed_by: str) -> str:
    """``value`` as one URL path segment.

    A name typed by the user must never change which resource a request reaches: unquoted,
    ``destroy-enclave ../secrets/db`` would delete the secret ``db``.
    """
    if value in ("", ".", "..") or any(ch in value for ch in "/\\?#") or not value.isprintable():
        raise InvalidRequestError(
            f"{what} {value!r} is not a valid name: it cannot be empty, '.' or '..', or contain "
            "'/', '\\', '?', '#' or control characters",
            hint=f"use a {what} as `{listed_by}` shows it",
        )
    return quote(value, safe="")


class ApiError(R3ETeeError):
    """The service answered with an error; carries its status and typed body."""

    def __init__(self, status: int, body: dict[str, Any], url: str) -> None:
        self.status = status
        self.body = body
        message = str(body.get("message") or body.get("detail") or f"HTTP {status}")
        if body.get("problems"):
            message += ": " + "; ".join(f"{p['field']}: {p['problem']}" for p in body["problems"])
        super().__init__(f"{url}: {message}", hint=body.get("hint"))
        self.code = str(body.get("error", "http"))
        self.exit_code = 2 if status in (400, 404, 422) and self.code != "rejected" else 1


class ConnectionFailed(R3ETeeError):
    exit_code = 3
    code = "connection"


class NotTheService(ConnectionFailed):
    """Something answered, but not the service: as unusable as no answer."""

    code = "not_the_service"


def discover_local_token(server: str, env: dict[str, str] | None = None) -> str | None:
    """The admin token a local ``--dev`` service wrote, if the server is on this machine."""
    found = discover_local_token_file(server, env)
    return found[0] if found else None


def discover_local_token_file(server: str, env: dict[str, str] | None = None) -> tuple[str, Path] | None:
    """The local ``--dev`` admin token and the file it was read from (named when it is refused)."""
    env = dict(os.environ) if env is None else env
    parts = urlsplit(server)
    if parts.hostname not in _LOCAL_HOSTS:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    candidates: list[Path] = []
    state = Path(env.get("XDG_STATE_HOME") or Path(env.get("HOME", str(Path.home()))) / ".local" / "state")
    discovery = state / "r3e-tee" / f"dev-{port}.json"
    try:
        candidates.append(Path(json.loads(discovery.read_text())["admin_token_file"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if env.get("R3E_TEE_DATA_DIR"):
        candidates.append(Path(env["R3E_TEE_DATA_DIR"]) / "admin-token")
    candidates.append(Path(".r3e-tee") / "admin-token")
    for path in candidates:
        try:
            token = path.read_text().strip().splitlines()[0].strip()
        except (OSError, IndexError):
            continue
        if token:
            return token, path
    return None


def checked_token(token: str) -> str:
    """The token as an HTTP header can carry it; the error never shows the token itself.

    A token pasted with a newline or a typographic quote otherwise fails inside httpx, whose
    message repeats the whole ``Authorization`` header.
    """
    token = token.strip()
    if not token or not all("!" <= ch <= "~" for ch in token):
        raise InvalidRequestError(
            "the token is empty or contains spaces, control or non-ASCII characters (not shown)",
            hint="copy the token again into --token or R3E_TEE_TOKEN, without quotes or line breaks",
        )
    return token


def checked_server(server: str) -> str:
    """``--server`` as a base URL, refused up front with the fix instead of an httpx error."""
    problem = None
    try:
        parts = urlsplit(server.strip())
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        problem = str(exc)
    else:
        if parts.scheme not in ("http", "https"):
            problem = "it must start with http:// or https://"
        elif not parts.hostname:
            problem = "it names no host"
        elif parts.query or parts.fragment:
            problem = "it cannot carry a query or a fragment"
    if problem:
        raise InvalidRequestError(
            f"--server {server!r} is not a service URL: {problem}",
            hint="pass the service's base URL, e.g. --server http://127.0.0.1:8080 (or R3E_TEE_URL)",
        )
    return server.strip().rstrip("/")


class ServiceClient:
    def __init__(self, server: str, token: str | None, *, timeout: float = 30.0) -> None:
        self.server = checked_server(server)
        self.token_file: Path | None = None
        if token:
            self.token: str | None = checked_token(token)
        else:
            found = discover_local_token_file(self.server)
            self.token, self.token_file = found if found else (None, None)
        headers = {"User-Agent": "r3e-tee-cli"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._http = httpx.Client(
            base_url=self.server, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0)
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        url = f"{self.server}{path}"
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ConnectionFailed(
                f"cannot connect to {url}: {_reason(exc)}",
                hint="is the service running? start one with `make run`, or point --server / "
                "R3E_TEE_URL at it",
            ) from None
        except httpx.TimeoutException:
            raise ConnectionFailed(
                f"{url} did not answer in time", hint="check the service's health with /healthz"
            ) from None
        except httpx.HTTPError as exc:
            reason = _reason(exc)
            if self.token:
                reason = reason.replace(self.token, "<token>")
            raise ConnectionFailed(
                f"request to {url} failed: {reason}",
                hint="check that --server / R3E_TEE_URL is the R3E TEE Service's API (http://host:port)",
            ) from None
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {"message": resp.text[:200] or f"HTTP {resp.status_code}"}
            if not isinstance(body, dict):
                body = {"message": str(body)}
            if resp.status_code == 401 and not self.token:
                body.setdefault(
                    "hint",
                    "no token: pass --token or set R3E_TEE_TOKEN (a local --dev service's token is "
                    "found automatically)",
                )
            elif resp.status_code == 401 and self.token_file is not None:
                body.setdefault(
                    "hint",
                    f"the service refused the local dev token read from {self.token_file}: that "
                    "file may belong to another or an older service on this port; pass --token or "
                    "set R3E_TEE_TOKEN",
                )
            elif resp.status_code == 401:
                body.setdefault(
                    "hint",
                    "the service refused the token from --token / R3E_TEE_TOKEN: check it is this "
                    "service's, not mistyped, expired or revoked (a --dev service writes its admin "
                    "token to <data-dir>/admin-token)",
                )
            raise ApiError(resp.status_code, body, url)
        if resp.status_code == 204 or not resp.content:
            return None
        ctype = resp.headers.get("content-type", "")
        try:
            if "json" in ctype:
                return resp.json()
        except ValueError:
            pass
        raise NotTheService(
            f"{url} answered HTTP {resp.status_code} with {ctype or 'no content type'} that is not "
            "the service's JSON",
            hint="check that --server / R3E_TEE_URL is the R3E TEE Service's API (http://host:port), "
            "not a proxy, a web page or another program",
        )

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    def close(self) -> None:
        self._http.close()


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "Connection refused" in text or "[Errno 111]" in text:
        return "connection refused (nothing listens there)"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host name"
    return text or type(exc).__name__
