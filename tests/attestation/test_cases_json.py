"""Every case of the shared cases.json through the public dispatcher ``verify_evidence``.

Checks the verdict, the reason class (or an accepted alternative), the TCB status, the
advisories (as a set) and the claims (exactly). For invalid cases whose claims are given, the
parser's unverified view (``inspect_evidence``) must show those claims.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from r3e_tee.attestation.policy import Policy
from r3e_tee.attestation.verify import Verifier, inspect_evidence
from r3e_tee.errors import EvidenceFormatError, VerificationError

pytestmark = pytest.mark.vectors

_VERIFIER = Verifier()  # shared, as the service does: caches must not change any verdict


def test_case(case: dict[str, Any] | None, vectors_dir: Path, vec: Any) -> None:
    assert case is not None
    data = vec.evidence(case, vectors_dir)
    policy = Policy.from_dict(case.get("policy") or {})
    kwargs = dict(
        collateral=vec.collateral(case, vectors_dir),
        trust_root=vectors_dir / case["trust_root"],
        at=vec.at(case),
        policy=policy,
    )
    if case["expect"] == "valid":
        result = _VERIFIER.verify(data, **kwargs)
        assert result.kind.value == case["kind"]
        assert dict(result.claims) == case["claims"]
        if "expect_tcb_status" in case:
            assert result.tcb_status == case["expect_tcb_status"]
        if "expect_advisories" in case:
            assert set(result.advisories) == set(case["expect_advisories"])
        # the JSON form is stable and JSON-native
        assert result.to_json()["claims"] == case["claims"]
        return

    allowed = {case["expect_reason"], *case.get("expect_reason_alternatives", [])}
    with pytest.raises((VerificationError, EvidenceFormatError)) as info:
        _VERIFIER.verify(data, **kwargs)
    exc = info.value
    reason = exc.reason.value if isinstance(exc, VerificationError) else "malformed"
    assert reason in allowed, f"{case['id']}: got {reason} ({exc}), expected one of {sorted(allowed)}"
    if isinstance(exc, VerificationError):
        assert exc.check, "every rejection names its check"
    else:
        assert exc.field, "every format error names its field"

    if case.get("claims"):
        seen = inspect_evidence(data)
        assert seen.claims is not None, "the parser must expose claims for parseable evidence"
        assert dict(seen.claims) == case["claims"]
