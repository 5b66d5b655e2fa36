"""``r3e-tee-worker``: the TEE worker process that runs on TEE nodes."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from r3e_tee.worker.cli import run

    return int(run(argv))


if __name__ == "__main__":
    sys.exit(main())
