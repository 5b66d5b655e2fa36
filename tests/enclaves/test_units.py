"""Unit tests of the enclave layer's parts: tokens, nonces, channel, sandbox, simulation roots."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from r3e_tee.attestation.nonces import NonceStore
from r3e_tee.attestation.tokens import TokenError, TokenIssuer, thumbprint, verify_token
from r3e_tee.errors import EnclaveError, VerificationError
from r3e_tee.providers.sandbox import SandboxLimits, apply_in_child, seccomp_supported
from r3e_tee.runtime.channel import MAX_FRAME, Channel, ChannelClosed, RemoteError
from r3e_tee.store import Store


def test_rfc7638_thumbprint_matches_the_rfc_example() -> None:
    # RFC 7638 section 3.1 example key
    n = int.from_bytes(
        __import__("base64").urlsafe_b64decode(
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
            + "=="
        ),
        "big",
    )
    key = rsa.RSAPublicNumbers(65537, n).public_key()
    assert thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_token_rotation_keeps_old_keys_until_their_tokens_expire() -> None:
    k1, k2 = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1())
    issuer = TokenIssuer({"sgx": k1}, issuer="svc", ttl=60)
    old = issuer.issue("sgx", {"x": 1}, subject="e1")
    issuer.rotate("sgx", k2)
    new = issuer.issue("sgx", {"x": 2}, subject="e2")
    jwks = issuer.jwks()
    assert {k["kid"] for k in jwks["keys"]} == {old.kid, new.kid}
    assert verify_token(old.token, jwks)["x"] == 1
    assert verify_token(new.token, jwks)["x"] == 2
    assert jwt_alg(new.token) == "ES384"
    # once the retired key's last token expired, it leaves the JWKS
    issuer._retired[0] = issuer._retired[0].__class__(
        **{**issuer._retired[0].__dict__, "retire_after": time.time() - 1}
    )
    assert {k["kid"] for k in issuer.jwks()["keys"]} == {new.kid}
    with pytest.raises(TokenError, match="unknown key"):
        verify_token(old.token, issuer.jwks())


def jwt_alg(token: str) -> str:
    import jwt

    return str(jwt.get_unverified_header(token)["alg"])


def test_expired_token_and_algorithm_confusion_are_rejected() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = TokenIssuer({"sgx": key}, issuer="svc", ttl=1)
    tok = issuer.issue("sgx", {}, subject="e")
    jwks = issuer.jwks()
    assert verify_token(tok.token, jwks, at=tok.issued_at)["sub"] == "e"
    with pytest.raises(TokenError, match="not valid at"):
        verify_token(tok.token, jwks, at=tok.expires_at + 5)
    import jwt

    forged = jwt.encode({"sub": "e"}, "s" * 32, algorithm="HS256", headers={"kid": tok.kid})
    with pytest.raises(TokenError):
        verify_token(forged, jwks)
    with pytest.raises(TokenError, match="not a JWT"):
        verify_token("garbage", jwks)


def test_nonces_are_single_use_and_expire(store: Store) -> None:
    nonces = NonceStore(store, ttl=0.2)
    n, _ = nonces.issue()
    nonces.consume(n)
    with pytest.raises(VerificationError, match="already used"):
        nonces.consume(n)
    late, _ = nonces.issue()
    time.sleep(0.3)
    with pytest.raises(VerificationError, match="expired"):
        nonces.consume(late)
    with pytest.raises(VerificationError):
        nonces.consume("ab" * 32)


async def _pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    return Channel(ra, wa, name="a"), Channel(rb, wb, name="b")


def test_channel_requests_both_ways_errors_and_close() -> None:
    async def main() -> None:
        a, b = await _pair()

        async def echo(msg: dict) -> dict:  # type: ignore[type-arg]
            return {"got": msg["x"]}

        async def fail(_: dict) -> dict:  # type: ignore[type-arg]
            raise EnclaveError("no such secret")

        async def nested(_: dict) -> dict:  # type: ignore[type-arg]
            return await b.request("echo", x=41)  # b asks a back while answering

        a.handlers.update({"echo": echo})
        b.handlers.update({"fail": fail, "nested": nested})
        a.start()
        b.start()
        assert (await a.request("nested"))["got"] == 41
        with pytest.raises(RemoteError, match="no such secret"):
            await a.request("fail")
        with pytest.raises(RemoteError, match="unknown operation"):
            await a.request("nope")
        with pytest.raises(EnclaveError, match="no answer"):
            b.handlers["slow"] = lambda _: asyncio.sleep(5)  # type: ignore[assignment,return-value]
            await a.request("slow", timeout=0.1)
        await b.aclose()
        with pytest.raises(ChannelClosed):
            await a.request("echo", x=1, timeout=2)
        await a.aclose()

    asyncio.run(main())


def test_channel_refuses_oversized_frames() -> None:
    async def main() -> None:
        a, b = await _pair()
        b.start()
        a._writer.write((MAX_FRAME + 1).to_bytes(4, "big"))
        await a._writer.drain()
        await asyncio.wait_for(b.closed.wait(), 2)
        assert "limit" in (b.closed_reason or "")
        await a.aclose()

    asyncio.run(main())


def _in_child(fn: object) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = int(fn())  # type: ignore[operator]
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not seccomp_supported()[0], reason=seccomp_supported()[1])
def test_sandbox_refuses_network_ptrace_and_memory_beyond_the_size() -> None:
    import ctypes
    import errno

    def child() -> int:
        missing = apply_in_child(SandboxLimits(memory_bytes=256 * 2**20, cpu_seconds=30))
        if missing:
            return 10
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            return 11
        except OSError as exc:
            if exc.errno != errno.EAFNOSUPPORT:
                return 12
        socket.socketpair()  # local IPC still works
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(0, 0, 0, 0) != -1 or ctypes.get_errno() != errno.EPERM:
            return 13
        try:
            bytearray(512 * 2**20)
            return 14
        except MemoryError:
            pass
        with open(f"/proc/{os.getpid()}/status") as f:
            if "Seccomp:\t2" not in f.read():
                return 15
        return 0

    assert _in_child(child) == 0


def test_simulation_authority_persists_its_roots(tmp_path: Path) -> None:
    from r3e_tee.providers.sim_authority import SimulationAuthority

    a = SimulationAuthority.load_or_create(tmp_path / "sim")
    assert ((tmp_path / "sim" / "authority.json").stat().st_mode & 0o777) == 0o600
    b = SimulationAuthority.load_or_create(tmp_path / "sim")
    assert a.cpu_secret == b.cpu_secret
    assert a.nitro_root.public_key() == b.nitro_root.public_key()
    assert a.dcap_root.public_key() == b.dcap_root.public_key()
    (tmp_path / "sim" / "authority.json").write_text("{broken")
    from r3e_tee.errors import ProviderError

    with pytest.raises(ProviderError, match="unreadable"):
        SimulationAuthority.load_or_create(tmp_path / "sim")


def test_simulated_evidence_is_marked_simulated_and_rejected_by_default(tmp_path: Path) -> None:
    from r3e_tee.attestation.pinned_roots_nitro_ias import TrustAnchor
    from r3e_tee.attestation.policy import Policy
    from r3e_tee.attestation.result import EvidenceKind
    from r3e_tee.attestation.verify import Verifier
    from r3e_tee.providers.sim_authority import SimulationAuthority

    auth = SimulationAuthority.load_or_create(tmp_path / "sim")
    quote = auth.sgx_quote(mrenclave=b"\x11" * 32, report_data=b"\x22" * 64, debug=False)
    v = Verifier(
        trust_roots={EvidenceKind.SGX_DCAP: TrustAnchor.load(auth.dcap_root, simulated=True)},
        collateral_provider=lambda _k, _e: auth.dcap_collateral(),
    )
    with pytest.raises(VerificationError, match="simulation"):
        v.verify(quote)
    result = v.verify(quote, policy=Policy(allow_simulation=True))
    assert result.simulated and result.claims["mrenclave"] == "11" * 32
    # the pinned Intel root never accepts simulated evidence
    with pytest.raises(VerificationError) as info:
        Verifier().verify(quote, collateral=auth.dcap_collateral(), policy=Policy(allow_simulation=True))
    assert info.value.reason.value == "bad-chain"
    debug = auth.sgx_quote(mrenclave=b"\x11" * 32, report_data=b"\x22" * 64, debug=True)
    with pytest.raises(VerificationError, match="debug"):
        v.verify(debug, policy=Policy(allow_simulation=True))


@pytest.mark.skipif(not seccomp_supported()[0], reason=seccomp_supported()[1])
def test_hidden_directories_are_unreadable_inside_the_sandbox(tmp_path: Path) -> None:
    secret_dir = tmp_path / "data"
    secret_dir.mkdir()
    (secret_dir / "kek.key").write_bytes(b"k" * 32)

    def child() -> int:
        missing = apply_in_child(SandboxLimits(hidden_paths=(str(secret_dir),)))
        if any("hiding" in m for m in missing):
            return 10
        if (secret_dir / "kek.key").exists():
            return 11
        try:
            (secret_dir / "planted").write_text("x")
            return 12
        except OSError:
            return 0

    assert _in_child(child) == 0
    assert (secret_dir / "kek.key").read_bytes() == b"k" * 32  # the host still sees it


def test_function_confinement_reports_what_a_library_os_lacks_instead_of_dying() -> None:
    """Under Gramine /proc/self/statm (and so the RLIMIT_AS cap) may be missing: the sandbox
    must still start, confined as far as the platform allows, and say what it could not do."""
    import builtins

    from r3e_tee.providers.sandbox import confine_function

    real_open = builtins.open

    def child() -> int:
        def no_statm(path: object, *args: object, **kwargs: object) -> object:
            if path == "/proc/self/statm":
                raise FileNotFoundError(2, "No such file or directory", path)
            return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

        builtins.open = no_statm  # type: ignore[assignment]
        a, b = socket.socketpair()
        missing = confine_function(b.fileno(), 64 * 2**20)
        if not any(m.startswith("RLIMIT_AS") for m in missing):
            return 20
        if resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
            return 21
        try:
            os.fstat(a.fileno())  # closed: only its own socket and stdio survive
            return 22
        except OSError:
            pass
        return 0

    assert _in_child(child) == 0
