"""Bearer-token auth for every route but ``/health``, when ``SNARK_API_KEY`` is set.

A pure ASGI middleware rather than a route dependency, so nothing escapes it: the OpenAI routes,
the form endpoints, ``/metrics``, ``/docs`` and unknown paths (no route list to probe) alike.
``/health`` stays open because load balancers and orchestrators probe it without credentials.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from snark.api.errors import error_response
from snark.errors import Unauthorized

OPEN_PATHS = frozenset({"/health"})


def key_matches(token: str, keys: tuple[bytes, ...]) -> bool:
    """Constant-time comparison against every key: no early exit, so timing reveals neither how
    much of a key matched nor which key it was."""
    presented = token.encode("utf-8")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    return matched


class BearerAuth:
    def __init__(self, app: ASGIApp, *, keys: tuple[str, ...]) -> None:
        if not keys:
            raise ValueError("BearerAuth needs at least one key")
        self.app = app
        self.keys = tuple(key.encode("utf-8") for key in keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and key_matches(token.strip(), self.keys):
            await self.app(scope, receive, send)
            return
        if scheme:
            problem = "The API key is not valid"
        else:
            problem = "No API key was sent"
        exc = Unauthorized(f"{problem}: send the header 'Authorization: Bearer <key>' with a key from SNARK_API_KEY.")
        response = error_response(exc)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
