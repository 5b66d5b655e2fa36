"""Table or JSON output, and uniform error reporting with exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from r3e_tee.errors import InvalidRequestError, R3ETeeError

PROVIDER_HELP = "sgx, nitro or simulation (simulation: no hardware protects the enclave; development only)"


def provider_choice(value: str) -> str:
    """``--provider`` checked before any request: a typo otherwise deploys a function no
    enclave can run (its measurement stays unknown) or fails a step of attestation-test."""
    from r3e_tee.config import KNOWN_PROVIDERS

    name = value.strip().lower()
    if name not in KNOWN_PROVIDERS:
        raise InvalidRequestError(
            f"--provider {value!r} is not a provider",
            hint=f"use one of {', '.join(KNOWN_PROVIDERS)} (`r3e-tee-cli doctor` shows which can run here)",
        )
    return name


console = Console()
err_console = Console(stderr=True)


@dataclass
class CliState:
    server: str
    token: str | None
    output: str  # "table" | "json"

    @property
    def json(self) -> bool:
        return self.output == "json"


def cli_state(ctx: Any) -> CliState:
    """The global options (--server, --token, -o) of the invocation."""
    obj = ctx.find_root().obj
    assert isinstance(obj, CliState)
    return obj


def service_client(ctx: Any, timeout: float = 120.0) -> Any:
    """A client of the service named by --server, with --token or the local dev token."""
    from r3e_tee.cli.client import ServiceClient

    s = cli_state(ctx)
    return ServiceClient(s.server, s.token, timeout=timeout)


def service_call(ctx: Any, method: str, path: str, **kwargs: Any) -> Any:
    """One request to the service, for a command that needs no more (the client is closed)."""
    c = service_client(ctx)
    try:
        return c.request(method, path, **kwargs)
    finally:
        c.close()


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


def report_error(exc: R3ETeeError, *, as_json: bool) -> int:
    if as_json:
        print_json(exc.to_dict())
    else:
        # soft_wrap: an error line stays one line, so it can be grepped and copied whole
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        if exc.hint:
            err_console.print(f"[yellow]fix:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
    return exc.exit_code
