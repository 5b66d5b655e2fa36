"""The function model: what a deployed version is, and its measurement.

A version is immutable. Its enclave payload (runtime, handler, code digest, limits, secret
names) is what the enclave is measured with, so the measurement shown at deploy time is the
one its enclaves attest to, and receipts name it.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from r3e_tee.config import parse_duration, parse_size
from r3e_tee.errors import InvalidRequestError

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_CODE_BYTES = 10 * 1024 * 1024


class FunctionConfig(BaseModel):
    """Deploy-time settings; every field has a safe default."""

    model_config = ConfigDict(extra="forbid")

    name: str
    runtime: Literal["python", "javascript"]
    handler: str = "handler"
    provider: str = "simulation"
    evidence_format: str | None = None
    enclave_size: int = 128 * 1024 * 1024
    memory: int = 64 * 1024 * 1024  # per sandbox process
    timeout: float = 10.0
    min_enclaves: int = Field(0, ge=0, le=100)
    max_enclaves: int = Field(4, ge=1, le=100)
    concurrency: int = Field(2, ge=1, le=64)  # sandboxes per enclave
    idempotent: bool = False
    cooldown: float = 60.0  # idle seconds before an enclave above min_enclaves is retired
    secrets: list[str] = []
    release_policy: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(
                "names are 1-63 lower-case letters, digits and '-', starting and ending alphanumeric"
            )
        return v

    @field_validator("handler")
    @classmethod
    def _handler(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", v):
            raise ValueError("handler must be an identifier such as handler or module.handler")
        return v

    @field_validator("enclave_size", "memory", mode="before")
    @classmethod
    def _size(cls, v: object) -> int:
        return parse_size(v)

    @field_validator("cooldown", mode="before")
    @classmethod
    def _cooldown(cls, v: object) -> float:
        return parse_duration(v)

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: object) -> float:
        seconds = parse_duration(v)
        if seconds > 900:
            raise ValueError("timeout must be at most 15 minutes")
        return seconds


def check_code(config: FunctionConfig, code: bytes) -> None:
    """Refuse code that cannot run, before any enclave is started for it."""
    if not code:
        raise InvalidRequestError("the function code is empty")
    if len(code) > MAX_CODE_BYTES:
        raise InvalidRequestError(f"the function code is {len(code)} bytes; the limit is {MAX_CODE_BYTES}")
    if config.min_enclaves > config.max_enclaves:
        raise InvalidRequestError("min_enclaves is larger than max_enclaves")
    if config.memory * config.concurrency > config.enclave_size:
        raise InvalidRequestError(
            f"{config.concurrency} sandboxes of {config.memory // 2**20} MiB do not fit an enclave of "
            f"{config.enclave_size // 2**20} MiB",
            hint="raise enclave_size or lower memory/concurrency",
        )
    if zipfile.is_zipfile(io.BytesIO(code)):
        if config.runtime != "python":
            raise InvalidRequestError("zip archives are for Python functions; give JavaScript as one file")
        return
    if config.runtime == "python":
        try:
            compile(code, f"<{config.name}>", "exec")
        except SyntaxError as exc:
            raise InvalidRequestError(
                f"the Python code does not compile: line {exc.lineno}: {exc.msg}"
            ) from None
    else:
        try:
            code.decode()
        except UnicodeDecodeError:
            raise InvalidRequestError("JavaScript code must be UTF-8 text") from None


def enclave_payload(
    config: FunctionConfig, version: int, code: bytes, broker_key: str | None = None
) -> dict[str, Any]:
    """The measured configuration of the function's enclaves, with the key broker they accept
    secrets from (so the measurement also says which broker)."""
    payload: dict[str, Any] = {
        "function": config.name,
        "version": version,
        "runtime": config.runtime,
        "handler": config.handler,
        "code_sha256": hashlib.sha256(code).hexdigest(),
        "memory": config.memory,
        "concurrency": config.concurrency,
        "timeout": config.timeout,
        "secrets": sorted(config.secrets),
    }
    if broker_key is not None:
        payload["broker_key"] = broker_key
    return payload


def expected_measurement(
    config: FunctionConfig, version: int, code: bytes, broker_key: str | None = None
) -> str | None:
    """The measurement this version's enclaves will attest to (simulation; hardware providers
    report theirs from the signed enclave image)."""
    if config.provider != "simulation":
        return None
    from r3e_tee.providers.base import EnclaveSpec
    from r3e_tee.providers.simulation import measurement_for, runtime_code_digest

    spec = EnclaveSpec(
        id="-",
        size_bytes=config.enclave_size,
        evidence_format=config.evidence_format or "sgx-dcap",
        payload=enclave_payload(config, version, code, broker_key),
    )
    mrenclave, pcr0 = measurement_for(runtime_code_digest(), spec)
    return (pcr0 if spec.evidence_format == "nitro" else mrenclave).hex()
