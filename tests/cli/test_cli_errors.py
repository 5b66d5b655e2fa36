"""r3e-tee-cli on bad input: one line naming the problem and the fix, a non-zero exit, no
traceback, no secret echoed."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from r3e_tee.cli.main import main


@dataclass
class FakeService:
    """A stand-in for the service: records every request and answers with ``reply``."""

    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)
    status: int = 200
    content_type: str = "application/json"
    body: bytes = b"{}"


@pytest.fixture
def fake() -> Iterator[FakeService]:
    svc = FakeService()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            svc.requests.append((self.command, self.path))
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.send_response(svc.status)
            self.send_header("Content-Type", svc.content_type)
            self.send_header("Content-Length", str(len(svc.body)))
            self.end_headers()
            self.wfile.write(svc.body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    svc.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield svc
    finally:
        server.shutdown()
        server.server_close()


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["destroy-enclave", "../secrets/db"], "enclave id"),
        (["delete-secret", "../functions/pricing"], "secret name"),
        (["delete-secret", ".."], "secret name"),
        (["invoke", "../secrets/db"], "function name"),
    ],
)
def test_a_name_cannot_reach_another_resource(
    fake: FakeService, capsys: pytest.CaptureFixture[str], args: list[str], what: str
) -> None:
    """Before: `destroy-enclave ../secrets/db` sent DELETE /v1/enclaves/../secrets/db, which
    deleted the secret db."""
    code, _, err = run(["--server", fake.url, "--token", "t", *args], capsys)
    assert code == 2
    assert f"{what} " in err and "not a valid name" in err and "fix:" in err
    assert fake.requests == []


def test_a_name_with_spaces_is_sent_quoted(fake: FakeService, capsys: pytest.CaptureFixture[str]) -> None:
    fake.body = b'{"id": "x", "state": "terminated"}'
    code, _, _ = run(["--server", fake.url, "--token", "t", "destroy-enclave", "a b"], capsys)
    assert code == 0 and fake.requests == [("DELETE", "/v1/enclaves/a%20b")]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("token", ["r3e_SECRET-token\nX", "r3e_SECRET-tokén", "r3e_SECRET token"])
def test_a_malformed_token_is_refused_without_echoing_it(
    fake: FakeService, capsys: pytest.CaptureFixture[str], token: str
) -> None:
    """Before: a token with a newline failed inside httpx, whose message printed the whole
    Authorization header (the token); a non-ASCII one crashed with a traceback."""
    code, out, err = run(["--server", fake.url, "--token", token, "list-enclaves"], capsys)
    assert code == 2
    assert "SECRET" not in out + err
    assert "token" in err and "fix:" in err and "R3E_TEE_TOKEN" in err
    assert fake.requests == []


def test_a_refused_token_says_how_to_fix_it(fake: FakeService, capsys: pytest.CaptureFixture[str]) -> None:
    fake.status = 401
    fake.body = b'{"error": "unauthenticated", "message": "invalid or revoked token"}'
    code, out, err = run(["--server", fake.url, "--token", "r3e_SECRET", "list-enclaves"], capsys)
    assert code == 1
    assert "invalid or revoked token" in err and "fix:" in err and "--token" in err
    assert "SECRET" not in out + err


@pytest.mark.parametrize(
    ("content_type", "body"),
    [("text/html", b"<html>login</html>"), ("application/json", b"{not json"), ("", b"plain")],
)
def test_a_server_that_answers_garbage_is_named(
    fake: FakeService, capsys: pytest.CaptureFixture[str], content_type: str, body: bytes
) -> None:
    """Before: a proxy page or broken JSON crashed every command with a traceback."""
    fake.content_type, fake.body = content_type, body
    for command in (["list-enclaves"], ["list-functions"], ["list-secrets"]):
        code, _, err = run(["--server", fake.url, "--token", "t", *command], capsys)
        assert code == 3
        assert fake.url in err and "not the service's JSON" in err and "fix:" in err
    code, out, _ = run(["--server", fake.url, "--token", "t", "-o", "json", "version"], capsys)
    assert code == 0 and "not the service's JSON" in json.loads(out)["server"]["error"]


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        ("notaurl", "http:// or https://"),
        ("ftp://x", "http:// or https://"),
        ("http://127.0.0.1:99999", "Port out of range"),
        ("http://", "no host"),
    ],
)
def test_a_bad_server_url_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], server: str, problem: str
) -> None:
    """Before: exit 3 ("could not reach") with httpx's wording, or a traceback for a bad port."""
    code, _, err = run(["--server", server, "--token", "t", "list-enclaves"], capsys)
    assert code == 2
    assert "not a service URL" in err and problem in err and "--server http://" in err


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--data", "notjson"], "--data is not JSON: Expecting value"),
        (["--data", "@{empty}"], "is empty; the event must be JSON"),
        (["--data", "@{garbage}"], "is not JSON"),
        (["--data", "@{missing}"], "cannot read input"),
        (["--jwks", "{a_list}"], "is not a JWKS"),
        (["--jwks", "{garbage}"], "is not a JWKS"),
        (["--save", "{missing}/out.json"], "does not exist"),
        (["--save", "{dir}"], "is a directory"),
        (["--idempotency-key", "k"], "--idempotency-key only applies to queued invocations"),
    ],
)
def test_invoke_refuses_bad_input_before_running_the_function(
    fake: FakeService,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    options: list[str],
    expected: str,
) -> None:
    """Before: a JWKS that was a JSON list crashed with a traceback, an unwritable --save
    crashed after the function had run, and --idempotency-key without --async was ignored."""
    names = {
        "empty": _write(tmp_path / "empty.json", ""),
        "garbage": _write(tmp_path / "garbage.json", "{{"),
        "a_list": _write(tmp_path / "list.json", "[1, 2]"),
        "missing": tmp_path / "missing",
        "dir": tmp_path,
    }
    args = [o.format(**names) for o in options]
    code, _, err = run(["--server", fake.url, "--token", "t", "invoke", "echo", *args], capsys)
    assert code == 2
    assert expected in err and "fix:" in err
    assert not any("/invoke" in path for _, path in fake.requests)


def test_a_jwks_url_that_serves_no_jwks_is_named(
    fake: FakeService, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a URL answering other JSON surfaced as 'token signed by unknown key'."""
    fake.body = b'{"status": "ok"}'
    jwks = f"{fake.url}/healthz"
    code, _, err = run(["--server", fake.url, "--token", "t", "invoke", "echo", "--jwks", jwks], capsys)
    assert code == 2 and f"{jwks} is not a JWKS" in err and "fix:" in err
    fake.status = 404
    code, _, err = run(["--server", fake.url, "--token", "t", "invoke", "echo", "--jwks", jwks], capsys)
    assert code == 3 and "HTTP 404" in err and "fix:" in err


@pytest.mark.parametrize("flag", [["--allow-simulation"], ["--root", "r.pem"], ["--attestation", "a.json"]])
def test_verify_receipt_refuses_evidence_options_without_evidence(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: list[str]
) -> None:
    """Before: --allow-simulation (UNSAFE), --root and --attestation were silently ignored
    without --evidence, so the user believed the raw evidence had been checked."""
    receipt = _write(tmp_path / "r.json", '{"receipt": {"body": {}, "signature": ""}}')
    code, _, err = run(["verify-receipt", str(receipt), *flag], capsys)
    assert code == 2
    assert f"{flag[0]} only applies with --evidence" in err and "fix: add --evidence" in err


def test_verify_receipt_names_a_file_that_is_not_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(["verify-receipt", str(_write(tmp_path / "r.json", "{{"))], capsys)
    assert code == 2 and "is not JSON" in err and "fix:" in err and "invoke --save" in err


@pytest.mark.parametrize(
    ("report", "problem"),
    [
        ("{{", "not a JSON attestation report"),
        ("[1]", "not a JSON attestation report"),
        ('{"kind": "sgx-dcap"}', "not a JSON attestation report"),
        ('{"evidence": "!!not base64"}', "'evidence' is not base64"),
    ],
)
def test_a_bad_attestation_report_is_named(tmp_path: Path, report: str, problem: str) -> None:
    """Before: `verify-receipt --evidence --attestation FILE` crashed with a traceback (KeyError,
    JSONDecodeError, binascii.Error) on such a file."""
    from r3e_tee.cli.functions import _report_evidence
    from r3e_tee.errors import InvalidRequestError

    try:
        doc: object = json.loads(report)
    except ValueError:
        doc = None
    with pytest.raises(InvalidRequestError) as caught:
        _report_evidence(doc, "att.json")
    assert problem in caught.value.message and caught.value.message.startswith("att.json: ")
    assert caught.value.hint and "--attestation" in caught.value.hint
    assert _report_evidence({"evidence": "AAEC"}, "att.json") == b"\x00\x01\x02"


def test_a_refused_local_dev_token_names_its_file(
    fake: FakeService, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a stale discovered dev token was reported as 'the token from --token' the user
    never passed."""
    token_file = _write(tmp_path / "admin-token", "r3e_SECRET_stale\n")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("R3E_TEE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("R3E_TEE_TOKEN", raising=False)
    fake.status = 401
    fake.body = b'{"error": "unauthenticated", "message": "invalid or revoked token"}'
    code, out, err = run(["--server", fake.url, "list-enclaves"], capsys)
    assert code == 1
    assert f"local dev token read from {token_file}" in err and "pass --token" in err
    assert "SECRET" not in out + err


def _commands() -> list[list[str]]:
    from r3e_tee.cli.main import EXAMPLES

    return [name.split() for name in EXAMPLES]


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_help_shows_examples(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Before: no command's --help had an example."""
    code = main([*command, "--help"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Examples:" in out and f"r3e-tee-cli {' '.join(command)}" in out


def test_every_command_has_examples_and_the_top_help_explains_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from r3e_tee.cli.main import EXAMPLES, app, config_app

    code = main(["--help"])
    out = _flat(capsys.readouterr().out)
    assert code == 0 and "Exit codes" in out and "3 the service could not be reached" in out

    def name(info: Any) -> str:
        return str(info.name or info.callback.__name__)

    registered = {name(i) for i in app.registered_commands}
    registered |= {f"config {name(i)}" for i in config_app.registered_commands}
    assert registered == set(EXAMPLES)


def test_simulation_is_named_unsafe_where_it_is_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("create-enclave", "deploy-function", "attestation-test"):
        assert main([command, "--help"]) == 0
        assert "no hardware protects the enclave" in _flat(capsys.readouterr().out)


def _flat(text: str) -> str:
    """Help text as one line of words: rich wraps it and draws boxes around options."""
    return " ".join(re.sub("[\u2500-\u257f]", " ", text).split())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["deploy-function", "{code}", "--name", "f", "--runtime", "python", "--provider", "sgxx"],
            "--provider",
        ),
        (
            ["deploy-function", "{code}", "--name", "f", "--runtime", "cobol"],
            "--runtime 'cobol' is not a runtime",
        ),
        (["create-enclave", "--size", "64M", "--provider", "foo"], "--provider 'foo' is not a provider"),
        (["attestation-test", "--provider", "foo"], "--provider 'foo' is not a provider"),
    ],
)
def test_provider_and_runtime_typos_are_refused_before_any_request(
    fake: FakeService, capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], expected: str
) -> None:
    """Before: deploy-function --provider sgxx was accepted by the service (measurement None,
    no enclave could ever run it) and attestation-test --provider foo reported a FAIL step."""
    code_file = _write(tmp_path / "f.py", "def handler(event, ctx):\n    return event\n")
    argv = [a.format(code=code_file) for a in args]
    code, _, err = run(["--server", fake.url, "--token", "t", *argv], capsys)
    assert code == 2 and expected in err and "fix: use" in err
    assert fake.requests == []


def test_a_debug_enclave_is_announced_unsafe(fake: FakeService, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: --debug created a readable enclave without a word."""
    fake.body = b'{"id": "e1", "state": "creating"}'
    code, _, err = run(
        ["--server", fake.url, "--token", "t", "create-enclave", "--size", "64M", "--debug"], capsys
    )
    assert code == 0 and "UNSAFE --debug" in err and "memory" in err
    code, _, err = run(["--server", fake.url, "--token", "t", "create-enclave", "--size", "64M"], capsys)
    assert code == 0 and "UNSAFE" not in err


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (["invoke"], "Missing argument 'name'.", "see r3e-tee-cli invoke --help"),
        (["nosuchcmd"], "No such command 'nosuchcmd'.", "see r3e-tee-cli --help"),
        (["audit-log", "--after", "x"], "Invalid value for '--after'", "see r3e-tee-cli audit-log --help"),
    ],
)
def test_usage_errors_are_json_when_json_was_asked_for(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str, hint: str
) -> None:
    """Before: -o json still printed click's usage banner, which a script cannot parse."""
    code, out, _ = run(["-o", "json", *args], capsys)
    body = json.loads(out)
    assert code == 2 and body["error"] == "usage" and message in body["message"] and body["hint"] == hint


def test_usage_errors_name_the_installed_program(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'Usage: python -m r3e_tee.cli.main invoke' (or pytest, ...), not the command to type."""
    code, _, err = run(["invoke"], capsys)
    assert code == 2 and "Usage: r3e-tee-cli invoke" in err and "Try 'r3e-tee-cli invoke --help'" in err


def test_an_unreadable_evidence_file_is_named_once_with_a_fix(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Before: 'unusable input: nofile: cannot read nofile: No such file or directory', no fix."""
    missing = tmp_path / "quote.bin"
    code, _, err = run(["verify-evidence", str(missing)], capsys)
    assert code == 2
    assert f"evidence file: cannot read {missing}: No such file or directory" in _flat(err)
    assert "fix: pass the path of a quote" in _flat(err)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["doctor", "--timeout", "-1"], "--timeout"),
        (["audit-log", "--limit", "0"], "--limit"),
        (["audit-log", "--after", "-3"], "--after"),
        (["deploy-function", "f.py", "--name", "f", "--runtime", "python", "--max", "0"], "--max"),
        (
            ["deploy-function", "f.py", "--name", "f", "--runtime", "python", "--concurrency", "0"],
            "--concurrency",
        ),
    ],
)
def test_numbers_out_of_range_are_usage_errors(
    fake: FakeService, capsys: pytest.CaptureFixture[str], args: list[str], option: str
) -> None:
    """Before: doctor --timeout -1 ran and passed; audit-log --limit 0 went to the service and
    came back as 'query.limit: Input should be greater than or equal to 1'."""
    code, _, err = run(["--server", fake.url, "--token", "t", *args], capsys)
    assert code == 2 and f"Invalid value for '{option}'" in err and f"r3e-tee-cli {args[0]} --help" in err
    assert fake.requests == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["--value-env", "R3E_UX_TEST_UNSET"], "environment variable R3E_UX_TEST_UNSET is not set"),
        (
            ["--value-env", "R3E_UX_TEST_EMPTY"],
            "the secret value from --value-env R3E_UX_TEST_EMPTY is empty",
        ),
        (["--value-file", "{missing}"], "cannot read --value-file"),
        (["--value-file", "{empty}"], "is empty"),
    ],
)
def test_put_secret_value_problems_say_how_to_fix_them(
    fake: FakeService,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    value: list[str],
    expected: str,
) -> None:
    """Before: 'environment variable X is not set' and 'the secret value is empty', no fix."""
    monkeypatch.delenv("R3E_UX_TEST_UNSET", raising=False)
    monkeypatch.setenv("R3E_UX_TEST_EMPTY", "")
    policy = _write(tmp_path / "p.yaml", "measurements: [" + "ab" * 32 + "]\n")
    names = {"missing": tmp_path / "nope", "empty": _write(tmp_path / "empty", "")}
    args = [v.format(**names) for v in value]
    code, _, err = run(
        ["--server", fake.url, "--token", "t", "put-secret", "db", "--policy", str(policy), *args], capsys
    )
    assert code == 2 and expected in _flat(err) and "fix:" in err
    assert fake.requests == []


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b'{"status": "ok"}'])
def test_version_names_a_server_that_is_not_the_service(
    fake: FakeService, capsys: pytest.CaptureFixture[str], body: bytes
) -> None:
    """Before: a JSON list or string from /v1/version crashed `version` with a TypeError traceback."""
    fake.body = body
    code, out, _ = run(["--server", fake.url, "-o", "json", "version"], capsys)
    assert code == 0 and "not the service's version" in json.loads(out)["server"]["error"]
