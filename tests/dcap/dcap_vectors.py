"""The shared vectors' DCAP cases: decoding, mutations, and the expectations of each case."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DCAP_KINDS = ("sgx-dcap", "tdx-dcap")

# the fixed "now" of builder-made platforms and their checks
NOW = datetime(2025, 7, 1, 12, 0, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Case:
    raw: dict[str, Any]
    quote: bytes
    collateral: str
    root: bytes
    at: datetime

    @property
    def id(self) -> str:
        return str(self.raw["id"])


def decode_evidence(data: bytes, encoding: str) -> bytes:
    if encoding == "binary":
        return data
    if encoding == "hex":
        text = "".join(data.decode().split())
        return bytes.fromhex(text.removeprefix("0x"))
    raise ValueError(f"unsupported encoding {encoding}")


def apply_mutations(data: bytes, ops: list[dict[str, Any]] | None) -> bytes:
    out = bytearray(data)
    for op in ops or []:
        if op["op"] == "xor":
            out[op["offset"]] ^= op["value"]
        elif op["op"] == "truncate":
            del out[op["length"] :]
        else:
            raise ValueError(op)
    return bytes(out)


def load_cases(vectors: Path) -> list[Case]:
    doc = json.loads((vectors / "cases.json").read_text())
    out = []
    for c in doc["cases"]:
        if c.get("kind") not in DCAP_KINDS:
            continue
        quote = apply_mutations(
            decode_evidence((vectors / c["evidence"]).read_bytes(), c["evidence_encoding"]), c.get("mutate")
        )
        out.append(
            Case(
                raw=c,
                quote=quote,
                collateral=(vectors / c["collateral"]).read_text(),
                root=(vectors / c["trust_root"]).read_bytes(),
                at=datetime.fromisoformat(c["verify_at"]),
            )
        )
    return out
