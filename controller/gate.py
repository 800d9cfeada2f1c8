"""The request gate: who may call a route, and how large a body may be, decided before
any of the body is read or parsed.

A pure ASGI middleware in front of the FastAPI app. For each HTTP request it finds the
route that will serve it (the router's own `matches`), then, in this order:

1. access: each route declares `x-access` in its OpenAPI extra (`public`, `host`: the
   admin token or the token of the host in the path, or `admin`); a route that declares
   nothing needs the admin token (fail closed: a route added later is protected without
   anyone remembering to). 401 without a valid token, 403 with the wrong one, 503 with
   Retry-After when the token cannot be checked (a shared store unreachable, and the
   token not among those this replica verified in the last minute).
2. size: a declared Content-Length above the route's limit is answered 413 at once; a
   chunked body is read only up to the limit (413 as soon as it passes it), then handed
   to the app as it came. The limit is `max_body_bytes` (one object), or
   `max_batch_bytes` for routes whose path ends in /batch, the whole-fabric apply
   (/v1/fabric/apply), and routes that declare `x-body-limit: batch`.

Why before the app: FastAPI resolves a handler's parameters, body included, before the
handler runs, so a check inside a handler comes after a 13 MB body was read and parsed.
An unauthenticated or oversized request costs one header lookup here.

Refusals have the API's JSON shape {"error", "field", "reason"}. This module owns the
gate; it knows routes and tokens (through `controller.auth`), never the fabric.
"""

from __future__ import annotations

from typing import Any

from fastapi.routing import APIRoute
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.auth import ADMIN, PUBLIC, Authenticator, Forbidden, Unauthorized
from controller.fabric.common import RETRY_AFTER_BUSY_S
from controller.store import StoreBusy

BATCH = "batch"
# Whole-document routes with the batch limit whether or not they declare x-body-limit.
BATCH_PATHS = frozenset({"/v1/fabric/apply"})


def access_of(route: Any) -> str:
    """What a route needs: its declared x-access; the framework's own documentation routes
    are public; anything else needs the admin token."""
    if not isinstance(route, APIRoute):
        return PUBLIC
    return (route.openapi_extra or {}).get("x-access", ADMIN)


def uses_batch_limit(route: Any) -> bool:
    if not isinstance(route, APIRoute):
        return False
    return (route.path.endswith("/batch") or route.path in BATCH_PATHS
            or (route.openapi_extra or {}).get("x-body-limit") == BATCH)


class RequestGate:
    def __init__(self, app: ASGIApp, *, routes_of: Any, auth: Authenticator,
                 max_body_bytes: int, max_batch_bytes: int):
        self.app = app
        self.routes_of = routes_of  # the FastAPI app: its routes, read on each request
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.max_batch_bytes = max_batch_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route, params = self._route(scope)
        if route is None:  # no such path or method: the router answers 404/405, body unread
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = _headers(scope)
        access = access_of(route)
        try:
            self.auth.authorize(headers.get("authorization"), access, params.get("host"), f"{method} {path}")
        except (Unauthorized, Forbidden) as exc:
            extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            await JSONResponse(exc.body(), status_code=exc.status, headers=extra)(scope, receive, send)
            return
        except StoreBusy as exc:  # the token could not be checked: the database is unreachable
            await JSONResponse({"error": f"{method} {path}: the controller cannot check the token now",
                                "field": "Authorization", "reason": str(exc)}, status_code=503,
                               headers={"Retry-After": str(RETRY_AFTER_BUSY_S)})(scope, receive, send)
            return
        limit = self.max_batch_bytes if uses_batch_limit(route) else self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(method, path, limit, f"Content-Length is {declared}")(scope, receive, send)
            return
        if declared is None and "chunked" not in headers.get("transfer-encoding", ""):
            await self.app(scope, receive, send)  # no body
            return
        # Read the body up to the limit before the app sees any of it.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                messages.append(message)  # a disconnect: let the app see it
                break
            size += len(message.get("body", b""))
            if size > limit:
                await _too_large(method, path, limit, f"the body passed {limit} bytes")(scope, receive, send)
                return
            messages.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            if messages:
                return messages.pop(0)
            return await receive()

        await self.app(scope, replay, send)

    def _route(self, scope: Scope) -> tuple[Any, dict[str, Any]]:
        for route in self.routes_of.router.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                return route, child.get("path_params", {})
        return None, {}


def _headers(scope: Scope) -> dict[str, str]:
    # Latin-1: what HTTP header bytes decode to (starlette does the same).
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


def _too_large(method: str, path: str, limit: int, what: str) -> JSONResponse:
    return JSONResponse(
        {"error": f"{method} {path}: request body too large: {what}", "field": "body",
         "reason": f"the limit of this route is {limit} bytes"},
        status_code=413,
        headers={"Connection": "close"},
    )
