"""Fixtures of the hardware-provider tests: fake tools on a PATH, fake host trees, test PKIs."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).parent))  # the helper module hw_fakes next to this file

from hw_fakes import FakeQuotingEnclave, install_fakes, make_sgx_root, write_pki

from r3e_tee.evidence.dcap_builder import DcapPlatform, build_test_platform
from r3e_tee.evidence.dcap_collateral import QuoteCollateral
from r3e_tee.evidence.nitro import NitroPki, build_nitro_pki
from r3e_tee.providers.sgx import generate_dev_signing_key


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for UNIX sockets (sun_path holds 108 bytes; tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="r3e-hw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def fake_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_fakes(tmp_path_factory.mktemp("fake-bin"))


@pytest.fixture
def call_log(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


@pytest.fixture
def fake_env(fake_bin: Path, call_log: Path) -> dict[str, str]:
    """The environment the providers hand to the fake tools."""
    return {
        **os.environ,
        "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_CALL_LOG": str(call_log),
    }


# --- SGX --------------------------------------------------------------------------------------


@pytest.fixture
def sgx_root(tmp_path: Path) -> Path:
    return make_sgx_root(tmp_path / "host")


@pytest.fixture(scope="session")
def enclave_signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, rsa.RSAPrivateKey]:
    path = tmp_path_factory.mktemp("sgx-key") / "enclave-signing-key.pem"
    return path, generate_dev_signing_key(path)


@pytest.fixture(scope="session")
def dcap_platform() -> tuple[DcapPlatform, QuoteCollateral]:
    return build_test_platform()


@pytest.fixture
def fake_qe(
    short_dir: Path, dcap_platform: tuple[DcapPlatform, QuoteCollateral]
) -> Iterator[FakeQuotingEnclave]:
    with FakeQuotingEnclave(dcap_platform[0], short_dir / "qe.sock") as qe:
        yield qe


@pytest.fixture
def sgx_env(fake_env: dict[str, str], fake_qe: FakeQuotingEnclave) -> dict[str, str]:
    return {**fake_env, "FAKE_QE_SOCKET": str(fake_qe.socket_path)}


# --- Nitro ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nitro_pki() -> NitroPki:
    now = datetime.now(UTC)
    return build_nitro_pki(
        not_before=now - timedelta(days=1), not_after=now + timedelta(days=30), root_name="Test Nitro Root"
    )


@pytest.fixture
def nitro_pki_dir(tmp_path: Path, nitro_pki: NitroPki) -> Path:
    return write_pki(nitro_pki, tmp_path / "nitro-pki")
