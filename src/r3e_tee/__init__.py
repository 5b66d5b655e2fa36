"""R3E TEE Service: enclaves, remote attestation, attestation-gated secrets, verifiable functions."""

__version__ = "0.1.0"
