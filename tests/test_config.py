"""tee-config.yaml: the guide's ConfigMap is accepted; every bad input is located and explained."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.shared import GUIDE_CONFIGMAP

from r3e_tee.config import (
    TeeConfig,
    check_key_files,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from r3e_tee.errors import ConfigError

SECRET = "s3cr3t-api-key-value"


def bad(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, file="tee-config.yaml", env=env if env is not None else {"SGX_API_KEY": SECRET})
    return info.value


def test_guide_configmap_is_accepted_unchanged() -> None:
    cfg = parse_config(GUIDE_CONFIGMAP, file="cm.yaml", env={"SGX_API_KEY": SECRET})
    assert cfg.enabled_providers == ("sgx", "nitro")
    sgx = cfg.provider("sgx")
    assert sgx is not None and sgx.attestation.api_key is not None
    assert sgx.attestation.api_key.get_secret_value() == SECRET
    assert SECRET not in repr(cfg) and SECRET not in str(cfg.model_dump())
    assert sgx.attestation.service == "https://api.trustedservices.intel.com/sgx/attestation/v4"


def test_missing_env_var_is_named_with_file_line_and_key() -> None:
    err = bad(GUIDE_CONFIGMAP, env={})
    assert "SGX_API_KEY" in str(err)
    assert err.file == "tee-config.yaml" and err.line == 6
    assert err.key_path == "providers[0].attestation.apiKey"


def test_env_default_and_typing_of_substituted_values() -> None:
    text = "server:\n  port: ${PORT:-9090}\n  dev: ${DEV:-false}\n  host: '${HOST:-0.0.0.0}'\n"
    cfg = parse_config(text, env={})
    assert cfg.server.port == 9090 and cfg.server.dev is False and cfg.server.host == "0.0.0.0"
    cfg = parse_config(text, env={"PORT": "7000"})
    assert cfg.server.port == 7000
    assert parse_config("server:\n  host: 'a$$b'\n", env={}).server.host == "a$b"


def test_unknown_key_suggests_the_nearest() -> None:
    err = bad(GUIDE_CONFIGMAP.replace("    enabled: true\n", "    enabeld: true\n", 1))
    assert "unknown key 'enabeld'" in str(err) and "did you mean 'enabled'" in str(err)
    assert err.line == 3 and err.key_path == "providers[0].enabeld"
    err = bad("attestation:\n  token_tll: 5m\n")
    assert "token_ttl" in str(err) and err.line == 2
    err = bad("providers:\n  - name: sgx\n    attestation:\n      apikey: x\n")
    assert "apiKey" in str(err)


def test_wrong_type_names_expected_and_found_type() -> None:
    err = bad("server:\n  port: eighty\n")
    assert err.key_path == "server.port" and err.line == 2
    assert "expected an integer" in str(err) and "got a string" in str(err)
    err = bad("providers:\n  - name: sgx\n    enabled: maybe\n")
    assert "true or false" in str(err) and err.line == 3
    err = bad("server: 5\n")
    assert "mapping" in str(err)


def test_unknown_provider_lists_known_ones() -> None:
    err = bad(GUIDE_CONFIGMAP.replace("name: nitro", "name: nitr0"))
    assert "unknown provider 'nitr0'" in str(err) and "nitro" in str(err)
    assert err.line == 7 and err.key_path == "providers[1].name"


def test_provider_listed_twice_points_at_the_second_entry() -> None:
    err = bad(GUIDE_CONFIGMAP.replace("name: nitro", "name: sgx"))
    assert "listed twice" in str(err) and "first at line 2" in str(err)
    assert err.line == 7


def test_secret_values_never_appear_in_errors() -> None:
    text = GUIDE_CONFIGMAP + "server:\n  port: ${SGX_API_KEY}\n"
    err = bad(text)
    assert SECRET not in str(err) and SECRET not in repr(err.to_dict())
    err = bad("providers:\n  - name: sgx\n    attestation:\n      apiKey: [1, 2]\n")
    assert "apiKey" in str(err)


def test_invalid_yaml_is_located() -> None:
    err = bad("server:\n  port: [1\n")
    assert "not valid YAML" in str(err) and err.line is not None


def test_duplicate_keys_are_rejected() -> None:
    err = bad("server:\n  port: 1\n  port: 2\n")
    assert "appears twice" in str(err) and err.line == 3


def test_bad_urls_and_durations() -> None:
    assert "postgresql://" in str(bad("store:\n  url: mysql://x\n"))
    assert "duration" in str(bad("keys:\n  rotation_period: soon\n"))
    assert "http(s)://" in str(bad("providers:\n  - name: sgx\n    attestation:\n      service: ftp://x\n"))


def test_sources_in_order(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("server:\n  port: 1111\n")
    b = tmp_path / "b.yaml"
    b.write_text("server:\n  port: 2222\n")
    assert load_config(a, env={"R3E_TEE_CONFIG": str(b)}).config.server.port == 1111
    assert load_config(None, env={"R3E_TEE_CONFIG": str(b)}).config.server.port == 2222
    loaded = load_config(None, env={})
    assert loaded.source in ("built-in defaults", "/etc/r3e-tee/tee-config.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", env={})


def test_defaults_are_safe() -> None:
    cfg = TeeConfig()
    assert cfg.enabled_providers == ("simulation",)
    assert cfg.attestation.allow_simulation is False
    assert cfg.attestation.allow_debug is False
    assert cfg.server.host == "127.0.0.1"
    assert cfg.store_url.startswith("sqlite:///")


def _with_key(path: Path) -> TeeConfig:
    text = GUIDE_CONFIGMAP.replace(
        'apiKey: "${SGX_API_KEY}"', f'apiKey: "${{SGX_API_KEY}}"\n      keyFile: "{path}"'
    )
    return parse_config(text, env={"SGX_API_KEY": SECRET})


def test_key_files_good_missing_and_not_pem(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    good = tmp_path / "sgx-key.pem"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    good.write_bytes(pem)
    assert check_key_files(_with_key(good)) == []

    problems = check_key_files(_with_key(tmp_path / "absent.pem"))
    assert len(problems) == 1 and "cannot read key file" in str(problems[0])
    assert problems[0].key_path == "providers[0].attestation.keyFile"

    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key at all")
    assert "not PEM" in str(check_key_files(_with_key(garbage))[0])

    broken = tmp_path / "broken.pem"
    broken.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    problem = check_key_files(_with_key(broken))[0]
    assert "unparseable" in str(problem) and "AAAA" not in str(problem)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("12h", 43200), ("30d", 2592000), (7, 7), ("250ms", 0.25)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("128M", 128 * 2**20), ("128Mi", 128 * 2**20), ("2G", 2 * 2**30), ("512K", 512 * 1024), (4096, 4096)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "12Q", "", "-1M", "1.5G", True])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_a_missing_or_unreadable_config_says_where_its_path_came_from(tmp_path: Path) -> None:
    """Before: every case said 'pass an existing file with --config or unset R3E_TEE_CONFIG',
    also for `config validate FILE` (no --config) and for a directory or a non-UTF-8 file
    (no fix at all)."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing, env={})
    assert caught.value.hint == "check the path given as the argument or --config (or in R3E_TEE_CONFIG)"
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"R3E_TEE_CONFIG": str(missing)})
    assert caught.value.hint is not None and "set R3E_TEE_CONFIG to an existing" in caught.value.hint
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, env={})
    assert "is a directory" in caught.value.message and caught.value.hint
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"server:\n  host: caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(latin1, env={})
    assert "not UTF-8" in caught.value.message and caught.value.hint == "save the file as UTF-8 YAML"
