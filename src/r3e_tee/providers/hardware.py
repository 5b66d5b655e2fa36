"""What TEE hardware and tooling this host has, read from the filesystem.

Every probe takes a ``root`` so tests run against fake filesystem trees, and returns the
reasons in words an operator can act on. Providers use the same probes to refuse a create
on a host that cannot run them, with the doctor's explanation.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Which = Callable[[str], str | None]


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    detail: str
    hint: str | None = None
    required: bool = True  # False: a missing item is a warning, not a blocker


@dataclass(frozen=True)
class ProviderProbe:
    provider: str
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def available(self) -> bool:
        return all(f.ok for f in self.findings if f.required)

    def explanation(self) -> str:
        missing = [f for f in self.findings if f.required and not f.ok]
        if not missing:
            return f"{self.provider}: available"
        return f"{self.provider} cannot run on this host: " + "; ".join(
            f.detail + (f" ({f.hint})" if f.hint else "") for f in missing
        )


def _p(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def cpu_flags(root: Path) -> set[str]:
    try:
        text = _p(root, "/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def epc_bytes(root: Path) -> int | None:
    """Total EPC from sysfs (Linux >= 6.0 exposes it per NUMA node); None when not visible."""
    total, seen = 0, False
    for f in sorted(_p(root, "/sys/devices/system/node").glob("node*/x86/sgx_total_bytes")):
        try:
            total += int(f.read_text().strip())
            seen = True
        except (OSError, ValueError):
            continue
    return total if seen else None


def probe_sgx(root: Path = Path("/"), which: Which = shutil.which) -> ProviderProbe:
    flags = cpu_flags(root)
    enclave_dev = _p(root, "/dev/sgx_enclave").exists()
    legacy_dev = _p(root, "/dev/isgx").exists()
    provision = _p(root, "/dev/sgx_provision").exists()
    findings = [
        Finding(
            "cpu flag sgx",
            "sgx" in flags,
            "CPU advertises SGX" if "sgx" in flags else "CPU does not advertise the sgx flag",
            None
            if "sgx" in flags
            else "enable SGX in the BIOS, or schedule on an SGX node (label tee.intel.com/sgx=true)",
        ),
        Finding(
            "cpu flag sgx_lc",
            "sgx_lc" in flags,
            "flexible launch control (sgx_lc) present"
            if "sgx_lc" in flags
            else "no flexible launch control (sgx_lc): the in-kernel driver needs it",
            None if "sgx_lc" in flags else "use a CPU/BIOS with FLC enabled",
        ),
        Finding(
            "enclave device",
            enclave_dev or legacy_dev,
            "/dev/sgx_enclave present"
            if enclave_dev
            else ("legacy /dev/isgx present (out-of-tree driver)" if legacy_dev else "no /dev/sgx_enclave"),
            None
            if enclave_dev or legacy_dev
            else "load the in-kernel SGX driver (Linux >= 5.11) and expose the device to the pod "
            "(SGX device plugin, resource sgx.intel.com/epc)",
        ),
        Finding(
            "provisioning device",
            provision,
            "/dev/sgx_provision present"
            if provision
            else "no /dev/sgx_provision: DCAP quotes cannot be made",
            None if provision else "expose /dev/sgx_provision (SGX device plugin with provision enabled)",
            required=False,
        ),
    ]
    gramine = which("gramine-sgx")
    findings.append(
        Finding(
            "gramine-sgx",
            gramine is not None,
            f"gramine-sgx at {gramine}" if gramine else "gramine-sgx not found on PATH",
            None if gramine else "install Gramine (https://gramine.readthedocs.io) in the worker image",
        )
    )
    epc = epc_bytes(root)
    findings.append(
        Finding(
            "EPC size",
            True,
            f"EPC {epc // (1024 * 1024)} MiB" if epc is not None else "EPC size not visible here",
            required=False,
        )
    )
    qcnl = _p(root, "/etc/sgx_default_qcnl.conf")
    findings.append(
        Finding(
            "DCAP QCNL configuration",
            qcnl.exists(),
            f"{qcnl.relative_to(root)} present" if qcnl.exists() else "/etc/sgx_default_qcnl.conf missing",
            None if qcnl.exists() else "install the DCAP QPL and point pccs_url at your PCCS",
            required=False,
        )
    )
    return ProviderProbe("sgx", tuple(findings))


def probe_nitro(root: Path = Path("/"), which: Which = shutil.which) -> ProviderProbe:
    dev = _p(root, "/dev/nitro_enclaves").exists()
    cli = which("nitro-cli")
    allocator = _p(root, "/etc/nitro_enclaves/allocator.yaml")
    alloc_detail = "allocator configuration missing (/etc/nitro_enclaves/allocator.yaml)"
    alloc_ok = False
    if allocator.exists():
        try:
            from r3e_tee.providers.nitro_allocator import read_allocator

            mem, cpus = read_allocator(allocator)
            alloc_detail = f"allocator: {mem} MiB, {cpus} CPUs for enclaves"
            alloc_ok = True
        except (OSError, ValueError) as exc:
            alloc_detail = f"allocator configuration unreadable: {exc}"
    findings = (
        Finding(
            "nitro device",
            dev,
            "/dev/nitro_enclaves present" if dev else "no /dev/nitro_enclaves",
            None
            if dev
            else "run on a Nitro-enabled EC2 instance with enclave support, expose the device "
            "(resource aws.amazon.com/nitro_enclaves, label tee.aws.com/nitro=true)",
        ),
        Finding(
            "nitro-cli",
            cli is not None,
            f"nitro-cli at {cli}" if cli else "nitro-cli not found on PATH",
            None if cli else "install aws-nitro-enclaves-cli in the worker image",
        ),
        Finding(
            "allocator",
            alloc_ok,
            alloc_detail,
            None if alloc_ok else "set memory_mib and cpu_count in /etc/nitro_enclaves/allocator.yaml",
            required=False,
        ),
    )
    return ProviderProbe("nitro", findings)


def seccomp_available(root: Path = Path("/")) -> bool:
    try:
        status = _p(root, "/proc/self/status").read_text()
    except OSError:
        return False
    return any(line.startswith("Seccomp:") for line in status.splitlines())


def probe_simulation(root: Path = Path("/"), which: Which = shutil.which) -> ProviderProbe:
    bwrap = which("bwrap")
    findings = (
        Finding("process isolation", True, "separate processes with rlimits"),
        Finding(
            "bubblewrap",
            bwrap is not None,
            f"bubblewrap at {bwrap}"
            if bwrap
            else "bubblewrap (bwrap) not found: enclaves run without a network namespace and read-only root",
            None if bwrap else "apt-get install bubblewrap",
            required=False,
        ),
        Finding(
            "seccomp",
            seccomp_available(root),
            "seccomp filters available" if seccomp_available(root) else "seccomp not visible",
            required=False,
        ),
    )
    return ProviderProbe("simulation", findings)


def probe_provider(name: str, root: Path = Path("/"), which: Which = shutil.which) -> ProviderProbe:
    probes = {"sgx": probe_sgx, "nitro": probe_nitro, "simulation": probe_simulation}
    return probes[name](root, which)


def in_enclave_devices(root: Path = Path("/")) -> dict[str, bool]:
    return {
        "/dev/attestation": _p(root, "/dev/attestation").exists(),
        "/dev/nsm": _p(root, "/dev/nsm").exists(),
    }


def default_which(path_env: str | None = None) -> Which:
    return lambda name: shutil.which(name, path=path_env or os.environ.get("PATH"))
