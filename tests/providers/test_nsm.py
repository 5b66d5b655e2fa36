"""The in-enclave NSM device: ioctl number and message layout, the CBOR protocol, and evidence
made through a fake NSM whose documents the real Nitro verifier accepts."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
from pathlib import Path

import cbor2
import pytest
from hw_fakes import FakeNsm

from r3e_tee.attestation.binding import nitro_public_key_field, report_data_for
from r3e_tee.attestation.nitro import verify_nitro
from r3e_tee.evidence.nitro import NitroPki, parse_nitro_document
from r3e_tee.runtime.keys import EnclaveKeys
from r3e_tee.runtime.nsm import (
    NSM_IOCTL_REQUEST,
    NSM_MESSAGE,
    NsmAttestationDevice,
    NsmError,
    NsmIoctlTransport,
    decode_attestation_response,
    encode_attestation_request,
    ioc,
    iowr,
    pack_message,
    unpack_message,
)


class Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class NsmMessage(ctypes.Structure):
    _fields_ = (("request", Iovec), ("response", Iovec))


def test_ioctl_number_is_iowr_0x0a_0_of_struct_nsm_message() -> None:
    assert ctypes.sizeof(NsmMessage) == NSM_MESSAGE.size == 32  # 64-bit Linux: two 16-byte iovecs
    # _IOWR('\x0a', 0, 32): dir READ|WRITE (3) << 30 | size << 16 | type << 8 | nr
    assert NSM_IOCTL_REQUEST == (3 << 30) | (32 << 16) | (0x0A << 8) | 0 == 0xC0200A00
    assert iowr(0x0A, 0, 32) == ioc(3, 0x0A, 0, 32)
    assert ioc(1, ord("n"), 2, 8) == 0x40086E02  # _IOW('n', 2, u64), a known value
    with pytest.raises(ValueError):
        ioc(3, 0x0A, 0, 1 << 14)


def test_message_packing_matches_the_c_layout() -> None:
    request = ctypes.create_string_buffer(b"req", 3)
    response = ctypes.create_string_buffer(0x3000)
    packed = pack_message(ctypes.addressof(request), 3, ctypes.addressof(response), 0x3000)
    c = NsmMessage.from_buffer_copy(packed)
    assert (c.request.iov_base, c.request.iov_len) == (ctypes.addressof(request), 3)
    assert (c.response.iov_base, c.response.iov_len) == (ctypes.addressof(response), 0x3000)
    # the driver writes the response length back into response.iov_len
    c.response.iov_len = 1234
    assert unpack_message(bytes(c)) == (ctypes.addressof(request), 3, ctypes.addressof(response), 1234)


def test_attestation_request_is_serdes_externally_tagged_enum() -> None:
    raw = encode_attestation_request(user_data=b"u" * 64, nonce=b"n" * 32, public_key=None)
    assert cbor2.loads(raw) == {
        "Attestation": {"user_data": b"u" * 64, "nonce": b"n" * 32, "public_key": None}
    }
    # map with one text key, then a map of three text keys: what serde_cbor reads back
    assert raw[0] == 0xA1 and raw[1:13] == b"\x6bAttestation"
    for field, size in (("user_data", 513), ("nonce", 513), ("public_key", 1025)):
        kwargs: dict[str, bytes | None] = {
            "user_data": None,
            "nonce": None,
            "public_key": None,
            field: bytes(size),
        }
        with pytest.raises(NsmError, match=field) as err:
            encode_attestation_request(**kwargs)  # type: ignore[arg-type]
        assert err.value.nsm_code == "InvalidArgument"


def test_responses_are_decoded_or_refused() -> None:
    assert decode_attestation_response(cbor2.dumps({"Attestation": {"document": b"doc"}})) == b"doc"
    with pytest.raises(NsmError, match="InternalError") as err:
        decode_attestation_response(cbor2.dumps({"Error": "InternalError"}))
    assert err.value.nsm_code == "InternalError" and err.value.hint
    for bad, match in (
        (b"\xff\x00", "malformed CBOR"),
        (cbor2.dumps({"DescribePCR": {"lock": False, "data": b""}}), "'DescribePCR' response"),
        (cbor2.dumps("LockPCRs"), "'LockPCRs' response"),
        (cbor2.dumps({"Attestation": {"document": b""}}), "no document"),
        (cbor2.dumps({"Attestation": {}, "Error": "x"}), "one response variant"),
        (cbor2.dumps([1, 2]), "one response variant"),
    ):
        with pytest.raises(NsmError, match=match):
            decode_attestation_response(bad)


def test_device_round_trip_through_a_fake_nsm(nitro_pki: NitroPki) -> None:
    pcr0 = hashlib.sha384(b"image").digest()
    nsm = FakeNsm.from_pki(nitro_pki, {0: pcr0, 1: bytes(48), 2: bytes(48)})
    device = NsmAttestationDevice(nsm)
    keys = EnclaveKeys()
    nonce = os.urandom(32)
    public_key = nitro_public_key_field(keys.x25519_public, keys.p256_public)
    document, fmt = asyncio.run(
        device.evidence(report_data=keys.report_data(nonce), nonce=nonce, public_key=public_key)
    )
    assert fmt == "nitro"
    assert nsm.requests == [
        {"Attestation": {"user_data": keys.report_data(nonce), "nonce": nonce, "public_key": public_key}}
    ]
    assert len(public_key) == 97
    result = verify_nitro(document, trust_root=nitro_pki.root)
    doc = parse_nitro_document(document)
    assert doc.user_data == report_data_for(nonce, keys.x25519_public, keys.p256_public)
    assert doc.nonce == nonce and doc.public_key == public_key
    assert doc.pcrs[0] == pcr0
    assert result.claims  # verified under the test root


def test_device_reports_nsm_errors(nitro_pki: NitroPki) -> None:
    device = NsmAttestationDevice(FakeNsm.from_pki(nitro_pki, {0: bytes(48)}, fail_with="InvalidArgument"))
    with pytest.raises(NsmError, match="refused the Attestation request: InvalidArgument") as err:
        asyncio.run(device.evidence(report_data=bytes(64), nonce=bytes(16), public_key=bytes(97)))
    assert "512 bytes" in str(err.value)
    with pytest.raises(Exception, match="64 bytes"):
        asyncio.run(device.evidence(report_data=bytes(32), nonce=bytes(16), public_key=bytes(97)))


def test_ioctl_transport_errors_name_the_device(tmp_path: Path) -> None:
    with pytest.raises(NsmError, match="cannot open the NSM device") as err:
        NsmIoctlTransport(tmp_path / "nsm")(b"\xa0")
    assert "Nitro Enclave" in str(err.value)
    # a real ioctl on a device that is not the NSM: the kernel answers ENOTTY
    with pytest.raises(NsmError, match="ioctl NSM_IOCTL_REQUEST on /dev/null failed"):
        NsmIoctlTransport(Path("/dev/null"))(
            encode_attestation_request(user_data=None, nonce=None, public_key=None)
        )
    with pytest.raises(NsmError, match="exceeds") as big:
        NsmIoctlTransport(Path("/dev/null"))(bytes(0x1001))
    assert big.value.nsm_code == "InputTooLarge"


# --- the runtime's entry point ----------------------------------------------------------------------


def test_runtime_entry_needs_a_channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r3e_tee.runtime import enclave

    monkeypatch.delenv(enclave.CONNECT_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        enclave.main(["--nsm-path", str(tmp_path / "no-nsm")])  # not in a Nitro Enclave either
    assert exit_.value.code == 2
    assert enclave.main(["--connect", "carrier-pigeon:somewhere"]) == 1
    assert enclave.main(["--connect", f"unix:{tmp_path / 'nobody-listens'}"]) == 1
    with pytest.raises(SystemExit):
        enclave.main(["--unix", "a", "--vsock-port", "5005"])  # one channel only


def test_runtime_entry_connects_from_the_environment_and_says_hello(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a Gramine enclave does: address and hello come through the environment."""
    import socket
    import threading

    from r3e_tee.runtime import enclave
    from r3e_tee.runtime.channel import encode_frame

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(short_dir / "host.sock"))
    listener.listen(1)
    monkeypatch.setenv(enclave.CONNECT_ENV, f"unix:{short_dir / 'host.sock'}")
    monkeypatch.setenv(enclave.HELLO_ENV, "ab" * 32)
    received: dict[str, bytes] = {}

    def host() -> None:
        conn, _ = listener.accept()
        received["hello"] = conn.recv(32, socket.MSG_WAITALL)
        conn.sendall(encode_frame({"id": 1, "op": "shutdown"}))
        received["reply"] = conn.recv(4096)
        conn.close()

    thread = threading.Thread(target=host)
    thread.start()
    assert enclave.main(["--device", "gramine"]) == 0
    thread.join(5)
    listener.close()
    assert received["hello"] == bytes.fromhex("ab" * 32)
    assert cbor2.loads(received["reply"][4:]) == {"id": 1, "ok": True, "result": {"zeroized": True}}
    assert enclave.CONNECT_ENV not in os.environ and enclave.HELLO_ENV not in os.environ
