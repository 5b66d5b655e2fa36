"""Fixtures for the Nitro / IAS / SEV-SNP / policy / dispatcher tests.

Builder-made evidence lives under local test roots created once per session; the shared
real-hardware vectors are read through ``vectors_dir`` (skips when absent), never copied.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from r3e_tee.evidence.encoding import decode_evidence
from r3e_tee.evidence.ias import IasPki, build_ias_pki
from r3e_tee.evidence.nitro import NitroPki, build_nitro_pki
from r3e_tee.evidence.snp import SnpPki, build_snp_pki

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
_VECTORS = Path(
    os.environ.get("R3E_TEE_VECTORS") or Path(__file__).resolve().parents[2].parent / "shared" / "vectors"
)
MY_KINDS = ("nitro", "sgx-ias", "sev-snp")


def _load_cases() -> list[dict[str, Any]]:
    path = _VECTORS / "cases.json"
    if not path.is_file():
        return []
    return list(json.loads(path.read_text())["cases"])


CASES = _load_cases()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``case`` parametrizes over every entry of cases.json (one skipped placeholder if absent)."""
    if "case" in metafunc.fixturenames:
        if CASES:
            metafunc.parametrize("case", CASES, ids=[c["id"] for c in CASES])
        else:
            metafunc.parametrize("case", [None], ids=["no-vectors"])
    for name, kind in (("nitro_case", "nitro"), ("ias_case", "sgx-ias"), ("snp_case", "sev-snp")):
        if name not in metafunc.fixturenames:
            continue
        # one entry per distinct valid evidence file of the kind
        seen: dict[str, dict[str, Any]] = {}
        for c in CASES:
            if c["kind"] == kind and c["expect"] == "valid":
                seen.setdefault(c.get("evidence_binary") or c["evidence"], c)
        params: list[dict[str, Any] | None] = list(seen.values()) or [None]
        metafunc.parametrize(name, params, ids=[c["id"] if c else "no-vectors" for c in params])


def case_at(case: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(case["verify_at"].replace("Z", "+00:00"))


def case_evidence(case: dict[str, Any], vectors: Path) -> bytes:
    """The evidence file as stored, with ``mutate`` applied to its decoded binary form."""
    data = (vectors / case["evidence"]).read_bytes()
    if not case.get("mutate"):
        return data
    buf = bytearray(decode_evidence(data).data)
    for m in case["mutate"]:
        if m["op"] == "xor":
            buf[m["offset"]] ^= m["value"]
        elif m["op"] == "truncate":
            del buf[m["length"] :]
        else:
            raise AssertionError(f"unknown mutate op {m['op']}")
    return bytes(buf)


def case_binary(case: dict[str, Any], vectors: Path) -> bytes:
    return decode_evidence(case_evidence(case, vectors)).data


def case_collateral(case: dict[str, Any], vectors: Path) -> Any:
    coll = case.get("collateral")
    if coll is None:
        return None
    if isinstance(coll, str):
        return (vectors / coll).read_bytes()
    return {k: vectors / v for k, v in coll.items()}


@pytest.fixture(scope="session")
def t0() -> datetime:
    return T0


@pytest.fixture(scope="session")
def nitro_pki() -> NitroPki:
    return build_nitro_pki(
        not_before=T0 - timedelta(days=30),
        not_after=T0 + timedelta(days=365),
        leaf_not_before=T0 - timedelta(hours=1),
        leaf_not_after=T0 + timedelta(hours=2),
    )


@pytest.fixture(scope="session")
def ias_pki() -> IasPki:
    return build_ias_pki(
        not_before=T0 - timedelta(days=365),
        not_after=T0 + timedelta(days=3650),
        signing_not_before=T0 - timedelta(days=30),
        signing_not_after=T0 + timedelta(days=30),
    )


@pytest.fixture(scope="session")
def snp_pki() -> SnpPki:
    return build_snp_pki(not_before=T0 - timedelta(days=30), not_after=T0 + timedelta(days=365))


@pytest.fixture(scope="session")
def vec() -> Any:
    """Case helpers (conftest modules are not importable under --import-mode=importlib)."""
    import types

    return types.SimpleNamespace(
        at=case_at, evidence=case_evidence, binary=case_binary, collateral=case_collateral
    )
