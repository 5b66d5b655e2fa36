"""DCAP collateral: offline bundles, an Intel PCS v4 / PCCS client, and the cache protocol.

Three ways to get a :class:`QuoteCollateral`:

* an offline bundle: the dcap-qvl ``QuoteCollateralV3`` JSON (:func:`load_collateral`) or a
  directory of raw PCS responses (:func:`load_pcs_directory`);
* :class:`PcsClient` against Intel PCS (``https://api.trustedservices.intel.com``) or a PCCS
  (same ``/sgx|tdx/certification/v4/`` paths under its base URL), with short timeouts so an
  offline host fails fast with a :class:`CollateralError` that names the URL and the cause;
* any of the above through a :class:`CollateralCache`, where a bundle stays until its earliest
  nextUpdate. The cache protocol is deliberately tiny (sync, ``str`` keys, ``bytes`` values) so a
  persistent store can implement it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

import httpx
from cryptography import x509

from r3e_tee.attestation.roots import INTEL_SGX_ROOT_CA_CRL_URL
from r3e_tee.errors import CollateralError, EvidenceFormatError
from r3e_tee.evidence.dcap_collateral import (
    QuoteCollateral,
    crl_to_der,
    decode_issuer_chain_header,
    parse_enclave_identity,
    parse_tcb_info,
    split_signed_response,
)
from r3e_tee.evidence.sgx_quote import Quote, parse_quote
from r3e_tee.evidence.x509_ext import SGX_EXTENSION_OID, parse_pck_extension, pem_chain_to_der

__all__ = [
    "INTEL_PCS_URL",
    "CollateralCache",
    "MemoryCollateralCache",
    "PcsClient",
    "QuoteCollateral",
    "collateral_expiry",
    "load_collateral",
    "load_pcs_directory",
]

INTEL_PCS_URL = "https://api.trustedservices.intel.com"

Tee = Literal["sgx", "tdx"]
PckCa = Literal["processor", "platform"]


# --- cache -------------------------------------------------------------------------------------


@runtime_checkable
class CollateralCache(Protocol):
    """Where fetched collateral waits until its nextUpdate. Implementations must not return an
    entry after ``expires_at``."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes, expires_at: datetime) -> None: ...


class MemoryCollateralCache:
    """In-process :class:`CollateralCache` (bounded; expired entries are dropped on read)."""

    def __init__(self, *, max_entries: int = 256, clock: Callable[[], datetime] | None = None) -> None:
        self._max = max_entries
        self._clock = clock or (lambda: datetime.now(UTC))
        self._data: dict[str, tuple[bytes, datetime]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry[1] < self._clock():
                del self._data[key]
                return None
            return entry[0]

    def put(self, key: str, value: bytes, expires_at: datetime) -> None:
        with self._lock:
            if key not in self._data and len(self._data) >= self._max:
                self._data.pop(min(self._data, key=lambda k: self._data[k][1]))
            self._data[key] = (bytes(value), expires_at)


def collateral_expiry(collateral: QuoteCollateral) -> datetime:
    """The earliest nextUpdate of the bundle's TCB Info, QE Identity and CRLs."""
    try:
        times = [
            parse_tcb_info(collateral.tcb_info).next_update,
            parse_enclave_identity(collateral.qe_identity).next_update,
        ]
        for der in (collateral.pck_crl, collateral.root_ca_crl):
            nxt = x509.load_der_x509_crl(der).next_update_utc
            if nxt is None:
                raise CollateralError("a CRL in the collateral has no nextUpdate")
            times.append(nxt)
    except (EvidenceFormatError, ValueError) as exc:
        raise CollateralError(f"collateral does not parse: {exc}") from None
    return min(times)


# --- offline bundles ---------------------------------------------------------------------------


def load_collateral(source: str | Path | bytes | Mapping[str, object]) -> QuoteCollateral:
    """Load a dcap-qvl QuoteCollateralV3 JSON bundle (path, JSON text/bytes, or mapping), or a
    directory of raw PCS responses (see :func:`load_pcs_directory`)."""
    try:
        if isinstance(source, Mapping):
            return QuoteCollateral.from_json(source)
        if isinstance(source, bytes):
            return QuoteCollateral.from_json(source)
        if isinstance(source, str) and source.lstrip().startswith("{"):
            return QuoteCollateral.from_json(source)
        path = Path(source)
        if path.is_dir():
            return load_pcs_directory(path)
        return QuoteCollateral.from_json(path.read_bytes())
    except OSError as exc:
        raise CollateralError(f"cannot read collateral: {exc}") from None
    except EvidenceFormatError as exc:
        raise CollateralError(f"collateral bundle does not parse: {exc}") from None


PCS_DIRECTORY_FILES = {
    "tcb_info_response": "tcb_info.json",
    "tcb_info_issuer_chain": "tcb_info_issuer_chain.pem",
    "qe_identity_response": "qe_identity.json",
    "qe_identity_issuer_chain": "qe_identity_issuer_chain.pem",
    "pck_crl": "pck_crl.der",
    "pck_crl_issuer_chain": "pck_crl_issuer_chain.pem",
    "root_ca_crl": "root_ca_crl.der",
}


def load_pcs_directory(directory: str | Path) -> QuoteCollateral:
    """Assemble collateral from raw PCS responses saved as files (names: ``PCS_DIRECTORY_FILES``;
    issuer chains as PEM or as the URL-encoded header value; CRLs as DER, PEM or hex)."""
    d = Path(directory)
    try:
        raw = {k: (d / name).read_bytes() for k, name in PCS_DIRECTORY_FILES.items()}
        return QuoteCollateral.from_pcs_responses(
            tcb_info_response=raw["tcb_info_response"],
            tcb_info_issuer_chain=raw["tcb_info_issuer_chain"].decode(),
            qe_identity_response=raw["qe_identity_response"],
            qe_identity_issuer_chain=raw["qe_identity_issuer_chain"].decode(),
            pck_crl=raw["pck_crl"],
            pck_crl_issuer_chain=raw["pck_crl_issuer_chain"].decode(),
            root_ca_crl=raw["root_ca_crl"],
        )
    except OSError as exc:
        raise CollateralError(f"cannot read PCS response files in {d}: {exc}") from None
    except (EvidenceFormatError, UnicodeDecodeError) as exc:
        raise CollateralError(f"PCS response files in {d} do not parse: {exc}") from None


# --- online ------------------------------------------------------------------------------------


def quote_collateral_key(quote: bytes | Quote) -> tuple[Tee, str, PckCa]:
    """(tee, FMSPC hex, PCK CA kind) that select the collateral of a quote."""
    q = quote if isinstance(quote, Quote) else parse_quote(quote)
    pem = q.pck_chain_pem
    if pem is None:
        raise CollateralError("the quote carries no PCK certificate chain; cannot tell its FMSPC")
    try:
        ders = pem_chain_to_der(pem, field="signature_data.certification_data")
        leaf = x509.load_der_x509_certificate(ders[0])
        ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID)).value
        fmspc = parse_pck_extension(ext.value).fmspc if isinstance(ext, x509.UnrecognizedExtension) else None
        issuer = leaf.issuer.rfc4514_string()
    except (ValueError, x509.ExtensionNotFound, EvidenceFormatError) as exc:
        raise CollateralError(f"cannot read the PCK certificate of the quote: {exc}") from None
    if fmspc is None:
        raise CollateralError("the PCK certificate has no SGX extension")
    ca: PckCa = "platform" if "Platform" in issuer else "processor"
    return ("tdx" if q.is_tdx else "sgx"), fmspc.hex().upper(), ca


class PcsClient:
    """Fetches collateral from Intel PCS v4 or a PCCS; optionally through a cache.

    ``connect_timeout`` / ``read_timeout`` are per request (httpx), so a fetch on an offline
    host fails within seconds with a :class:`CollateralError` naming the URL and why.
    """

    def __init__(
        self,
        base_url: str = INTEL_PCS_URL,
        *,
        api_key: str | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
        cache: CollateralCache | None = None,
        root_ca_crl_url: str | None = None,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        base = base_url.rstrip("/")
        for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
            base = base.removesuffix(suffix)
        self.base_url = base
        self.is_intel_pcs = urlsplit(base).hostname == urlsplit(INTEL_PCS_URL).hostname
        self.root_ca_crl_url = root_ca_crl_url or (
            INTEL_SGX_ROOT_CA_CRL_URL if self.is_intel_pcs else f"{base}/sgx/certification/v4/rootcacrl"
        )
        self.cache = cache
        self._clock = clock or (lambda: datetime.now(UTC))
        headers = {"Accept": "*/*", "User-Agent": "r3e-tee-service"}
        if api_key:
            headers["Ocp-Apim-Subscription-Key"] = api_key
        self._http = httpx.Client(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=connect_timeout),
            headers=headers,
            transport=transport,
            follow_redirects=True,
        )
        self._memo: dict[str, tuple[bytes, QuoteCollateral]] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PcsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public ---------------------------------------------------------------------------------

    def get_collateral_for_quote(self, quote: bytes | Quote) -> QuoteCollateral:
        """Collateral for the platform that produced ``quote`` (FMSPC and CA from its PCK cert)."""
        tee, fmspc, ca = quote_collateral_key(quote)
        return self.get_collateral(fmspc=fmspc, ca=ca, tee=tee)

    def get_collateral(self, *, fmspc: str | bytes, ca: PckCa, tee: Tee) -> QuoteCollateral:
        """Collateral for one FMSPC / PCK CA / TEE, from the cache while it is fresh."""
        fmspc_hex = fmspc.hex().upper() if isinstance(fmspc, bytes) else fmspc.upper()
        if ca not in ("processor", "platform") or tee not in ("sgx", "tdx"):
            raise CollateralError(f"bad collateral selector ca={ca!r} tee={tee!r}")
        key = f"dcap-collateral:v1:{self.base_url}:{tee}:{fmspc_hex}:{ca}"
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                memo = self._memo.get(key)
                if memo is not None and memo[0] == cached:
                    return memo[1]
                try:
                    coll = QuoteCollateral.from_json(cached)
                except EvidenceFormatError:
                    coll = None
                if coll is not None and collateral_expiry(coll) >= self._clock():
                    self._memo[key] = (cached, coll)
                    return coll
        coll = self._fetch(fmspc_hex, ca, tee)
        if self.cache is not None:
            blob = json.dumps(coll.to_json(), separators=(",", ":")).encode()
            self.cache.put(key, blob, collateral_expiry(coll))
            self._memo[key] = (blob, coll)
        return coll

    # -- HTTP -----------------------------------------------------------------------------------

    def _url(self, tee: Tee, path: str) -> str:
        return f"{self.base_url}/{tee}/certification/v4/{path}"

    def _get(self, url: str, params: Mapping[str, str] | None = None) -> httpx.Response:
        shown = url + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else "")
        try:
            resp = self._http.get(url, params=params)
        except httpx.TimeoutException as exc:
            raise CollateralError(
                f"GET {shown}: timed out ({type(exc).__name__})",
                hint="check network access to the PCS/PCCS or use an offline collateral bundle",
            ) from None
        except httpx.HTTPError as exc:
            raise CollateralError(
                f"GET {shown}: {type(exc).__name__}: {exc}",
                hint="check the PCS/PCCS URL and network access, or use an offline collateral bundle",
            ) from None
        if resp.status_code != 200:
            detail = resp.headers.get("Error-Message") or resp.text[:200].strip()
            raise CollateralError(f"GET {shown}: HTTP {resp.status_code} {resp.reason_phrase}: {detail}")
        return resp

    @staticmethod
    def _header(resp: httpx.Response, *names: str) -> str:
        for name in names:
            value = resp.headers.get(name)
            if value:
                return decode_issuer_chain_header(value)
        raise CollateralError(f"GET {resp.request.url}: response lacks the {names[0]} header")

    def _fetch(self, fmspc: str, ca: PckCa, tee: Tee) -> QuoteCollateral:
        crl_resp = self._get(self._url("sgx", "pckcrl"), {"ca": ca, "encoding": "der"})
        crl_chain = self._header(crl_resp, "SGX-PCK-CRL-Issuer-Chain")
        tcb_resp = self._get(self._url(tee, "tcb"), {"fmspc": fmspc})
        tcb_chain = self._header(tcb_resp, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain")
        qe_resp = self._get(self._url(tee, "qe/identity"))
        qe_chain = self._header(qe_resp, "SGX-Enclave-Identity-Issuer-Chain", "Enclave-Identity-Issuer-Chain")
        root_resp = self._get(self.root_ca_crl_url)
        try:
            tcb_text, tcb_sig = split_signed_response(tcb_resp.content, "tcbInfo")
            qe_text, qe_sig = split_signed_response(qe_resp.content, "enclaveIdentity")
            return QuoteCollateral(
                pck_crl_issuer_chain=crl_chain,
                root_ca_crl=crl_to_der(root_resp.content, field="rootcacrl"),
                pck_crl=crl_to_der(crl_resp.content, field="pckcrl"),
                tcb_info_issuer_chain=tcb_chain,
                tcb_info=tcb_text,
                tcb_info_signature=tcb_sig,
                qe_identity_issuer_chain=qe_chain,
                qe_identity=qe_text,
                qe_identity_signature=qe_sig,
            )
        except EvidenceFormatError as exc:
            raise CollateralError(f"collateral from {self.base_url} does not parse: {exc}") from None
