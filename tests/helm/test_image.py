"""The container recipes, checked without a Docker engine: deploy/Dockerfile's structure (stages,
pinned bases, numeric non-root users, health checks, build context), the Gramine manifest template
and the Nitro EIF recipe."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from tests.helm.conftest import CHART, REPO

DOCKERFILE = REPO / "deploy" / "Dockerfile"
TARGETS = ("runtime", "sgx", "nitro")  # the images the chart runs
# files the build copies that a recipe produces first (deploy/nitro/build-eif.sh)
GENERATED = {"deploy/nitro/out/r3e-tee-runtime.eif", "deploy/nitro/out/measurements.json"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, op: str) -> str | None:
        values = [arg for o, arg in self.instructions if o == op]
        return values[-1] if values else None


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) from a Dockerfile: continuations joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, f"unparsable FROM: {line}"
            stages.append(Stage(m.group(1), m.group(2)))
        elif op == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif stages:
            stages[-1].instructions.append((op, rest))
    return args, stages


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def stage(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


def test_multi_stage_with_the_charts_targets(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    names = [s.name for s in stages]
    assert len(stages) >= 2 and "builder" in names
    for target in TARGETS:
        assert target in names
    # `docker build` without --target gives the plain runtime image, never the builder
    assert stages[-1].base == "runtime" or stages[-1].name == "runtime"
    # the runtime image copies the built environment instead of building in place
    runtime = stage(stages, "runtime")
    assert any(op == "COPY" and arg.startswith("--from=builder ") for op, arg in runtime.instructions)
    assert not any(op == "RUN" and "pip install" in arg for op, arg in runtime.instructions)


def test_base_images_are_pinned(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    args, stages = dockerfile
    names = {s.name for s in stages}
    for s in stages:
        if s.base in names:
            continue
        image = resolve(s.base, args)
        assert "$" not in image, f"unresolved base {s.base}"
        digest = re.search(r"@sha256:[0-9a-f]{64}$", image)
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        exact = re.match(r"^\d+\.\d+\.\d+", tag)
        assert digest or exact, f"{image}: pin the base by digest or an exact version tag"
        assert "latest" not in tag


def test_images_run_as_numeric_non_root(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    by_name = {s.name: s for s in stages}
    for target in (*TARGETS, stages[-1].name):
        s = by_name[target]
        user = s.last("USER")
        while user is None and s.base in by_name:  # inherited from the parent stage
            s = by_name[s.base]
            user = s.last("USER")
        assert user is not None, f"{target}: no USER"
        uid, _, gid = user.partition(":")
        assert uid.isdigit() and int(uid) != 0, f"{target}: USER {user} must be a numeric non-root uid"
        assert not gid or (gid.isdigit() and int(gid) != 0)
    # the uid the chart's securityContext runs as
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert stage(stages, "runtime").last("USER") == "10001:10001"
    assert values["tee"]["providers"]["sgx"]["securityContext"]["runAsUser"] == 10001


def test_health_checks_and_entrypoints(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for target, port in (
        ("runtime", values["tee"]["service"]["port"]),
        ("sgx", values["tee"]["worker"]["port"]),
    ):
        s = stage(stages, target)
        health = s.last("HEALTHCHECK")
        assert health and "/healthz" in health, f"{target}: HEALTHCHECK on /healthz"
        assert s.last("EXPOSE") == str(port)
    for target in TARGETS:
        cmd = stage(stages, target).last("CMD")
        assert cmd is not None and cmd.startswith("[")
        assert yaml.safe_load(cmd)[0] in scripts, f"{target}: CMD runs a console script of the package"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) for i in range(len(parts)))
        if pat.startswith("**/"):
            hit = hit or any(fnmatch.fnmatch(p, pat[3:]) for p in parts)
        if hit:
            ignored = not negate
    return ignored


def test_copied_files_exist_and_are_in_the_build_context(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = dockerfile
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    names = {s.name for s in stages}
    for s in stages:
        for op, arg in s.instructions:
            assert op != "ADD", "use COPY (ADD fetches URLs and unpacks archives implicitly)"
            if op != "COPY":
                continue
            words = arg.split()
            from_stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
            sources = [w for w in words if not w.startswith("--")][:-1]
            if from_stage:
                assert from_stage in names, f"COPY --from={from_stage}: no such stage"
                continue
            for src in sources:
                src = src.rstrip("/")
                if src not in GENERATED:
                    assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                assert not _dockerignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
                if (REPO / src).is_dir():
                    for child in (REPO / src).rglob("*.py"):
                        rel = child.relative_to(REPO).as_posix()
                        assert not _dockerignored(rel, patterns), f"{rel} excluded by .dockerignore"
    # and the context stays small: tests, the venv and the chart are not sent to the engine
    for path in ("tests/conftest.py", ".venv/bin/python", "helm/r3e-faas/values.yaml", ".git/HEAD"):
        assert _dockerignored(path, patterns), f"{path} should not be in the build context"


def test_generated_enclave_files_come_from_the_eif_recipe() -> None:
    script = (REPO / "deploy" / "nitro" / "build-eif.sh").read_text()
    for generated in GENERATED:
        assert Path(generated).name in script
    subprocess.run(["bash", "-n", str(REPO / "deploy" / "nitro" / "build-eif.sh")], check=True)
    enclave = (REPO / "deploy" / "nitro" / "enclave.Dockerfile").read_text()
    assert '"r3e_tee.runtime.enclave"' in enclave
    assert "R3E_TEE_BROKER_KEY=${BROKER_KEY}" in enclave and "BROKER_KEY=${R3E_TEE_BROKER_KEY}" in script


def test_gramine_manifest_template_renders_to_valid_toml() -> None:
    """The template the SGX provider renders per enclave (shipped in the package, not in deploy/)."""
    template = (
        REPO / "src" / "r3e_tee" / "providers" / "templates" / "r3e-enclave.manifest.template"
    ).read_text()
    params = {
        "gramine.libos": "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so",
        "gramine.runtimedir()": "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc",
        "python": "/usr/local/bin/python3.11",
        "python_libdir": "/usr/local/lib/python3.11",
        "site_packages": "/opt/r3e-tee/lib/python3.11/site-packages",
        "arch_libdir": "/lib/x86_64-linux-gnu",
        "enclave_size": "512M",
        "threads": "16",
        "debug": "false",
        "log_level": "error",
        "isvprodid": "1",
        "isvsvn": "1",
        "broker_key": "A" * 43,
    }
    used = set(re.findall(r"\{\{\s*(.+?)\s*\}\}", template))
    assert used <= set(params), f"undocumented template parameters: {used - set(params)}"
    manifest = tomllib.loads(re.sub(r"\{\{\s*(.+?)\s*\}\}", lambda m: params[m.group(1)], template))
    sgx = manifest["sgx"]
    assert sgx["remote_attestation"] == "dcap"
    assert sgx["debug"] is False and sgx["enclave_size"] == "512M" and sgx["max_threads"] == 16
    assert manifest["loader"]["argv"][1:5] == ["-m", "r3e_tee.runtime.enclave", "--device", "gramine"]
    # the channel address reaches the enclave through the environment, outside the measurement
    assert manifest["loader"]["env"]["R3E_ENCLAVE_CONNECT"] == {"passthrough": True}
    # the key broker's key is a fixed value: part of the measurement, not the host's to choose
    assert manifest["loader"]["env"]["R3E_TEE_BROKER_KEY"] == "A" * 43
