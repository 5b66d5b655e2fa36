"""The chart as the deployment guide uses it: lint, the guide's objects, the values schema, the
rendered tee-config.yaml, NOTES.txt, and the generated files that must not drift from the chart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helm.conftest import (
    CHART,
    GUIDE_SETS,
    NAMESPACE,
    RELEASE,
    REPO,
    SCENARIO_NAMES,
    Scenario,
    by_kind_name,
    helm_args,
    load_manifests,
    run_helm,
)
from tests.shared import GUIDE_CONFIGMAP as GUIDE_CONFIG

from r3e_tee.config import parse_config
from r3e_tee.errors import ConfigError


def tee_config(docs: list[dict[str, Any]], name: str = "tee-config") -> str:
    return by_kind_name(docs)[("ConfigMap", name)]["data"]["tee-config.yaml"]


def env_names(deployment: dict[str, Any]) -> set[str]:
    return {e["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}


# --- helm lint ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_helm_lint_strict(helm: str, scenarios: dict[str, Scenario], scenario: str) -> None:
    sc = scenarios[scenario]
    result = run_helm(helm, "lint", "--strict", str(CHART), *helm_args(sc.sets, sc.values, sc.set_files))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


# --- the guide's objects --------------------------------------------------------------------------


def test_guide_install_renders_every_object(render_scenario: Any) -> None:
    objs = by_kind_name(render_scenario("guide").docs)
    expected = {
        ("ConfigMap", "tee-config"),
        ("ConfigMap", "tee-worker-config"),
        ("Deployment", "r3e-tee-service"),
        ("Deployment", "r3e-tee-attestation"),
        ("Deployment", "r3e-tee-worker-sgx"),
        ("Deployment", "r3e-tee-worker-nitro"),
        ("Service", "r3e-tee-service"),
        ("Service", "r3e-tee-attestation"),
        ("Service", "r3e-tee-workers"),
        ("ServiceAccount", "r3e-tee"),
        ("Role", "r3e-tee"),
        ("RoleBinding", "r3e-tee"),
        ("PodDisruptionBudget", "r3e-tee-service"),
        ("PodDisruptionBudget", "r3e-tee-attestation"),
        ("PodDisruptionBudget", "r3e-tee-worker-sgx"),
        ("PodDisruptionBudget", "r3e-tee-worker-nitro"),
        ("HorizontalPodAutoscaler", "r3e-tee-worker-sgx"),
        ("HorizontalPodAutoscaler", "r3e-tee-worker-nitro"),
    }
    assert set(objs) == expected
    service = objs[("Deployment", "r3e-tee-service")]
    assert service["spec"]["template"]["metadata"]["labels"]["app"] == "r3e-tee"
    container = service["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["r3e-tee-service"]
    # `kubectl exec deployment/r3e-tee-service -- r3e-tee-cli ...` reaches this pod, authenticated
    env = {e["name"]: e for e in container["env"]}
    assert env["R3E_TEE_URL"]["value"] == "http://127.0.0.1:8080"
    assert env["R3E_TEE_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "r3e-tee-admin-token"
    assert env["SGX_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "tee-sgx-api-key", "key": "api-key"}
    keys = next(v for v in service["spec"]["template"]["spec"]["volumes"] if v["name"] == "attestation-keys")
    assert keys["secret"]["secretName"] == "tee-attestation-keys"
    assert [i["key"] for i in keys["secret"]["items"]] == ["sgx-key.pem", "nitro-key.pem"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "attestation-keys")
    assert mount == {"name": "attestation-keys", "mountPath": "/etc/r3e-tee/keys", "readOnly": True}


@pytest.mark.parametrize(
    ("provider", "selector", "device"),
    [
        ("sgx", {"tee.intel.com/sgx": "true"}, ("sgx.intel.com/epc", "512Mi")),
        ("nitro", {"tee.aws.com/nitro": "true"}, ("aws.amazon.com/nitro_enclaves", 1)),
    ],
)
def test_guide_worker_placement_and_limits(
    render_scenario: Any, provider: str, selector: dict[str, str], device: tuple[str, Any]
) -> None:
    worker = by_kind_name(render_scenario("guide").docs)[("Deployment", f"r3e-tee-worker-{provider}")]
    pod = worker["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == selector
    container = pod["containers"][0]
    assert container["command"] == ["r3e-tee-worker"]
    assert container["args"] == [
        "--config",
        "/etc/r3e-tee/tee-config.yaml",
        "--server",
        "http://r3e-tee-service:8080",
        "--provider",
        provider,
    ]
    limits = container["resources"]["limits"]
    assert (limits["cpu"], limits["memory"], limits[device[0]]) == (2, "4Gi", device[1])
    # r3e-tee-cli doctor in the worker reads the node label it was scheduled by from /etc/podinfo
    labels = worker["spec"]["template"]["metadata"]["labels"]
    assert {k: labels[k] for k in selector} == selector
    podinfo = next(v for v in pod["volumes"] if v["name"] == "podinfo")
    assert podinfo["downwardAPI"]["items"] == [
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}
    ]
    assert {"name": "podinfo", "mountPath": "/etc/podinfo", "readOnly": True} in container["volumeMounts"]


def test_worker_limits_are_overridable(render: Any) -> None:
    docs = render(
        sets=(
            *GUIDE_SETS,
            "tee.providers.sgx.resources.limits.cpu=4",
            "tee.providers.sgx.resources.limits.sgx\\.intel\\.com/epc=1Gi",
            "tee.providers.nitro.nodeSelector.tee\\.aws\\.com/nitro=yes",
        )
    ).docs
    objs = by_kind_name(docs)
    sgx = objs[("Deployment", "r3e-tee-worker-sgx")]["spec"]["template"]["spec"]["containers"][0]
    assert sgx["resources"]["limits"]["cpu"] == 4
    assert sgx["resources"]["limits"]["sgx.intel.com/epc"] == "1Gi"
    nitro = objs[("Deployment", "r3e-tee-worker-nitro")]["spec"]["template"]["spec"]
    assert nitro["nodeSelector"] == {"tee.aws.com/nitro": "yes"}


def test_sgx_disabled_removes_worker_and_config_entry(render: Any) -> None:
    docs = render(sets=(*GUIDE_SETS, "tee.providers.sgx.enabled=false")).docs
    objs = by_kind_name(docs)
    assert not [key for key in objs if key[1].endswith("-sgx")]
    assert ("Deployment", "r3e-tee-worker-nitro") in objs
    for name in ("tee-config", "tee-worker-config"):
        providers = yaml.safe_load(tee_config(docs, name))["providers"]
        assert [p["name"] for p in providers] == ["nitro"]
    assert "sgx" not in tee_config(docs).lower().replace("sgx_api_key", "")
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        assert "SGX_API_KEY" not in env_names(deployment)
    service = objs[("Deployment", "r3e-tee-service")]["spec"]["template"]["spec"]
    keys = next(v for v in service["volumes"] if v["name"] == "attestation-keys")
    assert [i["key"] for i in keys["secret"]["items"]] == ["nitro-key.pem"]


def test_tee_disabled_renders_nothing(render: Any) -> None:
    result = render(sets=("tee.enabled=false", "tee.providers.sgx.enabled=true"))
    assert result.returncode == 0, result.stderr
    assert result.docs == []


def test_default_install_has_no_worker(render_scenario: Any) -> None:
    objs = by_kind_name(render_scenario("default").docs)
    assert not [k for k in objs if k[1].startswith("r3e-tee-worker")]
    config = parse_config(tee_config(render_scenario("default").docs), env={})
    assert config.providers == ()


# --- the values schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "tee.providers.sgx.resources.limits.cpu=two"), "/tee/providers/sgx/resources/limits/cpu"),
        (("--set", "tee.providers.sgx.replicaz=2"), "additional properties 'replicaz' not allowed"),
        (("--set", "tee.unknown=1"), "additional properties 'unknown' not allowed"),
        (("--set", "unknownTopLevel=1"), "additional properties 'unknownTopLevel' not allowed"),
        (("--set", "tee.providers.tdx.enabled=true"), "additional properties 'tdx' not allowed"),
        (("--set-string", "tee.service.replicas=three"), "/tee/service/replicas"),
        (("--set", "tee.enabled=yes"), "/tee/enabled"),
        (("--set", "tee.service.port=70000"), "/tee/service/port"),
        (("--set", "tee.keys.kekProvider=vault"), "/tee/keys/kekProvider"),
        (("--set", "tee.keys.rotationPeriod=monthly"), "/tee/keys/rotationPeriod"),
        (("--set", "tee.providers.nitro.tolerations[0].effekt=NoSchedule"), "'effekt' not allowed"),
        (("--set", "tee.auth.existingSecret=Bad_Name"), "/tee/auth/existingSecret"),
        (("--set", "commonLabels.app=other"), "invalid propertyName 'app'"),
        (("--set", "image.digest=sha256:abc"), "/image/digest"),
    ],
)
def test_schema_rejects_unknown_and_ill_typed_values(helm: str, args: tuple[str, ...], message: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert result.returncode != 0, f"accepted {args}"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("tee.service.replicas=3",), "needs tee.store.external.enabled=true"),
        (("tee.providers.simulation.enabled=true",), "needs tee.attestation.allowSimulation=true"),
        (
            ("tee.providers.sgx.enabled=true", "tee.attestationKeys.create=true"),
            "needs tee.attestationKeys.sgxKey",
        ),
    ],
)
def test_inconsistent_values_fail_with_the_fix(helm: str, sets: tuple[str, ...], message: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), *helm_args(sets))
    assert result.returncode != 0
    assert message in result.stderr


def _objects(schema: Any, path: str = "#") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(schema, dict):
        types = schema.get("type")
        if types == "object" or (isinstance(types, list) and "object" in types) or "properties" in schema:
            found.append((path, schema))
        for key, value in schema.items():
            found += _objects(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            found += _objects(value, f"{path}/{i}")
    return found


def test_values_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = [
        path
        for path, node in _objects(schema)
        if node.get("additionalProperties") is not False
        and not isinstance(node.get("additionalProperties"), dict)
        and path != "#"
    ]
    assert not open_objects, f"objects that accept any key: {open_objects}"
    assert schema["additionalProperties"] is False


def test_default_values_follow_the_schema() -> None:
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    for path in (CHART / "values.yaml", CHART / "examples" / "production-values.yaml"):
        validator = jsonschema.validators.validator_for(schema)
        assert validator is jsonschema.Draft7Validator, "keep draft-07: Helm 3 before 3.18 reads only that"
        validator.check_schema(schema)
        validator(schema).validate(yaml.safe_load(path.read_text()))


# --- tee-config.yaml as r3e-tee reads it ----------------------------------------------------------


def test_guide_configmap_is_the_guides_config_plus_key_files(render_scenario: Any) -> None:
    rendered = yaml.safe_load(tee_config(render_scenario("guide").docs))
    guide = yaml.safe_load(GUIDE_CONFIG)["providers"]
    for ours, theirs in zip(rendered["providers"], guide, strict=True):
        key_file = ours["attestation"].pop("keyFile")
        assert key_file == f"/etc/r3e-tee/keys/{ours['name']}-key.pem"
        assert ours == theirs


def test_guide_configmap_parses(render_scenario: Any) -> None:
    text = tee_config(render_scenario("guide").docs)
    config = parse_config(text, file="tee-config.yaml", env={"SGX_API_KEY": "test-api-key"})
    assert config.enabled_providers == ("sgx", "nitro")
    sgx = config.provider("sgx")
    assert sgx is not None and sgx.attestation.api_key is not None
    assert sgx.attestation.api_key.get_secret_value() == "test-api-key"
    assert str(sgx.attestation.key_file) == "/etc/r3e-tee/keys/sgx-key.pem"
    assert config.workers.embedded is False
    with pytest.raises(ConfigError, match="SGX_API_KEY"):
        parse_config(text, file="tee-config.yaml", env={})
    worker = parse_config(tee_config(render_scenario("guide").docs, "tee-worker-config"), env={})
    assert worker.enabled_providers == ("sgx", "nitro")
    assert all(p.attestation.api_key is None and p.attestation.key_file is None for p in worker.providers)


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_every_rendered_config_parses(render_scenario: Any, scenario: str) -> None:
    docs = render_scenario(scenario).docs
    env = {"SGX_API_KEY": "k", "R3E_TEE_STORE_URL": "postgresql://tee@db:5432/tee"}
    for name in ("tee-config", "tee-worker-config"):
        parse_config(tee_config(docs, name), file=name, env=env)


def test_production_config_uses_postgres_and_pkcs11(render_scenario: Any) -> None:
    docs = render_scenario("production").docs
    env = {"SGX_API_KEY": "k", "R3E_TEE_STORE_URL": "postgresql://tee@db:5432/tee"}
    config = parse_config(tee_config(docs), env=env)
    assert config.store.url == env["R3E_TEE_STORE_URL"]
    assert config.keys.kek_provider == "pkcs11"
    assert str(config.keys.pkcs11.pin_file) == "/etc/r3e-tee/pkcs11/pin"
    service = by_kind_name(docs)[("Deployment", "r3e-tee-service")]
    assert "R3E_TEE_STORE_URL" in env_names(service)
    worker = by_kind_name(docs)[("Deployment", "r3e-tee-worker-sgx")]
    assert "R3E_TEE_STORE_URL" not in env_names(worker), "the store credentials must stay off the TEE nodes"


def _cli() -> Path:
    return Path(sys.executable).with_name("r3e-tee-cli")


def test_guide_configmap_passes_config_validate(
    render_scenario: Any, pem_keys: dict[str, Path], tmp_path: Path
) -> None:
    """`r3e-tee-cli config validate` on the rendered ConfigMap, as inside the pod: the Secret
    tee-attestation-keys is mounted at /etc/r3e-tee/keys there; here the key paths point at
    throw-away keys instead (the only change to the text)."""
    cli = _cli()
    probe = subprocess.run(
        [str(cli), "config", "validate", "--help"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"r3e-tee-cli config validate is not available: {probe.stderr.strip()[:200]}")
    text = tee_config(render_scenario("guide").docs)
    (tmp_path / "as-rendered.yaml").write_text(text)
    keys_dir = pem_keys["sgx-key.pem"].parent
    (tmp_path / "tee-config.yaml").write_text(text.replace("/etc/r3e-tee/keys/", f"{keys_dir}/"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("R3E_TEE_")}
    ok = subprocess.run(
        [str(cli), "config", "validate", str(tmp_path / "tee-config.yaml")],
        capture_output=True,
        text=True,
        check=False,
        env={**env, "SGX_API_KEY": "test-api-key"},
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "sgx, nitro" in ok.stdout
    missing = subprocess.run(
        [str(cli), "config", "validate", str(tmp_path / "tee-config.yaml")],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert missing.returncode != 0 and "SGX_API_KEY" in missing.stdout + missing.stderr
    # unchanged, the only complaint is the Secret that is not mounted on this machine
    unmounted = subprocess.run(
        [str(cli), "config", "validate", str(tmp_path / "as-rendered.yaml")],
        capture_output=True,
        text=True,
        check=False,
        env={**env, "SGX_API_KEY": "test-api-key"},
    )
    if not Path("/etc/r3e-tee/keys/sgx-key.pem").exists():
        assert unmounted.returncode != 0
        assert "tee-attestation-keys" in unmounted.stdout + unmounted.stderr


# --- NOTES.txt ------------------------------------------------------------------------------------


def test_notes_print_the_guides_verification_commands(helm: str) -> None:
    result = run_helm(
        helm,
        "install",
        RELEASE,
        str(CHART),
        "--dry-run=client",
        "--namespace",
        NAMESPACE,
        *helm_args(GUIDE_SETS),
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    exec_cli = "kubectl exec -n r3e-faas deployment/r3e-tee-service -- r3e-tee-cli"
    for command in (
        "kubectl get pods -n r3e-faas -l app=r3e-tee",
        "kubectl logs -n r3e-faas -f deployment/r3e-tee-service",
        f"{exec_cli} attestation-test",
        f"{exec_cli} list-enclaves",
        f"{exec_cli} create-enclave --size 128M --provider sgx",
        f"{exec_cli} create-enclave --size 128M --provider nitro",
    ):
        assert command in notes
    for secret in ("r3e-tee-admin-token", "r3e-tee-kek", "tee-attestation-keys", "tee-sgx-api-key"):
        assert secret in notes


# --- generated files ------------------------------------------------------------------------------


def test_k8s_manifests_match_the_chart(helm: str) -> None:
    """k8s/tee-service.yaml is scripts/render-k8s.py's output; regenerate it when the chart changes."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render-k8s.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "R3E_HELM": helm},
    )
    assert result.returncode == 0, result.stderr
    docs = load_manifests((REPO / "k8s" / "tee-service.yaml").read_text())
    assert ("Deployment", "r3e-tee-service") in by_kind_name(docs)
    assert all("namespace" not in d["metadata"] for d in docs)


def test_values_schema_is_generated() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen-values-schema.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_no_pod_carries_a_kubernetes_api_token_by_default(render: Any, render_scenario: Any) -> None:
    # the worker pods run untrusted function code; nothing in any pod calls the Kubernetes API
    simulation = render(
        sets=("tee.providers.simulation.enabled=true", "tee.attestation.allowSimulation=true")
    ).docs
    docs = render_scenario("guide").docs + simulation
    pods = [d["spec"]["template"]["spec"] for d in docs if d and d["kind"] == "Deployment"]
    assert len(pods) >= 5
    assert all(pod["automountServiceAccountToken"] is False for pod in pods)
    accounts = [d for d in docs if d and d["kind"] == "ServiceAccount"]
    assert accounts and all(a["automountServiceAccountToken"] is False for a in accounts)


def test_worker_egress_is_dns_and_the_service_only(render: Any) -> None:
    extra = "tee.networkPolicy.workerExtraEgress[0].to[0].ipBlock.cidr=10.0.0.7/32"
    docs = render(sets=("tee.networkPolicy.enabled=true", extra)).docs
    policy = by_kind_name(docs)[("NetworkPolicy", "r3e-tee-workers")]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    dns, service, pccs = policy["spec"]["egress"]
    assert "to" not in dns and {p["port"] for p in dns["ports"]} == {53}
    assert service["to"] == [
        {
            "podSelector": {
                "matchLabels": {
                    "app": "r3e-tee",
                    "app.kubernetes.io/instance": "r3e-tee",
                    "app.kubernetes.io/component": "service",
                }
            }
        }
    ]
    assert service["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert pccs == {"to": [{"ipBlock": {"cidr": "10.0.0.7/32"}}]}
    # the APIs' egress stays open (attestation services, the store)
    assert by_kind_name(docs)[("NetworkPolicy", "r3e-tee-api")]["spec"]["policyTypes"] == ["Ingress"]
