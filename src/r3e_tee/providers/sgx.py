"""The SGX provider: each enclave is the R3E enclave runtime under Gramine-SGX.

Per (enclave size, threads, debug) the provider renders its manifest template with
``gramine-manifest``, signs it with ``gramine-sgx-sign --key <enclave signing key>`` and reads the
MRENCLAVE from the SIGSTRUCT that signing wrote (``r3e-enclave.sig``, parsed and its RSA signature
checked here). Builds are cached under ``<data_dir>/sgx/builds``: enclaves of one configuration
share one MRENCLAVE, the reference value of the attestation policy.

An enclave is ``gramine-sgx r3e-enclave`` in its own session. Its runtime connects back to a
per-enclave listening socket on loopback (``R3E_ENCLAVE_CONNECT``) and first sends a random
hello (``R3E_ENCLAVE_HELLO``) so no other local process can pose as it; both reach the enclave
through the manifest's environment passthrough, so they do not change the measurement. Evidence is
made inside, through Gramine's ``/dev/attestation`` (runtime/devices.py). EPC is accounted per
enclave at its enclave size (Gramine adds every page of it at start). The provider watches each
process and reports an unexpected exit through the handle.

Provider options (``providers[].options`` of tee-config.yaml, all optional):

``signing_key``
    PEM of the RSA-3072 key (public exponent 3) that signs enclaves, i.e. the MRSIGNER. Required
    unless ``server.dev``, where a development key is generated into ``<data_dir>/sgx/``.
``epc_bytes``
    EPC the provider may hand out (``64G``, bytes...). Default: the sum of
    ``/sys/devices/system/node/node*/x86/sgx_total_bytes`` (Linux >= 6.0).
``gramine_sgx``, ``gramine_manifest``, ``gramine_sgx_sign``
    The Gramine tools (names on PATH or paths). Default: their names.
``template``
    The manifest template. Default: the one shipped in ``r3e_tee/providers/templates``.
``python``, ``python_libdir``, ``site_packages``, ``arch_libdir``
    The interpreter run inside the enclave and the directories it needs, all measured:
    ``python_libdir`` holds libpython and the standard library (``/usr/local/lib`` in the python
    images), ``site_packages`` the installed r3e-tee and its dependencies (a regular install, not
    an editable one). Defaults: the worker's own interpreter and its paths, ``/lib/x86_64-linux-gnu``.
``threads`` (16), ``min_enclave_size`` (``512M``), ``log_level`` (``error``), ``isvprodid`` (1),
``isvsvn`` (1)
    Manifest values. Enclave sizes are powers of two; a smaller request is raised to the minimum
    Python under Gramine needs, and accounted as such.
``start_timeout`` (``120s``)
    Host-side deadline for a launched enclave's runtime to connect and answer.
``build_timeout`` (``10m``)
    Deadline of gramine-manifest and gramine-sgx-sign (signing hashes every trusted file).
``listen_host`` (``127.0.0.1``)
    Where the worker listens for its enclaves.
``host_root`` (``/``)
    Root of the filesystem the hardware probe reads (tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import struct
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from r3e_tee.config import parse_duration, parse_size
from r3e_tee.errors import CapacityError, ConfigError, EnclaveError, ProviderError, ProviderUnavailableError
from r3e_tee.fsio import create_exclusive, secret_file_exposure
from r3e_tee.providers.base import EnclaveHandle, EnclaveSpec, Provider, check_spec
from r3e_tee.providers.hardware import ProviderProbe, probe_sgx
from r3e_tee.providers.hardware import epc_bytes as hardware_epc_bytes
from r3e_tee.runtime.channel import Channel
from r3e_tee.runtime.enclave import CONNECT_ENV, HELLO_ENV

if TYPE_CHECKING:
    from r3e_tee.config import TeeConfig

log = logging.getLogger("r3e_tee.providers.sgx")

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

MANIFEST_NAME = "r3e-enclave"
_BROKER_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # 32 bytes, base64url without padding
_MANIFEST_PATH_RE = re.compile(r"^(/[A-Za-z0-9._+@-]+)+$")
LOG_LEVELS = ("none", "error", "warning", "debug", "trace", "all")
DEFAULT_TEMPLATE = Path(__file__).parent / "templates" / f"{MANIFEST_NAME}.manifest.template"
HELLO_LEN = 32
MAX_PENDING_HELLOS = 64  # connections to an enclave's port whose hello is awaited at once
_MISSING = "install Gramine in the worker image, or set providers[sgx].options.{option} to the tool"
OptionValue = str | int | float | bool


# --- provider options ---------------------------------------------------------------------------


class ProviderOptions:
    """Typed access to ``providers[].options``; every problem is a ConfigError naming the key."""

    def __init__(self, provider: str, options: Mapping[str, OptionValue], known: Iterable[str]) -> None:
        self.provider = provider
        self.options = dict(options)
        known = tuple(known)
        for name in self.options:
            if name not in known:
                raise ConfigError(
                    f"unknown option {name!r}",
                    key_path=self._key(name),
                    hint=f"options of the {provider} provider: {', '.join(sorted(known))}",
                )

    def _key(self, name: str) -> str:
        return f"providers[{self.provider}].options.{name}"

    def _fail(self, name: str, expected: str) -> ConfigError:
        return ConfigError(
            f"expected {expected}, got {self.options[name]!r}", key_path=self._key(name), hint=None
        )

    def string(self, name: str, default: str) -> str:
        value = self.options.get(name, default)
        if not isinstance(value, str) or not value:
            raise self._fail(name, "a non-empty string")
        return value

    def path(self, name: str, default: Path | None) -> Path | None:
        if name not in self.options:
            return default
        return Path(self.string(name, ""))

    def integer(self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.options.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            raise self._fail(
                name, f"an integer from {minimum} to {maximum}" if maximum else f"an integer >= {minimum}"
            )
        return value

    def choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        value = self.string(name, default)
        allowed = tuple(choices)
        if value not in allowed:
            raise self._fail(name, "one of " + ", ".join(allowed))
        return value

    def size(self, name: str, default: int | None) -> int | None:
        if name not in self.options:
            return default
        try:
            return parse_size(self.options[name])
        except ValueError:
            raise self._fail(name, "a size such as 512M, 64G or a number of bytes") from None

    def seconds(self, name: str, default: float) -> float:
        if name not in self.options:
            return default
        try:
            return parse_duration(self.options[name])
        except ValueError:
            raise self._fail(name, "a duration such as 30s or 2m") from None

    def boolean(self, name: str, default: bool) -> bool:
        value = self.options.get(name, default)
        if not isinstance(value, bool):
            raise self._fail(name, "true or false")
        return value


# --- SIGSTRUCT ----------------------------------------------------------------------------------

SIGSTRUCT_SIZE = 1808
SIGSTRUCT_HEADER = bytes.fromhex("06000000e10000000000010000000000")
SIGSTRUCT_HEADER2 = bytes.fromhex("01010000600000006000000001000000")
# offsets of the Intel SDM's SIGSTRUCT (Vol. 3D, 35.14)
_OFF_VENDOR = 16
_OFF_DATE = 20
_OFF_MODULUS = 128
_OFF_EXPONENT = 512
_OFF_SIGNATURE = 516
_OFF_MISCSELECT = 900
_OFF_ATTRIBUTES = 928
_OFF_ENCLAVE_HASH = 960
_OFF_ISVPRODID = 1024
_OFF_ISVSVN = 1026
_OFF_Q1 = 1040
_OFF_Q2 = 1424
ATTRIBUTE_DEBUG = 0x2


@dataclass(frozen=True)
class Sigstruct:
    """The fields of a SIGSTRUCT that identify an enclave."""

    mrenclave: bytes
    mrsigner: bytes
    modulus: int
    exponent: int
    attributes: bytes
    isv_prod_id: int
    isv_svn: int
    vendor: int
    date: int

    @property
    def debug(self) -> bool:
        return bool(struct.unpack_from("<Q", self.attributes)[0] & ATTRIBUTE_DEBUG)


def signing_data(sigstruct: bytes) -> bytes:
    """What the enclave signing key signs: header..reserved (128 bytes) and miscselect..isvsvn."""
    return sigstruct[:128] + sigstruct[_OFF_MISCSELECT : _OFF_MISCSELECT + 128]


def mrsigner_of(public_key: rsa.RSAPublicKey) -> bytes:
    """MRSIGNER: SHA-256 of the signing key's modulus, little-endian as SGX stores it."""
    return hashlib.sha256(public_key.public_numbers().n.to_bytes(384, "little")).digest()


def parse_sigstruct(data: bytes, *, verify_signature: bool = True) -> Sigstruct:
    """Parse a SIGSTRUCT (Gramine's ``.sig`` file) and check its headers and RSA signature."""
    what = "SIGSTRUCT"
    if len(data) != SIGSTRUCT_SIZE:
        raise ProviderError(f"{what} is {len(data)} bytes, expected {SIGSTRUCT_SIZE}")
    if data[:16] != SIGSTRUCT_HEADER or data[24:40] != SIGSTRUCT_HEADER2:
        raise ProviderError(f"{what} headers are not those of a SIGSTRUCT")
    modulus = int.from_bytes(data[_OFF_MODULUS:_OFF_EXPONENT], "little")
    (exponent,) = struct.unpack_from("<I", data, _OFF_EXPONENT)
    if exponent != 3:
        raise ProviderError(f"{what} exponent is {exponent}; SGX requires 3")
    if verify_signature:
        signature = int.from_bytes(data[_OFF_SIGNATURE:_OFF_MISCSELECT], "little")
        try:
            rsa.RSAPublicNumbers(exponent, modulus).public_key().verify(
                signature.to_bytes(384, "big"), signing_data(data), padding.PKCS1v15(), hashes.SHA256()
            )
        except (InvalidSignature, ValueError):
            raise ProviderError(f"{what} signature does not verify under its own modulus") from None
    return Sigstruct(
        mrenclave=data[_OFF_ENCLAVE_HASH : _OFF_ENCLAVE_HASH + 32],
        mrsigner=hashlib.sha256(data[_OFF_MODULUS:_OFF_EXPONENT]).digest(),
        modulus=modulus,
        exponent=exponent,
        attributes=data[_OFF_ATTRIBUTES : _OFF_ATTRIBUTES + 16],
        isv_prod_id=struct.unpack_from("<H", data, _OFF_ISVPRODID)[0],
        isv_svn=struct.unpack_from("<H", data, _OFF_ISVSVN)[0],
        vendor=struct.unpack_from("<I", data, _OFF_VENDOR)[0],
        date=struct.unpack_from("<I", data, _OFF_DATE)[0],
    )


# --- enclave signing key ------------------------------------------------------------------------


def load_signing_key(path: Path) -> rsa.RSAPrivateKey:
    """The enclave signing key: RSA-3072 with public exponent 3, as SGX requires, in a file
    only this service can read (it is the MRSIGNER every policy and sealed secret trusts)."""
    hint = "generate one with: openssl genrsa -3 -out enclave-signing-key.pem 3072"
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ProviderError(
            f"cannot read the enclave signing key {path}: {exc.strerror}", hint=hint
        ) from None
    except (ValueError, TypeError) as exc:
        raise ProviderError(
            f"the enclave signing key {path} is not an unencrypted PEM private key ({exc})", hint=hint
        ) from None
    if (
        not isinstance(key, rsa.RSAPrivateKey)
        or key.key_size != 3072
        or key.public_key().public_numbers().e != 3
    ):
        raise ProviderError(
            f"the enclave signing key {path} must be RSA-3072 with public exponent 3", hint=hint
        )
    try:
        exposed = secret_file_exposure(path.stat())
    except OSError as exc:
        raise ProviderError(f"cannot stat the enclave signing key {path}: {exc.strerror}") from None
    if exposed is not None:
        # whoever reads it can sign enclaves with this MRSIGNER (and unseal what they sealed)
        raise ProviderError(
            f"the enclave signing key {path} is not private: {exposed}",
            hint=f"chmod 600 {path}, owned by the worker's user",
        )
    return key


def generate_dev_signing_key(path: Path) -> rsa.RSAPrivateKey:
    """A development enclave signing key (mode 0600). Never for production: MRSIGNER is yours."""
    key = rsa.generate_private_key(public_exponent=3, key_size=3072)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # whole, durable, and never replacing a key another process made first: enclaves signed
    # with a key that is then lost or replaced change MRSIGNER, and lose what they sealed
    if not create_exclusive(path, pem):
        return load_signing_key(path)
    return key


# --- manifest values ----------------------------------------------------------------------------


def manifest_path(option: str, value: str) -> str:
    """A host path as it may go into the manifest, or a ConfigError naming the option.

    These paths are pasted into TOML strings, ``fs.mounts`` and ``sgx.trusted_files``: a quote,
    backslash, newline or ``{{`` could end the string and add keys (``sgx.debug = true``, an
    ``sgx.allowed_files`` entry), ``..`` or ``/`` would mount and trust host directories other than
    the one meant. Only absolute, normalised paths of plain characters are rendered.
    """
    parts = value.split("/")[1:]
    if not _MANIFEST_PATH_RE.match(value) or any(p in (".", "..") for p in parts):
        raise ConfigError(
            f"{value!r} cannot be rendered into the enclave manifest: give an absolute, normalised "
            "path of letters, digits and . _ + @ - (not the root directory, no '..', quotes, "
            "spaces or trailing slash)",
            key_path=f"providers[sgx].options.{option}",
            hint="point the option at the real directory (resolve symlinks and relative parts)",
        )
    return value


def _manifest_int(option: str, value: int, minimum: int, maximum: int) -> int:
    """An integer rendered bare into the manifest (so it must be an int, in range)."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(
            f"expected an integer from {minimum} to {maximum}, got {value!r}",
            key_path=f"providers[sgx].options.{option}",
        )
    return value


# --- sizes --------------------------------------------------------------------------------------


def enclave_size_for(requested: int, minimum: int = 0) -> int:
    """Gramine's ``sgx.enclave_size``: the power of two >= max(requested, minimum)."""
    size = max(requested, minimum, 1)
    return 1 << (size - 1).bit_length()


def gramine_size(n: int) -> str:
    for unit, suffix in ((GIB, "G"), (MIB, "M"), (KIB, "K")):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"


# --- processes ----------------------------------------------------------------------------------


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _tail(text: str | bytes, lines: int = 12) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) if kept else "(no output)"


async def stop_process_group(process: asyncio.subprocess.Process, *, grace: float) -> None:
    """Wait ``grace`` s for the process to exit, then SIGTERM, then SIGKILL its session."""
    pgid = process.pid
    for sig, wait in ((None, grace), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        if sig is not None:
            _kill_group(pgid, sig)
        try:
            await asyncio.wait_for(process.wait(), wait)
            break
        except TimeoutError:
            continue
    _kill_group(pgid, signal.SIGKILL)  # whatever the enclave left behind in its session


async def run_tool(
    argv: list[str],
    *,
    what: str,
    timeout: float,
    env: Mapping[str, str],
    cwd: Path | None = None,
    missing_hint: str,
) -> str:
    """Run a host tool to completion; its output is returned, a failure says what and why."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        raise ProviderUnavailableError(
            f"{what}: cannot run {argv[0]} ({exc.strerror})", hint=missing_hint
        ) from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        _kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise ProviderError(
            f"{what} did not finish within {timeout:g} s", hint="see the tool's log; raise the timeout option"
        ) from None
    if proc.returncode != 0:
        raise ProviderError(
            f"{what} failed with exit status {proc.returncode}: {_tail(err or out)}",
            hint=f"run the same command by hand to see all of it: {' '.join(argv)}",
        )
    return out.decode(errors="replace")


async def call_on_exit(handle: EnclaveHandle, logger: logging.Logger) -> None:
    handle.exited.set()
    for callback in list(handle.on_exit):
        try:
            result = callback(handle)
            if asyncio.iscoroutine(result):
                await result
        except Exception:  # one failing observer must not hide the exit from the others
            logger.exception("enclave exit callback failed", extra={"enclave_id": handle.spec.id})


# --- the provider -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SgxBuild:
    """A signed manifest: the directory gramine-sgx runs in and its SIGSTRUCT."""

    directory: Path
    sigstruct: Sigstruct
    enclave_size: int


@dataclass
class _Running:
    handle: EnclaveHandle
    process: asyncio.subprocess.Process
    run_dir: Path
    watcher: asyncio.Task[None] | None = None
    destroying: bool = False


SGX_OPTIONS = (
    "signing_key",
    "epc_bytes",
    "gramine_sgx",
    "gramine_manifest",
    "gramine_sgx_sign",
    "template",
    "python",
    "python_libdir",
    "site_packages",
    "arch_libdir",
    "threads",
    "min_enclave_size",
    "log_level",
    "isvprodid",
    "isvsvn",
    "start_timeout",
    "build_timeout",
    "listen_host",
    "host_root",
)


class SgxProvider(Provider):
    name = "sgx"

    def __init__(
        self,
        data_dir: Path,
        *,
        signing_key: Path,
        epc_bytes: int | None = None,
        gramine_sgx: str = "gramine-sgx",
        gramine_manifest: str = "gramine-manifest",
        gramine_sgx_sign: str = "gramine-sgx-sign",
        template: Path = DEFAULT_TEMPLATE,
        python: str | None = None,
        python_libdir: str | None = None,
        site_packages: str | None = None,
        arch_libdir: str = "/lib/x86_64-linux-gnu",
        threads: int = 16,
        min_enclave_size: int = 512 * MIB,
        log_level: str = "error",
        isvprodid: int = 1,
        isvsvn: int = 1,
        start_timeout: float = 120.0,
        build_timeout: float = 600.0,
        listen_host: str = "127.0.0.1",
        host_root: Path = Path("/"),
        max_enclaves: int = 256,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.directory = data_dir / "sgx"
        self.signing_key = signing_key
        self.gramine_sgx = gramine_sgx
        self.gramine_manifest = gramine_manifest
        self.gramine_sgx_sign = gramine_sgx_sign
        self.template = template
        # every value rendered into the manifest is checked here, before any enclave is signed
        self.python = manifest_path("python", python or sys.executable)
        self.python_libdir = manifest_path("python_libdir", python_libdir or _python_libdir())
        self.site_packages = manifest_path("site_packages", site_packages or sysconfig.get_paths()["purelib"])
        self.arch_libdir = manifest_path("arch_libdir", arch_libdir)
        self.threads = _manifest_int("threads", threads, 1, 65535)
        self.min_enclave_size = min_enclave_size
        if log_level not in LOG_LEVELS:
            raise ConfigError(
                f"expected one of {', '.join(LOG_LEVELS)}, got {log_level!r}",
                key_path="providers[sgx].options.log_level",
            )
        self.log_level = log_level
        self.isvprodid = _manifest_int("isvprodid", isvprodid, 0, 0xFFFF)
        self.isvsvn = _manifest_int("isvsvn", isvsvn, 0, 0xFFFF)
        self.start_timeout = start_timeout
        self.build_timeout = build_timeout
        self.listen_host = listen_host
        self.host_root = host_root
        self.max_enclaves = max_enclaves
        self._env = {k: v for k, v in (env if env is not None else os.environ).items()}
        for name in (CONNECT_ENV, HELLO_ENV):
            self._env.pop(name, None)
        total = epc_bytes if epc_bytes is not None else hardware_epc_bytes(host_root)
        if total is None:
            raise ProviderError(
                "the EPC size of this host is not visible (Linux before 6.0 does not expose "
                "/sys/devices/system/node/node*/x86/sgx_total_bytes)",
                hint="set providers[sgx].options.epc_bytes to the EPC size "
                "(the BIOS setting, or dmesg lines 'sgx: EPC section')",
            )
        self._epc = total
        self.mrsigner = mrsigner_of(load_signing_key(signing_key).public_key())
        self._builds: dict[str, SgxBuild] = {}
        self._build_locks: dict[str, asyncio.Lock] = {}
        self._running: dict[str, _Running] = {}

    @classmethod
    def from_config(cls, config: TeeConfig, data_dir: Path) -> SgxProvider:
        entry = config.provider("sgx")
        opts = ProviderOptions("sgx", entry.options if entry else {}, SGX_OPTIONS)
        key = opts.path("signing_key", None)
        if key is None:
            if not config.server.dev:
                raise ConfigError(
                    "no enclave signing key",
                    key_path="providers[sgx].options.signing_key",
                    hint="give the PEM of the RSA-3072 (exponent 3) key that signs your enclaves "
                    "(openssl genrsa -3 -out key.pem 3072); only server.dev generates one",
                )
            key = data_dir / "sgx" / "dev-enclave-signing-key.pem"
            if not key.exists():
                generate_dev_signing_key(key)
                log.warning(
                    "generated a DEVELOPMENT enclave signing key: enclaves it signs are yours to "
                    "impersonate; set providers[sgx].options.signing_key in production",
                    extra={"key_path": str(key)},
                )
        return cls(
            data_dir,
            signing_key=key,
            epc_bytes=opts.size("epc_bytes", None),
            gramine_sgx=opts.string("gramine_sgx", "gramine-sgx"),
            gramine_manifest=opts.string("gramine_manifest", "gramine-manifest"),
            gramine_sgx_sign=opts.string("gramine_sgx_sign", "gramine-sgx-sign"),
            template=opts.path("template", DEFAULT_TEMPLATE) or DEFAULT_TEMPLATE,
            python=opts.string("python", sys.executable),
            python_libdir=opts.string("python_libdir", _python_libdir()),
            site_packages=opts.string("site_packages", sysconfig.get_paths()["purelib"]),
            arch_libdir=opts.string("arch_libdir", "/lib/x86_64-linux-gnu"),
            threads=opts.integer("threads", 16, minimum=4),
            min_enclave_size=opts.size("min_enclave_size", 512 * MIB) or 0,
            log_level=opts.choice("log_level", "error", LOG_LEVELS),
            isvprodid=opts.integer("isvprodid", 1, maximum=0xFFFF),
            isvsvn=opts.integer("isvsvn", 1, maximum=0xFFFF),
            start_timeout=opts.seconds("start_timeout", 120.0),
            build_timeout=opts.seconds("build_timeout", 600.0),
            listen_host=opts.string("listen_host", "127.0.0.1"),
            host_root=opts.path("host_root", Path("/")) or Path("/"),
            max_enclaves=config.workers.max_enclaves,
        )

    # -- capacity ------------------------------------------------------------------------------

    def probe(self) -> ProviderProbe:
        path = self._env.get("PATH")

        def which(name: str) -> str | None:
            return shutil.which(self.gramine_sgx if name == "gramine-sgx" else name, path=path)

        return probe_sgx(self.host_root, which)

    def total_bytes(self) -> int:
        return self._epc

    def enclave_size(self, requested: int) -> int:
        return enclave_size_for(requested, self.min_enclave_size)

    def reserve(self, spec: EnclaveSpec) -> None:
        """Take EPC for the enclave's whole (power-of-two) size; refuse with both numbers."""
        check_spec(spec)
        cap = self.capacity()
        self.check_capacity(cap, 0)
        size = self.enclave_size(spec.size_bytes)
        if size > cap.free_bytes:
            why = ""
            if size != spec.size_bytes:
                why = f" (requested {_mib(spec.size_bytes)}, rounded up to a power of two"
                why += f" of at least {_mib(self.min_enclave_size)})" if self.min_enclave_size else ")"
            raise CapacityError(
                f"not enough EPC: the enclave needs {_mib(size)}{why} but only {_mib(cap.free_bytes)} "
                f"of {_mib(cap.total_bytes)} EPC is free",
                hint="ask for a smaller --size, destroy SGX enclaves, or schedule on a node with more EPC",
            )
        self._reserved[spec.id] = size

    # -- build ---------------------------------------------------------------------------------

    def manifest_variables(self, *, enclave_size: int, debug: bool, broker_key: str = "") -> dict[str, str]:
        if broker_key and not _BROKER_KEY_RE.match(broker_key):
            raise ProviderError(
                "the key broker's key to measure into the enclave is not a base64url X25519 key",
                hint="it comes from the service (GET /v1/keys, broker_key); check the worker's service URL",
            )
        return {
            "broker_key": broker_key,
            "python": self.python,
            "python_libdir": self.python_libdir,
            "site_packages": self.site_packages,
            "arch_libdir": self.arch_libdir,
            "enclave_size": gramine_size(enclave_size),
            "threads": str(self.threads),
            "debug": "true" if debug else "false",
            "log_level": self.log_level,
            "isvprodid": str(self.isvprodid),
            "isvsvn": str(self.isvsvn),
        }

    async def build(self, *, enclave_size: int, debug: bool, broker_key: str = "") -> SgxBuild:
        """The signed manifest for this configuration (made once, then reused). The key broker's
        key is one of its environment values, so MRENCLAVE covers which broker the enclave accepts
        secrets from."""
        variables = self.manifest_variables(enclave_size=enclave_size, debug=debug, broker_key=broker_key)
        try:
            template = self.template.read_bytes()
        except OSError as exc:
            raise ProviderError(
                f"cannot read the Gramine manifest template {self.template}: {exc.strerror}",
                hint="fix providers[sgx].options.template or drop it to use the packaged template",
            ) from None
        digest = hashlib.sha256(
            json.dumps(
                {
                    "variables": variables,
                    "template": hashlib.sha256(template).hexdigest(),
                    "mrsigner": self.mrsigner.hex(),
                    "tools": [self.gramine_manifest, self.gramine_sgx_sign],
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:24]
        cached = self._builds.get(digest)
        if cached is not None:
            return cached
        async with self._build_locks.setdefault(digest, asyncio.Lock()):
            cached = self._builds.get(digest)
            if cached is not None:
                return cached
            directory = self.directory / "builds" / digest
            sig = directory / f"{MANIFEST_NAME}.sig"
            if not (sig.is_file() and (directory / f"{MANIFEST_NAME}.manifest.sgx").is_file()):
                await self._sign_into(directory, variables)
            try:
                sigstruct = parse_sigstruct(sig.read_bytes())
            except OSError as exc:
                raise ProviderError(f"cannot read {sig}: {exc.strerror}") from None
            except ProviderError as exc:
                shutil.rmtree(directory, ignore_errors=True)
                raise ProviderError(
                    f"{sig}: {exc.message}", hint="the signed build was removed; the next create signs again"
                ) from None
            if not hmac.compare_digest(sigstruct.mrsigner, self.mrsigner):
                shutil.rmtree(directory, ignore_errors=True)
                raise ProviderError(
                    f"{sig} was signed by another key (MRSIGNER {sigstruct.mrsigner.hex()}, expected "
                    f"{self.mrsigner.hex()} of {self.signing_key})",
                    hint="check that gramine-sgx-sign honours --key",
                )
            if sigstruct.debug != debug:
                shutil.rmtree(directory, ignore_errors=True)
                raise ProviderError(
                    f"{sig} has DEBUG={sigstruct.debug} but the manifest asked for sgx.debug={debug}",
                    hint="check the manifest template's sgx.debug line",
                )
            build = SgxBuild(directory, sigstruct, enclave_size)
            self._builds[digest] = build
            log.info(
                "SGX enclave build ready",
                extra={"mrenclave": sigstruct.mrenclave.hex(), "enclave_size": variables["enclave_size"]},
            )
            return build

    async def _sign_into(self, directory: Path, variables: Mapping[str, str]) -> None:
        tmp = directory.with_name(f"{directory.name}.tmp-{secrets.token_hex(4)}")
        tmp.mkdir(parents=True, mode=0o700)
        try:
            manifest = tmp / f"{MANIFEST_NAME}.manifest"
            await run_tool(
                [
                    self.gramine_manifest,
                    *(f"-D{k}={v}" for k, v in sorted(variables.items())),
                    str(self.template),
                    str(manifest),
                ],
                what="gramine-manifest",
                timeout=self.build_timeout,
                env=self._env,
                cwd=tmp,
                missing_hint=_MISSING.format(option="gramine_manifest"),
            )
            await run_tool(
                [
                    self.gramine_sgx_sign,
                    "--key",
                    str(self.signing_key),
                    "--manifest",
                    str(manifest),
                    "--output",
                    str(tmp / f"{MANIFEST_NAME}.manifest.sgx"),
                ],
                what="gramine-sgx-sign",
                timeout=self.build_timeout,
                env=self._env,
                cwd=tmp,
                missing_hint=_MISSING.format(option="gramine_sgx_sign"),
            )
            for produced in (f"{MANIFEST_NAME}.manifest.sgx", f"{MANIFEST_NAME}.sig"):
                if not (tmp / produced).is_file():
                    raise ProviderError(f"gramine-sgx-sign did not write {produced} in {tmp}")
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Stop enclaves a previous worker left running: their channels died with it."""
        run_root = self.directory / "run"
        if not run_root.is_dir():
            return
        for run_dir in sorted(run_root.iterdir()):
            if run_dir.name in self._running:
                continue
            try:
                info = json.loads((run_dir / "pid.json").read_text())
                pid, started = int(info["pid"]), info.get("start_time")
            except (OSError, ValueError, KeyError, TypeError):
                shutil.rmtree(run_dir, ignore_errors=True)
                continue
            if started is not None and _start_time(pid) == started:
                _kill_group(pid, signal.SIGKILL)
                log.warning(
                    "stopped an SGX enclave left by a previous worker",
                    extra={"enclave_id": run_dir.name, "pid": pid},
                )
            shutil.rmtree(run_dir, ignore_errors=True)

    async def stop(self) -> None:
        for record in list(self._running.values()):
            await self.destroy(record.handle)

    async def create(self, spec: EnclaveSpec) -> EnclaveHandle:
        check_spec(spec)  # its id names the run directory removed on destroy
        probe = self.probe()
        if not probe.available:
            raise ProviderUnavailableError(probe.explanation(), hint="run r3e-tee-cli doctor on this node")
        build = await self.build(
            enclave_size=self.enclave_size(spec.size_bytes),
            debug=spec.debug,
            broker_key=str(spec.payload.get("broker_key") or ""),
        )
        run_dir = self.directory / "run" / spec.id
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path = run_dir / "enclave.log"
        family = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        process: asyncio.subprocess.Process | None = None
        try:
            listener.bind((self.listen_host, 0))
            listener.listen(8)
            listener.setblocking(False)
            port = listener.getsockname()[1]
            host = f"[{self.listen_host}]" if family == socket.AF_INET6 else self.listen_host
            hello = secrets.token_bytes(HELLO_LEN)
            env = {**self._env, CONNECT_ENV: f"tcp:{host}:{port}", HELLO_ENV: hello.hex()}
            with open(log_path, "ab") as log_file:
                try:
                    process = await asyncio.create_subprocess_exec(
                        self.gramine_sgx,
                        MANIFEST_NAME,
                        cwd=build.directory,
                        env=env,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=asyncio.subprocess.STDOUT,
                        start_new_session=True,
                    )
                except (FileNotFoundError, PermissionError) as exc:
                    raise ProviderUnavailableError(
                        f"cannot run {self.gramine_sgx}: {exc.strerror}",
                        hint=_MISSING.format(option="gramine_sgx"),
                    ) from None
            self._confine(process.pid, spec)
            (run_dir / "pid.json").write_text(
                json.dumps(
                    {"pid": process.pid, "start_time": _start_time(process.pid), "enclave_id": spec.id}
                )
            )
            sock = await self._accept(listener, process, hello, log_path)
        except BaseException:
            if process is not None:
                await stop_process_group(process, grace=0)
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        finally:
            listener.close()

        reader, writer = await asyncio.open_connection(sock=sock)
        channel = Channel(reader, writer, name=f"sgx-{spec.id[:8]}")
        handle = EnclaveHandle(
            spec=spec,
            provider=self.name,
            pid=process.pid,
            channel=channel,
            measurement=build.sigstruct.mrenclave.hex(),
        )
        record = _Running(handle, process, run_dir)
        self._running[spec.id] = record
        channel.start()
        record.watcher = asyncio.get_running_loop().create_task(
            self._watch(record), name=f"sgx-watch-{spec.id}"
        )
        try:
            await channel.request("ping", timeout=min(30.0, self.start_timeout))
        except EnclaveError:
            await self.destroy(handle)
            raise
        log.info(
            "SGX enclave started",
            extra={"enclave_id": spec.id, "pid": process.pid, "mrenclave": handle.measurement},
        )
        return handle

    @staticmethod
    def _confine(pid: int, spec: EnclaveSpec) -> None:
        """No core files of the enclave host process; the spec's CPU budget as RLIMIT_CPU."""
        with contextlib.suppress(OSError, ValueError):
            resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
            if spec.cpu_seconds:
                resource.prlimit(pid, resource.RLIMIT_CPU, (spec.cpu_seconds, spec.cpu_seconds + 5))

    async def _accept(
        self,
        listener: socket.socket,
        process: asyncio.subprocess.Process,
        hello: bytes,
        log_path: Path,
    ) -> socket.socket:
        """The enclave's connection: the first one that sends its hello before the deadline.

        Hellos are awaited concurrently (at most ``MAX_PENDING_HELLOS`` at a time): checked one
        after another, any local process could hold the start back 5 s per silent connection
        until the deadline passed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        exited = asyncio.ensure_future(process.wait())
        accepted: asyncio.Future[tuple[socket.socket, object]] | None = None
        pending: dict[asyncio.Future[bool], socket.socket] = {}
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise EnclaveError(
                        f"the enclave runtime did not connect within {self.start_timeout:g} s; "
                        f"gramine-sgx said: {_tail(_read_tail(log_path))}",
                        hint="check the Gramine log above; raise providers[sgx].options.start_timeout "
                        "if the enclave only starts slowly",
                    )
                if accepted is None and len(pending) < MAX_PENDING_HELLOS:
                    accepted = asyncio.ensure_future(loop.sock_accept(listener))
                waiting: set[asyncio.Future[Any]] = {exited, *pending}
                if accepted is not None:
                    waiting.add(accepted)
                done, _ = await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if exited in done:
                    raise EnclaveError(
                        f"gramine-sgx exited with status {process.returncode} before the enclave runtime "
                        f"connected: {_tail(_read_tail(log_path))}",
                        hint="see the Gramine output above (r3e-tee-cli doctor checks the SGX setup)",
                    )
                if accepted is not None and accepted in done:
                    conn, _ = accepted.result()
                    accepted = None
                    pending[asyncio.ensure_future(self._check_hello(conn, hello))] = conn
                for check in [c for c in pending if c in done]:
                    conn = pending.pop(check)
                    if check.result():
                        return conn
                    conn.close()
                    log.warning("rejected a connection to an enclave's listening port that lacked its hello")
        finally:
            if accepted is not None:
                accepted.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await accepted
            for check, conn in pending.items():
                check.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await check
                conn.close()
            if not exited.done():
                exited.cancel()

    @staticmethod
    async def _check_hello(conn: socket.socket, hello: bytes) -> bool:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        received = b""
        try:
            async with asyncio.timeout(5):
                while len(received) < len(hello):
                    chunk = await loop.sock_recv(conn, len(hello) - len(received))
                    if not chunk:
                        return False
                    received += chunk
        except (TimeoutError, OSError):
            return False
        return hmac.compare_digest(received, hello)

    async def _watch(self, record: _Running) -> None:
        status = await record.process.wait()
        if record.destroying:
            return
        handle = record.handle
        self._running.pop(handle.spec.id, None)
        _kill_group(record.process.pid, signal.SIGKILL)
        handle.exit_status = status
        await handle.channel.aclose()
        log.warning(
            "SGX enclave process ended unexpectedly",
            extra={
                "enclave_id": handle.spec.id,
                "pid": record.process.pid,
                "status": status,
                "output": _tail(_read_tail(record.run_dir / "enclave.log"), 5),
            },
        )
        shutil.rmtree(record.run_dir, ignore_errors=True)
        await call_on_exit(handle, log)

    async def destroy(self, handle: EnclaveHandle) -> None:
        record = self._running.pop(handle.spec.id, None)
        if record is not None:
            record.destroying = True  # its exit is expected now, not a failure
        if handle.channel.is_open:
            with contextlib.suppress(EnclaveError):
                await handle.channel.request("shutdown", timeout=2)
        await handle.channel.aclose()
        if record is not None:
            await stop_process_group(record.process, grace=5.0)
            if handle.exit_status is None:
                handle.exit_status = record.process.returncode
            if record.watcher is not None and record.watcher is not asyncio.current_task():
                record.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await record.watcher
            shutil.rmtree(record.run_dir, ignore_errors=True)
        handle.exited.set()


def _python_libdir() -> str:
    """Where libpython and the standard library live (LIBDIR; the stdlib's parent otherwise)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if isinstance(libdir, str) and stdlib.is_relative_to(libdir):
        return libdir
    return str(stdlib.parent)


def _read_tail(path: Path, limit: int = 8192) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read()
    except OSError:
        return b""


__all__ = [
    "DEFAULT_TEMPLATE",
    "ProviderOptions",
    "SgxBuild",
    "SgxProvider",
    "Sigstruct",
    "enclave_size_for",
    "generate_dev_signing_key",
    "load_signing_key",
    "mrsigner_of",
    "parse_sigstruct",
    "signing_data",
]
