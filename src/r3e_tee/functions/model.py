"""The function model: what a deployed version is, and its measurement.

A version is immutable. Its enclave payload (runtime, handler, code digest, limits, secret
names) is what the enclave is measured with, so the measurement shown at deploy time is the
one its enclaves attest to, and receipts name it.
"""

from __future__ import annotations

import ast
import hashlib
import io
import re
import stat
import zipfile
import zlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from r3e_tee.config import parse_duration, parse_size
from r3e_tee.errors import InvalidRequestError
from r3e_tee.keys.broker import MAX_NAMES
from r3e_tee.keys.broker import NAME_RE as SECRET_NAME_RE
from r3e_tee.providers.base import MAX_ENCLAVE_BYTES

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_CODE_BYTES = 10 * 1024 * 1024
#: what a function zip may unpack to (the enclave unpacks it into its own memory) and hold
MAX_UNZIPPED_BYTES = 64 * 1024 * 1024
MAX_ZIP_ENTRIES = 10_000


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
    secrets: list[str] = Field([], max_length=MAX_NAMES)
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
        size = parse_size(v)
        if size > MAX_ENCLAVE_BYTES:
            raise ValueError(f"{size} bytes is more than any enclave ({MAX_ENCLAVE_BYTES} bytes at most)")
        return size

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: list[str]) -> list[str]:
        # names no secret can have would fail every enclave launch, at launch
        for name in v:
            if not SECRET_NAME_RE.match(name):
                raise ValueError(
                    f"{name[:140]!r} is not a secret name (1-128 letters, digits, '.', '_' and '-', "
                    "starting with a letter or digit)"
                )
        return v

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
        check_zip(code, config.handler)
        return
    if config.runtime == "python":
        try:
            tree = ast.parse(code, f"<{config.name}>")
            compile(tree, f"<{config.name}>", "exec")  # what parsing alone lets through
        except SyntaxError as exc:
            raise InvalidRequestError(
                f"the Python code does not compile: line {exc.lineno}: {exc.msg}"
            ) from None
        name = config.handler.rpartition(".")[2]
        if not _binds_at_module_level(tree, name):
            raise InvalidRequestError(
                f"the Python code defines no {name!r} at module level: every invocation would fail",
                hint=f"define def {name}(event, ctx): ... in the file, or deploy with --handler NAME",
            )
    else:
        try:
            code.decode()
        except UnicodeDecodeError:
            raise InvalidRequestError("JavaScript code must be UTF-8 text") from None


def _binds_at_module_level(tree: ast.Module, name: str) -> bool:
    """Whether module-level code (outside function and class bodies) can bind ``name``: a def,
    a class, an assignment, an import or a star import. Parsed, never run: the code is the
    user's and this is the service, not an enclave."""
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == name:
                return True
            continue  # their bodies bind their own names
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*" or (alias.asname or alias.name.partition(".")[0]) == name:
                    return True
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id == name:
            return True
        pending.extend(ast.iter_child_nodes(node))
    return False


def _zip_problem(problem: str, hint: str = "rebuild the zip from the function's directory") -> Exception:
    return InvalidRequestError(f"the function zip {problem}", hint=hint)


def check_zip(code: bytes, handler: str) -> None:
    """Refuse, at deploy, a zip every enclave would fail to unpack or import: members that
    escape the code directory (``..``, absolute paths), symbolic links, a name given twice, too
    many members, more than MAX_UNZIPPED_BYTES unpacked (counted by decompressing, so a lying
    header cannot hide a bomb), corrupt or encrypted members, and no file for the handler's
    module (``module.fn``: module.py; ``fn`` alone: main.py), which the enclave would otherwise
    look up on its own path (the runtime's standard library included)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(code))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise _zip_problem(f"does not open: {exc}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            raise _zip_problem(
                f"has {len(infos)} members; the limit is {MAX_ZIP_ENTRIES}",
                hint="leave out what the function does not import (tests, caches, docs)",
            )
        names: set[str] = set()
        for info in infos:
            name = info.filename
            parts = name.replace("\\", "/").split("/")
            if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                raise _zip_problem(f"member {name!r} would be written outside the code directory")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise _zip_problem(
                    f"member {name!r} is a symbolic link", hint="put the file itself in the zip"
                )
            if name in names:
                raise _zip_problem(f"holds {name!r} twice")
            names.add(name)
        unpacked = 0
        for info in infos:
            if info.is_dir():
                continue
            try:
                with archive.open(info) as member:
                    while chunk := member.read(1024 * 1024):
                        unpacked += len(chunk)
                        if unpacked > MAX_UNZIPPED_BYTES:
                            raise _zip_problem(
                                f"unpacks to more than {MAX_UNZIPPED_BYTES} bytes",
                                hint="leave out large data; functions read it from storage",
                            )
            except (
                zipfile.BadZipFile,
                NotImplementedError,
                RuntimeError,
                ValueError,
                OSError,
                EOFError,
                zlib.error,
            ) as exc:
                raise _zip_problem(f"member {info.filename!r} does not unpack: {exc}") from None
    module = (handler.rpartition(".")[0] or "main").replace(".", "/")
    if not any(
        n in names
        for n in (f"{module}.py", f"{module}.pyc", f"{module}/__init__.py", f"{module}/__init__.pyc")
    ) and not any(n.startswith(f"{module}.") and n.endswith(".so") for n in names):
        raise _zip_problem(
            f"has no {module}.py (or {module}/__init__.py) for handler {handler!r}",
            hint="name the handler module.function of a module in the zip (a bare function: main.py)",
        )


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
