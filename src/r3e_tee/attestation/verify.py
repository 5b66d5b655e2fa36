"""One entry point for every kind of evidence: detect, verify, apply the policy.

``verify_evidence(data)`` accepts evidence as it arrives (binary, hex, base64, PEM, a certificate
container, a SCALE-wrapped attestation), detects its kind by structure, routes it to the kind's
verifier (DCAP, Nitro, IAS, SEV-SNP) and then applies the reference-value policy (the strict
default when none is given). The verdict is a :class:`VerificationResult` or an exception:
``EvidenceFormatError`` (unusable input), ``VerificationError`` (rejected, with reason, check,
observed and expected), ``CollateralError`` (collateral missing or unusable).

:class:`Verifier` holds one verifier per kind so their caches (parsed evidence, verified chains
and collateral, all keyed by exact bytes) survive between calls; the service keeps one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path, PurePath
from typing import Any

from r3e_tee.attestation.ias import IasVerifier
from r3e_tee.attestation.nitro import NitroVerifier
from r3e_tee.attestation.pinned_roots_nitro_ias import AnchorLike, TrustAnchor, as_utc
from r3e_tee.attestation.policy import Policy, VerificationPolicy, load_policy
from r3e_tee.attestation.result import EvidenceKind, VerificationResult
from r3e_tee.attestation.snp import SnpVerifier
from r3e_tee.errors import CollateralError, Reason, VerificationError
from r3e_tee.evidence.encoding import DecodedEvidence, decode_evidence

__all__ = ["KIND_ALIASES", "Inspection", "Verifier", "inspect_evidence", "resolve_kind", "verify_evidence"]

KIND_ALIASES: dict[str, EvidenceKind | None] = {
    "auto": None,
    "sgx": EvidenceKind.SGX_DCAP,
    "tdx": EvidenceKind.TDX_DCAP,
    "nitro": EvidenceKind.NITRO,
    "ias": EvidenceKind.SGX_IAS,
    "snp": EvidenceKind.SEV_SNP,
    **{k.value: k for k in EvidenceKind},
}
PolicyLike = VerificationPolicy | Mapping[str, Any] | str | None
CollateralProvider = Callable[[EvidenceKind, bytes], Any]


def resolve_kind(kind: str | EvidenceKind | None) -> EvidenceKind | None:
    """``auto``/None -> None; short names (sgx, tdx, nitro, ias, snp) and full kind values."""
    if kind is None or isinstance(kind, EvidenceKind):
        return kind
    try:
        return KIND_ALIASES[kind.lower()]
    except KeyError:
        raise ValueError(f"unknown evidence kind {kind!r}; use one of {', '.join(KIND_ALIASES)}") from None


@dataclass(frozen=True)
class Inspection:
    """What a parser sees in evidence, without any verification (never trust these claims)."""

    kind: EvidenceKind
    encoding: str
    claims: Mapping[str, Any] | None


class Verifier:
    """Per-kind verifiers with their caches, the trust anchors and the default policy.

    ``trust_roots`` overrides the pinned anchor of a kind. ``simulation_roots`` adds the
    simulation provider's anchors: evidence that chains only to one of them verifies with
    ``simulated=True``, which the policy rejects unless ``allow_simulation``.
    ``collateral_provider(kind, evidence)`` is consulted when DCAP/SNP evidence comes without
    collateral (e.g. the PCS/PCCS client with its cache).
    """

    def __init__(
        self,
        *,
        trust_roots: Mapping[EvidenceKind, AnchorLike] | None = None,
        simulation_roots: Mapping[EvidenceKind, AnchorLike] | None = None,
        policy: PolicyLike = None,
        collateral_provider: CollateralProvider | None = None,
        cache_size: int = 256,
    ) -> None:
        roots = dict(trust_roots or {})
        self.policy: VerificationPolicy = _as_policy(policy)
        self.nitro = NitroVerifier(roots.get(EvidenceKind.NITRO), cache_size=cache_size)
        self.ias = IasVerifier(roots.get(EvidenceKind.SGX_IAS), cache_size=cache_size)
        self.snp = SnpVerifier(roots.get(EvidenceKind.SEV_SNP), cache_size=cache_size)
        dcap_root = roots.get(EvidenceKind.SGX_DCAP) or roots.get(EvidenceKind.TDX_DCAP)
        self.dcap_anchor = TrustAnchor.load(dcap_root) if dcap_root is not None else None
        self._dcap_cache: Any = None
        self.simulation_roots = {
            k: TrustAnchor.load(v, simulated=True)
            if not isinstance(v, TrustAnchor)
            else replace(v, simulated=True)
            for k, v in (simulation_roots or {}).items()
        }
        self.collateral_provider = collateral_provider

    def _verify_dcap(
        self, quote: bytes, collateral: Any, anchor: TrustAnchor | None, at: datetime
    ) -> VerificationResult:
        # imported here: DCAP is its own module with its own life; the other kinds never need it
        from r3e_tee.attestation import dcap

        if self._dcap_cache is None:
            self._dcap_cache = dcap.VerificationCache()
        anchor = anchor or self.dcap_anchor
        result = dcap.verify_dcap(
            quote,
            collateral,
            at=at,
            trust_root=anchor.certificate if anchor is not None else None,
            cache=self._dcap_cache,
        )
        if anchor is not None and anchor.simulated and not result.simulated:
            result = replace(result, simulated=True)
        return result

    # -- public ---------------------------------------------------------------------------------

    def verify(
        self,
        data: bytes,
        *,
        kind: str | EvidenceKind | None = "auto",
        collateral: Any = None,
        trust_root: AnchorLike | None = None,
        at: datetime | None = None,
        policy: PolicyLike = None,
    ) -> VerificationResult:
        """Verify ``data`` at ``at`` (default now) and apply ``policy`` (default: this verifier's)."""
        when = as_utc(at)
        wanted = resolve_kind(kind)
        decoded = decode_evidence(data, kind=wanted.value if wanted else None)
        ev_kind = EvidenceKind(decoded.kind)
        anchor = TrustAnchor.load(trust_root) if trust_root is not None else None
        try:
            result = self._verify_kind(ev_kind, decoded, collateral, anchor, when)
        except VerificationError as exc:
            sim = self.simulation_roots.get(ev_kind)
            if anchor is not None or sim is None or exc.reason != Reason.BAD_CHAIN:
                raise
            result = self._verify_kind(ev_kind, decoded, collateral, sim, when)
        chosen = _as_policy(policy) if policy is not None else self.policy
        chosen.check(result, at=when)
        details = dict(result.details)
        details["encoding"] = decoded.encoding_label
        if isinstance(chosen, Policy):
            details["policy"] = chosen.to_dict()
            if chosen.unsafe_choices():
                details["unsafe"] = chosen.unsafe_choices()
        return replace(result, details=details)

    def inspect(self, data: bytes, *, kind: str | EvidenceKind | None = "auto") -> Inspection:
        """Parse without verifying: the kind, the encoding and the claims a parser sees."""
        wanted = resolve_kind(kind)
        decoded = decode_evidence(data, kind=wanted.value if wanted else None)
        ev_kind = EvidenceKind(decoded.kind)
        claims: Mapping[str, Any] | None
        if ev_kind == EvidenceKind.NITRO:
            claims = self.nitro.parse(decoded.data).claims()
        elif ev_kind == EvidenceKind.SGX_IAS:
            claims = self.ias.parse(decoded.data).claims()
        elif ev_kind == EvidenceKind.SEV_SNP:
            claims = self.snp.parse(decoded.data).claims()
        else:
            claims = _dcap_claims(decoded.data)
        return Inspection(ev_kind, decoded.encoding_label, claims)

    # -- routing --------------------------------------------------------------------------------

    def _verify_kind(
        self,
        kind: EvidenceKind,
        decoded: DecodedEvidence,
        collateral: Any,
        anchor: TrustAnchor | None,
        at: datetime,
    ) -> VerificationResult:
        if kind == EvidenceKind.NITRO:
            _no_collateral(kind, collateral)
            return self.nitro.verify(decoded.data, at=at, trust_root=anchor)
        if kind == EvidenceKind.SGX_IAS:
            _no_collateral(kind, collateral)
            return self.ias.verify(decoded.data, at=at, trust_root=anchor)
        if collateral is None and self.collateral_provider is not None:
            collateral = self.collateral_provider(kind, decoded.data)
        if isinstance(collateral, PurePath) and kind != EvidenceKind.SEV_SNP:
            try:
                collateral = Path(collateral).read_bytes()
            except OSError as exc:
                raise CollateralError(f"cannot read collateral {collateral}: {exc.strerror}") from None
        if kind == EvidenceKind.SEV_SNP:
            return self.snp.verify(decoded.data, collateral, at=at, trust_root=anchor)
        if collateral is None:
            raise CollateralError(
                "DCAP verification needs collateral (TCB Info, QE Identity, CRLs and their chains)",
                hint="pass --collateral with a dcap-qvl QuoteCollateralV3 JSON, or configure PCS/PCCS",
            )
        # the quote's own header decides SGX vs TDX; --kind sgx|tdx only selects DCAP
        return self._verify_dcap(decoded.data, collateral, anchor, at)


def _no_collateral(kind: EvidenceKind, collateral: Any) -> None:
    if collateral is not None:
        raise CollateralError(
            f"{kind.value} evidence carries its own certificates; no collateral is used",
            hint="drop --collateral",
        )


def _as_policy(policy: PolicyLike) -> VerificationPolicy:
    if policy is None:
        return Policy()
    if isinstance(policy, (Mapping, str)):
        return load_policy(policy)
    return policy


def _dcap_claims(quote: bytes) -> Mapping[str, Any] | None:
    """Unverified DCAP claims, from the DCAP module's ``quote_claims``."""
    from r3e_tee.attestation import dcap

    return dict(dcap.quote_claims(quote))


_DEFAULT: Verifier | None = None


def verify_evidence(
    data: bytes,
    *,
    kind: str | EvidenceKind | None = "auto",
    collateral: Any = None,
    trust_root: AnchorLike | None = None,
    at: datetime | None = None,
    policy: PolicyLike = None,
) -> VerificationResult:
    """Detect, verify and apply ``policy`` (the strict default when ``None``).

    Uses a process-wide :class:`Verifier`, so repeated calls reuse verified chains and
    collateral (cached by exact bytes; validity windows are still checked every call).
    """
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Verifier()
    return _DEFAULT.verify(
        data, kind=kind, collateral=collateral, trust_root=trust_root, at=at, policy=policy
    )


def inspect_evidence(data: bytes, *, kind: str | EvidenceKind | None = "auto") -> Inspection:
    """Parse without verifying (for display and debugging; never for decisions)."""
    return Verifier().inspect(data, kind=kind)
