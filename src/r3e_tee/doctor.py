"""``r3e-tee-cli doctor``: the deployment guide's troubleshooting list as checks.

Each check is OK, WARN or FAIL with a hint. FAIL is reserved for what stops an *enabled*
part from working (an enabled provider without its hardware, a bad key file, an unreachable
store); everything else that is merely absent is a WARN with the reason.
"""

from __future__ import annotations

import concurrent.futures
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx

from r3e_tee.config import TeeConfig, check_key_files
from r3e_tee.errors import StoreError
from r3e_tee.fsio import secret_file_exposure
from r3e_tee.providers.hardware import (
    Which,
    default_which,
    in_enclave_devices,
    probe_provider,
)
from r3e_tee.store import open_store, redact_url

Status = Literal["ok", "warn", "fail"]

NODE_LABELS = {"sgx": "tee.intel.com/sgx", "nitro": "tee.aws.com/nitro"}


@dataclass(frozen=True)
class Check:
    group: str
    name: str
    status: Status
    detail: str
    hint: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "group": self.group,
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
            "hint": self.hint,
        }


@dataclass(frozen=True)
class DoctorReport:
    checks: tuple[Check, ...]
    providers: Mapping[str, bool]  # enabled provider -> can run here

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "providers": dict(self.providers),
            "checks": [c.to_dict() for c in self.checks],
        }


def _provider_checks(config: TeeConfig, root: Path, which: Which) -> tuple[list[Check], dict[str, bool]]:
    checks: list[Check] = []
    runnable: dict[str, bool] = {}
    enabled = set(config.enabled_providers)
    for name in ("sgx", "nitro", "simulation"):
        probe = probe_provider(name, root, which)
        is_enabled = name in enabled
        missing = [f for f in probe.findings if f.required and not f.ok]
        if is_enabled:
            runnable[name] = probe.available
            # an enabled provider shows every finding: the operator is setting it up
            for f in probe.findings:
                status: Status = "ok" if f.ok else ("fail" if f.required else "warn")
                checks.append(Check(name, f.name, status, f.detail, None if f.ok else f.hint))
        state = "enabled" if is_enabled else "not enabled"
        if probe.available:
            checks.append(Check(name, "provider", "ok", f"{name} provider available ({state})"))
        else:
            checks.append(
                Check(
                    name,
                    "provider",
                    "fail" if is_enabled else "warn",
                    f"{name} absent on this host ({state}): " + "; ".join(f.detail for f in missing),
                    missing[0].hint,
                )
            )
    return checks, runnable


def _enclave_device_checks(root: Path) -> list[Check]:
    out = []
    for path, present in in_enclave_devices(root).items():
        out.append(
            Check(
                "inside-enclave",
                path,
                "ok",
                f"{path} present (running inside an enclave)"
                if present
                else f"{path} absent (expected outside an enclave)",
            )
        )
    return out


def _kubernetes_checks(config: TeeConfig, env: Mapping[str, str], root: Path) -> list[Check]:
    if not env.get("KUBERNETES_SERVICE_HOST"):
        return [Check("kubernetes", "environment", "ok", "not running in Kubernetes")]
    podinfo = Path(env.get("R3E_TEE_PODINFO_DIR", "/etc/podinfo"))
    podinfo = root / str(podinfo).lstrip("/")
    labels: dict[str, str] = {}
    found = None
    for name in ("node-labels", "labels"):
        f = podinfo / name
        if f.exists():
            found = f
            for line in f.read_text(errors="replace").splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    labels[key.strip()] = value.strip().strip('"')
    if found is None:
        return [
            Check(
                "kubernetes",
                "node labels",
                "warn",
                f"labels not exposed through the downward API at {podinfo}",
                "mount a downwardAPI volume with the pod's labels at /etc/podinfo (the Helm chart does)",
            )
        ]
    out = []
    for provider in config.enabled_providers:
        if provider not in NODE_LABELS:
            continue
        label = NODE_LABELS[provider]
        label_value = labels.get(label)
        ok = label_value == "true"
        out.append(
            Check(
                "kubernetes",
                f"label {label}",
                "ok" if ok else "warn",
                f"{label}={label_value}" if label_value is not None else f"{label} not set",
                None if ok else f"label the node: kubectl label node <node> {label}=true",
            )
        )
    return out or [Check("kubernetes", "node labels", "ok", f"read from {found}")]


def _reach(url: str, timeout: float) -> tuple[bool, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return False, f"scheme {parts.scheme}:// is not reachable from outside an enclave"
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=timeout)) as client:
            resp = client.head(url)
        return True, f"reachable (HTTP {resp.status_code})"
    except httpx.TimeoutException:
        return False, f"unreachable: no answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        text = str(exc)
        return False, f"unreachable: {text.splitlines()[0] if text else type(exc).__name__}"


def _service_checks(config: TeeConfig, timeout: float) -> list[Check]:
    targets: list[tuple[str, str]] = []
    for p in config.providers:
        if p.enabled and p.attestation.service:
            targets.append((f"{p.name} attestation service", p.attestation.service))
    if "sgx" in config.enabled_providers:
        collateral = config.attestation.collateral
        targets.append(("DCAP collateral (PCCS/PCS)", collateral.pccs_url or collateral.pcs_url))
    if not targets:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(targets)) as pool:
        results = list(pool.map(lambda t: _reach(t[1], timeout), targets))
    out = []
    for (name, url), (ok, detail) in zip(targets, results, strict=True):
        out.append(
            Check(
                "attestation-services",
                name,
                "ok" if ok else "warn",
                f"{url}: {detail}",
                None if ok else "check egress rules, proxy settings and DNS for this URL",
            )
        )
    return out


def _key_checks(config: TeeConfig) -> list[Check]:
    problems = check_key_files(config)
    out = [Check("keys", e.key_path or "key file", "fail", e.message, e.hint) for e in problems]
    bad = {e.key_path for e in problems}
    for i, p in enumerate(config.providers):
        key_path = f"providers[{i}].attestation.keyFile"
        if p.enabled and p.attestation.key_file and key_path not in bad:
            out.append(Check("keys", key_path, "ok", f"{p.attestation.key_file} is a readable PEM key"))
    if not out:
        out.append(
            Check(
                "keys",
                "attestation keys",
                "ok",
                "no key files configured: token signing keys are generated in --dev; in production "
                "mount the Secret tee-attestation-keys and set attestation.keyFile",
            )
        )
    return out


def _kek_check(config: TeeConfig) -> Check:
    """The key-encryption key the service will open at start (never read into the report)."""
    keys = config.keys
    if keys.kek_provider == "pkcs11":
        module = keys.pkcs11.module
        if not module.exists():
            return Check(
                "keys",
                "KEK (PKCS#11)",
                "fail",
                f"PKCS#11 module {module} not found",
                "install the HSM's PKCS#11 library (SoftHSM2: apt-get install softhsm2) "
                "or fix keys.pkcs11.module",
            )
        pin_file = keys.pkcs11.pin_file
        if pin_file is not None:  # the same checks the service makes before it reads the PIN
            try:
                exposed = secret_file_exposure(Path(pin_file).stat())
            except OSError as exc:
                return Check(
                    "keys",
                    "KEK (PKCS#11)",
                    "fail",
                    f"PIN file {pin_file}: {exc.strerror}",
                    "mount the Secret r3e-tee-pkcs11-pin at keys.pkcs11.pin_file",
                )
            if exposed is not None:
                return Check(
                    "keys",
                    "KEK (PKCS#11)",
                    "fail",
                    f"PIN file {pin_file} is not private: {exposed}",
                    "chmod 600",
                )
        return Check("keys", "KEK (PKCS#11)", "ok", f"module {module}, token {keys.pkcs11.token_label!r}")
    path = keys.file.path or config.server.data_dir / "kek.key"
    if not path.exists():
        if config.server.dev or config.enabled_providers == ("simulation",):
            return Check("keys", "KEK (file)", "ok", f"{path} absent: generated at first start (development)")
        return Check(
            "keys",
            "KEK (file)",
            "fail",
            f"KEK file {path} missing",
            "mount the Secret r3e-tee-kek (32 random bytes: openssl rand -out kek.key 32) at keys.file.path",
        )
    try:
        st = path.stat()
        size, mode = st.st_size, st.st_mode & 0o777
    except OSError as exc:
        return Check(
            "keys", "KEK (file)", "fail", f"{path}: {exc.strerror}", "make it readable by the service"
        )
    if size != 32:
        return Check(
            "keys", "KEK (file)", "fail", f"{path} holds {size} bytes, not 32", "write 32 raw random bytes"
        )
    exposed = secret_file_exposure(st)
    if exposed is not None:  # the service refuses to start with it (keys/kek.py)
        return Check("keys", "KEK (file)", "fail", f"{path} is not private: {exposed}", "chmod 600")
    if mode & 0o077:
        return Check(
            "keys", "KEK (file)", "warn", f"{path} is readable by others (mode {mode:o})", "chmod 600"
        )
    return Check("keys", "KEK (file)", "ok", f"{path}: 32 bytes, mode {mode:o}")


def _store_check(config: TeeConfig) -> Check:
    url = config.store_url
    if url.startswith("sqlite://"):
        path = Path(url[len("sqlite:///") :])
        if not path.exists():
            parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
            writable = parent is not None and os.access(parent, os.W_OK)
            return Check(
                "store",
                "reachable",
                "ok" if writable else "fail",
                f"SQLite store {path} not created yet"
                + (
                    "; the service creates it on first start"
                    if writable
                    else " and its directory is not writable"
                ),
                None if writable else "set server.data_dir (--data-dir) to a writable directory",
            )
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
            try:
                version = conn.execute("SELECT coalesce(max(version),0) FROM schema_migrations").fetchone()[0]
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return Check(
                "store", "reachable", "fail", f"SQLite store {path}: {exc}", "check the file's permissions"
            )
        return Check("store", "reachable", "ok", f"SQLite store {path}, schema version {version}")
    try:
        store = open_store(url, pool_size=1, connect_timeout=min(config.store.connect_timeout, 3.0))
        try:
            version = store.schema_version()
        finally:
            store.close()
    except StoreError as exc:
        return Check("store", "reachable", "fail", exc.message, exc.hint)
    return Check("store", "reachable", "ok", f"{redact_url(url)}, schema version {version}")


def run_doctor(
    config: TeeConfig,
    *,
    root: Path = Path("/"),
    env: Mapping[str, str] | None = None,
    which: Which | None = None,
    network_timeout: float = 2.0,
) -> DoctorReport:
    env = os.environ if env is None else env
    which = which or default_which(env.get("PATH"))
    checks, runnable = _provider_checks(config, root, which)
    checks += _enclave_device_checks(root)
    checks += _kubernetes_checks(config, env, root)
    checks += _service_checks(config, network_timeout)
    checks += _key_checks(config)
    checks.append(_kek_check(config))
    checks.append(_store_check(config))
    return DoctorReport(tuple(checks), runnable)
