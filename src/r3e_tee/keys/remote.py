"""A remote worker's path to the key broker: ``POST /v1/secrets/release`` and ``/v1/secrets/seal-key``.

``r3e-tee-worker`` runs on TEE nodes without the KEK or the store; it presents its enclaves'
attestation tokens to the service and relays the HPKE-sealed answers (ciphertext only). Set it as
``EnclaveManager.secret_source`` so ``deliver_secrets`` and Nitro sealing work on remote workers.
A denial arrives as :class:`ReleaseDenied` with the broker's reason.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

import httpx

from r3e_tee.errors import EnclaveError
from r3e_tee.keys.errors import ReleaseDenied
from r3e_tee.worker.manager import SecretSource


class HttpSecretSource(SecretSource):
    def __init__(
        self, server: str, token: str, *, timeout: float = 30.0, client: httpx.AsyncClient | None = None
    ) -> None:
        """``token``: the worker's bearer token (enclave scope), never an attestation token."""
        self.server = server.rstrip("/")
        self._http = client or httpx.AsyncClient(
            base_url=self.server,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "r3e-tee-worker"},
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise EnclaveError(
                f"cannot reach the key broker at {self.server}{path}: {exc or type(exc).__name__}",
                hint="check --server and the network between worker and service",
            ) from None
        try:
            payload = resp.json()
        except ValueError:
            payload = {"message": resp.text[:200]}
        if resp.status_code >= 400:
            if isinstance(payload, dict) and payload.get("error") == "release_denied":
                raise ReleaseDenied(
                    str(payload.get("reason", "denied")),
                    str(payload.get("message", "release denied")),
                    secret=payload.get("secret"),
                    check=payload.get("check"),
                    hint=payload.get("hint"),
                )
            message = payload.get("message") if isinstance(payload, dict) else str(payload)
            raise EnclaveError(f"key broker {self.server}{path}: HTTP {resp.status_code}: {message}")
        if not isinstance(payload, dict):
            raise EnclaveError(f"key broker {self.server}{path} answered with no object")
        return payload

    async def release(self, *, token: str, names: Sequence[str]) -> dict[str, Any]:
        reply = await self._post("/v1/secrets/release", {"token": token, "names": list(names)})
        try:
            secrets = [
                {
                    "name": str(s["name"]),
                    "revision": int(s["revision"]),
                    "sealed": base64.b64decode(s["sealed"]),
                }
                for s in reply["secrets"]
            ]
            return {
                "attestation_id": str(reply["attestation_id"]),
                "broker_key": str(reply["broker_key"]),
                "secrets": secrets,
            }
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise EnclaveError("the key broker's release answer is malformed") from None

    async def sealing_key(self, *, token: str) -> dict[str, Any]:
        reply = await self._post("/v1/secrets/seal-key", {"token": token})
        try:
            return {
                "attestation_id": str(reply["attestation_id"]),
                "owner": str(reply["owner"]),
                "version": int(reply["version"]),
                "sealed": base64.b64decode(reply["sealed"]),
                "broker_key": str(reply["broker_key"]),
            }
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise EnclaveError("the key broker's sealing-key answer is malformed") from None

    async def aclose(self) -> None:
        await self._http.aclose()
