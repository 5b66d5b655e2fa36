"""Release policies: which attested enclaves may receive a secret.

A release policy is the attestation :class:`~r3e_tee.attestation.policy.Policy` (reference values:
``mrenclave``, ``mrsigner``, ``expected_pcrs``, ``mr_td``, ``kinds``, ``tcb_statuses``,
``allow_debug``, ``allow_simulation``, ...) plus two keys of its own, checked against the claims of
an attestation token the service signed::

    measurements: [<hex>]      # the token's measurement claim, whatever the kind (MRENCLAVE, PCR0, MR_TD)
    providers: [sgx, nitro]    # which provider launched the enclave
    mrsigner: [<hex>]          # "signer": any enclave signed by this key (SGX)
    expected_pcrs: {0: <hex>}  # or "pcrs:" (Nitro)
    allow_debug: false         # UNSAFE when true
    allow_simulation: false    # UNSAFE when true

A release policy must name the code (``measurements``, ``mrenclave``, ``mrsigner``, ``expected_pcrs``,
``mr_td``, ``measurement`` or an ``rtmr``): a policy that any enclave satisfies would hand the secret
to whatever code an operator launches. PCRs name the code only through PCR0, PCR2 or PCR8
(non-zero): PCR1, PCR3, PCR4 and the unused ones are shared by every image on an instance. Keys
that bind one piece of evidence (``nonce``, ``report_data``, ``user_data``, ``public_key``,
``max_age``) have no meaning for a secret and are refused.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from r3e_tee.attestation.policy import Policy, _TextNumbersLoader
from r3e_tee.attestation.result import EvidenceKind, VerificationResult
from r3e_tee.config import KNOWN_PROVIDERS
from r3e_tee.errors import PolicyError, VerificationError
from r3e_tee.keys.audit import canonical_json
from r3e_tee.keys.errors import ReleaseDenied

_ALIASES = {"pcrs": "expected_pcrs", "signer": "mrsigner", "mrsigners": "mrsigner", "mrenclaves": "mrenclave"}
_EVIDENCE_BOUND = ("nonce", "report_data", "report_data_prefix", "user_data", "public_key", "max_age")
_IDENTITY = (
    "measurements",
    "mrenclave",
    "mrsigner",
    "expected_pcrs",
    "mr_td",
    "measurement",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
)
_OWN_KEYS = ("measurements", "providers")
#: the Nitro PCRs that name the code: the image (0), the application (2) and the certificate it
#: was signed with (8, like mrsigner). PCR1 is the kernel every nitro-cli image shares, PCR3 and
#: PCR4 the parent instance's role and id, the others are zero: pinned alone, any code passes.
_CODE_PCRS = (0, 2, 8)


def _names_code_by_pcrs(pcrs: Mapping[int, str]) -> bool:
    """Whether ``pcrs`` pins a code PCR to a value a running (non-debug) enclave can have: a
    debug enclave reports zeros, so a zero pin names every debug enclave, not some code."""
    return any(idx in pcrs and pcrs[idx].strip("0") for idx in _CODE_PCRS)


def _hex_list(value: Any, key: str) -> frozenset[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise PolicyError(f"release policy key {key!r} must be a non-empty list of hex strings")
    out = set()
    for item in items:
        text = str(item).strip().lower().removeprefix("0x")
        if len(text) not in (64, 96) or any(c not in "0123456789abcdef" for c in text):
            raise PolicyError(f"release policy key {key!r}: {item!r} is not a 32- or 48-byte hex measurement")
        out.add(text)
    return frozenset(out)


@dataclass(frozen=True)
class ReleasePolicy:
    attestation: Policy
    measurements: frozenset[str] | None = None
    providers: frozenset[str] | None = None
    document: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, source: str = "release policy") -> ReleasePolicy:
        if not isinstance(data, Mapping) or not data:
            raise PolicyError(
                f"{source}: a release policy is required (a mapping of reference values)",
                hint="name the code at least: measurements: [<hex>] or mrsigner: [<hex>]",
            )
        rest: dict[str, Any] = {}
        measurements = providers = None
        for raw_key, value in data.items():
            key = _ALIASES.get(str(raw_key), str(raw_key))
            if key in _EVIDENCE_BOUND:
                raise PolicyError(
                    f"{source}: {raw_key!r} binds one piece of evidence and means nothing for a secret",
                    hint="name the code (measurements, mrsigner, expected_pcrs) instead",
                )
            if key in rest or (key == "measurements" and measurements) or (key == "providers" and providers):
                raise PolicyError(f"{source}: {raw_key!r} is given twice (directly and through an alias)")
            if value is None:
                continue
            if key == "measurements":
                measurements = _hex_list(value, "measurements")
            elif key == "providers":
                items = [value] if isinstance(value, str) else value
                if not isinstance(items, list | tuple) or not items:
                    raise PolicyError(f"{source}: 'providers' must be a non-empty list")
                for p in items:
                    if p not in KNOWN_PROVIDERS:
                        near = difflib.get_close_matches(str(p), KNOWN_PROVIDERS, n=1)
                        raise PolicyError(
                            f"{source}: unknown provider {p!r}",
                            hint=f"did you mean {near[0]!r}?"
                            if near
                            else f"known: {', '.join(KNOWN_PROVIDERS)}",
                        )
                providers = frozenset(str(p) for p in items)
            else:
                rest[key] = value
        try:
            attestation = Policy.from_dict(rest, source=source)
        except PolicyError as exc:
            if "unknown policy key" in exc.message:
                raise PolicyError(
                    exc.message.replace("unknown policy key", "unknown release policy key"),
                    hint=(exc.hint or "") + "; release policies also take measurements and providers",
                ) from None
            raise
        policy = cls(attestation, measurements, providers)
        canonical = policy._canonical()
        named = [k for k in _IDENTITY if k in canonical and k != "expected_pcrs"]
        if _names_code_by_pcrs(policy.attestation.expected_pcrs):
            named.append("expected_pcrs")
        if not named:
            raise PolicyError(
                f"{source}: the policy does not name the code that may receive the secret"
                + (
                    f" (PCRs {', '.join(map(str, policy.attestation.expected_pcrs))} do not: only a "
                    "non-zero PCR0, PCR2 or PCR8 names the code)"
                    if policy.attestation.expected_pcrs
                    else ""
                ),
                hint="add measurements: [<hex>] (the enclave measurement), mrsigner: [<hex>] or "
                "expected_pcrs: {0: <hex>}",
            )
        object.__setattr__(policy, "document", policy._canonical())
        return policy

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "release policy") -> ReleasePolicy:
        try:
            data = yaml.load(text, Loader=_TextNumbersLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise PolicyError(f"{source}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> ReleasePolicy:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read release policy file {p}: {exc}") from None
        return cls.from_yaml(text, source=str(p))

    def _canonical(self) -> dict[str, Any]:
        out = dict(self.attestation.to_dict())
        if self.measurements:
            out["measurements"] = sorted(self.measurements)
        if self.providers:
            out["providers"] = sorted(self.providers)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dict(self.document)

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.document).encode()).hexdigest()

    def unsafe_choices(self) -> list[str]:
        return self.attestation.unsafe_choices()

    # -- checking ---------------------------------------------------------------------------------

    def check(self, claims: Mapping[str, Any], *, secret: str) -> None:
        """Raise :class:`ReleaseDenied` (with the policy reason) unless the token claims satisfy it."""
        provider = str(claims.get("provider", ""))
        if self.providers is not None and provider not in self.providers:
            raise ReleaseDenied(
                "provider-not-allowed",
                f"secret {secret!r} is not released to enclaves of provider {provider!r}",
                secret=secret,
                check="policy.providers",
                observed=provider,
                expected=", ".join(sorted(self.providers)),
            )
        try:
            self.attestation.check(result_from_claims(claims))
        except VerificationError as exc:
            raise ReleaseDenied(
                exc.reason.value,
                f"the enclave does not satisfy the release policy of secret {secret!r}",
                secret=secret,
                check=exc.check,
                observed=exc.observed,
                expected=exc.expected,
            ) from None
        if self.measurements is not None:
            observed = str(claims.get("measurement") or "").lower()
            if not any(hmac.compare_digest(observed, m) for m in self.measurements):
                raise ReleaseDenied(
                    "measurement-mismatch",
                    f"the enclave does not satisfy the release policy of secret {secret!r}",
                    secret=secret,
                    check="policy.measurements",
                    observed=observed or None,
                    expected=" or ".join(sorted(self.measurements)),
                )


def result_from_claims(claims: Mapping[str, Any]) -> VerificationResult:
    """The verification result an attestation token states, for a policy check."""
    tee = claims.get("tee")
    tee = dict(tee) if isinstance(tee, Mapping) else {}
    try:
        kind = EvidenceKind(str(claims.get("evidence_kind")))
    except ValueError:
        raise ReleaseDenied(
            "invalid-token", f"the token names an unknown evidence kind {claims.get('evidence_kind')!r}"
        ) from None
    iat = claims.get("iat")
    verified = datetime.fromtimestamp(float(iat), UTC) if isinstance(iat, int | float) else datetime.now(UTC)
    details: dict[str, Any] = {}
    if isinstance(tee.get("pcrs"), Mapping):
        details["pcrs"] = tee["pcrs"]
    advisories = claims.get("advisories")
    return VerificationResult(
        kind=kind,
        verified_at=verified,
        claims=tee,
        tcb_status=claims.get("tcb_status") if isinstance(claims.get("tcb_status"), str) else None,
        advisories=tuple(str(a) for a in advisories) if isinstance(advisories, list) else (),
        debug=bool(claims.get("debug")),
        simulated=bool(claims.get("simulated")),
        details=details,
    )
