"""Reference-value policy: what verified evidence must look like to be accepted.

A verifier establishes that evidence is authentic and what it claims; a :class:`Policy` decides
whether those claims are acceptable. Policies load from YAML or a dict with a strict schema
(an unknown key is a :class:`PolicyError` naming it and the nearest valid key), compose
(:meth:`Policy.merge`, :class:`AllOf`, :class:`AnyOf`, modelled on sigstore-python's verification
policies) and every rejection is a :class:`VerificationError` naming the check, the observed and
the expected value.

Keys are the claim names of the verification result::

    allow_debug: false          # UNSAFE when true: debug enclaves/TDs/guests expose their memory
    allow_simulation: false     # UNSAFE when true: accepts the simulation provider's evidence
    kinds: [sgx-dcap, nitro]
    tcb_statuses: [UpToDate, SWHardeningNeeded]     # SGX, TDX, IAS (IAS spellings such as OK too)
    allowed_advisories: [INTEL-SA-00615]             # every advisory present must be listed
    denied_advisories: [INTEL-SA-00334]
    mrenclave: [<hex>]  mrsigner: [<hex>]  isv_prod_id: 0  min_isv_svn: 1      # SGX (DCAP, IAS)
    mr_td: [<hex>]  rtmr0: [<hex>] ... rtmr3: [<hex>]                           # TDX
    expected_pcrs: {0: <hex>, 8: <hex>}  user_data: <hex>  public_key: <hex>    # Nitro
    measurement: [<hex>]  host_data: [<hex>]                                    # SEV-SNP
    report_data: <hex, 64 bytes>   report_data_prefix: <hex>    # SGX, TDX, IAS, SNP binding
    nonce: <hex>                   # Nitro nonce / IAS report nonce (its UTF-8 bytes)
    max_age: 300                   # seconds (or "5m"): Nitro and IAS timestamps

Defaults are strict where it matters and usable otherwise: debug and simulation are refused;
the accepted TCB statuses are every status under which the platform is not revoked
(UpToDate, SWHardeningNeeded, ConfigurationNeeded, ConfigurationAndSWHardeningNeeded, OutOfDate,
OutOfDateConfigurationNeeded), because an out-of-date platform is still the genuine platform and
the status is reported for downstream decisions; narrow ``tcb_statuses`` in production. A key
left out is not checked; an empty list is refused (it would silently accept nothing or,
worse, be read as "anything"). A reference value that the evidence kind cannot carry (e.g.
``mrenclave`` for a Nitro document) rejects that evidence instead of being skipped.
"""

from __future__ import annotations

import difflib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import yaml

from r3e_tee.attestation.result import EvidenceKind, VerificationResult
from r3e_tee.errors import PolicyError, Reason, VerificationError

__all__ = [
    "DEFAULT_TCB_STATUSES",
    "AllOf",
    "AnyOf",
    "Policy",
    "VerificationPolicy",
    "canonical_tcb_status",
    "load_policy",
]

SGX = frozenset({EvidenceKind.SGX_DCAP, EvidenceKind.SGX_IAS})
TDX = frozenset({EvidenceKind.TDX_DCAP})
NITRO = frozenset({EvidenceKind.NITRO})
SNP = frozenset({EvidenceKind.SEV_SNP})
REPORT_DATA_KINDS = SGX | TDX | SNP
NONCE_KINDS = frozenset({EvidenceKind.NITRO, EvidenceKind.SGX_IAS})
TIMESTAMP_KINDS = frozenset({EvidenceKind.NITRO, EvidenceKind.SGX_IAS})
# kinds whose verifier establishes a TCB status (Intel TCB Info / IAS); Nitro and SEV-SNP do not
TCB_STATUS_KINDS = SGX | TDX
CLOCK_SKEW_SECONDS = 60.0

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
DEFAULT_TCB_STATUSES = frozenset(TCB_STATUSES) - {"Revoked"}
_IAS_STATUS = {
    "OK": "UpToDate",
    "SW_HARDENING_NEEDED": "SWHardeningNeeded",
    "CONFIGURATION_NEEDED": "ConfigurationNeeded",
    "CONFIGURATION_AND_SW_HARDENING_NEEDED": "ConfigurationAndSWHardeningNeeded",
    "GROUP_OUT_OF_DATE": "OutOfDate",
    "GROUP_REVOKED": "Revoked",
    "SIGNATURE_REVOKED": "Revoked",
    "KEY_REVOKED": "Revoked",
}


def canonical_tcb_status(status: str) -> str:
    """DCAP spelling of a TCB status (IAS ``GROUP_OUT_OF_DATE`` -> ``OutOfDate``)."""
    if status in _IAS_STATUS:
        return _IAS_STATUS[status]
    for known in TCB_STATUSES:
        if known.lower() == status.lower():
            return known
    return status


class VerificationPolicy(Protocol):
    """Anything that can accept or reject a verification result."""

    def check(self, result: VerificationResult, *, at: datetime | None = None) -> None:
        """Return if acceptable; raise :class:`VerificationError` otherwise."""


# --- field schema --------------------------------------------------------------------------------


def _hexes(size: int | tuple[int, ...]) -> Callable[[Any, str], frozenset[str]]:
    def conv(value: Any, key: str) -> frozenset[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple, set, frozenset)):
            raise PolicyError(f"policy key {key!r} must be a hex string or a list of them")
        if not items:
            raise PolicyError(
                f"policy key {key!r} is an empty list, which would accept nothing",
                hint=f"list the accepted values, or leave {key!r} out to not check it",
            )
        return frozenset(_hex(v, key, size) for v in items)

    return conv


def _hex(value: Any, key: str, size: int | tuple[int, ...] | None) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"policy key {key!r}: {value!r} is not a hex string")
    text = value.strip().lower()
    text = text.removeprefix("0x")
    if not re.fullmatch(r"(?:[0-9a-f]{2})*", text):
        raise PolicyError(f"policy key {key!r}: {value!r} is not hex")
    sizes = (size,) if isinstance(size, int) else size
    if sizes is not None and len(text) // 2 not in sizes:
        want = " or ".join(str(s) for s in sizes)
        raise PolicyError(f"policy key {key!r}: {len(text) // 2} bytes, expected {want}")
    return text


def _one_hex(size: int | tuple[int, ...] | None, max_size: int = 1024) -> Callable[[Any, str], str]:
    def conv(value: Any, key: str) -> str:
        out = _hex(value, key, size)
        if len(out) // 2 > max_size or (size is None and not out):
            raise PolicyError(f"policy key {key!r}: must be 1..{max_size} bytes")
        return out

    return conv


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"policy key {key!r} must be true or false, not {value!r}")
    return value


def _uint(value: Any, key: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PolicyError(f"policy key {key!r} must be a non-negative integer, not {value!r}")
    return value


def _strings(
    choices: Sequence[str] | None, canon: Callable[[str], str] = str
) -> Callable[[Any, str], frozenset[str]]:
    def conv(value: Any, key: str) -> frozenset[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple, set, frozenset)) or not all(isinstance(i, str) for i in items):
            raise PolicyError(f"policy key {key!r} must be a list of strings")
        if not items:
            raise PolicyError(
                f"policy key {key!r} is an empty list, which would accept nothing",
                hint=f"list the accepted values, or leave {key!r} out for the default",
            )
        out = set()
        for item in items:
            c = canon(item)
            if choices is not None and c not in choices:
                near = difflib.get_close_matches(c, choices, n=1)
                raise PolicyError(
                    f"policy key {key!r}: unknown value {item!r}",
                    hint=f"did you mean {near[0]!r}?" if near else f"valid: {', '.join(choices)}",
                )
            out.add(c)
        return frozenset(out)

    return conv


def _pcrs(value: Any, key: str) -> Mapping[int, str]:
    if not isinstance(value, Mapping):
        raise PolicyError(f"policy key {key!r} must map PCR index -> hex value")
    out: dict[int, str] = {}
    for idx, hexval in value.items():
        try:
            i = int(str(idx).removeprefix("pcr"))
        except ValueError:
            raise PolicyError(f"policy key {key!r}: PCR index {idx!r} is not a number") from None
        if not 0 <= i <= 31:
            raise PolicyError(f"policy key {key!r}: PCR index {i} is not in 0..31")
        out[i] = _hex(hexval, f"{key}.{i}", (32, 48, 64))
    return MappingProxyType(dict(sorted(out.items())))


def _duration(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)):
        seconds = (
            float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]
        )
    else:
        raise PolicyError(f"policy key {key!r} must be seconds or a duration such as '5m', not {value!r}")
    if seconds <= 0:
        raise PolicyError(f"policy key {key!r} must be positive")
    return seconds


class _TextNumbersLoader(yaml.SafeLoader):
    """SafeLoader without the int/float resolvers: measurements are hex, never numbers."""


_TextNumbersLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

_KIND_VALUES = tuple(k.value for k in EvidenceKind)
_KIND_ALIASES = {"sgx": "sgx-dcap", "tdx": "tdx-dcap", "ias": "sgx-ias", "snp": "sev-snp"}
_CONVERTERS: dict[str, Callable[[Any, str], Any]] = {
    "allow_debug": _bool,
    "allow_simulation": _bool,
    "kinds": _strings(_KIND_VALUES, lambda k: _KIND_ALIASES.get(k.lower(), k.lower())),
    "tcb_statuses": _strings(TCB_STATUSES, canonical_tcb_status),
    "allowed_advisories": _strings(None, str.upper),
    "denied_advisories": _strings(None, str.upper),
    "mrenclave": _hexes(32),
    "mrsigner": _hexes(32),
    "isv_prod_id": _uint,
    "min_isv_svn": _uint,
    "mr_td": _hexes(48),
    "rtmr0": _hexes(48),
    "rtmr1": _hexes(48),
    "rtmr2": _hexes(48),
    "rtmr3": _hexes(48),
    "expected_pcrs": _pcrs,
    "user_data": _one_hex(None),
    "public_key": _one_hex(None),
    "measurement": _hexes(48),
    "host_data": _hexes(32),
    "report_data": _one_hex(64),
    "report_data_prefix": _one_hex(None, 64),
    "nonce": _one_hex(None),
    "max_age": _duration,
}
# which kinds can carry each reference value
_APPLIES: dict[str, frozenset[EvidenceKind]] = {
    "tcb_statuses": TCB_STATUS_KINDS,
    "mrenclave": SGX,
    "mrsigner": SGX,
    "isv_prod_id": SGX,
    "min_isv_svn": SGX,
    "mr_td": TDX,
    "rtmr0": TDX,
    "rtmr1": TDX,
    "rtmr2": TDX,
    "rtmr3": TDX,
    "expected_pcrs": NITRO,
    "user_data": NITRO,
    "public_key": NITRO,
    "measurement": SNP,
    "host_data": SNP,
    "report_data": REPORT_DATA_KINDS,
    "report_data_prefix": REPORT_DATA_KINDS,
    "nonce": NONCE_KINDS,
    "max_age": TIMESTAMP_KINDS,
}
_UNSAFE = {
    "allow_debug": "debug enclaves are accepted: their memory is readable by the host",
    "allow_simulation": "simulated evidence is accepted: no hardware protects it",
}


@dataclass(frozen=True)
class Policy:
    """Reference values (see the module docstring); ``Policy()`` is the strict default."""

    allow_debug: bool = False
    allow_simulation: bool = False
    kinds: frozenset[str] | None = None
    tcb_statuses: frozenset[str] | None = None
    allowed_advisories: frozenset[str] | None = None
    denied_advisories: frozenset[str] | None = None
    mrenclave: frozenset[str] | None = None
    mrsigner: frozenset[str] | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int | None = None
    mr_td: frozenset[str] | None = None
    rtmr0: frozenset[str] | None = None
    rtmr1: frozenset[str] | None = None
    rtmr2: frozenset[str] | None = None
    rtmr3: frozenset[str] | None = None
    expected_pcrs: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))
    user_data: str | None = None
    public_key: str | None = None
    measurement: frozenset[str] | None = None
    host_data: frozenset[str] | None = None
    report_data: str | None = None
    report_data_prefix: str | None = None
    nonce: str | None = None
    max_age: float | None = None

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, source: str = "policy") -> Policy:
        """Strictly validate a mapping; unknown keys name the nearest valid one."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise PolicyError(f"{source}: a policy must be a mapping of keys to reference values")
        values: dict[str, Any] = {}
        for key, raw in data.items():
            conv = _CONVERTERS.get(str(key))
            if conv is None:
                near = difflib.get_close_matches(str(key), list(_CONVERTERS), n=1, cutoff=0.5)
                raise PolicyError(
                    f"{source}: unknown policy key {key!r}",
                    hint=f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(_CONVERTERS)}",
                )
            if raw is None:
                continue
            try:
                values[str(key)] = conv(raw, str(key))
            except PolicyError as exc:
                raise PolicyError(f"{source}: {exc.message}", hint=exc.hint) from None
        return cls(**values)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "policy") -> Policy:
        """YAML numbers stay text, so hex such as ``0404...`` is not read as an (octal) integer."""
        try:
            data = yaml.load(text, Loader=_TextNumbersLoader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise PolicyError(f"{source}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        return cls.from_dict(data if data is not None else {}, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read policy file {p}: {exc}") from None
        return cls.from_yaml(text, source=str(p))

    def to_dict(self) -> dict[str, Any]:
        """Stable JSON form: only the keys that are set (defaults left out)."""
        return dict(self._as_dict)

    @cached_property
    def _as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value == f.default or (f.name == "expected_pcrs" and not value):
                continue
            if isinstance(value, frozenset):
                value = sorted(value)
            elif isinstance(value, Mapping):
                value = {str(k): v for k, v in value.items()}
            out[f.name] = value
        return out

    def unsafe_choices(self) -> list[str]:
        """Human explanations of every unsafe option this policy enables (for loud output)."""
        return list(self._unsafe)

    @cached_property
    def _unsafe(self) -> tuple[str, ...]:
        return tuple(f"{k}: {why}" for k, why in _UNSAFE.items() if getattr(self, k))

    # -- composition ----------------------------------------------------------------------------

    def merge(self, other: Policy) -> Policy:
        """A policy that accepts only what both accept (intersections, stricter bounds).

        Conflicting exact values (two different nonces, PCR 0 pinned to two values, disjoint
        measurement lists) are a :class:`PolicyError`: the merged policy could accept nothing.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            out[f.name] = _merge_value(f.name, a, b)
        return Policy(**out)

    def with_overrides(
        self, *, allow_debug: bool | None = None, pcrs: Mapping[int, str] | None = None
    ) -> Policy:
        """The CLI's ``--allow-debug`` (an explicit UNSAFE override) and ``--pcr`` additions."""
        p = self
        if pcrs:
            p = p.merge(Policy(expected_pcrs=_pcrs(dict(pcrs), "expected_pcrs"), allow_debug=p.allow_debug))
        if allow_debug is not None:
            p = replace(p, allow_debug=allow_debug)
        return p

    # -- checking -------------------------------------------------------------------------------

    def check(self, result: VerificationResult, *, at: datetime | None = None) -> None:
        """Raise :class:`VerificationError` on the first reference value the result violates."""
        kind = result.kind
        claims = result.claims
        if self.kinds is not None and kind.value not in self.kinds:
            _reject(Reason.KIND_NOT_ALLOWED, "policy.kinds", kind.value, ", ".join(sorted(self.kinds)))
        if result.simulated and not self.allow_simulation:
            _reject(
                Reason.SIMULATION_NOT_ALLOWED,
                "policy.allow_simulation",
                "simulated evidence",
                "hardware evidence",
            )
        if result.debug and not self.allow_debug:
            _reject(Reason.DEBUG_ENCLAVE, "policy.allow_debug", "debug=true", "debug=false")
        for key, kinds in _APPLIES.items():
            value = getattr(self, key)
            if value is not None and (key != "expected_pcrs" or value) and kind not in kinds:
                _reject(
                    Reason.KIND_NOT_ALLOWED,
                    f"policy.{key}",
                    f"{kind.value} evidence (carries no {key})",
                    " or ".join(sorted(k.value for k in kinds)),
                )
        self._check_tcb(result)
        # identity
        for key in (
            "mrenclave",
            "mrsigner",
            "mr_td",
            "rtmr0",
            "rtmr1",
            "rtmr2",
            "rtmr3",
            "measurement",
            "host_data",
        ):
            allowed: frozenset[str] | None = getattr(self, key)
            if allowed is not None:
                observed = str(claims.get(key, "")).lower()
                if not any(hmac.compare_digest(observed, a) for a in allowed):
                    _reject(
                        Reason.MEASUREMENT_MISMATCH, f"policy.{key}", observed, " or ".join(sorted(allowed))
                    )
        if self.isv_prod_id is not None and claims.get("isv_prod_id") != self.isv_prod_id:
            _reject(
                Reason.MEASUREMENT_MISMATCH,
                "policy.isv_prod_id",
                str(claims.get("isv_prod_id")),
                str(self.isv_prod_id),
            )
        if self.min_isv_svn is not None:
            svn = claims.get("isv_svn")
            if not isinstance(svn, int) or svn < self.min_isv_svn:
                _reject(Reason.MEASUREMENT_MISMATCH, "policy.min_isv_svn", str(svn), f">= {self.min_isv_svn}")
        if self.expected_pcrs:
            pcrs = _all_pcrs(result)
            for idx, want in self.expected_pcrs.items():
                got = pcrs.get(idx)
                if got is None or not hmac.compare_digest(got, want):
                    _reject(Reason.PCR_MISMATCH, f"policy.expected_pcrs.{idx}", got, want)
        # binding (constant-time compares: these values are challenge material)
        self._check_binding(result)
        if self.max_age is not None:
            self._check_age(result, at)

    def _check_tcb(self, result: VerificationResult) -> None:
        if result.tcb_status is None:
            return
        allowed = self.tcb_statuses if self.tcb_statuses is not None else DEFAULT_TCB_STATUSES
        status = canonical_tcb_status(result.tcb_status)
        if status not in allowed:
            _reject(
                Reason.TCB_STATUS_NOT_ALLOWED,
                "policy.tcb_statuses",
                result.tcb_status,
                ", ".join(sorted(allowed)),
            )
        advisories = {a.upper() for a in result.advisories}
        if self.denied_advisories:
            bad = sorted(advisories & self.denied_advisories)
            if bad:
                _reject(
                    Reason.ADVISORY_NOT_ALLOWED,
                    "policy.denied_advisories",
                    ", ".join(bad),
                    f"none of {', '.join(sorted(self.denied_advisories))}",
                )
        if self.allowed_advisories is not None:
            extra = sorted(advisories - self.allowed_advisories)
            if extra:
                _reject(
                    Reason.ADVISORY_NOT_ALLOWED,
                    "policy.allowed_advisories",
                    ", ".join(extra),
                    f"only {', '.join(sorted(self.allowed_advisories))}",
                )

    def _check_binding(self, result: VerificationResult) -> None:
        claims = result.claims
        if self.report_data is not None or self.report_data_prefix is not None:
            observed = str(claims.get("report_data", "")).lower()
            if self.report_data is not None and not hmac.compare_digest(observed, self.report_data):
                _reject(Reason.REPORT_DATA_MISMATCH, "policy.report_data", observed, self.report_data)
            prefix = self.report_data_prefix
            if prefix is not None and not hmac.compare_digest(observed[: len(prefix)], prefix):
                _reject(Reason.REPORT_DATA_MISMATCH, "policy.report_data_prefix", observed, f"{prefix}...")
        if self.nonce is not None:
            raw = claims.get("nonce")
            if result.kind == EvidenceKind.SGX_IAS and isinstance(raw, str):
                observed = raw.encode().hex()
            else:
                observed = str(raw).lower() if raw is not None else ""
            if raw is None or not hmac.compare_digest(observed, self.nonce):
                _reject(Reason.NONCE_MISMATCH, "policy.nonce", observed or None, self.nonce)
        for key in ("user_data", "public_key"):
            want: str | None = getattr(self, key)
            if want is not None:
                got = claims.get(key)
                if not isinstance(got, str) or not hmac.compare_digest(got.lower(), want):
                    _reject(Reason.REPORT_DATA_MISMATCH, f"policy.{key}", got, want)

    def _check_age(self, result: VerificationResult, at: datetime | None) -> None:
        assert self.max_age is not None
        issued = _issued_at(result)
        if issued is None:
            _reject(
                Reason.KIND_NOT_ALLOWED,
                "policy.max_age",
                "evidence without a timestamp",
                "timestamped evidence",
            )
            return
        now = at or result.verified_at or datetime.now(UTC)
        age = (now - issued).total_seconds()
        if age < -CLOCK_SKEW_SECONDS:
            _reject(
                Reason.NOT_YET_VALID,
                "policy.max_age",
                f"issued {issued.isoformat()} (in the future by {-age:.0f} s)",
                f"issued at or before {now.isoformat()}",
            )
        if age > self.max_age:
            _reject(Reason.EVIDENCE_TOO_OLD, "policy.max_age", f"{age:.0f} s old", f"<= {self.max_age:g} s")


def _reject(reason: Reason, check: str, observed: str | None, expected: str | None) -> None:
    raise VerificationError(
        reason, "evidence does not satisfy the policy", check=check, observed=observed, expected=expected
    )


def _all_pcrs(result: VerificationResult) -> dict[int, str]:
    pcrs = result.details.get("pcrs") or result.claims.get("pcrs") or {}
    return {int(k): str(v).lower() for k, v in pcrs.items()}


def _issued_at(result: VerificationResult) -> datetime | None:
    ts = result.claims.get("timestamp")
    if result.kind == EvidenceKind.NITRO and isinstance(ts, int):
        return datetime.fromtimestamp(ts / 1000, tz=UTC)
    if result.kind == EvidenceKind.SGX_IAS and isinstance(ts, str):
        for fmt in ("%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S"):
            try:
                return datetime.strptime(ts, fmt).replace(tzinfo=UTC)
            except ValueError:
                continue
    return None


def _merge_value(name: str, a: Any, b: Any) -> Any:
    if name in ("allow_debug", "allow_simulation"):
        return bool(a and b)
    if name == "expected_pcrs":
        merged = dict(a)
        for idx, value in b.items():
            if idx in merged and merged[idx] != value:
                raise PolicyError(f"policies pin PCR {idx} to different values")
            merged[idx] = value
        return MappingProxyType(dict(sorted(merged.items())))
    if a is None:
        return b
    if b is None:
        return a
    if name == "denied_advisories":
        return a | b
    if isinstance(a, frozenset):
        both = a & b
        if not both:
            raise PolicyError(
                f"policies admit no common {name}", hint="the merged policy would accept nothing"
            )
        return both
    if name == "min_isv_svn":
        return max(a, b)
    if name == "max_age":
        return min(a, b)
    if name == "report_data_prefix":
        longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
        if not longer.startswith(shorter):
            raise PolicyError("policies require incompatible report_data prefixes")
        return longer
    if a != b:
        raise PolicyError(f"policies require different {name} values")
    return a


@dataclass(frozen=True)
class AllOf:
    """Accept only what every policy accepts; the first rejection is reported."""

    policies: tuple[VerificationPolicy, ...]

    def __init__(self, policies: Iterable[VerificationPolicy]) -> None:
        object.__setattr__(self, "policies", tuple(policies))
        if not self.policies:
            raise PolicyError("AllOf needs at least one policy (an empty AllOf would accept anything)")

    def check(self, result: VerificationResult, *, at: datetime | None = None) -> None:
        for p in self.policies:
            p.check(result, at=at)


@dataclass(frozen=True)
class AnyOf:
    """Accept what at least one policy accepts (e.g. one policy per evidence kind)."""

    policies: tuple[VerificationPolicy, ...]

    def __init__(self, policies: Iterable[VerificationPolicy]) -> None:
        object.__setattr__(self, "policies", tuple(policies))
        if not self.policies:
            raise PolicyError("AnyOf needs at least one policy (an empty AnyOf would accept nothing)")

    def check(self, result: VerificationResult, *, at: datetime | None = None) -> None:
        errors: list[VerificationError] = []
        for p in self.policies:
            try:
                p.check(result, at=at)
            except VerificationError as exc:
                errors.append(exc)
            else:
                return
        first = errors[0]
        raise VerificationError(
            first.reason,
            f"no policy of {len(errors)} accepts the evidence; first: {first.message}",
            check=first.check,
            observed=first.observed,
            expected=first.expected,
        )


def load_policy(source: Policy | Mapping[str, Any] | str | Path | None) -> Policy:
    """A policy from a Policy, a mapping, a YAML file path or ``None`` (the strict default)."""
    if source is None:
        return Policy()
    if isinstance(source, Policy):
        return source
    if isinstance(source, Mapping):
        return Policy.from_dict(source)
    return Policy.from_file(source)
