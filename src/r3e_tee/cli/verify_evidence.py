"""``r3e-tee-cli verify-evidence``: verify attestation evidence offline.

Exit codes: 0 accepted, 1 rejected (the reason, check, observed and expected values are
printed), 2 unusable input (unreadable file, unknown encoding, malformed evidence, bad policy or
collateral, bad flag).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from r3e_tee.attestation.pinned_roots_nitro_ias import TrustAnchor
from r3e_tee.attestation.policy import Policy
from r3e_tee.attestation.result import VerificationResult
from r3e_tee.attestation.verify import KIND_ALIASES, Verifier
from r3e_tee.errors import EvidenceFormatError, R3ETeeError, VerificationError

__all__ = ["register"]

_KINDS = ("auto", "sgx", "tdx", "nitro", "ias", "snp")


def _out_format(ctx: typer.Context, output: str | None) -> str:
    if output is not None:
        fmt = output.lower()
    else:
        root = ctx.find_root().obj
        fmt = str(getattr(root, "output", "table")).lower()
    if fmt not in ("table", "json"):
        raise typer.BadParameter("must be 'table' or 'json'", param_hint="-o/--output")
    return fmt


def _parse_at(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO-8601 time", param_hint="--at") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _parse_pcrs(values: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for item in values:
        index, sep, hexval = item.partition("=")
        if not sep or not index.strip().isdigit():
            raise typer.BadParameter(f"{item!r} is not N=HEX", param_hint="--pcr")
        out[int(index)] = hexval.strip()
    return out


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _flat_claims(claims: Any, prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in claims.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flat_claims(value, f"{name}."))
        elif isinstance(value, list):
            rows.append((name, ", ".join(map(str, value)) or "(none)"))
        else:
            rows.append((name, str(value)))
    return rows


def _print_accepted(console: Console, result: VerificationResult) -> None:
    table = Table(title="[bold green]ACCEPTED[/]", show_header=True)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    rows = [
        ("kind", result.kind.value),
        ("encoding", str(result.details.get("encoding", ""))),
        ("verified at", result.verified_at.isoformat().replace("+00:00", "Z")),
        ("valid until", result.valid_until.isoformat().replace("+00:00", "Z") if result.valid_until else "-"),
        ("tcb status", result.tcb_status or "-"),
        ("advisories", ", ".join(sorted(result.advisories)) or "-"),
        ("debug", str(result.debug)),
        ("simulated", str(result.simulated)),
        ("evidence sha256", result.evidence_sha256),
    ]
    for key, value in rows:
        table.add_row(key, escape(value))
    for key, value in _flat_claims(result.claims):
        table.add_row(f"claims.{key}", escape(value))
    console.print(table)


def _print_rejected(console: Console, exc: VerificationError) -> None:
    table = Table(title=f"[bold red]REJECTED[/] ({exc.reason.value})", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    table.add_row("reason", exc.reason.value)
    table.add_row("check", escape(exc.check))
    table.add_row("observed", escape(str(exc.observed)) if exc.observed is not None else "-")
    table.add_row("expected", escape(str(exc.expected)) if exc.expected is not None else "-")
    table.add_row("message", escape(exc.message))
    console.print(table)


def verify_evidence_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="evidence file (binary, hex, base64, PEM or a certificate)")],
    kind: Annotated[str, typer.Option("--kind", help="auto|sgx|tdx|nitro|ias|snp")] = "auto",
    collateral: Annotated[
        Path | None,
        typer.Option(
            "--collateral", help="DCAP: QuoteCollateralV3 JSON; SNP: VCEK (with ASK, ARK) PEM bundle or JSON"
        ),
    ] = None,
    root: Annotated[Path | None, typer.Option("--root", help="trust root certificate (PEM or DER)")] = None,
    at: Annotated[str | None, typer.Option("--at", help="verification time, ISO-8601 (default: now)")] = None,
    policy_file: Annotated[Path | None, typer.Option("--policy", help="policy YAML file")] = None,
    allow_debug: Annotated[
        bool, typer.Option("--allow-debug", help="UNSAFE: accept debug enclaves (their memory is readable)")
    ] = False,
    pcr: Annotated[
        list[str] | None, typer.Option("--pcr", help="expected Nitro PCR, N=HEX (repeatable)")
    ] = None,
    output: Annotated[str | None, typer.Option("-o", "--output", help="table or json")] = None,
) -> None:
    """Verify attestation evidence: exit 0 accepted, 1 rejected, 2 unusable input."""
    fmt = _out_format(ctx, output)
    console = Console()
    err = Console(stderr=True)
    if kind.lower() not in _KINDS:
        raise typer.BadParameter(f"must be one of {', '.join(_KINDS)}", param_hint="--kind")
    try:
        when = _parse_at(at)
        pcrs = _parse_pcrs(pcr or [])
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise EvidenceFormatError(
                f"cannot read {file}: {exc.strerror}",
                field="evidence file",
                hint="pass the path of a quote, attestation document or report (see --help for formats)",
            ) from None
        policy = Policy.from_file(policy_file) if policy_file is not None else Policy()
        policy = policy.with_overrides(allow_debug=True if allow_debug else None, pcrs=pcrs)
        for warning in policy.unsafe_choices():
            err.print(f"[bold yellow]UNSAFE[/] {escape(warning)}", highlight=False, soft_wrap=True)
        anchor = TrustAnchor.load(root) if root is not None else None
        result = Verifier().verify(
            data,
            kind=KIND_ALIASES[kind.lower()],
            collateral=collateral,
            trust_root=anchor,
            at=when,
            policy=policy,
        )
    except VerificationError as exc:
        if fmt == "json":
            _print_json({"verdict": "invalid", **exc.to_dict()})
        else:
            _print_rejected(console, exc)
        raise typer.Exit(1) from None
    except typer.BadParameter:
        raise
    except R3ETeeError as exc:
        if fmt == "json":
            _print_json({"verdict": "unusable", **exc.to_dict()})
        else:
            err.print(f"[bold red]unusable input:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
            if exc.hint:
                err.print(f"[yellow]fix:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if fmt == "json":
        _print_json(result.to_json())
    else:
        _print_accepted(console, result)


def register(app: typer.Typer) -> None:
    """Add ``verify-evidence`` to the CLI (called by ``r3e_tee.cli.main``)."""
    app.command("verify-evidence")(verify_evidence_command)
