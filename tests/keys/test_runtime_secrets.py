"""The runtime side: secrets opened inside the enclave, and seal/unseal bound to the enclave's
identity on each backend (simulation via the host's sim_seal_key, SGX via Gramine's key files,
Nitro via the broker's per-PCR key through the worker)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from r3e_tee.errors import EnclaveError
from r3e_tee.keys import hpke
from r3e_tee.keys.service import LocalSecretSource
from r3e_tee.providers.base import EnclaveSpec
from r3e_tee.runtime.channel import RemoteError
from r3e_tee.runtime.devices import GramineAttestationDevice
from r3e_tee.runtime.enclave import EnclaveRuntime
from r3e_tee.runtime.nsm import NsmAttestationDevice
from r3e_tee.runtime.secrets import BROKER_KEY_ENV, UNSAFE_UNPINNED
from r3e_tee.worker.manager import AttestationGrant, EnclaveManager

from .conftest import SECRET, InProcessSimulation, Keys, channel_pair

M = "ab" * 32


def test_delivered_secrets_open_inside_the_enclave(keys: Keys) -> None:
    keys.broker.put_secret("api-key", SECRET, {"measurements": [M], "allow_simulation": True}, actor="t")
    keys.broker.put_secret(
        "db-url", b"postgres://u:p@db/x", {"measurements": [M], "allow_simulation": True}, actor="t"
    )
    broker_key = keys.broker.public_key_b64u()

    async def main() -> None:
        host, enclave = await channel_pair()
        runtime = EnclaveRuntime(
            enclave, GramineAttestationDevice(Path("/nonexistent")), {"broker_key": broker_key}
        )
        attested = keys.attest(measurement=M, private_key=runtime.keys.hpke)
        await host.request(
            "set_token", token=attested.token, attestation_id=attested.attestation_id, timeout=5
        )
        release = keys.broker.release(attested.token, ["api-key", "db-url"], actor="w")
        wire = [s.to_wire() for s in release.secrets]
        att = attested.attestation_id
        # a blob for another attestation, or relabelled as another secret, does not open; nothing is kept
        with pytest.raises(RemoteError, match="current attestation"):
            await host.request(
                "deliver_secrets", attestation_id="0" * 32, broker_key=broker_key, secrets=wire, timeout=5
            )
        swapped = [{**wire[0], "name": "db-url"}, {**wire[1], "name": "api-key"}]
        with pytest.raises(RemoteError, match="does not open with this enclave's key"):
            await host.request(
                "deliver_secrets", attestation_id=att, broker_key=broker_key, secrets=swapped, timeout=5
            )
        # a host that seals a value of its own to the enclave's (public) key: named as coming from
        # its own key, or passed off as the broker's, the pinned enclave opens neither
        host_key = x25519.X25519PrivateKey.generate()
        planted = [
            {
                "name": "api-key",
                "revision": 1,
                "sealed": hpke.seal(
                    runtime.keys.hpke.public_key(), b"known", hpke.secret_info(att, "api-key", 1), host_key
                ),
            }
        ]
        with pytest.raises(RemoteError, match="measured to accept only"):
            await host.request(
                "deliver_secrets",
                attestation_id=att,
                broker_key=hpke.public_key_b64u(host_key.public_key()),
                secrets=planted,
                timeout=5,
            )
        with pytest.raises(RemoteError, match="by its key broker"):
            await host.request(
                "deliver_secrets", attestation_id=att, broker_key=broker_key, secrets=planted, timeout=5
            )
        assert runtime.state["secrets"] == {}
        reply = await host.request(
            "deliver_secrets", attestation_id=att, broker_key=release.broker_key, secrets=wire, timeout=5
        )
        assert reply == {
            "received": [{"name": "api-key", "size": len(SECRET)}, {"name": "db-url", "size": 19}],
            "broker": "pinned",
        }
        assert runtime.state["secrets"]["api-key"] == SECRET
        assert await host.request("forget_secrets", names=["db-url", "nope"], timeout=5) == {
            "forgotten": ["db-url"]
        }
        assert set(runtime.state["secrets"]) == {"api-key"}
        await host.request("shutdown", timeout=5)
        assert runtime.state == {}
        await host.aclose()
        await enclave.aclose()

    asyncio.run(main())


def test_an_enclave_without_a_pinned_broker_receives_nothing(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SGX image built without the broker key refuses secrets, saying how to fix it; with the
    key in its (measured) environment it is pinned; with the explicit unsafe-unpinned it takes the
    key the host names and says so; with another broker's key it refuses this broker's blobs."""
    keys.broker.put_secret("api-key", SECRET, {"measurements": [M], "allow_simulation": True}, actor="t")

    async def deliver() -> dict[str, Any]:
        host, enclave = await channel_pair()
        runtime = EnclaveRuntime(enclave, GramineAttestationDevice(Path("/nonexistent")))
        attested = keys.attest(measurement=M, private_key=runtime.keys.hpke)
        await host.request(
            "set_token", token=attested.token, attestation_id=attested.attestation_id, timeout=5
        )
        release = keys.broker.release(attested.token, ["api-key"], actor="w")
        try:
            return await host.request(
                "deliver_secrets",
                attestation_id=release.attestation_id,
                broker_key=release.broker_key,
                secrets=[s.to_wire() for s in release.secrets],
                timeout=5,
            )
        finally:
            await host.aclose()
            await enclave.aclose()

    monkeypatch.delenv(BROKER_KEY_ENV, raising=False)
    with pytest.raises(RemoteError, match="measured without a key broker.*GET /v1/keys"):
        asyncio.run(deliver())
    monkeypatch.setenv(BROKER_KEY_ENV, keys.broker.public_key_b64u())
    assert asyncio.run(deliver())["broker"] == "pinned"
    monkeypatch.setenv(BROKER_KEY_ENV, UNSAFE_UNPINNED)
    assert asyncio.run(deliver())["broker"] == "unsafe-unpinned"
    monkeypatch.setenv(BROKER_KEY_ENV, hpke.public_key_b64u(x25519.X25519PrivateKey.generate().public_key()))
    with pytest.raises(RemoteError, match="measured to accept only"):
        asyncio.run(deliver())


def test_simulated_sealing_is_bound_to_the_measurement(tmp_path: Path) -> None:
    async def main() -> None:
        provider = InProcessSimulation(tmp_path / "data", capacity_bytes=2**30)
        await provider.start()

        async def runtime_for(payload: dict[str, Any], debug: bool = False) -> Any:
            spec = EnclaveSpec(
                id=f"e{len(provider.runtimes)}", size_bytes=2**20, debug=debug, payload=payload
            )
            await provider.create(spec)
            return provider.runtimes[spec.id]

        first = await runtime_for({"function": "f", "v": 1})
        blob = await first.state["seal"](b"state of f")
        assert b"state of f" not in blob and blob[:4] == b"R3ES"
        # a later enclave with the same measurement (a restart) unseals it
        again = await runtime_for({"function": "f", "v": 1})
        assert await again.state["unseal"](blob) == b"state of f"
        # other code, or the same code in debug mode, gets another key
        other = await runtime_for({"function": "f", "v": 2})
        with pytest.raises(EnclaveError, match="does not open"):
            await other.state["unseal"](blob)
        debug = await runtime_for({"function": "f", "v": 1}, debug=True)
        with pytest.raises(EnclaveError, match="does not open"):
            await debug.state["unseal"](blob)
        tampered = bytearray(blob)
        tampered[-1] ^= 1
        with pytest.raises(EnclaveError, match="does not open"):
            await again.state["unseal"](bytes(tampered))
        with pytest.raises(EnclaveError, match="signer"):
            await first.state["seal"](b"x", bind="signer")
        with pytest.raises(EnclaveError, match="too short"):
            await first.state["unseal"](b"R3ES")
        await provider.stop()

    asyncio.run(main())


def _gramine_root(tmp_path: Path, name: str, mrenclave: bytes, mrsigner: bytes) -> Path:
    root = tmp_path / name
    (root / "keys").mkdir(parents=True)
    (root / "keys" / "_sgx_mrenclave").write_bytes(mrenclave)
    (root / "keys" / "_sgx_mrsigner").write_bytes(mrsigner)
    return root


def test_sgx_sealing_reads_gramine_key_files(tmp_path: Path) -> None:
    async def main() -> None:
        async def runtime(root: Path) -> EnclaveRuntime:
            _, enclave = await channel_pair()
            return EnclaveRuntime(enclave, GramineAttestationDevice(root))

        a = await runtime(_gramine_root(tmp_path, "a", b"E" * 16, b"S" * 16))
        same = await runtime(_gramine_root(tmp_path, "same", b"E" * 16, b"S" * 16))
        upgraded = await runtime(_gramine_root(tmp_path, "up", b"F" * 16, b"S" * 16))  # new code, same signer
        by_code = await a.state["seal"](b"v1 state")
        by_signer = await a.state["seal"](b"shared", bind="signer")
        assert await same.state["unseal"](by_code) == b"v1 state"
        with pytest.raises(EnclaveError, match="does not open"):
            await upgraded.state["unseal"](by_code)
        assert await upgraded.state["unseal"](by_signer) == b"shared"
        bad = await runtime(_gramine_root(tmp_path, "bad", b"E" * 15, b"S" * 16))
        with pytest.raises(EnclaveError, match="is 15 bytes, expected 16"):
            await bad.state["seal"](b"x")
        missing = await runtime(tmp_path / "no-gramine")
        with pytest.raises(EnclaveError, match="cannot read the SGX sealing key"):
            await missing.state["seal"](b"x")
        # an SGX enclave refuses simulated sealed data
        with pytest.raises(EnclaveError, match="sealed with simulation keys"):
            await a.state["unseal"](b"R3ES\x01\x01" + bytes(4) + bytes(40))

    asyncio.run(main())


def test_nitro_sealing_key_comes_from_the_broker_through_the_worker(keys: Keys) -> None:
    pcrs = {str(i): f"{i + 1:02x}" * 48 for i in range(16)}

    async def main() -> None:
        manager = EnclaveManager("w1", {}, None, None)  # type: ignore[arg-type]
        manager.secret_source = LocalSecretSource(keys.broker, manager.worker_id)

        async def nitro_runtime(eid: str, pcr_set: dict[str, str]) -> EnclaveRuntime:
            handlers = {"broker_seal_key": manager._seal_key_handler(eid)}
            host, enclave = await channel_pair(handlers)
            # a Nitro image built with the broker's key (R3E_TEE_BROKER_KEY, measured into PCR0)
            runtime = EnclaveRuntime(
                enclave, NsmAttestationDevice(lambda _req: b""), {"broker_key": keys.broker.public_key_b64u()}
            )
            attested = keys.attest(kind="nitro", pcrs=pcr_set, private_key=runtime.keys.hpke, enclave_id=eid)
            manager.grants[eid] = AttestationGrant(attested.attestation_id, attested.token, 2e9, None)
            await host.request(
                "set_token", token=attested.token, attestation_id=attested.attestation_id, timeout=5
            )
            return runtime

        first = await nitro_runtime("n1", pcrs)
        blob = await first.state["seal"](b"nitro state")
        restarted = await nitro_runtime("n2", pcrs)
        assert await restarted.state["unseal"](blob) == b"nitro state"
        other = await nitro_runtime("n3", {**pcrs, "0": "99" * 48})
        with pytest.raises(EnclaveError, match="does not open"):
            await other.state["unseal"](blob)
        released = keys.audit.entries(action="seal_key.release", limit=10)
        assert len(released) == 3 and released[0].actor == "worker:w1"

    asyncio.run(main())


def test_the_worker_warns_when_an_enclave_opens_secrets_unpinned(
    keys: Keys, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    keys.broker.put_secret("api-key", SECRET, {"measurements": [M], "allow_simulation": True}, actor="t")

    async def deliver(pin: str) -> dict[str, Any]:
        manager = EnclaveManager("w1", {}, None, None)  # type: ignore[arg-type]
        manager.secret_source = LocalSecretSource(keys.broker, manager.worker_id)
        host, enclave = await channel_pair()
        runtime = EnclaveRuntime(enclave, GramineAttestationDevice(Path("/nonexistent")), {"broker_key": pin})
        attested = keys.attest(measurement=M, private_key=runtime.keys.hpke, enclave_id="e1")
        await host.request(
            "set_token", token=attested.token, attestation_id=attested.attestation_id, timeout=5
        )
        manager.grants["e1"] = AttestationGrant(attested.attestation_id, attested.token, 2e9, None)
        manager.handles["e1"] = SimpleNamespace(channel=host)  # type: ignore[assignment]
        try:
            return await manager.deliver_secrets("e1", ["api-key"])
        finally:
            await host.aclose()
            await enclave.aclose()

    with caplog.at_level("WARNING", logger="r3e_tee.worker"):
        assert asyncio.run(deliver(keys.broker.public_key_b64u()))["broker"] == "pinned"
        assert not [r for r in caplog.records if "pinned key broker" in r.getMessage()]
        assert asyncio.run(deliver(UNSAFE_UNPINNED))["broker"] == UNSAFE_UNPINNED
    (warning,) = [r for r in caplog.records if "pinned key broker" in r.getMessage()]
    assert "UNSAFE" in warning.getMessage() and warning.enclave_id == "e1"  # type: ignore[attr-defined]
