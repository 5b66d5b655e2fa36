"""Enclave commands as the deployment guide writes them: create-enclave, list-enclaves,
destroy-enclave, attestation-test."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.markup import escape

from r3e_tee.cli.client import ApiError, ServiceClient, segment
from r3e_tee.cli.output import (
    PROVIDER_HELP,
    cli_state,
    console,
    err_console,
    print_json,
    print_table,
    provider_choice,
    service_call,
    service_client,
)
from r3e_tee.config import parse_size
from r3e_tee.errors import InvalidRequestError, R3ETeeError


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise InvalidRequestError(
            f"--size: {exc}", hint="use K, M, G (or Ki, Mi, Gi), e.g. --size 128M"
        ) from None


def _human(n: int) -> str:
    for unit, size in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _age(ts: float | None) -> str:
    if not ts:
        return ""
    secs = max(0, int(time.time() - ts))
    return f"{secs}s" if secs < 120 else (f"{secs // 60}m" if secs < 7200 else f"{secs // 3600}h")


def create_enclave(
    ctx: typer.Context,
    size: Annotated[str, typer.Option("--size", help="enclave memory: 128M, 512Mi, 2G")],
    provider: Annotated[str, typer.Option("--provider", help=PROVIDER_HELP)] = "simulation",
    debug: Annotated[
        bool, typer.Option("--debug", help="UNSAFE: a debug enclave's memory is readable")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="wait until ready (or failed)")] = False,
    evidence_format: Annotated[
        str | None, typer.Option("--evidence-format", help="simulation only: sgx-dcap or nitro")
    ] = None,
) -> None:
    """Create an enclave with a size on a provider; with --wait, until it is attested and ready."""
    s = cli_state(ctx)
    _size(size)
    provider = provider_choice(provider)
    if debug:
        err_console.print(
            "[bold yellow]UNSAFE[/] --debug: the host can read this enclave's memory and secrets; "
            "production policies reject its attestation",
            highlight=False,
            soft_wrap=True,
        )
    c = service_client(ctx)
    try:
        body: dict[str, Any] = {"provider": provider, "size": size, "debug": debug}
        if evidence_format:
            body["evidence_format"] = evidence_format
        enclave = c.post("/v1/enclaves", json=body, params={"wait": 60} if wait else None)
    finally:
        c.close()
    if s.json:
        print_json(enclave)
    else:
        line = f"enclave {enclave['id']} {enclave['state']}"
        if enclave.get("measurement"):
            line += f" measurement {enclave['measurement']}"
        console.print(escape(line))
        if enclave.get("reason"):
            console.print(f"[red]reason:[/] {escape(enclave['reason'])}")
    if enclave["state"] == "failed" or (wait and enclave["state"] != "ready"):
        raise typer.Exit(1)


def list_enclaves(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="include terminated enclaves")] = False,
) -> None:
    """List enclaves with provider, size, state and measurement."""
    s = cli_state(ctx)
    enclaves = service_call(ctx, "GET", "/v1/enclaves", params={"all": str(all_).lower()})
    if s.json:
        print_json(enclaves)
        return
    rows = [
        (
            e["id"][:12],
            e["provider"],
            _human(e["size_bytes"]),
            e["state"] + (" (debug)" if e["debug"] else ""),
            (e.get("measurement") or "")[:16],
            _age(e["created_at"]),
            escape(e.get("reason") or ""),
        )
        for e in enclaves
    ]
    print_table(None, ["ID", "PROVIDER", "SIZE", "STATE", "MEASUREMENT", "AGE", "REASON"], rows)


def destroy_enclave(
    ctx: typer.Context, enclave_id: Annotated[str, typer.Argument(help="enclave id")]
) -> None:
    """Destroy an enclave: its runtime zeroizes its keys and its tokens are revoked."""
    s = cli_state(ctx)
    path = f"/v1/enclaves/{segment(enclave_id, 'enclave id', listed_by='r3e-tee-cli list-enclaves')}"
    enclave = service_call(ctx, "DELETE", path)
    if s.json:
        print_json(enclave)
    else:
        console.print(f"enclave {escape(enclave['id'])} {enclave['state']}")


class _Steps:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.results: list[dict[str, Any]] = []
        self.failed = False

    def run(self, name: str, fn: Callable[[], str]) -> bool:
        start = time.perf_counter()
        try:
            detail, ok = fn(), True
        except R3ETeeError as exc:
            detail, ok = exc.message, False
        ms = (time.perf_counter() - start) * 1000
        self.results.append({"step": name, "ok": ok, "ms": round(ms, 1), "detail": detail})
        self.failed |= not ok
        if not self.as_json:
            mark = "[green]PASS[/]" if ok else "[red]FAIL[/]"
            console.print(f"{mark} {name:<34} {ms:8.1f} ms  {escape(detail)}", soft_wrap=True)
        return ok


def _tamper(evidence: bytes, kind: str) -> tuple[bytes, int]:
    """Flip one bit inside the signed part: the report body of a quote, the payload of a COSE doc."""
    offset = 48 + 64 if kind in ("sgx-dcap", "tdx-dcap") else len(evidence) // 2
    out = bytearray(evidence)
    out[offset] ^= 0x01
    return bytes(out), offset


def attestation_test(
    ctx: typer.Context,
    provider: Annotated[str, typer.Option("--provider", help=PROVIDER_HELP)] = "simulation",
    size: Annotated[str, typer.Option("--size", help="size of the temporary enclave")] = "64M",
    evidence_format: Annotated[str | None, typer.Option("--evidence-format", help="simulation only")] = None,
) -> None:
    """Attest a temporary enclave end to end; exit 1 on any failure.

    Then prove that a replayed nonce and a tampered quote are rejected. Prints each step with
    its time."""
    from r3e_tee.attestation.tokens import verify_token

    s = cli_state(ctx)
    _size(size)
    provider = provider_choice(provider)
    c = service_client(ctx)
    steps = _Steps(s.json)
    state: dict[str, Any] = {}

    def create() -> str:
        body: dict[str, Any] = {"provider": provider, "size": size}
        if evidence_format:
            body["evidence_format"] = evidence_format
        enclave = c.post("/v1/enclaves", json=body, params={"wait": 60})
        state["enclave"] = enclave
        if enclave["state"] != "ready":
            raise R3ETeeError(f"enclave {enclave['id']} is {enclave['state']}: {enclave.get('reason')}")
        return f"enclave {enclave['id'][:12]} ready, measurement {str(enclave.get('measurement'))[:16]}"

    def stored_report() -> str:
        report = c.get(f"/v1/attestations/{state['enclave']['attestation_id']}")
        if report["verdict"] != "valid":
            raise R3ETeeError(f"stored verdict is {report['verdict']}")
        claims = report["claims"]
        return (
            f"{claims['kind']} verdict valid, tcb {claims.get('tcb_status')}, simulated {claims['simulated']}"
        )

    def reattest() -> str:
        state["grant"] = c.post(f"/v1/enclaves/{state['enclave']['id']}/attest")
        return f"fresh nonce -> evidence -> token (attestation {state['grant']['attestation_id'][:12]})"

    def token_with_jwks() -> str:
        jwks = c.get("/.well-known/jwks.json")
        claims = verify_token(state["grant"]["token"], jwks)
        keys = state["enclave"].get("public_keys") or {}
        want = base64.urlsafe_b64encode(bytes.fromhex(keys.get("p256", ""))).rstrip(b"=").decode()
        if claims["cnf"]["p256"] != want or claims["sub"] != state["enclave"]["id"]:
            raise R3ETeeError("the token does not name this enclave and its attested key")
        return f"signature by {len(jwks['keys'])}-key JWKS ok, bound to the enclave's key"

    def replay() -> str:
        report = c.get(f"/v1/attestations/{state['grant']['attestation_id']}")
        state["report"] = report
        body = {
            "evidence": report["evidence"],
            "nonce": report["nonce"],
            "public_keys": _keys_b64(report["public_keys"]),
            "provider": provider,
            "enclave_id": report["enclave_id"],
        }
        return _expect_rejection(c, body, {"nonce-mismatch"})

    def tampered() -> str:
        report = state["report"]
        evidence, offset = _tamper(base64.b64decode(report["evidence"]), report["kind"])
        nonce = c.post("/v1/attestation/nonce")["nonce"]
        body = {
            "evidence": base64.b64encode(evidence).decode(),
            "nonce": nonce,
            "public_keys": _keys_b64(report["public_keys"]),
            "provider": provider,
            "enclave_id": report["enclave_id"],
            "collateral": (report.get("collateral") or {}).get("bundle"),
        }
        return f"bit flipped at byte {offset}: " + _expect_rejection(
            c, body, {"bad-signature", "bad-qe-report", "malformed"}
        )

    def destroy() -> str:
        enclave = c.delete(f"/v1/enclaves/{state['enclave']['id']}")
        if enclave["state"] != "terminated":
            raise R3ETeeError(f"enclave is {enclave['state']} after destroy")
        return "terminated"

    try:
        if steps.run("create temporary enclave", create):
            for name, fn in (
                ("stored attestation report", stored_report),
                ("re-attest with a fresh nonce", reattest),
                ("token verifies with the JWKS", token_with_jwks),
                ("replayed nonce is rejected", replay),
                ("tampered evidence is rejected", tampered),
            ):
                if not steps.run(name, fn):
                    break
        if "enclave" in state:
            steps.run("destroy temporary enclave", destroy)
    finally:
        c.close()
    if s.json:
        print_json({"ok": not steps.failed, "provider": provider, "steps": steps.results})
    if steps.failed:
        raise typer.Exit(1)


def _keys_b64(keys: dict[str, str]) -> dict[str, str]:
    """Stored keys are base64url; the API takes standard base64."""
    out = {}
    for name, value in keys.items():
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        out[name] = base64.b64encode(raw).decode()
    return out


def _expect_rejection(c: ServiceClient, body: dict[str, Any], reasons: set[str]) -> str:
    try:
        c.post("/v1/attestation/verify", json=body)
    except ApiError as exc:
        reason = exc.body.get("reason")
        if reason in reasons:
            return f"rejected: {reason} ({exc.body.get('check')})"
        raise R3ETeeError(f"rejected for the wrong reason: {reason} ({exc.message})") from None
    raise R3ETeeError("ACCEPTED: the service took evidence it must reject")


def register(app: typer.Typer) -> None:
    app.command("create-enclave")(create_enclave)
    app.command("list-enclaves")(list_enclaves)
    app.command("destroy-enclave")(destroy_enclave)
    app.command("attestation-test")(attestation_test)
