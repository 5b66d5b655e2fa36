"""Every rendered object against the Kubernetes 1.29, 1.33 and 1.37 schemas, plus the checks the API
server (and kubelet) make that the OpenAPI schemas miss. No cluster is needed."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from tests.helm.conftest import SCENARIO_NAMES, HelmResult, Scenario

K8S_VERSIONS = ("1.29", "1.33", "1.37")
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# kinds that are CustomResourceDefinitions: validated against a bundled schema of ours
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "servicemonitor-monitoring-v1.json"}

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9]|-(?!-))*[a-z0-9]$|^[a-z0-9]$")
QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE]|)$")
QUANTITY_SUFFIX = {
    "": 1,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
)
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}


# --- schemas --------------------------------------------------------------------------------------


def validate_object(doc: dict[str, Any], version: str) -> None:
    """Strict schema validation; an unknown kind or apiVersion raises SchemaNotFoundError."""
    crd = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if crd is not None:
        jsonschema.Draft202012Validator(json.loads(crd.read_text())).validate(doc)
        return
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_objects_match_kubernetes_schemas(render_scenario: Any, scenario: str, version: str) -> None:
    docs = render_scenario(scenario).docs
    assert docs, "the render is empty"
    failures = []
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            validate_object(doc, version)
        except kubernetes_validate.SchemaNotFoundError as exc:
            failures.append(f"{name}: {exc.message}")
        except jsonschema.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path)
            failures.append(f"{name}: {path}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_unknown_kind_and_api_version_fail() -> None:
    for doc in (
        {"apiVersion": "v1", "kind": "ConfigMapp", "metadata": {"name": "x"}},
        {"apiVersion": "apps/v1beta1", "kind": "Deployment", "metadata": {"name": "x"}},
        {"apiVersion": "autoscaling/v2beta2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"}},
    ):
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            validate_object(doc, "1.29")
    with pytest.raises(jsonschema.ValidationError):
        validate_object(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dataa": {}}, "1.37"
        )


def test_bundled_servicemonitor_schema_is_strict() -> None:
    good = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "m"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "endpoints": [{"port": "http", "interval": "30s"}]},
    }
    validate_object(good, "1.29")
    for bad_spec in (
        {"selector": {}, "endpoints": [{"port": "http", "intervall": "30s"}]},
        {"selector": {}, "endpoints": [{"port": "http", "interval": "thirty"}]},
        {"endpoints": []},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate_object({**good, "spec": bad_spec}, "1.29")


# --- what the API server and kubelet check beyond the schemas -------------------------------------


def parse_quantity(value: Any) -> Decimal:
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        return Decimal(str(value))
    m = QUANTITY.match(str(value))
    if not m:
        raise ValueError(f"not a quantity: {value!r}")
    number, suffix = Decimal(m.group(1)), m.group(2)
    if suffix[:1] in ("e", "E"):
        return number * Decimal(10) ** int(suffix[1:])
    return number * Decimal(QUANTITY_SUFFIX[suffix])


def label_problems(where: str, labels: dict[str, Any] | None) -> list[str]:
    problems = []
    for key, value in (labels or {}).items():
        prefix, _, name = key.rpartition("/")
        if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
            problems.append(f"{where}: label key prefix {prefix!r} is not a DNS-1123 subdomain")
        if len(name) > 63 or not QUALIFIED_NAME.match(name):
            problems.append(f"{where}: label key {key!r} is not a qualified name")
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            problems.append(f"{where}: label {key}={value!r} is not a valid label value")
    return problems


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_templates(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"])
        for d in docs
        if d["kind"] in WORKLOAD_KINDS
    ]


def container_problems(where: str, container: dict[str, Any]) -> list[str]:
    problems = []
    cname = container["name"]
    at = f"{where} container {cname}"
    if len(cname) > 63 or not DNS1123_LABEL.match(cname):
        problems.append(f"{at}: container name is not a DNS-1123 label")
    port_names = set()
    for port in container.get("ports", []):
        if not 1 <= port["containerPort"] <= 65535:
            problems.append(f"{at}: containerPort {port['containerPort']} out of range")
        if "name" in port:
            if len(port["name"]) > 15 or not IANA_SVC_NAME.match(port["name"]) or port["name"].isdigit():
                problems.append(f"{at}: port name {port['name']!r} is not an IANA_SVC_NAME")
            if port["name"] in port_names:
                problems.append(f"{at}: port name {port['name']!r} repeated")
            port_names.add(port["name"])
    for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = container.get(probe_name)
        if probe is None:
            if probe_name != "startupProbe":
                problems.append(f"{at}: no {probe_name}")
            continue
        for handler in ("httpGet", "tcpSocket", "grpc"):
            port = (probe.get(handler) or {}).get("port")
            if isinstance(port, str) and port not in port_names:
                problems.append(f"{at}: {probe_name} uses port {port!r}, which the container does not name")
            if isinstance(port, int) and not 1 <= port <= 65535:
                problems.append(f"{at}: {probe_name} port {port} out of range")
    resources = container.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for kind, group in (("requests", requests), ("limits", limits)):
        for res, value in group.items():
            try:
                parse_quantity(value)
            except ValueError as exc:
                problems.append(f"{at}: resources.{kind}.{res}: {exc}")
    for res, req in requests.items():
        if res in limits:
            try:
                r, lim = parse_quantity(req), parse_quantity(limits[res])
            except ValueError:
                continue
            if r > lim:
                problems.append(f"{at}: request {res}={req} exceeds its limit {limits[res]}")
            if "/" in res and not res.startswith(("kubernetes.io/", "hugepages-")) and r != lim:
                problems.append(f"{at}: extended resource {res} must request what it limits")
    sc = container.get("securityContext") or {}
    if sc.get("runAsNonRoot") and sc.get("runAsUser") == 0:
        problems.append(f"{at}: runAsNonRoot with runAsUser 0 never starts")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{at}: allowPrivilegeEscalation must be false")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{at}: the root filesystem must be read-only")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        problems.append(f"{at}: capabilities must drop ALL")
    if sc.get("privileged"):
        problems.append(f"{at}: privileged containers are not allowed")
    return problems


def api_server_problems(docs: list[dict[str, Any]], operator_secrets: frozenset[str]) -> list[str]:
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for doc in docs:
        kind, meta = doc["kind"], doc["metadata"]
        name = meta["name"]
        where = f"{kind}/{name}"
        if (kind, name) in seen:
            problems.append(f"{where}: rendered twice")
        seen.add((kind, name))
        if "namespace" in meta:
            problems.append(f"{where}: sets metadata.namespace (helm and kubectl -n set it)")
        name_re, limit = (DNS1035_LABEL, 63) if kind == "Service" else (DNS1123_SUBDOMAIN, 253)
        if kind in WORKLOAD_KINDS:
            limit = 63  # becomes a label value (pod-template-hash) and part of pod names
        if len(name) > limit or not name_re.match(name):
            problems.append(
                f"{where}: name is not a valid {'DNS-1035 label' if kind == 'Service' else 'DNS-1123'}"
            )
        problems += label_problems(where, meta.get("labels"))
        for label in STANDARD_LABELS:
            if label not in (meta.get("labels") or {}):
                problems.append(f"{where}: missing the standard label {label}")

    names = {
        kind: {d["metadata"]["name"] for d in docs if d["kind"] == kind} for kind in {d["kind"] for d in docs}
    }
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    secrets_rendered = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    referenced_secrets: set[str] = set()
    templates = pod_templates(docs)

    def secret_ref(where: str, secret: str, key: str | None) -> None:
        referenced_secrets.add(secret)
        if secret in secrets_rendered:
            data = {
                **(secrets_rendered[secret].get("data") or {}),
                **(secrets_rendered[secret].get("stringData") or {}),
            }
            if key is not None and key not in data:
                problems.append(f"{where}: Secret {secret} has no key {key}")
        elif secret not in operator_secrets:
            problems.append(f"{where}: Secret {secret} is neither rendered nor declared operator-provided")

    def configmap_ref(where: str, cm: str, key: str | None) -> None:
        if cm not in configmaps:
            problems.append(f"{where}: ConfigMap {cm} is not rendered")
        elif key is not None and key not in (configmaps[cm].get("data") or {}):
            problems.append(f"{where}: ConfigMap {cm} has no key {key}")

    for where, template in templates:
        owner = next(d for d in docs if f"{d['kind']}/{d['metadata']['name']}" == where)
        tlabels = template["metadata"].get("labels") or {}
        problems += label_problems(f"{where} pod template", tlabels)
        if not selects(owner["spec"]["selector"], tlabels):
            problems.append(f"{where}: spec.selector does not match the pod template's labels")
        spec = template["spec"]
        sa = spec.get("serviceAccountName", "default")
        if sa != "default" and sa not in names.get("ServiceAccount", set()):
            problems.append(f"{where}: ServiceAccount {sa} is not rendered")
        for pull in spec.get("imagePullSecrets", []):
            secret_ref(where, pull["name"], None)
        volumes = {}
        for vol in spec.get("volumes", []):
            if not DNS1123_LABEL.match(vol["name"]) or len(vol["name"]) > 63:
                problems.append(f"{where}: volume name {vol['name']!r} is not a DNS-1123 label")
            if vol["name"] in volumes:
                problems.append(f"{where}: volume {vol['name']} declared twice")
            volumes[vol["name"]] = vol
            if "configMap" in vol:
                for item in vol["configMap"].get("items", [None]):
                    configmap_ref(where, vol["configMap"]["name"], item and item["key"])
            if "secret" in vol:
                for item in vol["secret"].get("items", [None]):
                    secret_ref(where, vol["secret"]["secretName"], item and item["key"])
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                if claim not in names.get("PersistentVolumeClaim", set()):
                    problems.append(f"{where}: PersistentVolumeClaim {claim} is not rendered")
        containers = spec.get("initContainers", []) + spec["containers"]
        for container in containers:
            problems += container_problems(where, container)
            mounts = set()
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{where}: mount of undeclared volume {mount['name']}")
                    continue
                if mount["mountPath"] in mounts:
                    problems.append(f"{where}: two mounts at {mount['mountPath']}")
                mounts.add(mount["mountPath"])
                vol = volumes[mount["name"]]
                if "subPath" in mount and "configMap" in vol:
                    configmap_ref(where, vol["configMap"]["name"], mount["subPath"])
            for env in container.get("env", []):
                src = env.get("valueFrom") or {}
                if "secretKeyRef" in src:
                    secret_ref(where, src["secretKeyRef"]["name"], src["secretKeyRef"]["key"])
                if "configMapKeyRef" in src:
                    configmap_ref(where, src["configMapKeyRef"]["name"], src["configMapKeyRef"]["key"])
            for env_from in container.get("envFrom", []):
                if "secretRef" in env_from:
                    secret_ref(where, env_from["secretRef"]["name"], None)
                if "configMapRef" in env_from:
                    configmap_ref(where, env_from["configMapRef"]["name"], None)
        pod_sc = spec.get("securityContext") or {}
        if (pod_sc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: the pod must use a seccomp profile")

    def selected_templates(selector: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        return [(w, t) for w, t in templates if selects(selector, t["metadata"].get("labels") or {})]

    for doc in docs:
        kind, name, spec = doc["kind"], doc["metadata"]["name"], doc.get("spec") or {}
        where = f"{kind}/{name}"
        if kind == "Service":
            selected = selected_templates({"matchLabels": spec.get("selector") or {}})
            if not selected:
                problems.append(f"{where}: selects no pod of the render")
            port_names = set()
            for port in spec.get("ports", []):
                if not 1 <= port["port"] <= 65535:
                    problems.append(f"{where}: port {port['port']} out of range")
                if port.get("name") in port_names:
                    problems.append(f"{where}: port name {port['name']} repeated")
                port_names.add(port.get("name"))
                target = port.get("targetPort", port["port"])
                if isinstance(target, int) and not 1 <= target <= 65535:
                    problems.append(f"{where}: targetPort {target} out of range")
                if isinstance(target, str):
                    for pod, template in selected:
                        named = {
                            p.get("name") for c in template["spec"]["containers"] for p in c.get("ports", [])
                        }
                        if target not in named:
                            problems.append(f"{where}: targetPort {target!r} is not a port name of {pod}")
        elif kind == "PodDisruptionBudget":
            if not selected_templates(spec["selector"]):
                problems.append(f"{where}: selects no pod of the render")
        elif kind == "NetworkPolicy":
            selected = selected_templates(spec["podSelector"])
            if not selected:
                problems.append(f"{where}: selects no pod of the render")
            for rule in spec.get("ingress", []):
                for port in rule.get("ports", []):
                    if isinstance(port.get("port"), str):
                        for pod, template in selected:
                            named = {
                                p.get("name")
                                for c in template["spec"]["containers"]
                                for p in c.get("ports", [])
                            }
                            if port["port"] not in named:
                                problems.append(f"{where}: port {port['port']!r} is not a port name of {pod}")
        elif kind == "HorizontalPodAutoscaler":
            target = spec["scaleTargetRef"]
            deployment = next(
                (d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]),
                None,
            )
            if deployment is None:
                problems.append(f"{where}: scales {target['kind']}/{target['name']}, which is not rendered")
            elif "replicas" in deployment["spec"]:
                problems.append(
                    f"{where}: its Deployment also sets replicas (helm upgrade would fight the HPA)"
                )
            if spec.get("minReplicas", 1) > spec["maxReplicas"]:
                problems.append(f"{where}: minReplicas exceeds maxReplicas")
            if deployment is not None:
                for c in deployment["spec"]["template"]["spec"]["containers"]:
                    if "cpu" not in ((c.get("resources") or {}).get("requests") or {}):
                        problems.append(f"{where}: CPU utilization needs a CPU request on {c['name']}")
        elif kind == "RoleBinding":
            ref = spec if "roleRef" in spec else doc
            role = ref["roleRef"]
            if role["kind"] == "Role" and role["name"] not in names.get("Role", set()):
                problems.append(f"{where}: Role {role['name']} is not rendered")
            for subject in doc.get("subjects", []):
                if subject["kind"] == "ServiceAccount" and subject["name"] not in names.get(
                    "ServiceAccount", set()
                ):
                    problems.append(f"{where}: ServiceAccount {subject['name']} is not rendered")
        elif kind == "ServiceMonitor":
            services = [
                d
                for d in docs
                if d["kind"] == "Service" and selects(spec["selector"], d["metadata"].get("labels") or {})
            ]
            if not services:
                problems.append(f"{where}: selects no Service of the render")
            ports = {p.get("name") for s in services for p in s["spec"]["ports"]}
            for endpoint in spec.get("endpoints", []):
                if endpoint.get("port") not in ports:
                    problems.append(
                        f"{where}: endpoint port {endpoint.get('port')!r} is no port of its Services"
                    )

    for stale in sorted(operator_secrets - referenced_secrets):
        problems.append(f"Secret {stale} is declared operator-provided but nothing references it")
    return problems


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_api_server_checks(render_scenario: Any, scenarios: dict[str, Scenario], scenario: str) -> None:
    problems = api_server_problems(render_scenario(scenario).docs, scenarios[scenario].operator_secrets)
    assert not problems, "\n".join(problems)


def test_api_server_checks_catch_mistakes(render_scenario: Any, scenarios: dict[str, Scenario]) -> None:
    """The checks above are only worth something if they fail on broken objects."""
    import copy

    base: HelmResult = render_scenario("guide")
    secrets = scenarios["guide"].operator_secrets

    def broken(mutate: Any) -> list[str]:
        docs = copy.deepcopy(base.docs)
        mutate(docs)
        return api_server_problems(docs, secrets)

    def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
        return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)

    def container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
        return find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]

    cases = {
        "not a valid DNS-1035": lambda d: find(d, "Service", "r3e-tee-service")["metadata"].update(
            name="R3E_Tee"
        ),
        "does not match the pod template": lambda d: find(d, "Deployment", "r3e-tee-service")["spec"][
            "selector"
        ]["matchLabels"].update(app="other"),
        "is not a port name": lambda d: find(d, "Service", "r3e-tee-service")["spec"]["ports"][0].update(
            targetPort="https"
        ),
        "out of range": lambda d: find(d, "Service", "r3e-tee-service")["spec"]["ports"][0].update(
            port=70000
        ),
        "ConfigMap tee-configs is not rendered": lambda d: find(d, "Deployment", "r3e-tee-service")["spec"][
            "template"
        ]["spec"]["volumes"][0]["configMap"].update(name="tee-configs"),
        "neither rendered nor declared": lambda d: container(d, "r3e-tee-service")["env"].append(
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "surprise", "key": "k"}}}
        ),
        "ServiceAccount ghost is not rendered": lambda d: find(d, "Deployment", "r3e-tee-service")["spec"][
            "template"
        ]["spec"].update(serviceAccountName="ghost"),
        "not a quantity": lambda d: container(d, "r3e-tee-worker-sgx")["resources"]["limits"].update(
            cpu="two"
        ),
        "exceeds its limit": lambda d: container(d, "r3e-tee-worker-sgx")["resources"]["requests"].update(
            cpu="3"
        ),
        "uses port 'metrics'": lambda d: container(d, "r3e-tee-worker-sgx")["livenessProbe"][
            "httpGet"
        ].update(port="metrics"),
        "read-only": lambda d: container(d, "r3e-tee-service")["securityContext"].update(
            readOnlyRootFilesystem=False
        ),
        "scales Deployment/r3e-tee-worker-tdx": lambda d: find(
            d, "HorizontalPodAutoscaler", "r3e-tee-worker-sgx"
        )["spec"]["scaleTargetRef"].update(name="r3e-tee-worker-tdx"),
    }
    for expected, mutate in cases.items():
        problems = broken(mutate)
        assert any(expected in p for p in problems), f"{expected!r} not reported; got {problems}"
