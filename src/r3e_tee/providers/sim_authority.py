"""Per-installation simulated hardware roots: the 'Intel' and 'AWS' of the simulation provider.

Generated on first start, persisted (mode 0600) in ``<data-dir>/simulation/authority.json`` so
tokens and sealed data stay valid across restarts. They sign evidence in the real formats; a
verifier trusts them only when told to, and marks what they sign as simulated.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from r3e_tee.errors import ProviderError
from r3e_tee.evidence.nitro import NitroPki, build_nitro_document, build_nitro_pki
from r3e_tee.fsio import create_exclusive

_VALIDITY = timedelta(days=3650)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _load_key(pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC key")
    return key


@dataclass
class SimulationAuthority:
    path: Path
    nitro: NitroPki
    cpu_secret: bytes  # the simulated CPU's sealing secret (never leaves the host side)
    dcap: Any = None  # the simulated DCAP platform (PCK chain, QE, collateral)

    @classmethod
    def load_or_create(cls, directory: Path) -> SimulationAuthority:
        path = directory / "authority.json"
        if path.exists():
            try:
                return cls._load(path)
            except (OSError, ValueError, KeyError) as exc:
                raise ProviderError(
                    f"the simulation authority at {path} is unreadable: {exc}",
                    hint="restore it from a backup, or delete the simulation directory to start afresh "
                    "(tokens and sealed data of simulated enclaves become invalid)",
                ) from None
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        now = datetime.now(UTC) - timedelta(minutes=5)
        authority = cls(
            path=path,
            nitro=build_nitro_pki(
                not_before=now, not_after=now + _VALIDITY, root_name="R3E Simulated Nitro Root"
            ),
            cpu_secret=secrets.token_bytes(32),
        )
        authority._init_dcap(now)
        if not authority._save():
            return cls._load(path)  # another process created it first: its authority is the one
        return authority

    @classmethod
    def _load(cls, path: Path) -> SimulationAuthority:
        data = json.loads(path.read_text())
        n = data["nitro"]
        nitro = NitroPki(
            root=x509.load_pem_x509_certificate(n["root"].encode()),
            root_key=_load_key(n["root_key"]),
            intermediates=tuple(x509.load_pem_x509_certificate(c.encode()) for c in n["intermediates"]),
            leaf=x509.load_pem_x509_certificate(n["leaf"].encode()),
            leaf_key=_load_key(n["leaf_key"]),
        )
        authority = cls(path=path, nitro=nitro, cpu_secret=bytes.fromhex(data["cpu_secret"]))
        authority._load_dcap(data.get("dcap"))
        return authority

    def _save(self) -> bool:
        """Create the authority file, whole and durably, unless it exists (returns False then).

        It holds the simulated CPU's sealing secret: a torn, vanished or replaced file would make
        what simulated enclaves sealed unreadable.
        """
        data = {
            "version": 1,
            "created_at": time.time(),
            "cpu_secret": self.cpu_secret.hex(),
            "nitro": {
                "root": _pem_cert(self.nitro.root),
                "root_key": _pem_key(self.nitro.root_key),
                "intermediates": [_pem_cert(c) for c in self.nitro.intermediates],
                "leaf": _pem_cert(self.nitro.leaf),
                "leaf_key": _pem_key(self.nitro.leaf_key),
            },
            "dcap": self._dump_dcap(),
        }
        return create_exclusive(self.path, json.dumps(data).encode())

    # -- Nitro ------------------------------------------------------------------------------------

    @property
    def nitro_root(self) -> x509.Certificate:
        return self.nitro.root

    def nitro_document(
        self,
        *,
        pcr0: bytes,
        code_digest: bytes,
        debug: bool,
        user_data: bytes | None,
        nonce: bytes | None,
        public_key: bytes | None,
        module_id: str,
    ) -> bytes:
        """A Nitro document; debug mode zeroes PCR0-2 as the real NSM does."""
        zero = bytes(48)
        pcrs = {i: zero for i in range(16)}
        if not debug:
            pcrs[0] = pcr0
            pcrs[1] = hashlib.sha384(b"r3e-sim-kernel").digest()
            pcrs[2] = hashlib.sha384(b"r3e-sim-app\0" + code_digest).digest()
        return build_nitro_document(
            signing_key=self.nitro.leaf_key,
            certificate=self.nitro.certificate,
            cabundle=self.nitro.cabundle,
            pcrs=pcrs,
            timestamp=int(time.time() * 1000),
            module_id=module_id,
            user_data=user_data,
            nonce=nonce,
            public_key=public_key,
        )

    # -- DCAP -------------------------------------------------------------------------------------

    _dcap_lock = threading.Lock()

    def _init_dcap(self, now: datetime) -> None:
        from r3e_tee.providers.sim_dcap import SimulatedDcapPlatform

        self.dcap = SimulatedDcapPlatform.create(now)

    def _load_dcap(self, data: Any) -> None:
        from r3e_tee.providers.sim_dcap import SimulatedDcapPlatform

        self.dcap = SimulatedDcapPlatform.from_dict(data)

    def _dump_dcap(self) -> Any:
        return self.dcap.to_dict() if self.dcap is not None else None

    @property
    def dcap_root(self) -> x509.Certificate:
        root: x509.Certificate = self.dcap.root_cert
        return root

    def dcap_collateral(self) -> Any:
        """Collateral for simulated quotes, re-signed with fresh windows when near expiry."""
        with self._dcap_lock:
            return self.dcap.collateral()

    def sgx_quote(self, *, mrenclave: bytes, report_data: bytes, debug: bool) -> bytes:
        quote: bytes = self.dcap.quote(mrenclave=mrenclave, report_data=report_data, debug=debug)
        return quote
