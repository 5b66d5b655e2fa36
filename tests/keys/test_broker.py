"""The key broker: release to the matching enclave only, each denial with its reason and an
audit entry, revocation on policy change, Nitro sealing keys, and HPKE as RFC 9180 defines it."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from r3e_tee.errors import InvalidRequestError, NotFoundError, PolicyError
from r3e_tee.keys import hpke
from r3e_tee.keys.errors import ReleaseDenied
from r3e_tee.keys.policy import ReleasePolicy

from .conftest import SECRET, Attested, Keys

M = "ab" * 32
SIM_POLICY = {"measurements": [M], "allow_simulation": True}


def _open(a: Attested, sealed: Any, broker: x25519.X25519PublicKey) -> bytes:
    return hpke.open_sealed(
        a.private_key,
        sealed.sealed,
        hpke.secret_info(a.attestation_id, sealed.name, sealed.revision),
        broker,
    )


def _last_denial(keys: Keys) -> Any:
    denials = keys.audit.entries(action="secret.deny", limit=1000)
    assert denials, "no denial in the audit log"
    return denials[-1]


def test_release_to_the_matching_enclave(keys: Keys) -> None:
    keys.broker.put_secret("api-key", SECRET, SIM_POLICY, actor="admin:t")
    enclave = keys.attest(measurement=M)
    out = keys.broker.release(enclave.token, ["api-key"], actor="worker:w")
    assert out.attestation_id == enclave.attestation_id and out.enclave_id == enclave.enclave_id
    (sealed,) = out.secrets
    broker = keys.broker.identity().public_key()
    assert out.broker_key == hpke.public_key_b64u(broker) == keys.broker.public_key_b64u()
    assert SECRET not in sealed.sealed and _open(enclave, sealed, broker) == SECRET
    # only the attested key opens it, as the broker's; another enclave's key does not, nor
    # another name's info, nor another sender's key
    other = x25519.X25519PrivateKey.generate()
    info = hpke.secret_info(enclave.attestation_id, "api-key", 1)
    with pytest.raises(InvalidTag):
        hpke.open_sealed(other, sealed.sealed, info, broker)
    with pytest.raises(InvalidTag):
        hpke.open_sealed(
            enclave.private_key, sealed.sealed, hpke.secret_info(enclave.attestation_id, "other", 1), broker
        )
    with pytest.raises(InvalidTag):
        hpke.open_sealed(enclave.private_key, sealed.sealed, info, other.public_key())
    rel = keys.audit.entries(action="secret.release")[-1]
    assert rel.subject == "api-key" and rel.actor == "worker:w" and rel.outcome == "ok"
    assert rel.detail["attestation_id"] == enclave.attestation_id and rel.claims_digest
    assert rel.detail["measurement"] == M
    rows = keys.store.fetchall("SELECT secret_name, attestation_id FROM secret_releases")
    assert rows == [{"secret_name": "api-key", "attestation_id": enclave.attestation_id}]


def test_signer_and_pcr_policies(keys: Keys) -> None:
    keys.broker.put_secret("by-signer", b"v1", {"mrsigner": ["cd" * 32], "allow_simulation": True}, actor="t")
    pcrs = {str(i): (f"{i:02x}") * 48 for i in range(16)}
    keys.broker.put_secret(
        "by-pcr",
        b"v2",
        {"pcrs": {0: pcrs["0"], 2: pcrs["2"]}, "providers": ["simulation"], "allow_simulation": True},
        actor="t",
    )
    sgx = keys.attest(measurement="ee" * 32, mrsigner="cd" * 32)
    broker = keys.broker.identity().public_key()
    assert _open(sgx, keys.broker.release(sgx.token, ["by-signer"], actor="w").secrets[0], broker) == b"v1"
    nitro = keys.attest(kind="nitro", measurement="00" * 48, pcrs=pcrs)
    assert _open(nitro, keys.broker.release(nitro.token, ["by-pcr"], actor="w").secrets[0], broker) == b"v2"
    wrong = keys.attest(kind="nitro", measurement="00" * 48, pcrs={**pcrs, "2": "ff" * 48})
    with pytest.raises(ReleaseDenied) as err:
        keys.broker.release(wrong.token, ["by-pcr"], actor="w")
    assert err.value.reason == "pcr-mismatch" and err.value.check == "policy.expected_pcrs.2"
    other_provider = keys.attest(kind="nitro", measurement="00" * 48, pcrs=pcrs, provider="nitro")
    with pytest.raises(ReleaseDenied) as err:
        keys.broker.release(other_provider.token, ["by-pcr"], actor="w")
    assert err.value.reason == "provider-not-allowed"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong-measurement", "measurement-mismatch"),
        ("debug", "debug-enclave"),
        ("simulated", "simulation-not-allowed"),
        ("expired", "expired"),
        ("revoked", "revoked"),
        ("enclave-terminated", "revoked"),
        ("tampered", "invalid-token"),
        ("unknown-secret", "unknown-secret"),
    ],
)
def test_each_denial_has_its_reason_and_an_audit_entry(keys: Keys, case: str, reason: str) -> None:
    keys.broker.put_secret("api-key", SECRET, SIM_POLICY, actor="t")
    keys.broker.put_secret("hw-only", SECRET, {"measurements": [M]}, actor="t")
    name = "api-key"
    enclave = keys.attest(measurement=M)
    token = enclave.token
    if case == "wrong-measurement":
        enclave = keys.attest(measurement="ef" * 32)
        token = enclave.token
    elif case == "debug":
        enclave = keys.attest(measurement=M, debug=True)
        token = enclave.token
    elif case == "simulated":
        name = "hw-only"
    elif case == "expired":
        keys.broker.clock = lambda: time.time() + keys.issuer.ttl + 5
    elif case == "revoked":
        keys.attestation.revoke_enclave(enclave.enclave_id)
    elif case == "enclave-terminated":
        keys.store.execute(
            "INSERT INTO enclaves (id, provider, size_bytes, debug, evidence_format, state, created_at, "
            "updated_at) VALUES (?, 'simulation', 1, 0, 'sgx-dcap', 'terminated', 0, 0)",
            (enclave.enclave_id,),
        )
    elif case == "tampered":
        head, body, sig = token.split(".")
        token = f"{head}.{body[:-4]}AAAA.{sig}"
    elif case == "unknown-secret":
        name = "absent"
    with pytest.raises(ReleaseDenied) as err:
        keys.broker.release(token, [name], actor="worker:w")
    assert err.value.reason == reason
    assert err.value.http_status == 403 and err.value.to_dict()["reason"] == reason
    assert SECRET.decode() not in str(err.value) and SECRET.decode() not in str(err.value.to_dict())
    entry = _last_denial(keys)
    assert entry.reason == reason and entry.outcome == "denied" and entry.actor == "worker:w"
    assert entry.claims_digest and name in (entry.subject or "")
    assert not keys.store.fetchall("SELECT * FROM secret_releases")
    assert keys.audit.verify().ok


def test_all_or_nothing(keys: Keys) -> None:
    keys.broker.put_secret("a", b"1", SIM_POLICY, actor="t")
    keys.broker.put_secret("b", b"2", {"measurements": ["ee" * 32], "allow_simulation": True}, actor="t")
    enclave = keys.attest(measurement=M)
    with pytest.raises(ReleaseDenied) as err:
        keys.broker.release(enclave.token, ["a", "b"], actor="w")
    assert err.value.secret == "b"
    assert not keys.audit.entries(action="secret.release")
    with pytest.raises(InvalidRequestError):
        keys.broker.release(enclave.token, [], actor="w")
    with pytest.raises(InvalidRequestError):
        keys.broker.release(enclave.token, ["../etc"], actor="w")


def test_policy_change_and_delete_revoke_the_tokens_it_was_released_to(keys: Keys) -> None:
    keys.broker.put_secret("api-key", SECRET, SIM_POLICY, actor="t")
    first = keys.attest(measurement=M)
    bystander = keys.attest(measurement=M)
    keys.broker.release(first.token, ["api-key"], actor="w")
    # same policy, new value: nothing revoked
    same = keys.broker.put_secret("api-key", b"rotated-value", SIM_POLICY, actor="t")
    assert not same.policy_changed and not same.revoked_attestations and same.secret.revision == 2
    keys.broker.release(first.token, ["api-key"], actor="w")
    # a new policy: the token that received it is revoked, another enclave's is not
    change = keys.broker.put_secret(
        "api-key", b"rotated-value", {**SIM_POLICY, "providers": ["simulation"]}, actor="t"
    )
    assert change.policy_changed and change.revoked_attestations == (first.attestation_id,)
    assert change.revoked_enclaves == (first.enclave_id,)
    assert keys.attestation.is_revoked(first.attestation_id) and not keys.attestation.is_revoked(
        bystander.attestation_id
    )
    with pytest.raises(ReleaseDenied) as err:
        keys.broker.release(first.token, ["api-key"], actor="w")
    assert err.value.reason == "revoked"
    # an enclave that attests again is judged by the new policy
    again = keys.attest(measurement=M)
    keys.broker.release(again.token, ["api-key"], actor="w")
    deleted = keys.broker.delete_secret("api-key", actor="t")
    assert deleted.revoked_attestations == (again.attestation_id,)
    with pytest.raises(NotFoundError):
        keys.broker.get_secret("api-key")
    actions = [e.action for e in keys.audit.entries(limit=1000)]
    assert {"secret.create", "secret.update", "secret.delete", "secret.release", "secret.deny"} <= set(
        actions
    )


def test_metadata_never_holds_the_value(keys: Keys) -> None:
    change = keys.broker.put_secret("api-key", SECRET, SIM_POLICY, actor="t", description="for the oracle")
    info = change.secret.to_dict()
    assert info["size_bytes"] == len(SECRET) and info["unsafe"] == ["allow_simulation"]
    assert SECRET.decode() not in repr(info) and SECRET.decode() not in repr(keys.broker.list_secrets())
    assert keys.broker.get_secret("api-key").description == "for the oracle"


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({}, "a release policy is required"),
        ({"allow_simulation": True}, "does not name the code"),
        ({"measurements": ["zz"]}, "not a 32- or 48-byte hex"),
        ({"measurements": [M], "nonce": "00" * 16}, "binds one piece of evidence"),
        ({"measurements": [M], "providers": ["sgxx"]}, "unknown provider"),
        ({"measurements": [M], "mrenclav": [M]}, "unknown release policy key"),
        ({"measurements": [M], "allow_debug": "yes"}, "true or false"),
    ],
)
def test_bad_policies_are_refused(keys: Keys, policy: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        keys.broker.put_secret("x", b"v", policy, actor="t")


def test_policy_yaml_keeps_hex_as_text() -> None:
    p = ReleasePolicy.from_yaml(
        f"measurements:\n  - {'04' * 32}\nsigner: [{'cd' * 32}]\npcrs:\n  0: {'00' * 48}\n"
    )
    assert p.to_dict()["measurements"] == ["04" * 32] and p.to_dict()["mrsigner"] == ["cd" * 32]
    assert p.to_dict()["expected_pcrs"] == {"0": "00" * 48}
    assert len(p.digest) == 64


# --- Nitro sealing keys ----------------------------------------------------------------------------------


def test_nitro_sealing_key_is_per_pcr_set(keys: Keys) -> None:
    pcrs = {str(i): ("%02x" % (i + 1)) * 48 for i in range(16)}
    a = keys.attest(kind="nitro", measurement=pcrs["0"], pcrs=pcrs)
    b = keys.attest(kind="nitro", measurement=pcrs["0"], pcrs=pcrs)  # a restart: same PCRs, new key pair
    c = keys.attest(kind="nitro", measurement=pcrs["0"], pcrs={**pcrs, "2": "77" * 48})

    def key_of(e: Attested) -> bytes:
        k = keys.broker.sealing_key(e.token, actor="w")
        assert k.broker_key == keys.broker.public_key_b64u()
        return hpke.open_sealed(
            e.private_key,
            k.sealed,
            hpke.seal_key_info(e.attestation_id, k.owner, k.version),
            keys.broker.identity().public_key(),
        )

    ka, kb, kc = key_of(a), key_of(b), key_of(c)
    assert ka == kb and ka != kc and len(ka) == 32
    # sealing and identity owners do not take part in scheduled rotation (sealed data must stay
    # readable, and enclaves are measured with the broker's identity)
    assert keys.keystore.owners(rotating=False) != keys.keystore.owners()
    assert all(not o.startswith(("seal:", "identity:")) for o in keys.keystore.owners())
    with pytest.raises(ReleaseDenied) as err:
        keys.broker.sealing_key(keys.attest(kind="nitro", pcrs=pcrs, debug=True).token, actor="w")
    assert err.value.reason == "debug-enclave"
    with pytest.raises(ReleaseDenied) as err:
        keys.broker.sealing_key(keys.attest(kind="sgx-dcap").token, actor="w")
    assert err.value.reason == "kind-not-allowed"
    assert [e.reason for e in keys.audit.entries(action="secret.deny")] == [
        "debug-enclave",
        "kind-not-allowed",
    ]


# --- HPKE: the sealed blobs are RFC 9180, checked by an independent implementation -------------------


def _labeled_extract(salt: bytes, label: bytes, ikm: bytes, suite_id: bytes) -> bytes:
    h = HMAC(salt or bytes(32), hashes.SHA256())
    h.update(b"HPKE-v1" + suite_id + label + ikm)
    return h.finalize()


def _labeled_expand(prk: bytes, label: bytes, info: bytes, length: int, suite_id: bytes) -> bytes:
    labeled = length.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info
    return HKDFExpand(hashes.SHA256(), length, labeled).derive(prk)


def rfc9180_open(
    sk_r: bytes,
    enc: bytes,
    ct: bytes,
    info: bytes,
    aad: bytes,
    nk: int,
    aead_id: int,
    pk_s: bytes | None = None,
) -> bytes:
    """Open written from RFC 9180 sections 4.1, 5.1 and 5.2 (DHKEM(X25519, HKDF-SHA256)): base
    mode, or auth mode (section 5.1.3) when the sender's public key ``pk_s`` is given."""
    kem_suite = b"KEM" + (0x0020).to_bytes(2, "big")
    sk = x25519.X25519PrivateKey.from_private_bytes(sk_r)
    pk_rm = sk.public_key().public_bytes_raw()
    dh = sk.exchange(x25519.X25519PublicKey.from_public_bytes(enc))
    kem_context = enc + pk_rm
    if pk_s is not None:
        dh += sk.exchange(x25519.X25519PublicKey.from_public_bytes(pk_s))
        kem_context += pk_s
    eae_prk = _labeled_extract(b"", b"eae_prk", dh, kem_suite)
    shared = _labeled_expand(eae_prk, b"shared_secret", kem_context, 32, kem_suite)
    suite = b"HPKE" + (0x0020).to_bytes(2, "big") + (1).to_bytes(2, "big") + aead_id.to_bytes(2, "big")
    psk_id_hash = _labeled_extract(b"", b"psk_id_hash", b"", suite)
    info_hash = _labeled_extract(b"", b"info_hash", info, suite)
    context = (b"\x02" if pk_s is not None else b"\x00") + psk_id_hash + info_hash
    secret = _labeled_extract(shared, b"secret", b"", suite)
    key = _labeled_expand(secret, b"key", context, nk, suite)
    nonce = _labeled_expand(secret, b"base_nonce", context, 12, suite)
    return AESGCM(key).decrypt(nonce, ct, aad)


def test_independent_rfc9180_implementation_matches_the_rfc_vector() -> None:
    """RFC 9180 appendix A.1.1 (AES-128-GCM), first message: validates the reference code."""
    pt = rfc9180_open(
        bytes.fromhex("4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8"),
        bytes.fromhex("37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431"),
        bytes.fromhex(
            "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a"
        ),
        bytes.fromhex("4f6465206f6e2061204772656369616e2055726e"),
        bytes.fromhex("436f756e742d30"),
        16,
        0x0001,
    )
    assert pt == bytes.fromhex("4265617574792069732074727574682c20747275746820626561757479")
    # appendix A.1.3, the same suite in auth mode
    pt = rfc9180_open(
        bytes.fromhex("fdea67cf831f1ca98d8e27b1f6abeb5b7745e9d35348b80fa407ff6958f9137e"),
        bytes.fromhex("23fb952571a14a25e3d678140cd0e5eb47a0961bb18afcf85896e5453c312e76"),
        bytes.fromhex(
            "5fd92cc9d46dbf8943e72a07e42f363ed5f721212cd90bcfd072bfd9f44e06b80fd17824947496e21b680c141b"
        ),
        bytes.fromhex("4f6465206f6e2061204772656369616e2055726e"),
        bytes.fromhex("436f756e742d30"),
        16,
        0x0001,
        bytes.fromhex("8b0c70873dc5aecb7f9ee4e62406a397b350e57012be45cf53b7105ae731790b"),
    )
    assert pt == bytes.fromhex("4265617574792069732074727574682c20747275746820626561757479")


def test_released_blobs_open_with_the_rfc9180_reference(keys: Keys) -> None:
    """DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM (0x0020, 0x0001, 0x0002), auth mode
    with the broker's identity as the sender; not in base mode."""
    keys.broker.put_secret("api-key", SECRET, SIM_POLICY, actor="t")
    enclave = keys.attest(measurement=M)
    (sealed,) = keys.broker.release(enclave.token, ["api-key"], actor="w").secrets
    enc, ct = sealed.sealed[: hpke.ENC_LEN], sealed.sealed[hpke.ENC_LEN :]
    info = hpke.secret_info(enclave.attestation_id, "api-key", sealed.revision)
    sk = enclave.private_key.private_bytes_raw()
    pk_s = keys.broker.identity().public_key().public_bytes_raw()
    assert rfc9180_open(sk, enc, ct, info, b"", 32, 0x0002, pk_s) == SECRET
    with pytest.raises(InvalidTag):
        rfc9180_open(sk, enc, ct, info, b"", 32, 0x0002)


def test_a_remembered_token_still_expires_and_is_still_revocable(keys: Keys) -> None:
    keys.broker.put_secret("api-key", SECRET, SIM_POLICY, actor="t")
    enclave = keys.attest(measurement=M)
    keys.broker.release(enclave.token, ["api-key"], actor="w")  # verified once, remembered
    assert keys.broker.verify_token(enclave.token)["jti"] == enclave.attestation_id
    keys.broker.clock = lambda: time.time() + keys.issuer.ttl + 1
    with pytest.raises(ReleaseDenied) as err:
        keys.broker.release(enclave.token, ["api-key"], actor="w")
    assert err.value.reason == "expired"
    keys.broker.clock = time.time
    keys.broker.release(enclave.token, ["api-key"], actor="w")
    keys.attestation.revoke_enclave(enclave.enclave_id)
    with pytest.raises(ReleaseDenied) as err:
        keys.broker.release(enclave.token, ["api-key"], actor="w")
    assert err.value.reason == "revoked"
    # a key gone from the JWKS (its tokens expired) is not honoured from memory either
    other = keys.attest(measurement=M)
    keys.broker.release(other.token, ["api-key"], actor="w")
    keys.issuer._current["simulation"] = keys.issuer._current["simulation"].of(
        "simulation", x25519_free_signing_key()
    )
    keys.broker.refresh_keys = None
    with pytest.raises(ReleaseDenied) as err:
        keys.broker.release(other.token, ["api-key"], actor="w")
    assert err.value.reason == "invalid-token" and "unknown key" in err.value.message


def x25519_free_signing_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def test_secrets_cannot_use_the_brokers_own_key_owners(keys: Keys) -> None:
    """A secret stored under the broker's identity or a sealing key's owner would share (and, on
    rotation, re-encrypt) a key enclaves depend on: refused, with the reason."""
    for owner in ("identity:key-broker", "seal:nitro:abc"):
        with pytest.raises(InvalidRequestError, match="reserved for the broker's sealing and identity keys"):
            keys.broker.put_secret("x", b"v", SIM_POLICY, actor="t", owner=owner)
    assert (
        keys.broker.put_secret("x", b"v", SIM_POLICY, actor="t", owner="tenant:acme").secret.owner
        == "tenant:acme"
    )


@pytest.mark.parametrize(
    "pcrs",
    [
        {3: "33" * 48},  # the parent instance's IAM role: any code launched there
        {4: "44" * 48},  # the parent instance's id
        {5: "00" * 48},  # unused: zero in every enclave
        {1: "01" * 48},  # the kernel and bootstrap nitro-cli ships: common to all images
        {0: "00" * 48},  # what every debug enclave reports
    ],
)
def test_a_pcr_policy_must_pin_the_code_not_the_instance(keys: Keys, pcrs: dict[int, str]) -> None:
    """PCR0 (image), PCR2 (application) and PCR8 (signing certificate) name the code; a policy
    that pins only other PCRs is met by whatever an operator launches on that instance."""
    allowed = {str(i): (f"{i:02x}") * 48 for i in range(16)}
    keys.broker.put_secret("pinned", b"v", {"pcrs": {2: allowed["2"]}, "allow_simulation": True}, actor="t")
    keys.broker.put_secret("signed", b"v", {"pcrs": {8: allowed["8"]}, "allow_simulation": True}, actor="t")
    with pytest.raises(PolicyError, match="does not name the code"):
        keys.broker.put_secret("x", b"v", {"pcrs": pcrs, "allow_simulation": True}, actor="t")
        # what it would have released: other code, same instance
        other = keys.attest(
            kind="nitro",
            measurement="ee" * 48,
            pcrs={**allowed, "0": "ee" * 48, "2": "ef" * 48, **{str(k): v for k, v in pcrs.items()}},
        )
        keys.broker.release(other.token, ["x"], actor="w")
        pytest.fail(f"a policy pinning only PCRs {sorted(pcrs)} released the secret to other code")
    with pytest.raises(PolicyError, match="does not name the code"):
        ReleasePolicy.from_dict({"pcrs": pcrs})
    # with a code PCR beside them, they narrow it further
    keys.broker.put_secret(
        "both", b"v", {"pcrs": {**pcrs, 0: "0a" * 48}, "allow_simulation": True}, actor="t"
    )


@pytest.mark.parametrize(
    "raw", [bytes(32), (1).to_bytes(32, "little"), bytes.fromhex("ec" + "ff" * 30 + "7f")]
)
def test_a_token_binding_a_low_order_x25519_key_is_a_denial_on_record(keys: Keys, raw: bytes) -> None:
    """An enclave that binds a low-order point as its X25519 key (a simulated or debug one can
    bind anything) gets a typed, audited denial: nothing can be sealed to such a key."""
    keys.broker.put_secret("api-key", SECRET, SIM_POLICY, actor="t")
    good = keys.attest(measurement=M)
    assert keys.broker.release(good.token, ["api-key"], actor="w").secrets
    claims = {
        **good.claims,
        "cnf": {**good.claims["cnf"], "x25519": base64.urlsafe_b64encode(raw).decode()},
    }
    token = keys.issuer.issue("simulation", claims, subject=good.enclave_id, jti=good.attestation_id).token
    with pytest.raises(ReleaseDenied) as err:
        keys.broker.release(token, ["api-key"], actor="w")
    assert err.value.reason == "invalid-token" and "X25519" in err.value.message
    assert _last_denial(keys).reason == "invalid-token"
    with pytest.raises(ValueError, match="low-order"):
        hpke.public_key_from_b64u(base64.urlsafe_b64encode(raw).decode().rstrip("="))
