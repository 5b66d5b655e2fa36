"""Price oracle: signs a price observation with a key no operator can read.

The signing key is a secret released only to enclaves whose attestation matches its policy
(`oracle-signing-key`, a PEM EC private key). The result carries the payload, its ECDSA P-256
signature by that key, and a second signature by the enclave's attested key, so a consumer can
check both who signed (the oracle key) and where it ran (the receipt).

Deploy and invoke (README tour; without the secret it signs with the enclave key only):
    r3e-tee-cli deploy-function examples/functions/price_oracle.py --name price-oracle --runtime python
    r3e-tee-cli invoke price-oracle --data '{"pair": "NEO/USD", "prices": [11.9, 12.1, 12.0]}'

With the oracle key, deploy with `--secret oracle-signing-key`, then store the secret with a policy
naming the measurement that deploy printed (README, Secrets): invocations fail with
`unknown-secret` until it exists.
"""

import base64
import hashlib
import json
import statistics


def handler(event, ctx):
    pair = str(event["pair"])
    prices = [float(p) for p in event["prices"]]
    if not prices:
        raise ValueError("no prices given")
    payload = {"pair": pair, "price": round(statistics.median(prices), 8), "sources": len(prices)}
    message = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()

    out = {"payload": payload, "enclave_signature": base64.b64encode(ctx.sign(message)).decode()}
    if "oracle-signing-key" in ctx.secrets:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = serialization.load_pem_private_key(ctx.secrets["oracle-signing-key"], password=None)
        out["oracle_signature"] = base64.b64encode(key.sign(message, ec.ECDSA(hashes.SHA256()))).decode()
        out["oracle_key_sha256"] = hashlib.sha256(
            key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).hexdigest()
    ctx.logger.info(f"signed {pair} at {payload['price']}")
    return out
