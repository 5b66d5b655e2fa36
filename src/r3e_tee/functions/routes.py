"""Function API: deploy, list, get, delete, invoke (sync and async), invocations, enclave keys.

An invocation body is the function's JSON event, byte for byte. With end-to-end encryption the
body is an HPKE ciphertext (Content-Type application/r3e-hpke) sealed to the enclave named by
X-R3E-Enclave, and X-R3E-Reply-Key (base64 X25519) receives the sealed output.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from r3e_tee.functions.model import MAX_CODE_BYTES
from r3e_tee.functions.registry import config_from_request
from r3e_tee.functions.service import FunctionsService, decode_reply_key
from r3e_tee.service.app import FastRequest, FastRoute, ServiceContext
from r3e_tee.service.auth import Principal, Scope, TokenAuthority
from r3e_tee.service.deps import get_ctx, require

router = APIRouter(tags=["functions"])
Ctx = Annotated[ServiceContext, Depends(get_ctx)]
Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]
Invoker = Annotated[Principal, Depends(require(Scope.INVOKE))]
Reader = Annotated[Principal, Depends(require(Scope.READ))]
ENCRYPTED_TYPE = "application/r3e-hpke"
#: an invocation's input (sync or queued): what one event reasonably carries; bigger data belongs
#: in storage the function reads
MAX_INPUT_BYTES = 6 * 1024 * 1024
#: a deploy: the code (at most MAX_CODE_BYTES) in base64, and the settings around it
MAX_DEPLOY_BYTES = (MAX_CODE_BYTES + 2) // 3 * 4 + 1024 * 1024


def set_body_limits(app: Any) -> None:
    """The routes whose bodies may exceed the service's default limit (the fast invoke route
    sets its own, for both of its paths)."""
    app.body_limits.set("POST", "/v1/functions", MAX_DEPLOY_BYTES)
    app.body_limits.set("POST", "/v1/functions/{name}/invocations", MAX_INPUT_BYTES)


def functions(ctx: ServiceContext) -> FunctionsService:
    svc: FunctionsService = ctx.components["functions"]
    return svc


@router.post("/v1/functions", status_code=201, summary="Deploy a new immutable version")
def deploy(body: dict[str, Any], ctx: Ctx, _: Admin) -> dict[str, Any]:
    """Body: the function settings (name, runtime, handler, enclave_size, timeout, min/max enclaves,
    concurrency, secrets, idempotent, ...) and ``code``: the file or zip, base64."""
    config, code = config_from_request(body)
    return functions(ctx).registry.deploy(config, code).describe()


@router.get("/v1/functions", summary="Deployed functions (latest versions)")
def list_functions(ctx: Ctx, _: Reader) -> list[dict[str, Any]]:
    return functions(ctx).registry.list()


@router.get("/v1/functions/{name}", summary="One function version (default: latest)")
def get_function(
    name: str, ctx: Ctx, _: Reader, version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None
) -> dict[str, Any]:
    return functions(ctx).registry.get(name, version).describe()


@router.delete("/v1/functions/{name}", status_code=204, summary="Delete a function (all versions)")
def delete_function(name: str, ctx: Ctx, _: Admin) -> None:
    functions(ctx).registry.delete(name)


@router.get("/v1/functions/{name}/enclave", summary="A ready enclave of the function and its attested keys")
async def function_enclave(name: str, ctx: Ctx, _: Invoker) -> dict[str, Any]:
    return await functions(ctx).enclave_for(name)


def is_encrypted(content_type: str | None) -> bool:
    """Whether the body is an HPKE ciphertext (media types are case-insensitive, RFC 9110)."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == ENCRYPTED_TYPE


def _encryption(
    request: Request, enclave: str | None, reply_key: str | None
) -> tuple[bool, bytes | None, str | None]:
    encrypted = is_encrypted(request.headers.get("content-type"))
    key = decode_reply_key(reply_key) if reply_key else None
    return encrypted, key, enclave


@router.post(
    "/v1/functions/{name}/invoke",
    summary="Invoke and wait: output and signed receipt",
    response_model=dict[str, Any],
    response_class=JSONResponse,
)
async def invoke(
    name: str,
    request: Request,
    ctx: Ctx,
    _: Invoker,
    x_r3e_enclave: Annotated[str | None, Header()] = None,
    x_r3e_reply_key: Annotated[str | None, Header()] = None,
) -> Response:
    encrypted, reply_key, enclave = _encryption(request, x_r3e_enclave, x_r3e_reply_key)
    result = await functions(ctx).invoke(
        name, await request.body(), encrypted=encrypted, reply_key=reply_key, enclave_id=enclave
    )
    return Response(result.to_json_bytes(), media_type="application/json")


def fast_invoke(ctx: ServiceContext) -> FastRoute:
    """``invoke`` as a fast route (the warm path): the same token check and scope, headers,
    errors and response bytes, without FastAPI's routing, dependency solving and thread pool.
    A token the authority has not seen recently is still checked in the store off the loop."""
    tokens = ctx.tokens

    async def handler(request: FastRequest) -> tuple[int, bytes]:
        authorization = request.header(b"authorization")
        principal = tokens.authenticate_cached(authorization)
        if principal is None:
            principal = await anyio.to_thread.run_sync(tokens.authenticate, authorization)
        TokenAuthority.require(principal, Scope.INVOKE)
        encrypted = is_encrypted(request.header(b"content-type"))
        reply_key = request.header(b"x-r3e-reply-key")
        result = await functions(ctx).invoke(
            request.params[0],
            await request.body(),
            encrypted=encrypted,
            reply_key=decode_reply_key(reply_key) if reply_key else None,
            enclave_id=request.header(b"x-r3e-enclave"),
        )
        return 200, result.to_json_bytes()

    return FastRoute("POST", "/v1/functions/{name}/invoke", handler, max_body=MAX_INPUT_BYTES)


@router.post(
    "/v1/functions/{name}/invocations", status_code=202, summary="Queue an invocation (at least once)"
)
async def invoke_async(
    name: str,
    request: Request,
    ctx: Ctx,
    _: Invoker,
    idempotency_key: Annotated[str | None, Header()] = None,
    x_r3e_enclave: Annotated[str | None, Header()] = None,
    x_r3e_reply_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    svc = functions(ctx)
    fv = svc.registry.get(name)
    encrypted, reply_key, enclave = _encryption(request, x_r3e_enclave, x_r3e_reply_key)
    inv_id, created = svc.queue.submit(
        function=name,
        version=fv.version,
        input=await request.body(),
        encrypted=encrypted,
        reply_key=reply_key,
        idempotency_key=idempotency_key,
        enclave_id=enclave,
    )
    svc.dispatcher.wake.set()
    return JSONResponse(
        {"invocation_id": inv_id, "created": created, "status_url": f"/v1/invocations/{inv_id}"},
        status_code=202 if created else 200,
    )


@router.get("/v1/invocations/{invocation_id}", summary="An asynchronous invocation's status and result")
def get_invocation(invocation_id: str, ctx: Ctx, _: Invoker) -> dict[str, Any]:
    return functions(ctx).queue.get(invocation_id)
