# The image that runs INSIDE a Nitro Enclave: the R3E enclave runtime on its own, no network, no
# disk; it talks to its worker over vsock and gets evidence from /dev/nsm. nitro-cli turns it into
# an EIF (deploy/nitro/build-eif.sh), whose PCR0-PCR2 are the reference values of the attestation
# policy. Any change here changes PCR0: rebuild, and publish the new measurements.
ARG BASE=r3e-tee:0.1.0
FROM ${BASE}
# The key broker this enclave accepts secrets and its sealing key from (GET /v1/keys, broker_key
# of the service it serves): measured into PCR0 with the rest of the image. Empty, the enclave
# accepts no secrets; "unsafe-unpinned" makes it take the key its host names (runtime/secrets.py).
ARG BROKER_KEY=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONHASHSEED=0 \
    R3E_TEE_BROKER_KEY=${BROKER_KEY}
USER 10001:10001
ENTRYPOINT ["python", "-m", "r3e_tee.runtime.enclave"]
# no HTTP endpoint inside an enclave: its worker reports its health
HEALTHCHECK NONE
