"""The ``tee-config.yaml`` model.

It accepts the deployment guide's ConfigMap unchanged (a ``providers`` list with ``attestation``
blocks) plus the product's own sections, each with safe defaults. Every bad input becomes a
:class:`ConfigError` naming the file, the line, the key path and the fix; secret values
(``apiKey``, PINs, tokens) never appear in an error or a log line.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from r3e_tee.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/r3e-tee/tee-config.yaml")
CONFIG_ENV = "R3E_TEE_CONFIG"
KNOWN_PROVIDERS = ("sgx", "nitro", "simulation")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?)?B?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}


def parse_duration(value: object) -> float:
    """Seconds from ``300``, ``"300s"``, ``"5m"``, ``"12h"``, ``"30d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 12h or 30d, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as 30s, 5m, 12h or 30d, got {value!r}")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


def port_number(value: str) -> int:
    """argparse type of the launchers' --port: 1-65535, refused before anything is set up."""
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a port number: use 1-65535 (from the flag or its environment variable)"
        )
    return port


def parse_size(value: object) -> int:
    """Bytes from ``134217728``, ``"128M"`` (SI, as the guide writes it) or ``"128Mi"``.

    The guide's ``--size 128M`` means the enclave size an operator thinks of as 128 MiB; enclave
    sizes are powers of two in practice, so ``M``/``G`` are read as binary units too.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 128M, 512Mi or 2G, got a boolean")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        unit = (m.group(2) or "").lower()
        multiplier = _SIZE_UNITS[unit if unit.endswith("i") or not unit else unit + "i"]
        size = int(m.group(1)) * multiplier
    else:
        raise ValueError(f"expected a size such as 128M, 512Mi or 2G, got {value!r}")
    if size <= 0:
        raise ValueError("a size must be greater than zero")
    return size


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    data_dir: Path = Path("/var/lib/r3e-tee")
    dev: bool = False
    # SHA-256 hex digests of admin tokens; plaintext tokens are never written in config
    admin_token_hashes: tuple[str, ...] = ()
    admin_token_file: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_grace_period: float = 20.0

    @field_validator("admin_token_hashes")
    @classmethod
    def _hex_digests(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for digest in v:
            if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                raise ValueError(
                    "each admin token hash must be 64 hex characters (sha256 of the token); "
                    'compute it with: printf %s "$TOKEN" | sha256sum'
                )
        return tuple(d.lower() for d in v)


class StoreConfig(_Model):
    # empty: SQLite file in the data directory
    url: str = ""
    pool_size: int = Field(10, ge=1, le=200)
    connect_timeout: float = Field(5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if v and not v.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError(
                "store.url must start with sqlite:/// or postgresql:// (or be empty for the "
                "embedded SQLite database in the data directory)"
            )
        return v


class FileKekConfig(_Model):
    path: Path | None = None  # default: <data_dir>/kek.key, generated only in --dev


class Pkcs11KekConfig(_Model):
    module: Path = Path("/usr/lib/softhsm/libsofthsm2.so")
    token_label: str = "r3e-tee"
    key_label: str = "r3e-tee-kek"
    pin: SecretStr | None = None
    pin_file: Path | None = None


class PreviousKekConfig(_Model):
    """During a KEK rotation: the KEK the store's keys are wrapped with now. At start the service
    re-wraps them under the new KEK (no plaintext written anywhere); remove this section after."""

    kek_provider: Literal["file", "pkcs11"] = "file"
    file: FileKekConfig = FileKekConfig()
    pkcs11: Pkcs11KekConfig = Pkcs11KekConfig()


class KeysConfig(_Model):
    kek_provider: Literal["file", "pkcs11"] = "file"
    file: FileKekConfig = FileKekConfig()
    pkcs11: Pkcs11KekConfig = Pkcs11KekConfig()
    previous_kek: PreviousKekConfig | None = None
    rotation_period: float = 30 * 86400.0
    retain_versions: int = Field(3, ge=1, le=1000)

    _dur = field_validator("rotation_period", mode="before")(parse_duration)


class CollateralConfig(_Model):
    pcs_url: str = "https://api.trustedservices.intel.com"
    pccs_url: str | None = None
    api_key: SecretStr | None = None
    offline_bundle: Path | None = None
    timeout: float = 5.0

    _dur = field_validator("timeout", mode="before")(parse_duration)


class AttestationConfig(_Model):
    # the "iss" of attestation tokens; relying parties check it
    issuer: str = "r3e-tee-service"
    policy_file: Path | None = None
    # UNSAFE outside development: accept evidence from the simulation provider
    allow_simulation: bool = False
    allow_debug: bool = False
    token_ttl: float = 300.0
    nonce_ttl: float = 60.0
    collateral: CollateralConfig = CollateralConfig()

    _dur = field_validator("token_ttl", "nonce_ttl", mode="before")(parse_duration)


class WorkersConfig(_Model):
    embedded: bool = True
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 30.0
    max_enclaves: int = Field(256, ge=1)

    _dur = field_validator("heartbeat_interval", "heartbeat_timeout", mode="before")(parse_duration)


class SimulationConfig(_Model):
    # total memory the simulation provider hands out to enclaves
    capacity: int = 8 * 1024**3
    cpu_seconds: int = Field(3600, ge=1)
    use_bubblewrap: bool = True
    use_seccomp: bool = True

    _size = field_validator("capacity", mode="before")(parse_size)


class ProviderAttestation(_Model):
    """The guide's per-provider attestation block (camelCase kept as the guide writes it)."""

    service: str | None = None
    api_key: SecretStr | None = Field(None, alias="apiKey")
    # a PEM file of the guide's Secret tee-attestation-keys (sgx-key.pem / nitro-key.pem)
    key_file: Path | None = Field(None, alias="keyFile")

    @field_validator("service")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(https?|vsock)://", v):
            raise ValueError("attestation.service must be an http(s):// or vsock:// URL")
        return v


class ProviderConfig(_Model):
    name: str
    enabled: bool = True
    attestation: ProviderAttestation = ProviderAttestation()
    # provider-specific knobs (paths of binaries and devices), all optional
    options: dict[str, str | int | float | bool] = {}

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in KNOWN_PROVIDERS:
            near = difflib.get_close_matches(v, KNOWN_PROVIDERS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"unknown provider {v!r}{hint}; known providers: {', '.join(KNOWN_PROVIDERS)}")
        return v


class TeeConfig(_Model):
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    keys: KeysConfig = KeysConfig()
    attestation: AttestationConfig = AttestationConfig()
    workers: WorkersConfig = WorkersConfig()
    simulation: SimulationConfig = SimulationConfig()
    providers: tuple[ProviderConfig, ...] = (ProviderConfig(name="simulation"),)

    @model_validator(mode="after")
    def _providers_unique(self) -> TeeConfig:
        names = [p.name for p in self.providers]
        if len(names) != len(set(names)):
            raise ValueError("each provider may be listed once")
        return self

    @property
    def enabled_providers(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.providers if p.enabled)

    def provider(self, name: str) -> ProviderConfig | None:
        return next((p for p in self.providers if p.name == name), None)

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.server.data_dir / 'r3e-tee.sqlite3'}"


# --- loading ------------------------------------------------------------------------------------

_VAR_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(text: str, env: Mapping[str, str], *, where: str) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; ``$$`` is a literal ``$``.

    ``where`` is the key path used in the error; the value itself is never echoed.
    """

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise KeyError(name)

    try:
        return _VAR_RE.sub(repl, text)
    except KeyError as exc:
        name = exc.args[0]
        raise ValueError(
            f"environment variable {name} is not set (referenced as ${{{name}}} by {where}); "
            f"set it, or write ${{{name}:-default}} to give a default"
        ) from None


@dataclass(frozen=True)
class LoadedConfig:
    config: TeeConfig
    source: str  # the path read, or "built-in defaults"


class _Located:
    """Maps key paths to line numbers of the YAML source, for errors."""

    def __init__(self) -> None:
        self.lines: dict[tuple[str | int, ...], int] = {}

    def line_of(self, path: tuple[str | int, ...]) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())


def _path_str(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _construct(
    node: yaml.Node,
    path: tuple[str | int, ...],
    loc: _Located,
    env: Mapping[str, str],
    file: str,
) -> Any:
    loc.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(
                    "mapping keys must be plain strings",
                    file=file,
                    line=key_node.start_mark.line + 1,
                    key_path=_path_str(path) or None,
                )
            key = str(key_node.value)
            if key in out:
                raise ConfigError(
                    f"key {key!r} appears twice",
                    file=file,
                    line=key_node.start_mark.line + 1,
                    key_path=_path_str((*path, key)),
                    hint="keep one of the two entries",
                )
            loc.lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, (*path, key), loc, env, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*path, i), loc, env, file) for i, item in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    value = node.value
    if isinstance(value, str) and "$" in value:
        try:
            value = substitute_env(value, env, where=_path_str(path) or "the document")
        except ValueError as exc:
            raise ConfigError(
                str(exc), file=file, line=node.start_mark.line + 1, key_path=_path_str(path)
            ) from None
        if node.style is None:  # plain scalar: let YAML type the substituted text (ports, bools)
            return _type_plain(value)
        return value
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(
            f"cannot read value: {exc.problem}",
            file=file,
            line=node.start_mark.line + 1,
            key_path=_path_str(path),
            hint="quote the value to make it a string",
        ) from None
    finally:
        loader.dispose()


def _type_plain(value: str) -> Any:
    if not value.strip():
        return None
    try:
        typed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return typed if isinstance(typed, str | int | float | bool) else value


def _model_fields_at(path: tuple[str | int, ...]) -> list[str]:
    """Valid keys of the model reached by ``path`` (for 'did you mean' suggestions)."""
    model: Any = TeeConfig
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            # alias lookup (apiKey, keyFile)
            field = next((f for f in getattr(model, "model_fields", {}).values() if f.alias == part), None)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    if not hasattr(model, "model_fields"):
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _type_name(data: Any, path: tuple[str | int, ...]) -> str | None:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    names = {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "a mapping",
        type(None): "nothing (null)",
    }
    return names.get(type(data))


def _explain(err: Any, file: str, loc: _Located, data: Any) -> ConfigError:
    path = tuple(p for p in err["loc"] if isinstance(p, str | int))
    etype = err["type"]
    key_path = _path_str(path)
    line = loc.line_of(path)
    if etype == "extra_forbidden":
        parent, key = path[:-1], str(path[-1])
        valid = _model_fields_at(parent)
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"did you mean {near[0]!r}?" if near else None
        if not hint and valid:
            hint = f"valid keys here: {', '.join(sorted(valid))}"
        return ConfigError(f"unknown key {key!r}", file=file, line=line, key_path=key_path, hint=hint)
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    expected = {
        "bool_parsing": "true or false",
        "bool_type": "true or false",
        "int_parsing": "an integer",
        "int_type": "an integer",
        "float_parsing": "a number",
        "string_type": "a string",
        "model_type": "a mapping of keys",
        "dict_type": "a mapping of keys",
        "tuple_type": "a list",
        "list_type": "a list",
        "missing": "this key to be present",
    }.get(etype)
    if expected:
        got = _type_name(data, path)
        msg = (
            f"wrong type: expected {expected}" + (f", got {got}" if got else "")
            if etype != "missing"
            else "required key is missing"
        )
    # pydantic's own text never includes the input here, so secret values cannot leak
    return ConfigError(msg, file=file, line=line, key_path=key_path or None)


def parse_config(text: str, *, file: str = "<string>", env: Mapping[str, str] | None = None) -> TeeConfig:
    """Parse and validate config text. Raises :class:`ConfigError` for the first problem."""
    env = os.environ if env is None else env
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(
            f"not valid YAML: {exc.problem}", file=file, line=line, hint="check indentation and quoting"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", file=file) from None
    loc = _Located()
    data = {} if node is None else _construct(node, (), loc, env, file)
    if not isinstance(data, dict):
        raise ConfigError(
            "the top level must be a mapping (server:, store:, providers:, ...)", file=file, line=1
        )
    _check_provider_entries(data, file, loc)
    try:
        return TeeConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        raise _explain(errors[0], file, loc, data) from None


def _check_provider_entries(data: dict[str, Any], file: str, loc: _Located) -> None:
    """A provider listed (and so enabled) twice is reported at the second entry's line."""
    providers = data.get("providers")
    if not isinstance(providers, list):
        return
    first_line: dict[str, int | None] = {}
    for i, entry in enumerate(providers):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        name = entry["name"]
        if name in first_line:
            raise ConfigError(
                f"provider {name!r} is listed twice (first at line {first_line[name]})",
                file=file,
                line=loc.line_of(("providers", i, "name")),
                key_path=f"providers[{i}].name",
                hint="keep one entry per provider and set enabled: true or false on it",
            )
        first_line[name] = loc.line_of(("providers", i, "name"))


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Load from ``path``, else ``$R3E_TEE_CONFIG``, else /etc/r3e-tee/tee-config.yaml, else defaults."""
    env = os.environ if env is None else env
    candidate: Path | None
    explicit = True
    # the fix names where the path came from: an argument or flag, or the environment
    if path is not None:
        candidate = Path(path)
        fix = f"check the path given as the argument or --config (or in {CONFIG_ENV})"
    elif env.get(CONFIG_ENV):
        candidate = Path(env[CONFIG_ENV])
        fix = f"set {CONFIG_ENV} to an existing tee-config.yaml, or unset it for the defaults"
    else:
        candidate, explicit = DEFAULT_CONFIG_PATH, False
        fix = f"make {DEFAULT_CONFIG_PATH} readable, or point {CONFIG_ENV} at another file"
    if candidate is not None:
        if not candidate.exists():
            if explicit:
                raise ConfigError("file does not exist", file=str(candidate), hint=fix)
            return LoadedConfig(TeeConfig(), "built-in defaults")
        if candidate.is_dir():
            raise ConfigError("is a directory, not a tee-config.yaml", file=str(candidate), hint=fix)
        try:
            text = candidate.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            hint = fix if isinstance(exc, OSError) else "save the file as UTF-8 YAML"
            raise ConfigError(f"cannot read: {reason}", file=str(candidate), hint=hint) from None
        return LoadedConfig(parse_config(text, file=str(candidate), env=env), str(candidate))
    return LoadedConfig(TeeConfig(), "built-in defaults")


def check_key_files(config: TeeConfig) -> list[ConfigError]:
    """Check the configured attestation key files (the guide's Secret ``tee-attestation-keys``).

    Returns problems instead of raising so ``config validate`` and ``doctor`` can list them all.
    The key material is parsed but never printed.
    """
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    problems: list[ConfigError] = []
    for i, provider in enumerate(config.providers):
        path = provider.attestation.key_file
        if path is None or not provider.enabled:
            continue
        key_path = f"providers[{i}].attestation.keyFile"
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            problems.append(
                ConfigError(
                    f"cannot read key file {path}: {exc.strerror}",
                    key_path=key_path,
                    hint=f"mount the Secret tee-attestation-keys so that {path} exists and is readable",
                )
            )
            continue
        if b"-----BEGIN" not in data:
            problems.append(
                ConfigError(
                    f"key file {path} is not PEM (no -----BEGIN line)",
                    key_path=key_path,
                    hint=(
                        f"store a PEM private key as {Path(path).name}, e.g. the output of "
                        "openssl ecparam -name prime256v1 -genkey -noout"
                    ),
                )
            )
            continue
        try:
            load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            kind = "encrypted" if isinstance(exc, TypeError) else "unparseable"
            problems.append(
                ConfigError(
                    f"key file {path} holds an {kind} PEM private key",
                    key_path=key_path,
                    hint="provide an unencrypted PKCS#8 or SEC1 EC private key",
                )
            )
    return problems
