"""Fixtures of the key-management tests: KEKs (file and SoftHSM2), a broker over a real store and
real signed tokens, and in-process enclave runtimes wired to a host channel."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from r3e_tee.attestation.nonces import NonceStore
from r3e_tee.attestation.policy import Policy
from r3e_tee.attestation.service import AttestationService
from r3e_tee.attestation.tokens import TokenIssuer
from r3e_tee.keys.audit import AuditLog
from r3e_tee.keys.broker import KeyBroker
from r3e_tee.keys.kek import FileKek, create_pkcs11_kek
from r3e_tee.keys.keystore import KeyStore
from r3e_tee.keys.rotation import KeyRotation
from r3e_tee.providers.base import EnclaveHandle, EnclaveSpec
from r3e_tee.providers.simulation import SimulationProvider, measurement_for
from r3e_tee.runtime.channel import Channel
from r3e_tee.runtime.devices import AttestationDevice, HostQuotingDevice
from r3e_tee.store import Store

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
HSM_TOKEN = "r3e-test"
HSM_PIN = "4321"
HSM_SO_PIN = "87654321"
HSM_KEYS = ("kek-a", "kek-b", "kek-service")
SECRET = b"sk_live_R3E-correct-horse-battery-staple-7Q9"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- SoftHSM2 -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoftHsm:
    conf: Path
    module: Path
    token: str
    pin: str


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    """A SoftHSM2 token with three AES-256 KEKs, in a private SOFTHSM2_CONF directory.

    SoftHSM reads its configuration once per process (at C_Initialize), so one directory serves
    the whole session; the variable is set before python-pkcs11 first loads the module.
    """
    util = shutil.which("softhsm2-util")
    if util is None or not SOFTHSM_MODULE.exists():
        reason = "SoftHSM2 is not installed (softhsm2-util / libsofthsm2.so; Debian package softhsm2)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PKCS#11 tests: {reason}")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [util, "--init-token", "--free", "--label", HSM_TOKEN, "--pin", HSM_PIN, "--so-pin", HSM_SO_PIN],
        check=True,
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )
    for label in HSM_KEYS:
        create_pkcs11_kek(SOFTHSM_MODULE, HSM_TOKEN, label, HSM_PIN)
    _create_leaky_keys()
    return SoftHsm(conf, SOFTHSM_MODULE, HSM_TOKEN, HSM_PIN)


HSM_LEAKY_KEYS = {"kek-readable": (False, False), "kek-extractable": (True, True)}  # (sensitive, extractable)


def _create_leaky_keys() -> None:
    """AES-256 keys that can leave the token (value readable, or wrappable out), to be refused."""
    import pkcs11

    from r3e_tee.keys.kek import _open_session

    session = _open_session(SOFTHSM_MODULE, HSM_TOKEN, HSM_PIN, rw=True)
    try:
        for label, (sensitive, extractable) in HSM_LEAKY_KEYS.items():
            session.generate_key(
                pkcs11.KeyType.AES,
                256,
                label=label,
                store=True,
                template={
                    pkcs11.Attribute.SENSITIVE: sensitive,
                    pkcs11.Attribute.EXTRACTABLE: extractable,
                    pkcs11.Attribute.ENCRYPT: True,
                    pkcs11.Attribute.DECRYPT: True,
                },
            )
    finally:
        session.close()


# --- file KEK ------------------------------------------------------------------------------------------


def write_kek(path: Path) -> Path:
    """What `openssl rand -out kek.key 32` makes: 32 raw random bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


@pytest.fixture
def kek_file(tmp_path: Path) -> Path:
    return write_kek(tmp_path / "kek" / "kek.key")


# --- a broker over a real store, with tokens signed by a real issuer ------------------------------------


@dataclass
class Attested:
    token: str
    attestation_id: str
    enclave_id: str
    private_key: x25519.X25519PrivateKey
    claims: dict[str, Any]


@dataclass
class Keys:
    store: Store
    kek: FileKek
    audit: AuditLog
    keystore: KeyStore
    issuer: TokenIssuer
    attestation: AttestationService
    broker: KeyBroker
    rotation: KeyRotation
    attested: list[Attested] = field(default_factory=list)

    def attest(
        self,
        *,
        measurement: str = "ab" * 32,
        mrsigner: str = "cd" * 32,
        debug: bool = False,
        simulated: bool = True,
        provider: str = "simulation",
        kind: str = "sgx-dcap",
        pcrs: dict[str, str] | None = None,
        enclave_id: str | None = None,
        private_key: x25519.X25519PrivateKey | None = None,
    ) -> Attested:
        """An attestation on record and its token, as AttestationService.verify makes them."""
        key = private_key or x25519.X25519PrivateKey.generate()
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        p256 = (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        )
        att_id, enclave_id = uuid.uuid4().hex, enclave_id or uuid.uuid4().hex
        tee: dict[str, Any]
        if kind == "nitro":
            tee = {"pcrs": pcrs or {str(i): (f"{i:02x}") * 48 for i in range(16)}, "module_id": "i-test"}
        else:
            tee = {"mrenclave": measurement, "mrsigner": mrsigner, "isv_prod_id": 0, "isv_svn": 1}
        claims = {
            "provider": provider,
            "evidence_kind": kind,
            "measurement": measurement,
            "tcb_status": "UpToDate",
            "advisories": [],
            "debug": debug,
            "simulated": simulated,
            "report_data": "00" * 64,
            "nonce": "11" * 32,
            "cnf": {"x25519": b64u(pub), "p256": b64u(p256)},
            "tee": tee,
        }
        issued = self.issuer.issue(provider, claims, subject=enclave_id, jti=att_id)
        self.store.execute(
            "INSERT INTO attestations (id, enclave_id, provider, kind, verdict, evidence, evidence_sha256, "
            "token_kid, token_expires_at, created_at) VALUES (?, ?, ?, ?, 'valid', ?, ?, ?, ?, ?)",
            (att_id, enclave_id, provider, kind, b"e", hashlib.sha256(b"e").hexdigest(), issued.kid,
             float(issued.expires_at), time.time()),
        )  # fmt: skip
        out = Attested(issued.token, att_id, enclave_id, key, claims)
        self.attested.append(out)
        return out


def make_keys(store: Store, kek_path: Path, *, ttl: float = 300, retain: int = 2) -> Keys:
    kek = FileKek.load(kek_path)
    audit = AuditLog(store)
    keystore = KeyStore(store, kek, audit)
    keystore.check_kek(actor="test")
    issuer = TokenIssuer(
        {p: ec.generate_private_key(ec.SECP256R1()) for p in ("simulation", "sgx", "nitro")},
        issuer="r3e-test",
        ttl=ttl,
    )
    attestation = AttestationService(
        store, issuer, NonceStore(store, ttl=60), policy=Policy(allow_simulation=True), verifiers={}
    )
    broker = KeyBroker(store, keystore, audit, attestation)
    rotation = KeyRotation(
        store,
        keystore,
        broker,
        audit,
        issuer,
        providers=["simulation", "sgx", "nitro"],
        retain_versions=retain,
        rotation_period=3600,
    )
    broker.refresh_keys = rotation.sync_signing_keys
    rotation.initialize()
    return Keys(store, kek, audit, keystore, issuer, attestation, broker, rotation)


@pytest.fixture
def keys(store: Store, kek_file: Path) -> Iterator[Keys]:
    k = make_keys(store, kek_file)
    try:
        yield k
    finally:
        k.keystore.close()


# --- in-process enclaves ---------------------------------------------------------------------------------


async def channel_pair(
    host_handlers: dict[str, Any] | None = None,
) -> tuple[Channel, Channel]:
    """(host side, enclave side) over a socketpair, both reading."""
    a, b = socket.socketpair()
    hr, hw = await asyncio.open_connection(sock=a)
    er, ew = await asyncio.open_connection(sock=b)
    host = Channel(hr, hw, host_handlers or {}, name="host")
    enclave = Channel(er, ew, name="enclave")
    host.start()
    enclave.start()
    return host, enclave


class InProcessSimulation(SimulationProvider):
    """The simulation provider with each enclave runtime in this process (so a test can look at
    what the runtime holds) instead of a forked sandbox; evidence, roots and the host's
    sim_quote / sim_seal_key handlers are the provider's own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runtimes: dict[str, Any] = {}

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        for runtime in list(self.runtimes.values()):
            await runtime.channel.aclose()

    async def create(self, spec: EnclaveSpec) -> EnclaveHandle:
        from r3e_tee.runtime.enclave import EnclaveRuntime

        mrenclave, pcr0 = measurement_for(self.code_digest, spec)
        host, enclave = await channel_pair(self.host_handlers(spec))
        device: AttestationDevice = HostQuotingDevice(enclave)
        self.runtimes[spec.id] = EnclaveRuntime(enclave, device, spec.payload)
        measurement = (pcr0 if spec.evidence_format == "nitro" else mrenclave).hex()
        return EnclaveHandle(spec=spec, provider=self.name, pid=None, channel=host, measurement=measurement)

    async def destroy(self, handle: EnclaveHandle) -> None:
        if handle.channel.is_open:
            try:
                await handle.channel.request("shutdown", timeout=2)
            except Exception:  # noqa: BLE001 - already gone
                pass
        await handle.channel.aclose()
        runtime = self.runtimes.get(handle.spec.id)
        if runtime is not None:
            await runtime.channel.aclose()
        handle.exited.set()
