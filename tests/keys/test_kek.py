"""KEK providers: the file KEK as the Helm chart tells operators to make it, and PKCS#11 on SoftHSM2."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from r3e_tee.config import KeysConfig, parse_config
from r3e_tee.keys.errors import KekError, KeyIntegrityError
from r3e_tee.keys.kek import FileKek, Pkcs11Kek, open_kek, open_previous_kek

from .conftest import HSM_KEYS, HSM_LEAKY_KEYS, SoftHsm, write_kek


def test_openssl_rand_32_is_accepted_and_wraps(tmp_path: Path) -> None:
    path = tmp_path / "kek.key"
    if shutil.which("openssl"):
        # the chart's command, private as the KEK hint says (FileKek refuses a world-readable file)
        subprocess.run(["sh", "-c", 'umask 077; openssl rand -out "$0" 32', str(path)], check=True)
    else:
        write_kek(path)
    kek = FileKek.load(path)
    assert kek.kek_id.startswith("file:") and len(kek.kek_id) == 5 + 16
    blob = kek.wrap(b"k" * 32, b"owner-1")
    assert blob[:1] == b"\x01" and len(blob) == 1 + 12 + 32 + 16
    assert bytes(kek.unwrap(blob, b"owner-1")) == b"k" * 32
    # another record's associated data, a flipped bit, a truncation: typed errors, not crashes
    with pytest.raises(KeyIntegrityError):
        kek.unwrap(blob, b"owner-2")
    bad = bytearray(blob)
    bad[20] ^= 1
    with pytest.raises(KeyIntegrityError, match="does not authenticate"):
        kek.unwrap(bytes(bad), b"owner-1")
    with pytest.raises(KeyIntegrityError, match="format byte or length"):
        kek.unwrap(blob[:10], b"owner-1")
    # the same file gives the same id; another key another id, and it cannot unwrap
    assert FileKek.load(path).kek_id == kek.kek_id
    other = FileKek.load(write_kek(tmp_path / "other.key"))
    assert other.kek_id != kek.kek_id
    with pytest.raises(KeyIntegrityError):
        other.unwrap(blob, b"owner-1")
    kek.close()
    with pytest.raises(KekError, match="closed"):
        kek.wrap(b"x", b"")


@pytest.mark.parametrize(
    ("content", "message", "hint"),
    [
        (os.urandom(32).hex().encode() + b"\n", "64 hex characters", "xxd -r -p"),
        (base64.b64encode(os.urandom(32)) + b"\n", "base64 text", "base64 -d"),
        (os.urandom(16), "is 16 bytes", "openssl rand -out kek.key 32"),
        (os.urandom(33), "is 33 bytes", "openssl rand -out kek.key 32"),
        (b"", "is 0 bytes", "openssl rand"),
        (bytes(32), "constant pattern", "openssl rand"),
    ],
)
def test_anything_but_32_raw_bytes_is_refused_clearly(
    tmp_path: Path, content: bytes, message: str, hint: str
) -> None:
    path = tmp_path / "kek.key"
    path.write_bytes(content)
    with pytest.raises(KekError) as err:
        FileKek.load(path)
    assert message in err.value.message and str(path) in err.value.message
    assert err.value.hint and hint in err.value.hint
    if content:
        assert content.strip().decode(errors="replace") not in str(err.value)


def test_missing_kek_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(KekError, match="does not exist") as err:
        FileKek.load(tmp_path / "nope.key")
    assert "openssl rand -out kek.key 32" in (err.value.hint or "")
    with pytest.raises(KekError, match="not a regular file"):
        FileKek.load(tmp_path)


def test_generated_only_when_allowed_and_with_mode_0600(tmp_path: Path) -> None:
    cfg = KeysConfig()
    with pytest.raises(KekError, match=r"no KEK: keys.file.path is not set"):
        open_kek(cfg, tmp_path / "data", allow_generate=False)
    source = open_kek(cfg, tmp_path / "data", allow_generate=True)
    path = tmp_path / "data" / "kek.key"
    assert source.generated and path.stat().st_size == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # the next start reads the same key, and a configured path is never generated
    again = open_kek(cfg, tmp_path / "data", allow_generate=True)
    assert not again.generated and again.kek.kek_id == source.kek.kek_id
    explicit = parse_config(f"keys:\n  file:\n    path: {tmp_path / 'absent.key'}\n").keys
    with pytest.raises(KekError, match="does not exist"):
        open_kek(explicit, tmp_path / "data", allow_generate=True)


def test_previous_kek_config(tmp_path: Path, kek_file: Path) -> None:
    assert open_previous_kek(KeysConfig(), tmp_path) is None
    cfg = parse_config(
        f"keys:\n  previous_kek:\n    kek_provider: file\n    file:\n      path: {kek_file}\n"
    ).keys
    prev = open_previous_kek(cfg, tmp_path)
    assert prev is not None and prev.kek_id == FileKek.load(kek_file).kek_id
    with pytest.raises(KekError, match="previous_kek.file.path is not set"):
        open_previous_kek(parse_config("keys:\n  previous_kek: {}\n").keys, tmp_path)


# --- PKCS#11 (SoftHSM2) ---------------------------------------------------------------------------------


@pytest.mark.softhsm
def test_pkcs11_wrap_unwrap_in_the_token(softhsm: SoftHsm) -> None:
    import pkcs11

    a = Pkcs11Kek(softhsm.module, softhsm.token, HSM_KEYS[0], softhsm.pin)
    b = Pkcs11Kek(softhsm.module, softhsm.token, HSM_KEYS[1], softhsm.pin)  # shares the login
    try:
        assert a.kek_id == f"pkcs11:{softhsm.token}/{HSM_KEYS[0]}" and a.provider == "pkcs11"
        blob = a.wrap(b"d" * 32, b"owner\0v1")
        assert bytes(a.unwrap(blob, b"owner\0v1")) == b"d" * 32
        with pytest.raises(KeyIntegrityError):
            a.unwrap(blob, b"owner\0v2")
        with pytest.raises(KeyIntegrityError):
            b.unwrap(blob, b"owner\0v1")  # another key in the same token
        bad = bytearray(blob)
        bad[-1] ^= 1
        with pytest.raises(KeyIntegrityError):
            a.unwrap(bytes(bad), b"owner\0v1")
        # the KEK itself never leaves the token
        with a._shared.lock:  # type: ignore[union-attr]
            assert a._key[pkcs11.Attribute.EXTRACTABLE] is False
            assert a._key[pkcs11.Attribute.SENSITIVE] is True
    finally:
        a.close()
    # closing one provider does not log the other out
    assert bytes(b.unwrap(b.wrap(b"z" * 32, b"x"), b"x")) == b"z" * 32
    b.close()


@pytest.mark.softhsm
def test_pkcs11_configuration_errors_are_clear(softhsm: SoftHsm, tmp_path: Path) -> None:
    with pytest.raises(KekError, match="rejected the user PIN") as err:
        Pkcs11Kek(softhsm.module, softhsm.token, HSM_KEYS[0], "0000")
    assert "0000" not in str(err.value)
    with pytest.raises(KekError, match="no PKCS#11 token labelled 'nope'") as err:
        Pkcs11Kek(softhsm.module, "nope", HSM_KEYS[0], softhsm.pin)
    assert softhsm.token in (err.value.hint or "")
    with pytest.raises(KekError, match="no AES key labelled 'missing'"):
        Pkcs11Kek(softhsm.module, softhsm.token, "missing", softhsm.pin)
    with pytest.raises(KekError, match="does not exist"):
        Pkcs11Kek(tmp_path / "libnothing.so", softhsm.token, HSM_KEYS[0], softhsm.pin)
    with pytest.raises(KekError, match="no PKCS#11 user PIN"):
        Pkcs11Kek.from_config(softhsm.module, softhsm.token, HSM_KEYS[0], None, None)
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    pin_file.chmod(0o600)
    kek = Pkcs11Kek.from_config(softhsm.module, softhsm.token, HSM_KEYS[0], None, pin_file)
    kek.close()
    cfg = parse_config(
        "keys:\n  kek_provider: pkcs11\n  pkcs11:\n"
        f"    module: {softhsm.module}\n    token_label: {softhsm.token}\n    key_label: {HSM_KEYS[2]}\n"
        f"    pin_file: {pin_file}\n"
    ).keys
    source = open_kek(cfg, tmp_path, allow_generate=True)
    assert source.kek.provider == "pkcs11" and not source.generated
    source.kek.close()


@pytest.mark.parametrize(
    ("mode", "gid", "why"),
    [
        (0o644, None, "every user of this host"),
        (0o604, None, "every user of this host"),
        (0o660, None, "replace it"),
        (0o640, 54321, "group 54321, which this service is not in, read it"),
    ],
)
def test_a_kek_file_others_can_read_or_replace_is_refused(
    tmp_path: Path, mode: int, gid: int | None, why: str
) -> None:
    """Before, a world-readable KEK file was only logged and a group-writable or foreign-group
    one accepted: every user of the host could read (or swap) the key wrapping all keys."""
    path = write_kek(tmp_path / "kek.key")
    if gid is not None:
        os.chown(path, -1, gid)
    path.chmod(mode)
    with pytest.raises(KekError, match=f"KEK file {path} is not private: mode {mode:o} .*{why}") as err:
        FileKek.load(path)
    assert err.value.hint and "chmod 600" in err.value.hint
    assert path.read_bytes().hex() not in str(err.value)


def test_a_kek_file_readable_by_the_services_own_group_is_accepted(tmp_path: Path) -> None:
    """The Helm chart mounts the KEK Secret with defaultMode 0440 and the pod's fsGroup."""
    path = write_kek(tmp_path / "kek.key")
    os.chown(path, -1, os.getegid())
    path.chmod(0o440)
    FileKek.load(path).close()


@pytest.mark.softhsm
def test_a_pin_file_others_can_read_is_refused(softhsm: SoftHsm, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    pin_file.chmod(0o644)
    with pytest.raises(KekError, match="PIN file .* is not private: mode 644") as err:
        Pkcs11Kek.from_config(softhsm.module, softhsm.token, HSM_KEYS[0], None, pin_file)
    assert softhsm.pin not in str(err.value) + (err.value.hint or "")
    pin_file.chmod(0o600)
    Pkcs11Kek.from_config(softhsm.module, softhsm.token, HSM_KEYS[0], None, pin_file).close()


@pytest.mark.softhsm
@pytest.mark.parametrize("label", sorted(HSM_LEAKY_KEYS))
def test_a_pkcs11_kek_that_can_leave_the_token_is_refused(softhsm: SoftHsm, label: str) -> None:
    """Before, any AES-256 key allowed to encrypt was taken: one created non-sensitive (its value
    readable with the PIN) or extractable (wrappable out) let the KEK leave the HSM."""
    sensitive, extractable = HSM_LEAKY_KEYS[label]
    with pytest.raises(
        KekError, match=f"can leave the token \\(sensitive: {sensitive}, extractable: {extractable}"
    ):
        Pkcs11Kek(softhsm.module, softhsm.token, label, softhsm.pin)
    # the refused provider released its login: a good key on the token still opens
    Pkcs11Kek(softhsm.module, softhsm.token, HSM_KEYS[0], softhsm.pin).close()


@pytest.mark.softhsm
def test_a_wrong_pin_is_refused_even_while_the_token_is_logged_in(softhsm: SoftHsm) -> None:
    """PKCS#11 login belongs to the process, and the providers of one token share it. Before, a
    second provider (keys.previous_kek on the same token, say) with a wrong PIN was handed the
    existing login without its PIN ever being checked."""
    a = Pkcs11Kek(softhsm.module, softhsm.token, HSM_KEYS[0], softhsm.pin)
    try:
        with pytest.raises(KekError, match="not the one this process logged in to it with") as err:
            Pkcs11Kek(softhsm.module, softhsm.token, HSM_KEYS[1], "0000")
        assert "0000" not in str(err.value) + (err.value.hint or "")
        b = Pkcs11Kek(softhsm.module, softhsm.token, HSM_KEYS[1], softhsm.pin)
        b.close()
        assert bytes(a.unwrap(a.wrap(b"k" * 32, b"x"), b"x")) == b"k" * 32  # still logged in
    finally:
        a.close()
    with pytest.raises(KekError, match="rejected the user PIN"):  # and the token itself says no
        Pkcs11Kek(softhsm.module, softhsm.token, HSM_KEYS[1], "0000")
