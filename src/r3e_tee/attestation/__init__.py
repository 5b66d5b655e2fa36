"""Verification of attestation evidence: DCAP, Nitro, IAS, SEV-SNP, simulated; policy; tokens."""
