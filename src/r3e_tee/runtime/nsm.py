"""The Nitro Secure Module (NSM) as seen from inside a Nitro Enclave: ``/dev/nsm`` and its ioctl.

The NSM speaks CBOR. A request is one serde "externally tagged" enum value, e.g.::

    {"Attestation": {"user_data": b"...", "nonce": b"...", "public_key": b"..."}}

and the answer is ``{"Attestation": {"document": b"<COSE_Sign1>"}}`` or ``{"Error": "<ErrorCode>"}``
(aws-nitro-enclaves-nsm-api ``src/api/mod.rs``). Both travel through one ioctl on the device::

    struct iovec       { void *iov_base; size_t iov_len; };
    struct nsm_message { struct iovec request; struct iovec response; };
    NSM_IOCTL_REQUEST = _IOWR(0x0A, 0, struct nsm_message)    /* 0xC0200A00 on 64-bit Linux */

(``src/driver/mod.rs`` of the same repository; Linux's ``include/uapi/linux/nsm.h`` names the same
layout ``struct nsm_raw``). The driver writes the response into the response buffer and its
length back into ``response.iov_len``.

The ioctl sits behind a :data:`NsmTransport` (request bytes -> response bytes) so the encoding and
decoding here run unchanged against a fake NSM in tests.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2

from r3e_tee.errors import EnclaveError
from r3e_tee.runtime.devices import AttestationDevice

NSM_DEVICE = Path("/dev/nsm")
NSM_IOCTL_MAGIC = 0x0A
NSM_REQUEST_MAX_SIZE = 0x1000
NSM_RESPONSE_MAX_SIZE = 0x3000

# Linux asm-generic/ioctl.h (x86-64 and aarch64, the two Nitro Enclave architectures)
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_SIZEMASK = (1 << 14) - 1
_IOC_WRITE = 1
_IOC_READ = 2

#: struct nsm_message: two struct iovec {void *iov_base; size_t iov_len;}, native layout
NSM_MESSAGE = struct.Struct("@PNPN")

# what the NSM accepts per field (aws-nitro-enclaves-nsm-api README; the AWS CDDL allows 1024 for all)
MAX_USER_DATA = 512
MAX_NONCE = 512
MAX_PUBLIC_KEY = 1024

NsmTransport = Callable[[bytes], bytes]
"""One NSM round trip: CBOR request bytes in, CBOR response bytes out."""

_ERROR_HINTS = {
    "InvalidArgument": "user_data and nonce take at most 512 bytes, public_key at most 1024",
    "InputTooLarge": f"the CBOR request must stay under {NSM_REQUEST_MAX_SIZE} bytes",
    "BufferTooSmall": f"the document did not fit the {NSM_RESPONSE_MAX_SIZE}-byte response buffer",
    "InternalError": "the NSM failed internally; retry, and restart the enclave if it persists",
    "InvalidOperation": "this NSM does not offer the operation; check the enclave's NSM driver version",
}


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """Linux ``_IOC(dir, type, nr, size)``."""
    if not 0 <= size <= _IOC_SIZEMASK:
        raise ValueError(f"ioctl argument size {size} does not fit in 14 bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def iowr(type_: int, nr: int, size: int) -> int:
    """Linux ``_IOWR(type, nr, size)``: the argument is read and written by the driver."""
    return ioc(_IOC_READ | _IOC_WRITE, type_, nr, size)


NSM_IOCTL_REQUEST = iowr(NSM_IOCTL_MAGIC, 0, NSM_MESSAGE.size)


def pack_message(request_addr: int, request_len: int, response_addr: int, response_len: int) -> bytes:
    """``struct nsm_message`` with the addresses and lengths of both buffers."""
    return NSM_MESSAGE.pack(request_addr, request_len, response_addr, response_len)


def unpack_message(data: bytes | bytearray) -> tuple[int, int, int, int]:
    """(request address, request length, response address, response length)."""
    request_addr, request_len, response_addr, response_len = NSM_MESSAGE.unpack(bytes(data))
    return request_addr, request_len, response_addr, response_len


class NsmError(EnclaveError):
    """The NSM refused a request (``code`` is its ErrorCode) or could not be reached."""

    code = "nsm"

    def __init__(self, message: str, *, nsm_code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.nsm_code = nsm_code


class NsmIoctlTransport:
    """The real transport: one ``ioctl(NSM_IOCTL_REQUEST)`` on ``/dev/nsm`` per request."""

    def __init__(self, path: Path = NSM_DEVICE) -> None:
        self.path = path

    def __call__(self, request: bytes) -> bytes:
        import fcntl

        if len(request) > NSM_REQUEST_MAX_SIZE:
            raise NsmError(
                f"NSM request of {len(request)} bytes exceeds the {NSM_REQUEST_MAX_SIZE}-byte limit",
                nsm_code="InputTooLarge",
                hint=_ERROR_HINTS["InputTooLarge"],
            )
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NsmError(
                f"cannot open the NSM device {self.path}: {exc.strerror}",
                hint="run inside a Nitro Enclave (its kernel provides /dev/nsm through the nsm driver)",
            ) from None
        try:
            request_buf = ctypes.create_string_buffer(request, len(request))
            response_buf = ctypes.create_string_buffer(NSM_RESPONSE_MAX_SIZE)
            message = bytearray(
                pack_message(
                    ctypes.addressof(request_buf),
                    len(request),
                    ctypes.addressof(response_buf),
                    NSM_RESPONSE_MAX_SIZE,
                )
            )
            try:
                fcntl.ioctl(fd, NSM_IOCTL_REQUEST, message, True)
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    raise NsmError(
                        "the NSM rejected the request as too large",
                        nsm_code="InputTooLarge",
                        hint=_ERROR_HINTS["InputTooLarge"],
                    ) from None
                raise NsmError(
                    f"ioctl NSM_IOCTL_REQUEST on {self.path} failed: {exc.strerror}",
                    hint=f"{self.path} must be the Nitro Secure Module of a Nitro Enclave",
                ) from None
            _, _, _, length = unpack_message(message)
            if length > NSM_RESPONSE_MAX_SIZE:
                raise NsmError(f"the NSM driver reported a {length}-byte response in a smaller buffer")
            return response_buf.raw[:length]
        finally:
            os.close(fd)


def encode_attestation_request(
    *, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
) -> bytes:
    """The CBOR of ``Request::Attestation`` (absent fields are CBOR null, serde's ``None``)."""
    for name, value, limit in (
        ("user_data", user_data, MAX_USER_DATA),
        ("nonce", nonce, MAX_NONCE),
        ("public_key", public_key, MAX_PUBLIC_KEY),
    ):
        if value is not None and len(value) > limit:
            raise NsmError(
                f"{name} of {len(value)} bytes exceeds the NSM's {limit}-byte limit",
                nsm_code="InvalidArgument",
                hint=_ERROR_HINTS["InvalidArgument"],
            )
    request = cbor2.dumps({"Attestation": {"user_data": user_data, "nonce": nonce, "public_key": public_key}})
    if len(request) > NSM_REQUEST_MAX_SIZE:
        raise NsmError(
            f"NSM request of {len(request)} bytes exceeds the {NSM_REQUEST_MAX_SIZE}-byte limit",
            nsm_code="InputTooLarge",
            hint=_ERROR_HINTS["InputTooLarge"],
        )
    return request


def decode_response(data: bytes, expected: str) -> Any:
    """The body of the ``expected`` response variant; an ``Error`` variant raises NsmError."""
    try:
        response = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError) as exc:
        raise NsmError(f"the NSM answered with malformed CBOR: {exc}") from None
    if isinstance(response, str):  # a unit variant, e.g. "LockPCRs"
        response = {response: None}
    if not isinstance(response, dict) or len(response) != 1:
        raise NsmError("the NSM answered with something other than one response variant")
    ((variant, body),) = response.items()
    if variant == "Error":
        code = str(body)
        raise NsmError(
            f"the NSM refused the {expected} request: {code}",
            nsm_code=code,
            hint=_ERROR_HINTS.get(code),
        )
    if variant != expected:
        raise NsmError(f"the NSM answered a {expected} request with a {variant!r} response")
    return body


def decode_attestation_response(data: bytes) -> bytes:
    body = decode_response(data, "Attestation")
    document = body.get("document") if isinstance(body, dict) else None
    if not isinstance(document, bytes) or not document:
        raise NsmError("the NSM's Attestation response carries no document")
    return document


class NsmAttestationDevice(AttestationDevice):
    """Evidence from the NSM: an attestation document with user_data = report_data (64 bytes),
    the verifier's nonce, and public_key = X25519 || P-256 (97 bytes)."""

    def __init__(self, transport: NsmTransport | None = None, *, path: Path = NSM_DEVICE) -> None:
        self.transport: NsmTransport = transport if transport is not None else NsmIoctlTransport(path)

    def attestation(self, *, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None) -> bytes:
        """One Attestation round trip (blocking: the ioctl waits for the NSM)."""
        request = encode_attestation_request(user_data=user_data, nonce=nonce, public_key=public_key)
        return decode_attestation_response(self.transport(request))

    async def evidence(self, *, report_data: bytes, nonce: bytes, public_key: bytes) -> tuple[bytes, str]:
        if len(report_data) != 64:
            raise EnclaveError(f"report_data must be 64 bytes, got {len(report_data)}")
        document = await asyncio.to_thread(
            self.attestation, user_data=report_data, nonce=nonce, public_key=public_key
        )
        return document, "nitro"


__all__ = [
    "NSM_DEVICE",
    "NSM_IOCTL_REQUEST",
    "NSM_MESSAGE",
    "NSM_REQUEST_MAX_SIZE",
    "NSM_RESPONSE_MAX_SIZE",
    "NsmAttestationDevice",
    "NsmError",
    "NsmIoctlTransport",
    "NsmTransport",
    "decode_attestation_response",
    "decode_response",
    "encode_attestation_request",
    "ioc",
    "iowr",
    "pack_message",
    "unpack_message",
]
