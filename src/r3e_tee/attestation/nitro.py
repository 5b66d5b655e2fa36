"""Verification of AWS Nitro Enclaves attestation documents.

Order of checks: parse (every field of the AWS spec) -> COSE ES384 signature by the leaf
``certificate`` -> ``cabundle[0]`` is the pinned AWS Nitro Enclaves Root-G1 (by public key) and
``cabundle`` chains down to the leaf -> every certificate valid at the verification time.
Reference values (PCRs, debug mode, nonce) are the policy's job, not this module's.

Caching: a parsed document and a verified chain are immutable facts about exact bytes, so a
``NitroVerifier`` keeps them in bounded LRU maps. The COSE signature is re-verified and every
validity window re-checked on every call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from r3e_tee.attestation.pinned_roots_nitro_ias import (
    AWS_NITRO_ROOT_G1,
    AnchorLike,
    LruCache,
    TrustAnchor,
    ValidatedChain,
    as_utc,
    load_certificate,
    spki_der,
    validate_chain,
)
from r3e_tee.attestation.result import EvidenceKind, VerificationResult
from r3e_tee.errors import Reason, VerificationError
from r3e_tee.evidence.cose import ecdsa_raw_to_der
from r3e_tee.evidence.nitro import NitroDocument, parse_nitro_document

__all__ = ["NitroVerifier", "verify_nitro"]

_ES384 = ec.ECDSA(hashes.SHA384())
_ChainKey = tuple[bytes, bytes, tuple[bytes, ...]]


@dataclass(frozen=True)
class _Prepared:
    """Everything about one exact document that cannot change: parse, signed bytes, claims."""

    doc: NitroDocument
    to_be_signed: bytes
    der_signature: bytes
    claims: Mapping[str, Any]
    details: Mapping[str, Any]
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> _Prepared:
        doc = parse_nitro_document(data)
        return cls(
            doc=doc,
            to_be_signed=doc.cose.to_be_signed(),
            der_signature=ecdsa_raw_to_der(doc.cose.signature, 48),
            claims=MappingProxyType(doc.claims()),
            details=MappingProxyType(
                {
                    "pcrs": {str(i): v.hex() for i, v in sorted(doc.pcrs.items())},
                    "issued_at": doc.issued_at.isoformat().replace("+00:00", "Z"),
                    "tagged": doc.cose.tagged,
                }
            ),
            sha256=hashlib.sha256(doc.raw).hexdigest(),
        )


class NitroVerifier:
    """Verifies Nitro documents against one trust anchor, caching parse and chain work."""

    def __init__(self, trust_root: AnchorLike | None = None, *, cache_size: int = 256) -> None:
        self.anchor = TrustAnchor.load(trust_root) if trust_root is not None else AWS_NITRO_ROOT_G1
        self._docs: LruCache[bytes, _Prepared] = LruCache(cache_size)
        self._chains: LruCache[_ChainKey, ValidatedChain] = LruCache(cache_size)

    def _prepare(self, data: bytes) -> _Prepared:
        data = data if type(data) is bytes else bytes(data)
        return self._docs.get_or_set(data, lambda: _Prepared.of(data))

    def parse(self, data: bytes) -> NitroDocument:
        return self._prepare(data).doc

    def verify(
        self,
        document: bytes | NitroDocument,
        *,
        at: datetime | None = None,
        trust_root: AnchorLike | None = None,
    ) -> VerificationResult:
        """Verify one document at ``at`` (default now); raises on any failed check."""
        when = as_utc(at)
        anchor = TrustAnchor.load(trust_root) if trust_root is not None else self.anchor
        prep = self._prepare(document.raw if isinstance(document, NitroDocument) else document)
        doc = prep.doc
        key: _ChainKey = (anchor.der, doc.certificate, doc.cabundle)
        chain = self._chains.get(key)

        # 1. COSE signature by the leaf key (cheapest decisive check; the chain comes next)
        if chain is not None:
            leaf_key = chain.leaf_public_key
        else:
            leaf_key = load_certificate(doc.certificate, field="nitro.payload.certificate").public_key()
        if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or leaf_key.curve.name != "secp384r1":
            raise VerificationError(
                Reason.BAD_SIGNATURE,
                "the document certificate does not carry a P-384 key, so it cannot sign ES384",
                check="nitro.cose-signature",
            )
        try:
            leaf_key.verify(prep.der_signature, prep.to_be_signed, _ES384)
        except InvalidSignature:
            raise VerificationError(
                Reason.BAD_SIGNATURE,
                "COSE_Sign1 ES384 signature does not verify with the document certificate's key",
                check="nitro.cose-signature",
            ) from None

        # 2. chain cabundle[0] (pinned root) -> ... -> certificate
        if chain is None:
            chain = self._chains.put(key, self._validate_chain(doc, anchor))

        # 3. validity windows at the verification time (never cached)
        chain.check_time(when, check="nitro.certificate-validity")

        return VerificationResult(
            kind=EvidenceKind.NITRO,
            verified_at=when,
            # fresh containers: callers may mutate a result without touching the cache
            claims={**prep.claims, "pcrs": dict(prep.claims["pcrs"])},
            debug=doc.debug,
            simulated=anchor.simulated,
            valid_until=chain.not_after,
            evidence_sha256=prep.sha256,
            details={
                **prep.details,
                "pcrs": dict(prep.details["pcrs"]),
                "certificate_subject": chain.leaf_subject,
                "trust_root": anchor.label,
            },
        )

    @staticmethod
    def _validate_chain(doc: NitroDocument, anchor: TrustAnchor) -> ValidatedChain:
        bundle = [
            load_certificate(c, field=f"nitro.payload.cabundle[{i}]") for i, c in enumerate(doc.cabundle)
        ]
        if spki_der(bundle[0]) != anchor.spki:
            raise VerificationError(
                Reason.BAD_CHAIN,
                "cabundle[0] is not the pinned root certificate",
                check="nitro.cabundle-root",
                observed=bundle[0].subject.rfc4514_string(),
                expected=anchor.label,
            )
        leaf = load_certificate(doc.certificate, field="nitro.payload.certificate")
        return validate_chain(leaf, list(reversed(bundle)), anchor, check="nitro.certificate-chain")


def verify_nitro(
    document: bytes, *, at: datetime | None = None, trust_root: AnchorLike | None = None
) -> VerificationResult:
    """One-shot verification with the pinned AWS root (or ``trust_root``); no caches kept."""
    return NitroVerifier(trust_root).verify(document, at=at)
