"""Secret and key commands: put-secret, list-secrets, delete-secret, rotate-keys, list-keys, audit-log.

A secret's value goes from a file or an environment variable straight into the request body; it
is never printed, and the service never returns it.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from r3e_tee.cli.client import segment
from r3e_tee.cli.output import cli_state, console, print_json, print_table, service_call, service_client
from r3e_tee.errors import InvalidRequestError


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z" if ts else ""


def _secret(name: str) -> str:
    return segment(name, "secret name", listed_by="r3e-tee-cli list-secrets")


def _read_value(value_file: Path | None, value_env: str | None) -> bytes:
    if (value_file is None) == (value_env is None):
        raise InvalidRequestError(
            "give exactly one of --value-file and --value-env",
            hint="--value-file FILE (or - for standard input), or --value-env VAR",
        )
    if value_env is not None:
        if value_env not in os.environ:
            raise InvalidRequestError(
                f"environment variable {value_env} is not set",
                hint=f"export {value_env} in this shell first, or use --value-file",
            )
        value = os.environ[value_env].encode()
    else:
        assert value_file is not None
        try:
            value = sys.stdin.buffer.read() if str(value_file) == "-" else value_file.read_bytes()
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot read --value-file {value_file}: {exc.strerror}",
                hint="check the path and permissions, or pass - to read the value from standard input",
            ) from None
    if not value:
        source = f"--value-env {value_env}" if value_env is not None else f"--value-file {value_file}"
        raise InvalidRequestError(
            f"the secret value from {source} is empty",
            hint="put the value there first; an empty secret is never stored",
        )
    return value


def put_secret(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="secret name (letters, digits, . _ -)")],
    policy: Annotated[
        Path, typer.Option("--policy", help="release policy YAML (measurements, mrsigner, pcrs, ...)")
    ],
    value_file: Annotated[
        Path | None, typer.Option("--value-file", help="read the value from this file (- for stdin)")
    ] = None,
    value_env: Annotated[
        str | None, typer.Option("--value-env", help="read the value from this environment variable")
    ] = None,
    owner: Annotated[
        str | None,
        typer.Option("--owner", help="data key owner, e.g. function:pricing (default secret:NAME)"),
    ] = None,
    description: Annotated[str | None, typer.Option("--description", help="free text")] = None,
) -> None:
    """Store a secret, encrypted, with its release policy.

    Only enclaves whose attestation satisfies the policy ever receive it; the value is never
    shown again by any command or endpoint. A policy that sets allow_debug or allow_simulation
    is UNSAFE outside development."""
    from r3e_tee.keys.policy import ReleasePolicy

    s = cli_state(ctx)
    path = f"/v1/secrets/{_secret(name)}"
    doc = ReleasePolicy.from_file(policy)  # checked here so mistakes name the file and the key
    value = _read_value(value_file, value_env)
    body: dict[str, Any] = {"value_b64": base64.b64encode(value).decode(), "policy": doc.to_dict()}
    if owner:
        body["owner"] = owner
    if description is not None:
        body["description"] = description
    out = service_call(ctx, "PUT", path, json=body)
    if s.json:
        print_json(out)
        return
    verb = "created" if out.get("created") else "updated"
    console.print(
        f"secret {escape(out['name'])} {verb}: revision {out['revision']}, {out['size_bytes']} bytes, "
        f"key {escape(out['owner'])} v{out['key_version']}, policy {out['policy_digest'][:16]}"
    )
    for unsafe in out.get("unsafe", []):
        console.print(f"[yellow]warning:[/] the policy sets {unsafe}: UNSAFE outside development")
    if out.get("revoked_attestations"):
        console.print(
            f"policy changed: {len(out['revoked_attestations'])} attestation token(s) that received the "
            "secret were revoked; those enclaves attest again before they get it"
        )


def list_secrets(ctx: typer.Context) -> None:
    """Secrets with their revision, size, key version and policy (never values)."""
    s = cli_state(ctx)
    secrets = service_call(ctx, "GET", "/v1/secrets")
    if s.json:
        print_json(secrets)
        return
    rows = [
        (
            escape(x["name"]),
            x["revision"],
            x["size_bytes"],
            escape(f"{x['owner']} v{x['key_version']}"),
            escape(", ".join(f"{k}={v}" for k, v in sorted(x["policy"].items()))[:80]),
            _when(x["updated_at"]),
        )
        for x in secrets
    ]
    print_table(None, ["NAME", "REV", "BYTES", "KEY", "POLICY", "UPDATED"], rows)


def delete_secret(ctx: typer.Context, name: Annotated[str, typer.Argument(help="secret name")]) -> None:
    """Delete a secret; the attestation tokens it was released to are revoked."""
    s = cli_state(ctx)
    out = service_call(ctx, "DELETE", f"/v1/secrets/{_secret(name)}")
    if s.json:
        print_json(out)
        return
    console.print(
        f"secret {escape(name)} deleted; {len(out.get('revoked_attestations', []))} token(s) revoked"
    )


def rotate_keys(
    ctx: typer.Context,
    data_keys: Annotated[bool, typer.Option("--data-keys/--no-data-keys", help="rotate data keys")] = True,
    signing_keys: Annotated[
        bool, typer.Option("--signing-keys/--no-signing-keys", help="rotate attestation-token signing keys")
    ] = True,
    owner: Annotated[
        list[str] | None, typer.Option("--owner", help="only this data key owner (repeatable)")
    ] = None,
) -> None:
    """Rotate data keys and token signing keys now.

    A new version of every data key (secrets re-encrypted, versions beyond retain_versions
    retired) and new token signing keys (old ones stay in the JWKS until their tokens
    expire)."""
    s = cli_state(ctx)
    body: dict[str, Any] = {"data_keys": data_keys, "signing_keys": signing_keys}
    if owner:
        body["owners"] = list(owner)
    out = service_call(ctx, "POST", "/v1/keys/rotate", json=body)
    if s.json:
        print_json(out)
        return
    for k in out["data_keys"]:
        retired = ", ".join(f"v{v}" for v in k["retired"]) or "none"
        console.print(
            f"data key {escape(k['owner'])}: now v{k['version']}, {k['reencrypted']} secret(s) re-encrypted, "
            f"retired: {retired}"
        )
    for k in out["signing_keys"]:
        console.print(
            f"signing key {escape(k['provider'])}: {escape(k['kid'])} ({k['alg']}), previous "
            f"{escape(k['previous_kid'])} kept in the JWKS until its tokens expire"
        )
    if not out["data_keys"] and not out["signing_keys"]:
        console.print("nothing to rotate")


def list_keys(ctx: typer.Context) -> None:
    """The KEK in use, data key versions and token signing keys (metadata only)."""
    s = cli_state(ctx)
    out = service_call(ctx, "GET", "/v1/keys")
    if s.json:
        print_json(out)
        return
    kek = out["kek"]
    console.print(f"KEK: {escape(kek['provider'])} {escape(kek['kek_id'])} ({escape(kek['location'])})")
    # what enclaves pin: the service measures it into them; a Nitro image takes it at build time
    console.print(f"key broker: {escape(str(out.get('broker_key')))}")
    rot = out["rotation"]
    console.print(
        f"rotation every {rot['period_s'] / 86400:g} d, last {_when(rot['last'])}, next {_when(rot['next'])}"
    )
    print_table(
        "data keys",
        ["OWNER", "VERSION", "STATE", "KEK", "CREATED"],
        [
            (escape(k["owner"]), k["version"], k["state"], k["kek_id"] or "", _when(k["created_at"]))
            for k in out["data_keys"]
        ],
    )
    print_table(
        "token signing keys (stored)",
        ["PROVIDER", "KID", "STATE", "CREATED", "IN JWKS UNTIL"],
        [
            (k["provider"], k["kid"], k["state"], _when(k["created_at"]), _when(k.get("retire_after")))
            for k in out["signing_keys"]
        ],
    )


def audit_log(
    ctx: typer.Context,
    verify: Annotated[bool, typer.Option("--verify", help="verify the hash chain; exit 1 if broken")] = False,
    after: Annotated[int, typer.Option("--after", min=0, help="entries after this sequence number")] = 0,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=10000, help="at most this many entries (1-10000)")
    ] = 100,
    action: Annotated[str | None, typer.Option("--action", help="only this action, e.g. secret.deny")] = None,
    subject: Annotated[str | None, typer.Option("--subject", help="only this subject (secret name)")] = None,
) -> None:
    """List audit-log entries, or with --verify check the log's hash chain.

    Entries: key creation, rotation, releases, denials, secret changes. --verify checks that no
    entry was edited, inserted or deleted and names the first broken link (exit 1)."""
    s = cli_state(ctx)
    c = service_client(ctx)
    try:
        if verify:
            verdict = c.get("/v1/audit/verify")
        else:
            params: dict[str, Any] = {"after": after, "limit": limit}
            if action:
                params["action"] = action
            if subject:
                params["subject"] = subject
            page = c.get("/v1/audit", params=params)
    finally:
        c.close()
    if verify:
        if s.json:
            print_json(verdict)
        elif verdict["ok"]:
            console.print(f"[green]audit log intact[/]: {verdict['entries']} entries, head {verdict['head']}")
        else:
            console.print(
                f"[red]audit log BROKEN at entry {verdict['first_broken']}[/]: {escape(verdict['problem'])} "
                f"({verdict['entries']} entries before it verify)",
                soft_wrap=True,
            )
        if not verdict["ok"]:
            raise typer.Exit(1)
        return
    if s.json:
        print_json(page)
        return
    rows = [
        (
            e["seq"],
            _when(e["ts"]),
            escape(e["actor"]),
            e["action"],
            escape(e["subject"] or ""),
            e["outcome"] + (f" ({e['reason']})" if e["reason"] else ""),
        )
        for e in page["entries"]
    ]
    print_table(None, ["SEQ", "TIME", "ACTOR", "ACTION", "SUBJECT", "OUTCOME"], rows)


def register(app: typer.Typer) -> None:
    app.command("put-secret")(put_secret)
    app.command("list-secrets")(list_secrets)
    app.command("delete-secret")(delete_secret)
    app.command("rotate-keys")(rotate_keys)
    app.command("list-keys")(list_keys)
    app.command("audit-log")(audit_log)
