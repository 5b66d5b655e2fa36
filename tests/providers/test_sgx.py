"""The SGX provider against fake Gramine tools, a fake /dev/attestation and a fake quoting enclave.

The enclave runtime that runs "inside" is the real one (python -m r3e_tee.runtime.enclave, as the
rendered manifest says); its quotes are real DCAP quotes made by the test platform, verified here
with the real verifier.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hw_fakes import build_sigstruct, calls, make_sgx_root

from r3e_tee.attestation.binding import report_data_for
from r3e_tee.attestation.dcap import verify_dcap
from r3e_tee.config import ProviderConfig, ServerConfig, TeeConfig
from r3e_tee.errors import CapacityError, ConfigError, EnclaveError, ProviderError, ProviderUnavailableError
from r3e_tee.evidence.dcap_builder import DcapPlatform
from r3e_tee.evidence.dcap_collateral import QuoteCollateral
from r3e_tee.providers.base import EnclaveHandle, EnclaveSpec
from r3e_tee.providers.sgx import (
    SgxProvider,
    enclave_size_for,
    gramine_size,
    load_signing_key,
    mrsigner_of,
    parse_sigstruct,
)

MIB = 1024 * 1024


def provider(tmp_path: Path, key: Path, root: Path, env: dict[str, str], **kw: Any) -> SgxProvider:
    kw.setdefault("min_enclave_size", 0)
    kw.setdefault("start_timeout", 20.0)
    return SgxProvider(tmp_path / "data", signing_key=key, host_root=root, env=env, **kw)


def spec(size: int = 100 * MIB, *, debug: bool = False, eid: str | None = None) -> EnclaveSpec:
    return EnclaveSpec(id=eid or os.urandom(8).hex(), size_bytes=size, debug=debug)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- pure parts -----------------------------------------------------------------------------------


def test_enclave_size_is_the_power_of_two_at_or_above_the_request() -> None:
    assert enclave_size_for(100 * MIB) == 128 * MIB
    assert enclave_size_for(128 * MIB) == 128 * MIB
    assert enclave_size_for(129 * MIB) == 256 * MIB
    assert enclave_size_for(100 * MIB, 512 * MIB) == 512 * MIB
    assert enclave_size_for(1) == 1
    assert [gramine_size(n) for n in (128 * MIB, 2048 * MIB, 64 * 1024, 3)] == ["128M", "2G", "64K", "3"]


def test_sigstruct_fields_and_signature(enclave_signing_key: tuple[Path, rsa.RSAPrivateKey]) -> None:
    _, key = enclave_signing_key
    manifest = b'sgx.enclave_size = "128M"\n'
    raw = build_sigstruct(manifest, key, debug=True, isvprodid=7, isvsvn=3)
    sig = parse_sigstruct(raw)
    assert sig.mrenclave == hashlib.sha256(manifest).digest()
    assert sig.mrsigner == mrsigner_of(key.public_key())
    assert (sig.debug, sig.isv_prod_id, sig.isv_svn, sig.exponent) == (True, 7, 3, 3)
    assert not parse_sigstruct(build_sigstruct(manifest, key, debug=False)).debug

    tampered = bytearray(raw)
    tampered[960] ^= 1  # MRENCLAVE is signed
    with pytest.raises(ProviderError, match="signature does not verify"):
        parse_sigstruct(bytes(tampered))
    assert parse_sigstruct(bytes(tampered), verify_signature=False).mrenclave[0] == raw[960] ^ 1
    with pytest.raises(ProviderError, match="1807 bytes"):
        parse_sigstruct(raw[:-1])
    with pytest.raises(ProviderError, match="headers"):
        parse_sigstruct(b"\0" * 1808)


def test_signing_key_must_be_rsa3072_exponent_3(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    wrong = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "wrong.pem"
    path.write_bytes(
        wrong.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ProviderError, match="RSA-3072 with public exponent 3") as err:
        load_signing_key(path)
    assert "openssl genrsa -3" in str(err.value)
    with pytest.raises(ProviderError, match="cannot read"):
        load_signing_key(tmp_path / "missing.pem")


# --- configuration --------------------------------------------------------------------------------


def test_from_config_needs_a_signing_key_outside_development(tmp_path: Path, sgx_root: Path) -> None:
    sgx = ProviderConfig(name="sgx", options={"host_root": str(sgx_root)})
    with pytest.raises(ConfigError) as err:
        SgxProvider.from_config(TeeConfig(providers=(sgx,)), tmp_path)
    assert "providers[sgx].options.signing_key" in str(err.value)

    dev = TeeConfig(server=ServerConfig(dev=True), providers=(sgx,))
    p = SgxProvider.from_config(dev, tmp_path)
    key_path = tmp_path / "sgx" / "dev-enclave-signing-key.pem"
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert p.mrsigner == mrsigner_of(load_signing_key(key_path).public_key())
    assert SgxProvider.from_config(dev, tmp_path).mrsigner == p.mrsigner  # generated once
    assert p.total_bytes() == 4 << 30  # from the fake sysfs


def test_from_config_options(tmp_path: Path, enclave_signing_key: tuple[Path, rsa.RSAPrivateKey]) -> None:
    key, _ = enclave_signing_key
    root = make_sgx_root(tmp_path / "host", epc_bytes=None)
    options: dict[str, Any] = {"signing_key": str(key), "host_root": str(root)}
    with pytest.raises(ProviderError, match="EPC size") as err:
        SgxProvider.from_config(TeeConfig(providers=(ProviderConfig(name="sgx", options=options),)), tmp_path)
    assert "options.epc_bytes" in str(err.value)

    options.update(epc_bytes="256M", threads=8, min_enclave_size="64M", start_timeout="30s")
    p = SgxProvider.from_config(TeeConfig(providers=(ProviderConfig(name="sgx", options=options),)), tmp_path)
    assert (p.total_bytes(), p.threads, p.min_enclave_size, p.start_timeout) == (256 * MIB, 8, 64 * MIB, 30.0)

    for bad, match in (
        ({"threds": 8}, "unknown option 'threds'"),
        ({"threads": "many"}, "options.threads"),
        ({"log_level": "loud"}, "options.log_level: expected one of none, error"),
        ({"isvsvn": 70000}, "options.isvsvn: expected an integer from 0 to 65535"),
        ({"epc_bytes": "lots"}, "options.epc_bytes"),
    ):
        cfg = TeeConfig(providers=(ProviderConfig(name="sgx", options={**options, **bad}),))
        with pytest.raises(ConfigError, match=match):
            SgxProvider.from_config(cfg, tmp_path)


# --- capacity -------------------------------------------------------------------------------------


def test_epc_over_capacity_is_refused_with_both_numbers(
    tmp_path: Path, enclave_signing_key: tuple[Path, rsa.RSAPrivateKey], fake_env: dict[str, str]
) -> None:
    root = make_sgx_root(tmp_path / "host", epc_bytes=256 * MIB)
    p = provider(tmp_path, enclave_signing_key[0], root, fake_env)
    assert p.total_bytes() == 256 * MIB
    with pytest.raises(CapacityError) as err:
        p.reserve(spec(300 * MIB))
    message = str(err.value)
    assert "EPC" in message and "512 MiB" in message and "256 MiB" in message and "300 MiB" in message

    p.reserve(first := spec(100 * MIB))  # takes 128 MiB (the enclave size)
    assert p.capacity().used_bytes == 128 * MIB
    p.reserve(spec(128 * MIB))
    with pytest.raises(CapacityError, match=r"needs 64 MiB .* only 0 MiB of 256 MiB EPC is free"):
        p.reserve(spec(33 * MIB))
    p.release(first.id)
    p.reserve(spec(128 * MIB))

    floor = provider(tmp_path, enclave_signing_key[0], root, fake_env, min_enclave_size=512 * MIB)
    with pytest.raises(CapacityError, match="at least 512 MiB"):
        floor.reserve(spec(16 * MIB))


def test_create_on_a_host_without_sgx_explains_why(
    tmp_path: Path, enclave_signing_key: tuple[Path, rsa.RSAPrivateKey], fake_env: dict[str, str]
) -> None:
    root = make_sgx_root(tmp_path / "host", sgx=False)
    p = provider(tmp_path, enclave_signing_key[0], root, fake_env)
    with pytest.raises(ProviderUnavailableError) as err:
        asyncio.run(p.create(spec()))
    assert "sgx cannot run on this host" in str(err.value) and "doctor" in str(err.value)
    assert not (tmp_path / "data" / "sgx" / "run").exists() or not any(
        (tmp_path / "data" / "sgx" / "run").iterdir()
    )


# --- end to end -----------------------------------------------------------------------------------


def test_create_attest_destroy(
    tmp_path: Path,
    sgx_root: Path,
    enclave_signing_key: tuple[Path, rsa.RSAPrivateKey],
    sgx_env: dict[str, str],
    call_log: Path,
    dcap_platform: tuple[DcapPlatform, QuoteCollateral],
) -> None:
    key_path, key = enclave_signing_key
    platform, collateral = dcap_platform
    p = provider(tmp_path, key_path, sgx_root, sgx_env, threads=8)

    async def main() -> None:
        await p.start()
        handle = await p.create(spec(100 * MIB))
        try:
            assert handle.provider == "sgx" and handle.alive and alive(handle.pid or -1)
            pong = await handle.channel.request("ping", timeout=10)
            assert pong["attested"] is False

            nonce = os.urandom(32)
            reply = await handle.channel.request("attest", nonce=nonce, timeout=20)
            assert reply["format"] == "sgx-dcap"
            keys = reply["public_keys"]
            result = verify_dcap(
                reply["evidence"], collateral, at=datetime.now(UTC), trust_root=platform.root_cert_pem
            )
            assert result.report_data == hashlib.sha512(nonce + keys["x25519"] + keys["p256"]).digest()
            assert result.report_data == report_data_for(nonce, keys["x25519"], keys["p256"])
            assert result.claims["mrenclave"] == handle.measurement
            assert result.claims["mrsigner"] == mrsigner_of(key.public_key()).hex()
            assert result.claims["debug"] is False and result.claims["isv_prod_id"] == 1

            # the measurement is that of the manifest the provider rendered and signed
            build_dir = Path(_gramine_cwd(call_log))
            manifest_bytes = (build_dir / "r3e-enclave.manifest").read_bytes()
            assert handle.measurement == hashlib.sha256(manifest_bytes).hexdigest()
            manifest = tomllib.loads(manifest_bytes.decode())
            assert manifest["sgx"]["enclave_size"] == "128M"
            assert manifest["sgx"]["max_threads"] == 8 and manifest["sgx"]["debug"] is False
            assert manifest["sgx"]["remote_attestation"] == "dcap"
            assert manifest["loader"]["argv"][1:] == ["-m", "r3e_tee.runtime.enclave", "--device", "gramine"]
            assert manifest["loader"]["env"]["R3E_ENCLAVE_CONNECT"] == {"passthrough": True}
            mounts = {m["path"] for m in manifest["fs"]["mounts"]}
            assert {p.python, p.python_libdir, p.site_packages} <= mounts
            assert f"file:{p.site_packages}/" in manifest["sgx"]["trusted_files"]
            sign = calls(call_log, "gramine-sgx-sign")[0]
            assert sign[sign.index("--key") + 1] == str(key_path)

            # a second enclave of the same configuration reuses the signed build
            other = await p.create(spec(120 * MIB))
            assert other.measurement == handle.measurement
            assert len(calls(call_log, "gramine-sgx-sign")) == 1
            await p.destroy(other)
        finally:
            pid = handle.pid
            await p.destroy(handle)
        assert handle.exited.is_set() and not handle.channel.is_open
        assert handle.exit_status == 0  # the runtime shut down when asked
        assert pid is not None and not alive(pid)
        assert not any((tmp_path / "data" / "sgx" / "run").iterdir())
        await p.stop()

    asyncio.run(main())


def _gramine_cwd(call_log: Path) -> str:
    rows = [json.loads(line) for line in call_log.read_text().splitlines()]
    return next(r["cwd"] for r in rows if r["tool"] == "gramine-sgx")


def test_debug_enclave_is_signed_and_quoted_as_debug(
    tmp_path: Path,
    sgx_root: Path,
    enclave_signing_key: tuple[Path, rsa.RSAPrivateKey],
    sgx_env: dict[str, str],
    dcap_platform: tuple[DcapPlatform, QuoteCollateral],
) -> None:
    platform, collateral = dcap_platform
    p = provider(tmp_path, enclave_signing_key[0], sgx_root, sgx_env)

    async def main() -> None:
        release = await p.create(spec(64 * MIB))
        debug = await p.create(spec(64 * MIB, debug=True))
        try:
            assert debug.measurement != release.measurement  # sgx.debug is part of the manifest
            reply = await debug.channel.request("attest", nonce=os.urandom(16), timeout=20)
            result = verify_dcap(
                reply["evidence"], collateral, at=datetime.now(UTC), trust_root=platform.root_cert_pem
            )
            assert result.claims["debug"] is True and result.claims["mrenclave"] == debug.measurement
        finally:
            await p.destroy(debug)
            await p.destroy(release)

    asyncio.run(main())


def test_unexpected_process_death_is_reported_through_the_handle(
    tmp_path: Path,
    sgx_root: Path,
    enclave_signing_key: tuple[Path, rsa.RSAPrivateKey],
    sgx_env: dict[str, str],
) -> None:
    p = provider(tmp_path, enclave_signing_key[0], sgx_root, sgx_env)
    seen: list[EnclaveHandle] = []

    async def on_exit(handle: EnclaveHandle) -> None:
        seen.append(handle)

    async def main() -> None:
        handle = await p.create(spec())
        handle.on_exit.append(on_exit)
        assert handle.pid is not None
        os.kill(handle.pid, signal.SIGKILL)
        await asyncio.wait_for(handle.exited.wait(), 10)
        await asyncio.sleep(0)
        assert handle.exit_status == -signal.SIGKILL
        assert seen == [handle]
        assert not handle.alive
        # the whole session went with it (the runtime that gramine-sgx had started)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _session_members(handle.pid):
            await asyncio.sleep(0.05)
        assert _session_members(handle.pid) == []
        assert not (tmp_path / "data" / "sgx" / "run" / handle.spec.id).exists()
        await p.destroy(handle)  # destroying a dead enclave is harmless
        assert seen == [handle]

    asyncio.run(main())


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def test_gramine_failing_before_the_runtime_connects(
    tmp_path: Path,
    sgx_root: Path,
    enclave_signing_key: tuple[Path, rsa.RSAPrivateKey],
    sgx_env: dict[str, str],
) -> None:
    p = provider(tmp_path, enclave_signing_key[0], sgx_root, {**sgx_env, "FAKE_GRAMINE_FAIL": "1"})
    with pytest.raises(EnclaveError) as err:
        asyncio.run(p.create(spec()))
    message = str(err.value)
    assert "exited with status 1 before the enclave runtime connected" in message
    assert "Cannot open device /dev/sgx_enclave" in message
    assert not any((tmp_path / "data" / "sgx" / "run").iterdir())


def test_start_deadline(
    tmp_path: Path,
    sgx_root: Path,
    enclave_signing_key: tuple[Path, rsa.RSAPrivateKey],
    sgx_env: dict[str, str],
) -> None:
    # a gramine-sgx that never starts the runtime: the host-side deadline stops it
    hang = tmp_path / "hang-bin"
    hang.mkdir()
    script = hang / "gramine-sgx"
    script.write_text("#!/bin/sh\necho 'waiting for an EPC page that never comes'\nexec sleep 60\n")
    script.chmod(0o755)
    p = provider(
        tmp_path, enclave_signing_key[0], sgx_root, sgx_env, gramine_sgx=str(script), start_timeout=1.0
    )
    started = time.monotonic()
    with pytest.raises(EnclaveError, match="did not connect within 1 s") as err:
        asyncio.run(p.create(spec()))
    assert time.monotonic() - started < 10
    assert "waiting for an EPC page" in str(err.value)
    assert not any((tmp_path / "data" / "sgx" / "run").iterdir())


def test_missing_gramine_tools(
    tmp_path: Path,
    sgx_root: Path,
    enclave_signing_key: tuple[Path, rsa.RSAPrivateKey],
    sgx_env: dict[str, str],
) -> None:
    p = provider(
        tmp_path, enclave_signing_key[0], sgx_root, sgx_env, gramine_manifest=str(tmp_path / "no-such-tool")
    )
    with pytest.raises(ProviderUnavailableError, match="gramine-manifest") as err:
        asyncio.run(p.create(spec()))
    assert "options.gramine_manifest" in str(err.value)


def test_a_connection_without_the_hello_is_not_the_enclave() -> None:
    async def main() -> None:
        good, peer = socket.socketpair()
        peer.sendall(b"h" * 32)
        assert await SgxProvider._check_hello(good, b"h" * 32)
        bad, peer2 = socket.socketpair()
        peer2.sendall(b"x" * 32)
        assert not await SgxProvider._check_hello(bad, b"h" * 32)
        short, peer3 = socket.socketpair()
        peer3.sendall(b"h" * 5)
        peer3.close()
        assert not await SgxProvider._check_hello(short, b"h" * 32)
        for s in (good, peer, bad, peer2, short):
            s.close()

    asyncio.run(main())


def test_start_stops_enclaves_a_previous_worker_left(
    tmp_path: Path,
    sgx_root: Path,
    enclave_signing_key: tuple[Path, rsa.RSAPrivateKey],
    fake_env: dict[str, str],
) -> None:
    from r3e_tee.providers.sgx import _start_time

    p = provider(tmp_path, enclave_signing_key[0], sgx_root, fake_env)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    orphan = subprocess.Popen(sleeper, start_new_session=True)
    bystander = subprocess.Popen(sleeper, start_new_session=True)  # its pid file is stale: pid reused
    try:
        runs = tmp_path / "data" / "sgx" / "run"
        for name, proc, started in (
            ("left-behind", orphan, _start_time(orphan.pid)),
            ("stale", bystander, (_start_time(bystander.pid) or 0) + 1),
        ):
            (runs / name).mkdir(parents=True)
            (runs / name / "pid.json").write_text(
                json.dumps({"pid": proc.pid, "start_time": started, "enclave_id": name})
            )
        asyncio.run(p.start())
        assert orphan.wait(timeout=5) == -signal.SIGKILL
        assert bystander.poll() is None
        assert not any(runs.iterdir())
    finally:
        for proc in (orphan, bystander):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_broker_key_is_measured_into_the_manifest(
    tmp_path: Path,
    sgx_root: Path,
    enclave_signing_key: tuple[Path, rsa.RSAPrivateKey],
    sgx_env: dict[str, str],
    call_log: Path,
) -> None:
    """The key broker's key is a fixed environment value of the signed manifest: enclaves for
    another broker have another MRENCLAVE, and a malformed key never reaches the manifest."""
    p = provider(tmp_path, enclave_signing_key[0], sgx_root, sgx_env)
    broker_a, broker_b = "A" * 43, "b-_" * 14 + "c"

    def with_broker(key: str) -> EnclaveSpec:
        return EnclaveSpec(id=os.urandom(8).hex(), size_bytes=64 * MIB, payload={"broker_key": key})

    async def main() -> None:
        a = await p.create(with_broker(broker_a))
        try:
            manifest = tomllib.loads((Path(_gramine_cwd(call_log)) / "r3e-enclave.manifest").read_text())
            assert manifest["loader"]["env"]["R3E_TEE_BROKER_KEY"] == broker_a
            b = await p.create(with_broker(broker_b))
            none = await p.create(spec(64 * MIB))
            assert len({a.measurement, b.measurement, none.measurement}) == 3
            await p.destroy(b)
            await p.destroy(none)
            with pytest.raises(ProviderError, match="not a base64url X25519 key"):
                await p.create(with_broker('A" \nsgx.debug = true #'))
        finally:
            await p.destroy(a)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("python_libdir", '/usr/lib"\nsgx.debug = true\n#'),  # ends its TOML string, adds a key
        ("site_packages", '/opt/site", uri = "file:/etc" }, { path = "/x'),  # mounts /etc
        ("arch_libdir", "/"),  # mounts and trusts the whole host
        ("python", "/usr/bin/../../etc/shadow"),
        ("arch_libdir", "lib/x86_64-linux-gnu"),  # relative: /usr/lib... and lib... are other dirs
        ("python", "/usr/bin/python3 {{ gramine.libos }}"),
    ],
)
def test_manifest_paths_cannot_break_out_of_their_toml_strings(
    tmp_path: Path,
    sgx_root: Path,
    enclave_signing_key: tuple[Path, rsa.RSAPrivateKey],
    sgx_env: dict[str, str],
    call_log: Path,
    option: str,
    value: str,
) -> None:
    """Every host path rendered into the manifest is checked before anything is signed: one
    that could end its TOML string, add keys or mount another host directory is a ConfigError
    naming the option, at configuration time (gramine-manifest never sees it)."""
    key = str(enclave_signing_key[0])
    options: dict[str, Any] = {"signing_key": key, "host_root": str(sgx_root), option: value}
    refused = f"options.{option}: .*cannot be rendered into the enclave manifest"
    with pytest.raises(ConfigError, match=refused):
        SgxProvider.from_config(TeeConfig(providers=(ProviderConfig(name="sgx", options=options),)), tmp_path)
    with pytest.raises(ConfigError, match=f"options.{option}"):
        p = provider(tmp_path, enclave_signing_key[0], sgx_root, sgx_env, **{option: value})
        asyncio.run(p.build(enclave_size=64 * MIB, debug=False))
    assert calls(call_log, "gramine-manifest") == []


def test_manifest_integers_and_log_level_are_checked_when_given_directly(
    tmp_path: Path,
    sgx_root: Path,
    enclave_signing_key: tuple[Path, rsa.RSAPrivateKey],
    sgx_env: dict[str, str],
) -> None:
    for kw, match in (
        ({"threads": 0}, "options.threads"),
        ({"isvsvn": -1}, "options.isvsvn"),
        ({"isvprodid": 1 << 16}, "options.isvprodid"),
        ({"log_level": 'error"\nsgx.debug = true\n#'}, "options.log_level"),
    ):
        with pytest.raises(ConfigError, match=match):
            provider(tmp_path, enclave_signing_key[0], sgx_root, sgx_env, **kw)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"id": "../../victim"}, "enclave id '../../victim'"),
        ({"id": "-x"}, "enclave id '-x'"),
        ({"size_bytes": -(1 << 40)}, "not a positive number of bytes"),
        ({"cpu_seconds": -1}, "cpu_seconds -1"),
    ],
)
def test_a_spec_whose_id_is_a_path_or_whose_sizes_are_negative_is_refused(
    tmp_path: Path,
    sgx_root: Path,
    enclave_signing_key: tuple[Path, rsa.RSAPrivateKey],
    sgx_env: dict[str, str],
    call_log: Path,
    bad: dict[str, Any],
    match: str,
) -> None:
    """The enclave id names the run directory that destroy removes: '../../victim' would have
    been created, written and rmtree'd outside data_dir/sgx/run. A negative size would have
    handed EPC back on reserve, a negative cpu_seconds silently dropped RLIMIT_CPU."""
    p = provider(tmp_path, enclave_signing_key[0], sgx_root, sgx_env)
    victim = tmp_path / "data" / "victim"
    victim.mkdir(parents=True)
    (victim / "keep").write_text("x")
    fields: dict[str, Any] = {"id": os.urandom(8).hex(), "size_bytes": 64 * MIB, **bad}
    s = EnclaveSpec(**fields)
    free = p.capacity().free_bytes
    with pytest.raises(ProviderError, match=match):
        p.reserve(s)
    assert p.capacity().free_bytes == free
    with pytest.raises(ProviderError, match=match):
        asyncio.run(p.create(s))
    assert (victim / "keep").read_text() == "x"
    assert calls(call_log, "gramine-manifest") == []


def test_a_signing_key_others_can_read_is_refused(
    tmp_path: Path,
    sgx_root: Path,
    enclave_signing_key: tuple[Path, rsa.RSAPrivateKey],
    sgx_env: dict[str, str],
) -> None:
    """Whoever reads the enclave signing key signs enclaves with this MRSIGNER; before, a 0644
    key file was used as it was."""
    path = tmp_path / "signing-key.pem"
    path.write_bytes(enclave_signing_key[0].read_bytes())
    path.chmod(0o644)
    with pytest.raises(ProviderError, match="signing key .* is not private: mode 644") as err:
        load_signing_key(path)
    assert err.value.hint and "chmod 600" in err.value.hint
    with pytest.raises(ProviderError, match="is not private"):
        provider(tmp_path, path, sgx_root, sgx_env)
    path.chmod(0o600)
    assert provider(tmp_path, path, sgx_root, sgx_env).mrsigner == mrsigner_of(
        enclave_signing_key[1].public_key()
    )


def test_silent_connections_do_not_hold_back_the_enclaves_hello(
    tmp_path: Path,
    sgx_root: Path,
    enclave_signing_key: tuple[Path, rsa.RSAPrivateKey],
    sgx_env: dict[str, str],
) -> None:
    """Any local process can connect to an enclave's loopback port. Before, each connection's
    hello was awaited in turn (5 s each): three silent connections made first kept the enclave's
    own connection waiting past a 10 s start deadline. Now hellos are awaited together."""
    p = provider(tmp_path, enclave_signing_key[0], sgx_root, sgx_env, start_timeout=10.0)
    log_path = tmp_path / "enclave.log"
    log_path.write_text("")
    hello = os.urandom(32)

    async def main() -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        address = listener.getsockname()
        process = await asyncio.create_subprocess_exec("sleep", "30")
        silent = [socket.create_connection(address) for _ in range(3)]
        enclave = socket.create_connection(address)
        enclave.sendall(hello)
        started = time.monotonic()
        try:
            conn = await p._accept(listener, process, hello, log_path)
            assert time.monotonic() - started < 3
            conn.sendall(b"ok")
            assert enclave.recv(2) == b"ok"  # the connection that sent the hello, not a silent one
            conn.close()
        finally:
            process.kill()
            await process.wait()
            listener.close()
            for s in (*silent, enclave):
                s.close()

    asyncio.run(main())
