"""The Nitro provider against a fake nitro-cli whose "enclaves" run the real runtime, listening on a
UNIX socket that stands in for vsock, with a fake NSM signing real attestation documents."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hw_fakes import calls, make_nitro_root, vsock_path

from r3e_tee.attestation.binding import nitro_public_key_field, report_data_for
from r3e_tee.attestation.nitro import verify_nitro
from r3e_tee.config import ProviderConfig, TeeConfig
from r3e_tee.errors import CapacityError, ConfigError, EnclaveError, ProviderError, ProviderUnavailableError
from r3e_tee.evidence.nitro import NitroPki, parse_nitro_document
from r3e_tee.providers.base import EnclaveHandle, EnclaveSpec
from r3e_tee.providers.nitro import NitroProvider, nitro_memory_mib, parse_cli_json, pcr0_from_measurements

MIB = 1024 * 1024


@pytest.fixture
def state_dir(short_dir: Path) -> Path:
    return short_dir / "nitro"


@pytest.fixture
def nitro_env(fake_env: dict[str, str], state_dir: Path) -> dict[str, str]:
    return {**fake_env, "FAKE_NITRO_STATE": str(state_dir)}


def make_eif(path: Path, pki_dir: Path, **extra: Any) -> Path:
    path.write_text(json.dumps({"vsock_port": 5005, "pki": str(pki_dir), **extra}))
    return path


@pytest.fixture
def eif(tmp_path: Path, nitro_pki_dir: Path) -> Path:
    return make_eif(tmp_path / "r3e-tee-runtime.eif", nitro_pki_dir)


def unix_vsock(state: Path) -> Any:
    """The injected vsock connector: (CID, port) -> the fake enclave's UNIX socket."""

    def connect(cid: int, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(vsock_path(state, cid, port)))
        except OSError:
            sock.close()
            raise
        return sock

    return connect


def provider(tmp_path: Path, eif: Path, state: Path, env: dict[str, str], **kw: Any) -> NitroProvider:
    root = kw.pop("root", None) or make_nitro_root(tmp_path / "host", memory_mib=1024, cpu_count=4)
    kw.setdefault("poll_interval", 0.2)
    kw.setdefault("connect_timeout", 15.0)
    return NitroProvider(eif_path=eif, host_root=root, connect=unix_vsock(state), env=env, **kw)


def spec(size: int = 100 * MIB, *, debug: bool = False) -> EnclaveSpec:
    return EnclaveSpec(id=os.urandom(8).hex(), size_bytes=size, debug=debug, evidence_format="nitro")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- pure parts -----------------------------------------------------------------------------------


def test_memory_is_whole_mib_and_at_least_64() -> None:
    assert nitro_memory_mib(1) == 64
    assert nitro_memory_mib(64 * MIB) == 64
    assert nitro_memory_mib(100 * MIB) == 100
    assert nitro_memory_mib(100 * MIB + 1) == 101


def test_cli_output_parsing() -> None:
    text = (
        'Start allocating memory...\nStarted enclave with enclave-cid: 16\n{\n  "EnclaveID": "i-1-enc2"\n}\n'
    )
    assert parse_cli_json(text, "run-enclave") == {"EnclaveID": "i-1-enc2"}
    assert parse_cli_json("[]\n", "describe") == []
    with pytest.raises(ProviderError, match="printed no JSON: oops"):
        parse_cli_json("oops", "nitro-cli x")
    pcr = "ab" * 48
    assert pcr0_from_measurements({"Measurements": {"PCR0": pcr.upper()}}, "m") == pcr
    with pytest.raises(ProviderError, match="no Measurements.PCR0"):
        pcr0_from_measurements({"Measurements": {"PCR0": "00"}}, "m")


# --- configuration and capacity -------------------------------------------------------------------


def test_from_config_reads_the_allocator(tmp_path: Path, eif: Path) -> None:
    root = make_nitro_root(tmp_path / "host", memory_mib=2048, cpu_count=6)
    opts: dict[str, Any] = {"eif_path": str(eif), "host_root": str(root), "cpu_count": 2, "vsock_port": 7000}
    p = NitroProvider.from_config(
        TeeConfig(providers=(ProviderConfig(name="nitro", options=opts),)), tmp_path
    )
    assert (p.total_bytes(), p.pool_cpus, p.cpu_count, p.vsock_port) == (2048 * MIB, 6, 2, 7000)

    opts["memory_mib"], opts["pool_cpus"] = 512, 2
    p = NitroProvider.from_config(
        TeeConfig(providers=(ProviderConfig(name="nitro", options=opts),)), tmp_path
    )
    assert (p.total_bytes(), p.pool_cpus) == (512 * MIB, 2)

    with pytest.raises(ConfigError, match="unknown option 'memory'"):
        NitroProvider.from_config(
            TeeConfig(providers=(ProviderConfig(name="nitro", options={"memory": 5}),)), tmp_path
        )
    with pytest.raises(ProviderError, match="allocator configuration") as err:
        NitroProvider(eif_path=eif, host_root=tmp_path / "empty")
    assert "memory_mib" in str(err.value)
    with pytest.raises(ProviderError, match="cpu_count=8"):
        NitroProvider(eif_path=eif, host_root=root, cpu_count=8)


def test_allocator_accounting(tmp_path: Path, eif: Path, state_dir: Path, nitro_env: dict[str, str]) -> None:
    root = make_nitro_root(tmp_path / "host", memory_mib=512, cpu_count=6)
    p = provider(tmp_path, eif, state_dir, nitro_env, root=root)
    assert p.total_bytes() == 512 * MIB
    p.reserve(small := spec(10 * MIB))  # the Nitro minimum: 64 MiB
    assert p.capacity().used_bytes == 64 * MIB
    p.reserve(spec(300 * MIB + 1))  # 301 MiB
    with pytest.raises(CapacityError) as err:
        p.reserve(spec(200 * MIB))
    assert "needs 200 MiB but only 147 of 512 MiB of the Nitro allocator pool is free" in str(err.value)
    p.reserve(spec(147 * MIB))
    p.release(small.id)
    # CPUs: 3 enclaves of 2 fill the 6-CPU pool
    p.reserve(third := spec(64 * MIB))
    with pytest.raises(CapacityError, match="3 enclaves hold 6 of the 6 CPUs .* each takes 2"):
        p.reserve(spec(1))
    p.release(third.id)


# --- end to end -----------------------------------------------------------------------------------


def test_create_attest_destroy(
    tmp_path: Path,
    eif: Path,
    state_dir: Path,
    nitro_env: dict[str, str],
    call_log: Path,
    nitro_pki: NitroPki,
) -> None:
    p = provider(tmp_path, eif, state_dir, nitro_env)

    async def main() -> None:
        await p.start()
        s = spec(100 * MIB)
        handle = await p.create(s)
        try:
            assert handle.provider == "nitro" and handle.alive
            assert handle.measurement == hashlib.sha384(eif.read_bytes()).hexdigest()  # PCR0 via describe-eif
            run = calls(call_log, "nitro-cli")
            run_enclave = next(a for a in run if a[0] == "run-enclave")
            assert run_enclave == [
                "run-enclave",
                "--eif-path",
                str(eif),
                "--memory",
                "100",
                "--cpu-count",
                "2",
                "--enclave-cid",
                "16",
                "--enclave-name",
                f"r3e-{s.id}",
            ]
            described = await p.describe()
            assert [(e["EnclaveName"], e["State"], e["Flags"]) for e in described] == [
                (f"r3e-{s.id}", "RUNNING", "NONE")
            ]
            assert handle.pid == described[0]["ProcessID"]
            assert p.running() == {s.id: described[0]["EnclaveID"]}

            nonce = os.urandom(32)
            reply = await handle.channel.request("attest", nonce=nonce, timeout=20)
            assert reply["format"] == "nitro"
            keys = reply["public_keys"]
            result = verify_nitro(reply["evidence"], trust_root=nitro_pki.root)
            doc = parse_nitro_document(reply["evidence"])
            assert doc.user_data == report_data_for(nonce, keys["x25519"], keys["p256"])
            assert doc.user_data == hashlib.sha512(nonce + keys["x25519"] + keys["p256"]).digest()
            assert doc.nonce == nonce
            assert doc.public_key == nitro_public_key_field(keys["x25519"], keys["p256"])
            assert doc.pcrs[0].hex() == handle.measurement
            assert result.debug is False

            # a second enclave gets the next CID
            other = await p.create(spec(64 * MIB))
            assert len(await p.describe()) == 2
            await p.destroy(other)
            cids = [
                a[a.index("--enclave-cid") + 1] for a in calls(call_log, "nitro-cli") if a[0] == "run-enclave"
            ]
            assert cids == ["16", "17"]
        finally:
            pid = handle.pid
            await p.destroy(handle)
        assert handle.exited.is_set() and not handle.channel.is_open
        assert pid is not None and not alive(pid)
        assert await p.describe() == []
        assert ["terminate-enclave", "--enclave-id", described[0]["EnclaveID"]] in calls(
            call_log, "nitro-cli"
        )
        await p.stop()

    asyncio.run(main())


def test_debug_mode_flag_is_passed(
    tmp_path: Path, eif: Path, state_dir: Path, nitro_env: dict[str, str], call_log: Path, nitro_pki: NitroPki
) -> None:
    p = provider(tmp_path, eif, state_dir, nitro_env)

    async def main() -> None:
        handle = await p.create(spec(debug=True))
        try:
            run_enclave = next(a for a in calls(call_log, "nitro-cli") if a[0] == "run-enclave")
            assert run_enclave[-1] == "--debug-mode"
            assert [e["Flags"] for e in await p.describe()] == ["DEBUG_MODE"]
            reply = await handle.channel.request("attest", nonce=os.urandom(16), timeout=20)
            result = verify_nitro(reply["evidence"], trust_root=nitro_pki.root)
            assert result.debug is True  # a debug enclave's PCRs are all zero
            assert parse_nitro_document(reply["evidence"]).pcrs[0] == bytes(48)
        finally:
            await p.destroy(handle)

    asyncio.run(main())


def test_measurements_file_is_used_when_given(
    tmp_path: Path, eif: Path, state_dir: Path, nitro_env: dict[str, str], call_log: Path
) -> None:
    pcr0 = "0f" * 48
    (tmp_path / "measurements.json").write_text(
        json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": pcr0, "PCR1": "00" * 48}})
    )
    p = provider(tmp_path, eif, state_dir, nitro_env)  # measurements.json beside the EIF: found
    assert p.measurements == tmp_path / "measurements.json"
    assert asyncio.run(p.measurement()) == pcr0
    assert not [a for a in calls(call_log, "nitro-cli") if a[0] == "describe-eif"]

    missing = provider(tmp_path, tmp_path / "none.eif", state_dir, nitro_env)
    with pytest.raises(ProviderUnavailableError, match="none.eif is not readable") as err:
        asyncio.run(missing.create(spec()))
    assert "build-eif.sh" in str(err.value)


def test_unexpected_enclave_death_is_reported_through_the_handle(
    tmp_path: Path, eif: Path, state_dir: Path, nitro_env: dict[str, str]
) -> None:
    p = provider(tmp_path, eif, state_dir, nitro_env)
    seen: list[EnclaveHandle] = []

    async def main() -> None:
        await p.start()
        handle = await p.create(spec())
        handle.on_exit.append(seen.append)
        assert handle.pid is not None
        os.killpg(handle.pid, signal.SIGKILL)
        await asyncio.wait_for(handle.exited.wait(), 10)
        assert seen == [handle] and not handle.alive
        assert handle.exit_status is None  # nitro-cli reports no exit status
        assert p.running() == {}
        await p.destroy(handle)  # harmless afterwards
        await p.stop()

    asyncio.run(main())


def test_orphans_of_a_previous_worker_are_terminated_at_start(
    tmp_path: Path, eif: Path, state_dir: Path, nitro_env: dict[str, str], fake_bin: Path
) -> None:
    def run(name: str, cid: int) -> dict[str, Any]:
        out = subprocess.run(
            [str(fake_bin / "nitro-cli"), "run-enclave", "--eif-path", str(eif), "--memory", "64"]
            + ["--cpu-count", "2", "--enclave-cid", str(cid), "--enclave-name", name],
            env=nitro_env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return dict(parse_cli_json(out, "run-enclave"))

    left = run("r3e-left-behind", 20)
    foreign = run("someone-elses", 21)
    p = provider(tmp_path, eif, state_dir, nitro_env)

    async def main() -> None:
        await p.start()
        names = [e["EnclaveName"] for e in await p.describe()]
        assert names == ["someone-elses"]
        await p.stop()

    try:
        asyncio.run(main())
        assert not alive(left["ProcessID"]) and alive(foreign["ProcessID"])
    finally:
        os.killpg(foreign["ProcessID"], signal.SIGKILL)


def test_run_enclave_failure_is_a_provider_error(
    tmp_path: Path, eif: Path, state_dir: Path, nitro_env: dict[str, str]
) -> None:
    p = provider(tmp_path, eif, state_dir, {**nitro_env, "FAKE_NITRO_FAIL": "1"})
    with pytest.raises(
        ProviderError, match=r"nitro-cli run-enclave failed with exit status 1: \[ E26 \] Insufficient"
    ):
        asyncio.run(p.create(spec()))


def test_an_enclave_that_crashes_while_booting(
    tmp_path: Path, nitro_pki_dir: Path, state_dir: Path, nitro_env: dict[str, str]
) -> None:
    crash = make_eif(tmp_path / "crash.eif", nitro_pki_dir, boot="crash")
    p = provider(tmp_path, crash, state_dir, nitro_env)
    with pytest.raises(EnclaveError, match="stopped while booting") as err:
        asyncio.run(p.create(spec()))
    assert "nitro-cli console" in str(err.value)


def test_an_enclave_whose_runtime_never_listens_is_terminated(
    tmp_path: Path, nitro_pki_dir: Path, state_dir: Path, nitro_env: dict[str, str]
) -> None:
    hang = make_eif(tmp_path / "hang.eif", nitro_pki_dir, boot="hang")
    p = provider(tmp_path, hang, state_dir, nitro_env, connect_timeout=1.0)

    async def main() -> None:
        with pytest.raises(
            EnclaveError, match=r"no enclave runtime answered on vsock 16:5005 within 1 s"
        ) as err:
            await p.create(spec())
        assert "--vsock-port 5005" in str(err.value)
        assert await p.describe() == []  # nothing left behind

    asyncio.run(main())


def test_real_vsock_connector_fails_like_a_runtime_not_listening_yet() -> None:
    from r3e_tee.providers.nitro import vsock_connect

    with pytest.raises(OSError):  # no enclave at CID 99 on this machine: the provider retries
        vsock_connect(99, 5005, timeout=0.2)


def test_an_image_pinned_to_another_key_broker_is_refused_at_create(
    tmp_path: Path, eif: Path, state_dir: Path, nitro_env: dict[str, str]
) -> None:
    """build-eif.sh records the broker key the EIF pins; an enclave for a service with another
    broker would accept none of its secrets, so it is not started. The same key, or an image
    built unsafe-unpinned, starts."""
    mine, theirs = "A" * 43, "B" * 43
    measurements = tmp_path / "measurements.json"

    def pinned(key: str) -> None:
        measurements.write_text(json.dumps({"Measurements": {"PCR0": "0f" * 48}, "BrokerKey": key}))

    def for_broker(key: str) -> EnclaveSpec:
        return EnclaveSpec(
            id=os.urandom(8).hex(), size_bytes=100 * MIB, evidence_format="nitro", payload={"broker_key": key}
        )

    async def main() -> None:
        pinned(theirs)
        p = provider(tmp_path, eif, state_dir, nitro_env, measurements=measurements)
        with pytest.raises(ProviderError, match=f"pins key broker {theirs}") as err:
            await p.create(for_broker(mine))
        assert f"R3E_TEE_BROKER_KEY={mine} deploy/nitro/build-eif.sh" in (err.value.hint or "")
        pinned(mine)
        os.utime(eif)  # a rebuilt image: measurements are read again
        await p.destroy(await p.create(for_broker(mine)))
        # an unpinned image takes secrets from any key its host names: only when asked for
        pinned("unsafe-unpinned")
        os.utime(eif)
        with pytest.raises(ProviderError, match="built unsafe-unpinned") as err:
            await p.create(for_broker(mine))
        assert "unsafe_allow_unpinned_image" in (err.value.hint or "")
        await p.stop()
        unsafe = provider(
            tmp_path, eif, state_dir, nitro_env, measurements=measurements, unsafe_allow_unpinned_image=True
        )
        await unsafe.destroy(await unsafe.create(for_broker(mine)))
        await unsafe.stop()

    asyncio.run(main())


def test_a_spec_whose_id_is_not_a_name_or_whose_size_is_negative_is_refused(
    tmp_path: Path, eif: Path, state_dir: Path, nitro_env: dict[str, str], call_log: Path
) -> None:
    p = provider(tmp_path, eif, state_dir, nitro_env)
    free = p.capacity().free_bytes
    for bad, match in (
        (EnclaveSpec(id="x y/../z", size_bytes=64 * MIB, evidence_format="nitro"), "enclave id"),
        (EnclaveSpec(id="e1", size_bytes=-(1 << 40), evidence_format="nitro"), "positive number of bytes"),
    ):
        with pytest.raises(ProviderError, match=match):
            p.reserve(bad)
        with pytest.raises(ProviderError, match=match):
            asyncio.run(p.create(bad))
    assert p.capacity().free_bytes == free
    assert calls(call_log, "nitro-cli") == []


def test_an_enclave_reported_on_another_cid_is_not_connected_to(
    tmp_path: Path, eif: Path, state_dir: Path, nitro_env: dict[str, str], fake_bin: Path
) -> None:
    """vsock reaches whichever enclave holds a CID. A nitro-cli that reports the new enclave on a
    CID other than its --enclave-cid (here the first enclave's) must not make the provider connect
    there: the second spec's handle would talk to, and deliver secrets to, the first enclave."""
    lying = tmp_path / "lying-nitro-cli"
    lying.write_text(
        "#!/bin/sh\n"
        f'out=$("{fake_bin / "nitro-cli"}" "$@") || exit $?\n'
        'if [ "$1" = run-enclave ]; then\n'
        '  printf "%s\\n" "$out" | sed \'s/"EnclaveCID": [0-9]*/"EnclaveCID": 16/\'\n'
        'else printf "%s\\n" "$out"; fi\n'
    )
    lying.chmod(0o755)
    p = provider(tmp_path, eif, state_dir, nitro_env, nitro_cli=str(lying))

    async def main() -> None:
        first = await p.create(spec(64 * MIB))
        try:
            with pytest.raises(ProviderError, match="CID 16.*started with --enclave-cid 17"):
                await p.create(spec(64 * MIB))
            described = await p.describe()
            assert [e["EnclaveCID"] for e in described] == [16]  # the second one was terminated
            assert p.running() == {first.spec.id: described[0]["EnclaveID"]}
            assert await first.channel.request("ping", timeout=5) is not None
        finally:
            await p.destroy(first)

    asyncio.run(main())


def test_vsock_port_and_cid_base_must_fit_32_bits(tmp_path: Path, eif: Path) -> None:
    """Before, vsock_port 2**33 was accepted and Python's AF_VSOCK connect silently truncated it
    to port 0 (a CID 2**32 + 16 to CID 16, another enclave's); now it is a ConfigError naming the
    option."""
    root = make_nitro_root(tmp_path / "host")
    for bad, match in (
        ({"vsock_port": 1 << 33}, "options.vsock_port: expected an integer from 1 to 4294967294"),
        ({"cid_base": 1 << 32}, "options.cid_base: expected an integer from 4 to 4294967294"),
    ):
        opts: dict[str, Any] = {"eif_path": str(eif), "host_root": str(root), **bad}
        with pytest.raises(ConfigError, match=match):
            NitroProvider.from_config(
                TeeConfig(providers=(ProviderConfig(name="nitro", options=opts),)), tmp_path
            )
        with pytest.raises(ConfigError, match=match.split(":")[0]):
            NitroProvider(eif_path=eif, host_root=root, **bad)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("memory_mib: 512\ncpu_pool: '2,3'\n", (512, 2)),
        ("memory_mib: 512\ncpu_pool: '2-5,8'\n", (512, 5)),
        ("memory_mib: 512\ncpu_pool: '2,2,3,2-3'\n", (512, 2)),  # each CPU once (was 6)
        ("memory_mib: 512\ncpu_pool: '9-2,1-12'\n", "runs backwards"),  # was -6 + 12 = 6 CPUs
        ("memory_mib: 512\ncpu_pool: '1,x'\n", "not a CPU id"),
        ("memory_mib: true\ncpu_count: 2\n", "memory_mib must be a positive integer"),  # was 1 MiB
        ("memory_mib: 512\ncpu_count: -2\n", "cpu_count must be a positive integer"),
    ],
)
def test_allocator_cpu_pool_counts_each_cpu_once(tmp_path: Path, body: str, expected: Any) -> None:
    from r3e_tee.providers.nitro_allocator import read_allocator

    path = tmp_path / "allocator.yaml"
    path.write_text("---\n" + body)
    if isinstance(expected, tuple):
        assert read_allocator(path) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            read_allocator(path)
