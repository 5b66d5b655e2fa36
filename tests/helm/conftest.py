"""Fixtures of the chart tests: a real, pinned ``helm`` and cached renders of the chart.

``helm`` is R3E_HELM, else the binary scripts/install-helm.py puts in .tools/bin (``make test``
installs it first), else ``helm`` on PATH; when none is there the fixture runs the installer. If
that fails too the tests skip with the reason, except under CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "r3e-faas"
PINNED_HELM = REPO / ".tools" / "bin" / "helm"
RELEASE = "r3e-tee"
NAMESPACE = "r3e-faas"

# The deployment guide's command line: helm install r3e-tee ./helm/r3e-faas --namespace r3e-faas
#   --values values.yaml --set tee.enabled=true --set tee.providers.sgx.enabled=true
#   --set tee.providers.nitro.enabled=true
GUIDE_SETS = ("tee.enabled=true", "tee.providers.sgx.enabled=true", "tee.providers.nitro.enabled=true")


def _find_helm() -> str | None:
    for candidate in (os.environ.get("R3E_HELM"), str(PINNED_HELM), shutil.which("helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="session")
def helm() -> str:
    found = _find_helm()
    if found:
        return found
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "install-helm.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    found = _find_helm()
    if found:
        return found
    reason = f"helm could not be installed by scripts/install-helm.py: {proc.stderr.strip() or proc.stdout}"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


class _NoDuplicatesLoader(yaml.SafeLoader):
    """YAML as the API server decodes it strictly: a repeated key is an error, not a silent overwrite."""


def _mapping(loader: _NoDuplicatesLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_NoDuplicatesLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_manifests(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=_NoDuplicatesLoader) if doc]


@dataclass(frozen=True)
class HelmResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def docs(self) -> list[dict[str, Any]]:
        assert self.returncode == 0, self.stderr
        return load_manifests(self.stdout)


def run_helm(helm: str, *args: str) -> HelmResult:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, check=False, timeout=120)
    return HelmResult(proc.returncode, proc.stdout, proc.stderr)


def helm_args(
    sets: Sequence[str] = (), values: Sequence[Path] = (), set_files: Sequence[str] = ()
) -> list[str]:
    args: list[str] = []
    for path in values:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    for item in set_files:
        args += ["--set-file", item]
    return args


Render = Callable[..., HelmResult]


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    """``render(sets=(), values=(), set_files=())``: ``helm template`` of the chart, cached per arguments."""
    cache: dict[tuple[Any, ...], HelmResult] = {}

    def _render(
        sets: Sequence[str] = (), values: Sequence[Path] = (), set_files: Sequence[str] = ()
    ) -> HelmResult:
        key = (tuple(sets), tuple(values), tuple(set_files))
        if key not in cache:
            cache[key] = run_helm(
                helm,
                "template",
                RELEASE,
                str(CHART),
                "--namespace",
                NAMESPACE,
                *helm_args(sets, values, set_files),
            )
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def pem_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Throw-away EC keys standing in for the Secret tee-attestation-keys (never committed)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = tmp_path_factory.mktemp("attestation-keys")
    keys = {}
    for name in ("sgx-key.pem", "nitro-key.pem"):
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (out / name).write_bytes(pem)
        keys[name] = out / name
    return keys


@dataclass(frozen=True)
class Scenario:
    """A way to install the chart, and the Secrets its operator creates beforehand."""

    name: str
    sets: tuple[str, ...] = ()
    values: tuple[Path, ...] = ()
    set_files: tuple[str, ...] = ()
    operator_secrets: frozenset[str] = frozenset()


HERE = Path(__file__).resolve().parent
SCENARIO_NAMES = ("default", "guide", "all-features", "production", "minimal")


@pytest.fixture(scope="session")
def scenarios(pem_keys: dict[str, Path]) -> dict[str, Scenario]:
    base = {"r3e-tee-admin-token", "r3e-tee-kek"}
    return {
        "default": Scenario("default", operator_secrets=frozenset(base)),
        "guide": Scenario(
            "guide",
            sets=GUIDE_SETS,
            operator_secrets=frozenset(base | {"tee-attestation-keys", "tee-sgx-api-key"}),
        ),
        "all-features": Scenario(
            "all-features",
            values=(HERE / "values" / "all-features.yaml",),
            set_files=(
                f"tee.attestationKeys.sgxKey={pem_keys['sgx-key.pem']}",
                f"tee.attestationKeys.nitroKey={pem_keys['nitro-key.pem']}",
            ),
            operator_secrets=frozenset(base | {"tee-sgx-api-key"}),
        ),
        # everything optional switched off: a development cluster without TEE hardware
        "minimal": Scenario(
            "minimal",
            sets=(
                "serviceAccount.create=false",
                "rbac.create=false",
                "tee.attestationService.enabled=false",
                "tee.service.pdb.enabled=false",
                "tee.providers.simulation.enabled=true",
                "tee.providers.simulation.pdb.enabled=false",
                "tee.attestation.allowSimulation=true",
                "tee.keys.kekProvider=pkcs11",
            ),
            operator_secrets=frozenset({"r3e-tee-admin-token", "r3e-tee-pkcs11-pin"}),
        ),
        "production": Scenario(
            "production",
            values=(CHART / "examples" / "production-values.yaml",),
            operator_secrets=frozenset(
                {
                    "r3e-tee-admin-token",
                    "r3e-tee-postgres",
                    "r3e-tee-pkcs11-pin",
                    "tee-attestation-keys",
                    "tee-sgx-api-key",
                    "registry-credentials",
                }
            ),
        ),
    }


@pytest.fixture(scope="session")
def render_scenario(render: Render, scenarios: dict[str, Scenario]) -> Callable[[str], HelmResult]:
    def _render(name: str) -> HelmResult:
        sc = scenarios[name]
        return render(sets=sc.sets, values=sc.values, set_files=sc.set_files)

    return _render


def by_kind_name(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}
