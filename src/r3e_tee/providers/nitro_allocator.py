"""The Nitro Enclaves allocator configuration: how much memory and CPU enclaves may take."""

from __future__ import annotations

from pathlib import Path

import yaml


def read_allocator(path: Path) -> tuple[int, int]:
    """(memory MiB, CPU count) from /etc/nitro_enclaves/allocator.yaml.

    ``cpu_pool`` (a list like "2,3" or "2-5") counts as its number of CPUs.
    """
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a YAML mapping")
    memory = data.get("memory_mib")
    if not isinstance(memory, int) or memory <= 0:
        raise ValueError("memory_mib must be a positive integer")
    if "cpu_pool" in data:
        cpus = 0
        for part in str(data["cpu_pool"]).split(","):
            lo, _, hi = part.strip().partition("-")
            cpus += (int(hi) - int(lo) + 1) if hi else 1
    else:
        count = data.get("cpu_count")
        if not isinstance(count, int) or count <= 0:
            raise ValueError("cpu_count must be a positive integer (or give cpu_pool)")
        cpus = count
    return memory, cpus
