"""End-to-end encryption units: reply keys the enclave refuses before a function runs, and the
enclave's handling of sealed inputs (tests/functions/test_functions_e2e.py runs it live)."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from r3e_tee.errors import EnclaveError, InvocationInputError
from r3e_tee.functions import e2e
from r3e_tee.runtime.functions import FunctionHost, LoadedFunction
from r3e_tee.runtime.keys import EnclaveKeys

#: the X25519 points of small order (and non-canonical encodings of them): a shared secret made
#: with any of them is all zeros, so nothing can be sealed to them
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ec" + "ff" * 30 + "7f"),  # p - 1
    bytes.fromhex("ed" + "ff" * 30 + "7f"),  # p
    bytes.fromhex("ee" + "ff" * 30 + "7f"),  # p + 1
]


class _Channel:
    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.direct: dict[str, Any] = {}


def _host() -> tuple[FunctionHost, EnclaveKeys, LoadedFunction]:
    """A function host with a loaded function and no sandbox: what it accepts waits in pending."""
    keys = EnclaveKeys()
    runtime = type("Runtime", (), {"keys": keys, "channel": _Channel(), "on_shutdown": []})()
    host = FunctionHost(runtime)  # type: ignore[arg-type]
    loaded = LoadedFunction({"enclave_id": "e" * 32, "function": "echo", "measurement": "m", "version": 1})
    host.loaded = loaded
    return host, keys, loaded


def _raw(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def test_reply_keys_that_cannot_receive_the_output_are_refused_before_the_function_runs() -> None:
    host, _, loaded = _host()
    reply = x25519.X25519PrivateKey.generate()
    good = _raw(reply)
    host.start_invoke({"id": 1, "input": b"{}", "reply_key": good})
    assert [inv.reply_key for inv in loaded.pending] == [good]
    assert e2e.open_output(e2e.seal_output(b"{}", good), reply) == b"{}"
    for bad in [*LOW_ORDER, b"k" * 31, b"k" * 33, b""]:
        with pytest.raises(EnclaveError, match="reply key"):
            host.start_invoke({"id": 2, "input": b"{}", "reply_key": bad})
            pytest.fail(f"accepted the reply key {bad.hex()}")
        with pytest.raises(ValueError, match="reply key"):
            e2e.reply_public_key(bad)
    assert len(loaded.pending) == 1  # none of them was queued to run


def test_the_operator_cannot_swap_or_drop_the_reply_key_a_sealed_input_names() -> None:
    """The reply key travels beside the ciphertext; the input is sealed for it, so a relay that
    swaps in its own key (to read the output) or drops it (to get the output in the clear) makes
    the input not open, and the function does not run."""
    host, keys, loaded = _host()
    client, operator = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    sealed = e2e.seal_input(b'{"plan": "merger"}', keys.x25519_public, _raw(client))
    host.start_invoke({"id": 1, "input": sealed, "encrypted": True, "reply_key": _raw(client)})
    assert [inv.input_bytes for inv in loaded.pending] == [b'{"plan":"merger"}']
    for forged in ({"reply_key": _raw(operator)}, {}):
        with pytest.raises(EnclaveError, match="cannot decrypt"):
            host.start_invoke({"id": 2, "input": sealed, "encrypted": True, **forged})
            pytest.fail(f"opened an input sealed for another reply key with {forged}")
    # sealed without a reply key (the client asked for the output in the clear): opens without
    # one, and not once a relay adds its own
    bare = e2e.seal_input(b"{}", keys.x25519_public)
    with pytest.raises(EnclaveError, match="cannot decrypt"):
        host.start_invoke({"id": 3, "input": bare, "encrypted": True, "reply_key": _raw(operator)})
    host.start_invoke({"id": 4, "input": bare, "encrypted": True})
    assert [inv.rid for inv in loaded.pending] == [1, 4]
    # malformed ciphertexts are the same typed error, never a crash
    for junk in (b"", b"\x00" * 31, b"\x00" * 32, sealed[:-1], sealed[:32] + b"\x00" * 16):
        with pytest.raises(EnclaveError, match="cannot decrypt"):
            host.start_invoke({"id": 5, "input": junk, "encrypted": True, "reply_key": _raw(client)})


def test_inputs_the_enclave_refuses_are_the_callers_error_not_the_enclaves() -> None:
    """What the runtime refuses about an input is an InvocationInputError ("invalid_input" on the
    channel), which the scheduler answers with a 400 without recycling the enclave."""
    host, keys, loaded = _host()
    reply = _raw(x25519.X25519PrivateKey.generate())
    refused: list[dict[str, Any]] = [
        {"input": b"not json"},
        {"input": "{}"},
        {"input": b"{}", "reply_key": bytes(32)},
        {"input": b"\x00" * 80, "encrypted": True, "reply_key": reply},
    ]
    for msg in refused:
        with pytest.raises(InvocationInputError) as err:
            host.start_invoke({"id": 1, **msg})
        assert err.value.code == "invalid_input" and err.value.http_status == 400
    host.start_invoke(
        {
            "id": 2,
            "input": e2e.seal_input(b"[1]", keys.x25519_public, reply),
            "encrypted": True,
            "reply_key": reply,
        }
    )
    assert [inv.input_bytes for inv in loaded.pending] == [b"[1]"]
