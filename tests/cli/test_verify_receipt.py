"""``verify-receipt --evidence`` offline: the raw evidence, checked against the hardware roots,
must be the enclave the receipt and its token describe, so a token that misstates what the
enclave runs does not pass."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from r3e_tee.attestation.binding import report_data_for
from r3e_tee.attestation.tokens import TokenIssuer
from r3e_tee.cli.main import main
from r3e_tee.providers.sim_authority import SimulationAuthority
from r3e_tee.runtime.functions import ReceiptSigner
from r3e_tee.runtime.keys import EnclaveKeys


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> SimulationAuthority:
    return SimulationAuthority.load_or_create(tmp_path_factory.mktemp("sim"))


def _receipt_files(tmp: Path, authority: SimulationAuthority, *, claimed: bytes, runs: bytes) -> list[str]:
    """A receipt of an enclave whose quote measures ``runs``, whose token (and so receipt) says
    ``claimed``; with the JWKS, the stored attestation report and the simulated root, as files."""
    keys = EnclaveKeys()
    nonce = os.urandom(32)
    quote = authority.sgx_quote(
        mrenclave=runs, report_data=report_data_for(nonce, keys.x25519_public, keys.p256_public), debug=False
    )
    issuer = TokenIssuer({"default": ec.generate_private_key(ec.SECP256R1())}, issuer="r3e-test", ttl=300)
    token = issuer.issue(
        "simulation",
        {
            "provider": "simulation",
            "evidence_kind": "sgx-dcap",
            "measurement": claimed.hex(),
            "tcb_status": "UpToDate",
            "advisories": [],
            "debug": False,
            "simulated": True,
            "nonce": nonce.hex(),
            "cnf": {"x25519": _b64u(keys.x25519_public), "p256": _b64u(keys.p256_public)},
            "tee": {"mrenclave": claimed.hex()},
        },
        subject="e" * 32,
    )
    spec = {"enclave_id": "e" * 32, "function": "echo", "measurement": claimed.hex(), "version": 1}
    signer = ReceiptSigner(spec, keys, token.jti, token.token)
    now = round(time.time(), 6)
    body = {
        "v": 1,
        "function": "echo",
        "version": 1,
        "measurement": claimed.hex(),
        "invocation_id": "inv-1",
        "status": "ok",
        "input_sha256": "11" * 32,
        "output_sha256": "22" * 32,
        "error_sha256": None,
        "enclave_id": "e" * 32,
        "enclave_key": signer.enclave_key,
        "attestation": {"id": token.jti, "token": token.token},
        "started_at": now,
        "finished_at": now + 0.01,
    }
    files = {
        "receipt.json": signer.sign(body, keys.sign_digest),
        "jwks.json": json.dumps(issuer.jwks()).encode(),
        "attestation.json": json.dumps(
            {
                "id": token.jti,
                "kind": "sgx-dcap",
                "evidence": base64.b64encode(quote).decode(),
                "collateral": {"bundle": authority.dcap_collateral().to_json()},
            }
        ).encode(),
        "root.pem": authority.dcap_root.public_bytes(serialization.Encoding.PEM),
    }
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    return [
        "verify-receipt",
        str(tmp / "receipt.json"),
        "--jwks",
        str(tmp / "jwks.json"),
        "--evidence",
        "--attestation",
        str(tmp / "attestation.json"),
        "--root",
        str(tmp / "root.pem"),
        "--allow-simulation",
    ]


def test_evidence_must_measure_what_the_token_and_receipt_say(
    tmp_path: Path, authority: SimulationAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    deployed = hashlib.sha256(b"the deployed function").digest()
    (tmp_path / "ok").mkdir()
    assert main(_receipt_files(tmp_path / "ok", authority, claimed=deployed, runs=deployed)) == 0
    out = capsys.readouterr().out
    assert "raw sgx-dcap evidence verifies" in out and "valid receipt" in out
    # the enclave runs other code; the token (and the receipt) claim the deployed measurement
    other = hashlib.sha256(b"code the operator swapped in").digest()
    (tmp_path / "lie").mkdir()
    code = main(_receipt_files(tmp_path / "lie", authority, claimed=deployed, runs=other))
    captured = capsys.readouterr()
    assert code == 1, captured.out
    err = "".join(captured.err.split())  # the console wraps long lines
    assert "measurementmismatch" in err and other.hex() in err and deployed.hex() in err
    assert "valid receipt" not in captured.out


def test_a_jwks_file_that_is_not_a_jwk_set_is_refused_by_name(
    tmp_path: Path, authority: SimulationAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    same = hashlib.sha256(b"f").digest()
    args = _receipt_files(tmp_path, authority, claimed=same, runs=same)[:4]  # no --evidence
    assert main(args) == 0
    capsys.readouterr()
    for text in ("[1, 2]", '{"keys": [1]}', '"keys"'):
        (tmp_path / "jwks.json").write_text(text)
        code = main(args)
        err = " ".join(capsys.readouterr().err.split())
        assert code in (1, 2) and "JWK" in err and "Traceback" not in err, (text, err)
