"""doctor against fake filesystem roots: absent hardware, present hardware, enabled providers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r3e_tee.cli.main import main
from r3e_tee.config import TeeConfig, parse_config
from r3e_tee.doctor import run_doctor
from r3e_tee.providers.hardware import probe_nitro, probe_sgx

NO_TOOLS = {}.get  # which(): nothing on PATH


def fake_root(tmp_path: Path, *, sgx: bool = False, nitro: bool = False) -> Path:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "dev").mkdir()
    flags = "fpu vme sse2 avx2" + (" sgx sgx_lc" if sgx else "")
    (root / "proc" / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    (root / "proc" / "self").mkdir()
    (root / "proc" / "self" / "status").write_text("Name:\tpython\nSeccomp:\t0\n")
    if sgx:
        for dev in ("sgx_enclave", "sgx_provision"):
            (root / "dev" / dev).touch()
        node = root / "sys" / "devices" / "system" / "node" / "node0" / "x86"
        node.mkdir(parents=True)
        (node / "sgx_total_bytes").write_text(str(256 * 1024 * 1024))
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc" / "sgx_default_qcnl.conf").write_text(
            '{"pccs_url": "https://pccs:8081/sgx/certification/v4/"}'
        )
    if nitro:
        (root / "dev" / "nitro_enclaves").touch()
        (root / "etc" / "nitro_enclaves").mkdir(parents=True)
        (root / "etc" / "nitro_enclaves" / "allocator.yaml").write_text(
            "---\nmemory_mib: 4096\ncpu_count: 2\n"
        )
    return root


def tools(*names: str):  # type: ignore[no-untyped-def]
    return lambda name: f"/usr/bin/{name}" if name in names else None


def config(tmp_path: Path, providers: list[str]) -> TeeConfig:
    kek = tmp_path / "kek.key"
    kek.write_bytes(bytes(range(32)))
    kek.chmod(0o600)
    lines = [
        "server:",
        f"  data_dir: {tmp_path / 'data'}",
        "keys:",
        "  file:",
        f"    path: {kek}",
        "providers:",
    ]
    for p in providers:
        lines += [f"  - name: {p}", "    enabled: true"]
    return parse_config("\n".join(lines) + "\n", env={})


def test_no_tee_hardware_reports_absence_and_simulation_available(tmp_path: Path) -> None:
    report = run_doctor(config(tmp_path, ["simulation"]), root=fake_root(tmp_path), env={}, which=NO_TOOLS)
    by = {(c.group, c.name): c for c in report.checks}
    assert (
        by[("sgx", "provider")].status == "warn" and "no /dev/sgx_enclave" in by[("sgx", "provider")].detail
    )
    assert "sgx flag" in by[("sgx", "provider")].detail
    assert (
        by[("nitro", "provider")].status == "warn"
        and "no /dev/nitro_enclaves" in by[("nitro", "provider")].detail
    )
    assert by[("simulation", "provider")].status == "ok"
    assert by[("simulation", "bubblewrap")].status == "warn"  # no bwrap on this fake PATH
    assert report.ok and report.providers == {"simulation": True}


def test_enabled_but_missing_hardware_provider_fails(tmp_path: Path) -> None:
    report = run_doctor(
        config(tmp_path, ["sgx", "simulation"]), root=fake_root(tmp_path), env={}, which=NO_TOOLS
    )
    assert not report.ok and report.providers == {"sgx": False, "simulation": True}
    failing = {c.name for c in report.checks if c.status == "fail"}
    assert {"enclave device", "gramine-sgx", "provider"} <= failing


def test_present_hardware_passes(tmp_path: Path) -> None:
    root = fake_root(tmp_path, sgx=True, nitro=True)
    report = run_doctor(
        config(tmp_path, ["sgx", "nitro"]),
        root=root,
        env={},
        which=tools("gramine-sgx", "nitro-cli", "bwrap"),
    )
    assert report.providers == {"sgx": True, "nitro": True}
    details = " ".join(c.detail for c in report.checks)
    assert "EPC 256 MiB" in details and "allocator: 4096 MiB, 2 CPUs" in details
    assert "sgx_default_qcnl.conf present" in details
    fails = [c for c in report.checks if c.status == "fail"]
    assert report.ok, fails


def test_legacy_isgx_driver_counts_and_missing_provision_warns(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    (root / "proc" / "cpuinfo").write_text("flags\t: sgx sgx_lc\n")
    (root / "dev" / "isgx").touch()
    probe = probe_sgx(root, tools("gramine-sgx"))
    assert probe.available
    assert any("legacy /dev/isgx" in f.detail for f in probe.findings)
    assert any(f.name == "provisioning device" and not f.ok and not f.required for f in probe.findings)


def test_bad_allocator_is_reported(tmp_path: Path) -> None:
    root = fake_root(tmp_path, nitro=True)
    (root / "etc" / "nitro_enclaves" / "allocator.yaml").write_text("memory_mib: lots\n")
    probe = probe_nitro(root, tools("nitro-cli"))
    alloc = next(f for f in probe.findings if f.name == "allocator")
    assert not alloc.ok and "memory_mib" in alloc.detail
    assert probe.available  # the allocator is advisory


def test_kubernetes_labels_from_the_downward_api(tmp_path: Path) -> None:
    root = fake_root(tmp_path, sgx=True)
    podinfo = root / "etc" / "podinfo"
    podinfo.mkdir(parents=True)
    (podinfo / "labels").write_text('app="r3e-tee"\ntee.intel.com/sgx="true"\n')
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    report = run_doctor(config(tmp_path, ["sgx", "nitro"]), root=root, env=env, which=tools("gramine-sgx"))
    by = {c.name: c for c in report.checks if c.group == "kubernetes"}
    assert by["label tee.intel.com/sgx"].status == "ok"
    assert by["label tee.aws.com/nitro"].status == "warn" and "kubectl label node" in (
        by["label tee.aws.com/nitro"].hint or ""
    )


def test_unreachable_attestation_service_warns_fast(tmp_path: Path) -> None:
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = parse_config(
        f"server:\n  data_dir: {tmp_path}\nproviders:\n  - name: nitro\n    attestation:\n"
        f"      service: http://127.0.0.1:{port}/\n",
        env={},
    )
    start = time.monotonic()
    report = run_doctor(cfg, root=fake_root(tmp_path), env={}, which=NO_TOOLS, network_timeout=1.0)
    assert time.monotonic() - start < 5
    svc = next(c for c in report.checks if c.group == "attestation-services")
    assert svc.status == "warn" and "unreachable" in svc.detail


def test_unreachable_postgres_store_fails(tmp_path: Path) -> None:
    cfg = parse_config("store:\n  url: postgresql://nobody@127.0.0.1:1/db\n  connect_timeout: 1\n", env={})
    report = run_doctor(cfg, root=fake_root(tmp_path), env={}, which=NO_TOOLS)
    store = next(c for c in report.checks if c.group == "store")
    assert store.status == "fail" and "127.0.0.1:1" in store.detail


def test_cli_doctor_json_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fake_root(tmp_path)
    good = tmp_path / "sim.yaml"
    good.write_text(f"server:\n  data_dir: {tmp_path / 'data'}\n")
    assert main(["-o", "json", "doctor", "--config", str(good), "--root", str(root)]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["ok"] is True and body["providers"] == {"simulation": True}
    sgx = tmp_path / "sgx.yaml"
    sgx.write_text(f"server:\n  data_dir: {tmp_path / 'data'}\nproviders:\n  - name: sgx\n")
    assert main(["doctor", "--config", str(sgx), "--root", str(root), "--timeout", "0.5"]) == 1
    out = capsys.readouterr().out
    assert "CANNOT run" in out


def test_kek_file_checks(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    kek = tmp_path / "kek.key"
    cfg = parse_config(
        f"keys:\n  file:\n    path: {kek}\nproviders:\n  - name: sgx\n    enabled: false\n", env={}
    )

    def kek_check() -> tuple[str, str]:
        c = next(
            c for c in run_doctor(cfg, root=root, env={}, which=NO_TOOLS).checks if c.name == "KEK (file)"
        )
        return c.status, c.detail

    assert kek_check()[0] == "fail" and "missing" in kek_check()[1]
    kek.write_bytes(b"\x01" * 16)
    assert kek_check()[0] == "fail" and "16 bytes" in kek_check()[1]
    kek.write_bytes(bytes(range(32)))
    kek.chmod(0o644)  # the service refuses to open it (keys/kek.py), so the doctor fails it
    assert kek_check()[0] == "fail" and "every user of this host" in kek_check()[1]
    kek.chmod(0o640)  # the Secret volume's 0440 with this process's group: allowed, noted
    assert kek_check()[0] == "warn"
    kek.chmod(0o600)
    status, detail = kek_check()
    assert status == "ok" and bytes(range(32)).hex() not in detail


def test_pkcs11_pin_file_checks(tmp_path: Path) -> None:
    """The service refuses a missing or exposed PIN file (keys/kek.py); the doctor used to call
    the PKCS#11 KEK ok whenever the module existed."""
    root = fake_root(tmp_path)
    module, pin = tmp_path / "libfake-pkcs11.so", tmp_path / "pin"
    module.write_bytes(b"")
    cfg = parse_config(
        f"keys:\n  kek_provider: pkcs11\n  pkcs11:\n    module: {module}\n    token_label: t\n"
        f"    key_label: k\n    pin_file: {pin}\nproviders:\n  - name: sgx\n    enabled: false\n",
        env={},
    )

    def pkcs11_check() -> tuple[str, str]:
        c = next(
            c for c in run_doctor(cfg, root=root, env={}, which=NO_TOOLS).checks if c.name == "KEK (PKCS#11)"
        )
        return c.status, c.detail

    assert pkcs11_check() == ("fail", f"PIN file {pin}: No such file or directory")
    pin.write_text("123456\n")
    pin.chmod(0o644)
    status, detail = pkcs11_check()
    assert status == "fail" and "not private: mode 644" in detail and "123456" not in detail
    pin.chmod(0o600)
    assert pkcs11_check()[0] == "ok"
