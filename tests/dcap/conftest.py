"""Fixtures of the DCAP tests: the shared vectors' DCAP cases and builder-made platforms."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper module dcap_vectors next to this file

from dcap_vectors import NOW, Case, load_cases

from r3e_tee.evidence.dcap_builder import DcapPlatform, build_test_platform
from r3e_tee.evidence.dcap_collateral import QuoteCollateral


@pytest.fixture(scope="session")
def dcap_cases(vectors_dir: Path) -> list[Case]:
    return load_cases(vectors_dir)


@pytest.fixture(scope="session")
def valid_cases(dcap_cases: list[Case]) -> list[Case]:
    return [c for c in dcap_cases if c.raw["expect"] == "valid" and not c.raw.get("mutate")]


@pytest.fixture(scope="session")
def sgx_platform() -> tuple[DcapPlatform, QuoteCollateral]:
    return build_test_platform(tee="sgx", now=NOW)


@pytest.fixture(scope="session")
def tdx_platform() -> tuple[DcapPlatform, QuoteCollateral]:
    return build_test_platform(tee="tdx", now=NOW)
