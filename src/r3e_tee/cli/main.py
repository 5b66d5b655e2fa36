"""``r3e-tee-cli``: operate and check an R3E TEE Service.

Exit codes: 0 success, 1 a check or verification failed / the service refused, 2 unusable
input (bad file, bad flag), 3 the service could not be reached.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from r3e_tee import __version__
from r3e_tee.cli.client import DEFAULT_URL, ServiceClient
from r3e_tee.cli.output import CliState, cli_state, console, print_json, print_table, report_error
from r3e_tee.errors import R3ETeeError

app = typer.Typer(
    name="r3e-tee-cli",
    help=(
        "Operate and check an R3E TEE Service: hardware, configuration, attestation, enclaves.\n\n"
        "A local service started with `make run` (--dev) is found with its admin token "
        "automatically; elsewhere pass --server and --token (or R3E_TEE_URL / R3E_TEE_TOKEN)."
    ),
    epilog=(
        "Exit codes: 0 success; 1 a check or verification failed, or the service refused; "
        "2 unusable input (bad file, flag or name); 3 the service could not be reached.\n\n"
        "Start here: r3e-tee-cli doctor, then r3e-tee-cli attestation-test; every command's "
        "--help shows examples."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Check tee-config.yaml files.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@app.callback()
def _global(
    ctx: typer.Context,
    server: Annotated[str, typer.Option("--server", envvar="R3E_TEE_URL", help="service URL")] = DEFAULT_URL,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="R3E_TEE_TOKEN",
            help="bearer token (never printed); prefer R3E_TEE_TOKEN, flags show in ps",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        str, typer.Option("-o", "--output", help="output format: table or json", case_sensitive=False)
    ] = "table",
) -> None:
    if output.lower() not in ("table", "json"):
        raise typer.BadParameter("must be 'table' or 'json'", param_hint="-o/--output")
    ctx.obj = CliState(server=server, token=token, output=output.lower())


# --- version ------------------------------------------------------------------------------------


@app.command()
def version(ctx: typer.Context) -> None:
    """Print the CLI's version and, when reachable, the service's."""
    s = cli_state(ctx)
    server_info: dict[str, object]
    c = ServiceClient(s.server, s.token, timeout=3.0)
    try:
        answer = c.get("/v1/version")
        if not isinstance(answer, dict) or "version" not in answer:
            raise R3ETeeError(f"{s.server}/v1/version answered JSON that is not the service's version")
        server_info = {"url": s.server, **answer}
    except R3ETeeError as exc:
        server_info = {"url": s.server, "error": exc.message}
    finally:
        c.close()
    if s.json:
        print_json({"cli": __version__, "server": server_info})
        return
    console.print(f"r3e-tee-cli {__version__}")
    if "error" in server_info:
        console.print(f"server {escape(s.server)}: [yellow]{escape(str(server_info['error']))}[/]")
    else:
        console.print(
            f"server {escape(s.server)}: r3e-tee-service {server_info.get('version')} "
            f"(providers: {', '.join(map(str, server_info.get('providers', [])))})"  # type: ignore[call-overload]
        )


# --- config validate ------------------------------------------------------------------------------


@config_app.command("validate")
def config_validate(
    ctx: typer.Context,
    file: Annotated[
        Path | None,
        typer.Argument(
            help="tee-config.yaml to check (default: $R3E_TEE_CONFIG, then /etc/r3e-tee/tee-config.yaml)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Validate a tee-config.yaml: syntax, keys, types, ${ENV} references and key files."""
    from r3e_tee.config import check_key_files, load_config

    s = cli_state(ctx)
    loaded = load_config(file)
    cfg = loaded.config
    problems = check_key_files(cfg)
    warnings = []
    if cfg.attestation.allow_simulation and not cfg.server.dev:
        warnings.append("attestation.allow_simulation is on: simulated evidence is accepted (UNSAFE)")
    if cfg.attestation.allow_debug:
        warnings.append("attestation.allow_debug is on: debug enclaves are accepted (UNSAFE)")
    if problems:
        raise problems[0]
    if s.json:
        print_json(
            {
                "valid": True,
                "source": loaded.source,
                "providers": list(cfg.enabled_providers),
                "warnings": warnings,
            }
        )
        return
    console.print(f"[green]valid[/]: {escape(loaded.source)}")
    console.print(f"enabled providers: {', '.join(cfg.enabled_providers) or '(none)'}")
    for w in warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")


# --- doctor ---------------------------------------------------------------------------------------


@app.command()
def doctor(
    ctx: typer.Context,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", envvar="R3E_TEE_CONFIG", help="tee-config.yaml to check against"),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", envvar="R3E_TEE_DATA_DIR", help="the service's data directory"),
    ] = None,
    root: Annotated[Path, typer.Option("--root", hidden=True, help="filesystem root (tests)")] = Path("/"),
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, max=300, help="network check timeout, seconds (0.1-300)")
    ] = 2.0,
) -> None:
    """Check this host can run the enabled providers; exit 0 when every one can.

    Checks SGX, Nitro, enclave devices, Kubernetes labels, attestation services, key files
    and the store."""
    from r3e_tee.config import load_config
    from r3e_tee.doctor import run_doctor

    s = cli_state(ctx)
    cfg = load_config(config_file).config
    if data_dir is not None:
        cfg = cfg.model_copy(
            update={"server": cfg.server.model_copy(update={"data_dir": data_dir.resolve()})}
        )
    report = run_doctor(cfg, root=root, network_timeout=timeout)
    if s.json:
        print_json(report.to_dict())
    else:
        colours = {"ok": "green", "warn": "yellow", "fail": "red"}
        rows = []
        for c in report.checks:
            rows.append(
                (
                    c.group,
                    c.name,
                    f"[{colours[c.status]}]{c.status.upper()}[/]",
                    escape(c.detail) + (f"\n[dim]fix: {escape(c.hint)}[/]" if c.hint else ""),
                )
            )
        print_table("r3e-tee doctor", ["area", "check", "status", "detail"], rows)
        verdict = ", ".join(f"{k}: {'can run' if v else 'CANNOT run'}" for k, v in report.providers.items())
        console.print(f"enabled providers: {verdict or '(none)'}")
    if not report.ok:
        raise typer.Exit(1)


def _register_commands() -> None:
    """Commands of the other layers live in their own modules."""
    from importlib import import_module

    for module in _COMMAND_MODULES:
        import_module(f"r3e_tee.cli.{module}").register(app)
    for group in (app, config_app):
        for info in group.registered_commands:
            name = info.name or (info.callback.__name__ if info.callback else "")
            examples = EXAMPLES.get(name if group is app else f"config {name}")
            if examples and not info.epilog:
                info.epilog = "Examples:\n\n" + "\n\n".join(f"  r3e-tee-cli {e}" for e in examples)


# Shown under each command's --help: what a first use looks like.
EXAMPLES: dict[str, tuple[str, ...]] = {
    "version": ("version", "--server https://tee.example.com -o json version"),
    "config validate": ("config validate /etc/r3e-tee/tee-config.yaml",),
    "doctor": ("doctor --config /etc/r3e-tee/tee-config.yaml",),
    "verify-evidence": (
        "verify-evidence quote.bin --collateral collateral.json",
        "verify-evidence nitro.cbor --pcr 0=HEX --policy policy.yaml -o json",
    ),
    "create-enclave": ("create-enclave --size 128M --wait", "create-enclave --provider sgx --size 2G"),
    "list-enclaves": ("list-enclaves --all",),
    "destroy-enclave": ("destroy-enclave ENCLAVE_ID   (the ID column of list-enclaves)",),
    "attestation-test": ("attestation-test", "attestation-test --provider sgx"),
    "deploy-function": (
        "deploy-function pricing.py --name pricing --runtime python",
        "deploy-function app.js --name hello --runtime javascript --secret api-key --min 1",
    ),
    "list-functions": ("list-functions -o json",),
    "invoke": (
        "invoke pricing --data '{\"amount\": 3}'",
        "invoke pricing --data @event.json --encrypt --save receipt.json",
    ),
    "get-invocation": (
        "get-invocation INVOCATION_ID --wait 30",
        "get-invocation INVOCATION_ID --save result.json",
    ),
    "verify-receipt": (
        "verify-receipt receipt.json --input event.json",
        "verify-receipt receipt.json --jwks jwks.json --policy policy.yaml --evidence",
    ),
    "put-secret": (
        "put-secret db-password --policy release.yaml --value-file password.txt",
        "put-secret api-key --policy release.yaml --value-env API_KEY",
    ),
    "list-secrets": ("list-secrets",),
    "delete-secret": ("delete-secret db-password",),
    "rotate-keys": ("rotate-keys", "rotate-keys --no-signing-keys --owner secret:db-password"),
    "list-keys": ("list-keys -o json",),
    "audit-log": ("audit-log --verify", "audit-log --action secret.deny --limit 20"),
}


_COMMAND_MODULES: list[str] = ["verify_evidence", "enclaves", "functions", "keys"]


def _wants_json(args: list[str]) -> bool:
    """Whether errors should be JSON: decided before typer parses, so usage errors agree too."""
    for i, arg in enumerate(args):
        if arg in ("-o", "--output") and i + 1 < len(args):
            return args[i + 1].lower() == "json"
        if arg in ("-ojson", "--output=json"):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    _register_commands()
    as_json = _wants_json(list(argv if argv is not None else sys.argv[1:]))
    try:
        # outside standalone mode click returns the code of typer.Exit instead of raising it
        result = app(args=argv, prog_name="r3e-tee-cli", standalone_mode=False)
    except R3ETeeError as exc:
        return report_error(exc, as_json=as_json)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        return 130
    except typer.TyperException as exc:  # usage errors: unknown option, bad value
        message = getattr(exc, "format_message", None)
        if as_json and callable(message) and type(exc).__name__ != "NoArgsIsHelpError":
            # a script asked for JSON: it gets JSON, not a usage banner it has to scrape
            ctx = getattr(exc, "ctx", None)
            command = getattr(ctx, "command_path", None) or "r3e-tee-cli"
            print_json({"error": "usage", "message": message(), "hint": f"see {command} --help"})
        else:
            show = getattr(exc, "show", None)
            if callable(show):
                show()
        return int(getattr(exc, "exit_code", 2))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
