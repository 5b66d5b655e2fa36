"""DCAP collateral formats: TCB Info (v2, v3; SGX and TDX), QE Identity (v2), the dcap-qvl
QuoteCollateralV3 bundle, and raw Intel PCS responses. Pure parsing and serialising; no I/O.

Intel signs the *exact bytes* of the ``tcbInfo`` / ``enclaveIdentity`` JSON text inside a PCS
response, so this module never re-serialises signed JSON: it extracts the member's byte span
(:func:`split_signed_response`) and keeps that text verbatim. The serialisers used by builders
(:func:`tcb_info_json`, :func:`enclave_identity_json`) emit Intel's compact form and key order.
Malformed input raises :class:`~r3e_tee.errors.EvidenceFormatError` naming the JSON path.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any
from urllib.parse import unquote

from r3e_tee.errors import EvidenceFormatError

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
# the only TCB level composition Intel defines (componentwise SVN comparison)
SUPPORTED_TCB_TYPE = 0
_STATUS_ALIASES = {
    "SwHardeningNeeded": "SWHardeningNeeded",
    "ConfigurationAndSwHardeningNeeded": "ConfigurationAndSWHardeningNeeded",
}


# --- data model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcbLevel:
    """One platform TCB level: minimum SVNs and the status a platform at or above them gets."""

    sgx_components: tuple[int, ...]
    pce_svn: int
    tcb_status: str
    tcb_date: str = ""
    advisory_ids: tuple[str, ...] = ()
    tdx_components: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TdxModule:
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes


@dataclass(frozen=True)
class IsvSvnLevel:
    """A TCB level keyed by one ISVSVN (QE identity levels and TDX module identity levels)."""

    isvsvn: int
    tcb_status: str
    tcb_date: str = ""
    advisory_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class TdxModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[IsvSvnLevel, ...]


@dataclass(frozen=True)
class TcbInfo:
    id: str  # "SGX" or "TDX" (v2 has no id: SGX)
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tcb_levels: tuple[TcbLevel, ...]
    tdx_module: TdxModule | None = None
    tdx_module_identities: tuple[TdxModuleIdentity, ...] = ()


@dataclass(frozen=True)
class EnclaveIdentity:
    """QE / TD_QE identity (format v2)."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    tcb_levels: tuple[IsvSvnLevel, ...]


# --- JSON helpers ------------------------------------------------------------------------------


class _J:
    """Typed accessors over decoded JSON that report the JSON path on failure."""

    def __init__(self, root: str) -> None:
        self.root = root

    def fail(self, path: str, msg: str) -> EvidenceFormatError:
        return EvidenceFormatError(msg, field=f"{self.root}.{path}" if path else self.root)

    def obj(self, v: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(path, "expected a JSON object")
        return v

    def arr(self, v: Any, path: str) -> Sequence[Any]:
        if not isinstance(v, list):
            raise self.fail(path, "expected a JSON array")
        return v

    def get(self, o: Mapping[str, Any], key: str, path: str) -> Any:
        if key not in o:
            raise self.fail(f"{path}.{key}" if path else key, "missing")
        return o[key]

    def int_(self, o: Mapping[str, Any], key: str, path: str, *, lo: int = 0, hi: int = 2**32 - 1) -> int:
        v = self.get(o, key, path)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.fail(f"{path}.{key}" if path else key, f"expected an integer in [{lo}, {hi}]")
        return v

    def str_(self, o: Mapping[str, Any], key: str, path: str) -> str:
        v = self.get(o, key, path)
        if not isinstance(v, str):
            raise self.fail(f"{path}.{key}" if path else key, "expected a string")
        return v

    def hex_(self, o: Mapping[str, Any], key: str, path: str, size: int) -> bytes:
        s = self.str_(o, key, path)
        try:
            raw = bytes.fromhex(s)
        except ValueError:
            raise self.fail(f"{path}.{key}" if path else key, "expected hex") from None
        if len(raw) != size:
            raise self.fail(f"{path}.{key}" if path else key, f"expected {size} bytes, found {len(raw)}")
        return raw

    def time_(self, o: Mapping[str, Any], key: str, path: str) -> datetime:
        s = self.str_(o, key, path)
        try:
            t = datetime.fromisoformat(s)
        except ValueError:
            raise self.fail(f"{path}.{key}" if path else key, f"not an ISO-8601 time: {s!r}") from None
        if t.tzinfo is None:
            raise self.fail(f"{path}.{key}" if path else key, "time without a zone")
        return t.astimezone(UTC)

    def status(self, o: Mapping[str, Any], path: str) -> str:
        s = self.str_(o, "tcbStatus", path)
        s = _STATUS_ALIASES.get(s, s)
        if s not in TCB_STATUSES:
            raise self.fail(f"{path}.tcbStatus", f"unknown TCB status {s!r}")
        return s

    def advisories(self, o: Mapping[str, Any], path: str) -> tuple[str, ...]:
        raw = o.get("advisoryIDs", [])
        items = self.arr(raw, f"{path}.advisoryIDs")
        if not all(isinstance(a, str) for a in items):
            raise self.fail(f"{path}.advisoryIDs", "expected strings")
        return tuple(items)


class _DuplicateKeyError(ValueError):
    """Internal: a JSON object repeats a member name."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(f"duplicate member name {key!r}")
            seen.add(key)
    return out


def _load_json(text: str | bytes, root: str) -> Any:
    """Decode JSON, refusing duplicate member names: RFC 8259 section 4 leaves their meaning to
    each parser (Python keeps the last, serde-based dcap-qvl refuses), so signed collateral with
    them could say one thing to us and another to the verifier it was checked against."""
    try:
        return json.loads(text, object_pairs_hook=_unique_members)
    except _DuplicateKeyError as exc:
        raise EvidenceFormatError(f"invalid JSON: {exc}", field=root, offset=0) from None
    except json.JSONDecodeError as exc:
        raise EvidenceFormatError(f"invalid JSON: {exc.msg}", field=root, offset=exc.pos) from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise EvidenceFormatError(f"invalid JSON: {exc}", field=root, offset=0) from None


def _isvsvn_levels(j: _J, raw: Any, path: str) -> tuple[IsvSvnLevel, ...]:
    levels: list[IsvSvnLevel] = []
    for i, item in enumerate(j.arr(raw, path)):
        p = f"{path}[{i}]"
        lvl = j.obj(item, p)
        tcb = j.obj(j.get(lvl, "tcb", p), f"{p}.tcb")
        levels.append(
            IsvSvnLevel(
                isvsvn=j.int_(tcb, "isvsvn", f"{p}.tcb", hi=0xFFFF),
                tcb_status=j.status(lvl, p),
                tcb_date=str(lvl.get("tcbDate", "")),
                advisory_ids=j.advisories(lvl, p),
            )
        )
    if not levels:
        raise j.fail(path, "no TCB levels")
    return tuple(levels)


def _components(j: _J, raw: Any, path: str) -> tuple[int, ...]:
    comps = j.arr(raw, path)
    if len(comps) != 16:
        raise j.fail(path, f"expected 16 components, found {len(comps)}")
    return tuple(j.int_(j.obj(c, f"{path}[{i}]"), "svn", f"{path}[{i}]", hi=255) for i, c in enumerate(comps))


def parse_tcb_info(text: str | bytes) -> TcbInfo:
    """Parse the ``tcbInfo`` JSON text (not the PCS response wrapper); versions 2 and 3.

    A fast path handles well-formed documents; anything it does not like is re-parsed by the
    checking parser, which names the JSON path of the problem.
    """
    doc = _load_json(text, "tcb_info")
    try:
        return _tcb_info_fast(doc)
    except (KeyError, TypeError, ValueError, AttributeError):
        return _tcb_info_checked(doc)


def _tcb_info_checked(doc: Any) -> TcbInfo:
    j = _J("tcb_info")
    o = j.obj(doc, "")
    version = j.int_(o, "version", "")
    if version not in (2, 3):
        raise j.fail("version", f"unsupported TCB Info version {version}")
    tcb_id = j.str_(o, "id", "") if (version == 3 or "id" in o) else "SGX"
    if tcb_id not in ("SGX", "TDX"):
        raise j.fail("id", f"unknown TCB Info id {tcb_id!r}")
    if tcb_id == "TDX" and version < 3:
        raise j.fail("version", "TDX TCB Info needs version 3")
    levels: list[TcbLevel] = []
    for i, item in enumerate(j.arr(j.get(o, "tcbLevels", ""), "tcbLevels")):
        p = f"tcbLevels[{i}]"
        lvl = j.obj(item, p)
        tcb = j.obj(j.get(lvl, "tcb", p), f"{p}.tcb")
        tdx: tuple[int, ...] | None = None
        if version == 2:
            sgx = tuple(j.int_(tcb, f"sgxtcbcomp{k:02d}svn", f"{p}.tcb", hi=255) for k in range(1, 17))
        else:
            sgx = _components(j, j.get(tcb, "sgxtcbcomponents", f"{p}.tcb"), f"{p}.tcb.sgxtcbcomponents")
            if tcb_id == "TDX":
                tdx = _components(j, j.get(tcb, "tdxtcbcomponents", f"{p}.tcb"), f"{p}.tcb.tdxtcbcomponents")
        levels.append(
            TcbLevel(
                sgx_components=sgx,
                pce_svn=j.int_(tcb, "pcesvn", f"{p}.tcb", hi=0xFFFF),
                tcb_status=j.status(lvl, p),
                tcb_date=str(lvl.get("tcbDate", "")),
                advisory_ids=j.advisories(lvl, p),
                tdx_components=tdx,
            )
        )
    if not levels:
        raise j.fail("tcbLevels", "no TCB levels")
    module: TdxModule | None = None
    identities: list[TdxModuleIdentity] = []
    if tcb_id == "TDX":
        # Intel PCS TCB Info v3: tdxModule is present in every TDX TCB Info; without it the
        # TDX module (MRSIGNER_SEAM, SEAM attributes) of a version-0 module would go unchecked
        if "tdxModule" not in o:
            raise j.fail("tdxModule", "missing (a TDX TCB Info must describe the TDX module)")
        m = j.obj(o["tdxModule"], "tdxModule")
        module = TdxModule(
            mrsigner=j.hex_(m, "mrsigner", "tdxModule", 48),
            attributes=j.hex_(m, "attributes", "tdxModule", 8),
            attributes_mask=j.hex_(m, "attributesMask", "tdxModule", 8),
        )
        for i, item in enumerate(j.arr(o.get("tdxModuleIdentities", []), "tdxModuleIdentities")):
            p = f"tdxModuleIdentities[{i}]"
            m = j.obj(item, p)
            identities.append(
                TdxModuleIdentity(
                    id=j.str_(m, "id", p),
                    mrsigner=j.hex_(m, "mrsigner", p, 48),
                    attributes=j.hex_(m, "attributes", p, 8),
                    attributes_mask=j.hex_(m, "attributesMask", p, 8),
                    tcb_levels=_isvsvn_levels(j, j.get(m, "tcbLevels", p), f"{p}.tcbLevels"),
                )
            )
    return TcbInfo(
        id=tcb_id,
        version=version,
        issue_date=j.time_(o, "issueDate", ""),
        next_update=j.time_(o, "nextUpdate", ""),
        fmspc=j.hex_(o, "fmspc", "", 6),
        pce_id=j.hex_(o, "pceId", "", 2),
        tcb_type=_tcb_type(j, o),
        tcb_evaluation_data_number=j.int_(o, "tcbEvaluationDataNumber", ""),
        tcb_levels=tuple(levels),
        tdx_module=module,
        tdx_module_identities=tuple(identities),
    )


def _tcb_type(j: _J, o: Mapping[str, Any]) -> int:
    """Intel PCS: tcbType selects the TCB level comparison logic. Only type 0 (compare every
    SVN) is defined and implemented; matching levels of another type with it would give a
    verdict by the wrong rules, so such a TCB Info is unusable."""
    tcb_type = j.int_(o, "tcbType", "")
    if tcb_type != SUPPORTED_TCB_TYPE:
        raise j.fail("tcbType", f"unsupported tcbType {tcb_type} (only {SUPPORTED_TCB_TYPE} is defined)")
    return tcb_type


def parse_enclave_identity(text: str | bytes) -> EnclaveIdentity:
    """Parse the ``enclaveIdentity`` JSON text (QE or TD_QE identity, version 2)."""
    doc = _load_json(text, "qe_identity")
    try:
        return _identity_fast(doc)
    except (KeyError, TypeError, ValueError, AttributeError):
        return _identity_checked(doc)


def _identity_checked(doc: Any) -> EnclaveIdentity:
    j = _J("qe_identity")
    o = j.obj(doc, "")
    version = j.int_(o, "version", "")
    if version != 2:
        raise j.fail("version", f"unsupported enclave identity version {version}")
    return EnclaveIdentity(
        id=j.str_(o, "id", ""),
        version=version,
        issue_date=j.time_(o, "issueDate", ""),
        next_update=j.time_(o, "nextUpdate", ""),
        tcb_evaluation_data_number=j.int_(o, "tcbEvaluationDataNumber", ""),
        miscselect=int.from_bytes(j.hex_(o, "miscselect", "", 4), "big"),
        miscselect_mask=int.from_bytes(j.hex_(o, "miscselectMask", "", 4), "big"),
        attributes=j.hex_(o, "attributes", "", 16),
        attributes_mask=j.hex_(o, "attributesMask", "", 16),
        mrsigner=j.hex_(o, "mrsigner", "", 32),
        isvprodid=j.int_(o, "isvprodid", "", hi=0xFFFF),
        tcb_levels=_isvsvn_levels(j, j.get(o, "tcbLevels", ""), "tcbLevels"),
    )


# --- fast paths (same acceptance as the checked parsers; any doubt falls back to them) --------

_STATUS_SET = frozenset(TCB_STATUSES)


def _f_int(v: Any, hi: int) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise ValueError
    return v


def _f_str(v: Any) -> str:
    if type(v) is not str:
        raise ValueError
    return v


def _f_hex(v: Any, size: int) -> bytes:
    raw = bytes.fromhex(_f_str(v))
    if len(raw) != size:
        raise ValueError
    return raw


def _f_time(v: Any) -> datetime:
    t = datetime.fromisoformat(_f_str(v))
    if t.tzinfo is None:
        raise ValueError
    return t.astimezone(UTC)


def _f_status(lvl: Mapping[str, Any]) -> str:
    st = lvl["tcbStatus"]
    st = _STATUS_ALIASES.get(st, st)
    if st not in _STATUS_SET:
        raise ValueError
    return str(st)


def _f_advisories(lvl: Mapping[str, Any]) -> tuple[str, ...]:
    adv = lvl.get("advisoryIDs", ())
    if type(adv) is not list and adv != ():
        raise ValueError
    out = tuple(adv)
    for a in out:
        if type(a) is not str:
            raise ValueError
    return out


def _f_components(v: Any) -> tuple[int, ...]:
    if type(v) is not list or len(v) != 16:
        raise ValueError
    out = tuple([c["svn"] for c in v])
    _f_svns(out)
    return out


def _f_svns(out: tuple[Any, ...]) -> None:
    """All plain ints (JSON true/false are not SVNs) in 0..255, checked at C speed."""
    if set(map(type, out)) != {int}:
        raise ValueError
    bytes(out)


def _f_isv_levels(v: Any) -> tuple[IsvSvnLevel, ...]:
    if type(v) is not list or not v:
        raise ValueError
    return tuple(
        IsvSvnLevel(
            _f_int(lvl["tcb"]["isvsvn"], 0xFFFF),
            _f_status(lvl),
            str(lvl.get("tcbDate", "")),
            _f_advisories(lvl),
        )
        for lvl in v
    )


_V2_KEYS = tuple(f"sgxtcbcomp{k:02d}svn" for k in range(1, 17))


def _tcb_info_fast(o: Any) -> TcbInfo:
    if type(o) is not dict:
        raise ValueError
    version = _f_int(o["version"], 2**32 - 1)
    if version == 3 or "id" in o:
        tcb_id = _f_str(o["id"])
    elif version == 2:
        tcb_id = "SGX"
    else:
        raise ValueError
    if version not in (2, 3) or tcb_id not in ("SGX", "TDX") or (tcb_id == "TDX" and version < 3):
        raise ValueError
    raw_levels = o["tcbLevels"]
    if type(raw_levels) is not list or not raw_levels:
        raise ValueError
    levels = []
    for lvl in raw_levels:
        tcb = lvl["tcb"]
        tdx = None
        if version == 2:
            sgx = tuple([tcb[k] for k in _V2_KEYS])
            _f_svns(sgx)
        else:
            sgx = _f_components(tcb["sgxtcbcomponents"])
            if tcb_id == "TDX":
                tdx = _f_components(tcb["tdxtcbcomponents"])
        levels.append(
            TcbLevel(
                sgx,
                _f_int(tcb["pcesvn"], 0xFFFF),
                _f_status(lvl),
                str(lvl.get("tcbDate", "")),
                _f_advisories(lvl),
                tdx,
            )
        )
    module = None
    identities: list[TdxModuleIdentity] = []
    if tcb_id == "TDX":
        m = o["tdxModule"]
        module = TdxModule(
            _f_hex(m["mrsigner"], 48), _f_hex(m["attributes"], 8), _f_hex(m["attributesMask"], 8)
        )
        ids = o.get("tdxModuleIdentities", [])
        if type(ids) is not list:
            raise ValueError
        for m in ids:
            identities.append(
                TdxModuleIdentity(
                    _f_str(m["id"]),
                    _f_hex(m["mrsigner"], 48),
                    _f_hex(m["attributes"], 8),
                    _f_hex(m["attributesMask"], 8),
                    _f_isv_levels(m["tcbLevels"]),
                )
            )
    return TcbInfo(
        id=tcb_id,
        version=version,
        issue_date=_f_time(o["issueDate"]),
        next_update=_f_time(o["nextUpdate"]),
        fmspc=_f_hex(o["fmspc"], 6),
        pce_id=_f_hex(o["pceId"], 2),
        tcb_type=_f_int(o["tcbType"], SUPPORTED_TCB_TYPE),
        tcb_evaluation_data_number=_f_int(o["tcbEvaluationDataNumber"], 2**32 - 1),
        tcb_levels=tuple(levels),
        tdx_module=module,
        tdx_module_identities=tuple(identities),
    )


def _identity_fast(o: Any) -> EnclaveIdentity:
    if type(o) is not dict or _f_int(o["version"], 2**32 - 1) != 2:
        raise ValueError
    return EnclaveIdentity(
        id=_f_str(o["id"]),
        version=2,
        issue_date=_f_time(o["issueDate"]),
        next_update=_f_time(o["nextUpdate"]),
        tcb_evaluation_data_number=_f_int(o["tcbEvaluationDataNumber"], 2**32 - 1),
        miscselect=int.from_bytes(_f_hex(o["miscselect"], 4), "big"),
        miscselect_mask=int.from_bytes(_f_hex(o["miscselectMask"], 4), "big"),
        attributes=_f_hex(o["attributes"], 16),
        attributes_mask=_f_hex(o["attributesMask"], 16),
        mrsigner=_f_hex(o["mrsigner"], 32),
        isvprodid=_f_int(o["isvprodid"], 0xFFFF),
        tcb_levels=_f_isv_levels(o["tcbLevels"]),
    )


# --- serialising (builders) --------------------------------------------------------------------


def _time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _isv_levels_json(levels: Sequence[IsvSvnLevel]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for lvl in levels:
        d: dict[str, Any] = {
            "tcb": {"isvsvn": lvl.isvsvn},
            "tcbDate": lvl.tcb_date,
            "tcbStatus": lvl.tcb_status,
        }
        if lvl.advisory_ids:
            d["advisoryIDs"] = list(lvl.advisory_ids)
        out.append(d)
    return out


def tcb_info_json(info: TcbInfo) -> str:
    """Serialise in Intel's compact form and key order (the exact text that gets signed)."""
    o: dict[str, Any] = {}
    if info.version >= 3:
        o["id"] = info.id
    o.update(
        {
            "version": info.version,
            "issueDate": _time(info.issue_date),
            "nextUpdate": _time(info.next_update),
            "fmspc": info.fmspc.hex().upper(),
            "pceId": info.pce_id.hex().upper(),
            "tcbType": info.tcb_type,
            "tcbEvaluationDataNumber": info.tcb_evaluation_data_number,
        }
    )
    if info.tdx_module is not None:
        o["tdxModule"] = {
            "mrsigner": info.tdx_module.mrsigner.hex().upper(),
            "attributes": info.tdx_module.attributes.hex().upper(),
            "attributesMask": info.tdx_module.attributes_mask.hex().upper(),
        }
    if info.tdx_module_identities:
        o["tdxModuleIdentities"] = [
            {
                "id": m.id,
                "mrsigner": m.mrsigner.hex().upper(),
                "attributes": m.attributes.hex().upper(),
                "attributesMask": m.attributes_mask.hex().upper(),
                "tcbLevels": _isv_levels_json(m.tcb_levels),
            }
            for m in info.tdx_module_identities
        ]
    levels: list[dict[str, Any]] = []
    for lvl in info.tcb_levels:
        tcb: dict[str, Any]
        if info.version == 2:
            tcb = {f"sgxtcbcomp{i + 1:02d}svn": svn for i, svn in enumerate(lvl.sgx_components)}
            tcb["pcesvn"] = lvl.pce_svn
        else:
            tcb = {"sgxtcbcomponents": [{"svn": s} for s in lvl.sgx_components], "pcesvn": lvl.pce_svn}
            if lvl.tdx_components is not None:
                tcb["tdxtcbcomponents"] = [{"svn": s} for s in lvl.tdx_components]
        d: dict[str, Any] = {"tcb": tcb, "tcbDate": lvl.tcb_date, "tcbStatus": lvl.tcb_status}
        if lvl.advisory_ids:
            d["advisoryIDs"] = list(lvl.advisory_ids)
        levels.append(d)
    o["tcbLevels"] = levels
    return _dumps(o)


def enclave_identity_json(identity: EnclaveIdentity) -> str:
    """Serialise a QE identity in Intel's compact form and key order."""
    return _dumps(
        {
            "id": identity.id,
            "version": identity.version,
            "issueDate": _time(identity.issue_date),
            "nextUpdate": _time(identity.next_update),
            "tcbEvaluationDataNumber": identity.tcb_evaluation_data_number,
            "miscselect": identity.miscselect.to_bytes(4, "big").hex().upper(),
            "miscselectMask": identity.miscselect_mask.to_bytes(4, "big").hex().upper(),
            "attributes": identity.attributes.hex().upper(),
            "attributesMask": identity.attributes_mask.hex().upper(),
            "mrsigner": identity.mrsigner.hex().upper(),
            "isvprodid": identity.isvprodid,
            "tcbLevels": _isv_levels_json(identity.tcb_levels),
        }
    )


def signed_response(member: str, body_text: str, signature: bytes) -> str:
    """A PCS response body ``{"<member>":<body_text>,"signature":"<hex>"}`` with the body verbatim."""
    return '{"' + member + '":' + body_text + ',"signature":"' + signature.hex() + '"}'


# --- raw PCS responses -------------------------------------------------------------------------


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def split_signed_response(text: str | bytes, member: str) -> tuple[str, bytes]:
    """Return (exact text of ``member``'s JSON value, signature bytes) from a PCS response.

    ``member`` is ``tcbInfo`` or ``enclaveIdentity``. The text is sliced from the response, never
    re-serialised, because the signature covers those exact bytes.
    """
    fld = f"pcs_response.{member}"
    try:
        s = text.decode("utf-8") if isinstance(text, bytes) else text
    except UnicodeDecodeError as exc:
        raise EvidenceFormatError("response is not UTF-8", field=fld, offset=exc.start) from None
    _load_json(s, fld)  # whole document must be valid JSON
    dec = json.JSONDecoder()
    spans: dict[str, tuple[int, int]] = {}
    i = _skip_ws(s, 0)
    if i >= len(s) or s[i] != "{":
        raise EvidenceFormatError("expected a JSON object", field=fld, offset=i)
    i = _skip_ws(s, i + 1)
    while i < len(s) and s[i] != "}":
        if s[i] != '"':
            raise EvidenceFormatError("expected a member name", field=fld, offset=i)
        key, i = json.decoder.scanstring(s, i + 1)  # type: ignore[attr-defined]
        i = _skip_ws(s, i)
        if i >= len(s) or s[i] != ":":
            raise EvidenceFormatError("expected ':'", field=fld, offset=i)
        i = _skip_ws(s, i + 1)
        _, end = dec.raw_decode(s, i)
        spans[str(key)] = (i, end)
        i = _skip_ws(s, end)
        if i < len(s) and s[i] == ",":
            i = _skip_ws(s, i + 1)
    if member not in spans or "signature" not in spans:
        raise EvidenceFormatError(f"response lacks {member!r} or 'signature'", field=fld, offset=0)
    a, b = spans[member]
    sig_val = json.loads(s[slice(*spans["signature"])])
    if not isinstance(sig_val, str):
        raise EvidenceFormatError("signature is not a string", field=fld, offset=spans["signature"][0])
    try:
        sig = bytes.fromhex(sig_val)
    except ValueError:
        raise EvidenceFormatError("signature is not hex", field=fld, offset=spans["signature"][0]) from None
    return s[a:b], sig


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----(.*?)-----END X509 CRL-----", re.S)


def crl_to_der(raw: bytes | str, *, field: str = "crl") -> bytes:
    """Accept a CRL as DER, PEM, or hex text (PCCS and older PCS answer hex) and return DER."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    if data[:1] == b"\x30":
        return data
    m = _PEM_CRL.search(data)
    try:
        if m:
            return base64.b64decode(b"".join(m.group(1).split()), validate=True)
        txt = data.strip()
        if txt[:2] in (b"0x", b"0X"):
            txt = txt[2:]
        return bytes.fromhex(txt.decode("ascii"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise EvidenceFormatError("CRL is neither DER, PEM nor hex", field=field, offset=0) from None


def decode_issuer_chain_header(value: str) -> str:
    """PCS issuer-chain headers carry URL-encoded PEM; plain PEM passes through unchanged."""
    return unquote(value) if "%" in value else value


# --- the bundle --------------------------------------------------------------------------------

_HEX_FIELDS = ("root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature")
_TEXT_FIELDS = (
    "pck_crl_issuer_chain",
    "tcb_info_issuer_chain",
    "tcb_info",
    "qe_identity_issuer_chain",
    "qe_identity",
)


def _bytes_field(v: Any, name: str) -> bytes:
    if isinstance(v, str):
        try:
            return bytes.fromhex(v.strip().removeprefix("0x"))
        except ValueError:
            raise EvidenceFormatError("expected hex", field=f"collateral.{name}") from None
    if isinstance(v, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 256 for x in v
    ):
        return bytes(v)
    if isinstance(v, bytes | bytearray):
        return bytes(v)
    raise EvidenceFormatError("expected hex string or byte array", field=f"collateral.{name}")


@dataclass(frozen=True)
class QuoteCollateral:
    """Everything a DCAP verifier needs beside the quote: dcap-qvl ``QuoteCollateralV3`` fields.

    Text fields are kept verbatim (signatures cover exact bytes); CRLs are DER; signatures are
    raw r||s. ``pck_certificate_chain`` is an optional PEM chain used when the quote carries no
    type-5 certification data.
    """

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: bytes
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes
    pck_certificate_chain: str | None = field(default=None)

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> QuoteCollateral:
        """Load the dcap-qvl QuoteCollateralV3 JSON (text or decoded mapping)."""
        obj = _load_json(data, "collateral") if isinstance(data, str | bytes) else data
        if not isinstance(obj, Mapping):
            raise EvidenceFormatError("expected a JSON object", field="collateral")
        kw: dict[str, Any] = {}
        for name in _TEXT_FIELDS:
            v = obj.get(name)
            if not isinstance(v, str):
                raise EvidenceFormatError("missing or not a string", field=f"collateral.{name}")
            kw[name] = v
        for name in _HEX_FIELDS:
            if name not in obj:
                raise EvidenceFormatError("missing", field=f"collateral.{name}")
            kw[name] = _bytes_field(obj[name], name)
        kw["root_ca_crl"] = crl_to_der(kw["root_ca_crl"], field="collateral.root_ca_crl")
        kw["pck_crl"] = crl_to_der(kw["pck_crl"], field="collateral.pck_crl")
        chain = obj.get("pck_certificate_chain")
        if chain is not None and not isinstance(chain, str):
            raise EvidenceFormatError("not a string", field="collateral.pck_certificate_chain")
        kw["pck_certificate_chain"] = chain or None
        return cls(**kw)

    @classmethod
    def from_pcs_responses(
        cls,
        *,
        tcb_info_response: str | bytes,
        tcb_info_issuer_chain: str,
        qe_identity_response: str | bytes,
        qe_identity_issuer_chain: str,
        pck_crl: bytes | str,
        pck_crl_issuer_chain: str,
        root_ca_crl: bytes | str,
    ) -> QuoteCollateral:
        """Assemble from raw Intel PCS / PCCS response bodies and their issuer-chain headers."""
        tcb_text, tcb_sig = split_signed_response(tcb_info_response, "tcbInfo")
        qe_text, qe_sig = split_signed_response(qe_identity_response, "enclaveIdentity")
        return cls(
            pck_crl_issuer_chain=decode_issuer_chain_header(pck_crl_issuer_chain),
            root_ca_crl=crl_to_der(root_ca_crl, field="root_ca_crl"),
            pck_crl=crl_to_der(pck_crl, field="pck_crl"),
            tcb_info_issuer_chain=decode_issuer_chain_header(tcb_info_issuer_chain),
            tcb_info=tcb_text,
            tcb_info_signature=tcb_sig,
            qe_identity_issuer_chain=decode_issuer_chain_header(qe_identity_issuer_chain),
            qe_identity=qe_text,
            qe_identity_signature=qe_sig,
        )

    def to_json(self) -> dict[str, Any]:
        """The dcap-qvl QuoteCollateralV3 JSON shape (``json.dumps`` it for a file)."""
        out: dict[str, Any] = {
            "pck_crl_issuer_chain": self.pck_crl_issuer_chain,
            "root_ca_crl": self.root_ca_crl.hex(),
            "pck_crl": self.pck_crl.hex(),
            "tcb_info_issuer_chain": self.tcb_info_issuer_chain,
            "tcb_info": self.tcb_info,
            "tcb_info_signature": self.tcb_info_signature.hex(),
            "qe_identity_issuer_chain": self.qe_identity_issuer_chain,
            "qe_identity": self.qe_identity,
            "qe_identity_signature": self.qe_identity_signature.hex(),
        }
        if self.pck_certificate_chain:
            out["pck_certificate_chain"] = self.pck_certificate_chain
        return out

    def tcb_info_response(self) -> str:
        """The PCS ``/tcb`` response body this bundle's TCB Info came in."""
        return signed_response("tcbInfo", self.tcb_info, self.tcb_info_signature)

    def qe_identity_response(self) -> str:
        """The PCS ``/qe/identity`` response body."""
        return signed_response("enclaveIdentity", self.qe_identity, self.qe_identity_signature)

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 over every field (length-prefixed): the cache key of this exact bundle."""
        h = hashlib.sha256()
        for part in (
            self.pck_crl_issuer_chain.encode(),
            self.root_ca_crl,
            self.pck_crl,
            self.tcb_info_issuer_chain.encode(),
            self.tcb_info.encode(),
            self.tcb_info_signature,
            self.qe_identity_issuer_chain.encode(),
            self.qe_identity.encode(),
            self.qe_identity_signature,
            (self.pck_certificate_chain or "").encode(),
        ):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.digest()
