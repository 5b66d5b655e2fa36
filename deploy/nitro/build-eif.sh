#!/usr/bin/env bash
# Build the Nitro Enclave image file (EIF) of the R3E enclave runtime and record its measurements.
#
#   R3E_TEE_BROKER_KEY=<broker_key of GET /v1/keys> deploy/nitro/build-eif.sh [TAG]
#
# The broker key is built into the image (and so into PCR0): the enclave then opens only secrets
# and sealing keys that broker sealed. R3E_TEE_BROKER_KEY=unsafe-unpinned builds an image that
# takes whatever key its host names instead (its host could plant secrets): tests only.
# Needs docker and nitro-cli with its blobs (/usr/share/nitro_enclaves/blobs): an EC2 instance with
# the aws-nitro-enclaves-cli package, or any Linux host with nitro-cli installed. Writes
#   deploy/nitro/out/r3e-tee-runtime.eif   copied into the nitro image (deploy/Dockerfile --target nitro)
#   deploy/nitro/out/measurements.json     PCR0, PCR1, PCR2: the reference values for the attestation policy
set -euo pipefail

cd "$(dirname "$0")/../.."
tag="${1:-$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')}"
out=deploy/nitro/out

for tool in docker nitro-cli; do
    command -v "$tool" >/dev/null || { echo "build-eif: $tool not found" >&2; exit 1; }
done

docker build -f deploy/Dockerfile --target runtime -t "r3e-tee:${tag}" .
if [ -z "${R3E_TEE_BROKER_KEY:-}" ]; then
    echo "build-eif: set R3E_TEE_BROKER_KEY to the broker_key of GET /v1/keys (r3e-tee-cli list-keys)" \
        "of the service these enclaves serve; without it they accept no secrets" >&2
    exit 2
fi
docker build -f deploy/nitro/enclave.Dockerfile --build-arg "BASE=r3e-tee:${tag}" \
    --build-arg "BROKER_KEY=${R3E_TEE_BROKER_KEY}" -t "r3e-tee-enclave:${tag}" .

mkdir -p "$out"
nitro-cli build-enclave --docker-uri "r3e-tee-enclave:${tag}" --output-file "$out/r3e-tee-runtime.eif" \
    > "$out/measurements.json"
# which key broker the image pins, for the provider to check against its service's
python3 - "$out/measurements.json" "$R3E_TEE_BROKER_KEY" <<'PY'
import json, sys
path, key = sys.argv[1], sys.argv[2]
with open(path) as f:
    data = json.load(f)
data["BrokerKey"] = key
with open(path, "w") as f:
    json.dump(data, f, indent=2)
PY
echo "EIF: $out/r3e-tee-runtime.eif"
cat "$out/measurements.json"
