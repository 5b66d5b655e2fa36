"""Function commands: deploy-function, list-functions, invoke, verify-receipt."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape

from r3e_tee.cli.client import ConnectionFailed, ServiceClient, segment
from r3e_tee.cli.output import (
    PROVIDER_HELP,
    cli_state,
    console,
    print_json,
    print_table,
    provider_choice,
    service_call,
    service_client,
)
from r3e_tee.errors import InvalidRequestError, R3ETeeError, ReceiptError, VerificationError


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot read {what} {path}: {exc.strerror}",
            hint=f"check the {what} file's path (relative paths start at {Path.cwd()}) and permissions",
        ) from None


def deploy_function(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="the code: a .py or .js file, or a zip (Python)")],
    name: Annotated[str, typer.Option("--name", help="function name (lower-case, digits, '-')")],
    runtime: Annotated[str, typer.Option("--runtime", help="python or javascript")],
    handler: Annotated[str, typer.Option("--handler", help="the function to call")] = "handler",
    secret: Annotated[
        list[str] | None, typer.Option("--secret", help="a secret to release to it (repeat)")
    ] = None,
    size: Annotated[str, typer.Option("--size", help="enclave size")] = "128M",
    memory: Annotated[str, typer.Option("--memory", help="memory per sandbox")] = "64M",
    timeout: Annotated[str, typer.Option("--timeout", help="per invocation")] = "10s",
    min_enclaves: Annotated[
        int, typer.Option("--min", min=0, help="enclaves kept warm (0: scale to zero)")
    ] = 0,
    max_enclaves: Annotated[int, typer.Option("--max", min=1, help="most enclaves under load")] = 4,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="sandboxes per enclave")] = 2,
    idempotent: Annotated[
        bool,
        typer.Option(
            "--idempotent",
            help="safe to run again: retried on another enclave if its enclave dies, and, when it"
            " runs in well under 50 ms, pipelined (several invocations queued per sandbox)",
        ),
    ] = False,
    cooldown: Annotated[
        str, typer.Option("--cooldown", help="idle time before scaling an enclave down")
    ] = "60s",
    provider: Annotated[str, typer.Option("--provider", help=PROVIDER_HELP)] = "simulation",
) -> None:
    """Deploy a new immutable version; prints its version and measurement."""
    s = cli_state(ctx)
    provider = provider_choice(provider)
    if runtime.strip().lower() not in ("python", "javascript"):
        raise InvalidRequestError(
            f"--runtime {runtime!r} is not a runtime",
            hint="use --runtime python (a .py file or a zip) or --runtime javascript (a .js file)",
        )
    body = {
        "name": name,
        "runtime": runtime.strip().lower(),
        "handler": handler,
        "secrets": secret or [],
        "enclave_size": size,
        "memory": memory,
        "timeout": timeout,
        "min_enclaves": min_enclaves,
        "max_enclaves": max_enclaves,
        "concurrency": concurrency,
        "idempotent": idempotent,
        "cooldown": cooldown,
        "provider": provider,
        "code": base64.b64encode(_read(file, "code")).decode(),
    }
    fv = service_call(ctx, "POST", "/v1/functions", json=body)
    if s.json:
        print_json(fv)
    else:
        console.print(f"deployed {escape(fv['name'])} version {fv['version']}")
        console.print(f"measurement {fv['measurement']}")


def list_functions(ctx: typer.Context) -> None:
    """Deployed functions with their latest version and measurement."""
    s = cli_state(ctx)
    fns = service_call(ctx, "GET", "/v1/functions")
    if s.json:
        print_json(fns)
        return
    rows = [
        (
            f["name"],
            f["version"],
            f["runtime"],
            f["provider"],
            (f["measurement"] or "")[:16],
            ",".join(f["config"]["secrets"]),
        )
        for f in fns
    ]
    print_table(None, ["NAME", "VERSION", "RUNTIME", "PROVIDER", "MEASUREMENT", "SECRETS"], rows)


def _data(value: str) -> bytes:
    source = f"--data {value}" if value.startswith("@") else "--data"
    raw = _read(Path(value[1:]), "input") if value.startswith("@") else value.encode()
    if not raw.strip():
        raise InvalidRequestError(
            f"{source} is empty; the event must be JSON", hint="pass --data '{}' for an empty event"
        )
    try:
        json.loads(raw)
    except ValueError as exc:
        raise InvalidRequestError(
            f"{source} is not JSON: {exc}",
            hint="quote the JSON for the shell, e.g. --data '{\"amount\": 3}', or use --data @event.json",
        ) from None
    return raw


def _as_jwks(doc: object, source: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise InvalidRequestError(
            f"{source} is not a JWKS: a JSON object with a 'keys' list is expected",
            hint="pass the service's /.well-known/jwks.json (URL or a saved copy), or omit --jwks",
        )
    return doc


def _jwks(c: ServiceClient, source: str | None) -> dict[str, Any]:
    if source is None:
        return _as_jwks(c.get("/.well-known/jwks.json"), f"{c.server}/.well-known/jwks.json")
    if source.startswith(("http://", "https://")):
        try:
            resp = httpx.get(source, timeout=10)
        except httpx.HTTPError as exc:
            raise ConnectionFailed(
                f"cannot fetch the JWKS from {source}: {exc or type(exc).__name__}",
                hint="check the --jwks URL, or omit --jwks to use the server's",
            ) from None
        if resp.status_code != 200:
            raise ConnectionFailed(
                f"cannot fetch the JWKS from {source}: HTTP {resp.status_code}",
                hint="check the --jwks URL, or omit --jwks to use the server's",
            )
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        return _as_jwks(doc, source)
    try:
        doc = json.loads(_read(Path(source), "JWKS"))
    except ValueError:
        doc = None
    return _as_jwks(doc, source)


def encryption_key(target: dict[str, Any], fn: dict[str, Any], trusted: dict[str, Any]) -> bytes:
    """The X25519 key to seal an input to: the one the enclave's attestation token binds, for
    the function's measurement, and never a debug enclave's (its host can read its memory, so
    sealing to it would hand the plaintext to the operator the encryption is meant to exclude)."""
    from r3e_tee.attestation.tokens import verify_token

    claims = verify_token(str(target["token"]), trusted)
    key = base64.b64decode(target["x25519"])
    bound = base64.urlsafe_b64decode(claims["cnf"]["x25519"] + "==")
    if bound != key or claims["sub"] != target["enclave_id"]:
        raise R3ETeeError("the enclave key offered is not the attested one; refusing to encrypt to it")
    if fn["measurement"] and claims["measurement"] != fn["measurement"]:
        raise R3ETeeError("the enclave does not run the deployed function's measurement")
    if claims.get("debug") is not False:
        raise R3ETeeError(
            f"enclave {claims['sub']} is attested as a debug enclave (or its token does not say): its "
            "host can read its memory, so encrypting to it would not keep the input from the operator",
            hint="invoke without --encrypt, or have the function served by non-debug enclaves",
        )
    return key


def invoke(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="function name")],
    data: Annotated[str, typer.Option("--data", help="the event: JSON, or @file")] = "{}",
    encrypt: Annotated[
        bool, typer.Option("--encrypt", help="seal the input to the enclave's attested key (end to end)")
    ] = False,
    async_: Annotated[bool, typer.Option("--async", help="queue it; prints the invocation id")] = False,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key", help="with --async")] = None,
    jwks: Annotated[
        str | None, typer.Option("--jwks", help="JWKS URL or file to trust (default: the server's)")
    ] = None,
    receipt_out: Annotated[Path | None, typer.Option("--save", help="write the full response here")] = None,
) -> None:
    """Invoke a function: prints the output and checks the receipt before showing it."""
    from cryptography.hazmat.primitives.asymmetric import x25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from r3e_tee.functions import e2e
    from r3e_tee.functions.receipts import verify_receipt

    s = cli_state(ctx)
    fn_path = f"/v1/functions/{segment(name, 'function name', listed_by='r3e-tee-cli list-functions')}"
    if idempotency_key is not None and not async_:
        raise InvalidRequestError(
            "--idempotency-key only applies to queued invocations",
            hint="add --async, or drop --idempotency-key",
        )
    # checked before the function runs: its result would otherwise be lost
    if receipt_out is not None and receipt_out.is_dir():
        raise InvalidRequestError(
            f"--save {receipt_out} is a directory", hint="--save to a file, e.g. --save receipt.json"
        )
    if receipt_out is not None and not receipt_out.parent.is_dir():
        raise InvalidRequestError(
            f"--save {receipt_out}: the directory {receipt_out.parent} does not exist",
            hint="create it first, or --save to a path in an existing directory",
        )
    raw = _data(data)
    c = service_client(ctx)
    headers: dict[str, str] = {}
    body = raw
    reply_private = None
    try:
        trusted = _jwks(c, jwks)
        if encrypt:
            target = c.get(f"{fn_path}/enclave")
            key = encryption_key(target, c.get(fn_path), trusted)
            reply_private = x25519.X25519PrivateKey.generate()
            reply_public = reply_private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            body = e2e.seal_input(raw, key, reply_public)
            headers = {
                "Content-Type": "application/r3e-hpke",
                "X-R3E-Enclave": str(target["enclave_id"]),
                "X-R3E-Reply-Key": base64.b64encode(reply_public).decode(),
            }
        if async_:
            if idempotency_key:
                headers["Idempotency-Key"] = idempotency_key
            queued = c.post(f"{fn_path}/invocations", content=body, headers=headers)
            if s.json:
                print_json(queued)
            else:
                console.print(f"queued invocation {queued['invocation_id']}")
            return
        result = c.post(f"{fn_path}/invoke", content=body, headers=headers)
    finally:
        c.close()
    output: bytes | None = None
    if "output_encrypted" in result and reply_private is not None:
        output = e2e.open_output(base64.b64decode(result["output_encrypted"]), reply_private)
        result["output"] = json.loads(output)
    elif "output" in result:
        output = json.dumps(result["output"]).encode()
    check = verify_receipt(
        result["receipt"], trusted, input_bytes=raw, output_bytes=output if result["status"] == "ok" else None
    )
    if receipt_out is not None:
        try:
            receipt_out.write_text(json.dumps(result, indent=2))
        except OSError as exc:
            raise InvalidRequestError(
                f"the function ran (invocation {result.get('invocation_id')}) but --save {receipt_out} "
                f"failed: {exc.strerror}",
                hint="--save to a writable file; run `invoke` again to get a new receipt",
            ) from None
    if s.json:
        print_json({**result, "receipt_checks": check.checks})
    else:
        if result["status"] == "ok":
            console.print_json(json.dumps(result.get("output")))
        else:
            console.print(f"[red]{result['status']}:[/] {escape(str(result.get('error')))}")
        console.print(
            f"[green]receipt verified[/] ({len(check.checks)} checks; enclave {result['enclave_id'][:12]})"
        )
    if result["status"] != "ok":
        raise typer.Exit(1)


def verify_receipt_cmd(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="a receipt, or an invoke response containing one")],
    input_file: Annotated[Path | None, typer.Option("--input", help="the input JSON to check")] = None,
    output_file: Annotated[Path | None, typer.Option("--output", help="the output JSON to check")] = None,
    jwks: Annotated[
        str | None, typer.Option("--jwks", help="JWKS URL or file (default: the server's)")
    ] = None,
    policy_file: Annotated[
        Path | None, typer.Option("--policy", help="reference values the enclave must meet")
    ] = None,
    evidence: Annotated[
        bool,
        typer.Option("--evidence", help="re-verify the enclave's raw evidence against the hardware roots"),
    ] = False,
    attestation_file: Annotated[
        Path | None, typer.Option("--attestation", help="stored attestation report (default: fetched)")
    ] = None,
    root: Annotated[Path | None, typer.Option("--root", help="trust anchor for --evidence (PEM)")] = None,
    allow_simulation: Annotated[
        bool, typer.Option("--allow-simulation", help="UNSAFE: accept simulated evidence with --evidence")
    ] = False,
) -> None:
    """Verify a receipt offline: exit 0 valid, 1 invalid, 2 unusable input.

    Checks the signature, the key bound to the attestation, the JWKS, the policy and the
    input/output hashes; with --evidence also the raw attestation evidence."""
    from r3e_tee.attestation.policy import Policy
    from r3e_tee.functions.receipts import verify_receipt

    s = cli_state(ctx)
    for flag, given in (
        ("--attestation", attestation_file is not None),
        ("--root", root is not None),
        ("--allow-simulation", allow_simulation),
    ):
        if given and not evidence:
            raise InvalidRequestError(
                f"{flag} only applies with --evidence (re-verifying the raw evidence)",
                hint=f"add --evidence, or drop {flag}",
            )
    try:
        doc = json.loads(_read(file, "receipt"))
    except ValueError:
        raise InvalidRequestError(
            f"{file} is not JSON",
            hint="pass the file written by `r3e-tee-cli invoke --save`, or a receipt from an invocation",
        ) from None
    receipt = doc.get("receipt", doc) if isinstance(doc, dict) else doc
    if not isinstance(receipt, dict) or not {"body", "signature"} <= receipt.keys():
        raise InvalidRequestError(
            f"{file} holds no receipt (a 'body' and a 'signature')",
            hint="pass the file written by `r3e-tee-cli invoke --save`, or a receipt from an invocation",
        )
    policy = Policy.from_file(policy_file) if policy_file else None
    output_bytes = _read(output_file, "output") if output_file else _response_output(doc)
    c = service_client(ctx)
    try:
        trusted = _jwks(c, jwks)
        check = verify_receipt(
            receipt,
            trusted,
            input_bytes=_read(input_file, "input") if input_file else None,
            output_bytes=output_bytes,
            policy=policy,
        )
        checks = list(check.checks)
        if evidence:
            checks.append(_check_evidence(c, check, attestation_file, root, allow_simulation))
    finally:
        c.close()
    if s.json:
        print_json({"valid": True, "checks": checks, "receipt": check.body})
        return
    for item in checks:
        console.print(f"[green]PASS[/] {escape(item)}")
    body = check.body
    console.print(
        f"valid receipt: {body['function']} v{body['version']} in enclave {body['enclave_id'][:12]}"
    )


def _response_output(doc: Any) -> bytes | None:
    """The plain output of a saved invoke or invocation response, which its receipt must hash:
    otherwise an edited output beside a genuine receipt would pass as verified."""
    saved = isinstance(doc, dict) and "receipt" in doc and doc.get("status") in ("ok", "succeeded")
    if saved and doc.get("output") is not None:
        return json.dumps(doc["output"]).encode()
    return None


def _check_evidence(
    c: ServiceClient, check: Any, attestation_file: Path | None, root: Path | None, allow_simulation: bool
) -> str:
    from r3e_tee.attestation.binding import report_data_for
    from r3e_tee.attestation.policy import Policy
    from r3e_tee.attestation.service import measurement_of
    from r3e_tee.attestation.verify import verify_evidence

    claims = check.token_claims
    if attestation_file:
        source = str(attestation_file)
        try:
            report = json.loads(_read(attestation_file, "attestation report"))
        except ValueError:
            report = None
    else:
        source = f"/v1/attestations/{segment(str(claims['jti']), 'attestation id', listed_by='invoke')}"
        report = c.get(source)
    from r3e_tee.attestation.pinned_roots_nitro_ias import TrustAnchor

    raw = _report_evidence(report, source)
    assert isinstance(report, dict)  # checked by _report_evidence
    bundle = (report.get("collateral") or {}).get("bundle")
    anchor = None
    if root is not None:
        anchor = TrustAnchor.load(_read(root, "root"), simulated=allow_simulation)
    elif allow_simulation:
        # the installation publishes its simulated roots; what they sign is marked simulated
        pem = c.get("/v1/attestation/simulation-roots").get(str(report.get("kind")))
        if pem:
            anchor = TrustAnchor.load(pem.encode(), simulated=True)
    try:
        result = verify_evidence(
            raw,
            collateral=bundle,
            trust_root=anchor,
            policy=Policy(allow_simulation=allow_simulation, allow_debug=bool(claims.get("debug"))),
        )
    except VerificationError as exc:
        if claims.get("simulated") and not allow_simulation and exc.hint is None:
            exc.hint = (
                "the token says this enclave is simulated, so no hardware root signs its evidence; "
                "--allow-simulation (UNSAFE) checks it against the installation's simulated roots"
            )
        raise

    def raw_key(name: str) -> bytes:
        return base64.urlsafe_b64decode(claims["cnf"][name] + "==")

    expected = report_data_for(bytes.fromhex(claims["nonce"]), raw_key("x25519"), raw_key("p256"))
    got = (
        result.report_data
        if result.report_data is not None
        else bytes.fromhex(result.claims.get("user_data", ""))
    )
    if got != expected:
        raise ReceiptError("the raw evidence does not bind the token's nonce and keys")
    # the point of --evidence is not to trust the issuer: what the hardware measured must be
    # what the token (and, through it, the receipt) says ran, or the token misstates the code
    measured = measurement_of(result)
    claimed = claims.get("measurement")
    if not isinstance(measured, str) or not isinstance(claimed, str) or measured.lower() != claimed.lower():
        raise ReceiptError(
            f"measurement mismatch: the raw evidence measures {measured}, but the attestation token "
            f"and the receipt say {claimed}: the token does not describe the enclave that signed it",
            hint="do not trust this receipt; ask the operator why its attestation service issued that token",
        )
    simulated = " (SIMULATED: no hardware protects it)" if result.simulated else ""
    return f"raw {result.kind.value} evidence verifies and binds the token's keys{simulated}"


def _report_evidence(report: object, source: str) -> bytes:
    """The raw evidence of a stored attestation report, or an error naming what is missing."""
    evidence = report.get("evidence") if isinstance(report, dict) else None
    if isinstance(evidence, str):
        try:
            return base64.b64decode(evidence, validate=True)
        except ValueError:
            problem = "its 'evidence' is not base64"
    else:
        problem = "it is not a JSON attestation report with an 'evidence' field"
    raise InvalidRequestError(
        f"{source}: {problem}",
        hint="pass the JSON of GET /v1/attestations/<id> to --attestation, or omit it to fetch it",
    )


_FINISHED = ("succeeded", "failed")


def get_invocation(
    ctx: typer.Context,
    invocation_id: Annotated[str, typer.Argument(help="the id `invoke --async` printed")],
    wait: Annotated[
        float, typer.Option("--wait", min=0, max=3600, help="seconds to wait for it to finish (0: don't)")
    ] = 0,
    jwks: Annotated[
        str | None, typer.Option("--jwks", help="JWKS URL or file to trust (default: the server's)")
    ] = None,
    receipt_out: Annotated[Path | None, typer.Option("--save", help="write the full response here")] = None,
) -> None:
    """An asynchronous invocation's status; once finished, its output, shown only after its
    receipt verifies (exit 0 succeeded, 1 failed or not finished)."""
    from r3e_tee.functions.receipts import verify_receipt

    s = cli_state(ctx)
    path = f"/v1/invocations/{segment(invocation_id, 'invocation id', listed_by='invoke --async')}"
    if receipt_out is not None and not receipt_out.parent.is_dir():
        raise InvalidRequestError(
            f"--save {receipt_out}: the directory {receipt_out.parent} does not exist",
            hint="create it first, or --save to a path in an existing directory",
        )
    c = service_client(ctx)
    try:
        deadline = time.monotonic() + wait
        result = c.get(path)
        while result.get("status") not in _FINISHED and time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            result = c.get(path)
        finished = result.get("status") in _FINISHED
        check = None
        if finished and result.get("receipt"):
            check = verify_receipt(result["receipt"], _jwks(c, jwks), output_bytes=_response_output(result))
    finally:
        c.close()
    if receipt_out is not None:
        try:
            receipt_out.write_text(json.dumps(result, indent=2))
        except OSError as exc:
            raise InvalidRequestError(
                f"--save {receipt_out} failed: {exc.strerror}", hint="--save to a writable file"
            ) from None
    if s.json:
        print_json({**result, "receipt_checks": check.checks if check else []})
    elif not finished:
        console.print(
            f"invocation {escape(invocation_id)} is {escape(str(result.get('status')))} "
            f"(attempt {result.get('attempts')})"
        )
    else:
        if result["status"] == "succeeded":
            if "output_encrypted" in result:
                console.print("output sealed to the reply key the invocation named (output_encrypted)")
            else:
                console.print_json(json.dumps(result.get("output")))
        else:
            console.print(f"[red]failed:[/] {escape(str(result.get('error')))}")
        if check is not None:
            console.print(f"[green]receipt verified[/] ({len(check.checks)} checks)")
    if result.get("status") != "succeeded":
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("deploy-function")(deploy_function)
    app.command("list-functions")(list_functions)
    app.command("invoke")(invoke)
    app.command("get-invocation")(get_invocation)
    app.command("verify-receipt")(verify_receipt_cmd)
