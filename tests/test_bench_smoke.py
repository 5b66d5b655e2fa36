"""Every benchmark still runs to the end (with the smallest settings). Nothing here is timed: the
figures are judged from full runs (bench/RESULTS.md); this catches a benchmark that an API change
broke, which otherwise shows up only when someone next measures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

RUNS = {
    "bench_dcap.py": ["--seconds", "0.05"],
    "bench_nitro.py": ["--seconds", "0.05"],
    "bench_release.py": ["--rounds", "3"],
    "bench_enclaves.py": ["--runs", "2", "--concurrent", "3"],
    "bench_invoke.py": ["--seconds", "1", "--rounds", "1"],
    "bench_service_ceiling.py": ["--seconds", "1"],
    "bench_relay_floor.py": ["--seconds", "1", "--rounds", "1"],
}


def test_every_benchmark_is_exercised() -> None:
    assert {p.name for p in BENCH.glob("bench_*.py")} == set(RUNS)


def _bench(
    script: str, args: list[str], tmp_path: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs(script: str, tmp_path: Path) -> None:
    done = _bench(script, RUNS[script], tmp_path, {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")})
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert done.stdout.strip(), f"{script} printed nothing"


def test_the_http_benchmarks_run_without_wrk(tmp_path: Path) -> None:
    """Without wrk on PATH the HTTP benchmarks load the servers from an asyncio client, which
    must read both answers: the bare endpoint's (chunked) and the service's (content-length)."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "XDG_STATE_HOME": str(tmp_path)}
    done = _bench("bench_service_ceiling.py", ["--seconds", "1"], tmp_path, env)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert "load generator: asyncio client" in done.stdout
