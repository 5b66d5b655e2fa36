"""Deployed functions in the store: immutable versions, latest wins, deletion keeps history."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from r3e_tee.errors import InvalidRequestError, NotFoundError
from r3e_tee.functions.model import FunctionConfig, check_code, enclave_payload, expected_measurement
from r3e_tee.store import Store


@dataclass(frozen=True)
class FunctionVersion:
    config: FunctionConfig
    version: int
    code: bytes
    code_sha256: str
    measurement: str | None
    created_at: float
    broker_key: str | None = None  # the installation's key broker, measured into the enclaves

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def payload(self) -> dict[str, Any]:
        return enclave_payload(self.config, self.version, self.code, self.broker_key)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "runtime": self.config.runtime,
            "handler": self.config.handler,
            "provider": self.config.provider,
            "measurement": self.measurement,
            "code_sha256": self.code_sha256,
            "code_bytes": len(self.code),
            "config": self.config.model_dump(exclude={"name"}),
            "created_at": self.created_at,
        }


def parse_config(data: dict[str, Any]) -> FunctionConfig:
    try:
        return FunctionConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "function"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise InvalidRequestError(f"{where}: {message}") from None


class FunctionRegistry:
    """Versions in the store. :meth:`get` asks the store every time; :meth:`resolve`, for the
    invocation path, remembers what a name (and version) resolved to for ``resolve_ttl``
    seconds. Versions are immutable, so only "which version is the latest" and "was it
    deleted" can change: a deploy or delete through this registry takes effect at once here,
    and one made by another replica within ``resolve_ttl``."""

    def __init__(self, store: Store, *, resolve_ttl: float = 1.0, broker_key: str | None = None) -> None:
        self.store = store
        self.broker_key = broker_key
        self.resolve_ttl = resolve_ttl
        self._cache: dict[tuple[str, int], FunctionVersion] = {}
        self._resolved: dict[tuple[str, int | None], tuple[float, FunctionVersion]] = {}
        self._generation = 0  # bumped by every local deploy/delete (they run in worker threads)

    def deploy(self, config: FunctionConfig, code: bytes) -> FunctionVersion:
        check_code(config, code)
        with self.store.transaction() as tx:
            latest = tx.fetchval("SELECT max(version) FROM functions WHERE name = ?", (config.name,))
            version = int(latest or 0) + 1
            measurement = expected_measurement(config, version, code, self.broker_key)
            now = time.time()
            tx.execute(
                "INSERT INTO functions (name, version, config, code, code_sha256, measurement, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    config.name,
                    version,
                    config.model_dump_json(),
                    code,
                    hashlib.sha256(code).hexdigest(),
                    measurement,
                    now,
                ),
            )
        self._forget(config.name)
        return FunctionVersion(
            config, version, code, hashlib.sha256(code).hexdigest(), measurement, now, self.broker_key
        )

    def _row(self, row: dict[str, Any]) -> FunctionVersion:
        key = (str(row["name"]), int(row["version"]))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        fv = FunctionVersion(
            FunctionConfig.model_validate_json(row["config"]),
            int(row["version"]),
            bytes(row["code"]),
            str(row["code_sha256"]),
            row["measurement"],
            float(row["created_at"]),
            self.broker_key,
        )
        self._cache[key] = fv  # versions are immutable
        return fv

    def get(self, name: str, version: int | None = None) -> FunctionVersion:
        if version is None:
            row = self.store.fetchone(
                "SELECT * FROM functions WHERE name = ? AND deleted_at IS NULL ORDER BY version DESC LIMIT 1",
                (name,),
            )
        else:
            row = self.store.fetchone(
                "SELECT * FROM functions WHERE name = ? AND version = ? AND deleted_at IS NULL",
                (name, version),
            )
        if row is None:
            raise NotFoundError(
                f"no function {name!r}" + (f" version {version}" if version else ""),
                hint="list functions with r3e-tee-cli list-functions",
            )
        return self._row(row)

    def resolve(self, name: str, version: int | None = None) -> FunctionVersion:
        """:meth:`get`, answered from memory for ``resolve_ttl`` seconds (the invocation path)."""
        key = (name, version)
        hit = self._resolved.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        generation = self._generation
        fv = self.get(name, version)
        if generation == self._generation:  # no deploy/delete raced with the query
            if len(self._resolved) > 10_000:
                self._resolved.clear()
            self._resolved[key] = (now + self.resolve_ttl, fv)
        return fv

    def _forget(self, name: str) -> None:
        self._generation += 1
        self._resolved = {k: v for k, v in self._resolved.items() if k[0] != name}

    def list(self) -> list[dict[str, Any]]:
        rows = self.store.fetchall(
            "SELECT name, max(version) AS version, count(*) AS versions FROM functions "
            "WHERE deleted_at IS NULL GROUP BY name ORDER BY name"
        )
        out = []
        for r in rows:
            fv = self.get(str(r["name"]), int(r["version"]))
            out.append({**fv.describe(), "versions": int(r["versions"])})
        return out

    def delete(self, name: str) -> int:
        n = self.store.execute(
            "UPDATE functions SET deleted_at = ? WHERE name = ? AND deleted_at IS NULL", (time.time(), name)
        )
        if n == 0:
            raise NotFoundError(f"no function {name!r}")
        self._cache = {k: v for k, v in self._cache.items() if k[0] != name}
        self._forget(name)
        return n


def config_from_request(data: dict[str, Any]) -> tuple[FunctionConfig, bytes]:
    """A deploy request: {"name", "runtime", ..., "code": base64}."""
    import base64
    import binascii

    body = dict(data)
    code_b64 = body.pop("code", None)
    if not isinstance(code_b64, str):
        raise InvalidRequestError("code: give the function's code (a file or a zip) as base64")
    try:
        code = base64.b64decode(code_b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("code: not valid base64") from None
    return parse_config(body), code


__all__ = ["FunctionRegistry", "FunctionVersion", "config_from_request", "json", "parse_config"]
