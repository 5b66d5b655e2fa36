"""``verify-evidence`` through typer's CliRunner on an app of our own (register() is the contract
with ``r3e_tee.cli.main``): exit 0 accepted, 1 rejected, 2 unusable; table and JSON output."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import typer
from cryptography.hazmat.primitives.serialization import Encoding
from typer.testing import CliRunner

from r3e_tee.cli.verify_evidence import register
from r3e_tee.evidence.nitro import NitroPki

PCRS = {0: b"\x01" * 48, 1: b"\x02" * 48, 2: b"\x03" * 48, 8: b"\x04" * 48}


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test CLI"""

    register(app)
    return app


@pytest.fixture
def files(tmp_path: Path, nitro_pki: NitroPki, t0: datetime) -> dict[str, Path]:
    paths = {
        "doc": tmp_path / "doc.cose",
        "debug": tmp_path / "debug.b64",
        "root": tmp_path / "root.pem",
        "policy": tmp_path / "policy.yaml",
        "garbage": tmp_path / "garbage.bin",
    }
    paths["doc"].write_bytes(nitro_pki.document(pcrs=PCRS, timestamp=t0, nonce=b"n1"))
    debug = nitro_pki.document(pcrs={0: b"\x00" * 48}, timestamp=t0)
    paths["debug"].write_text(__import__("base64").b64encode(debug).decode())
    paths["root"].write_bytes(nitro_pki.root.public_bytes(Encoding.PEM))
    paths["policy"].write_text(f"expected_pcrs:\n  8: {'04' * 48}\nnonce: {b'n1'.hex()}\n")
    paths["garbage"].write_bytes(b"\x01\x02\x03garbage")
    return paths


def run(app: typer.Typer, *args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["verify-evidence", *map(str, args)])
    return result.exit_code, result.output


def test_accepted_table_and_json(app: typer.Typer, files: dict[str, Path], t0: datetime) -> None:
    at = t0.isoformat().replace("+00:00", "Z")
    code, out = run(app, files["doc"], "--root", files["root"], "--at", at)
    assert code == 0 and "ACCEPTED" in out and "claims.pcrs.8" in out
    code, out = run(
        app, files["doc"], "--root", files["root"], "--at", at, "--policy", files["policy"], "-o", "json"
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["verdict"] == "valid" and doc["kind"] == "nitro" and doc["claims"]["nonce"] == b"n1".hex()
    assert doc["details"]["policy"]["nonce"] == b"n1".hex()
    code, out = run(
        app, files["doc"], "--kind", "nitro", "--root", files["root"], "--at", at, "--pcr", f"0={'01' * 48}"
    )
    assert code == 0


def test_rejected_names_check_observed_expected(
    app: typer.Typer, files: dict[str, Path], t0: datetime
) -> None:
    at = t0.isoformat()
    code, out = run(
        app, files["doc"], "--root", files["root"], "--at", at, "--pcr", f"1={'ff' * 48}", "-o", "json"
    )
    assert code == 1
    doc = json.loads(out)
    assert doc["verdict"] == "invalid" and doc["reason"] == "pcr-mismatch"
    assert (
        doc["check"] == "policy.expected_pcrs.1"
        and doc["observed"] == "02" * 48
        and doc["expected"] == "ff" * 48
    )
    code, out = run(app, files["debug"], "--root", files["root"], "--at", at)
    assert code == 1 and "REJECTED" in out and "debug-enclave" in out
    code, out = run(app, files["debug"], "--root", files["root"], "--at", at, "--allow-debug")
    assert code == 0 and "UNSAFE" in out
    code, out = run(app, files["doc"], "--at", at, "-o", "json")  # pinned AWS root
    assert code == 1 and json.loads(out)["reason"] == "bad-chain"
    code, out = run(app, files["doc"], "--root", files["root"], "--at", "2030-01-01T00:00:00Z", "-o", "json")
    assert code == 1 and json.loads(out)["reason"] == "expired"


@pytest.mark.parametrize(
    "args",
    [
        ("{garbage}",),
        ("{missing}",),
        ("{doc}", "--at", "yesterday"),
        ("{doc}", "--kind", "tpm"),
        ("{doc}", "--pcr", "zero=00"),
        ("{doc}", "--policy", "{garbage}"),
        ("{doc}", "--root", "{garbage}"),
        ("{doc}", "--kind", "ias"),
        ("{doc}", "--collateral", "{garbage}"),
        ("{doc}", "-o", "xml"),
    ],
)
def test_unusable_input_exits_2(
    app: typer.Typer, files: dict[str, Path], tmp_path: Path, args: tuple[str, ...]
) -> None:
    names = {**{k: str(v) for k, v in files.items()}, "missing": str(tmp_path / "nope")}
    code, out = run(app, *(a.format(**names) for a in args))
    assert code == 2, out


def test_unusable_json_output(app: typer.Typer, files: dict[str, Path]) -> None:
    code, out = run(app, files["garbage"], "-o", "json")
    assert code == 2
    doc = json.loads(out)
    assert doc["verdict"] == "unusable" and doc["reason"] == "malformed" and doc["field"] == "evidence"


def test_real_vectors_through_the_cli(app: typer.Typer, vectors_dir: Path) -> None:
    snp = vectors_dir / "sev-snp/virtee-sev"
    code, out = run(
        app,
        snp / "report_milan.hex",
        "--collateral",
        snp / "vcek_milan.der",
        "--at",
        "2024-01-01T00:00:00Z",
        "-o",
        "json",
    )
    assert code == 0 and json.loads(out)["claims"]["signing_key"] == "VCEK"
    ias = vectors_dir / "sgx-ias/integritee-pallets/ra_dump_cert_TEST8_PRODUCTION.der"
    code, out = run(app, ias, "--at", "2021-10-13T20:26:00Z", "-o", "json")
    assert code == 0 and json.loads(out)["tcb_status"] == "CONFIGURATION_AND_SW_HARDENING_NEEDED"
    code, out = run(
        app, vectors_dir / "sgx-ias/integritee-pallets/negative_mesatee_from_tests_rs/CERT_TOO_SHORT1.der"
    )
    assert code == 2


def test_help_renders(app: typer.Typer) -> None:
    result = CliRunner().invoke(app, ["verify-evidence", "--help"])
    assert result.exit_code == 0, result.output
    for flag in (
        "--kind",
        "--collateral",
        "--root",
        "--at",
        "--policy",
        "--allow-debug",
        "--pcr",
        "--output",
    ):
        assert flag in result.output
    assert "UNSAFE" in result.output
