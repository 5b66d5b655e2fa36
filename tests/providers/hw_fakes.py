"""Fakes of the TEE hardware and tools the hardware providers drive, for machines without them.

- ``gramine-manifest``: renders the template's ``{{ var }}`` / ``{{ gramine.* }}`` (strict: an
  unknown variable fails, like Gramine's Jinja environment) and checks the result is TOML.
- ``gramine-sgx-sign``: writes ``<name>.manifest.sgx`` and a real SIGSTRUCT (``<name>.sig``) signed
  with ``--key`` (RSA-3072, exponent 3, PKCS#1 v1.5 / SHA-256, q1/q2 as SGX wants), whose
  MRENCLAVE is the SHA-256 of the manifest: known to the test, different per configuration.
- ``gramine-sgx``: reads the signed manifest, builds a fake ``/dev/attestation`` tree
  (``attestation_type``; ``user_report_data`` and ``quote`` as FIFOs served by a relay thread that
  asks the fake quoting enclave for a real DCAP quote of this enclave), then runs the manifest's
  ``loader.argv`` (the real enclave runtime) with the manifest's environment and passthroughs.
- :class:`FakeQuotingEnclave`: a UNIX-socket server in the test process that signs quotes with
  ``r3e_tee.evidence.dcap_builder`` under a test platform whose collateral the test verifies with.
- ``nitro-cli``: run-enclave / describe-enclaves / terminate-enclave / describe-eif over a state
  file; run-enclave starts ``fake-nitro-enclave``: the real runtime (``runtime.enclave.main``)
  listening on a UNIX socket that stands in for vsock, with :class:`FakeNsm` as its NSM.
- :class:`FakeNsm`: the NSM's CBOR protocol, answering with documents built by
  ``r3e_tee.evidence.nitro.build_nitro_document``.

The executables are tiny scripts (see :func:`install_fakes`) that call :func:`main`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cbor2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

if TYPE_CHECKING:  # the fake tools start faster without the evidence builders
    from r3e_tee.evidence.dcap_builder import DcapPlatform
    from r3e_tee.evidence.nitro import NitroPki

HERE = Path(__file__).resolve().parent
GRAMINE_LIBOS = "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so"
GRAMINE_RUNTIMEDIR = "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc"
FAKES = ("gramine-manifest", "gramine-sgx-sign", "gramine-sgx", "nitro-cli", "fake-nitro-enclave")


def install_fakes(bin_dir: Path) -> Path:
    """Write the fake executables into ``bin_dir`` (each runs :func:`main` under this Python)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in FAKES:
        script = bin_dir / name
        script.write_text(
            f"#!{sys.executable}\n"
            "import sys\n"
            f"sys.path.insert(0, {str(HERE)!r})\n"
            "import hw_fakes\n"
            f"sys.exit(hw_fakes.main({name!r}, sys.argv[1:]))\n"
        )
        script.chmod(0o755)
    return bin_dir


def main(name: str, argv: list[str]) -> int:
    tools = {
        "gramine-manifest": gramine_manifest_main,
        "gramine-sgx-sign": gramine_sgx_sign_main,
        "gramine-sgx": gramine_sgx_main,
        "nitro-cli": nitro_cli_main,
        "fake-nitro-enclave": nitro_enclave_main,
    }
    return tools[name](argv)


def _log_call(name: str, argv: list[str]) -> None:
    """Record every invocation (tests count builds and inspect flags)."""
    path = os.environ.get("FAKE_CALL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"tool": name, "argv": argv, "cwd": os.getcwd()}) + "\n")


def calls(log_path: Path, tool: str) -> list[list[str]]:
    if not log_path.exists():
        return []
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return [r["argv"] for r in rows if r["tool"] == tool]


# --- fake host trees ----------------------------------------------------------------------------


def make_sgx_root(root: Path, *, epc_bytes: int | None = 4 << 30, sgx: bool = True) -> Path:
    """A host filesystem tree as the SGX probe reads it."""
    (root / "proc").mkdir(parents=True, exist_ok=True)
    flags = "fpu vme de pse sse sse2 " + ("sgx sgx_lc" if sgx else "")
    (root / "proc" / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    (root / "dev").mkdir(exist_ok=True)
    if sgx:
        (root / "dev" / "sgx_enclave").touch()
        (root / "dev" / "sgx_provision").touch()
    if epc_bytes is not None:
        node = root / "sys" / "devices" / "system" / "node" / "node0" / "x86"
        node.mkdir(parents=True, exist_ok=True)
        (node / "sgx_total_bytes").write_text(f"{epc_bytes}\n")
    return root


def make_nitro_root(root: Path, *, memory_mib: int = 1024, cpu_count: int = 4) -> Path:
    (root / "dev").mkdir(parents=True, exist_ok=True)
    (root / "dev" / "nitro_enclaves").touch()
    conf = root / "etc" / "nitro_enclaves"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "allocator.yaml").write_text(
        f"---\n# Enclave configuration file.\nmemory_mib: {memory_mib}\ncpu_count: {cpu_count}\n"
    )
    return root


# --- Gramine ------------------------------------------------------------------------------------

_VAR = re.compile(r"\{\{\s*(.+?)\s*\}\}")


def render_manifest(template: str, variables: Mapping[str, str]) -> str:
    values = {"gramine.libos": GRAMINE_LIBOS, "gramine.runtimedir()": GRAMINE_RUNTIMEDIR, **variables}

    def repl(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise KeyError(m.group(1))
        return values[m.group(1)]

    return _VAR.sub(repl, template)


def gramine_manifest_main(argv: list[str]) -> int:
    _log_call("gramine-manifest", argv)
    variables: dict[str, str] = {}
    rest = []
    for arg in argv:
        if arg.startswith("-D"):
            key, _, value = arg[2:].partition("=")
            variables[key] = value
        else:
            rest.append(arg)
    if len(rest) != 2:
        print("usage: gramine-manifest [-Dkey=value]... TEMPLATE OUTPUT", file=sys.stderr)
        return 2
    try:
        text = render_manifest(Path(rest[0]).read_text(), variables)
    except KeyError as exc:
        print(f"jinja2.exceptions.UndefinedError: '{exc.args[0]}' is undefined", file=sys.stderr)
        return 1
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        print(f"the rendered manifest is not TOML: {exc}", file=sys.stderr)
        return 1
    Path(rest[1]).write_text(text)
    return 0


SGX_FLAGS_INIT, SGX_FLAGS_DEBUG, SGX_FLAGS_MODE64BIT = 0x1, 0x2, 0x4


def build_sigstruct(
    manifest: bytes, key: rsa.RSAPrivateKey, *, debug: bool, isvprodid: int = 0, isvsvn: int = 0
) -> bytes:
    """A SIGSTRUCT as gramine-sgx-sign writes it, with MRENCLAVE = SHA-256(manifest)."""
    buf = bytearray(1808)
    buf[0:16] = bytes.fromhex("06000000e10000000000010000000000")
    struct.pack_into("<I", buf, 20, 0x20250701)  # date, BCD yyyymmdd
    buf[24:40] = bytes.fromhex("01010000600000006000000001000000")
    struct.pack_into("<II", buf, 900, 0, 0xFFFFFFFF)  # miscselect, miscmask
    flags = SGX_FLAGS_MODE64BIT | (SGX_FLAGS_DEBUG if debug else 0)
    struct.pack_into("<QQ", buf, 928, flags, 0x3)  # attributes: flags, xfrm
    struct.pack_into("<QQ", buf, 944, 0xFFFFFFFFFFFFFFFD, 0xFFFFFFFFFFFFFFFB)  # attribute mask
    buf[960:992] = hashlib.sha256(manifest).digest()
    struct.pack_into("<HH", buf, 1024, isvprodid, isvsvn)
    numbers = key.public_key().public_numbers()
    signed = bytes(buf[:128]) + bytes(buf[900:1028])
    signature = int.from_bytes(key.sign(signed, padding.PKCS1v15(), hashes.SHA256()), "big")
    q1, rem = divmod(signature * signature, numbers.n)
    q2 = (rem * signature) // numbers.n
    buf[128:512] = numbers.n.to_bytes(384, "little")
    struct.pack_into("<I", buf, 512, numbers.e)
    buf[516:900] = signature.to_bytes(384, "little")
    buf[1040:1424] = q1.to_bytes(384, "little")
    buf[1424:1808] = q2.to_bytes(384, "little")
    return bytes(buf)


def gramine_sgx_sign_main(argv: list[str]) -> int:
    _log_call("gramine-sgx-sign", argv)
    p = argparse.ArgumentParser(prog="gramine-sgx-sign")
    p.add_argument("--key", "-k", required=True)
    p.add_argument("--manifest", "-m", required=True)
    p.add_argument("--output", "-o", required=True)
    args = p.parse_args(argv)
    manifest_path = Path(args.manifest)
    raw = manifest_path.read_bytes()
    manifest = tomllib.loads(raw.decode())
    sgx = manifest.get("sgx", {})
    size = sgx.get("enclave_size", "")
    m = re.fullmatch(r"(\d+)([KMG]?)", size)
    n = int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)] if m else 0
    if n <= 0 or n & (n - 1):
        print(f"sgx.enclave_size {size!r} is not a power of two", file=sys.stderr)
        return 1
    key = serialization.load_pem_private_key(Path(args.key).read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey) or key.public_key().public_numbers().e != 3:
        print("SGX requires RSA exponent to be 3", file=sys.stderr)
        return 1
    sig = build_sigstruct(
        raw,
        key,
        debug=bool(sgx.get("debug")),
        isvprodid=int(sgx.get("isvprodid", 0)),
        isvsvn=int(sgx.get("isvsvn", 0)),
    )
    stem = manifest_path.name.removesuffix(".manifest")
    (manifest_path.parent / f"{stem}.sig").write_bytes(sig)
    Path(args.output).write_bytes(raw)
    print(f"Measurement:\n    {hashlib.sha256(raw).hexdigest()}")
    return 0


def _qe_request(socket_path: str, request: Mapping[str, Any]) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(socket_path)
        s.sendall(cbor2.dumps(dict(request)))
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    quote = cbor2.loads(b"".join(chunks))
    if not isinstance(quote, bytes):
        raise RuntimeError(f"fake QE refused: {quote!r}")
    return quote


def gramine_sgx_main(argv: list[str]) -> int:
    _log_call("gramine-sgx", argv)
    if os.environ.get("FAKE_GRAMINE_FAIL"):
        print("error: Cannot open device /dev/sgx_enclave. Please make sure the SGX kernel driver is loaded")
        return 1
    name = argv[0]
    manifest = tomllib.loads(Path(f"{name}.manifest.sgx").read_text())
    sig = Path(f"{name}.sig").read_bytes()
    identity = {
        "mr_enclave": sig[960:992],
        "mr_signer": hashlib.sha256(sig[128:512]).digest(),
        "attributes": struct.pack("<QQ", struct.unpack_from("<Q", sig, 928)[0] | SGX_FLAGS_INIT, 0x7),
        "isv_prod_id": struct.unpack_from("<H", sig, 1024)[0],
        "isv_svn": struct.unpack_from("<H", sig, 1026)[0],
    }
    loader = manifest["loader"]
    env: dict[str, str] = {}
    for key, value in loader.get("env", {}).items():
        if isinstance(value, dict) and value.get("passthrough"):
            if key in os.environ:
                env[key] = os.environ[key]
        elif isinstance(value, str) and key != "LD_LIBRARY_PATH":  # the enclave's view, not the host's
            env[key] = value
    root = Path(tempfile.mkdtemp(prefix="fake-attestation-"))
    kind = manifest.get("sgx", {}).get("remote_attestation", "none")
    (root / "attestation_type").write_text(kind if kind in ("dcap", "epid") else "none")
    os.mkfifo(root / "user_report_data")
    os.mkfifo(root / "quote")
    qe_socket = os.environ["FAKE_QE_SOCKET"]

    def relay() -> None:
        while True:
            with open(root / "user_report_data", "rb") as f:
                report_data = f.read()
            quote = _qe_request(qe_socket, {**identity, "report_data": report_data[:64].ljust(64, b"\0")})
            with open(root / "quote", "wb") as f:
                f.write(quote)

    threading.Thread(target=relay, daemon=True).start()
    child = subprocess.Popen([*loader["argv"], "--attestation-root", str(root)], env=env)

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = child.wait()
    shutil.rmtree(root, ignore_errors=True)
    return status if status >= 0 else 128 - status


class FakeQuotingEnclave:
    """Signs quotes for the fake gramine-sgx under ``platform`` (a dcap_builder test platform)."""

    def __init__(self, platform: DcapPlatform, socket_path: Path) -> None:
        self.platform = platform
        self.socket_path = socket_path
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                from r3e_tee.evidence.dcap_builder import build_sgx_quote

                request = cbor2.load(self.rfile)
                fake.requests.append(request)
                quote = build_sgx_quote(
                    fake.platform,
                    report_data=request["report_data"],
                    mr_enclave=request["mr_enclave"],
                    mr_signer=request["mr_signer"],
                    attributes=request["attributes"],
                    isv_prod_id=request["isv_prod_id"],
                    isv_svn=request["isv_svn"],
                )
                self.wfile.write(cbor2.dumps(quote))

        self.server = socketserver.ThreadingUnixStreamServer(str(socket_path), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeQuotingEnclave:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- Nitro: the NSM -----------------------------------------------------------------------------


def write_pki(pki: NitroPki, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (directory / "root.pem").write_bytes(pki.root.public_bytes(pem))
    (directory / "intermediates.pem").write_bytes(b"".join(c.public_bytes(pem) for c in pki.intermediates))
    (directory / "leaf.pem").write_bytes(pki.leaf.public_bytes(pem))
    (directory / "leaf-key.pem").write_bytes(
        pki.leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory


class FakeNsm:
    """An NSM transport: CBOR request in, CBOR response out, documents signed by a test PKI."""

    def __init__(
        self,
        *,
        signing_key: ec.EllipticCurvePrivateKey,
        certificate: bytes,
        cabundle: list[bytes],
        pcrs: Mapping[int, bytes],
        module_id: str = "i-0fa4e0000000000000-enc0123456789abcdef",
        fail_with: str | None = None,
        raw_response: bytes | None = None,
    ) -> None:
        self.signing_key = signing_key
        self.certificate = certificate
        self.cabundle = cabundle
        self.pcrs = dict(pcrs)
        self.module_id = module_id
        self.fail_with = fail_with
        self.raw_response = raw_response
        self.requests: list[Any] = []

    @classmethod
    def from_pki(cls, pki: NitroPki, pcrs: Mapping[int, bytes], **kw: Any) -> FakeNsm:
        return cls(
            signing_key=pki.leaf_key, certificate=pki.certificate, cabundle=pki.cabundle, pcrs=pcrs, **kw
        )

    @classmethod
    def from_dir(cls, directory: Path, pcrs: Mapping[int, bytes], **kw: Any) -> FakeNsm:
        from cryptography import x509

        der = serialization.Encoding.DER
        root = x509.load_pem_x509_certificate((directory / "root.pem").read_bytes())
        mids = x509.load_pem_x509_certificates((directory / "intermediates.pem").read_bytes())
        leaf = x509.load_pem_x509_certificate((directory / "leaf.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "leaf-key.pem").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(
            signing_key=key,
            certificate=leaf.public_bytes(der),
            cabundle=[c.public_bytes(der) for c in (root, *mids)],
            pcrs=pcrs,
            **kw,
        )

    def __call__(self, request: bytes) -> bytes:
        message = cbor2.loads(request)
        self.requests.append(message)
        if self.raw_response is not None:
            return self.raw_response
        if self.fail_with is not None:
            return cbor2.dumps({"Error": self.fail_with})
        if not isinstance(message, dict) or list(message) != ["Attestation"]:
            return cbor2.dumps({"Error": "InvalidOperation"})
        body = message["Attestation"]
        if not isinstance(body, dict) or set(body) != {"user_data", "nonce", "public_key"}:
            return cbor2.dumps({"Error": "InvalidArgument"})
        for field, limit in (("user_data", 512), ("nonce", 512), ("public_key", 1024)):
            value = body[field]
            if value is not None and (not isinstance(value, bytes) or len(value) > limit):
                return cbor2.dumps({"Error": "InvalidArgument"})
        from r3e_tee.evidence.nitro import build_nitro_document

        document = build_nitro_document(
            signing_key=self.signing_key,
            certificate=self.certificate,
            cabundle=self.cabundle,
            pcrs=self.pcrs,
            timestamp=datetime.now(UTC),
            module_id=self.module_id,
            public_key=body["public_key"],
            user_data=body["user_data"],
            nonce=body["nonce"],
        )
        return cbor2.dumps({"Attestation": {"document": document}})


def eif_pcrs(eif: bytes, *, debug: bool) -> dict[int, bytes]:
    """The PCRs of the fake EIF: PCR0 = SHA-384 of the file; all zero in debug mode (as Nitro)."""
    if debug:
        return {i: bytes(48) for i in (0, 1, 2, 3, 4, 8)}
    return {
        0: hashlib.sha384(eif).digest(),
        1: hashlib.sha384(b"fake kernel" + eif).digest(),
        2: hashlib.sha384(b"fake application" + eif).digest(),
        3: bytes(48),
        4: bytes(48),
        8: bytes(48),
    }


def nitro_enclave_main(argv: list[str]) -> int:
    """What runs 'inside' a fake Nitro Enclave: the real runtime with a FakeNsm."""
    p = argparse.ArgumentParser(prog="fake-nitro-enclave")
    p.add_argument("--eif", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    eif_bytes = Path(args.eif).read_bytes()
    eif = json.loads(eif_bytes)
    if eif.get("boot") == "crash":
        print("kernel panic - not syncing: fake EIF asked to crash", file=sys.stderr)
        return 1
    if eif.get("boot") == "hang":
        time.sleep(3600)
        return 1
    from r3e_tee.runtime import enclave

    nsm = FakeNsm.from_dir(Path(eif["pki"]), eif_pcrs(eif_bytes, debug=args.debug))
    return enclave.main(["--listen-unix", args.listen, "--device", "nsm"], nsm_transport=nsm)


# --- Nitro: nitro-cli ---------------------------------------------------------------------------


def vsock_path(state_dir: Path, cid: int, port: int) -> Path:
    return state_dir / f"vsock-{cid}-{port}.sock"


@contextlib.contextmanager
def _state(state_dir: Path) -> Iterator[dict[str, Any]]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = state_dir / "state.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        yield state
        path.write_text(json.dumps(state))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _describe(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "EnclaveName": entry["name"],
        "EnclaveID": entry["id"],
        "ProcessID": entry["pid"],
        "EnclaveCID": entry["cid"],
        "NumberOfCPUs": entry["cpus"],
        "CPUIDs": list(range(1, 1 + entry["cpus"])),
        "MemoryMiB": entry["memory"],
        "State": "RUNNING",
        "Flags": "DEBUG_MODE" if entry["debug"] else "NONE",
    }


def nitro_cli_main(argv: list[str]) -> int:
    _log_call("nitro-cli", argv)
    state_dir = Path(os.environ["FAKE_NITRO_STATE"])
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "describe-eif":
        p = argparse.ArgumentParser(prog="nitro-cli describe-eif")
        p.add_argument("--eif-path", required=True)
        eif = Path(p.parse_args(rest).eif_path).read_bytes()
        pcrs = eif_pcrs(eif, debug=False)
        print(
            json.dumps(
                {
                    "EifVersion": 4,
                    "Measurements": {
                        "HashAlgorithm": "Sha384 { ... }",
                        **{f"PCR{i}": pcrs[i].hex() for i in (0, 1, 2)},
                    },
                    "IsSigned": False,
                },
                indent=2,
            )
        )
        return 0
    if command == "run-enclave":
        p = argparse.ArgumentParser(prog="nitro-cli run-enclave")
        p.add_argument("--eif-path", required=True)
        p.add_argument("--memory", type=int, required=True)
        p.add_argument("--cpu-count", type=int, required=True)
        p.add_argument("--enclave-cid", type=int)
        p.add_argument("--enclave-name")
        p.add_argument("--debug-mode", action="store_true")
        args = p.parse_args(rest)
        if os.environ.get("FAKE_NITRO_FAIL"):
            print(
                "[ E26 ] Insufficient memory requested. User provided `memory` is 64 MB, but based on "
                "the EIF file size, the minimum memory should be 512 MB",
                file=sys.stderr,
            )
            return 1
        if args.memory < 64:
            print(f"[ E26 ] Insufficient memory requested: {args.memory} MiB", file=sys.stderr)
            return 1
        eif = json.loads(Path(args.eif_path).read_bytes())
        with _state(state_dir) as state:
            cid = args.enclave_cid or 16 + len(state)
            if any(e["cid"] == cid and _alive(e["pid"]) for e in state.values()):
                print(f"[ E?? ] CID {cid} is in use", file=sys.stderr)
                return 1
            enclave_id = f"i-0fa4e0000000000000-enc{secrets.token_hex(8)}"
            listen = vsock_path(state_dir, cid, int(eif.get("vsock_port", 5005)))
            log = open(state_dir / f"{enclave_id}.log", "ab")  # noqa: SIM115 - handed to the child
            cmd = [
                str(Path(sys.argv[0]).with_name("fake-nitro-enclave")),
                "--eif",
                args.eif_path,
                "--listen",
                str(listen),
            ]
            if args.debug_mode:
                cmd.append("--debug")
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
            entry = {
                "id": enclave_id,
                "name": args.enclave_name or Path(args.eif_path).stem,
                "pid": proc.pid,
                "cid": cid,
                "cpus": args.cpu_count,
                "memory": args.memory,
                "debug": args.debug_mode,
            }
            state[enclave_id] = entry
        print("Start allocating memory...")
        print(f"Started enclave with enclave-cid: {cid}, memory: {args.memory} MiB, cpu-ids: [1, 3]")
        info = _describe(entry)
        for key in ("State", "Flags"):
            info.pop(key)
        print(json.dumps(info, indent=4))
        return 0
    if command == "describe-enclaves":
        with _state(state_dir) as state:
            for enclave_id in [k for k, e in state.items() if not _alive(e["pid"])]:
                del state[enclave_id]
            print(json.dumps([_describe(e) for e in state.values()], indent=4))
        return 0
    if command == "terminate-enclave":
        p = argparse.ArgumentParser(prog="nitro-cli terminate-enclave")
        p.add_argument("--enclave-id", required=True)
        args = p.parse_args(rest)
        with _state(state_dir) as state:
            entry = state.pop(args.enclave_id, None)
        if entry is None or not _alive(entry["pid"]):
            print(f"[ E50 ] Enclave {args.enclave_id} not found", file=sys.stderr)
            return 1
        with contextlib.suppress(ProcessLookupError):
            os.killpg(entry["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and _alive(entry["pid"]):
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(entry["pid"], signal.SIGKILL)
        print(
            json.dumps({"EnclaveName": entry["name"], "EnclaveID": entry["id"], "Terminated": True}, indent=4)
        )
        return 0
    print(f"nitro-cli: unknown command {command!r}", file=sys.stderr)
    return 2
