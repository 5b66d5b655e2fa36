"""Verification of Intel IAS (EPID) attestation verification reports, and an IAS client.

Order of checks: parse -> the report signing certificate chains to the pinned Intel SGX
Attestation Report Signing CA (by public key) -> every certificate valid at the verification
time -> RSA-SHA256 (PKCS#1 v1.5) report signature over the exact JSON bytes ->
``isvEnclaveQuoteStatus``: revoked and invalid quotes are rejected here; the statuses under which
the quote verified (OK, GROUP_OUT_OF_DATE, CONFIGURATION_NEEDED, SW_HARDENING_NEEDED,
CONFIGURATION_AND_SW_HARDENING_NEEDED) become ``tcb_status`` for the policy to judge.

``IasClient`` talks to the configured IAS (``POST {base}/report`` with the
``Ocp-Apim-Subscription-Key`` header). Its answers are parsed, never trusted: callers verify
them like any other report. Every request has an overall deadline, so it never hangs.
"""

from __future__ import annotations

import base64
import hashlib
import time
from datetime import datetime

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from r3e_tee.attestation.pinned_roots_nitro_ias import (
    INTEL_IAS_REPORT_SIGNING_CA,
    AnchorLike,
    LruCache,
    TrustAnchor,
    ValidatedChain,
    as_utc,
    load_certificate,
    validate_chain,
)
from r3e_tee.attestation.result import EvidenceKind, VerificationResult
from r3e_tee.errors import CollateralError, EvidenceFormatError, Reason, VerificationError
from r3e_tee.evidence.ias import IasReport, parse_ias_evidence, parse_ias_report

__all__ = ["DEFAULT_IAS_URL", "IasClient", "IasVerifier", "verify_ias"]

DEFAULT_IAS_URL = "https://api.trustedservices.intel.com/sgx/attestation/v4"
_REJECTED_STATUS = {
    "SIGNATURE_INVALID": Reason.BAD_SIGNATURE,
    "GROUP_REVOKED": Reason.REVOKED,
    "SIGNATURE_REVOKED": Reason.REVOKED,
    "KEY_REVOKED": Reason.REVOKED,
    "SIGRL_VERSION_MISMATCH": Reason.COLLATERAL_MISMATCH,
}
_ChainKey = tuple[bytes, tuple[bytes, ...]]


class IasVerifier:
    """Verifies IAS reports against one trust anchor, caching parse and chain work."""

    def __init__(self, trust_root: AnchorLike | None = None, *, cache_size: int = 256) -> None:
        self.anchor = TrustAnchor.load(trust_root) if trust_root is not None else INTEL_IAS_REPORT_SIGNING_CA
        self._reports: LruCache[bytes, IasReport] = LruCache(cache_size)
        self._chains: LruCache[_ChainKey, ValidatedChain] = LruCache(cache_size)

    def parse(self, data: bytes) -> IasReport:
        data = bytes(data)
        return self._reports.get_or_set(data, lambda: parse_ias_evidence(data))

    def verify(
        self,
        evidence: bytes | IasReport,
        *,
        at: datetime | None = None,
        trust_root: AnchorLike | None = None,
    ) -> VerificationResult:
        when = as_utc(at)
        anchor = TrustAnchor.load(trust_root) if trust_root is not None else self.anchor
        report = evidence if isinstance(evidence, IasReport) else self.parse(evidence)

        key: _ChainKey = (anchor.der, report.signing_chain)
        chain = self._chains.get(key)
        if chain is None:
            certs = [
                load_certificate(c, field=f"ias.signing_cert[{i}]")
                for i, c in enumerate(report.signing_chain)
            ]
            chain = self._chains.put(
                key, validate_chain(certs[0], certs[1:], anchor, check="ias.signing-certificate-chain")
            )
        chain.check_time(when, check="ias.signing-certificate-validity")

        public_key = chain.leaf_public_key
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise VerificationError(
                Reason.BAD_SIGNATURE,
                "the report signing certificate does not carry an RSA key",
                check="ias.report-signature",
            )
        try:
            public_key.verify(report.signature, report.body, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise VerificationError(
                Reason.BAD_SIGNATURE,
                "X-IASReport-Signature does not verify over the report body",
                check="ias.report-signature",
            ) from None

        status = report.isv_enclave_quote_status
        if status in _REJECTED_STATUS:
            raise VerificationError(
                _REJECTED_STATUS[status],
                "IAS did not accept the quote",
                check="ias.isvEnclaveQuoteStatus",
                observed=status,
                expected="OK or a non-revoked TCB status",
            )
        q = report.quote
        return VerificationResult(
            kind=EvidenceKind.SGX_IAS,
            verified_at=when,
            claims=report.claims(),
            tcb_status=status,
            advisories=report.advisory_ids,
            debug=q.debug,
            simulated=anchor.simulated,
            valid_until=chain.not_after,
            evidence_sha256=hashlib.sha256(report.body).hexdigest(),
            details={
                "report_id": report.id,
                "report_version": report.version,
                "issued_at": report.issued_at.isoformat().replace("+00:00", "Z"),
                "container": report.container,
                "attributes": q.attributes.hex(),
                "cpu_svn": q.cpu_svn.hex(),
                "misc_select": q.misc_select,
                "epid_group_id": q.epid_group_id[::-1].hex(),
                "quote_version": q.version,
                "sign_type": q.sign_type,
                "platform_info_blob": report.platform_info_blob,
                "advisory_url": report.advisory_url,
                "epid_pseudonym": report.epid_pseudonym,
                "ra_tls_public_key_sha256": (
                    hashlib.sha256(report.ra_tls_public_key).hexdigest() if report.ra_tls_public_key else None
                ),
                "trust_root": anchor.label,
            },
        )


def verify_ias(
    evidence: bytes, *, at: datetime | None = None, trust_root: AnchorLike | None = None
) -> VerificationResult:
    """One-shot verification with the pinned Intel CA (or ``trust_root``); no caches kept."""
    return IasVerifier(trust_root).verify(evidence, at=at)


class IasClient:
    """Client for the IAS attestation API (v4/v5): ``/report`` and ``/sigrl``.

    ``timeout`` is an overall deadline per request (connect + send + the whole answer).
    The API key is sent only as the ``Ocp-Apim-Subscription-Key`` header and never appears in
    an error message.
    """

    MAX_RESPONSE = 256 * 1024

    def __init__(
        self,
        base_url: str = DEFAULT_IAS_URL,
        api_key: str = "",
        *,
        timeout: float = 10.0,
        verify_tls: bool = True,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("IAS base URL must be http(s)://")
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout = timeout
        self.verify_tls = verify_tls

    @classmethod
    def from_provider(cls, attestation: object, *, timeout: float = 10.0) -> IasClient:
        """From a provider's ``attestation`` block of tee-config.yaml (``service``, ``apiKey``)."""
        url = getattr(attestation, "service", None) or DEFAULT_IAS_URL
        key = getattr(attestation, "api_key", None)
        getter = getattr(key, "get_secret_value", None)
        secret = getter() if callable(getter) else (key or "")
        if not isinstance(url, str) or not isinstance(secret, str):
            raise ValueError("attestation.service and attestation.apiKey must be strings")
        return cls(url, secret, timeout=timeout)

    def __repr__(self) -> str:
        return f"IasClient({self.base_url!r}, api_key=***)"

    def report(self, quote: bytes, *, nonce: str | None = None) -> IasReport:
        """Submit an EPID quote; return the parsed (unverified) report IAS signed."""
        if nonce is not None and len(nonce) > 32:
            raise ValueError("IAS nonce must be at most 32 characters")
        body: dict[str, str] = {"isvEnclaveQuote": base64.b64encode(quote).decode()}
        if nonce is not None:
            body["nonce"] = nonce
        status, headers, content = self._request("POST", "/report", json_body=body)
        if status == 400:
            raise EvidenceFormatError(
                "IAS rejected the quote as an invalid attestation evidence payload (HTTP 400)",
                field="isvEnclaveQuote",
            )
        self._raise_for_status(status, headers)
        signature = headers.get("x-iasreport-signature")
        certs = headers.get("x-iasreport-signing-certificate")
        if not signature or not certs:
            raise CollateralError(
                "IAS answer lacks X-IASReport-Signature or X-IASReport-Signing-Certificate",
                hint="is attestation.service really an IAS endpoint?",
            )
        return parse_ias_report(content, signature, certs, container="http")

    def sigrl(self, epid_group_id: bytes) -> bytes:
        """The EPID signature revocation list of a group (empty when there is none)."""
        gid = epid_group_id[::-1].hex() if len(epid_group_id) == 4 else epid_group_id.hex()
        status, headers, content = self._request("GET", f"/sigrl/{gid}")
        self._raise_for_status(status, headers)
        return base64.b64decode(content) if content.strip() else b""

    def _raise_for_status(self, status: int, headers: httpx.Headers) -> None:
        request_id = headers.get("request-id", "-")
        if status == 200:
            return
        if status == 401:
            raise CollateralError(
                f"IAS refused the API key (HTTP 401, request {request_id})",
                hint="check the provider's attestation.apiKey (an IAS primary or secondary key)",
            )
        if status == 404:
            raise CollateralError(
                f"IAS endpoint not found at {self.base_url} (HTTP 404)",
                hint="attestation.service should end with /sgx/attestation/v4 (or v5)",
            )
        raise CollateralError(
            f"IAS answered HTTP {status} (request {request_id})",
            hint="IAS is unavailable or overloaded; retry later",
        )

    def _request(
        self, method: str, path: str, *, json_body: dict[str, str] | None = None
    ) -> tuple[int, httpx.Headers, bytes]:
        url = self.base_url + path
        deadline = time.monotonic() + self.timeout
        headers = {"Ocp-Apim-Subscription-Key": self._api_key, "Accept": "application/json"}
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(self.timeout), verify=self.verify_tls) as client,
                client.stream(method, url, headers=headers, json=json_body) as resp,
            ):
                chunks: list[bytes] = []
                size = 0
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    if size > self.MAX_RESPONSE:
                        raise CollateralError(f"IAS answer exceeds {self.MAX_RESPONSE} bytes")
                    if time.monotonic() > deadline:
                        raise CollateralError(
                            f"IAS at {self.base_url} did not finish answering within {self.timeout:g} s",
                            hint="check the network path to IAS",
                        )
                    chunks.append(chunk)
                return resp.status_code, resp.headers, b"".join(chunks)
        except httpx.TimeoutException:
            raise CollateralError(
                f"IAS at {self.base_url} did not answer within {self.timeout:g} s",
                hint="check attestation.service and the network path to IAS",
            ) from None
        except httpx.HTTPError as exc:
            raise CollateralError(
                f"IAS at {self.base_url} is unreachable ({type(exc).__name__})",
                hint="check attestation.service, DNS and the network path to IAS",
            ) from None
