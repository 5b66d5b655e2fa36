"""The Nitro Enclaves allocator configuration: how much memory and CPU enclaves may take."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _positive_int(data: dict[object, object], key: str) -> int | None:
    """``key`` as a positive integer (YAML ``true`` is not 1), None when absent."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} must be a positive integer, not {value!r}")
    return value


def parse_cpu_pool(text: str) -> frozenset[int]:
    """The CPU ids of a ``cpu_pool`` such as ``"2,3"`` or ``"2-5,8"``.

    Each CPU is counted once and every range must run upwards: a reversed range used to count
    negatively and a repeated CPU twice, so the provider planned with CPUs the pool lacks.
    """
    cpus: set[int] = set()
    for part in text.split(","):
        m = _RANGE_RE.match(part.strip())
        if m is None:
            raise ValueError(f"cpu_pool entry {part.strip()!r} is not a CPU id or a range like 2-5")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise ValueError(f"cpu_pool range {part.strip()!r} runs backwards")
        if hi - lo >= 4096:
            raise ValueError(f"cpu_pool range {part.strip()!r} is larger than any host")
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def read_allocator(path: Path) -> tuple[int, int]:
    """(memory MiB, CPU count) from /etc/nitro_enclaves/allocator.yaml.

    ``cpu_pool`` (a list like "2,3" or "2-5") counts as its number of distinct CPUs.
    """
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a YAML mapping")
    memory = _positive_int(data, "memory_mib")
    if memory is None:
        raise ValueError("memory_mib must be a positive integer")
    if "cpu_pool" in data:
        return memory, len(parse_cpu_pool(str(data["cpu_pool"])))
    count = _positive_int(data, "cpu_count")
    if count is None:
        raise ValueError("cpu_count must be a positive integer (or give cpu_pool)")
    return memory, count
