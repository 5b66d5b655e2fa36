"""Key-encryption keys (KEKs): the one key that wraps every data key and stored signing key.

Two providers behind one interface, so a cloud KMS can follow:

* ``file``: 32 raw random bytes in a file, as mounted from the Kubernetes Secret ``r3e-tee-kek``
  (``openssl rand -out kek.key 32``). Wrapping is AES-256-GCM in this process.
* ``pkcs11``: an AES-256 key inside a PKCS#11 token (an HSM; SoftHSM2 in tests). Wrapping is
  AES-256-GCM performed *by the token* (``C_Encrypt``/``C_Decrypt`` with ``CKM_AES_GCM``): the
  KEK never leaves it.

A wrapped key is ``0x01 || nonce (12) || ciphertext || tag (16)``; the associated data given by
the caller (which key, which owner, which version) is bound into the tag, so a wrapped key moved
to another row does not unwrap. Every KEK has a ``kek_id`` stored next to what it wrapped; the key
store keeps a check value per KEK to tell a wrong KEK from a corrupted key at start.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from r3e_tee.fsio import create_exclusive, secret_file_exposure
from r3e_tee.keys.errors import KekError, KeyIntegrityError

log = logging.getLogger("r3e_tee.keys")

KEK_SIZE = 32
_FORMAT = b"\x01"
_NONCE = 12
_TAG = 16
_DOMAIN = b"r3e-tee/kek-wrap/v1\0"
CREATE_HINT = "create one with: (umask 077; openssl rand -out kek.key 32) (32 raw random bytes, mode 0600)"


def zeroize(buf: bytearray) -> None:
    """Overwrite a mutable buffer in place (Python cannot reach copies held by ``bytes``)."""
    for i in range(len(buf)):
        buf[i] = 0


class KekProvider(abc.ABC):
    """Wraps and unwraps data keys. Implementations are thread-safe."""

    provider: str
    kek_id: str
    label: str  # where the KEK lives, for messages (a path or token/label; never key material)

    @abc.abstractmethod
    def wrap(self, key: bytes | bytearray, aad: bytes) -> bytes:
        """Encrypt ``key`` under the KEK, binding ``aad``."""

    @abc.abstractmethod
    def unwrap(self, blob: bytes, aad: bytes) -> bytearray:
        """Decrypt a wrapped key. Raises :class:`KeyIntegrityError` when it does not authenticate."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release the KEK (zeroize, close token sessions)."""

    def describe(self) -> dict[str, str]:
        return {"provider": self.provider, "kek_id": self.kek_id, "location": self.label}


def _split(blob: bytes, what: str) -> tuple[bytes, bytes]:
    if len(blob) < 1 + _NONCE + _TAG or blob[:1] != _FORMAT:
        raise KeyIntegrityError(
            f"{what}: not a wrapped key of this product (format byte or length wrong)",
            hint="the stored value was truncated or overwritten; restore the store from a backup",
        )
    return blob[1 : 1 + _NONCE], blob[1 + _NONCE :]


# --- file -----------------------------------------------------------------------------------------


class FileKek(KekProvider):
    """A 256-bit KEK read from a file; the bytes are kept in one bytearray zeroized on close."""

    provider = "file"

    def __init__(self, key: bytes | bytearray, *, path: Path) -> None:
        if len(key) != KEK_SIZE:
            raise KekError(f"KEK from {path} is {len(key)} bytes, expected {KEK_SIZE}", hint=CREATE_HINT)
        self._key = bytearray(key)
        self._aead: AESGCM | None = AESGCM(bytes(self._key))
        self.path = path
        self.label = f"file {path}"
        digest = hmac.new(bytes(self._key), b"r3e-tee kek id v1", hashlib.sha256).hexdigest()
        self.kek_id = f"file:{digest[:16]}"

    @classmethod
    def load(cls, path: Path) -> FileKek:
        """Read and check a KEK file: private to the service, exactly 32 raw bytes, not an
        obviously constant pattern. A KEK others can read or replace protects nothing."""
        try:
            st = path.stat()
        except FileNotFoundError:
            raise KekError(
                f"KEK file {path} does not exist",
                hint=f"{CREATE_HINT}, store it in the Secret r3e-tee-kek and mount it at {path} "
                "(keys.file.path)",
            ) from None
        except OSError as exc:
            raise KekError(f"cannot read KEK file {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise KekError(f"KEK path {path} is not a regular file", hint=CREATE_HINT)
        try:
            data = bytearray(path.read_bytes())
        except OSError as exc:
            raise KekError(
                f"cannot read KEK file {path}: {exc.strerror}",
                hint="the service user needs read access to the mounted Secret",
            ) from None
        try:
            _check_kek_bytes(data, path)
            exposed = secret_file_exposure(st)
            if exposed is not None:
                raise KekError(
                    f"KEK file {path} is not private: {exposed}",
                    hint=f"chmod 600 {path} (owned by the service user), or defaultMode 0440 on the "
                    "Secret volume with the pod's fsGroup",
                )
            return cls(data, path=path)
        finally:
            zeroize(data)

    @classmethod
    def generate(cls, path: Path) -> FileKek:
        """A new random KEK written with mode 0600 (development and simulation-only installs).

        The file appears complete or not at all, and durably (see :mod:`r3e_tee.fsio`): a crash
        while writing must not leave an empty KEK file that stops the next start, and the key
        must be on disk before anything is wrapped with it. When another process created the
        file first, its KEK is the one used.
        """
        key = bytearray(os.urandom(KEK_SIZE))
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            created = create_exclusive(path, key)
            return cls(key, path=path) if created else cls.load(path)
        except OSError as exc:
            raise KekError(f"cannot create KEK file {path}: {exc.strerror}") from None
        finally:
            zeroize(key)

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            raise KekError(f"the KEK from {self.path} was closed")
        return self._aead

    def wrap(self, key: bytes | bytearray, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return _FORMAT + nonce + self._cipher().encrypt(nonce, bytes(key), _DOMAIN + aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytearray:
        nonce, body = _split(blob, "wrapped key")
        try:
            return bytearray(self._cipher().decrypt(nonce, body, _DOMAIN + aad))
        except InvalidTag:
            raise KeyIntegrityError(
                f"a wrapped key does not authenticate under KEK {self.kek_id}: it was corrupted, "
                "moved to another record, or wrapped by another KEK",
                hint="restore the store from a backup, or configure the KEK it was wrapped with",
            ) from None

    def close(self) -> None:
        zeroize(self._key)
        self._aead = None


_HEX_RE = re.compile(rb"^[0-9a-fA-F]{64}\s*$")
_B64_RE = re.compile(rb"^[A-Za-z0-9+/]{43}=\s*$")


def _check_kek_bytes(data: bytearray, path: Path) -> None:
    if len(data) == KEK_SIZE:
        if len(set(data)) <= 2:
            raise KekError(
                f"KEK file {path} holds 32 bytes of a constant pattern, not a random key",
                hint=CREATE_HINT,
            )
        return
    if _HEX_RE.match(bytes(data)):
        raise KekError(
            f"KEK file {path} holds 64 hex characters; the KEK must be the 32 raw bytes",
            hint="convert it with: xxd -r -p kek.hex > kek.key (or " + CREATE_HINT + ")",
        )
    if _B64_RE.match(bytes(data)):
        raise KekError(
            f"KEK file {path} holds base64 text; the KEK must be the 32 raw bytes",
            hint="convert it with: base64 -d kek.b64 > kek.key (or " + CREATE_HINT + ")",
        )
    raise KekError(
        f"KEK file {path} is {len(data)} bytes; a KEK is exactly {KEK_SIZE} bytes", hint=CREATE_HINT
    )


# --- PKCS#11 ----------------------------------------------------------------------------------------


class _TokenSession:
    """One logged-in session per (module, token) in this process.

    PKCS#11 login state belongs to the application, not the session: a second C_Login fails and
    closing any logged-in session logs all of them out. So KEK providers on one token share this
    session (reference-counted) and serialise calls on it (sessions are not thread-safe).
    """

    _registry: dict[tuple[str, str], _TokenSession] = {}
    _registry_lock = threading.Lock()
    _pin_key = os.urandom(32)  # keys the PIN digests below; never leaves this process

    def __init__(self, session: Any, key: tuple[str, str], pin_digest: bytes) -> None:
        self.session = session
        self.lock = threading.Lock()
        self.refs = 0
        self.key = key
        self.pin_digest = pin_digest

    @classmethod
    def _digest(cls, pin: str) -> bytes:
        return hmac.new(cls._pin_key, pin.encode(), hashlib.sha256).digest()

    @classmethod
    def acquire(cls, module: Path, token_label: str, pin: str) -> _TokenSession:
        """The shared login; a caller with another PIN than the one that logged in is refused
        (the token would otherwise never see, let alone reject, that PIN)."""
        key = (str(module), token_label)
        digest = cls._digest(pin)
        with cls._registry_lock:
            existing = cls._registry.get(key)
            if existing is None:
                existing = cls(_open_session(module, token_label, pin), key, digest)
                cls._registry[key] = existing
            elif not hmac.compare_digest(existing.pin_digest, digest):
                raise KekError(
                    f"the user PIN given for PKCS#11 token {token_label!r} is not the one this process "
                    "logged in to it with",
                    hint="keys.pkcs11 and keys.previous_kek.pkcs11 on one token must use the same PIN "
                    "(pin_file)",
                )
            existing.refs += 1
            return existing

    def release(self) -> None:
        with self._registry_lock:
            self.refs -= 1
            if self.refs > 0:
                return
            self._registry.pop(self.key, None)
        with self.lock:
            try:
                self.session.close()
            except Exception as exc:  # noqa: BLE001 - closing must not mask the caller's error
                log.warning("closing the PKCS#11 session failed", extra={"error": type(exc).__name__})


def _open_session(module: Path, token_label: str, pin: str, *, rw: bool = False) -> Any:
    import pkcs11
    from pkcs11 import exceptions as p11e

    if not module.exists():
        raise KekError(
            f"PKCS#11 module {module} does not exist",
            hint="install the HSM vendor's PKCS#11 library (SoftHSM2: apt-get install softhsm2) and set "
            "keys.pkcs11.module to its path",
        )
    try:
        lib = pkcs11.lib(str(module))
    except p11e.PKCS11Error as exc:
        raise KekError(f"cannot load PKCS#11 module {module}: {_first_line(exc)}") from None
    try:
        token = lib.get_token(token_label=token_label)
    except p11e.NoSuchToken:
        labels = []
        try:
            labels = [t.label for t in lib.get_tokens()]
        except p11e.PKCS11Error:
            pass
        raise KekError(
            f"no PKCS#11 token labelled {token_label!r} in {module}",
            hint=f"tokens present: {', '.join(repr(x) for x in labels) or '(none)'}; set "
            "keys.pkcs11.token_label, or create it (SoftHSM2: softhsm2-util --init-token --free "
            f"--label {token_label})",
        ) from None
    except p11e.MultipleTokensReturned:
        raise KekError(
            f"several PKCS#11 tokens are labelled {token_label!r}; labels must be unique"
        ) from None
    except p11e.PKCS11Error as exc:
        raise KekError(f"PKCS#11 module {module}: {_first_line(exc)}") from None
    try:
        return token.open(user_pin=pin, rw=rw)
    except p11e.PinIncorrect:
        raise KekError(
            f"the PKCS#11 token {token_label!r} rejected the user PIN",
            hint="check keys.pkcs11.pin_file (the Secret r3e-tee-pkcs11-pin)",
        ) from None
    except p11e.PinLocked:
        raise KekError(
            f"the user PIN of PKCS#11 token {token_label!r} is locked",
            hint="unlock it with the security officer PIN",
        ) from None
    except p11e.PKCS11Error as exc:
        raise KekError(f"cannot log in to PKCS#11 token {token_label!r}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Pkcs11Kek(KekProvider):
    """An AES-256 key in a PKCS#11 token; AES-GCM wrap and unwrap run inside the token."""

    provider = "pkcs11"

    def __init__(self, module: Path, token_label: str, key_label: str, pin: str) -> None:
        import pkcs11
        from pkcs11 import exceptions as p11e

        self.module = module
        self.token_label = token_label
        self.key_label = key_label
        self.label = f"pkcs11 token {token_label!r} key {key_label!r}"
        self.kek_id = f"pkcs11:{token_label}/{key_label}"
        self._shared: _TokenSession | None = _TokenSession.acquire(module, token_label, pin)
        try:
            with self._shared.lock:
                self._key = self._shared.session.get_key(
                    object_class=pkcs11.ObjectClass.SECRET_KEY, key_type=pkcs11.KeyType.AES, label=key_label
                )
                length = int(self._key[pkcs11.Attribute.VALUE_LEN])
                can = bool(self._key[pkcs11.Attribute.ENCRYPT]) and bool(self._key[pkcs11.Attribute.DECRYPT])
                sensitive = bool(self._key[pkcs11.Attribute.SENSITIVE])
                extractable = bool(self._key[pkcs11.Attribute.EXTRACTABLE])
        except p11e.NoSuchKey:
            self.close()
            raise KekError(
                f"no AES key labelled {key_label!r} in PKCS#11 token {token_label!r}",
                hint="create it in the HSM as a 256-bit AES key, sensitive, not extractable, with "
                f"encrypt/decrypt allowed (e.g. pkcs11-tool --keygen --key-type AES:32 --label {key_label})",
            ) from None
        except p11e.MultipleObjectsReturned:
            self.close()
            raise KekError(f"several AES keys are labelled {key_label!r} in token {token_label!r}") from None
        except p11e.PKCS11Error as exc:
            self.close()
            raise KekError(
                f"cannot use key {key_label!r} in token {token_label!r}: {_first_line(exc)}"
            ) from None
        if length != KEK_SIZE or not can:
            self.close()
            raise KekError(
                f"key {key_label!r} in token {token_label!r} must be a 256-bit AES key allowed to "
                f"encrypt and decrypt (it is {length * 8}-bit, encrypt/decrypt allowed: {can})"
            )
        if not sensitive or extractable:
            # a non-sensitive key's value can be read out, an extractable one wrapped out, by anyone
            # holding the PIN: the KEK would no longer stay in the token
            self.close()
            raise KekError(
                f"key {key_label!r} in token {token_label!r} can leave the token (sensitive: "
                f"{sensitive}, extractable: {extractable}); the KEK must be sensitive and not extractable",
                hint="create a new KEK in the HSM with CKA_SENSITIVE=true and CKA_EXTRACTABLE=false "
                "(pkcs11-tool --keygen --key-type AES:32 --sensitive --label ...), then rotate to it "
                "with keys.previous_kek",
            )

    @classmethod
    def from_config(
        cls, module: Path, token_label: str, key_label: str, pin: str | None, pin_file: Path | None
    ) -> Pkcs11Kek:
        if pin is None and pin_file is not None:
            try:
                exposed = secret_file_exposure(pin_file.stat())
                if exposed is not None:  # the PIN is the HSM's only guard of the KEK
                    raise KekError(
                        f"PKCS#11 PIN file {pin_file} is not private: {exposed}",
                        hint=f"chmod 600 {pin_file}, or defaultMode 0440 on the Secret volume with the "
                        "pod's fsGroup",
                    )
                pin = pin_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise KekError(
                    f"cannot read the PKCS#11 PIN file {pin_file}: {reason}",
                    hint="mount the Secret r3e-tee-pkcs11-pin at keys.pkcs11.pin_file",
                ) from None
        if not pin:
            raise KekError(
                "no PKCS#11 user PIN configured",
                hint="set keys.pkcs11.pin_file (or keys.pkcs11.pin from ${ENV})",
            )
        return cls(module, token_label, key_label, pin)

    def _call(self, op: str, data: bytes, nonce: bytes, aad: bytes) -> bytes:
        import pkcs11
        from pkcs11.mechanisms import GCMParams

        shared = self._shared
        if shared is None:
            raise KekError(f"the KEK {self.label} was closed")
        param = GCMParams(nonce, _DOMAIN + aad, 128)
        with shared.lock:
            fn = self._key.encrypt if op == "encrypt" else self._key.decrypt
            return bytes(fn(data, mechanism=pkcs11.Mechanism.AES_GCM, mechanism_param=param))

    def wrap(self, key: bytes | bytearray, aad: bytes) -> bytes:
        from pkcs11 import exceptions as p11e

        nonce = os.urandom(_NONCE)
        try:
            return _FORMAT + nonce + self._call("encrypt", bytes(key), nonce, aad)
        except p11e.PKCS11Error as exc:
            raise KekError(
                f"the PKCS#11 token refused to wrap with {self.label}: {_first_line(exc)}"
            ) from None

    def unwrap(self, blob: bytes, aad: bytes) -> bytearray:
        from pkcs11 import exceptions as p11e

        nonce, body = _split(blob, "wrapped key")
        try:
            return bytearray(self._call("decrypt", body, nonce, aad))
        except (
            p11e.EncryptedDataInvalid,
            p11e.EncryptedDataLenRange,
            p11e.GeneralError,
            p11e.FunctionFailed,
        ):
            # tokens report a failed GCM tag check as one of these
            raise KeyIntegrityError(
                f"a wrapped key does not authenticate under {self.label}: it was corrupted, moved to "
                "another record, or wrapped by another KEK",
                hint="restore the store from a backup, or configure the KEK it was wrapped with",
            ) from None
        except p11e.PKCS11Error as exc:
            raise KekError(
                f"the PKCS#11 token failed to unwrap with {self.label}: {_first_line(exc)}"
            ) from None

    def close(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.release()


def create_pkcs11_kek(module: Path, token_label: str, key_label: str, pin: str) -> None:
    """Generate a non-extractable AES-256 KEK inside a token (setup and tests; HSM tools do the same).

    Opens its own read-write session, so call it before any provider of this process uses the token.
    """
    import pkcs11

    if (str(module), token_label) in _TokenSession._registry:
        raise KekError(f"token {token_label!r} is in use by this process; create its keys first")
    session = _open_session(module, token_label, pin, rw=True)
    try:
        session.generate_key(
            pkcs11.KeyType.AES,
            256,
            label=key_label,
            store=True,
            template={
                pkcs11.Attribute.SENSITIVE: True,
                pkcs11.Attribute.EXTRACTABLE: False,
                pkcs11.Attribute.ENCRYPT: True,
                pkcs11.Attribute.DECRYPT: True,
            },
        )
    finally:
        session.close()


# --- from configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KekSource:
    """What opened the KEK and whether it was generated just now (for the start-up log)."""

    kek: KekProvider
    generated: bool = False


def _open_one(
    provider: str, file_path: Path | None, pkcs11_cfg: Any, data_dir: Path, *, allow_generate: bool
) -> KekSource:
    if provider == "pkcs11":
        return KekSource(
            Pkcs11Kek.from_config(
                Path(pkcs11_cfg.module),
                pkcs11_cfg.token_label,
                pkcs11_cfg.key_label,
                pkcs11_cfg.pin.get_secret_value() if pkcs11_cfg.pin is not None else None,
                pkcs11_cfg.pin_file,
            )
        )
    if file_path is not None:
        return KekSource(FileKek.load(Path(file_path)))
    default = data_dir / "kek.key"
    if default.exists():
        return KekSource(FileKek.load(default))
    if not allow_generate:
        raise KekError(
            f"no KEK: keys.file.path is not set and {default} does not exist",
            hint=f"{CREATE_HINT}, store it in the Secret r3e-tee-kek and set keys.file.path to where it "
            "is mounted (the Helm chart uses /etc/r3e-tee/kek/kek.key)",
        )
    return KekSource(FileKek.generate(default), generated=True)


def open_kek(keys_config: Any, data_dir: Path, *, allow_generate: bool) -> KekSource:
    """The configured KEK (``keys:`` of tee-config.yaml). A file KEK is generated into the data
    directory only when ``allow_generate`` (development, or an installation that runs the simulation
    provider only) and no path is configured; a configured path must exist."""
    return _open_one(
        keys_config.kek_provider,
        keys_config.file.path,
        keys_config.pkcs11,
        data_dir,
        allow_generate=allow_generate,
    )


def open_previous_kek(keys_config: Any, data_dir: Path) -> KekProvider | None:
    """``keys.previous_kek``: the KEK being rotated away from (never generated)."""
    prev = keys_config.previous_kek
    if prev is None:
        return None
    if prev.kek_provider == "file" and prev.file.path is None:
        raise KekError(
            "keys.previous_kek.file.path is not set",
            hint="point it at the KEK file the store's keys are wrapped with now",
        )
    return _open_one(prev.kek_provider, prev.file.path, prev.pkcs11, data_dir, allow_generate=False).kek
