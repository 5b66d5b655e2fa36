"""Secrets and sealing inside the enclave (a runtime extension).

Operations the host may call:

* ``deliver_secrets`` ``{attestation_id, broker_key, secrets: [{name, revision, sealed}]}``: each
  blob is HPKE sealed (auth mode) by the key broker to this enclave's attested X25519 key, with
  ``info`` binding the attestation, the name and the revision. They are opened here (all or none)
  into ``runtime.state["secrets"]`` (``dict[str, bytes]``). The reply names what arrived and its
  size, never a value, and whether the sender was the pinned broker.

Which broker: the key the enclave was measured with, ``broker_key`` in its measured configuration
(the simulation provider measures the payload the service puts it in) or, in an SGX or Nitro
image, the ``R3E_TEE_BROKER_KEY`` environment fixed by the measured manifest or image. With a
pin, a blob sealed by anyone else does not open, whatever key the host names. An enclave without
a pin receives nothing (its host could otherwise plant values), unless its image says
``R3E_TEE_BROKER_KEY=unsafe-unpinned``: then the host-named key is used and the reply says so.
* ``forget_secrets`` ``{names}``: drop them (a release policy changed).

For code running in the enclave (functions), ``runtime.state`` carries:

* ``secrets``: ``dict[str, bytes]``;
* ``seal``: ``async (data: bytes, *, bind="measurement"|"signer") -> bytes`` and
  ``unseal``: ``async (blob: bytes) -> bytes``: AES-256-GCM under a key bound to this enclave's
  identity, so only an enclave with the same measurement (or signer) unseals, across restarts.

Where the sealing key comes from:

* SGX (Gramine): ``/dev/attestation/keys/_sgx_mrenclave`` (or ``_sgx_mrsigner``), the CPU's
  EGETKEY key for this MRENCLAVE (MRSIGNER): 16 bytes, stretched with HKDF;
* Nitro: no hardware sealing. The host asks the key broker, which releases a key it holds per
  PCR set, HPKE-sealed to this enclave, only to an attested enclave with the same PCRs;
* simulation: the host derives it with HKDF from the installation's simulated CPU secret and this
  enclave's measurement (``sim_seal_key``); the enclave never sees the CPU secret.
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from r3e_tee.errors import EnclaveError
from r3e_tee.keys.hpke import open_sealed, public_key_from_b64u, seal_key_info, secret_info
from r3e_tee.runtime.devices import GramineAttestationDevice, HostQuotingDevice

if TYPE_CHECKING:
    from r3e_tee.runtime.enclave import EnclaveRuntime

MAGIC = b"R3ES"
_HEADER = struct.Struct(">4sBBI")  # magic, format version, backend, key version
_NONCE = 12
BACKENDS = {1: "simulation", 2: "sgx-mrenclave", 3: "sgx-mrsigner", 4: "nitro-broker"}
_BACKEND_IDS = {v: k for k, v in BACKENDS.items()}
MAX_SEAL_BYTES = 16 * 1024 * 1024
#: the broker key of an SGX or Nitro image: set by its measured manifest or image, never the host
BROKER_KEY_ENV = "R3E_TEE_BROKER_KEY"
#: the value that lets an image without a pin take the key its host names (named as unsafe)
UNSAFE_UNPINNED = "unsafe-unpinned"


def _hardware_image(device: object) -> bool:
    """SGX (Gramine) or Nitro: the environment is the one their measured manifest or image fixed."""
    from r3e_tee.runtime.nsm import NsmAttestationDevice  # imported late, as in _backend

    return isinstance(device, GramineAttestationDevice | NsmAttestationDevice)


def _stretch(raw: bytes | bytearray, backend: str) -> AESGCM:
    info = b"r3e-tee/seal/v1\0" + backend.encode()
    return AESGCM(HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(bytes(raw)))


def _wipe(buf: bytearray) -> None:
    for i in range(len(buf)):
        buf[i] = 0


class SecretsExtension:
    def __init__(self, runtime: EnclaveRuntime) -> None:
        self.runtime = runtime
        self.secrets: dict[str, bytes] = {}
        self._ciphers: dict[str, tuple[AESGCM, int]] = {}
        self._lock = asyncio.Lock()
        runtime.state["secrets"] = self.secrets
        runtime.state["seal"] = self.seal
        runtime.state["unseal"] = self.unseal
        runtime.channel.handlers["deliver_secrets"] = self.op_deliver_secrets
        runtime.channel.handlers["forget_secrets"] = self.op_forget_secrets
        runtime.on_shutdown.append(self.zeroize)

    # -- the broker ----------------------------------------------------------------------------

    def pinned_broker(self) -> str | None:
        """The broker key this enclave was measured with (see the module docstring): a key, the
        explicit ``unsafe-unpinned``, or None."""
        value = self.runtime.measured.get("broker_key")
        if value is None and _hardware_image(self.runtime.device):
            value = os.environ.get(BROKER_KEY_ENV) or None
        return value if isinstance(value, str) else None

    def _sender(self, named: object, what: str) -> tuple[x25519.X25519PublicKey, bool]:
        """The broker key to open ``what`` with, and whether it is pinned."""
        pinned = self.pinned_broker()
        if pinned is None:
            raise EnclaveError(
                f"{what}: this enclave was measured without a key broker to accept secrets from, so "
                "its host could plant values; launch it through the service (which measures the "
                f"broker's key into it) or build its image with {BROKER_KEY_ENV} set to the "
                "broker_key of GET /v1/keys"
            )
        if pinned == UNSAFE_UNPINNED:
            if not isinstance(named, str):
                raise EnclaveError(f"{what}: the host named no broker key")
            value = named
        else:
            if isinstance(named, str) and named != pinned:
                raise EnclaveError(
                    f"{what}: the host says it comes from key broker {named[:64]}, but this enclave was "
                    f"measured to accept only {pinned}; was it launched by another service?"
                )
            value = pinned
        try:
            return public_key_from_b64u(value), pinned != UNSAFE_UNPINNED
        except ValueError as exc:
            raise EnclaveError(f"{what}: the broker key is unusable: {exc}") from None

    # -- secrets ---------------------------------------------------------------------------------

    async def op_deliver_secrets(self, msg: dict[str, Any]) -> dict[str, Any]:
        att, items = msg.get("attestation_id"), msg.get("secrets")
        if not isinstance(att, str) or not isinstance(items, list):
            raise EnclaveError("deliver_secrets needs attestation_id and a list of sealed secrets")
        if att != self.runtime.attestation_id:
            raise EnclaveError(
                f"the secrets were sealed against attestation {att}, but this enclave's current "
                f"attestation is {self.runtime.attestation_id}; release them again"
            )
        private = self.runtime.keys.hpke
        sender, pinned = self._sender(msg.get("broker_key"), "deliver_secrets")
        opened: dict[str, bytes] = {}
        for item in items:
            if not isinstance(item, dict):
                raise EnclaveError("deliver_secrets: each secret is a map")
            name, revision, sealed = item.get("name"), item.get("revision"), item.get("sealed")
            if not isinstance(name, str) or not isinstance(revision, int) or not isinstance(sealed, bytes):
                raise EnclaveError("deliver_secrets: each secret needs name, revision and sealed bytes")
            try:
                opened[name] = open_sealed(private, sealed, secret_info(att, name, revision), sender)
            except (InvalidTag, ValueError):
                raise EnclaveError(
                    f"secret {name!r} does not open with this enclave's key: not sealed to this enclave "
                    "by its key broker, for another name or revision, or corrupted in transit"
                ) from None
        self.secrets.update(opened)
        return {
            "received": [{"name": n, "size": len(v)} for n, v in opened.items()],
            "broker": "pinned" if pinned else UNSAFE_UNPINNED,
        }

    async def op_forget_secrets(self, msg: dict[str, Any]) -> dict[str, Any]:
        names = msg.get("names")
        if not isinstance(names, list):
            raise EnclaveError("forget_secrets needs a list of names")
        dropped = [n for n in names if isinstance(n, str) and self.secrets.pop(n, None) is not None]
        return {"forgotten": dropped}

    # -- sealing ---------------------------------------------------------------------------------

    def _backend(self, bind: str) -> str:
        device = self.runtime.device
        if bind not in ("measurement", "signer"):
            raise EnclaveError(f"seal: bind must be 'measurement' or 'signer', not {bind!r}")
        if isinstance(device, GramineAttestationDevice):
            return "sgx-mrsigner" if bind == "signer" else "sgx-mrenclave"
        if bind == "signer":
            raise EnclaveError("sealing to the signer needs SGX; this enclave seals to its measurement only")
        if isinstance(device, HostQuotingDevice):
            return "simulation"
        from r3e_tee.runtime.nsm import NsmAttestationDevice

        if isinstance(device, NsmAttestationDevice):
            return "nitro-broker"
        raise EnclaveError(f"no sealing key source for attestation device {type(device).__name__}")

    async def _cipher(self, backend: str) -> tuple[AESGCM, int]:
        async with self._lock:
            hit = self._ciphers.get(backend)
            if hit is not None:
                return hit
            if backend.startswith("sgx-"):
                device = self.runtime.device
                assert isinstance(device, GramineAttestationDevice)
                name = "_sgx_mrsigner" if backend == "sgx-mrsigner" else "_sgx_mrenclave"
                raw = await asyncio.to_thread(_read_sgx_key, device.root / "keys" / name)
                version = 0
            elif backend == "simulation":
                reply = await self.runtime.channel.request("sim_seal_key", timeout=30)
                key = reply.get("key")
                if not isinstance(key, bytes) or len(key) != 32:
                    raise EnclaveError("the host returned no simulated sealing key")
                raw, version = bytearray(key), 0
            else:
                raw, version = await self._broker_key()
            try:
                entry = (_stretch(raw, backend), version)
            finally:
                _wipe(raw)
            self._ciphers[backend] = entry
            return entry

    async def _broker_key(self) -> tuple[bytearray, int]:
        """Nitro: the broker's key for this enclave's PCRs, HPKE-sealed to this enclave."""
        if self.runtime.attestation_id is None:
            raise EnclaveError("sealing needs an attested enclave (no attestation token yet)")
        reply = await self.runtime.channel.request("broker_seal_key", timeout=30)
        att, owner, version, sealed = (reply.get(k) for k in ("attestation_id", "owner", "version", "sealed"))
        sender, _ = self._sender(reply.get("broker_key"), "the sealing key")
        if not (isinstance(att, str) and isinstance(owner, str) and isinstance(version, int)):
            raise EnclaveError("the host returned no sealing key")
        if not isinstance(sealed, bytes):
            raise EnclaveError("the host returned no sealing key")
        try:
            raw = open_sealed(self.runtime.keys.hpke, sealed, seal_key_info(att, owner, version), sender)
        except (InvalidTag, ValueError):
            raise EnclaveError(
                "the sealing key does not open with this enclave's key as one from its key broker"
            ) from None
        return bytearray(raw), version

    async def seal(self, data: bytes, *, bind: str = "measurement") -> bytes:
        if not isinstance(data, bytes | bytearray) or len(data) > MAX_SEAL_BYTES:
            raise EnclaveError(f"seal takes up to {MAX_SEAL_BYTES} bytes")
        backend = self._backend(bind)
        cipher, version = await self._cipher(backend)
        header = _HEADER.pack(MAGIC, 1, _BACKEND_IDS[backend], version)
        nonce = os.urandom(_NONCE)
        return header + nonce + cipher.encrypt(nonce, bytes(data), header)

    async def unseal(self, blob: bytes) -> bytes:
        if not isinstance(blob, bytes | bytearray) or len(blob) < _HEADER.size + _NONCE + 16:
            raise EnclaveError("unseal: not sealed data (too short)")
        blob = bytes(blob)
        magic, fmt, backend_id, version = _HEADER.unpack_from(blob)
        if magic != MAGIC or fmt != 1 or backend_id not in BACKENDS:
            raise EnclaveError("unseal: not sealed data of this runtime")
        backend = BACKENDS[backend_id]
        mine = self._backend("signer" if backend == "sgx-mrsigner" else "measurement")
        if backend != mine:
            raise EnclaveError(f"unseal: sealed with {backend} keys; this enclave seals with {mine}")
        cipher, current = await self._cipher(backend)
        if version != current:
            raise EnclaveError(f"unseal: sealed with key version {version}; this enclave has {current}")
        header = blob[: _HEADER.size]
        nonce = blob[_HEADER.size : _HEADER.size + _NONCE]
        try:
            return cipher.decrypt(nonce, blob[_HEADER.size + _NONCE :], header)
        except InvalidTag:
            raise EnclaveError(
                "unseal: the data does not open: sealed by an enclave with another identity, or corrupted"
            ) from None

    def zeroize(self) -> None:
        self.secrets.clear()
        self._ciphers.clear()


def _read_sgx_key(path: Path) -> bytearray:
    try:
        with open(path, "rb") as f:
            raw = bytearray(f.read(64))
    except OSError as exc:
        raise EnclaveError(
            f"cannot read the SGX sealing key {path}: {exc.strerror}; is this a Gramine-SGX enclave?"
        ) from None
    if len(raw) != 16:
        n = len(raw)
        _wipe(raw)
        raise EnclaveError(f"the SGX sealing key {path} is {n} bytes, expected 16")
    return raw


def install(runtime: EnclaveRuntime) -> None:
    runtime.state["_secrets_extension"] = SecretsExtension(runtime)
