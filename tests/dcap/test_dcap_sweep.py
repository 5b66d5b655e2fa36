"""Systematic single-byte sweep over the signed regions of every valid real quote.

Every byte of the header, body (incl. the v5 body descriptor), quote signature, attestation key,
QE report, QE report signature and QE authentication data is changed in turn; each variant must
be rejected with a typed error (format or verification), never accepted and never crash.
"""

from __future__ import annotations

from dcap_vectors import Case

from r3e_tee.attestation.dcap import DcapVerifier, VerificationCache
from r3e_tee.errors import EvidenceFormatError, VerificationError
from r3e_tee.evidence.sgx_quote import parse_quote


def regions(quote: bytes) -> dict[str, range]:
    q = parse_quote(quote)
    signed = len(q.signed_region)
    sig = signed + 4  # after the signature data length
    out = {
        "header": range(0, 48),
        "body": range(48, signed),
        "signature": range(sig, sig + 64),
        "attestation_key": range(sig + 64, sig + 128),
    }
    # v3: the QE report follows the attestation key; v4/v5: it opens the type-6 payload
    qe = sig + 128 if q.header.version == 3 else q.signature_data.certification.offset
    out["qe_report"] = range(qe, qe + 384)
    out["qe_report_signature"] = range(qe + 384, qe + 448)
    auth_len = len(q.signature_data.qe_auth_data)
    out["qe_auth_data"] = range(qe + 450, qe + 450 + auth_len)
    assert quote[qe : qe + 384] == q.signature_data.qe_report.raw
    assert quote[qe + 450 : qe + 450 + auth_len] == q.signature_data.qe_auth_data
    return out


def test_single_byte_sweep(valid_cases: list[Case]) -> None:
    assert len(valid_cases) >= 5
    cache = VerificationCache()
    total = 0
    for case in valid_cases:
        verifier = DcapVerifier(case.root, cache=cache)
        verifier.verify(case.quote, case.collateral, at=case.at)  # the original is valid
        for name, span in regions(case.quote).items():
            for off in span:
                mutated = bytearray(case.quote)
                mutated[off] ^= 0x5A
                try:
                    verifier.verify(bytes(mutated), case.collateral, at=case.at)
                except (VerificationError, EvidenceFormatError):
                    total += 1
                    continue
                raise AssertionError(f"{case.id}: change at {off} ({name}) was accepted")
    assert total > 5000


def test_fuzz_whole_quote_including_certification_data(valid_cases: list[Case]) -> None:
    """Mutations anywhere (also the unsigned PEM chain and length fields) give typed errors only."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from r3e_tee.errors import CollateralError

    case = next(c for c in valid_cases if c.id == "sgx-dcap/phala/sgx_quote")
    verifier = DcapVerifier(case.root)

    @settings(max_examples=400, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, len(case.quote) - 1), st.integers(0, 255)), min_size=1, max_size=4)
    )
    def run(edits: list[tuple[int, int]]) -> None:
        mutated = bytearray(case.quote)
        for off, val in edits:
            mutated[off] = val
        try:
            verifier.verify(bytes(mutated), case.collateral, at=case.at)
        except (VerificationError, EvidenceFormatError, CollateralError):
            pass

    run()


def test_sweep_certification_data(valid_cases: list[Case]) -> None:
    """Every byte of the PCK chain PEM of one quote, with a stride: typed errors or acceptance
    (bytes outside the base64 armour do not matter), never a crash."""
    from r3e_tee.errors import CollateralError

    case = next(c for c in valid_cases if c.id == "tdx-dcap/phala/tdx_quote")
    q = parse_quote(case.quote)
    pck = q.signature_data.certification.pck_chain
    assert pck is not None
    verifier = DcapVerifier(case.root)
    for off in range(pck.offset, pck.offset + len(pck.data), 3):
        mutated = bytearray(case.quote)
        mutated[off] ^= 0x21
        try:
            verifier.verify(bytes(mutated), case.collateral, at=case.at)
        except (VerificationError, EvidenceFormatError, CollateralError):
            pass
