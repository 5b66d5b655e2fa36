"""Development key files made on first start (the simulation authority, the dev SGX signing key):
processes starting at once on one data directory end up with one key, the one on disk."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from r3e_tee.providers.sgx import generate_dev_signing_key, load_signing_key
from r3e_tee.providers.sim_authority import SimulationAuthority


def _at_once(n: int, make: Callable[[], Any]) -> list[Any]:
    barrier = threading.Barrier(n)
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            out.append(make())
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


def test_processes_creating_the_simulation_authority_at_once_share_the_one_on_disk(tmp_path: Path) -> None:
    """Each process that generated its own authority and then lost the file race would seal
    with a CPU secret that no later start has: what its simulated enclaves sealed is lost."""
    directory = tmp_path / "sim"
    authorities = _at_once(4, lambda: SimulationAuthority.load_or_create(directory))
    on_disk = SimulationAuthority.load_or_create(directory)
    assert {a.cpu_secret for a in authorities} == {on_disk.cpu_secret}
    assert [p.name for p in directory.iterdir()] == ["authority.json"]


def test_processes_generating_the_dev_signing_key_at_once_share_the_one_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "sgx" / "dev-enclave-signing-key.pem"

    def public(key: Any) -> bytes:
        return bytes(
            key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    keys = _at_once(3, lambda: generate_dev_signing_key(path))
    assert {public(k) for k in keys} == {public(load_signing_key(path))}
    assert path.stat().st_mode & 0o777 == 0o600
