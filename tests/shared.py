"""Values and helpers several test folders use (importable as tests.shared)."""

from __future__ import annotations

import socket

# the deployment guide's ConfigMap content, verbatim
GUIDE_CONFIGMAP = """\
providers:
  - name: sgx
    enabled: true
    attestation:
      service: "https://api.trustedservices.intel.com/sgx/attestation/v4"
      apiKey: "${SGX_API_KEY}"
  - name: nitro
    enabled: true
    attestation:
      service: "https://vsock.nitro-enclaves.amazonaws.com"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
