"""``r3e-tee-service``: start the TEE service (control plane, attestation, embedded worker)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvicorn

from r3e_tee import __version__
from r3e_tee.config import TeeConfig, load_config, port_number
from r3e_tee.errors import ConfigError, R3ETeeError
from r3e_tee.logging import configure_logging
from r3e_tee.service.app import ServiceContext, create_app
from r3e_tee.service.auth import TokenAuthority, ensure_dev_admin_token, read_token_file, token_hash
from r3e_tee.store import open_store, redact_url

log = logging.getLogger("r3e_tee.service")

DEV_DATA_DIR = Path(".r3e-tee")

_EPILOG = """\
Configuration is read from --config, else $R3E_TEE_CONFIG, else /etc/r3e-tee/tee-config.yaml,
else built-in defaults (SQLite in the data directory, simulation provider only).
Every flag also reads an environment variable (shown in brackets).

Development (what `make run` does):
  r3e-tee-service --dev --data-dir .r3e-tee
    generates <data-dir>/admin-token (mode 0600; r3e-tee-cli finds it by itself for a local
    server), a development KEK and token signing keys, and accepts simulated attestation
    evidence. Never use --dev in production.

Production:
  r3e-tee-service --config /etc/r3e-tee/tee-config.yaml --host 0.0.0.0 --port 8080
    admin tokens come from server.admin_token_hashes or server.admin_token_file; nothing
    secret is generated.
"""


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="r3e-tee-service",
        description="R3E TEE Service: enclaves, remote attestation, attestation-gated secrets and "
        "verifiable function execution over HTTP.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", default=os.environ.get("R3E_TEE_CONFIG"), help="tee-config.yaml [R3E_TEE_CONFIG]"
    )
    p.add_argument(
        "--host",
        default=os.environ.get("R3E_TEE_HOST"),
        help="listen address (default 127.0.0.1, this machine only; 0.0.0.0 listens on every "
        "interface) [R3E_TEE_HOST]",
    )
    p.add_argument(
        "--port",
        type=port_number,
        default=os.environ.get("R3E_TEE_PORT"),
        help="listen port, 1-65535 (default 8080 or server.port) [R3E_TEE_PORT]",
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("R3E_TEE_DATA_DIR"),
        help="state directory: store, keys, --dev admin token (default /var/lib/r3e-tee, "
        "with --dev .r3e-tee) [R3E_TEE_DATA_DIR]",
    )
    p.add_argument(
        "--dev",
        action="store_true",
        default=_env_bool("R3E_TEE_DEV"),
        help="development mode: generated admin token, KEK and keys; simulated evidence accepted "
        "(UNSAFE outside development) [R3E_TEE_DEV]",
    )
    p.add_argument("--version", action="version", version=f"r3e-tee-service {__version__}")
    return p


def effective_config(config: TeeConfig, args: argparse.Namespace) -> TeeConfig:
    """Flags override the file; --dev turns on the development defaults, loudly."""
    server: dict[str, object] = {}
    if args.host:
        server["host"] = args.host
    if args.port:
        server["port"] = int(args.port)
    if args.data_dir:
        server["data_dir"] = Path(args.data_dir).resolve()
    elif args.dev and config.server.data_dir == TeeConfig().server.data_dir:
        server["data_dir"] = DEV_DATA_DIR.resolve()
    if args.dev:
        server["dev"] = True
    updated = config.model_copy(update={"server": config.server.model_copy(update=server)})
    if updated.server.dev:
        updated = updated.model_copy(
            update={"attestation": updated.attestation.model_copy(update={"allow_simulation": True})}
        )
    return updated


def _static_token_hashes(config: TeeConfig) -> list[str]:
    hashes = list(config.server.admin_token_hashes)
    if config.server.admin_token_file:
        hashes += [token_hash(t) for t in read_token_file(config.server.admin_token_file)]
    return hashes


def _write_dev_discovery(config: TeeConfig, token_file: Path) -> None:
    """Tell r3e-tee-cli on this machine where the dev admin token of this port lives."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "r3e-tee"
    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        (state / f"dev-{config.server.port}.json").write_text(
            json.dumps({"port": config.server.port, "admin_token_file": str(token_file.resolve())})
        )
    except OSError as exc:
        log.warning("cannot write the dev discovery file", extra={"error": exc.strerror})


def prepare_data_dir(data_dir: Path) -> None:
    """Create the data directory, or say which path is unusable and how to fix it."""
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(
            f"the data directory {data_dir} is a file, not a directory",
            key_path="server.data_dir",
            hint="pass --data-dir (or R3E_TEE_DATA_DIR) naming a directory",
        )
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the data directory {data_dir}: {exc.strerror}",
            key_path="server.data_dir",
            hint="pass --data-dir (or R3E_TEE_DATA_DIR) naming a directory this user can create and write",
        ) from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise ConfigError(
            f"the data directory {data_dir} is not writable by this user",
            key_path="server.data_dir",
            hint="fix its owner or mode, or pass another --data-dir (or R3E_TEE_DATA_DIR)",
        )


def check_listen_address(host: str, port: int) -> None:
    """Fail before setting anything up when the address cannot be bound.

    Otherwise the store is migrated, a --dev run rewrites the CLI's token discovery file for
    the port (pointing a running service's CLI users at the wrong token), and only then does
    uvicorn log a bind error.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            key, hint = "server.port", "another process listens there: stop it, or pick another --port"
        else:
            key, hint = "server.host", "--host must be an address of this machine, e.g. 127.0.0.1 or 0.0.0.0"
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}", key_path=key, hint=hint) from None


def build_context(config: TeeConfig) -> ServiceContext:
    """Open and migrate the store, set up auth and components. Raises R3ETeeError on bad setup."""
    data_dir = config.server.data_dir
    prepare_data_dir(data_dir)
    store = open_store(
        config.store_url, pool_size=config.store.pool_size, connect_timeout=config.store.connect_timeout
    )
    try:
        applied = store.migrate()
        if applied:
            log.info("store migrated", extra={"store": redact_url(store.url), "applied": applied})
        hashes = _static_token_hashes(config)
        if config.server.dev:
            token_file, created = ensure_dev_admin_token(data_dir)
            hashes.append(token_hash(read_token_file(token_file)[0]))
            _write_dev_discovery(config, token_file)
            log.warning(
                "DEVELOPMENT MODE: simulated attestation evidence is accepted and secrets are "
                "generated locally; never use --dev in production",
                extra={"admin_token_file": str(token_file), "token_created": created},
            )
        elif not hashes:
            log.warning(
                "no admin token configured: admin routes will refuse every request; set "
                "server.admin_token_hashes or server.admin_token_file"
            )
        ctx = ServiceContext(
            config=config,
            store=store,
            tokens=TokenAuthority(store, hashes),
            data_dir=data_dir,
            dev=config.server.dev,
        )
        from r3e_tee.service.components import install_components

        install_components(ctx)
    except BaseException:
        store.close()
        raise
    return ctx


class _GracefulServer(uvicorn.Server):
    """SIGTERM/SIGINT drain in-flight requests, then the process exits 0.

    uvicorn re-raises the captured signal after draining, which makes a clean Kubernetes stop
    look like a crash (exit 143); a drained stop is a success.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        loaded = load_config(args.config or None)
        config = effective_config(loaded.config, args)
        configure_logging(config.server.log_level)
        log.info(
            "configuration loaded",
            extra={"source": loaded.source, "providers": list(config.enabled_providers)},
        )
        check_listen_address(config.server.host, config.server.port)
        ctx = build_context(config)
    except R3ETeeError as exc:
        print(f"r3e-tee-service: {exc}", file=sys.stderr)
        return exc.exit_code

    app = create_app(ctx)
    # Everything built so far lives as long as the process: keep it out of the collector's
    # full passes, which otherwise walk it all (tens of ms, a latency spike) every so often.
    gc.collect()
    gc.freeze()
    server = _GracefulServer(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=int(config.server.shutdown_grace_period),
            server_header=False,
        )
    )
    server.run()
    log.info("service stopped")
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
