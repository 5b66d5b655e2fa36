#!/usr/bin/env python3
"""Generate helm/r3e-faas/values.schema.json.

Every object of the schema closes its keys (``additionalProperties: false``) or, for maps such as
labels and resource limits, types its values, so that an unknown key or an ill-typed value fails
``helm install``/``helm template`` before anything reaches a cluster. Values that are passed through
to Kubernetes unchanged (affinity, tolerations, extra environment variables, NetworkPolicy peers)
are checked against the Kubernetes 1.29 definitions shipped by kubernetes-validate (strict flavour,
which closes every object too), the oldest Kubernetes version the chart supports. The schema is
draft-07, which every Helm since 3.0 validates (Helm 3.18+ and 4 also read 2020-12).

    scripts/gen-values-schema.py            # write the file
    scripts/gen-values-schema.py --check    # exit 1 when the committed file differs
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "helm" / "r3e-faas" / "values.schema.json"
K8S_SCHEMA_VERSION = "v1.29.0-local-strict"
K8S_TYPES = {
    "Affinity": "io.k8s.api.core.v1.Affinity",
    "Toleration": "io.k8s.api.core.v1.Toleration",
    "EnvVar": "io.k8s.api.core.v1.EnvVar",
    "NetworkPolicyPeer": "io.k8s.api.networking.v1.NetworkPolicyPeer",
    "NetworkPolicyEgressRule": "io.k8s.api.networking.v1.NetworkPolicyEgressRule",
}

# Kubernetes resource.Quantity, as the API server parses it
QUANTITY_RE = (
    r"^[+]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS1123_SUBDOMAIN_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DURATION_RE = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h|d)$"
# a qualified name with an optional DNS prefix: label keys, resource names
QUALIFIED_NAME_RE = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


def obj(props: dict[str, Any], *, description: str | None = None, required: list[str] | None = None) -> dict:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if description:
        out["description"] = description
    if required:
        out["required"] = required
    return out


def mapping(values: dict[str, Any], *, keys: str = QUALIFIED_NAME_RE, description: str | None = None) -> dict:
    out: dict[str, Any] = {
        "type": "object",
        "propertyNames": {"pattern": keys, "maxLength": 316},
        "additionalProperties": values,
    }
    if description:
        out["description"] = description
    return out


def string(description: str | None = None, **extra: Any) -> dict:
    out: dict[str, Any] = {"type": "string", **extra}
    if description:
        out["description"] = description
    return out


def integer(minimum: int | None = None, maximum: int | None = None) -> dict:
    out: dict[str, Any] = {"type": "integer"}
    if minimum is not None:
        out["minimum"] = minimum
    if maximum is not None:
        out["maximum"] = maximum
    return out


BOOL = {"type": "boolean"}
PORT = integer(1, 65535)
QUANTITY = {
    "oneOf": [{"type": "string", "pattern": QUANTITY_RE}, {"type": "number", "minimum": 0}],
    "description": "a Kubernetes quantity such as 2, 500m, 4Gi",
}
DURATION = string("a duration such as 30s, 5m, 12h, 30d", pattern=DURATION_RE)
K8S_NAME = string("a DNS-1123 name", pattern=DNS1123_SUBDOMAIN_RE, maxLength=253)
SECRET_NAME_OR_EMPTY = {"type": "string", "anyOf": [{"const": ""}, {"pattern": DNS1123_SUBDOMAIN_RE}]}
SECRET_KEY = string("a key of the Secret", pattern=r"^[-._a-zA-Z0-9]+$", maxLength=253)
URL = string("an http(s):// URL", pattern=r"^https?://[^\s]+$")
ABSOLUTE_PATH = string("an absolute path", pattern=r"^/")
ABSOLUTE_PATH_OR_EMPTY = {"type": "string", "anyOf": [{"const": ""}, ABSOLUTE_PATH]}
LABELS = mapping(string(maxLength=63), description="Kubernetes labels")
# labels the chart sets itself (selectors included): user labels may not repeat them
RESERVED_LABELS = [
    "app",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/version",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
    "tee.r3e.io/provider",
]
EXTRA_LABELS = {
    **LABELS,
    "propertyNames": {**LABELS["propertyNames"], "not": {"enum": RESERVED_LABELS}},
    "description": "extra Kubernetes labels; the chart's own label keys are reserved",
}
ANNOTATIONS = mapping({"type": "string"}, description="Kubernetes annotations")
NODE_SELECTOR = mapping({"type": "string"}, description="node labels the pods must match")
RESOURCES = obj(
    {"requests": mapping(QUANTITY), "limits": mapping(QUANTITY)},
    description="container resources; limits may name extended resources (sgx.intel.com/epc, ...)",
)
TOLERATIONS = {"type": "array", "items": {"$ref": "#/$defs/Toleration"}}
AFFINITY = {"$ref": "#/$defs/Affinity"}
EXTRA_ENV = {"type": "array", "items": {"$ref": "#/$defs/EnvVar"}}
PROBE = obj(
    {
        "initialDelaySeconds": integer(0),
        "periodSeconds": integer(1),
        "timeoutSeconds": integer(1),
        "failureThreshold": integer(1),
    }
)
PROBES = obj({"liveness": PROBE, "readiness": PROBE})
PDB = obj(
    {
        "enabled": BOOL,
        "maxUnavailable": {
            "oneOf": [integer(0), string(pattern=r"^[0-9]{1,3}%$")],
            "description": "a number of pods or a percentage such as 25%",
        },
    }
)
SECRET_REF = obj({"name": SECRET_NAME_OR_EMPTY, "key": SECRET_KEY})
IMAGE_OVERRIDE = obj(
    {
        "repository": string(),
        "tag": string(),
        "digest": {"type": "string", "anyOf": [{"const": ""}, {"pattern": r"^sha256:[0-9a-f]{64}$"}]},
    }
)
AUTOSCALING = obj(
    {
        "enabled": BOOL,
        "minReplicas": integer(1),
        "maxReplicas": integer(1),
        "targetCPUUtilizationPercentage": integer(1, 100),
    }
)
OPTIONS = mapping(
    {"type": ["string", "integer", "number", "boolean"]},
    keys=r"^[A-Za-z_][A-Za-z0-9_]*$",
    description="provider options passed unchanged to tee-config.yaml",
)


def component(extra: dict[str, Any]) -> dict[str, Any]:
    """Pod-level settings shared by the service and the attestation service."""
    return {
        "replicas": integer(1),
        "port": PORT,
        "annotations": ANNOTATIONS,
        "podAnnotations": ANNOTATIONS,
        "podLabels": EXTRA_LABELS,
        "resources": RESOURCES,
        "nodeSelector": NODE_SELECTOR,
        "tolerations": TOLERATIONS,
        "affinity": AFFINITY,
        "extraEnv": EXTRA_ENV,
        "pdb": PDB,
        **extra,
    }


def provider(extra: dict[str, Any]) -> dict:
    return obj(
        {
            "enabled": BOOL,
            "options": OPTIONS,
            "image": IMAGE_OVERRIDE,
            "replicas": integer(0),
            "nodeSelector": NODE_SELECTOR,
            "tolerations": TOLERATIONS,
            "affinity": AFFINITY,
            "resources": RESOURCES,
            "securityContext": obj(
                {"runAsNonRoot": BOOL, "runAsUser": integer(0), "runAsGroup": integer(0)},
                description="who the worker runs as; capabilities stay dropped",
            ),
            "supplementalGroups": {
                "type": "array",
                "items": integer(0),
                "description": "extra groups of the worker, e.g. the group owning the TEE device nodes",
            },
            "extraEnv": EXTRA_ENV,
            "autoscaling": AUTOSCALING,
            "pdb": PDB,
            **extra,
        }
    )


def values_schema() -> dict:
    tee = obj(
        {
            "enabled": BOOL,
            "logLevel": {"enum": ["debug", "info", "warning", "error"]},
            "service": obj(
                component(
                    {
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                        "probes": PROBES,
                        "persistence": obj(
                            {
                                "enabled": BOOL,
                                "size": QUANTITY,
                                "storageClass": string(),
                                "existingClaim": {
                                    "type": "string",
                                    "anyOf": [{"const": ""}, {"pattern": DNS1123_SUBDOMAIN_RE}],
                                },
                            }
                        ),
                    }
                )
            ),
            "attestationService": obj(component({"enabled": BOOL})),
            "worker": obj({"port": PORT, "probes": PROBES}),
            "auth": obj({"existingSecret": K8S_NAME, "secretKey": SECRET_KEY}),
            "store": obj(
                {
                    "external": obj({"enabled": BOOL, "existingSecret": K8S_NAME, "secretKey": SECRET_KEY}),
                    "poolSize": integer(1, 200),
                }
            ),
            "keys": obj(
                {
                    "kekProvider": {"enum": ["file", "pkcs11"]},
                    "file": obj({"existingSecret": K8S_NAME, "secretKey": SECRET_KEY}),
                    "pkcs11": obj(
                        {
                            "module": string(pattern=r"^/"),
                            "tokenLabel": string(minLength=1),
                            "keyLabel": string(minLength=1),
                            "pinSecret": obj({"name": K8S_NAME, "key": SECRET_KEY}),
                        }
                    ),
                    "rotationPeriod": DURATION,
                    "retainVersions": integer(1, 1000),
                }
            ),
            "attestation": obj(
                {
                    "issuer": string("the iss claim of attestation tokens", minLength=1),
                    "allowSimulation": BOOL,
                    "allowDebug": BOOL,
                    "tokenTtl": DURATION,
                    "nonceTtl": DURATION,
                    "collateral": obj(
                        {
                            "pcsUrl": URL,
                            "pccsUrl": {"type": "string", "anyOf": [{"const": ""}, URL]},
                            "timeout": DURATION,
                        }
                    ),
                }
            ),
            "attestationKeys": obj(
                {
                    "secretName": K8S_NAME,
                    "create": BOOL,
                    "sgxKey": string("PEM private key (only with create: true)"),
                    "nitroKey": string("PEM private key (only with create: true)"),
                }
            ),
            "providers": obj(
                {
                    "sgx": provider(
                        {
                            "attestation": obj({"service": URL, "apiKeySecret": SECRET_REF}),
                            "aesmd": obj({"enabled": BOOL, "hostPath": ABSOLUTE_PATH}),
                            "qcnlConfigHostPath": ABSOLUTE_PATH_OR_EMPTY,
                        }
                    ),
                    "nitro": provider(
                        {
                            "attestation": obj({"service": string(pattern=r"^(https?|vsock)://[^\s]+$")}),
                            "allocatorConfigHostPath": ABSOLUTE_PATH_OR_EMPTY,
                        }
                    ),
                    "simulation": provider({}),
                },
                description="one worker Deployment per enabled provider; no other provider exists",
            ),
            "serviceMonitor": obj(
                {"enabled": BOOL, "interval": DURATION, "scrapeTimeout": DURATION, "labels": LABELS}
            ),
            "networkPolicy": obj(
                {
                    "enabled": BOOL,
                    "extraIngressFrom": {"type": "array", "items": {"$ref": "#/$defs/NetworkPolicyPeer"}},
                    "workerExtraEgress": {
                        "type": "array",
                        "items": {"$ref": "#/$defs/NetworkPolicyEgressRule"},
                    },
                }
            ),
        }
    )
    schema: dict[str, Any] = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "r3e-faas chart values",
        **obj(
            {
                "image": obj(
                    {
                        "repository": string(minLength=1),
                        "tag": string(),
                        "digest": IMAGE_OVERRIDE["properties"]["digest"],
                        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                    }
                ),
                "imagePullSecrets": {"type": "array", "items": obj({"name": K8S_NAME}, required=["name"])},
                "commonLabels": EXTRA_LABELS,
                "serviceAccount": obj(
                    {
                        "create": BOOL,
                        "name": {
                            "type": "string",
                            "anyOf": [{"const": ""}, {"pattern": DNS1123_SUBDOMAIN_RE}],
                        },
                        "annotations": ANNOTATIONS,
                        "automountToken": BOOL,
                    }
                ),
                "rbac": obj({"create": BOOL}),
                "tee": tee,
                # helm may pass an empty "global" map to every chart; this chart reads none
                "global": obj({}),
            }
        ),
    }
    schema["$defs"] = kubernetes_defs()
    return schema


def kubernetes_defs() -> dict[str, Any]:
    """The Kubernetes definitions named in K8S_TYPES, with everything they reference."""
    base = resources.files("kubernetes_validate") / "kubernetes-json-schema" / K8S_SCHEMA_VERSION
    all_defs = json.loads((base / "_definitions.json").read_text())["$defs"]
    wanted: dict[str, Any] = {}
    pending = list(K8S_TYPES.values())
    while pending:
        name = pending.pop()
        if name in wanted:
            continue
        wanted[name] = _strip_descriptions(all_defs[name])
        pending.extend(_refs(all_defs[name]))
    out = {alias: {"$ref": f"#/$defs/{full}"} for alias, full in K8S_TYPES.items()}
    out.update(dict(sorted(wanted.items())))
    return out


def _strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip_descriptions(v) for v in node]
    return node


def _refs(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            found.append(ref.removeprefix("#/$defs/"))
        for value in node.values():
            found.extend(_refs(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_refs(value))
    return found


def render() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail when the committed schema is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run scripts/gen-values-schema.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
