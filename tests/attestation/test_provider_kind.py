"""An enclave's evidence must be of a kind its provider's enclaves produce.

The SGX and Nitro providers share one verifier (it holds both vendors' pinned roots), so the
provider named with the evidence, not the evidence, must decide what kind is acceptable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from r3e_tee.attestation.binding import nitro_public_key_field, report_data_for
from r3e_tee.attestation.nonces import NonceStore
from r3e_tee.attestation.pinned_roots_nitro_ias import TrustAnchor
from r3e_tee.attestation.policy import Policy
from r3e_tee.attestation.result import EvidenceKind
from r3e_tee.attestation.service import AttestationService
from r3e_tee.attestation.tokens import TokenIssuer
from r3e_tee.attestation.verify import Verifier
from r3e_tee.errors import Reason, VerificationError
from r3e_tee.providers.sim_authority import SimulationAuthority
from r3e_tee.store import open_store


@pytest.fixture
def world(tmp_path: Path) -> tuple[AttestationService, SimulationAuthority]:
    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    store.migrate()
    authority = SimulationAuthority.load_or_create(tmp_path / "sim")
    verifier = Verifier(
        trust_roots={
            EvidenceKind.SGX_DCAP: TrustAnchor.load(authority.dcap_root, simulated=True, name="sim"),
            EvidenceKind.NITRO: TrustAnchor.load(authority.nitro_root, simulated=True, name="sim"),
        },
        collateral_provider=lambda _kind, _evidence: authority.dcap_collateral(),
    )
    issuer = TokenIssuer(
        {p: ec.generate_private_key(ec.SECP256R1()) for p in ("sgx", "nitro")}, issuer="t", ttl=60
    )
    service = AttestationService(
        store,
        issuer,
        NonceStore(store, ttl=60),
        policy=Policy(allow_simulation=True),
        verifiers={"sgx": verifier, "nitro": verifier},
    )
    return service, authority


def _keys() -> dict[str, bytes]:
    x = x25519.X25519PrivateKey.generate().public_key()
    p = ec.generate_private_key(ec.SECP256R1()).public_key()
    return {
        "x25519": x.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        "p256": p.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint),
    }


def _evidence(authority: SimulationAuthority, kind: str, nonce: str, keys: dict[str, bytes]) -> bytes:
    rd = report_data_for(bytes.fromhex(nonce), keys["x25519"], keys["p256"])
    if kind == "sgx":
        return authority.sgx_quote(mrenclave=b"\x11" * 32, report_data=rd, debug=False)
    return authority.nitro_document(
        pcr0=hashlib.sha384(b"image").digest(),
        code_digest=b"\x22" * 32,
        debug=False,
        user_data=rd,
        nonce=bytes.fromhex(nonce),
        public_key=nitro_public_key_field(keys["x25519"], keys["p256"]),
        module_id="i-test-enc0",
    )


@pytest.mark.parametrize("made_by", ["sgx", "nitro"])
def test_evidence_passes_only_as_an_enclave_of_the_provider_that_makes_it(
    world: tuple[AttestationService, SimulationAuthority], made_by: str
) -> None:
    service, authority = world
    other = "nitro" if made_by == "sgx" else "sgx"
    keys = _keys()
    nonce, _ = service.new_nonce()
    outcome = service.verify(
        evidence=_evidence(authority, made_by, nonce, keys), nonce=nonce, public_keys=keys, provider=made_by
    )
    assert outcome.result.kind == (EvidenceKind.SGX_DCAP if made_by == "sgx" else EvidenceKind.NITRO)

    nonce, _ = service.new_nonce()
    with pytest.raises(VerificationError) as err:
        service.verify(
            evidence=_evidence(authority, made_by, nonce, keys), nonce=nonce, public_keys=keys, provider=other
        )
    assert err.value.reason == Reason.KIND_NOT_ALLOWED
    assert f"provider {other!r}" in err.value.message
