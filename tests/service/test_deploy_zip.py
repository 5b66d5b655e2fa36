"""A function zip is checked when it is deployed, not when its first enclave unpacks it.

Before, any bytes ``zipfile.is_zipfile`` recognised were accepted for a Python function: an
archive that escapes its directory, a bomb, a corrupt one or one without the handler's module
was stored, measured and then failed in every enclave started for it.
"""

from __future__ import annotations

import base64
import io
import stat
import zipfile

import pytest
from fastapi.testclient import TestClient

from r3e_tee.functions import model

AUTH = {"Authorization": "Bearer r3e_test-admin-token-0123456789"}
HANDLER = b"def handler(event, ctx):\n    return event\n"


def _zip(*entries: tuple[str | zipfile.ZipInfo, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def _deploy(client: TestClient, code: bytes, **settings: object) -> tuple[int, str]:
    body = {"name": "zipped", "runtime": "python", "code": base64.b64encode(code).decode(), **settings}
    r = client.post("/v1/functions", json=body, headers=AUTH)
    return r.status_code, r.json().get("message", "")


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def test_sound_zips_deploy(client: TestClient) -> None:
    assert _deploy(client, _zip(("main.py", HANDLER)))[0] == 201
    code = _zip(("pkg/__init__.py", b""), ("pkg/fn.py", HANDLER), ("pkg/data/x.json", b"{}"))
    assert _deploy(client, code, handler="pkg.fn.handler")[0] == 201
    assert _deploy(client, _zip(("app/__init__.py", HANDLER)), handler="app.handler")[0] == 201


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the zip with a name twice is built on purpose
@pytest.mark.parametrize(
    ("entries", "handler", "problem"),
    [
        ([("../escape.py", b"x"), ("main.py", HANDLER)], "handler", "../escape.py"),
        ([("a/../../escape.py", b"x"), ("main.py", HANDLER)], "handler", "escape.py"),
        ([("/etc/cron.d/x", b"x"), ("main.py", HANDLER)], "handler", "/etc/cron.d/x"),
        ([(_symlink("main.py"), b"/etc/passwd")], "handler", "symbolic link"),
        ([("main.py", HANDLER), ("main.py", b"other")], "handler", "twice"),
        ([("lib.py", HANDLER)], "handler", "main.py"),
        ([("main.py", HANDLER)], "pkg.fn.handler", "pkg/fn.py"),
        ([("json/x.py", HANDLER)], "json.dumps", "json.py"),
    ],
)
def test_unsound_zips_are_refused_at_deploy(
    client: TestClient, entries: list[tuple[str | zipfile.ZipInfo, bytes]], handler: str, problem: str
) -> None:
    status, message = _deploy(client, _zip(*entries), handler=handler)
    assert status == 400 and problem in message, message


def test_zip_bombs_many_entries_and_corrupt_zips_are_refused(client: TestClient) -> None:
    bomb = _zip(
        ("main.py", HANDLER), ("big.bin", bytes(model.MAX_UNZIPPED_BYTES)), compression=zipfile.ZIP_DEFLATED
    )
    assert len(bomb) < 1024 * 1024
    status, message = _deploy(client, bomb)
    assert status == 400 and "unpacks to" in message, message
    many = _zip(("main.py", HANDLER), *((f"f{i}", b"") for i in range(model.MAX_ZIP_ENTRIES)))
    status, message = _deploy(client, many)
    assert status == 400 and str(model.MAX_ZIP_ENTRIES) in message, message
    good = _zip(("main.py", HANDLER))
    corrupt = good.replace(HANDLER, HANDLER.replace(b"event\n", b"evenT\n"))  # CRC no longer matches
    status, message = _deploy(client, corrupt)
    assert status == 400 and "main.py" in message, message
