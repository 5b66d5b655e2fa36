"""The store-backed collateral cache, on both backends; and the hardware collateral source."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from r3e_tee.config import parse_config
from r3e_tee.service.components import hardware_collateral
from r3e_tee.store.base import Store
from r3e_tee.store.cache import StoreCache


def test_entries_are_shared_namespaced_and_never_served_after_expiry(store: Store) -> None:
    a, b = StoreCache(store, namespace="dcap"), StoreCache(store, namespace="other")
    a.put("fmspc-1", b"bundle", datetime.now(UTC) + timedelta(hours=1))
    assert a.get("fmspc-1") == b"bundle"
    assert StoreCache(store, namespace="dcap").get("fmspc-1") == b"bundle"  # another replica
    assert b.get("fmspc-1") is None
    a.put("fmspc-1", b"newer", datetime.now(UTC) + timedelta(hours=1))
    assert a.get("fmspc-1") == b"newer"
    a.put("short", b"x", datetime.now(UTC) + timedelta(seconds=0.2))
    time.sleep(0.3)
    assert a.get("short") is None


def test_offline_bundle_is_the_hardware_collateral_when_configured(vectors_dir: Path) -> None:
    bundle = vectors_dir / "sgx-dcap" / "phala-dcap-qvl" / "sgx_quote_collateral.json"
    cfg = parse_config(f"attestation:\n  collateral:\n    offline_bundle: {bundle}\n", env={})
    source = hardware_collateral(cfg, None)
    quote = (vectors_dir / "sgx-dcap" / "phala-dcap-qvl" / "sgx_quote").read_bytes()
    collateral = source(None, quote)
    assert '"fmspc":"00A067110000"' in collateral.tcb_info
    from r3e_tee.attestation.verify import Verifier

    result = Verifier(collateral_provider=source).verify(quote, at=datetime(2025, 7, 1, tzinfo=UTC))
    assert result.tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_offline_pcs_fails_fast_with_the_url() -> None:
    import pytest

    from r3e_tee.errors import CollateralError

    cfg = parse_config(
        "attestation:\n  collateral:\n    pccs_url: http://127.0.0.1:1\n    timeout: 1s\n", env={}
    )
    source = hardware_collateral(cfg, None)
    start = time.monotonic()
    with pytest.raises(CollateralError, match="127.0.0.1:1"):
        from r3e_tee.evidence.dcap_builder import build_sgx_quote, build_test_platform

        platform, _ = build_test_platform()
        source(None, build_sgx_quote(platform))
    assert time.monotonic() - start < 5
